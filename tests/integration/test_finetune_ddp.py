"""Fine-tuning under DDP: 2 gloo processes train like one process with accumulation, and their validation metrics
(reduced sums over an uneven split of the validation batches) equal the single process's over all of them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _spawn import run_workers
from conftest import free_port

from multimae_core.config import TrainConfig
from multimae_core.training.loop import fit
from multimae_core.training.reporting import MemoryDataSource, MemoryReporter
from multimae_core.training.task_objective import FinetuneObjective

pytestmark = pytest.mark.integration

SIZE = 32
KINDS = ("semseg", "depth")


def _cfg(kind: str) -> TrainConfig:
    return TrainConfig.model_validate({
        "name": "ddp", "stage": "finetune",
        "model": {"preset": "tiny", "image_size": SIZE, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        "modalities": {"inputs": ["rgb", "depth"], "outputs": []},
        "finetune": {"kind": kind, "num_classes": 4 if kind == "semseg" else None, "seg_embed_dim": 64,
                     "dpt_layer_dims": [8, 8, 16, 16], "dpt_feature_dim": 8, "depth_mean": 3.0, "depth_max": 20.0},
        # eps 1e-6: see test_torchrun_gloo.py (rounding noise of exactly-zero gradients).
        "optim": {"lr": 1e-3, "warmup_steps": 0, "layer_decay": 0.75, "decay_all_params": False, "eps": 1e-6},
        "train": {"max_steps": 2, "epochs": 100, "global_batch_size": 8, "per_worker_batch_size": 4,
                  "log_every_steps": 1, "image_every_steps": 1000},
    })


def _batch(kind: str, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rgb = F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=(SIZE, SIZE), mode="bilinear")
    out = {"rgb": rgb, "depth": F.interpolate(torch.randn(n, 1, 4, 4, generator=g), size=(SIZE, SIZE))}
    if kind == "semseg":
        labels = torch.randint(0, 4, (n, SIZE, SIZE), generator=g)
        labels[:, :3] = 255
        out["target"] = labels
    else:
        out["target"] = (3.0 + rgb[:, :1]).clamp(min=0.1)
    return out


def _val(kind: str) -> list[dict[str, torch.Tensor]]:
    # 3 validation batches of different sizes: rank 0 gets batches 0 and 2, rank 1 batch 1.
    return [_batch(kind, n, 50 + i) for i, n in enumerate((4, 2, 3))]


def _data(kind: str, rank: int, world_size: int) -> MemoryDataSource:
    return MemoryDataSource([_batch(kind, 8, s) for s in range(2)], per_worker_batch_size=4, rank=rank,
                            world_size=world_size, val_batches=_val(kind))


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)  # two processes share the CPU cores
    results = {}
    for kind in KINDS:
        result = fit(_cfg(kind), MemoryReporter(), _data(kind, rank, world_size), device="cpu")
        results[kind] = {"state": result.model.state_dict(), "val": result.val_metrics}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def test_two_workers_match_one_and_reduce_metrics_over_the_set(tmp_path: Path) -> None:
    run_workers(_worker, (2, free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for kind in KINDS:
        single = fit(_cfg(kind), MemoryReporter(), _data(kind, 0, 1), device="cpu")
        reference = single.model.state_dict()
        for r in ranks:
            for k, v in reference.items():
                torch.testing.assert_close(r[kind]["state"][k], v, atol=1e-5, rtol=1e-4, msg=f"{kind} {k}")
            assert r[kind]["val"].keys() == single.val_metrics.keys()
            for key, value in single.val_metrics.items():
                assert r[kind]["val"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (kind, key)
        # The check can fail: rank 1's share alone gives other metrics.
        part = FinetuneObjective(_cfg(kind)).validate(single.model, iter(_val(kind)[1:2]),
                                                      device=torch.device("cpu"), seed=0)
        assert any(part[k.removeprefix("val/")] != pytest.approx(v, rel=1e-3) for k, v in single.val_metrics.items()
                   if "loss" not in k)
