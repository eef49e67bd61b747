"""The two seams between `fit()` and the outside world: `Reporter` (metrics, images, checkpoints, stop requests) and
`DataSource` (batches); plus in-process reporters for plain runs and tests (house style 4.4, items 19-20).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "MASK_KEY_PREFIX",
    "DataSource",
    "LogReporter",
    "MemoryDataSource",
    "MemoryReporter",
    "NullReporter",
    "Reporter",
]

logger = logging.getLogger(__name__)

MASK_KEY_PREFIX = "mask."
"""Batch key prefix of precomputed token masks: ``batch["mask.rgb"]`` is int64 ``[B, N]``, 1 = masked."""


@runtime_checkable
class Reporter(Protocol):
    """What `fit()` tells the launcher. Every rank holds one and calls every method the same number of times."""

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record metrics at an optimizer step (values already averaged over ranks)."""

    def log_image(self, step: int, key: str, image_HW3_uint8: np.ndarray) -> None:
        """Record a figure. Called on rank 0 only (it is not a barrier)."""

    def save_checkpoint(self, step: int, write: Callable[[str], None]) -> None:
        """Persist a checkpoint: call ``write(dir)`` with a path that does not exist yet, then keep what it made.

        Called on every rank, the same number of times (Ray's report is a barrier). ``write`` creates the directory
        (atomically: temp dir + rename) on rank 0 and does nothing on other ranks, so a path that is missing after
        ``write`` returns means there is nothing to persist from this rank.
        """

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        """Context manager giving a local directory to resume from (the newest persisted checkpoint) or None."""

    def should_stop(self) -> bool:
        """Whether the launcher asks the run to stop early; `fit()` agrees on the answer across ranks."""


@runtime_checkable
class DataSource(Protocol):
    """Batches for one worker (rank). The data pipeline, not the loop, prepares tensors completely.

    Contract of a batch (``dict[str, Tensor]`` on CPU or on the training device):
      * exactly ``train.per_worker_batch_size`` samples per batch for the train split (drop the last partial batch);
      * image / dense_regression modalities float ``[B, C, H/s, W/s]``: rgb ImageNet-normalised and **depth already
        standardised per sample** (`multimae_core.losses.standardize_depth`); the loop does not standardise;
      * dense_classes modalities int64 ``[B, H/s, W/s]``;
      * optionally precomputed token masks under ``mask.<modality>`` (int64 ``[B, N]``, 1 = masked) for every input
        modality, used instead of the masks the loop draws.
    Each rank sees its own shard, the same number of train batches on every rank. The loop seeds the masks of rank
    ``r``'s ``i``-th micro-batch of a step (accumulation ``a``) by its global index ``r*a + i``; a source that also
    puts the same samples there (as `MemoryDataSource` does) makes a run bit-comparable across worker counts at a
    fixed per-worker batch size; any other sharding is statistically equivalent.
    """

    def epoch_batches(self, epoch: int, *, split: str = "train", skip: int = 0,
                      skip_world_size: int | None = None) -> Iterator[dict[str, Tensor]]:
        """Iterate over one epoch of ``split`` in a fixed order per (epoch, seed), skipping the first ``skip`` batches.

        ``skip`` counts the batches per worker already consumed in the epoch (resume) while ``skip_world_size``
        workers ran (None: the current world size; the loop passes it only when it differs). With another world size
        a source goes on with what the old workers left, split evenly over the current ones. An iterator may be
        abandoned before its end (the loop takes one batch for its figures).
        """
        ...

    def num_batches(self, split: str = "train") -> int | None:
        """This worker's batches per epoch of ``split``; None when unknown; 0 when the split does not exist."""
        ...


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class NullReporter:
    """Drops everything; never resumes, never stops."""

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        """Ignore metrics."""

    def log_image(self, step: int, key: str, image_HW3_uint8: np.ndarray) -> None:
        """Ignore images."""

    def save_checkpoint(self, step: int, write: Callable[[str], None]) -> None:
        """Write nothing."""

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        """No checkpoint to resume from."""
        return contextlib.nullcontext(None)

    def should_stop(self) -> bool:
        """Never stop early."""
        return False


class _LocalCheckpoints:
    """Checkpoints kept as ``<root>/checkpoint_<step>`` folders, the newest ``keep`` of them."""

    def __init__(self, root: str | os.PathLike[str] | None, *, keep: int | None = None) -> None:
        self.root = Path(root) if root is not None else None
        self.keep = keep
        self.checkpoints: list[tuple[int, str]] = []

    def save_checkpoint(self, step: int, write: Callable[[str], None]) -> None:
        """Let ``write`` fill ``<root>/checkpoint_<step>`` and prune old ones beyond ``keep``."""
        if self.root is None or _rank() != 0:
            return  # the folder is shared by the ranks of one machine; rank 0 alone writes and prunes
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"checkpoint_{step:09d}"
        write(str(path))  # replaces an older copy of the same step atomically
        if not path.is_dir():
            return
        self.checkpoints.append((step, str(path)))
        if self.keep is not None:
            from multimae_core.training.checkpoint import list_checkpoints

            for _, old in list_checkpoints(self.root)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            self.checkpoints = [(s, p) for s, p in self.checkpoints if Path(p).is_dir()]

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        """The newest complete checkpoint folder under the root (also ones left by an earlier process)."""
        if self.root is None:
            return contextlib.nullcontext(None)
        from multimae_core.training.checkpoint import latest_checkpoint

        return contextlib.nullcontext(latest_checkpoint(self.root))


class MemoryReporter(_LocalCheckpoints):
    """Keeps metrics and images in lists and checkpoints in a local folder; used by tests.

    Args:
        root: Checkpoint folder; None keeps no checkpoints.
        stop_after_step: `should_stop` turns True once a step at or past this one was reported or checkpointed.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, *, keep: int | None = None,
                 stop_after_step: int | None = None) -> None:
        super().__init__(root, keep=keep)
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.images: list[tuple[int, str, np.ndarray]] = []
        self.stop_after_step = stop_after_step
        self._last_step = -1

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        """Append ``(step, metrics)``."""
        self._last_step = max(self._last_step, step)
        self.metrics.append((step, dict(metrics)))

    def log_image(self, step: int, key: str, image_HW3_uint8: np.ndarray) -> None:
        """Append ``(step, key, image)``."""
        self.images.append((step, key, np.asarray(image_HW3_uint8).copy()))

    def save_checkpoint(self, step: int, write: Callable[[str], None]) -> None:
        """Write under the root (see `_LocalCheckpoints`)."""
        self._last_step = max(self._last_step, step)
        super().save_checkpoint(step, write)

    def should_stop(self) -> bool:
        """True once ``stop_after_step`` was reached."""
        return self.stop_after_step is not None and self._last_step >= self.stop_after_step

    def series(self, key: str) -> list[tuple[int, float]]:
        """All ``(step, value)`` pairs reported for one metric."""
        return [(step, m[key]) for step, m in self.metrics if key in m]


class LogReporter(_LocalCheckpoints):
    """Logs metrics through `logging`; keeps checkpoints (and optionally PNG figures) in local folders.

    For plain ``python`` / ``torchrun`` runs without a tracking server.
    """

    def __init__(self, checkpoint_root: str | os.PathLike[str] | None = None, *, keep: int | None = None,
                 image_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__(checkpoint_root, keep=keep)
        self.image_dir = Path(image_dir) if image_dir is not None else None
        if checkpoint_root is None:
            logger.warning("LogReporter without a checkpoint root: checkpoints are not written")

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        """Log one line of ``key=value`` pairs."""
        logger.info("step %d %s", step, " ".join(f"{k}={v:.5g}" for k, v in sorted(metrics.items())))

    def log_image(self, step: int, key: str, image_HW3_uint8: np.ndarray) -> None:
        """Save as ``<image_dir>/<key>_<step>.png`` when an image folder is set, else log the shape."""
        if self.image_dir is None:
            logger.info("step %d image %s %s", step, key, tuple(image_HW3_uint8.shape))
            return
        from PIL import Image

        self.image_dir.mkdir(parents=True, exist_ok=True)
        path = self.image_dir / f"{key.replace('/', '_')}_{step:09d}.png"
        Image.fromarray(np.asarray(image_HW3_uint8, dtype=np.uint8)).save(path)

    def should_stop(self) -> bool:
        """Never stop early."""
        return False


class MemoryDataSource:
    """DataSource over fixed global batches held in memory (tests, benchmarks); the same order every epoch.

    Each global batch is cut into micro-batches of ``per_worker_batch_size``; rank ``r`` of ``world_size`` takes the
    ``r``-th contiguous run of them (the order the loop's mask seeds assume, see `DataSource`). Validation batches
    are dealt round-robin over ranks.
    """

    def __init__(self, global_batches: Sequence[Mapping[str, Tensor]], *, per_worker_batch_size: int, rank: int = 0,
                 world_size: int = 1, val_batches: Sequence[Mapping[str, Tensor]] = ()) -> None:
        if not global_batches:
            raise ValueError("MemoryDataSource needs at least one batch")
        size = next(iter(global_batches[0].values())).shape[0]
        if size % (per_worker_batch_size * world_size):
            raise ValueError(f"global batch of {size} does not split into {world_size} x {per_worker_batch_size}")
        self._micro_per_rank = size // (per_worker_batch_size * world_size)
        self._train = list(global_batches)
        self._val = list(val_batches)[rank::world_size]
        self.per_worker_batch_size, self.rank, self.world_size = per_worker_batch_size, rank, world_size

    def _train_batches(self) -> Iterator[dict[str, Tensor]]:
        pw = self.per_worker_batch_size
        for batch in self._train:
            for i in range(self._micro_per_rank):
                start = (self.rank * self._micro_per_rank + i) * pw
                yield {k: v[start : start + pw] for k, v in batch.items()}

    def epoch_batches(self, epoch: int, *, split: str = "train", skip: int = 0,
                      skip_world_size: int | None = None) -> Iterator[dict[str, Tensor]]:
        """The stored batches of ``split``, after skipping ``skip`` of them (``skip`` per rank of
        ``skip_world_size`` ranks: the same samples in this world's micro-batches, exact at whole global batches)."""
        if skip_world_size is not None and split == "train":
            skip = skip * skip_world_size // self.world_size
        if split == "train":
            source: Iterator[dict[str, Tensor]] = self._train_batches()
        elif split == "val":
            source = (dict(b) for b in self._val)
        else:
            raise ValueError(f"MemoryDataSource has no split {split!r}")
        for i, batch in enumerate(source):
            if i >= skip:
                yield batch

    def num_batches(self, split: str = "train") -> int:
        """Batches per epoch for this rank (0 for a missing split)."""
        if split == "train":
            return len(self._train) * self._micro_per_rank
        return len(self._val) if split == "val" else 0
