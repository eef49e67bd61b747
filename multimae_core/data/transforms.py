"""Joint augmentation of decoded multi-modal samples and per-modality normalisation (torch-free).

One random-resized-crop box and one horizontal-flip decision are drawn per sample and applied to every modality
(MultiMAE's `DataAugmentationForMultiMAE`, spec section 5): bicubic for images and depth, bilinear for normals,
nearest for class maps, each resized straight to its stride level (semseg to H/4 x W/4). A flip negates the x
component of vector fields (surface normals). Normalisation follows each ModalitySpec: ImageNet mean/std for rgb,
per-sample truncated standardisation for depth (spec section 4: the middle 10-90 % of sorted values give mean and
unbiased variance), none otherwise.

Outputs are numpy arrays ready to stack: float32 [C,H,W] for image/dense_regression modalities, int64 [H/s,W/s] for
dense_classes, and `cls` as an int64 scalar. The torch loader and the Ray Data ingest both call `JointTransform`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from multimae_core.modalities import get_modality

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CropParams",
    "JointTransform",
    "SampleProcessor",
    "apply_crop",
    "collate_numpy",
    "eval_crop_params",
    "normalize_modality",
    "sample_crop_params",
    "standardize_depth_np",
]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

_MEAN_C11 = IMAGENET_MEAN[:, None, None]
_STD_C11 = IMAGENET_STD[:, None, None]

VECTOR_FIELDS: dict[str, int] = {"normal": 0}
"""Modalities holding per-pixel vectors in camera axes, and the channel a horizontal flip negates (x)."""


@dataclass(frozen=True)
class CropParams:
    """A crop box in source pixels (integers, as torchvision's RandomResizedCrop) and the flip decision."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def sample_crop_params(rng: np.random.Generator, height: int, width: int, *,
                       scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                       hflip: float = 0.5) -> CropParams:
    """RandomResizedCrop.get_params (10 tries, then a centre crop clamped to `ratio`) plus a flip decision."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            box = (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
            break
    if box is None:
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            h, w = height, int(round(height * ratio[1]))
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    flip = bool(rng.random() < hflip)
    return CropParams(*box, flip=flip)


def eval_crop_params(height: int, width: int) -> CropParams:
    """The largest centred square, unflipped (evaluation)."""
    side = min(height, width)
    return CropParams((height - side) // 2, (width - side) // 2, side, side, flip=False)


def _resize(arr2d: np.ndarray, mode: str | None, size_wh: tuple[int, int], box, resample) -> np.ndarray:
    img = Image.fromarray(arr2d, mode=mode) if mode else Image.fromarray(arr2d)
    return np.asarray(img.resize(size_wh, resample=resample, box=box))


def apply_crop(name: str, arr: np.ndarray, params: CropParams, out_hw: tuple[int, int]) -> np.ndarray:
    """Crop `params`' box of one decoded modality, resize it to `out_hw` at the modality's stride, flip."""
    spec = get_modality(name)
    oh, ow = out_hw[0] // spec.stride_level, out_hw[1] // spec.stride_level
    box = (params.left, params.top, params.left + params.width, params.top + params.height)
    if spec.kind == "image":
        out = _resize(arr, None, (ow, oh), box, Image.BICUBIC)
    elif spec.kind == "dense_classes":
        out = _resize(arr.astype(np.int32, copy=False), "I", (ow, oh), box, Image.NEAREST)
    elif arr.ndim == 2:
        out = _resize(arr.astype(np.float32, copy=False), "F", (ow, oh), box, Image.BICUBIC)
    else:
        # Multi-channel regression (normals): bilinear per channel, so no overshoot past unit length.
        out = np.stack([_resize(np.ascontiguousarray(arr[..., c], dtype=np.float32), "F", (ow, oh), box,
                                Image.BILINEAR) for c in range(arr.shape[-1])], axis=-1)
    if params.flip:
        out = out[:, ::-1]
        if name in VECTOR_FIELDS:
            out = out.copy()
            out[..., VECTOR_FIELDS[name]] *= -1
    return np.ascontiguousarray(out)


def standardize_depth_np(depth: np.ndarray) -> np.ndarray:
    """Per-sample standardisation from the middle 10-90 % of sorted values (unbiased variance, eps 1e-6)."""
    flat = depth.reshape(-1).astype(np.float64)
    n = flat.size
    lo, hi = int(0.1 * n), int(0.9 * n)
    mid = np.partition(flat, [lo, hi - 1])[lo:hi] if hi > lo else flat
    mean = mid.mean()
    var = mid.var(ddof=1) if mid.size > 1 else 0.0
    return ((depth - mean) / math.sqrt(var + 1e-6)).astype(np.float32)


def normalize_modality(name: str, arr: np.ndarray) -> np.ndarray:
    """To the batch convention: float32 [C,H,W] normalised per the registry, or int64 [H,W] for class maps."""
    spec = get_modality(name)
    if spec.kind == "dense_classes":
        return arr.astype(np.int64)
    # One channel-first float32 copy, then in-place element-wise ops: the same float32 operations in the same
    # order as `(x / 255 - mean) / std` on temporaries, without the temporaries and the final layout copy.
    x = np.empty((1, *arr.shape) if arr.ndim == 2 else (arr.shape[2], arr.shape[0], arr.shape[1]), np.float32)
    x[...] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if spec.kind == "image":
        np.divide(x, 255.0, out=x)
    if spec.normalization == "imagenet":
        np.subtract(x, _MEAN_C11, out=x)
        np.divide(x, _STD_C11, out=x)
    elif spec.normalization == "standardize":
        x = standardize_depth_np(x)
    return np.ascontiguousarray(x, dtype=np.float32)


class JointTransform:
    """Crop + flip every modality of a decoded sample identically, then normalise each.

    Args:
        image_size: output side (or (H, W)) of full-resolution modalities; stride-s modalities get size / s.
        train: random crop and flip; otherwise the centred square, resized.
    """

    def __init__(self, image_size: int | tuple[int, int], *, train: bool = True,
                 scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5):
        self.out_hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"data.crop_scale must satisfy 0 < min <= max <= 1, got {scale}")
        self.train, self.scale, self.ratio, self.hflip = train, tuple(scale), tuple(ratio), hflip

    def params(self, rng: np.random.Generator, height: int, width: int) -> CropParams:
        if not self.train:
            return eval_crop_params(height, width)
        return sample_crop_params(rng, height, width, scale=self.scale, ratio=self.ratio, hflip=self.hflip)

    def apply(self, sample: Mapping[str, Any], params: CropParams, *, normalize: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in sample.items():
            if name == "cls":
                out["cls"] = np.int64(value)
                continue
            spec = get_modality(name)
            if self.out_hw[0] % spec.stride_level or self.out_hw[1] % spec.stride_level:
                raise ValueError(f"model.image_size {self.out_hw} is not divisible by the stride level "
                                 f"{spec.stride_level} of '{name}'")
            cropped = apply_crop(name, value, params, self.out_hw)
            out[name] = normalize_modality(name, cropped) if normalize else cropped
        return out

    def __call__(self, sample: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        first = next(np.asarray(v) for k, v in sample.items() if k != "cls")
        return self.apply(sample, self.params(rng, first.shape[0], first.shape[1]))


class SampleProcessor:
    """Decode one raw sample record and transform it: the step the torch loader and the Ray ingest share.

    The augmentation RNG of a sample is seeded by (seed, epoch, sample_id), so a sample's crop does not depend on
    which worker reads it or on what was read before it. With `skip_bad`, bad samples return None and are counted
    in `skipped`; otherwise they raise ShardDataError naming the shard and the key.
    """

    def __init__(self, manifest, modalities, transform: JointTransform, *, with_cls: bool = False, seed: int = 0,
                 skip_bad: bool = False):
        from multimae_core.data.shards import SkipCounter

        self.manifest, self.modalities, self.transform = manifest, tuple(modalities), transform
        self.with_cls, self.seed, self.skip_bad = with_cls, seed, skip_bad
        self.skipped = SkipCounter()

    def __call__(self, key: str, files: Mapping[str, bytes], *, shard: str, sample_id: int,
                 epoch: int) -> dict[str, Any] | None:
        from multimae_core.data.shards import ShardDataError, decode_record

        try:
            sample = decode_record(key, files, self.manifest, self.modalities, shard=shard, with_cls=self.with_cls)
        except ShardDataError as err:
            if not self.skip_bad:
                raise
            self.skipped.add(err)
            return None
        return self.transform(sample, np.random.default_rng([self.seed, epoch, sample_id]))


def collate_numpy(samples: list[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Stack transformed samples key by key: [B, ...] arrays."""
    return {k: np.stack([s[k] for s in samples]) for k in samples[0]}
