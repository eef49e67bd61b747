"""Streaming loader: once-per-epoch coverage across ranks, DataLoader workers and world-size changes; seeding."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest
import torch

from multimae_core.data.loader import ShardDataSource, plan_epoch, worker_batch_ranges
from multimae_core.data.shards import Encoding, ShardWriter, encode_sample

N, SIZE = 48, 16


def _id_folder(url: str, n: int = N, per_shard: int = 7) -> str:
    """Samples whose semseg map is their id everywhere (so the id survives any crop); shards of unequal size."""
    rng = np.random.default_rng(0)
    with ShardWriter(url, modalities=["rgb", "depth", "semseg"], samples_per_shard=per_shard,
                     class_names=["a", "b"]) as w:
        for i in range(n):
            w.write(f"{i:04d}", {"rgb": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
                                 "depth": rng.uniform(1, 5, (SIZE, SIZE)).astype(np.float32),
                                 "semseg": np.full((SIZE, SIZE), i, np.int32), "cls": i % 2})
    return url


def _ids(batches) -> list[int]:
    out = []
    for b in batches:
        sem = b["semseg"]
        assert (sem == sem[:, :1, :1]).all()
        out.extend(sem[:, 0, 0].tolist())
        if "cls" in b:
            assert b["cls"].tolist() == [i % 2 for i in sem[:, 0, 0].tolist()]
    return out


def _source(url, **kw) -> ShardDataSource:
    opts = dict(per_worker_batch_size=4, image_size=SIZE, seed=1, shuffle_buffer=8)
    opts.update(kw)
    return ShardDataSource(url, **opts)


@pytest.fixture
def ids_url(tmp_path):
    return _id_folder(str(tmp_path / "ids"))


def test_plan_covers_each_position_once():
    sizes = [7, 7, 7, 7, 7, 7, 6]
    for world in (1, 2, 3, 5):
        spans = [plan_epoch(sizes, epoch=2, seed=0, rank=r, world_size=world, batch_size=4, train=True)
                 for r in range(world)]
        positions = [p for _, start, count in spans for p in range(start, start + count)]
        assert len(positions) == len(set(positions)) == 48 // (world * 4) * world * 4
        assert len({count for _, _, count in spans}) == 1
    for world in (1, 3, 5):
        spans = [plan_epoch(sizes, epoch=0, seed=0, rank=r, world_size=world, batch_size=4, train=False)
                 for r in range(world)]
        positions = {(start + i) % 48 for _, start, count in spans for i in range(count)}
        assert positions == set(range(48))
    assert worker_batch_ranges(10, 4, 2) == [(0, 8), (8, 10)]
    assert worker_batch_ranges(10, 4, 4) == [(0, 4), (4, 8), (8, 10), (10, 10)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_rank_sees_every_sample_once(ids_url, num_workers):
    src = _source(ids_url, num_workers=num_workers)
    batches = list(src.epoch_batches(0))
    assert len(batches) == src.num_batches() == N // 4
    assert sorted(_ids(batches)) == list(range(N))
    b = batches[0]
    assert b["rgb"].shape == (4, 3, SIZE, SIZE) and b["rgb"].dtype == torch.float32
    assert b["depth"].shape == (4, 1, SIZE, SIZE) and b["semseg"].shape == (4, SIZE // 4, SIZE // 4)
    assert b["semseg"].dtype == torch.int64 and b["cls"].dtype == torch.int64


def test_two_ranks_then_one_cover_every_sample_once_per_epoch(ids_url):
    seen = {}
    for epoch, world in [(0, 2), (1, 1), (2, 2)]:
        per_rank = [_ids(_source(ids_url, rank=r, world_size=world, num_workers=w).epoch_batches(epoch))
                    for r, w in zip(range(world), [2, 0], strict=False)]
        assert len({len(p) for p in per_rank}) == 1  # ranks stay in step
        seen[epoch] = [i for p in per_rank for i in p]
        assert sorted(seen[epoch]) == list(range(N)), (epoch, world)
    assert seen[0] != seen[2]  # reshuffled every epoch


def test_tail_is_dropped_consistently(tmp_path):
    url = _id_folder(str(tmp_path / "odd"), n=30, per_shard=4)
    for world in (1, 2, 3):
        ids = [i for r in range(world) for i in _ids(_source(url, rank=r, world_size=world).epoch_batches(5))]
        assert len(ids) == len(set(ids)) == 30 // (world * 4) * world * 4
    # The dropped samples change with the epoch.
    dropped = [set(range(30)) - set(_ids(_source(url, world_size=1).epoch_batches(e))) for e in range(4)]
    assert len({frozenset(d) for d in dropped}) > 1


def test_val_split_pads_and_keeps_order(tmp_path, ids_url):
    val = _id_folder(str(tmp_path / "val"), n=10, per_shard=4)
    per_rank = [_ids(_source({"train": ids_url, "val": val}, rank=r, world_size=3).epoch_batches(0, split="val"))
                for r in range(3)]
    assert per_rank == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_seeded_and_resumable(ids_url, num_workers):
    src = _source(ids_url, num_workers=num_workers)
    a, b = list(src.epoch_batches(3)), list(src.epoch_batches(3))
    for x, y in zip(a, b, strict=True):
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)
    c = list(src.epoch_batches(4))
    assert _ids(a) != _ids(c)
    resumed = list(src.epoch_batches(3, skip=5))
    assert len(resumed) == len(a) - 5
    for x, y in zip(a[5:], resumed, strict=True):
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)


def test_skip_bad_counts_and_keeps_going(tmp_path):
    url = str(tmp_path / "bad")
    rng = np.random.default_rng(0)
    enc = {"depth": Encoding("png16", scale=0.001, unit="m"), "semseg": Encoding("png8")}
    with ShardWriter(url, modalities=["rgb", "depth", "semseg"], samples_per_shard=5) as w:
        for i in range(12):
            files = encode_sample({"rgb": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
                                   "depth": np.ones((SIZE, SIZE), np.float32),
                                   "semseg": np.full((SIZE, SIZE), i, np.int32)}, enc)
            if i in (3, 8):
                files["depth.png"] = b"not a png"
            w.write_encoded(f"{i:04d}", files)
    with pytest.raises(ValueError, match=r"shard shard-00000[01].tar, sample '000[38]': depth.png: undecodable image"):
        list(_source(url, shuffle_buffer=0).epoch_batches(0))
    src = _source(url, skip_bad=True, num_workers=2)
    batches = list(src.epoch_batches(0))
    assert [len(b["rgb"]) for b in batches] == [4, 4, 4]  # train batches keep their size
    ids = _ids(batches)
    assert set(ids) == {i for i in range(12) if i not in (3, 8)} and len(ids) == 12
    assert src.skipped == 2
    val = _source({"train": url, "val": url}, skip_bad=True)
    assert sorted(_ids(val.epoch_batches(0, split="val"))) == [i for i in range(12) if i not in (3, 8)]
    assert val.skipped == 2 and val.num_batches("test") == 0 and list(val.epoch_batches(0, split="test")) == []


def test_from_config_and_missing_modality(ids_url):
    from multimae_core.config import TrainConfig

    cfg = TrainConfig.model_validate({
        "name": "t", "model": {"image_size": 16, "patch_size": 8},
        "modalities": {"inputs": ["rgb", "depth", "semseg"], "outputs": ["rgb"]},
        "masking": {"num_encoded_tokens": 4},
        "data": {"train_url": ids_url, "val_url": None, "num_workers": 0},
        "train": {"global_batch_size": 8, "per_worker_batch_size": 4},
    })
    src = ShardDataSource.from_config(cfg, rank=1, world_size=2)
    assert src.modalities == ("rgb", "depth", "semseg") and src.num_batches() == N // 8
    assert collections.Counter(len(b["rgb"]) for b in src.epoch_batches(0)) == {4: N // 8}
    with pytest.raises(ValueError, match=r"data.train_url .* the job needs \['normal'\]"):
        ShardDataSource(ids_url, per_worker_batch_size=4, modalities=["rgb", "normal"])


def test_persistent_workers_survive_an_abandoned_epoch(ids_url):
    src = _source(ids_url, num_workers=2)
    full = [b["semseg"].clone() for b in src.epoch_batches(1)]
    partial = src.epoch_batches(0)
    next(partial)
    partial.close()  # the training loop takes one batch for its figures and drops the iterator
    again = list(src.epoch_batches(1))
    assert len(again) == len(full) and sorted(_ids(again)) == list(range(N))
    for x, y in zip(full, again, strict=True):
        torch.testing.assert_close(x, y["semseg"], rtol=0, atol=0)
    resumed = list(src.epoch_batches(1, skip=3))
    assert _ids(resumed) == _ids(again[3:])
    assert len(src._loaders) == 1  # one set of worker processes for all these epochs


def _take(src: ShardDataSource, epoch: int, k: int, **kw) -> list[int]:
    """Ids of the first k batches of an epoch (the iterator is then abandoned, as a stopped run does)."""
    it = src.epoch_batches(epoch, **kw)
    ids = _ids(itertools.islice(it, k))
    it.close()
    return ids


def test_global_order_is_a_function_of_seed_and_epoch(ids_url):
    # With one DataLoader worker a rank's batches are its range in position order, so the ranks of any world size
    # concatenated are a prefix of the one-rank order: the permutation does not depend on the world size.
    one = _ids(_source(ids_url).epoch_batches(2))
    for world in (2, 3):
        ranks = [i for r in range(world) for i in _ids(_source(ids_url, rank=r, world_size=world).epoch_batches(2))]
        assert ranks == one[: len(ranks)], world
    assert _ids(_source(ids_url).epoch_batches(2)) == one  # a fresh source: the same order
    assert _ids(_source(ids_url, seed=2).epoch_batches(2)) != one
    assert _ids(_source(ids_url).epoch_batches(3)) != one
    # Shard s holds ids 7s..7s+6 and stays contiguous in the order; its samples are permuted, or kept in order.
    shard_runs = [s for j, s in enumerate(i // 7 for i in one) if j == 0 or one[j - 1] // 7 != s]
    assert len(shard_runs) == len(set(shard_runs)) == 7
    by_shard = collections.defaultdict(list)
    for i in one:
        by_shard[i // 7].append(i)
    assert any(v != sorted(v) for v in by_shard.values())
    plain = _ids(_source(ids_url, shuffle_buffer=0).epoch_batches(2))
    kept = collections.defaultdict(list)
    for i in plain:
        kept[i // 7].append(i)
    assert all(v == sorted(v) for v in kept.values())
    assert [i // 7 for i in plain] == [i // 7 for i in one]  # the same shard order either way


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_cover_each_sample_once(tmp_path, num_workers):
    url = _id_folder(str(tmp_path / "odd"), n=30, per_shard=4)
    for world in (1, 2, 3):
        per_rank = [_ids(_source(url, rank=r, world_size=world, num_workers=num_workers).epoch_batches(1))
                    for r in range(world)]
        ids = [i for p in per_rank for i in p]
        assert len({len(p) for p in per_rank}) == 1
        assert len(ids) == len(set(ids)) == 30 // (world * 4) * world * 4, world


@pytest.mark.parametrize(("n", "old", "new", "k", "num_workers"),
                         [(48, 2, 1, 2, 0), (48, 2, 1, 3, 2), (48, 1, 2, 3, 0), (48, 1, 2, 5, 2), (30, 2, 3, 1, 0),
                          (48, 3, 2, 1, 2)])
def test_resume_with_another_world_size_is_exact(tmp_path, n, old, new, k, num_workers):
    url = _id_folder(str(tmp_path / "ids"), n=n, per_shard=7)
    B, epoch = 4, 1
    full = [_ids(_source(url, rank=r, world_size=old, num_workers=num_workers).epoch_batches(epoch))
            for r in range(old)]
    before = [_take(_source(url, rank=r, world_size=old, num_workers=num_workers), epoch, k) for r in range(old)]
    assert all(b == f[: k * B] for b, f in zip(before, full, strict=True))
    after = [_ids(_source(url, rank=r, world_size=new, num_workers=num_workers)
                  .epoch_batches(epoch, skip=k, skip_world_size=old)) for r in range(new)]
    assert len({len(a) for a in after}) == 1  # ranks stay in step
    seen = [i for part in (*before, *after) for i in part]
    assert len(seen) == len(set(seen))  # nothing twice
    # What is left of the old epoch, in old rank order; the new ranks take it evenly, the last left % new batches
    # (fewer than new * B samples) are dropped, on top of the tail the old plan never used.
    left = [i for f in full for i in f[k * B:]]
    dropped = (len(left) // B) % new * B
    assert sorted(i for a in after for i in a) == sorted(left[: len(left) - dropped])
    assert set(range(n)) - set(seen) == (set(range(n)) - {i for f in full for i in f}) | set(left[len(left) - dropped:])
    assert dropped < new * B


def test_memory_source_skips_the_same_samples_in_another_world():
    from multimae_core.training.reporting import MemoryDataSource

    batches = [{"x": torch.arange(8) + 8 * g} for g in range(3)]
    two = [MemoryDataSource(batches, per_worker_batch_size=4, rank=r, world_size=2) for r in range(2)]
    one = MemoryDataSource(batches, per_worker_batch_size=4)
    rest = [b["x"].tolist() for b in one.epoch_batches(0, skip=1, skip_world_size=2)]
    assert rest == [list(range(8, 12)), list(range(12, 16)), list(range(16, 20)), list(range(20, 24))]
    assert [b["x"].tolist() for b in two[1].epoch_batches(0, skip=2, skip_world_size=1)] == [[12, 13, 14, 15],
                                                                                          [20, 21, 22, 23]]
