"""Masked reconstruction losses of MultiMAE pretraining and truncated depth standardisation (spec section 4).

Every loss is taken per pixel, averaged over channels, then per sample over the pixels of the masked patches, then over
the samples that have at least one masked patch (the original's ``nanmean``). The per-sample reduction is done on
per-patch sums instead of an upsampled pixel mask: ``sum(loss * mask_pixels) / sum(mask_pixels)`` equals
``sum(patch_sum * mask_patches) / (num_masked_patches * p * p)``, with no mask upsampling and no host sync.

`compute_patch_losses` is the training path: it takes the decoders' patch predictions (`MultiMAE.forward(...,
patches=True)`, `[B, N, C * p * p]`) and patchifies the targets instead of un-patchifying the predictions; every
loss is then a mean per token, and the values equal `compute_losses` on the images up to float rounding.

Legend: B batch, C channels (classes for logits), H/W pixel rows/columns at the modality's own resolution,
N tokens (patches) per modality, h/w patch grid (h * w = N), p patch side at the modality's resolution,
X = C * p * p values of one patch token.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from multimae_core.modalities import get_modality

__all__ = [
    "compute_losses",
    "compute_patch_losses",
    "masked_cross_entropy_loss",
    "masked_l1_loss",
    "masked_mse_loss",
    "norm_pix_target",
    "patch_side",
    "patchify",
    "standardize_depth",
]

logger = logging.getLogger(__name__)

_DEPTH_TRUNCATION = 0.1
_EPS = 1e-6


def standardize_depth(depth_B1HW: Tensor, *, trunc: float = _DEPTH_TRUNCATION, eps: float = _EPS) -> Tensor:
    """Standardise each sample by the mean and unbiased variance of its 10-90 % truncated values.

    Per sample the values are sorted and the slice ``[int(trunc * n), int((1 - trunc) * n))`` is kept, as the
    original's ``standardize_depth_map`` does; ``(depth - mean) / sqrt(var + eps)`` is returned in the input shape.
    """
    B = depth_B1HW.shape[0]
    flat_BN = depth_B1HW.reshape(B, -1)
    n = flat_BN.shape[1]
    kept = flat_BN.sort(dim=1).values[:, int(trunc * n) : int((1 - trunc) * n)]
    mean_B = kept.mean(dim=1)
    var_B = kept.var(dim=1)  # unbiased, like torch.Tensor.var in the original
    shape = (B,) + (1,) * (depth_B1HW.dim() - 1)
    return (depth_B1HW - mean_B.view(shape)) / torch.sqrt(var_B.view(shape) + eps)


def patch_side(height: int, width: int, num_tokens: int) -> int:
    """Side of the square patches that tile an ``height x width`` map into ``num_tokens`` tokens."""
    p = math.isqrt(height * width // num_tokens) if num_tokens > 0 else 0
    if p < 1 or height % p or width % p or (height // p) * (width // p) != num_tokens:
        raise ValueError(f"a {height}x{width} map cannot be cut into {num_tokens} square patches")
    return p


def norm_pix_target(target_BCHW: Tensor, p: int, *, eps: float = _EPS) -> Tensor:
    """Normalise every ``p x p`` patch (all channels jointly) by its mean and unbiased variance.

    The original patchifies as ``(p1 p2 c)`` and normalises over that last axis; mean and variance do not depend on
    the order of the values, so the statistics are taken over the (C, p, p) axes of a view instead, without a copy.
    """
    B, C, H, W = target_BCHW.shape
    x = target_BCHW.reshape(B, C, H // p, p, W // p, p)
    mean = x.mean(dim=(1, 3, 5), keepdim=True)
    var = x.var(dim=(1, 3, 5), keepdim=True)  # unbiased, as the original
    return ((x - mean) / torch.sqrt(var + eps)).reshape(B, C, H, W)


def _masked_reduce(loss_BHW: Tensor, mask_BN: Tensor | None, p: int) -> Tensor:
    """Mean of ``loss_BHW`` over the masked patches of each sample, then over the samples with any masked patch."""
    if mask_BN is None:
        return loss_BHW.mean()
    B, H, W = loss_BHW.shape
    h, w = H // p, W // p
    patch_sums_BN = loss_BHW.reshape(B, h, p, w, p).sum(dim=(2, 4)).reshape(B, h * w)
    mask_BN = mask_BN.to(device=loss_BHW.device, dtype=loss_BHW.dtype)
    count_B = mask_BN.sum(dim=1)
    # clamp(min=1) turns the original's 0/0 = nan of a sample without masked patches into 0/1; such samples are then
    # left out of the mean below (nanmean semantics) without a nan ever reaching the backward pass.
    per_sample_B = (patch_sums_BN * mask_BN).sum(dim=1) / (count_B.clamp(min=1) * (p * p))
    valid_B = (count_B > 0).to(loss_BHW.dtype)
    # A batch without any masked patch yields 0 (the original returns tensor(0)), still attached to the graph.
    return (per_sample_B * valid_B).sum() / valid_B.sum().clamp(min=1)


def _check_regression(name: str, pred: Tensor, target: Tensor) -> None:
    if pred.dim() != 4 or pred.shape != target.shape:
        raise ValueError(f"loss of '{name}': prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")


def _patch_side_for(name: str, height: int, width: int, mask_BN: Tensor | None, patch_size: int | None) -> int:
    if mask_BN is not None:
        try:
            return patch_side(height, width, mask_BN.shape[1])
        except ValueError as err:
            raise ValueError(f"loss of '{name}': {err}") from None
    return patch_size or 1  # plain mean: the patch side does not matter


def masked_mse_loss(pred_BCHW: Tensor, target_BCHW: Tensor, mask_BN: Tensor | None, *, norm_pix: bool = False,
                    patch_size: int | None = None, name: str = "mse") -> Tensor:
    """MSE over masked patches (``mask_BN`` 1 = masked); ``mask_BN=None`` takes the plain mean over all pixels.

    Args:
        norm_pix: Compare against the per-patch normalised target (the norm_rgb head). Needs the patch side, taken
            from the mask or, without a mask, from ``patch_size`` (pixels at this modality's resolution).
    """
    _check_regression(name, pred_BCHW, target_BCHW)
    H, W = pred_BCHW.shape[-2:]
    p = _patch_side_for(name, H, W, mask_BN, patch_size)
    target = target_BCHW.float()
    if norm_pix:
        if mask_BN is None and patch_size is None:
            raise ValueError(f"loss of '{name}': norm-pix without a mask needs patch_size")
        target = norm_pix_target(target, p)
    loss_BHW = F.mse_loss(pred_BCHW.float(), target, reduction="none").mean(dim=1)
    return _masked_reduce(loss_BHW, mask_BN, p)


def masked_l1_loss(pred_BCHW: Tensor, target_BCHW: Tensor, mask_BN: Tensor | None, *, name: str = "l1") -> Tensor:
    """L1 over masked patches (``mask_BN`` 1 = masked); ``mask_BN=None`` takes the plain mean over all pixels."""
    _check_regression(name, pred_BCHW, target_BCHW)
    H, W = pred_BCHW.shape[-2:]
    p = _patch_side_for(name, H, W, mask_BN, None)
    loss_BHW = F.l1_loss(pred_BCHW.float(), target_BCHW.float(), reduction="none").mean(dim=1)
    return _masked_reduce(loss_BHW, mask_BN, p)


def masked_cross_entropy_loss(logits_BCHW: Tensor, labels_BHW: Tensor, mask_BN: Tensor | None, *,
                              name: str = "ce") -> Tensor:
    """Per-pixel cross-entropy in fp32 over masked patches, at the modality's own resolution (semseg: 1/4).

    Like the original: no label smoothing and PyTorch's default ignore index -100 (ignored pixels count as 0 but stay
    in the per-sample denominator).
    """
    if logits_BCHW.dim() != 4 or labels_BHW.shape != (logits_BCHW.shape[0], *logits_BCHW.shape[2:]):
        raise ValueError(
            f"loss of '{name}': logits {tuple(logits_BCHW.shape)} do not match labels {tuple(labels_BHW.shape)}"
        )
    H, W = logits_BCHW.shape[-2:]
    p = _patch_side_for(name, H, W, mask_BN, None)
    loss_BHW = F.cross_entropy(logits_BCHW.float(), labels_BHW.long(), reduction="none")
    return _masked_reduce(loss_BHW, mask_BN, p)


def _head_loss(name: str, pred: Tensor, target: Tensor, mask_BN: Tensor | None) -> Tensor:
    kind = get_modality(name).loss
    if kind == "mse":
        return masked_mse_loss(pred, target, mask_BN, name=name)
    if kind == "norm_pix_mse":
        return masked_mse_loss(pred, target, mask_BN, norm_pix=True, name=name)
    if kind == "l1":
        return masked_l1_loss(pred, target, mask_BN, name=name)
    if kind == "ce":
        return masked_cross_entropy_loss(pred, target, mask_BN, name=name)
    raise ValueError(f"loss of '{name}': unknown loss kind {kind!r}")


def compute_losses(preds: Mapping[str, Tensor], targets: Mapping[str, Tensor],
                   masks: Mapping[str, Tensor] | None, *, weights: Mapping[str, float] | None = None,
                   loss_on_unmasked: bool = False) -> dict[str, Tensor]:
    """Loss of every prediction head plus their weighted sum under ``"total"`` (fp32 scalars).

    Args:
        preds: Head name -> prediction (``[B, C, H/s, W/s]``; logits for dense_classes heads).
        targets: The input batch; a head whose ModalitySpec has ``target`` reads that modality's tensor and mask.
        masks: Modality -> ``[B, N]`` token mask, 1 = masked (the loss is taken there). Unused, and may be None,
            with ``loss_on_unmasked``.
        weights: Per-head weight of the total; missing heads weigh 1.0 (the original's plain sum).
        loss_on_unmasked: Plain mean over all pixels instead of the masked patches only.

    Note: norm_pix with ``loss_on_unmasked`` needs the patch grid, which is then taken from ``masks`` when given.
    """
    losses: dict[str, Tensor] = {}
    for name, pred in preds.items():
        target, mask_BN = _target_and_mask(name, targets, masks, loss_on_unmasked)
        if loss_on_unmasked:
            losses[name] = _unmasked_loss(name, pred, target, mask_BN)
        else:
            losses[name] = _head_loss(name, pred, target, mask_BN)
    return _with_total(losses, weights, "compute_losses")


def _target_and_mask(name: str, targets: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None,
                     loss_on_unmasked: bool) -> tuple[Tensor, Tensor | None]:
    """The target tensor of head `name` and its token mask (None only when masks are not needed)."""
    source = get_modality(name).target_name
    if source not in targets:
        raise ValueError(f"loss of '{name}': the batch has no '{source}' tensor (keys: {sorted(targets)})")
    mask_BN = None if masks is None else masks.get(source)
    if mask_BN is None and not loss_on_unmasked:
        raise ValueError(f"loss of '{name}': no mask for '{source}' (masks: {sorted(masks or {})})")
    return targets[source], mask_BN


def _with_total(losses: dict[str, Tensor], weights: Mapping[str, float] | None, caller: str) -> dict[str, Tensor]:
    """Add ``total``: the weighted sum of the heads' losses (missing weights are 1.0)."""
    if not losses:
        raise ValueError(f"{caller}: no predictions given")
    weights = weights or {}
    losses["total"] = sum(weights.get(name, 1.0) * loss for name, loss in losses.items())  # type: ignore[assignment]
    return losses


def _unmasked_loss(name: str, pred: Tensor, target: Tensor, mask_BN: Tensor | None) -> Tensor:
    if get_modality(name).loss == "norm_pix_mse":
        if mask_BN is None:
            raise ValueError(f"loss of '{name}': norm-pix needs the patch grid; pass the masks")
        p = patch_side(pred.shape[-2], pred.shape[-1], mask_BN.shape[1])
        return masked_mse_loss(pred, target, None, norm_pix=True, patch_size=p, name=name)
    return _head_loss(name, pred, target, None)


def patchify(x: Tensor, p: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, N, C * p * p]`` (or class ids ``[B, H, W]`` -> ``[B, N, p * p]``).

    Tokens in row-major patch order, each token vector in (c, ph, pw) order: the layout of the decoders' patch
    predictions (`SpatialOutputAdapter.unpatchify` is the inverse).
    """
    x_BCHW = x.unsqueeze(1) if x.dim() == 3 else x
    B, C, H, W = x_BCHW.shape
    h, w = H // p, W // p
    return x_BCHW.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)


def _masked_token_mean(loss_BN: Tensor, mask_BN: Tensor | None) -> Tensor:
    """`_masked_reduce` on per-token means: mean over each sample's masked tokens, then over samples with any."""
    if mask_BN is None:
        return loss_BN.mean()
    mask_BN = mask_BN.to(device=loss_BN.device, dtype=loss_BN.dtype)
    count_B = mask_BN.sum(dim=1)
    per_sample_B = (loss_BN * mask_BN).sum(dim=1) / count_B.clamp(min=1)
    valid_B = (count_B > 0).to(loss_BN.dtype)
    return (per_sample_B * valid_B).sum() / valid_B.sum().clamp(min=1)


def _patch_side_of(name: str, pred_BNX: Tensor, target: Tensor, channels: int | None) -> int:
    """Patch side p of a head from its prediction tokens and target map (``channels`` None: any class count)."""
    if pred_BNX.dim() != 3:
        raise ValueError(f"loss of '{name}': patch predictions must be [B, N, C*p*p], got {tuple(pred_BNX.shape)}")
    B, N, X = pred_BNX.shape
    H, W = target.shape[-2:]
    try:
        p = patch_side(H, W, N)
    except ValueError as err:
        raise ValueError(f"loss of '{name}': {err}") from None
    expected = X if channels is None else channels * p * p
    if target.shape[0] != B or X != expected or X % (p * p):
        raise ValueError(f"loss of '{name}': patch predictions {tuple(pred_BNX.shape)} do not match the target "
                         f"{tuple(target.shape)} ({p}x{p} patches)")
    return p


def _patch_head_loss(name: str, pred_BNX: Tensor, target: Tensor, mask_BN: Tensor | None) -> Tensor:
    kind = get_modality(name).loss
    if kind == "ce":
        if target.dim() != 3:
            raise ValueError(f"loss of '{name}': labels must be [B, H, W], got {tuple(target.shape)}")
        p = _patch_side_of(name, pred_BNX, target, None)
        B, N, X = pred_BNX.shape
        # [B*N, classes, p*p] logits (the token's (c, ph, pw) order) against [B*N, p*p] labels.
        logits = pred_BNX.float().reshape(B * N, X // (p * p), p * p)
        labels = patchify(target, p).reshape(B * N, p * p).long()
        loss_BN = F.cross_entropy(logits, labels, reduction="none").reshape(B, N, p * p).mean(dim=2)
        return _masked_token_mean(loss_BN, mask_BN)
    if target.dim() != 4:
        raise ValueError(f"loss of '{name}': target must be [B, C, H, W], got {tuple(target.shape)}")
    p = _patch_side_of(name, pred_BNX, target, target.shape[1])
    target_BNX = patchify(target.float(), p)
    if kind == "norm_pix_mse":
        # Statistics over all C * p * p values of a patch, as `norm_pix_target`.
        mean = target_BNX.mean(dim=-1, keepdim=True)
        var = target_BNX.var(dim=-1, keepdim=True)  # unbiased, as the original
        target_BNX = (target_BNX - mean) / torch.sqrt(var + _EPS)
    if kind in ("mse", "norm_pix_mse"):
        loss_BN = F.mse_loss(pred_BNX.float(), target_BNX, reduction="none").mean(dim=-1)
    elif kind == "l1":
        loss_BN = F.l1_loss(pred_BNX.float(), target_BNX, reduction="none").mean(dim=-1)
    else:
        raise ValueError(f"loss of '{name}': unknown loss kind {kind!r}")
    return _masked_token_mean(loss_BN, mask_BN)


def compute_patch_losses(preds: Mapping[str, Tensor], targets: Mapping[str, Tensor],
                         masks: Mapping[str, Tensor] | None, *, weights: Mapping[str, float] | None = None,
                         loss_on_unmasked: bool = False) -> dict[str, Tensor]:
    """`compute_losses` on patch predictions ``[B, N, C * p * p]`` (tokens in (c, ph, pw) order), same values.

    A patch token holds all ``C * p * p`` values of one patch, so a per-pixel loss averaged over channels and then
    over a sample's masked pixels is the mean over its masked tokens of each token's mean; the cross-entropy is
    taken per pixel over the class axis of the token. Targets are patchified (cheap, no gradient) instead of
    un-patchifying the predictions. Arguments as `compute_losses`.
    """
    losses: dict[str, Tensor] = {}
    for name, pred in preds.items():
        target, mask_BN = _target_and_mask(name, targets, masks, loss_on_unmasked)
        losses[name] = _patch_head_loss(name, pred, target, None if loss_on_unmasked else mask_BN)
    return _with_total(losses, weights, "compute_patch_losses")
