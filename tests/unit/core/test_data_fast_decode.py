"""The cheaper decode / crop / normalise path gives bit-identical samples to the straightforward implementation.

The reference functions below are the pre-speed-up code, kept verbatim (temporaries, PIL convert on every image,
a final layout copy); the library path must match them exactly (same dtypes, same values) on random inputs.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from multimae_core.data.shards import DEFAULT_ENCODINGS, Manifest, decode_record, encode_sample
from multimae_core.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VECTOR_FIELDS,
    JointTransform,
    apply_crop,
    normalize_modality,
    sample_crop_params,
)
from multimae_core.modalities import get_modality


def _ref_resize(arr2d, mode, size_wh, box, resample):
    img = Image.fromarray(arr2d, mode=mode) if mode else Image.fromarray(arr2d)
    return np.asarray(img.resize(size_wh, resample=resample, box=box))


def _ref_apply_crop(name, arr, params, out_hw):
    spec = get_modality(name)
    oh, ow = out_hw[0] // spec.stride_level, out_hw[1] // spec.stride_level
    box = (params.left, params.top, params.left + params.width, params.top + params.height)
    if spec.kind == "image":
        out = _ref_resize(arr, None, (ow, oh), box, Image.BICUBIC)
    elif spec.kind == "dense_classes":
        out = _ref_resize(arr.astype(np.int32), "I", (ow, oh), box, Image.NEAREST)
    elif arr.ndim == 2:
        out = _ref_resize(arr.astype(np.float32), "F", (ow, oh), box, Image.BICUBIC)
    else:
        out = np.stack([_ref_resize(np.ascontiguousarray(arr[..., c], dtype=np.float32), "F", (ow, oh), box,
                                    Image.BILINEAR) for c in range(arr.shape[-1])], axis=-1)
    if params.flip:
        out = out[:, ::-1]
        if name in VECTOR_FIELDS:
            out = out.copy()
            out[..., VECTOR_FIELDS[name]] *= -1
    return np.ascontiguousarray(out)


def _ref_standardize(depth):
    flat = depth.reshape(-1).astype(np.float64)
    n = flat.size
    lo, hi = int(0.1 * n), int(0.9 * n)
    mid = np.partition(flat, [lo, hi - 1])[lo:hi] if hi > lo else flat
    mean = mid.mean()
    var = mid.var(ddof=1) if mid.size > 1 else 0.0
    return ((depth - mean) / math.sqrt(var + 1e-6)).astype(np.float32)


def _ref_normalize(name, arr):
    spec = get_modality(name)
    if spec.kind == "dense_classes":
        return arr.astype(np.int64)
    x = arr.astype(np.float32)
    if spec.kind == "image":
        x = x / 255.0
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    if spec.normalization == "imagenet":
        x = (x - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
    elif spec.normalization == "standardize":
        x = _ref_standardize(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def _ref_decode(name, enc, blob):
    img = Image.open(io.BytesIO(blob))
    img.load()
    spec = get_modality(name)
    if spec.kind == "image":
        return np.asarray(img.convert("L" if spec.num_channels == 1 else "RGB"))
    if spec.kind == "dense_classes":
        return np.asarray(img).astype(np.int32)
    out = np.asarray(img).astype(np.float32) * np.float32(enc.scale)
    if enc.offset:
        out += np.float32(enc.offset)
    return out


def _random_sample(rng, h, w):
    return {
        "rgb": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "depth": rng.uniform(0.1, 20.0, (h, w)).astype(np.float32),
        "semseg": rng.integers(0, 40, (h, w)).astype(np.int32),
        "normal": rng.uniform(-1, 1, (h, w, 3)).astype(np.float32),
        "cls": 2,
    }


def _exactly_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.flags.c_contiguous
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("size", "out"), [(64, 64), (72, 64), (224, 224), (96, 32)])
def test_decode_crop_normalise_match_reference(size, out) -> None:
    rng = np.random.default_rng(size * 1000 + out)
    encodings = DEFAULT_ENCODINGS
    manifest = Manifest(modalities=("rgb", "depth", "semseg", "normal"),
                        encodings={k: encodings[k] for k in ("rgb", "depth", "semseg", "normal", "cls")}, shards=())
    flips = 0
    for i in range(6):
        files = encode_sample(_random_sample(rng, size, size), manifest.encodings)
        sample = decode_record(f"k{i}", files, manifest, manifest.modalities, shard="s", with_cls=True)
        for name in manifest.modalities:
            ref = _ref_decode(name, manifest.encodings[name], files[f"{name}.png"])
            _exactly_equal(sample[name], ref)
        params = sample_crop_params(np.random.default_rng([0, 1, i]), size, size)
        flips += params.flip
        for name in manifest.modalities:
            cropped = apply_crop(name, sample[name], params, (out, out))
            ref_cropped = _ref_apply_crop(name, sample[name], params, (out, out))
            _exactly_equal(cropped, ref_cropped)
            _exactly_equal(normalize_modality(name, cropped), _ref_normalize(name, ref_cropped))
        got = JointTransform(out)(sample, np.random.default_rng([0, 2, i]))
        p2 = sample_crop_params(np.random.default_rng([0, 2, i]), size, size)
        for name in manifest.modalities:
            _exactly_equal(got[name], _ref_normalize(name, _ref_apply_crop(name, sample[name], p2, (out, out))))
        assert got["cls"] == 2
    assert 0 < flips < 6  # both flip branches are exercised


def test_one_channel_and_offset_decodings_match_reference() -> None:
    rng = np.random.default_rng(5)
    # An 8-bit grayscale PNG where the registry wants RGB, and an RGBA one: decoding must convert them.
    for mode, shape in (("L", (20, 24)), ("RGBA", (20, 24, 4))):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buf, format="PNG")
        manifest = Manifest(modalities=("rgb",), encodings={"rgb": DEFAULT_ENCODINGS["rgb"]}, shards=())
        got = decode_record("k", {"rgb.png": buf.getvalue()}, manifest, ("rgb",), shard="s")["rgb"]
        _exactly_equal(got, _ref_decode("rgb", manifest.encodings["rgb"], buf.getvalue()))
        assert got.shape == (20, 24, 3)
    # normal carries a non-zero offset (raw * 2/255 - 1)
    enc = DEFAULT_ENCODINGS["normal"]
    files = encode_sample({"normal": rng.uniform(-1, 1, (16, 16, 3)).astype(np.float32)}, {"normal": enc})
    manifest = Manifest(modalities=("normal",), encodings={"normal": enc}, shards=())
    got = decode_record("k", files, manifest, ("normal",), shard="s")["normal"]
    _exactly_equal(got, _ref_decode("normal", enc, files["normal.png"]))
    assert got.min() >= -1.0 and got.max() <= 1.0 + 1e-6
