"""Local mode end to end on real services: a `ray start` cluster, an MLflow tracking server and a moto S3 endpoint.

* A run with 2 CPU workers streams synthetic shards from S3, checkpoints to S3 and leaves a complete MLflow run.
* A launcher killed mid-run and launched again resumes in the same MLflow run from the stored checkpoint and says
  so; ``fresh=True`` starts a new run from step 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from _runs import runs_with_key, tiny_job

from orchestrator.spec import flatten, render

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _note(capsys, message: str) -> None:
    """Timings and values shown with `pytest -s` (outside the captured output the tests inspect)."""
    with capsys.disabled():
        print(message)


def _history(client, run_id: str, key: str) -> list[tuple[int, float, int]]:
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))


def _artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out.extend(_artifacts(client, run_id, item.path) if item.is_dir else [item.path])
    return out


def test_local_run_streams_from_s3_and_records_mlflow(s3_endpoint, mlflow_uri, ray_local, tmp_path, monkeypatch,
                                                      capsys):
    import boto3
    import s3fs
    from mlflow import MlflowClient
    from safetensors.numpy import load as load_safetensors

    from multimae_core.data.synth import write_synth
    from orchestrator.runtime.local import run_local
    from orchestrator.runtime.tracking import resolve_run_key

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MMAE_RUN_KEY", raising=False)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="mmae-rt-data")
    s3.create_bucket(Bucket="mmae-rt-ckpt")
    write_synth("s3://mmae-rt-data/synth/train", 32, size=32, seed=0, samples_per_shard=8, num_workers=1)
    write_synth("s3://mmae-rt-data/synth/val", 8, size=32, seed=1, samples_per_shard=8, num_workers=1)
    experiment = f"rt-s3-{uuid.uuid4().hex[:8]}"
    job = tiny_job(train_url="s3://mmae-rt-data/synth/train", val_url="s3://mmae-rt-data/synth/val",
                   storage_url="s3://mmae-rt-ckpt/ckpt", experiment=experiment, workers=2, max_steps=12,
                   every_steps=6)

    t0 = time.monotonic()
    run_id = run_local(job)
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    _note(capsys, f"2-worker S3 run: {elapsed:.1f} s")

    assert "Starting from step 0" in err
    assert run_id in err and "mlflow" in err.lower()
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    run_key = resolve_run_key(job, env={})
    assert run.data.tags["mmae.run_key"] == run_key
    assert run.data.tags["mmae.launch"] == "local"
    assert run.data.tags["mmae.total_steps"] == "12"
    # Params: exactly the dotted keys `--set` takes, with the values the job resolved to.
    assert run.data.params == flatten(job)
    assert run.data.params["model.embed_dim"] == "64" and run.data.params["resources.max_workers"] == "2"

    # Per-modality losses, logged at every optimizer step 1..12 by rank 0 only (one value per step), decreasing.
    for head in ("rgb", "depth", "total"):
        hist = _history(client, run_id, f"train/loss/{head}")
        assert [s for s, _, _ in hist] == list(range(1, 13)), head
        values = np.array([v for _, v, _ in hist])
        assert np.all(np.isfinite(values))
        _note(capsys, f"train/loss/{head}: {np.round(values, 3).tolist()}")
        assert values[-3:].mean() < 0.9 * values[:3].mean(), (head, values)
    assert [m.value for m in client.get_metric_history(run_id, "num_workers")][-1] == 2
    assert client.get_metric_history(run_id, "val/loss/total")
    assert any(k.startswith("system/") for k in run.data.metrics)

    arts = _artifacts(client, run_id)
    assert any(a.startswith("images/") and a.endswith(".png") for a in arts), arts
    assert "job/resolved_job.yaml" in arts and "weights/final.safetensors" in arts
    resolved = client.download_artifacts(run_id, "job/resolved_job.yaml", str(tmp_path))
    assert Path(resolved).read_text() == render(job)

    # Checkpoints went to S3 under <storage_url>/<run_key>; the final weights are the last checkpoint's, bit for bit.
    ckpt_uri = run.data.tags["mmae.checkpoint_uri"]
    assert ckpt_uri.startswith(f"s3://mmae-rt-ckpt/ckpt/{run_key}/checkpoint_000000012")
    fs = s3fs.S3FileSystem()
    meta = json.loads(fs.cat(f"{ckpt_uri}/meta.json"))
    assert meta["step"] == 12
    stored = load_safetensors(fs.cat(f"{ckpt_uri}/model.safetensors"))
    final = load_safetensors(Path(client.download_artifacts(run_id, "weights/final.safetensors",
                                                            str(tmp_path))).read_bytes())
    assert sorted(final) == sorted(stored) and any(k.startswith("encoder.") for k in final)
    for key, value in stored.items():
        np.testing.assert_array_equal(final[key], value)
    assert run.data.tags["mmae.final_weights"] == "weights/final.safetensors"
    assert not (tmp_path / ".mmae").exists()  # MLFLOW_TRACKING_URI was set: no local store


def _snapshot_step(path: Path) -> int | None:
    try:
        snap = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    latest = snap.get("latest_checkpoint_result") or {}
    return (latest.get("metrics") or {}).get("step")


def test_relaunch_resumes_same_run_and_fresh_starts_new(mlflow_uri, ray_local, tmp_path, monkeypatch, capsys):
    import ray
    from mlflow import MlflowClient

    from multimae_core.data.synth import write_synth
    from orchestrator.runtime.local import run_local
    from orchestrator.runtime.tracking import resolve_run_key

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MMAE_RUN_KEY", raising=False)
    write_synth(str(tmp_path / "data/train"), 32, size=32, seed=0, samples_per_shard=8, num_workers=1)
    experiment = f"rt-resume-{uuid.uuid4().hex[:8]}"
    job = tiny_job(train_url=str(tmp_path / "data/train"), val_url=None, storage_url=str(tmp_path / "ckpt"),
                   experiment=experiment, workers=1, max_steps=12, every_steps=3, name="rt-resume")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(render(job))
    run_key = resolve_run_key(job, env={})
    snapshot = tmp_path / "ckpt" / run_key / "checkpoint_manager_snapshot.json"

    # 1. The launcher (the SkyPilot entry command) is killed once a checkpoint is stored.
    t0 = time.monotonic()
    log = open(tmp_path / "launch1.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.runtime.entry", "--job", str(job_file),
                             "--launch", "local"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        deadline = time.monotonic() + 300
        while (_snapshot_step(snapshot) or 0) < 3:
            assert proc.poll() is None, (tmp_path / "launch1.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
    # Wait until the cluster has released the killed job's controller and workers (then the snapshot is final).
    ray.init(address=ray_local)
    try:
        deadline = time.monotonic() + 60
        while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        ray.shutdown()
    killed_at = _snapshot_step(snapshot)
    _note(capsys, f"launcher killed after checkpoint step {killed_at}: {time.monotonic() - t0:.1f} s")
    assert 3 <= killed_at < 12, "the first launch must be interrupted before its end"
    client = MlflowClient(mlflow_uri)
    (first,) = runs_with_key(client, experiment, run_key)
    assert first.info.status == "RUNNING"  # killed: nobody could mark it

    # 2. The same job launched again: same MLflow run, resumed from the stored checkpoint (not step 0), says so.
    relaunched_ms = int(time.time() * 1000)
    t1 = time.monotonic()
    run_id = run_local(job)
    err = capsys.readouterr().err
    _note(capsys, f"resumed run: {time.monotonic() - t1:.1f} s")
    resumed_from = _snapshot_step(snapshot)
    assert run_id == first.info.run_id
    assert len(runs_with_key(client, experiment, run_key)) == 1
    assert f"Resuming from step {killed_at}" in err, err[-2000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    hist = _history(client, run_id, "train/loss/total")
    steps_after = [s for s, _, ts in hist if ts >= relaunched_ms]
    assert steps_after and min(steps_after) == killed_at + 1 and max(steps_after) == 12
    assert resumed_from == 12
    assert run.data.tags["mmae.checkpoint_step"] == "12"

    # 3. fresh=True: a new run key and MLflow run, trained from step 0.
    t2 = time.monotonic()
    fresh_id = run_local(job, fresh=True)
    err = capsys.readouterr().err
    _note(capsys, f"fresh run: {time.monotonic() - t2:.1f} s")
    assert fresh_id != run_id
    assert "Starting from step 0" in err
    fresh = client.get_run(fresh_id)
    assert fresh.data.tags["mmae.run_key"].startswith(run_key + "-")
    assert fresh.info.status == "FINISHED"
    assert [s for s, _, _ in _history(client, fresh_id, "train/loss/total")] == list(range(1, 13))
    assert len(runs_with_key(client, experiment, run_key)) == 1


def test_failed_run_is_marked_failed_with_the_error(mlflow_uri, ray_local, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from orchestrator.runtime.local import run_local
    from orchestrator.runtime.tracking import resolve_run_key

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MMAE_RUN_KEY", raising=False)
    experiment = f"rt-fail-{uuid.uuid4().hex[:8]}"
    missing = tmp_path / "no-such-shards"
    job = tiny_job(train_url=str(missing), val_url=None, storage_url=str(tmp_path / "ckpt"), experiment=experiment,
                   workers=1, max_steps=4, every_steps=2, name="rt-fail")
    job = job.model_copy(update={"resources": job.resources.model_copy(update={"max_failures": 0})})

    t0 = time.monotonic()
    with pytest.raises(Exception) as info:  # noqa: PT011 - Ray Train's TrainingFailedError wraps the worker's error
        run_local(job)
    _note(capsys, f"failing run: {time.monotonic() - t0:.1f} s")
    assert "no-such-shards" in str(info.value)
    client = MlflowClient(mlflow_uri)
    (run,) = runs_with_key(client, experiment, resolve_run_key(job, env={}))
    assert run.info.status == "FAILED"
    error = run.data.tags["mmae.error"]
    assert "no-such-shards" in error and "rank 0" in error and "\n" not in error  # one line, not the traceback
    assert "error/traceback.txt" in _artifacts(client, run.info.run_id)
    assert "ended FAILED" in capsys.readouterr().err
