"""`bench/train_step.py --mode ray` end to end on a tiny job: synthetic shards, the bare step, and the whole local
loop (`run_local`: Ray Train worker on the session's `ray start` cluster, shard loader, checkpoints, MLflow SQLite
store in the temp dir), with the loop's metrics read back from the MLflow run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import train_step  # noqa: E402

TINY = [
    "model.image_size=32", "model.patch_size=8", "model.embed_dim=64", "model.depth=2", "model.num_heads=2",
    "model.decoder_embed_dim=32", "model.decoder_num_heads=2", "model.semseg_dim_class_emb=16",
    "masking.num_encoded_tokens=12", "data.num_workers=1", "data.shuffle_buffer=8",
    "train.max_steps=12", "train.global_batch_size=16", "train.per_worker_batch_size=8", "train.log_every_steps=2",
    "train.image_every_steps=6", "checkpoint.every_steps=6", "tracking.log_system_metrics=false",
]


def _args(tmp_path: Path, **over) -> argparse.Namespace:
    args = dict(job=REPO / "jobs" / "pretrain_tiny.yaml", set=list(TINY), train_samples=64, val_samples=16,
                bare_steps=4, bare_warmup=1, skip_steps=4, with_fit=False, tracking_uri=None, workdir=str(tmp_path),
                keep_workdir=False)
    args.update(over)
    return argparse.Namespace(**args)


def test_ray_mode_measures_loop_against_bare_step(ray_local, tmp_path, monkeypatch):
    monkeypatch.delenv("MMAE_RUN_KEY", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd = Path.cwd()
    r = train_step.run_ray(_args(tmp_path))

    assert Path.cwd() == cwd
    assert list(tmp_path.iterdir()) == []  # the temp folder (data, checkpoints, MLflow store) is gone
    # The job as overridden, and the bare arm doing the same global batch in micro-batches of the per-worker size.
    assert (r["image_size"], r["embed_dim"], r["depth"]) == (32, 64, 2)
    assert (r["global_batch_size"], r["per_worker_batch_size"], r["bare_micro_batches"]) == (16, 8, 2)
    assert len(r["bare_step_s_before"]) == 2 and len(r["bare_step_s_after"]) == 2
    assert r["bare_images_per_s"] > 0 and r["loop_images_per_s"] > 0
    assert r["bare_images_per_s"] == pytest.approx(16 / r["bare_step_s_median"], rel=5e-3)
    # Loop metrics come from the MLflow run: windows of 2 steps end at 2, 4, ..., 12; steady state = after step 4.
    assert r["loop_window_end_steps"] == [6, 8, 10, 12]
    assert r["loop_windows"] == 4 and len(r["loop_images_per_s_all_windows"]) == 4
    median = sorted(r["loop_images_per_s_all_windows"])
    assert r["loop_images_per_s"] == pytest.approx((median[1] + median[2]) / 2, rel=1e-3)
    assert r["ratio"] == pytest.approx(r["loop_images_per_s"] / r["bare_images_per_s"], rel=2e-3)
    assert r["goal_ratio_met"] == (r["ratio"] >= 0.9)
    assert 0 <= r["data_wait_share"] < 1 and 0 <= r["data_wait_share_mean"] < 1
    # The loop's own step time agrees with its images/s (global batch / step time, per window).
    assert r["loop_step_s_median"] == pytest.approx(16 / r["loop_images_per_s"], rel=0.1)
    assert r["run_id"] and r["launch_wall_s"] > 0
    text = train_step.ray_table(r)
    assert "ratio loop/bare" in text and f"{r['ratio']:.3f}" in text


def test_steady_state_skips_warmup_windows_and_weights_the_mean_by_window_length():
    history = {
        "images_per_s": {10: 10.0, 20: 100.0, 30: 200.0, 35: 50.0},
        "step_time_s": {10: 3.2, 20: 0.32, 30: 0.16, 35: 0.64},
        "data_wait_s": {10: 0.32, 20: 0.016, 30: 0.016, 35: 0.0},
    }
    s = train_step.steady_state(history, skip_steps=10)
    assert s["window_end_steps"] == [20, 30, 35]
    assert s["images_per_s"] == 100.0
    assert s["step_s_median"] == 0.32
    assert s["data_wait_share"] == pytest.approx(0.05)  # median of 0.05, 0.1, 0.0
    # 10 steps at 0.32 s, 10 at 0.16 s, 5 at 0.64 s
    assert s["step_s_mean"] == pytest.approx((10 * 0.32 + 10 * 0.16 + 5 * 0.64) / 25)
    assert s["data_wait_share_mean"] == pytest.approx((10 * 0.016 + 10 * 0.016) / (3.2 + 1.6 + 3.2))
    with pytest.raises(SystemExit):
        train_step.steady_state(history, skip_steps=35)


def test_local_cpu_workers_get_the_machines_cores_as_threads(monkeypatch):
    """The fix the Ray mode measured: local CPU workers run cores // workers threads, not Ray's 1 per reserved CPU."""
    import os

    from orchestrator.runtime.entry import Scaling
    from orchestrator.runtime.local import worker_threads_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    one = Scaling(min_workers=1, max_workers=1, use_gpu=False, cpus_per_worker=1.0)
    two = Scaling(min_workers=2, max_workers=2, use_gpu=False, cpus_per_worker=1.0)
    assert worker_threads_env(one, cpus=64) == {"OMP_NUM_THREADS": str(cores)}
    assert worker_threads_env(one, cpus=1) == {"OMP_NUM_THREADS": "1"}  # a cluster that has fewer CPUs than cores
    assert worker_threads_env(two, cpus=64) == {"OMP_NUM_THREADS": str(max(1, cores // 2))}
    assert worker_threads_env(Scaling(1, 1, use_gpu=True), cpus=64) == {}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert worker_threads_env(one, cpus=64) == {}
