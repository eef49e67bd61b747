"""Start gloo worker processes for a test and wait for them with a deadline.

`torch.multiprocessing.spawn(join=True)` waits forever, and its processes are not daemons, so a deadlocked worker
also blocks pytest's exit (multiprocessing joins non-daemon children at exit): one hang would stall CI until its
overall limit. Here the workers are daemons, killed when the deadline passes, and the test fails with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def run_workers(fn: Callable[..., None], args: tuple[Any, ...], nprocs: int, *, timeout_s: float = 180.0) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes; raise if one fails or they outlast ``timeout_s``."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, daemon=True, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):  # raises ProcessRaisedException / ProcessExitedException on a failure
        if time.monotonic() > deadline:
            alive = [rank for rank, p in enumerate(ctx.processes) if p.is_alive()]
            for p in ctx.processes:
                p.kill()
            for p in ctx.processes:
                p.join(10)
            raise AssertionError(f"workers {alive} of {nprocs} still running after {timeout_s:.0f} s (deadlock?)")
