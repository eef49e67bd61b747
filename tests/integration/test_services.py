"""The service fixtures themselves work: S3 round trip, MLflow server health and logging, Ray cluster."""

from __future__ import annotations


def test_s3_roundtrip(s3_endpoint):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="mmae-test")
    s3.put_object(Bucket="mmae-test", Key="a/b.txt", Body=b"hello")
    assert s3.get_object(Bucket="mmae-test", Key="a/b.txt")["Body"].read() == b"hello"


def test_mlflow_server_logs(mlflow_uri):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    exp = client.create_experiment("fixture-check")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "x", 1.5, step=3)
    hist = client.get_metric_history(run.info.run_id, "x")
    assert [(m.step, m.value) for m in hist] == [(3, 1.5)]


def test_ray_cluster(ray_local):
    import ray

    ray.init(address=ray_local)
    try:
        assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
        assert ray.cluster_resources().get("CPU") == 4
    finally:
        ray.shutdown()
