"""Synthetic scenes: deterministic per seed (also across process counts), consistent ground truth."""

from __future__ import annotations

import numpy as np

from multimae_core.data.shards import iter_shard_samples, read_manifest
from multimae_core.data.synth import CLASS_NAMES, FAR_M, SEMSEG_CLASSES, render_sample, write_synth


def test_render_is_deterministic_per_seed_and_index():
    a, b = render_sample(3, 5, 48), render_sample(3, 5, 48)
    for k in ("rgb", "depth", "semseg", "normal"):
        np.testing.assert_array_equal(a[k], b[k])
    c = render_sample(4, 5, 48)
    assert not np.array_equal(a["rgb"], c["rgb"])
    assert not np.array_equal(a["rgb"], render_sample(3, 6, 48)["rgb"])


def test_ground_truth_is_consistent():
    for i in range(6):
        s = render_sample(0, i, 64)
        sem, depth, normal = s["semseg"], s["depth"], s["normal"]
        assert s["rgb"].shape == (64, 64, 3) and s["rgb"].dtype == np.uint8
        assert sem.min() >= 0 and sem.max() < len(SEMSEG_CLASSES)
        sky = sem == 0
        np.testing.assert_allclose(depth[sky], FAR_M)
        assert (depth[~sky] > 0.1).all() and (depth[~sky] <= FAR_M).all()
        np.testing.assert_allclose(normal[sky], 0.0)
        np.testing.assert_allclose(np.linalg.norm(normal[~sky], axis=-1), 1.0, atol=1e-4)
        # Visible surfaces face the camera (negative z in camera axes).
        assert (normal[~sky][:, 2] < 1e-3).mean() > 0.99
        # The label is the primitive kind covering the most pixels.
        areas = [(sem == 2 + k).sum() for k in range(len(CLASS_NAMES))]
        assert s["cls"] == int(np.argmax(areas)) and max(areas) > 0
        # Sky is above the ground in the image: every sky pixel has no ground pixel above it in its column.
        ground = sem == 1
        for col in range(64):
            g = np.flatnonzero(ground[:, col])
            if g.size:
                assert not sky[g.min():, col].any()


def test_write_synth_is_byte_identical_across_worker_counts(tmp_path):
    m1 = write_synth(str(tmp_path / "a"), 24, size=32, seed=7, samples_per_shard=10, num_workers=1)
    m2 = write_synth(str(tmp_path / "b"), 24, size=32, seed=7, samples_per_shard=10, num_workers=2)
    m3 = write_synth(str(tmp_path / "c"), 24, size=32, seed=8, samples_per_shard=10, num_workers=2)
    assert [s.sha256 for s in m1.shards] == [s.sha256 for s in m2.shards]
    assert [s.sha256 for s in m1.shards] != [s.sha256 for s in m3.shards]
    man = read_manifest(str(tmp_path / "a"))
    assert man.num_samples == 24 and [s.num_samples for s in man.shards] == [10, 10, 4]
    assert man.modalities == ("rgb", "depth", "semseg", "normal") and man.image_size == (32, 32)
    assert man.class_names == CLASS_NAMES and man.semseg_classes == SEMSEG_CLASSES and sum(man.class_counts) == 24
    samples = dict(iter_shard_samples(str(tmp_path / "a")))
    want = render_sample(7, 13, 32)
    got = samples["00000013"]
    np.testing.assert_array_equal(got["rgb"], want["rgb"])
    np.testing.assert_array_equal(got["semseg"], want["semseg"])
    np.testing.assert_allclose(got["depth"], want["depth"], atol=0.0005 + 1e-6)
    assert got["cls"] == want["cls"]
