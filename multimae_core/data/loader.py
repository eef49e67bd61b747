"""Plain PyTorch streaming loader over shard folders: `ShardDataSource` implements the training loop's DataSource.

Epoch plan (a pure function of seed, epoch, world size, batch size and DataLoader workers, so it holds when the world
size changes between epochs or restarts):
  1. The global order of one epoch (train only) is a pure function of (seed, epoch): the shard order is permuted, and
     (`shuffle_buffer` > 1) each shard's samples are permuted with a permutation seeded by (seed, epoch, shard). The
     samples in that order form one sequence of N positions. Shards are always read whole.
  2. train: each rank takes a contiguous range of `N // (world_size * B) * B` positions, cut into batches of B
     consecutive positions; the tail of fewer than world_size * B positions is dropped (it falls on different samples
     every epoch, as shard order changes). So every sample is used at most once per epoch, and exactly once except
     that tail, and all ranks take the same number of full batches (DistributedSampler(drop_last=True), the
     original's setting).
     val: each rank takes ceil(N / world_size) positions, wrapping around to the first samples to pad the last rank
     (DistributedSampler(drop_last=False)); batches are not shuffled and the last one may be short.
  3. Within a rank, DataLoader worker w takes a contiguous run of the rank's batches (the first `nb % W` workers one
     more), reads only the shards overlapping it and decodes and augments them. The DataLoader interleaves workers
     round-robin, so rank batch i comes from worker i % W: the rank's *batch sequence* (`rank_batches`) is that
     interleaving, and the samples consumed after k batches are exactly the positions of its first k entries.
  4. Resume inside an epoch (`skip` batches per rank already consumed): with the same world size each rank goes on
     with its batch sequence after `skip` entries (the skipped batches are not read). With another world size
     (`skip_world_size`, the world size the `skip` batches were counted under), the batches left over by the old
     ranks (each old rank's sequence after `skip`, concatenated in rank order) are split evenly in contiguous runs
     over the new ranks, every rank the same number; fewer than new world_size batches at the end are dropped and
     logged. So the epoch still uses every sample at most once. This is exact for one world-size change inside an
     epoch (the old run's DataLoader worker count is taken to be this one's).
Shards are downloaded in background threads (`prefetch` shards ahead) and checked against the manifest's sha256.
DataLoader workers are persistent: one set of processes per split serves every epoch (the parent passes the epoch,
`skip` and `skip_world_size` through shared memory), so filesystem clients and connections are made once, not per
epoch. The batch stream depends on (seed, epoch, rank, world_size, per_worker_batch_size, num_workers, whether
shuffle_buffer > 1) and on the resume point.
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

__all__ = ["ShardDataSource", "plan_epoch", "rank_batches", "sample_permutation", "worker_batch_ranges"]

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


def sample_permutation(num_samples: int, *, epoch: int, seed: int, shard: int) -> np.ndarray:
    """Order of one shard's samples in an epoch's global order (train, shuffling on); seeded by (seed, epoch, shard)."""
    return np.random.default_rng([seed, epoch, shard, 0x5A4D]).permutation(num_samples)


def _interleave(runs: Sequence[Sequence[Any]]) -> list[Any]:
    """Round-robin over runs (the DataLoader's worker cycling): item i of the result is run i % W's item i // W
    while every run has one; runs that are exhausted drop out."""
    out = []
    for j in range(max((len(r) for r in runs), default=0)):
        out.extend(r[j] for r in runs if j < len(r))
    return out


def _rank_sequence(start: int, count: int, batch_size: int, num_workers: int) -> list[tuple[int, int]]:
    """Batches of the positions [start, start + count) in the order the DataLoader yields them."""
    return _interleave([[(start + a, start + min(a + batch_size, hi)) for a in range(lo, hi, batch_size)]
                        for lo, hi in worker_batch_ranges(count, batch_size, num_workers)])


def _batches_left(shard_sizes: Sequence[int], *, epoch: int, seed: int, world_size: int, batch_size: int,
                  train: bool, num_workers: int, skip: int) -> list[tuple[int, int]]:
    """The batches not yet consumed when each of `world_size` ranks has yielded `skip`, in rank order."""
    if world_size < 1:
        raise ValueError(f"skip_world_size must be >= 1, got {world_size}")
    left: list[tuple[int, int]] = []
    for r in range(world_size):
        _, start, count = plan_epoch(shard_sizes, epoch=epoch, seed=seed, rank=r, world_size=world_size,
                                     batch_size=batch_size, train=train)
        left += _rank_sequence(start, count, batch_size, num_workers)[skip:]
    return left


def rank_batches(shard_sizes: Sequence[int], *, epoch: int, seed: int, rank: int, world_size: int, batch_size: int,
                 train: bool, num_workers: int = 1, skip: int = 0,
                 skip_world_size: int | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """(shard order, batches) of one rank for one epoch: each batch a (first, end) range of positions (wrapping
    modulo N), in the order the rank yields them with `num_workers` DataLoader workers (see the module docstring).

    `skip` batches per rank were already consumed under `skip_world_size` ranks (None: this world size); the result
    holds this rank's share of what is left.
    """
    workers = max(1, num_workers)
    order, start, count = plan_epoch(shard_sizes, epoch=epoch, seed=seed, rank=rank, world_size=world_size,
                                     batch_size=batch_size, train=train)
    if skip_world_size is None or skip_world_size == world_size or skip == 0:
        return order, _rank_sequence(start, count, batch_size, workers)[skip:]
    left = _batches_left(shard_sizes, epoch=epoch, seed=seed, world_size=skip_world_size, batch_size=batch_size,
                         train=train, num_workers=workers, skip=skip)
    share = len(left) // world_size
    mine = left[rank * share:(rank + 1) * share]
    return order, _interleave([mine[a // batch_size:b // batch_size]
                               for a, b in worker_batch_ranges(share * batch_size, batch_size, workers)])


class _EpochStream(IterableDataset):
    """Epochs of one rank and split; each DataLoader worker yields its share as ready batches, then a stats record.

    With persistent DataLoader workers the (epoch, skip, skip_world_size or 0) of the next iteration is read from
    `control`, an array in shared memory that the parent sets before it starts iterating; without workers they are
    plain attributes.
    """

    def __init__(self, src: ShardDataSource, split: str, *, epoch: int = 0, skip: int = 0,
                 skip_world_size: int | None = None, control=None):
        self.url = src.urls[split]
        self.storage_options = src.storage_options
        self.manifest = src.manifest(split)
        self.train = split == "train"
        self.epoch, self.skip, self.skip_world_size, self.control = epoch, skip, skip_world_size, control
        self.rank, self.world_size = src.rank, src.world_size
        self.batch_size, self.seed = src.per_worker_batch_size, src.seed
        self.shuffle_buffer, self.prefetch, self.verify = src.shuffle_buffer, src.prefetch, src.verify
        self.processor = SampleProcessor(
            self.manifest, src.modalities, src.make_transform(train=self.train),
            with_cls=src.with_cls(split), seed=src.seed, skip_bad=src.skip_bad,
        )

    def _batches(self, order: list[int], batches: list[tuple[int, int]]) -> Iterator[list[tuple[int, str, str,
                                                                                              dict[str, bytes]]]]:
        """Raw records (sample id, shard name, key, files) of each batch; every shard is fetched once per run of
        consecutive batches touching it and parsed whole."""
        shards = self.manifest.shards
        sizes = [s.num_samples for s in shards]
        first_ids = np.cumsum([0] + sizes)
        plans = [_segments(order, sizes, lo, hi) for lo, hi in batches]
        fetch: list[int] = []
        for segments in plans:
            for shard, _, _ in segments:
                if not fetch or fetch[-1] != shard:
                    fetch.append(shard)
        if not fetch:
            return
        fs, root = open_folder(self.url, self.storage_options)
        fetched = prefetch_shards(fs, root, [shards[i] for i in fetch], verify=self.verify, depth=self.prefetch)
        current, records, perm = -1, [], None
        for segments in plans:
            out = []
            for shard, lo, hi in segments:
                if shard != current:
                    info, data = next(fetched)
                    records, current = list(iter_records(data, info.name)), shard
                    if len(records) != info.num_samples:
                        raise ShardDataError(info.name, None, f"holds {len(records)} samples, the manifest says "
                                             f"{info.num_samples}")
                    perm = (sample_permutation(len(records), epoch=self.epoch, seed=self.seed, shard=shard)
                            if self.train and self.shuffle_buffer > 1 else None)
                for j in (perm[lo:hi] if perm is not None else range(lo, hi)):
                    key, files = records[j]
                    out.append((int(first_ids[shard]) + int(j), shards[shard].name, key, files))
            yield out

    def __iter__(self):
        if self.control is not None:
            self.epoch, self.skip = int(self.control[0]), int(self.control[1])
            self.skip_world_size = int(self.control[2]) or None
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The rank's batch sequence is the round-robin interleaving of the workers' contiguous runs (the order the
        # DataLoader yields them), so physical worker p yields entries p, p + W, ... of it; skipped batches are not
        # read at all.
        sizes = [s.num_samples for s in self.manifest.shards]
        order, batches = rank_batches(sizes, epoch=self.epoch, seed=self.seed, rank=self.rank,
                                      world_size=self.world_size, batch_size=self.batch_size, train=self.train,
                                      num_workers=num_workers, skip=self.skip, skip_world_size=self.skip_world_size)
        for records in self._batches(order, batches[physical::num_workers]):
            out = self._decode(records)
            if out is not None:
                yield out
        yield {_STATS_KEY: torch.tensor([physical, self.processor.skipped.count])}

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
        shuffle_buffer: > 1 permutes each shard's samples (seeded by seed, epoch, shard) in train epochs; 0/1 keeps
            the stored order within shards (shard order is shuffled either way).
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

    def epoch_batches(self, epoch: int, *, split: str = "train", skip: int = 0,
                      skip_world_size: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batches of one epoch: float [B,C,H,W] per image/regression modality, int64 [B,H/s,W/s] per
        class map, int64 [B] `cls`. Resume inside an epoch: `skip` batches per rank were already consumed, under
        `skip_world_size` ranks (None: this world size); they are not read again, and with another world size the
        rest of the epoch is split over the ranks (module docstring, item 4). A split without a shard folder yields
        nothing."""
        if split not in self.urls:
            return
        if self.num_workers > 0:
            loader, control = self._persistent_loader(split)
            # read by the workers when this iteration starts
            control[0], control[1], control[2] = epoch, skip, skip_world_size or 0
        else:
            loader = _EpochStream(self, split, epoch=epoch, skip=skip, skip_world_size=skip_world_size)
        if skip and skip_world_size not in (None, self.world_size) and self.rank == 0:
            left = len(_batches_left([s.num_samples for s in self.manifest(split).shards], epoch=epoch,
                                     seed=self.seed, world_size=skip_world_size, batch_size=self.per_worker_batch_size,
                                     train=split == "train", num_workers=max(1, self.num_workers), skip=skip))
            logger.info("resuming epoch %d with %d ranks after %d batches per rank of %d ranks: %d batches left, the "
                        "last %d dropped", epoch, self.world_size, skip, skip_world_size, left,
                        left % self.world_size)
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

            control = multiprocessing.RawArray("q", 3)
            stream = _EpochStream(self, split, control=control)
            loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                                prefetch_factor=2, persistent_workers=True)
            self._loaders[split] = (loader, control)
        return self._loaders[split]
