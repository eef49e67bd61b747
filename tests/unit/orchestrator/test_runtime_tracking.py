"""Runtime pieces that need no Ray cluster: run keys, MLflow run bookkeeping on a SQLite store, the asynchronous
metric logger, checkpoint snapshot reading, path and worker-count rules of local mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.spec import flatten, job_hash, render, validate_job


def _job(**train):
    return validate_job({"name": "unit-rt", "train": {"max_steps": 7, "global_batch_size": 8,
                                                     "per_worker_batch_size": 4, **train},
                         "data": {"train_url": "data/synth/train", "val_url": "s3://bucket/val"},
                         "checkpoint": {"storage_url": ".mmae/checkpoints"}})


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def client(sqlite_uri):
    from mlflow import MlflowClient

    return MlflowClient(sqlite_uri)


def test_run_key_is_stable_and_overridable():
    from orchestrator.runtime.tracking import resolve_run_key

    job = _job()
    key = resolve_run_key(job, env={})
    assert key == resolve_run_key(_job(), env={}) == f"unit-rt-{job_hash(job)}"
    assert resolve_run_key(_job(seed=1), env={}) != key  # another training config: another run
    more = job.model_copy(update={"resources": job.resources.model_copy(update={"max_workers": 2})})
    assert resolve_run_key(more, env={}) == key  # more workers: the same run (elastic)
    assert resolve_run_key(job, env={"MMAE_RUN_KEY": "my run/1"}) == "my-run-1"
    fresh1, fresh2 = resolve_run_key(job, fresh=True, env={}), resolve_run_key(job, fresh=True, env={})
    assert fresh1.startswith(key + "-") and fresh2.startswith(key + "-") and fresh1 != fresh2
    managed = {"SKYPILOT_MANAGED_JOB_ID": "3", "SKYPILOT_TASK_ID": "sky-managed-2026_x_3"}
    assert resolve_run_key(job, env=managed) == resolve_run_key(job, env=dict(managed))
    assert resolve_run_key(job, env=managed).startswith(key + "-")
    assert resolve_run_key(job, env={**managed, "SKYPILOT_TASK_ID": "other"}) != resolve_run_key(job, env=managed)
    assert resolve_run_key(job, env={"SKYPILOT_TASK_ID": "unmanaged"}) == key


def test_params_never_carry_secret_looking_names(monkeypatch):
    from orchestrator.runtime import tracking

    monkeypatch.setattr(tracking, "flatten", lambda job: {
        "masking.num_encoded_tokens": "98", "x.aws_secret_access_key": "s", "x.api_key": "k", "x.auth_token": "t",
        "x.password": "p", "model.num_global_tokens": "1", "x.long": "v" * 7000})
    params = tracking.flat_params(_job())
    assert sorted(params) == ["masking.num_encoded_tokens", "model.num_global_tokens", "x.long"]
    assert len(params["x.long"]) == 6000


def test_open_run_creates_then_reuses_and_marks(client, tmp_path):
    from orchestrator.runtime import tracking

    job = _job()
    art = (tmp_path / "arts").as_uri()
    first = tracking.open_run(job, "key-a", launch="local", artifact_location=art, client=client)
    assert not first.reused
    run = client.get_run(first.run_id)
    assert run.data.params == flatten(job)
    assert run.info.run_name == f"unit-rt-{job_hash(job)}"
    tags = run.data.tags
    assert (tags["mmae.run_key"], tags["mmae.stage"], tags["mmae.job_name"], tags["mmae.launch"],
            tags["mmae.total_steps"], tags["mmae.config_hash"]) == ("key-a", "pretrain", "unit-rt", "local", "7",
                                                                    job_hash(job))
    assert client.get_experiment(first.experiment_id).artifact_location == art
    text = Path(client.download_artifacts(first.run_id, "job/resolved_job.yaml", str(tmp_path))).read_text()
    assert text == render(job)

    tracking.mark_failed(first.run_id, ValueError("boom\nsecond line"), client=client)
    run = client.get_run(first.run_id)
    assert run.info.status == "FAILED" and run.data.tags["mmae.error"] == "ValueError: second line"

    again = tracking.open_run(job, "key-a", launch="local", client=client)
    assert again.run_id == first.run_id and again.reused
    run = client.get_run(first.run_id)
    assert run.info.status == "RUNNING" and "mmae.error" not in run.data.tags
    tracking.mark_finished(first.run_id, client=client)
    assert tracking.open_run(job, "key-a", launch="local", client=client).run_id == first.run_id  # completed too

    other = tracking.open_run(job, "key-b", launch="local", client=client)
    assert other.run_id != first.run_id
    assert [r.info.run_id for r in client.search_runs([first.experiment_id])].count(first.run_id) == 1


def test_find_run_prefers_the_unfinished_run(client):
    from orchestrator.runtime import tracking

    exp = tracking.ensure_experiment(client, "unit-find")
    unfinished = client.create_run(exp, tags={"mmae.run_key": "k"}, start_time=1000)
    client.set_terminated(unfinished.info.run_id, "KILLED")
    finished = client.create_run(exp, tags={"mmae.run_key": "k"}, start_time=2000)
    client.set_terminated(finished.info.run_id, "FINISHED")
    client.create_run(exp, tags={"mmae.run_key": "other"}, start_time=3000)
    assert tracking.find_run(client, exp, "k").info.run_id == unfinished.info.run_id
    client.set_terminated(unfinished.info.run_id, "FINISHED")
    assert tracking.find_run(client, exp, "k").info.run_id == finished.info.run_id  # the newest
    assert tracking.find_run(client, exp, "missing") is None


def test_mlflow_logger_sends_in_background_and_survives_errors(client, caplog, tmp_path):
    import numpy as np

    from orchestrator.runtime.reporter import MlflowLogger

    exp = client.create_experiment("unit-logger", artifact_location=(tmp_path / "arts").as_uri())
    run_id = client.create_run(exp).info.run_id
    log = MlflowLogger(run_id, client.tracking_uri, flush_interval_s=30.0)
    for step in range(1, 1201):  # more than one log_batch (1000 metrics) per flush
        log.metrics(step, {"a": step * 0.5, "skip": "text"})
    log.tags({"mmae.checkpoint_step": "3"})
    log.image(4, "recon", np.zeros((4, 4, 3), np.uint8))
    assert log.flush(timeout=60)
    hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "a"))
    assert hist == [(s, s * 0.5) for s in range(1, 1201)]
    run = client.get_run(run_id)
    assert "skip" not in run.data.metrics and run.data.tags["mmae.checkpoint_step"] == "3"
    assert any(a.path.startswith("images/recon") and a.path.endswith(".png")
               for a in client.list_artifacts(run_id, "images"))
    log.close()

    bad = MlflowLogger("0" * 32, client.tracking_uri, flush_interval_s=30.0)
    bad.metrics(1, {"a": 1.0})
    assert bad.flush(timeout=60)  # dropped with a warning, not raised
    bad.close()
    assert "could not log" in caplog.text


def test_stored_checkpoint_reads_ray_snapshot(tmp_path):
    from orchestrator.runtime.entry import stored_checkpoint

    assert stored_checkpoint(str(tmp_path), "k") is None
    (tmp_path / "k").mkdir()
    snapshot = {"ray_version": "2.60.0", "checkpoint_results": [], "checkpoint_report_indices": [],
                "latest_checkpoint_result": {"version": 0, "checkpoint_dir_name": "checkpoint_000000009_x",
                                             "metrics": {"step": 9, "train/loss/total": 1.0}},
                "pending_training_results": [], "pending_validation_specs": [], "current_report_index": 3,
                "validated_checkpoint_dir_names": [], "timed_out_validation_checkpoint_dir_names": [],
                "failed_validation_checkpoint_dir_names": []}
    (tmp_path / "k" / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    assert stored_checkpoint(str(tmp_path), "k") == (9, f"{tmp_path}/k/checkpoint_000000009_x")


def test_paths_are_absolute_for_workers(tmp_path, monkeypatch):
    from orchestrator.runtime.entry import storage_path, worker_job

    monkeypatch.chdir(tmp_path)
    assert storage_path(".mmae/checkpoints") == str(tmp_path.resolve() / ".mmae/checkpoints")
    assert storage_path("s3://b/p/") == "s3://b/p"
    assert storage_path("file:///x/y") == "/x/y"
    wj = worker_job(_job())
    assert wj.data.train_url == str(tmp_path.resolve() / "data/synth/train")
    assert wj.data.val_url == "s3://bucket/val"
    assert wj.checkpoint.storage_url == str(tmp_path.resolve() / ".mmae/checkpoints")
    assert job_hash(wj) != job_hash(_job())  # hence the run key and params come from the job as written


def test_local_mode_defaults(tmp_path, monkeypatch):
    from orchestrator.runtime.local import default_tracking, local_scaling, open_command

    job = _job()
    one = local_scaling(job, gpus=0, cpus=2)
    assert (one.min_workers, one.max_workers, one.use_gpu) == (1, 1, False)
    two = job.model_copy(update={"resources": job.resources.model_copy(update={"max_workers": 2})})
    assert local_scaling(two, gpus=0, cpus=4).max_workers == 2
    gpu = local_scaling(two, gpus=1, cpus=8)
    assert (gpu.max_workers, gpu.use_gpu) == (1, True)
    assert "GPU" in gpu.scaling_config().resources_per_worker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, art = default_tracking(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/.mmae/mlflow.db"
    assert art == (tmp_path.resolve() / ".mmae/mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking(tmp_path) == ("http://127.0.0.1:5000", None)
    assert open_command(uri, "1", "abc") == f"mlflow ui --backend-store-uri {uri}"
    assert open_command("http://h:5000/", "1", "abc") == "open http://h:5000/#/experiments/1/runs/abc"


def test_error_summary_is_one_line_per_worker():
    from orchestrator.runtime.tracking import error_summary

    class WorkerGroupError(Exception):
        def __init__(self):
            super().__init__("Training failed due to worker errors: ...")
            self.worker_failures = {1: RuntimeError("Traceback (most recent call last):\n  File x\nValueError: bad"),
                                    0: OSError("disk full")}

    assert error_summary(WorkerGroupError()) == "WorkerGroupError: rank 0: OSError: disk full; rank 1: ValueError: bad"
    assert error_summary(KeyError("k")) == "KeyError: 'k'"
    assert error_summary("plain") == "plain"
