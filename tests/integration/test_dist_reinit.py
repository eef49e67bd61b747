"""Several `fit` calls in the same torchrun processes must not deadlock. `fit` used to destroy the process group it
had made at the end of each call, and the next call made a new one on the same MASTER_PORT: a rank that
re-initialised first could reach the previous group's TCP store, still served by a slower rank 0 (it writes the
checkpoint last), read its stale rendezvous keys and then fail or wait forever for a peer (a 2-process fine-tuning
test hung in CI, about 1 run in 3 here). Now the group made by `init_distributed` lives until the process exits.
With the old code this test fails on an early round ("Connection reset by peer" or a deadlock)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
import torch
from _spawn import run_workers
from conftest import free_port

from multimae_core.config import TrainConfig
from multimae_core.training.loop import fit
from multimae_core.training.reporting import MemoryDataSource, MemoryReporter

pytestmark = pytest.mark.integration

ROUNDS = 6
SIZE = 16


class _SlowRankZero(MemoryReporter):
    """Rank 0 takes longer over each checkpoint, as when it writes a real one."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def save_checkpoint(self, step: int, write: Callable[[str], None]) -> None:
        if self.rank == 0:
            time.sleep(0.2)
        super().save_checkpoint(step, write)


def _cfg() -> TrainConfig:
    return TrainConfig.model_validate({
        "name": "reinit",
        "model": {"preset": "tiny", "image_size": SIZE, "patch_size": 8, "embed_dim": 16, "depth": 1,
                  "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2},
        "modalities": {"inputs": ["rgb", "depth"], "outputs": ["rgb", "depth"]},
        "masking": {"num_encoded_tokens": 4},
        "train": {"max_steps": 1, "epochs": 1, "global_batch_size": 4, "per_worker_batch_size": 2,
                  "log_every_steps": 1, "image_every_steps": 1000},
    })


def _worker(rank: int, world_size: int, port: int) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    batches = [{"rgb": torch.randn(4, 3, SIZE, SIZE, generator=g), "depth": torch.randn(4, 1, SIZE, SIZE, generator=g)}]
    for i in range(ROUNDS):
        data = MemoryDataSource(batches, per_worker_batch_size=2, rank=rank, world_size=world_size)
        result = fit(_cfg(), _SlowRankZero(rank), data, device="cpu")
        assert result.step == 1, (i, result.step)


def test_repeated_fit_calls_in_the_same_processes_do_not_deadlock() -> None:
    run_workers(_worker, (2, free_port()), nprocs=2, timeout_s=60)
