"""Process-group setup that works under plain python, torchrun and Ray Train; DDP wrapping; rank helpers.

An existing process group (Ray Train creates one) is reused; otherwise one is created from the torchrun environment
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); otherwise the run is a single process. A group created here lives
until the process exits, so later `fit` / `evaluate_only` calls in the same processes reuse it: destroying it and
creating another on the same MASTER_PORT races (a rank that re-initialises first can reach the previous group's TCP
store, still served by a slower rank 0, read its stale rendezvous keys, and then fail or wait forever for a peer).

The DDP wrapping is done here rather than by the launcher so that numerics do not depend on it (house style 4.4,
item 20).
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "RankZeroFilter",
    "all_reduce_sum",
    "all_gather_object",
    "all_reduce_max",
    "barrier",
    "collective_device",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "unwrap_model",
    "warn_once",
    "wrap_ddp",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0."""
        return self.rank == 0


def is_initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 without a process group."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of processes, 1 without a process group."""
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (or no process group)."""
    return get_rank() == 0


def _default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


_created_group = False  # this process's default group was made by init_distributed (destroyed at exit)


def _destroy_created_group() -> None:
    if _created_group and is_initialized():
        dist.destroy_process_group()


def init_distributed(device: str | torch.device | None = None, *, timeout_s: float = 1800.0) -> DistInfo:
    """Reuse or create the process group and pick the device.

    Args:
        device: Training device; None takes ``cuda:<local_rank>`` when CUDA is available, else the CPU.
        timeout_s: Collective timeout of a group created here.
    """
    global _created_group
    env = os.environ
    local_rank = int(env.get("LOCAL_RANK", "0"))
    dev = torch.device(device) if device is not None else _default_device(local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not is_initialized() and int(env.get("WORLD_SIZE", "1")) > 1 and "RANK" in env:
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise ValueError("WORLD_SIZE > 1 but MASTER_ADDR / MASTER_PORT are not set; launch with torchrun")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
        if not _created_group:
            atexit.register(_destroy_created_group)
        _created_group = True
        logger.info("initialised %s process group: rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    return DistInfo(rank=get_rank(), world_size=get_world_size(), local_rank=local_rank, device=dev)


def wrap_ddp(model: nn.Module, device: torch.device, *, find_unused_parameters: bool = False) -> nn.Module:
    """Wrap in DistributedDataParallel when more than one process runs; the model is returned as is otherwise.

    Buffers are not broadcast each forward: MultiMAE has no running statistics, and all ranks start from the same
    weights (DDP broadcasts rank 0's parameters and buffers once at construction).
    """
    if get_world_size() <= 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    # forward_sync_buffers replaces the deprecated broadcast_buffers (torch 2.14); it keeps the sync at construction.
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False,
                                               find_unused_parameters=find_unused_parameters)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel ``.module`` wrappers and ``torch.compile``'s ``_orig_mod``."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        else:
            return model


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (no-op in a single process); returns the tensor."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum over ranks in place (no-op in a single process); returns the tensor."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if get_world_size() <= 1:
        return [obj]
    out: list[object] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def collective_device(device: torch.device) -> torch.device:
    """Device for tensors handed to collectives: the training device under NCCL, the CPU otherwise (gloo)."""
    if is_initialized() and dist.get_backend() == "nccl":
        return device
    return torch.device("cpu")


def barrier() -> None:
    """Wait for all ranks (no-op in a single process)."""
    if get_world_size() > 1:
        dist.barrier()


class RankZeroFilter(logging.Filter):
    """Logging filter that lets records through on rank 0 only (or on every rank for WARNING and above)."""

    def __init__(self, *, keep_warnings: bool = True) -> None:
        super().__init__()
        self.keep_warnings = keep_warnings

    def filter(self, record: logging.LogRecord) -> bool:
        """Pass on rank 0; elsewhere pass warnings and errors only if ``keep_warnings``."""
        if get_rank() == 0:
            return True
        return self.keep_warnings and record.levelno >= logging.WARNING


_warned: set[str] = set()


def warn_once(log: logging.Logger, message: str, *args: object) -> None:
    """Log a warning the first time this exact message (before formatting) is seen in the process."""
    if message in _warned:
        return
    _warned.add(message)
    log.warning(message, *args)
