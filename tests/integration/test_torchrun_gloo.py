"""Two gloo processes (as torchrun would start them) train exactly like one process with gradient accumulation.

World size 2 x per-worker 4 and world size 1 x per-worker 4 x accumulation 2, both at global batch 8, must end with
the same weights: the elastic-safety property (a job that restarts with another worker count optimises the same).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _spawn import run_workers
from conftest import free_port

from multimae_core.config import TrainConfig
from multimae_core.training.checkpoint import list_checkpoints, load_checkpoint
from multimae_core.training.loop import fit
from multimae_core.training.reporting import MemoryDataSource, MemoryReporter

pytestmark = pytest.mark.integration

STEPS = 4


SIZE = 32


def make_batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "rgb": F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=(SIZE, SIZE), mode="bilinear"),
        "depth": F.interpolate(torch.randn(n, 1, 4, 4, generator=g), size=(SIZE, SIZE), mode="bilinear"),
        "semseg": torch.randint(0, 4, (n, SIZE // 4, SIZE // 4), generator=g),
    }


def _cfg() -> TrainConfig:
    return TrainConfig.model_validate({
        "name": "gloo",
        "model": {"preset": "tiny", "image_size": SIZE, "embed_dim": 64, "depth": 2, "num_heads": 4,
                  "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 4},
        "modalities": {"inputs": ["rgb", "depth", "semseg"], "outputs": ["rgb", "depth", "semseg", "norm_rgb"]},
        "masking": {"num_encoded_tokens": 6},
        # eps 1e-6: some gradients are exactly zero in exact arithmetic (attention key biases); with eps 1e-8 Adam
        # turns their rounding noise into full-size updates of either sign (see test_loop.py).
        "optim": {"lr": 2e-3, "warmup_steps": 1, "weight_decay": 0.05, "eps": 1e-6},
        "train": {"max_steps": STEPS, "epochs": 100, "global_batch_size": 8, "per_worker_batch_size": 4,
                  "log_every_steps": 1, "image_every_steps": 1000},
        "checkpoint": {"every_steps": 2},
    })


def _data(rank: int, world_size: int) -> MemoryDataSource:
    batches = [make_batch(8, seed=s) for s in range(3)]
    return MemoryDataSource(batches, per_worker_batch_size=4, rank=rank, world_size=world_size,
                            val_batches=[make_batch(4, seed=50), make_batch(4, seed=51)])


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)  # two processes share the CPU cores
    reporter = MemoryReporter(Path(out_dir) / "checkpoints")
    result = fit(_cfg(), reporter, _data(rank, world_size), device="cpu")
    torch.save({"state": result.model.state_dict(), "metrics": reporter.metrics, "step": result.step},
               Path(out_dir) / f"rank{rank}.pt")


def test_two_gloo_workers_match_one_worker_with_accumulation(tmp_path: Path):
    run_workers(_worker, (2, free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all(r["step"] == STEPS for r in ranks)

    single_reporter = MemoryReporter()
    single = fit(_cfg(), single_reporter, _data(0, 1), device="cpu")
    reference = single.model.state_dict()
    for r in ranks:  # DDP keeps the replicas identical, and equal to the accumulating single process
        for k, v in reference.items():
            torch.testing.assert_close(r["state"][k], v, atol=1e-5, rtol=1e-4, msg=k)

    def series(metrics, key):
        return torch.tensor([m[key] for _, m in metrics if key in m])

    for key in ("train/loss/total", "grad_norm", "val/loss/total"):
        torch.testing.assert_close(series(ranks[0]["metrics"], key), series(single_reporter.metrics, key),
                                   atol=1e-5, rtol=1e-5, msg=key)
    assert series(ranks[0]["metrics"], "num_workers").tolist() == [2.0] * STEPS

    # rank 0 wrote the checkpoints (steps 2 and 4) with both ranks' RNG states
    found = list_checkpoints(tmp_path / "checkpoints")
    assert [s for s, _ in found] == [2, 4]
    state = load_checkpoint(found[-1][1])
    assert len(state.rng) == 2 and state.extra["world_size"] == 2
    assert not torch.equal(state.rng[0]["torch"], state.rng[1]["torch"])  # seed + rank streams
