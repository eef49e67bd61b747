"""Joint augmentation: one crop and flip for every modality, checked on samples that are functions of position."""

from __future__ import annotations

import math

import numpy as np
import pytest

from multimae_core.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    JointTransform,
    eval_crop_params,
    sample_crop_params,
    standardize_depth_np,
)

H, W, OUT = 96, 120, 32


def _depth_fn(x, y):
    # Quadratic in x (asymmetric about the centre) plus linear in y: bicubic resampling with a symmetric,
    # normalised kernel reproduces it up to a constant, which the per-sample standardisation removes.
    return 1.0 + ((x - 20.0) / 48.0) ** 2 + 0.3 * x / W + 0.5 * y / H


def _positional_sample():
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    rgb = np.stack([x * 2, y * 2, np.full_like(x, 50)], axis=-1).astype(np.uint8)
    normal = np.stack([x / W, np.zeros_like(x), -np.ones_like(x)], axis=-1).astype(np.float32)
    return {"rgb": rgb, "depth": _depth_fn(x, y).astype(np.float32), "semseg": x.astype(np.int32),
            "normal": normal, "cls": 3}


def _src_coords(params, n_out: int, horizontal: bool):
    """Continuous source pixel-index coordinate of each output pixel centre (PIL's mapping), flip applied."""
    start, length = (params.left, params.width) if horizontal else (params.top, params.height)
    idx = np.arange(n_out)
    if horizontal and params.flip:
        idx = idx[::-1]
    return start + (idx + 0.5) * length / n_out


def _naive_standardize(a):
    flat = np.sort(a.astype(np.float64).ravel())
    mid = flat[int(0.1 * flat.size):int(0.9 * flat.size)]
    return (a - mid.mean()) / math.sqrt(mid.var(ddof=1) + 1e-6)


@pytest.mark.parametrize("seed", range(12))
def test_modalities_stay_aligned_after_crop_and_flip(seed):
    tf = JointTransform(OUT, train=True)
    rng = np.random.default_rng(seed)
    params = tf.params(rng, H, W)
    out = tf.apply(_positional_sample(), params)
    assert out["rgb"].shape == (3, OUT, OUT) and out["depth"].shape == (1, OUT, OUT)
    assert out["semseg"].shape == (OUT // 4, OUT // 4) and out["semseg"].dtype == np.int64
    assert out["normal"].shape == (3, OUT, OUT) and out["cls"] == 3

    # semseg (nearest, at stride 4) holds the source column index exactly.
    want_cols = np.floor(_src_coords(params, OUT // 4, True)).astype(np.int64)
    got = out["semseg"]
    assert (got == want_cols[None, :]).mean() >= 0.95 and np.abs(got - want_cols[None, :]).max() <= 1

    inner = (slice(3, -3), slice(3, -3))
    u = _src_coords(params, OUT, True) - 0.5  # pixel-index coordinates
    v = _src_coords(params, OUT, False) - 0.5
    # rgb: linear ramps survive bicubic exactly away from the borders (up to uint8 rounding).
    rgb = (out["rgb"] * IMAGENET_STD[:, None, None] + IMAGENET_MEAN[:, None, None]) * 255
    np.testing.assert_allclose(rgb[0][inner], np.broadcast_to(2 * u[None, :], (OUT, OUT))[inner], atol=1.5)
    np.testing.assert_allclose(rgb[1][inner], np.broadcast_to(2 * v[:, None], (OUT, OUT))[inner], atol=1.5)

    # depth: standardised output is an increasing affine function of the depth at the source positions.
    want = _depth_fn(u[None, :], v[:, None])
    a, b = np.polyfit(want[inner].ravel(), out["depth"][0][inner].ravel(), 1)
    resid = out["depth"][0][inner] - (a * want[inner] + b)
    assert a > 0 and np.abs(resid).max() < 0.02 * out["depth"][0].std()

    # normals: x component follows the column and changes sign under the flip; z untouched.
    sign = -1.0 if params.flip else 1.0
    np.testing.assert_allclose(out["normal"][0][inner], np.broadcast_to(sign * u[None, :] / W, (OUT, OUT))[inner],
                               atol=2e-3)
    np.testing.assert_allclose(out["normal"][2], -1.0, atol=1e-5)


def test_crop_params_follow_scale_ratio_and_flip_rate():
    rng = np.random.default_rng(0)
    params = [sample_crop_params(rng, 224, 224, scale=(0.2, 1.0)) for _ in range(2000)]
    areas = np.array([p.height * p.width / 224**2 for p in params])
    ratios = np.array([p.width / p.height for p in params])
    assert areas.min() >= 0.2 - 0.01 and areas.max() <= 1.0
    assert ratios.min() >= 3 / 4 - 0.02 and ratios.max() <= 4 / 3 + 0.02
    assert all(0 <= p.top and p.top + p.height <= 224 and 0 <= p.left and p.left + p.width <= 224 for p in params)
    assert 0.45 < np.mean([p.flip for p in params]) < 0.55
    assert not any(sample_crop_params(rng, 50, 80, hflip=0.0).flip for _ in range(50))


def test_eval_transform_is_centre_square_unflipped():
    p = eval_crop_params(96, 120)
    assert (p.top, p.left, p.height, p.width, p.flip) == (0, 12, 96, 96, False)
    tf = JointTransform(OUT, train=False)
    out = tf(_positional_sample(), np.random.default_rng(0))
    want_cols = np.floor(12 + (np.arange(OUT // 4) + 0.5) * 96 / (OUT // 4)).astype(np.int64)
    np.testing.assert_array_equal(out["semseg"], np.broadcast_to(want_cols, (OUT // 4, OUT // 4)))


def test_rgb_imagenet_normalisation():
    tf = JointTransform(16, train=False)
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 128, 0
    out = tf({"rgb": rgb}, np.random.default_rng(0))["rgb"]
    want = (np.array([1.0, 128 / 255, 0.0]) - [0.485, 0.456, 0.406]) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(out[:, 5, 5], want, rtol=1e-5)


@pytest.mark.parametrize("n", [7, 100, 50176])
def test_standardize_depth_matches_naive_sorted_reference(n):
    d = np.random.default_rng(n).lognormal(size=n).astype(np.float32)
    np.testing.assert_allclose(standardize_depth_np(d), _naive_standardize(d), rtol=1e-5, atol=1e-5)


def test_same_rng_same_output_and_depth_is_standardised():
    s = _positional_sample()
    tf = JointTransform(OUT)
    a, b = tf(s, np.random.default_rng(7)), tf(s, np.random.default_rng(7))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_allclose(a["depth"], _naive_standardize(
        JointTransform(OUT).apply(s, tf.params(np.random.default_rng(7), H, W), normalize=False)["depth"]
    )[None], rtol=1e-4, atol=1e-4)


def test_image_size_must_divide_by_stride():
    with pytest.raises(ValueError, match="not divisible by the stride level 4 of 'semseg'"):
        JointTransform(30).apply({"semseg": np.zeros((40, 40), np.int32)}, eval_crop_params(40, 40))
