"""Metrics reduced over 2 gloo processes, each with a different (uneven) share of the data, equal the metrics of
one process over all the data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _spawn import run_workers
from conftest import free_port

from multimae_core.metrics import ConfusionMatrix, DepthMetrics, TopKAccuracy

# Rank 0 sees samples [0, 3), rank 1 sees [3, 8): sums, not per-rank means, give the set-level values.
SPLITS = [(0, 3), (3, 8)]


def _data() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    labels_seg = torch.randint(0, 5, (8, 6, 6), generator=gen)
    labels_seg[torch.rand(8, 6, 6, generator=gen) < 0.2] = 255
    depth_target = torch.rand(8, 1, 6, 6, generator=gen) + 0.5
    return {
        "logits": torch.randn(8, 7, generator=gen),
        "labels": torch.randint(0, 7, (8,), generator=gen),
        "seg_pred": torch.randint(0, 5, (8, 6, 6), generator=gen),
        "seg_labels": labels_seg,
        "depth_pred": depth_target * torch.exp(torch.randn(8, 1, 6, 6, generator=gen) * 0.3),
        "depth_target": depth_target,
        # Rank 1's samples have far fewer valid pixels than rank 0's.
        "depth_valid": torch.rand(8, 1, 6, 6, generator=gen) < torch.tensor([0.9] * 3 + [0.3] * 5).view(8, 1, 1, 1),
    }


def _metrics(lo: int, hi: int) -> tuple[TopKAccuracy, ConfusionMatrix, DepthMetrics]:
    data = _data()
    topk, conf, depth = TopKAccuracy(topk=(1, 3)), ConfusionMatrix(5, ignore_index=255), DepthMetrics()
    topk.update(data["logits"][lo:hi], data["labels"][lo:hi])
    conf.update(data["seg_pred"][lo:hi], data["seg_labels"][lo:hi])
    depth.update(data["depth_pred"][lo:hi], data["depth_target"][lo:hi], data["depth_valid"][lo:hi])
    return topk, conf, depth


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for metric in _metrics(*SPLITS[rank]):
            metric.reduce_()
            results.update(metric.compute())
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_two_process_reduction_equals_single_process(tmp_path: Path) -> None:
    run_workers(_worker, (2, free_port(), str(tmp_path)), nprocs=2)
    single = {}
    for metric in _metrics(0, 8):
        single.update(metric.compute())
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got.keys() == single.keys()
        for key, value in single.items():
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), (rank, key)
    # The test can fail: one rank's share alone gives other numbers.
    part = {}
    for metric in _metrics(*SPLITS[1]):
        part.update(metric.compute())
    assert any(part[k] != pytest.approx(v, rel=1e-6) for k, v in single.items())
