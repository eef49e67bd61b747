"""Plain PyTorch streaming loader over shard folders: `ShardDataSource` implements the training loop's DataSource.

Epoch plan (a pure function of seed, epoch, world size and batch size, so it holds when the world size changes
between epochs or restarts):
  1. The shard order is permuted with (seed, epoch) (train only); the samples of the shards in that order form one
     sequence of N positions.
  2. train: each rank takes a contiguous range of `N // (world_size * B) * B` positions; the tail of fewer than
     world_size * B positions is dropped (it falls on different samples every epoch, as shard order changes). So every
     sample is used at most once per epoch, and exactly once except that tail, and all ranks take the same number
     of full batches (DistributedSampler(drop_last=True), the original's setting).
     val: each rank takes ceil(N / world_size) positions, wrapping around to the first samples to pad the last rank
     (DistributedSampler(drop_last=False)); batches are not shuffled and the last one may be short.
  3. Within a rank, DataLoader worker w takes a contiguous run of the rank's batches (the first `nb % W` workers one
     more), reads only the shards overlapping it, passes the raw records through a seeded shuffle buffer, groups them
     into batches and only then decodes and augments. The DataLoader interleaves workers round-robin, so rank batch i
     comes from worker i % W; `skip` (resume inside an epoch) drops batches before decoding them.
Shards are downloaded in background threads (`prefetch` shards ahead) and checked against the manifest's sha256.
DataLoader workers are persistent: one set of processes per split serves every epoch (the parent passes the epoch
and `skip` through shared memory), so filesystem clients and connections are made once, not per epoch. The batch
stream depends on (seed, epoch, rank, world_size, per_worker_batch_size, num_workers, shuffle_buffer).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from multimae_core.data.shards import (
    Manifest,
    ShardDataError,
    iter_records,
    open_folder,
    prefetch_shards,
    read_manifest,
)
from multimae_core.data.transforms import JointTransform, SampleProcessor, collate_numpy
from multimae_core.modalities import get_modality

__all__ = ["ShardDataSource", "plan_epoch", "worker_batch_ranges"]

logger = logging.getLogger(__name__)

_STATS_KEY = "__mmae_stats__"


def plan_epoch(shard_sizes: Sequence[int], *, epoch: int, seed: int, rank: int, world_size: int, batch_size: int,
               train: bool) -> tuple[list[int], int, int]:
    """(shard order, first position, number of positions) of one rank for one epoch; positions wrap modulo N."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    n = int(sum(shard_sizes))
    order = list(range(len(shard_sizes)))
    if train:
        order = [int(i) for i in np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(shard_sizes))]
        per_rank = n // (world_size * batch_size) * batch_size
    else:
        per_rank = math.ceil(n / world_size)
    return order, rank * per_rank, per_rank


def worker_batch_ranges(num_positions: int, batch_size: int, num_workers: int) -> list[tuple[int, int]]:
    """Per DataLoader worker: (first position, end position) of its contiguous run of the rank's batches."""
    nb = math.ceil(num_positions / batch_size)
    out, b = [], 0
    for w in range(num_workers):
        count = nb // num_workers + (w < nb % num_workers)
        out.append((min(b * batch_size, num_positions), min((b + count) * batch_size, num_positions)))
        b += count
    return out


def _segments(order: Sequence[int], sizes: Sequence[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """(shard, first index, end index) covering positions [start, stop) of the shards concatenated in `order`."""
    n = sum(sizes)
    out: list[tuple[int, int, int]] = []
    if n == 0 or stop <= start:
        return out
    offsets = np.cumsum([0] + [sizes[i] for i in order])
    pos = start
    while pos < stop:
        wrapped = pos % n
        k = int(np.searchsorted(offsets, wrapped, side="right") - 1)
        shard_start = offsets[k]
        lo = wrapped - shard_start
        hi = min(sizes[order[k]], lo + (stop - pos))
        out.append((order[k], int(lo), int(hi)))
        pos += hi - lo
    return out


def _shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(len(buf)))
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


class _EpochStream(IterableDataset):
    """Epochs of one rank and split; each DataLoader worker yields its share as ready batches, then a stats record.

    With persistent DataLoader workers the (epoch, skip) of the next iteration is read from `control`, an array in
    shared memory that the parent sets before it starts iterating; without workers they are plain attributes.
    """

    def __init__(self, src: ShardDataSource, split: str, *, epoch: int = 0, skip: int = 0, control=None):
        self.url = src.urls[split]
        self.storage_options = src.storage_options
        self.manifest = src.manifest(split)
        self.train = split == "train"
        self.epoch, self.skip, self.control = epoch, skip, control
        self.rank, self.world_size = src.rank, src.world_size
        self.batch_size, self.seed = src.per_worker_batch_size, src.seed
        self.shuffle_buffer, self.prefetch, self.verify = src.shuffle_buffer, src.prefetch, src.verify
        self.processor = SampleProcessor(
            self.manifest, src.modalities, src.make_transform(train=self.train),
            with_cls=src.with_cls(split), seed=src.seed, skip_bad=src.skip_bad,
        )

    def _records(self, segments: list[tuple[int, int, int]]) -> Iterator[tuple[int, str, str, dict[str, bytes]]]:
        fs, root = open_folder(self.url, self.storage_options)
        shards = self.manifest.shards
        first_ids = np.cumsum([0] + [s.num_samples for s in shards])
        infos = [shards[i] for i, _, _ in segments]
        fetched = prefetch_shards(fs, root, infos, verify=self.verify, depth=self.prefetch)
        for (shard, lo, hi), (info, data) in zip(segments, fetched, strict=True):
            pos = -1
            for pos, (key, files) in enumerate(iter_records(data, info.name)):
                if pos >= hi:
                    break
                if pos >= lo:
                    yield int(first_ids[shard]) + pos, info.name, key, files
            else:
                if pos + 1 != info.num_samples:
                    raise ShardDataError(info.name, None, f"holds {pos + 1} samples, the manifest says "
                                         f"{info.num_samples}")

    def __iter__(self):
        if self.control is not None:
            self.epoch, self.skip = int(self.control[0]), int(self.control[1])
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Rank batch i comes from logical worker i % W at its local index i // W (the DataLoader cycles workers
        # round-robin from worker 0). Resuming after `skip` batches, physical worker p plays logical worker
        # (skip + p) % W and skips its first (skip + p) // W batches, so the stream continues at batch `skip`.
        worker = (self.skip + physical) % num_workers
        my_skip = (self.skip + physical) // num_workers
        sizes = [s.num_samples for s in self.manifest.shards]
        order, start, count = plan_epoch(sizes, epoch=self.epoch, seed=self.seed, rank=self.rank,
                                         world_size=self.world_size, batch_size=self.batch_size, train=self.train)
        lo, hi = worker_batch_ranges(count, self.batch_size, num_workers)[worker]
        records = self._records(_segments(order, sizes, start + lo, start + hi))
        if self.train and self.shuffle_buffer > 1:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, self.world_size, worker])
            records = _shuffle(records, self.shuffle_buffer, rng)
        batch: list = []
        index = 0
        for record in records:
            batch.append(record)
            if len(batch) == self.batch_size:
                if index >= my_skip:
                    out = self._decode(batch)
                    if out is not None:
                        yield out
                batch, index = [], index + 1
        if batch and index >= my_skip:
            out = self._decode(batch)
            if out is not None:
                yield out
        yield {_STATS_KEY: torch.tensor([worker, self.processor.skipped.count])}

    def _decode(self, records: list) -> dict[str, torch.Tensor] | None:
        samples = []
        for sample_id, shard, key, files in records:
            sample = self.processor(key, files, shard=shard, sample_id=sample_id, epoch=self.epoch)
            if sample is not None:
                samples.append(sample)
        if not samples:
            logger.warning("a whole batch of %d samples was bad and is skipped; ranks may fall out of step",
                           len(records))
            return None
        if self.train and len(samples) < len(records):
            # Train batches keep their size (the loop's contract): bad samples are replaced by copies of good ones.
            samples += [samples[i % len(samples)] for i in range(len(records) - len(samples))]
        return {k: torch.from_numpy(v) for k, v in collate_numpy(samples).items()}


class ShardDataSource:
    """DataSource over shard folders for the plain PyTorch path (single process, torchrun or Ray Train workers).

    Args:
        url: shard folder of the train split, or {split: url} (e.g. {"train": ..., "val": ...}).
        modalities: modalities to load (default: every stored one); `cls` is added when the shards carry it.
        image_size: output side of full-resolution modalities.
        per_worker_batch_size: samples per batch on this rank.
        num_workers: DataLoader worker processes (0 decodes in the calling process).
        shuffle_buffer: raw records held for shuffling per DataLoader worker (0/1: shard order shuffle only).
        skip_bad: skip samples that fail to decode (counted in `skipped`, warned per epoch) instead of raising; in
            train batches a skipped sample is replaced by a copy of another one, so batches keep their size.
    """

    def __init__(self, url: str | Mapping[str, str], *, per_worker_batch_size: int, image_size: int = 224,
                 modalities: Sequence[str] | None = None, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 0, shuffle_buffer: int = 256, crop_scale: tuple[float, float] = (0.2, 1.0),
                 hflip: float = 0.5, skip_bad: bool = False, verify: bool = True, prefetch: int = 2,
                 pin_memory: bool = False, storage_options: Mapping[str, Any] | None = None):
        self.urls = {"train": url} if isinstance(url, str) else {k: v for k, v in url.items() if v}
        if per_worker_batch_size < 1:
            raise ValueError("train.per_worker_batch_size must be >= 1")
        self.per_worker_batch_size, self.image_size = per_worker_batch_size, image_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.crop_scale, self.hflip, self.skip_bad = tuple(crop_scale), hflip, skip_bad
        self.verify, self.prefetch, self.pin_memory = verify, prefetch, pin_memory
        self.storage_options = dict(storage_options or {})
        self._manifests: dict[str, Manifest] = {}
        self._loaders: dict[str, tuple[DataLoader, Any]] = {}
        self._worker_skips: dict[str, dict[int, int]] = {}
        self.skipped = 0
        """Bad samples skipped so far (skip_bad)."""
        first = self.manifest(next(iter(self.urls)))
        self.modalities = tuple(modalities) if modalities is not None else first.modalities
        for m in self.modalities:
            get_modality(m)
        for split in self.urls:
            man = self.manifest(split)
            missing = [m for m in self.modalities if m not in man.modalities]
            if missing:
                raise ValueError(f"data.{split}_url ({self.urls[split]}): shards hold modalities "
                                 f"{list(man.modalities)}, the job needs {missing}")

    @classmethod
    def from_config(cls, cfg, *, rank: int = 0, world_size: int = 1, **kwargs: Any) -> ShardDataSource:
        """From a TrainConfig: data.* urls and augmentation, model.image_size, train batch size and seed."""
        names = list(dict.fromkeys([*cfg.modalities.inputs,
                                    *(get_modality(o).target_name for o in cfg.modalities.outputs)]))
        opts: dict[str, Any] = dict(
            per_worker_batch_size=cfg.train.per_worker_batch_size, image_size=cfg.model.image_size,
            modalities=names, rank=rank, world_size=world_size, seed=cfg.train.seed, num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer, crop_scale=cfg.data.crop_scale, hflip=cfg.data.hflip,
        )
        opts.update(kwargs)
        return cls({"train": cfg.data.train_url, "val": cfg.data.val_url}, **opts)

    def make_transform(self, *, train: bool) -> JointTransform:
        """The joint augmentation of a split (subclasses add targets, e.g. `multimae_core.data.tasks`)."""
        return JointTransform(self.image_size, train=train, scale=self.crop_scale, hflip=self.hflip)

    def manifest(self, split: str = "train") -> Manifest:
        if split not in self.urls:
            raise ValueError(f"no shard folder for split {split!r} (have {sorted(self.urls)})")
        if split not in self._manifests:
            self._manifests[split] = read_manifest(self.urls[split], storage_options=self.storage_options)
        return self._manifests[split]

    def with_cls(self, split: str = "train") -> bool:
        return self.manifest(split).has_cls

    def num_samples(self, split: str = "train") -> int:
        """Samples this rank sees per epoch (0 for a split without a shard folder)."""
        if split not in self.urls:
            return 0
        sizes = [s.num_samples for s in self.manifest(split).shards]
        return plan_epoch(sizes, epoch=0, seed=self.seed, rank=self.rank, world_size=self.world_size,
                          batch_size=self.per_worker_batch_size, train=split == "train")[2]

    def num_batches(self, split: str = "train") -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        return math.ceil(self.num_samples(split) / self.per_worker_batch_size)

    def epoch_batches(self, epoch: int, *, split: str = "train", skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batches of one epoch: float [B,C,H,W] per image/regression modality, int64 [B,H/s,W/s] per
        class map, int64 [B] `cls`; `skip` drops the first batches (resume inside an epoch) without decoding them.
        A split without a shard folder yields nothing."""
        if split not in self.urls:
            return
        if self.num_workers > 0:
            loader, control = self._persistent_loader(split)
            control[0], control[1] = epoch, skip  # read by the workers when this iteration starts
        else:
            loader = _EpochStream(self, split, epoch=epoch, skip=skip)
        # Skip counts are cumulative per worker (persistent workers keep theirs across epochs).
        before = dict(self._worker_skips.get(split, {})) if self.num_workers > 0 else {}
        counts = self._worker_skips.setdefault(split, {}) if self.num_workers > 0 else {}
        for batch in loader:
            if _STATS_KEY in batch:
                worker, count = (int(x) for x in batch[_STATS_KEY])
                counts[worker] = count
                continue
            yield batch
        total = sum(counts.values()) - sum(before.values())
        if total:
            self.skipped += total
            logger.warning("epoch %d (%s, rank %d): skipped %d bad samples", epoch, split, self.rank, total)

    def _persistent_loader(self, split: str):
        """One DataLoader per split whose worker processes live across epochs (no per-epoch start-up: process
        fork, filesystem clients, connection pools). Only one iteration per split may be live at a time."""
        if split not in self._loaders:
            import multiprocessing

            control = multiprocessing.RawArray("q", 2)
            stream = _EpochStream(self, split, control=control)
            loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                                prefetch_factor=2, persistent_workers=True)
            self._loaders[split] = (loader, control)
        return self._loaders[split]
