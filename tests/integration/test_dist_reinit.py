"""Several `fit` / `evaluate_only` calls in the same torchrun processes must not deadlock. They used to destroy the
group at the end of each call and create a new one on the same MASTER_PORT: a rank that re-initialised first could
reach the previous group's TCP store, still served by a slower rank 0, read its stale rendezvous keys and then fail
or wait forever for a peer (a 2-process fine-tuning test hung in CI, about 1 run in 3 here). Now the group made by
`init_distributed` lives until the process exits; this test failed on the first or second round before."""

from __future__ import annotations

import os
import time

import pytest
import torch
from _spawn import free_port, run_workers

from multimae_core.training import distributed as dist_utils

pytestmark = pytest.mark.integration

ROUNDS = 10


def _worker(rank: int, world_size: int, port: int) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    for i in range(ROUNDS):
        info = dist_utils.init_distributed("cpu", timeout_s=60)  # what each fit / evaluate_only call does first
        assert (info.world_size, info.rank, info.owns_group) == (world_size, rank, True)
        total = dist_utils.all_reduce_sum(torch.tensor([float(rank + i)]))
        assert total.item() == sum(r + i for r in range(world_size)), (i, total)
        if rank == 0:
            time.sleep(0.2)  # rank 0 ends a call later (it writes the checkpoint), as at the end of `fit`


def test_repeated_calls_in_one_process_group_do_not_deadlock() -> None:
    run_workers(_worker, (2, free_port()), nprocs=2, timeout_s=120)
