"""Training checkpoints as a directory, written atomically (temp directory, then rename).

Layout: ``model.safetensors`` (the unwrapped model's state dict in the original MultiMAE key layout),
``train_state.pt`` (optimizer, grad scaler, counters, per-rank RNG states; loads with ``torch.load(weights_only=True)``)
and ``meta.json`` (counters, versions and caller-provided JSON). The learning rate is a pure function of the step
(`multimae_core.training.optim.lr_at`), so there is no scheduler state to keep.

Fault-injection hook for tests (inert unless the variable is set; never set it in production):
``MMAE_TEST_FAIL_CHECKPOINT_AT_STEP=<step>`` makes the process that writes the checkpoint of that step kill itself
with SIGKILL halfway through the write (weights and train state written, meta.json not, nothing renamed), as a crash
would. With ``MMAE_TEST_FAIL_CHECKPOINT_MARKER=<file>`` it fires only once: it creates that file (holding the path of
the half-written folder) and stays inert while the file exists, so a restarted run can write the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from multimae_core.training.distributed import unwrap_model

__all__ = [
    "MODEL_FILE",
    "META_FILE",
    "STATE_FILE",
    "TrainState",
    "capture_rng_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "unwrap_model",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
FORMAT_VERSION = 1
FAIL_AT_STEP_ENV = "MMAE_TEST_FAIL_CHECKPOINT_AT_STEP"
FAIL_MARKER_ENV = "MMAE_TEST_FAIL_CHECKPOINT_MARKER"


@dataclass
class TrainState:
    """Counters and RNG states read back from a checkpoint."""

    step: int
    """Optimizer steps done."""
    epoch: int
    """Epoch in progress."""
    batches_in_epoch: int
    """This worker's batches of `epoch` already consumed (the data position to resume at)."""
    rng: list[dict[str, Any]] = field(default_factory=list)
    """RNG states per rank, as `capture_rng_state` returns them."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Caller-provided JSON from meta.json."""
    meta: dict[str, Any] = field(default_factory=dict)
    """The whole meta.json."""

    def rng_for(self, rank: int) -> dict[str, Any] | None:
        """RNG state saved for ``rank``, or None when the checkpoint came from fewer ranks."""
        return self.rng[rank] if rank < len(self.rng) else None


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """This process's torch / CUDA / python / numpy RNG states plus the given generators (weights_only-safe)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Inverse of `capture_rng_state`; generators missing on either side are left alone."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    cuda_states = state.get("cuda")
    if cuda_states is not None and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning("checkpoint has %d CUDA RNG states for %d devices; CUDA RNG not restored",
                           len(cuda_states), torch.cuda.device_count())
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name in saved:
            g.set_state(saved[name])


def _as_tuple(value: Any) -> Any:
    """random.setstate needs tuples; a round trip may hand back lists."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuple(v) for v in value)
    return value


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # directories cannot be opened on some platforms
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crash_if_requested(step: int, partial: Path) -> None:
    """Test hook (see the module docstring): SIGKILL this process mid-write when ``MMAE_TEST_FAIL_CHECKPOINT_AT_STEP``
    names ``step``; a no-op when the variable is unset."""
    at = os.environ.get(FAIL_AT_STEP_ENV)
    if not at or int(at) != step:
        return
    marker = os.environ.get(FAIL_MARKER_ENV)
    if marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(partial).encode())
        os.fsync(fd)
        os.close(fd)
    logger.warning("%s=%s: killing this process while it writes the checkpoint of step %d", FAIL_AT_STEP_ENV, at,
                   step)
    os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(directory: str | os.PathLike[str], *, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scaler: torch.amp.GradScaler | None = None,
                    step: int, epoch: int = 0, batches_in_epoch: int = 0,
                    rng: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
                    extra: Mapping[str, Any] | None = None) -> str:
    """Write a checkpoint directory atomically and return its path.

    Everything goes to ``<directory>.tmp-<uuid>`` first and is renamed to ``directory`` once complete, so a crash
    leaves either no ``directory`` or a complete one. An existing ``directory`` is replaced.

    Args:
        rng: One state from `capture_rng_state` or one per rank; None captures this process's state.
        extra: JSON-serialisable data stored in meta.json (for example the resolved config).
    """
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{final.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in unwrap_model(model).state_dict().items()}
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        if rng is None:
            rng_list = [capture_rng_state()]
        elif isinstance(rng, Mapping):
            rng_list = [dict(rng)]
        else:
            rng_list = [dict(r) for r in rng]
        state = {
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            "step": int(step),
            "epoch": int(epoch),
            "batches_in_epoch": int(batches_in_epoch),
            "rng": rng_list,
        }
        torch.save(state, tmp / STATE_FILE)
        _crash_if_requested(int(step), tmp)
        meta = {
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "epoch": int(epoch),
            "batches_in_epoch": int(batches_in_epoch),
            "created_unix": time.time(),
            "torch_version": torch.__version__,
            "files": [MODEL_FILE, STATE_FILE],
            "extra": dict(extra or {}),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        for name in (MODEL_FILE, STATE_FILE, META_FILE):
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        old = None
        if final.exists():
            old = final.parent / f"{final.name}.old-{uuid.uuid4().hex}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint at step %d written to %s", step, final)
    return str(final)


def load_checkpoint(directory: str | os.PathLike[str], model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scaler: torch.amp.GradScaler | None = None,
                    *, strict: bool = True) -> TrainState:
    """Load weights (strict by default), optimizer and scaler state in place and return the counters.

    RNG states are returned, not applied; see `restore_rng_state`.
    """
    path = Path(directory)
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path}: format_version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    if model is not None:
        weights = load_file(str(path / MODEL_FILE), device="cpu")
        unwrap_model(model).load_state_dict(weights, strict=strict)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    if optimizer is not None:
        if state["optimizer"] is None:
            raise ValueError(f"checkpoint {path} has no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and scaler.is_enabled() and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    return TrainState(step=state["step"], epoch=state["epoch"], batches_in_epoch=state["batches_in_epoch"],
                      rng=list(state["rng"]), extra=dict(meta.get("extra", {})), meta=meta)


def list_checkpoints(root: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """Complete checkpoint directories directly under a local ``root`` as ``(step, path)``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if ".tmp-" in child.name or ".old-" in child.name or not (child / META_FILE).is_file():
            continue
        try:
            meta = json.loads((child / META_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            logger.warning("ignoring checkpoint %s: unreadable %s", child, META_FILE)
            continue
        found.append((int(meta["step"]), child.stat().st_mtime, str(child)))
    return [(step, p) for step, _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike[str]) -> str | None:
    """Path of the complete checkpoint with the highest step under a local ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None
