"""Fault tolerance of a Ray Train run on real local services (a `ray start` cluster and an MLflow tracking server).

* A Ray Train worker process killed with SIGKILL mid-run: Ray Train restarts the worker group, the run resumes from
  its last persisted checkpoint (not from step 0) and ends at ``train.max_steps``, in the same MLflow run.
* A crash while a checkpoint is being written (the fault-injection hook of `multimae_core.training.checkpoint`
  kills the writing process halfway through): the previous checkpoint stays the latest one and loads, the
  half-written folder is never taken for a checkpoint, and the run resumes from the previous checkpoint.

Each run is driven from a thread of the test process (``run_training``) while the test watches Ray Train's checkpoint
snapshot and the MLflow metrics and injects the fault.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from _runs import remove_leaked_local_checkpoints, runs_with_key

from orchestrator.spec import validate_job

pytestmark = pytest.mark.slow

SNAPSHOT = "checkpoint_manager_snapshot.json"


def ft_job(*, train_url: str, storage_url: str, experiment: str, workers: int, max_steps: int, every_steps: int,
           keep: int, name: str):
    """A MultiMAE small enough for tens of milliseconds per step on 2 shared cores: embed 64, depth 2, 32 px.

    Steps themselves are fast; the pace of a run is set by Ray Train's report of each checkpoint (the controller
    consumes one report per health-check interval, 2 s by default), which leaves the test time to act between
    checkpoints.
    """
    return validate_job({
        "name": name,
        "model": {"preset": "tiny", "image_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2,
                  "decoder_embed_dim": 64, "decoder_depth": 1, "decoder_num_heads": 2},
        "modalities": {"inputs": ["rgb", "depth"], "outputs": ["rgb", "depth"]},
        "masking": {"num_encoded_tokens": 12},
        "data": {"train_url": train_url, "val_url": None, "shuffle_buffer": 8, "num_workers": 0},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "min_lr": 1e-4, "weight_decay": 0.0},
        "train": {"max_steps": max_steps, "epochs": 1000, "global_batch_size": 8, "per_worker_batch_size": 4,
                  "log_every_steps": 1, "image_every_steps": 1000, "seed": 0},
        "checkpoint": {"storage_url": storage_url, "every_steps": every_steps, "keep": keep},
        "tracking": {"experiment": experiment, "log_system_metrics": False},
        "resources": {"max_workers": workers, "max_failures": 2},
    })


def _note(capsys, message: str) -> None:
    """Timings shown with `pytest -s` (outside the captured output)."""
    with capsys.disabled():
        print(message)


def _snapshot_step(path: Path) -> int | None:
    """Step of the latest checkpoint registered in Ray Train's run snapshot (what a restart resumes from)."""
    try:
        snap = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    latest = snap.get("latest_checkpoint_result") or {}
    return (latest.get("metrics") or {}).get("step")


def _history(client, run_id: str, key: str) -> list[tuple[int, float, int]]:
    """(step, value, timestamp ms) of every logged value of ``key``, also repeated steps, in step order."""
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))


def _train_worker_pids() -> set[int]:
    """PIDs of the live Ray Train worker actors of the connected cluster (Ray's actor table in the GCS; the public
    state API needs the dashboard, which the test cluster does not run)."""
    import ray._private.state

    return {int(a["Pid"]) for a in ray._private.state.actors().values()
            if a["State"] == "ALIVE" and "RayTrainWorker" in a["ActorClassName"] and a["Pid"]}


def _wait(condition: Callable[[], object], *, timeout: float, what: str, alive: threading.Thread | None = None,
          interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert alive is None or alive.is_alive(), f"the run ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(interval)


class _Launch:
    """`run_training` in a background thread; ``result`` / ``error`` once it returns."""

    def __init__(self, job, scaling, tracking_uri: str) -> None:
        from orchestrator.runtime.entry import run_training

        self.lines: list[str] = []
        self.result = self.error = None

        def target() -> None:
            try:
                self.result = run_training(job, scaling=scaling, launch="local", tracking_uri=tracking_uri,
                                           echo=self.lines.append)
            except BaseException as err:  # noqa: BLE001 - re-raised by join()
                self.error = err

        self.thread = threading.Thread(target=target, name="mmae-test-launch", daemon=True)
        self.thread.start()

    def join(self, timeout: float):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the run did not end within {timeout:.0f} s"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def ray_connected(ray_local, mlflow_uri, monkeypatch):
    """The test process connected to the session's `ray start` cluster, with the job environment forwarded."""
    import ray

    from orchestrator.runtime.entry import forwarded_env, init_ray

    monkeypatch.delenv("MMAE_RUN_KEY", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    init_ray(ray_local, env_vars=forwarded_env(), log_to_driver=False)
    try:
        yield ray_local
    finally:
        ray.shutdown()


def _synth(root: Path, num: int) -> str:
    from multimae_core.data.synth import write_synth

    url = str(root / "data" / "train")
    write_synth(url, num, size=32, seed=0, samples_per_shard=8, num_workers=1)
    return url


def test_sigkilled_worker_restarts_from_last_checkpoint_in_same_run(ray_connected, mlflow_uri, tmp_path,
                                                                     monkeypatch, capsys):
    from mlflow import MlflowClient

    from orchestrator.runtime.entry import Scaling
    from orchestrator.runtime.tracking import resolve_run_key

    monkeypatch.chdir(tmp_path)
    experiment = f"ft-kill-{uuid.uuid4().hex[:8]}"
    max_steps, every = 12, 2
    job = ft_job(train_url=_synth(tmp_path, 32), storage_url=str(tmp_path / "ckpt"), experiment=experiment,
                 workers=2, max_steps=max_steps, every_steps=every, keep=2, name="ft-kill")
    run_key = resolve_run_key(job, env={})
    snapshot = tmp_path / "ckpt" / run_key / SNAPSHOT
    client = MlflowClient(mlflow_uri)

    t0, started = time.monotonic(), time.time()
    launch = _Launch(job, Scaling(2, 2, use_gpu=False), mlflow_uri)
    run = _wait(lambda: (runs_with_key(client, experiment, run_key) or [None])[0], timeout=120,
                what="the MLflow run", alive=launch.thread, interval=0.5)
    run_id = run.info.run_id

    def logged_steps() -> set[int]:
        return {s for s, _, _ in _history(client, run_id, "train/loss/total")}

    # Kill when a checkpoint C is the latest one and rank 0 has already logged a step after C, so the restart has to
    # log that step again: the restart is visible in the metric history.
    def ready() -> tuple[int, set[int]] | None:
        step = _snapshot_step(snapshot)
        if step is None or step + every >= max_steps or max(logged_steps(), default=0) <= step:
            return None
        pids = _train_worker_pids()
        return (step, pids) if len(pids) == 2 and _snapshot_step(snapshot) == step else None

    ckpt_step, old_pids = _wait(ready, timeout=180, what="a checkpoint followed by logged steps", alive=launch.thread,
                                interval=0.05)
    victim = min(old_pids)
    killed_ms = int(time.time() * 1000)
    os.kill(victim, signal.SIGKILL)
    t_kill = time.monotonic()
    _note(capsys, f"SIGKILL worker pid {victim} after checkpoint step {ckpt_step} at {t_kill - t0:.1f} s")
    new_pids = _wait(lambda: (p := _train_worker_pids()) and len(p) == 2 and not p & old_pids and p, timeout=180,
                     what="a new worker group", alive=launch.thread, interval=0.2)
    _note(capsys, f"new worker group {sorted(new_pids)} after {time.monotonic() - t_kill:.1f} s")
    result = launch.join(timeout=300)
    _note(capsys, f"run with one killed worker: {time.monotonic() - t0:.1f} s")
    remove_leaked_local_checkpoints(run_key, started)

    # One MLflow run for the job, the one the driver created, FINISHED at the configured step count.
    assert result.run_id == run_id and result.final_step == max_steps
    (only,) = runs_with_key(client, experiment, run_key)
    assert only.info.run_id == run_id and only.info.status == "FINISHED"
    assert only.data.tags["mmae.checkpoint_step"] == str(max_steps)
    assert _snapshot_step(snapshot) == max_steps
    assert not any(line.startswith("Resuming") for line in launch.lines)  # the launch itself started from step 0

    # Every step was logged; after the kill, logging restarted right after the last checkpoint (the workers resumed
    # from it, not from step 0) and repeated the steps rank 0 had logged after it before the kill. That checkpoint is
    # C, the latest registered one at the kill, or, rarely, C + every when the controller had already collected one
    # rank's report of it and registers it with the survivor's (rank 0 waits for each registration, so never later).
    hist = _history(client, run_id, "train/loss/total")
    assert {s for s, _, _ in hist} == set(range(1, max_steps + 1))
    after = sorted({s for s, _, ts in hist if ts >= killed_ms})
    resumed_from = after[0] - 1
    assert resumed_from in (ckpt_step, ckpt_step + every), (ckpt_step, after)
    assert after == list(range(resumed_from + 1, max_steps + 1)), (ckpt_step, after)
    _note(capsys, f"resumed from checkpoint step {resumed_from}")
    if resumed_from == ckpt_step:  # the kill came after rank 0 had logged step C + 1 (see `ready`)
        repeated = sorted({s for s, _, ts in hist if ts < killed_ms} & set(after))
        assert repeated and repeated[0] == ckpt_step + 1, (ckpt_step, repeated)
    assert {m.value for m in client.get_metric_history(run_id, "num_workers")} == {2.0}
    assert victim not in new_pids


def test_crash_while_writing_checkpoint_keeps_previous_checkpoint(ray_connected, mlflow_uri, tmp_path, monkeypatch,
                                                                  capsys):
    import torch
    from mlflow import MlflowClient

    from multimae_core.model.presets import build_model
    from multimae_core.training.checkpoint import (
        FAIL_AT_STEP_ENV,
        FAIL_MARKER_ENV,
        META_FILE,
        MODEL_FILE,
        STATE_FILE,
        latest_checkpoint,
        load_checkpoint,
    )
    from orchestrator.runtime.entry import Scaling
    from orchestrator.runtime.tracking import resolve_run_key

    monkeypatch.chdir(tmp_path)
    experiment = f"ft-ckpt-{uuid.uuid4().hex[:8]}"
    max_steps, every, crash_at = 9, 3, 6
    marker = tmp_path / "crashed"
    # The hook reaches the workers through the forwarded MMAE_* environment; it fires once (the marker).
    monkeypatch.setenv(FAIL_AT_STEP_ENV, str(crash_at))
    monkeypatch.setenv(FAIL_MARKER_ENV, str(marker))
    job = ft_job(train_url=_synth(tmp_path, 32), storage_url=str(tmp_path / "ckpt"), experiment=experiment,
                 workers=2, max_steps=max_steps, every_steps=every, keep=3, name="ft-ckpt")
    run_key = resolve_run_key(job, env={})
    run_dir = tmp_path / "ckpt" / run_key
    client = MlflowClient(mlflow_uri)

    def fresh_model():
        return build_model(job.model, inputs=job.modalities.inputs, outputs=job.modalities.outputs)

    t0, started = time.monotonic(), time.time()
    launch = _Launch(job, Scaling(2, 2, use_gpu=False), mlflow_uri)
    _wait(marker.exists, timeout=240, what="the crash inside the checkpoint write", alive=launch.thread,
          interval=0.05)
    crashed_ms = int(marker.stat().st_mtime * 1000)
    _note(capsys, f"rank 0 killed while writing the checkpoint of step {crash_at} at {time.monotonic() - t0:.1f} s")

    # Right after the crash: the previous checkpoint is the latest, complete and loadable; nothing of step 6 reached
    # the checkpoint storage.
    assert _snapshot_step(run_dir / SNAPSHOT) == crash_at - every
    stored = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert stored and all(p.name.startswith(f"checkpoint_{crash_at - every:09d}_") for p in stored), stored
    state = load_checkpoint(stored[-1], fresh_model())
    assert state.step == crash_at - every

    # The half-written folder (weights and train state, no meta.json, never renamed) is not a checkpoint to anyone.
    partial = Path(marker.read_text())
    try:
        assert ".tmp-" in partial.name and (partial / MODEL_FILE).is_file() and (partial / STATE_FILE).is_file()
        assert not (partial / META_FILE).exists() and not partial.with_name("checkpoint").exists()
        assert latest_checkpoint(partial.parent) is None
        with pytest.raises(FileNotFoundError):
            load_checkpoint(partial, fresh_model())
    finally:
        if partial.parent.name.startswith("mmae-ckpt-"):
            shutil.rmtree(partial.parent, ignore_errors=True)  # SIGKILL left the worker's temp folder behind

    result = launch.join(timeout=300)
    _note(capsys, f"run with a crash in a checkpoint write: {time.monotonic() - t0:.1f} s")
    remove_leaked_local_checkpoints(run_key, started)
    assert result.final_step == max_steps
    (run,) = runs_with_key(client, experiment, run_key)
    assert run.info.run_id == result.run_id and run.info.status == "FINISHED"

    # The restarted workers resumed from the previous checkpoint: after the crash, steps 4..9 were logged again.
    hist = _history(client, result.run_id, "train/loss/total")
    assert {s for s, _, _ in hist} == set(range(1, max_steps + 1))
    assert sorted({s for s, _, ts in hist if ts >= crashed_ms}) == list(range(crash_at - every + 1, max_steps + 1))

    # In storage, every checkpoint is complete and loads; step 6 exists once, written by the restarted group.
    stored = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    steps = []
    for path in stored:
        assert {MODEL_FILE, STATE_FILE, META_FILE} <= {p.name for p in path.iterdir()}, path
        steps.append(load_checkpoint(path, fresh_model()).step)
    assert steps == [3, 6, 9]
    final = fresh_model()
    load_checkpoint(stored[-1], final)
    assert all(torch.isfinite(p).all() for p in final.parameters())
