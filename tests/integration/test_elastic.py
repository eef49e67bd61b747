"""Elastic training through the real Ray Train runtime on a simulated multi-node cluster (`ray.cluster_utils.Cluster`:
a head without CPUs for the driver and the Train controller, plus 1-CPU worker nodes, all processes on this machine).

* 2 workers, and 1 worker with twice the gradient accumulation, reach the same weights after k steps from the same
  seed and data: the property that makes resizing safe.
* A run elastic between 1 and 2 workers loses a node mid-run and goes on with 1 worker, then grows back to 2 when a
  node joins: one MLflow run throughout, the worker count visible in the ``num_workers`` metric, and every optimizer
  step consuming the same global batch (8 samples) whatever the worker count.

The data set is exactly one global batch (8 samples in one shard, shuffle buffer off): every optimizer step is one
epoch, so with 2 workers rank r's batch and with 1 worker micro-batch r hold the same 4 samples (the loop seeds masks
by that global micro-batch index), and a restart after any step resumes at an epoch boundary. With more data per
epoch the plain loader gives each rank a contiguous range of the epoch, a sharding that is only statistically
equivalent across worker counts (see `multimae_core.training.reporting.DataSource`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from _runs import remove_leaked_local_checkpoints, runs_with_key

from orchestrator.spec import validate_job

SNAPSHOT = "checkpoint_manager_snapshot.json"
GLOBAL_BATCH, PER_WORKER = 8, 4

# Ray Train's knobs for a fast shrink (facts doc 2.4): the controller first retries with the stale worker count and
# gives up on it after the group start timeout; health checks every 0.5 s detect the lost worker and pace the
# reports (one per poll). Both are read by the driver when the trainer starts and propagated to the controller.
RAY_TRAIN_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def elastic_job(*, train_url: str, storage_url: str, experiment: str, name: str, max_steps: int, every_steps: int,
                keep: int, min_workers: int, max_workers: int):
    """Tiny MultiMAE (embed 64, depth 2, 32 px); global batch 8 as 4 per worker x workers x accumulation."""
    return validate_job({
        "name": name,
        "model": {"preset": "tiny", "image_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2,
                  "decoder_embed_dim": 64, "decoder_depth": 1, "decoder_num_heads": 2},
        "modalities": {"inputs": ["rgb", "depth"], "outputs": ["rgb", "depth"]},
        "masking": {"num_encoded_tokens": 12},
        "data": {"train_url": train_url, "val_url": None, "shuffle_buffer": 0, "num_workers": 0},
        # eps 1e-6: with 1e-8 Adam turns the rounding noise of exactly-zero gradients into full-size updates of
        # either sign (see test_torchrun_gloo.py), which would make runs with other reduction orders diverge.
        "optim": {"lr": 3e-3, "warmup_steps": 1, "min_lr": 1e-4, "weight_decay": 0.05, "eps": 1e-6},
        "train": {"max_steps": max_steps, "epochs": 10_000, "global_batch_size": GLOBAL_BATCH,
                  "per_worker_batch_size": PER_WORKER, "log_every_steps": 1, "image_every_steps": 10_000, "seed": 0},
        "checkpoint": {"storage_url": storage_url, "every_steps": every_steps, "keep": keep},
        "tracking": {"experiment": experiment, "log_system_metrics": False},
        "resources": {"min_workers": min_workers, "max_workers": max_workers, "max_failures": -1},
    })


def _note(capsys, message: str) -> None:
    with capsys.disabled():
        print(message)


def _wait(condition: Callable[[], object], *, timeout: float, what: str, alive: threading.Thread | None = None,
          interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert alive is None or alive.is_alive(), f"the run ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(interval)


@pytest.fixture(scope="module")
def cluster():
    """A head node with no CPUs (driver, Train controller) and two 1-CPU worker nodes; the test process connected.

    Separate from the session's `ray start` cluster (`ray_local`): its own GCS, its own temp folder, and the test
    connects by its explicit address. Node deaths are noticed within about a second (GCS health checks).
    """
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.runtime.entry import forwarded_env

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        if ray.is_initialized():
            ray.shutdown()
        temp_dir = f"/tmp/mmae-rc-{os.getpid()}"  # unix socket paths must stay short
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "temp_dir": temp_dir, "object_store_memory": 80 * 2**20,
            "_system_config": {"health_check_period_ms": 500, "health_check_timeout_ms": 1000,
                               "health_check_failure_threshold": 2},
        })
        try:
            for _ in range(2):
                c.add_node(num_cpus=1, object_store_memory=80 * 2**20)
            c.wait_for_nodes()
            mp.setenv("RAY_ADDRESS", c.address)
            ray.init(address=c.address, runtime_env={"env_vars": forwarded_env()}, log_to_driver=False)
            yield c
        finally:
            ray.shutdown()
            c.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def one_batch_data(tmp_path_factory) -> str:
    """Exactly one global batch of synthetic scenes (8 samples, one shard)."""
    from multimae_core.data.synth import write_synth

    url = str(tmp_path_factory.mktemp("elastic-data") / "train")
    write_synth(url, GLOBAL_BATCH, size=32, seed=0, samples_per_shard=GLOBAL_BATCH, num_workers=1)
    return url


def _run(job, scaling, tracking_uri):
    from orchestrator.runtime.entry import run_training

    return run_training(job, scaling=scaling, launch="local", tracking_uri=tracking_uri, echo=lambda line: None)


def _load_weights(client, run_id: str, dst: Path):
    from safetensors.torch import load_file

    return load_file(client.download_artifacts(run_id, "weights/final.safetensors", str(dst)))


def test_two_workers_match_one_worker_with_double_accumulation(cluster, one_batch_data, mlflow_uri, tmp_path,
                                                                monkeypatch, capsys):
    import torch
    from mlflow import MlflowClient

    from multimae_core.model.presets import build_model
    from orchestrator.runtime.entry import Scaling

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MMAE_RUN_KEY", raising=False)
    for key, value in RAY_TRAIN_ENV.items():
        monkeypatch.setenv(key, value)
    experiment = f"el-eq-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(mlflow_uri)
    steps = 4
    runs = {}
    for workers in (2, 1):
        job = elastic_job(train_url=one_batch_data, storage_url=str(tmp_path / "ckpt"), experiment=experiment,
                          name=f"el-eq-w{workers}", max_steps=steps, every_steps=2, keep=1, min_workers=workers,
                          max_workers=workers)
        t0 = time.monotonic()
        result = _run(job, Scaling(workers, workers, use_gpu=False), mlflow_uri)
        _note(capsys, f"{workers} worker(s), {steps} steps: {time.monotonic() - t0:.1f} s")
        assert result.final_step == steps
        runs[workers] = result.run_id
        nw = {m.value for m in client.get_metric_history(result.run_id, "num_workers")}
        assert nw == {float(workers)}

    two = _load_weights(client, runs[2], tmp_path / "w2")
    one = _load_weights(client, runs[1], tmp_path / "w1")
    torch.manual_seed(job.train.seed)  # `fit` seeds like this before building the model: its initial weights
    init = build_model(job.model, inputs=job.modalities.inputs, outputs=job.modalities.outputs).state_dict()
    assert sorted(two) == sorted(one) == sorted(init)
    moved = max((two[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-3, "training did not change the weights"
    diff = max((one[k] - two[k]).abs().max().item() for k in two)
    _note(capsys, f"largest weight change {moved:.3g}; largest difference 1 vs 2 workers {diff:.3g}")
    for key, value in two.items():
        torch.testing.assert_close(one[key], value, atol=1e-5, rtol=1e-4, msg=key)

    def losses(run_id):
        return torch.tensor([m.value for m in sorted(client.get_metric_history(run_id, "train/loss/total"),
                                                      key=lambda m: m.step)], dtype=torch.float64)

    assert len(losses(runs[2])) == steps
    torch.testing.assert_close(losses(runs[1]), losses(runs[2]), atol=1e-5, rtol=1e-5)


def _latest(run_dir: Path) -> tuple[int, int, int] | None:
    """(step, world size, this worker's batches consumed in the epoch) of the latest registered checkpoint."""
    try:
        snap = json.loads((run_dir / SNAPSHOT).read_text())
        name = snap["latest_checkpoint_result"]["checkpoint_dir_name"]
        info = json.loads((run_dir / name / "mmae_run.json").read_text())
        meta = json.loads((run_dir / name / "meta.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not written yet, or pruned between the two reads
    return int(meta["step"]), int(info["world_size"]), int(meta["batches_in_epoch"])


@pytest.mark.slow
def test_run_shrinks_to_one_worker_and_grows_back(cluster, one_batch_data, mlflow_uri, tmp_path, monkeypatch,
                                                   capsys):
    from mlflow import MlflowClient

    from orchestrator.runtime.entry import Scaling
    from orchestrator.runtime.tracking import resolve_run_key

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MMAE_RUN_KEY", raising=False)
    for key, value in RAY_TRAIN_ENV.items():
        monkeypatch.setenv(key, value)
    experiment = f"el-resize-{uuid.uuid4().hex[:8]}"
    max_steps = 72
    job = elastic_job(train_url=one_batch_data, storage_url=str(tmp_path / "ckpt"), experiment=experiment,
                      name="el-resize", max_steps=max_steps, every_steps=1, keep=8, min_workers=1, max_workers=2)
    run_key = resolve_run_key(job, env={})
    run_dir = tmp_path / "ckpt" / run_key
    client = MlflowClient(mlflow_uri)
    scaling = Scaling(1, 2, use_gpu=False, resize_interval_s=2.0)

    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = _run(job, scaling, mlflow_uri)
        except BaseException as err:  # noqa: BLE001 - re-raised below
            outcome["error"] = err

    t0, started = time.monotonic(), time.time()
    thread = threading.Thread(target=target, name="mmae-test-elastic", daemon=True)
    thread.start()
    seen: dict[int, tuple[int, int]] = {}  # step -> (world size, batches in epoch) of the checkpoints seen

    def latest_with(world_size: int, after_step: int = 0):
        latest = _latest(run_dir)
        if latest is not None:
            seen[latest[0]] = latest[1:]
        return latest if latest and latest[1] == world_size and latest[0] > after_step else None

    try:
        step2, _, _ = _wait(lambda: latest_with(2, after_step=2), timeout=180, what="3 steps on 2 workers",
                            alive=thread)
        t_remove = time.monotonic()
        victim = next(iter(cluster.worker_nodes))
        cluster.remove_node(victim, allow_graceful=False)
        _note(capsys, f"removed a node after step {step2} at {t_remove - t0:.1f} s")
        step1, _, _ = _wait(lambda: latest_with(1, after_step=step2), timeout=180, what="a step on 1 worker",
                            alive=thread)
        t_add = time.monotonic()
        _note(capsys, f"1 worker from step {step1} after {t_add - t_remove:.1f} s; adding a node")
        cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        step_back, _, _ = _wait(lambda: latest_with(2, after_step=step1), timeout=180,
                                what="2 workers again", alive=thread)
        _note(capsys, f"2 workers again from step {step_back} after {time.monotonic() - t_add:.1f} s")
    finally:
        thread.join(timeout=300)
        remove_leaked_local_checkpoints(run_key, started)
    assert not thread.is_alive(), "the run did not end"
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    _note(capsys, f"elastic run 2 -> 1 -> 2 workers, {max_steps} steps: {time.monotonic() - t0:.1f} s")
    assert step_back < max_steps, "the run must still be training when it grows back"

    # One MLflow run, FINISHED at the configured step count.
    assert result.final_step == max_steps
    (run,) = runs_with_key(client, experiment, run_key)
    assert run.info.run_id == result.run_id and run.info.status == "FINISHED"

    # The worker count as a metric: 2, then 1, then 2 again (in logging order; restarts repeat some steps).
    history = sorted(client.get_metric_history(result.run_id, "num_workers"), key=lambda m: (m.timestamp, m.step))
    phases = [history[0].value]
    for m in history[1:]:
        if m.value != phases[-1]:
            phases.append(m.value)
    assert phases == [2.0, 1.0, 2.0], phases
    final_by_step = {m.step: m.value for m in history}  # the latest value logged for each step
    assert sorted(final_by_step) == list(range(1, max_steps + 1))
    assert final_by_step[max_steps] == 2.0

    # The same global batch on every step: with one global batch per epoch, step s runs in epoch s - 1 whatever
    # the worker count (1 worker with 2 micro-batches of 4, 2 workers with 1 each), and every checkpoint seen
    # records batches x per-worker batch x workers = 8 samples consumed per step.
    epochs = client.get_metric_history(result.run_id, "epoch")
    assert epochs and all(m.value == m.step - 1 for m in epochs), sorted((m.step, m.value) for m in epochs)
    assert {w for w, _ in seen.values()} == {1, 2}
    assert all(batches * PER_WORKER * w == GLOBAL_BATCH for w, batches in seen.values()), seen
    losses = client.get_metric_history(result.run_id, "train/loss/total")
    assert losses and all(math.isfinite(m.value) for m in losses)
