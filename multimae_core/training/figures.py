"""Reconstruction figures for the tracker: a uint8 image grid built with numpy only (no matplotlib).

One row per (sample, output head): masked input | prediction | target, each at full image resolution. Masked patches
are drawn mid-grey; class maps use a fixed palette; regression maps are scaled by the target's 1-99 % range.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from multimae_core.losses import patch_side
from multimae_core.modalities import get_modality

__all__ = ["class_palette", "reconstruction_figure"]

_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_GAP = 2
_MASK_GREY = 128


def class_palette(num_classes: int) -> np.ndarray:
    """Fixed colours ``[num_classes, 3]`` uint8 (seeded, so every figure of every run agrees)."""
    return np.random.default_rng(0).integers(0, 256, size=(num_classes, 3), dtype=np.uint8)


def _scale01(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(ref, [1, 99])
    return np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def _to_uint8(name: str, x_CHW: np.ndarray, ref_CHW: np.ndarray) -> np.ndarray:
    """Display a tensor of modality ``name`` (float [C,H,W] or int class map [H,W]) as uint8 [H, W, 3]."""
    spec = get_modality(name)
    if spec.kind == "dense_classes":
        return class_palette(spec.num_channels)[np.clip(x_CHW, 0, spec.num_channels - 1)]
    if spec.normalization == "imagenet" and x_CHW.shape[0] == 3:
        img = x_CHW.transpose(1, 2, 0) * _IMAGENET_STD + _IMAGENET_MEAN
        return (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8)
    img = _scale01(x_CHW, ref_CHW)
    img = np.repeat(img, 3, axis=0) if img.shape[0] == 1 else img[:3]
    return (img.transpose(1, 2, 0) * 255).round().astype(np.uint8)


def _upsample(img_HW3: np.ndarray, factor: int) -> np.ndarray:
    return img_HW3 if factor == 1 else img_HW3.repeat(factor, axis=0).repeat(factor, axis=1)


def _panels(head: str, batch: Mapping[str, Tensor], preds: Mapping[str, Tensor], masks: Mapping[str, Tensor],
            b: int) -> list[np.ndarray]:
    spec = get_modality(head)
    source = spec.target_name
    target = batch[source][b : b + 1].detach().float().cpu() if spec.kind != "dense_classes" else None
    pred = preds[head][b : b + 1].detach().float().cpu()
    mask_N = masks[source][b].detach().cpu().numpy()
    if spec.kind == "dense_classes":
        target_np = batch[source][b].detach().cpu().numpy()
        pred_np = pred[0].argmax(dim=0).numpy()
    else:
        assert target is not None
        if spec.loss == "norm_pix_mse":
            # Undo the per-patch normalisation with the target's patch statistics to show an ordinary image.
            pred = _denorm_pix(pred, target, patch_side(pred.shape[-2], pred.shape[-1], mask_N.shape[0]))
        target_np, pred_np = target[0].numpy(), pred[0].numpy()
    target_img = _to_uint8(source, target_np, target_np)
    pred_img = _to_uint8(source, pred_np, target_np)
    stride = get_modality(source).stride_level
    target_img, pred_img = _upsample(target_img, stride), _upsample(pred_img, stride)
    masked_img = target_img.copy()
    H, W = masked_img.shape[:2]
    p_full = patch_side(H, W, mask_N.shape[0])
    grid = mask_N.reshape(H // p_full, W // p_full).astype(bool)
    masked_img[_upsample(grid[..., None], p_full)[..., 0]] = _MASK_GREY
    return [masked_img, pred_img, target_img]


def _denorm_pix(pred_BCHW: Tensor, target_BCHW: Tensor, p: int, eps: float = 1e-6) -> Tensor:
    B, C, H, W = target_BCHW.shape
    t = target_BCHW.reshape(B, C, H // p, p, W // p, p)
    mean = t.mean(dim=(1, 3, 5), keepdim=True)
    std = torch.sqrt(t.var(dim=(1, 3, 5), keepdim=True) + eps)
    return (pred_BCHW.reshape(t.shape) * std + mean).reshape(B, C, H, W)


def _hstack(images: list[np.ndarray]) -> np.ndarray:
    H = max(i.shape[0] for i in images)
    gap = np.full((H, _GAP, 3), 255, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for i, img in enumerate(images):
        if i:
            parts.append(gap)
        pad = np.full((H - img.shape[0], img.shape[1], 3), 255, dtype=np.uint8)
        parts.append(np.concatenate([img, pad], axis=0))
    return np.concatenate(parts, axis=1)


def _vstack(rows: list[np.ndarray]) -> np.ndarray:
    W = max(r.shape[1] for r in rows)
    parts: list[np.ndarray] = []
    for i, row in enumerate(rows):
        if i:
            parts.append(np.full((_GAP, W, 3), 255, dtype=np.uint8))
        parts.append(np.concatenate([row, np.full((row.shape[0], W - row.shape[1], 3), 255, np.uint8)], axis=1))
    return np.concatenate(parts, axis=0)


def reconstruction_figure(batch: Mapping[str, Tensor], preds: Mapping[str, Tensor], masks: Mapping[str, Tensor],
                          *, max_samples: int = 2) -> np.ndarray:
    """Grid ``[H, W, 3]`` uint8: per sample and output head, masked input | prediction | target."""
    num = min(max_samples, next(iter(preds.values())).shape[0])
    rows = [_hstack(_panels(head, batch, preds, masks, b)) for b in range(num) for head in preds]
    return _vstack(rows)
