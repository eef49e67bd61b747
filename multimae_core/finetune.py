"""Fine-tuning tasks: what a task is (`FinetuneTask`), how its model is built, and its losses (spec section 7).

Shapes: B batch, C classes, H x W pixels at full input resolution.

- cls: cross-entropy with label smoothing (soft targets, e.g. from mixup, use soft-target cross-entropy).
- semseg: cross-entropy with an ignore index (255), in float32.
- depth: berHu (reverse Huber, Laina et al. 2016, arXiv:1606.00373) with c = 0.2 max|diff| over the valid pixels of
  the batch, or L1; both averaged over valid pixels only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from multimae_core.metrics import check_class_range
from multimae_core.modalities import get_modality

if TYPE_CHECKING:
    from multimae_core.config import ModelConfig
    from multimae_core.model.heads import FinetuneModel

__all__ = [
    "FinetuneTask",
    "berhu_loss",
    "build_finetune_model",
    "check_class_range",
    "classification_loss",
    "depth_l1_loss",
    "segmentation_loss",
    "task_loss",
]

logger = logging.getLogger(__name__)

TaskKind = Literal["cls", "semseg", "depth"]


@dataclass(frozen=True)
class FinetuneTask:
    """One downstream task: its kind, the encoder inputs, the head and the loss settings.

    Defaults are the original's ViT-B settings (spec 7.2-7.4); shrink the head sizes for tiny models.
    """

    kind: TaskKind
    """cls (image classification), semseg (per-pixel classes) or depth (per-pixel regression)."""
    inputs: tuple[str, ...] = ("rgb",)
    """Encoder input modalities, any subset of the registered ones (RGB, depth, RGB-D, ...)."""
    num_classes: int = 0
    """Classes of cls / semseg (required there); depth predicts one channel and ignores it."""
    main_tasks: tuple[str, ...] | None = None
    """Modalities whose tokens the dense heads read (channel-concatenated); None: rgb if it is an input, else the
    first input (the original's configs: rgb, or depth for depth-only)."""
    ignore_index: int = 255
    """semseg label value excluded from the loss and the metrics."""
    label_smoothing: float = 0.1
    """cls label smoothing for integer labels."""
    depth_loss: Literal["berhu", "l1"] = "berhu"
    """Depth loss over valid pixels."""
    berhu_threshold: float = 0.2
    """berHu switches from L1 to L2 at `berhu_threshold * max|diff|`."""
    cls_init_scale: float = 0.001
    """Scale of the classifier's trunc-normal(0.02) init."""
    seg_embed_dim: int = 6144
    """ConvNeXt head: width each token is projected to before it is split into `seg_preds_per_patch` sub-tokens."""
    seg_preds_per_patch: int = 16
    """ConvNeXt head: sub-tokens per token (a square number; 16 -> a 4x4 block, i.e. 1/4 resolution for 16px)."""
    seg_depth: int = 4
    """ConvNeXt head: number of ConvNeXt blocks."""
    dpt_hooks: tuple[int, ...] | None = None
    """DPT head: 1-based encoder layers it taps; None: depth/4, depth/2, 3 depth/4, depth (3, 6, 9, 12 for 12)."""
    dpt_layer_dims: tuple[int, ...] = (96, 192, 384, 768)
    """DPT head: channels of the four reassembled maps."""
    dpt_feature_dim: int = 256
    """DPT head: channels of the fusion path."""

    def __post_init__(self) -> None:
        if self.kind not in ("cls", "semseg", "depth"):
            raise ValueError(f"task.kind must be cls, semseg or depth, got {self.kind!r}")
        if not self.inputs:
            raise ValueError("task.inputs must name at least one input modality")
        for name in self.inputs:
            spec = get_modality(name)
            if spec.input_adapter is None:
                raise ValueError(f"task.inputs: modality '{name}' is output-only and cannot be an input")
        if len(set(self.inputs)) != len(self.inputs):
            raise ValueError(f"task.inputs: duplicate modality in {list(self.inputs)}")
        if self.kind in ("cls", "semseg") and self.num_classes < 1:
            raise ValueError(f"task.num_classes must be >= 1 for {self.kind}, got {self.num_classes}")
        if self.main_tasks is not None:
            outside = [m for m in self.main_tasks if m not in self.inputs]
            if not self.main_tasks or outside:
                raise ValueError(f"task.main_tasks {list(self.main_tasks)} must be a non-empty subset of "
                                 f"task.inputs {list(self.inputs)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"task.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.dpt_hooks is not None and len(self.dpt_hooks) != 4:
            raise ValueError(f"task.dpt_hooks must list 4 encoder layers, got {list(self.dpt_hooks)}")
        if len(self.dpt_layer_dims) != 4:
            raise ValueError(f"task.dpt_layer_dims must list 4 widths, got {list(self.dpt_layer_dims)}")

    @property
    def head_inputs(self) -> tuple[str, ...]:
        """The modalities the dense head reads."""
        if self.main_tasks is not None:
            return self.main_tasks
        return ("rgb",) if "rgb" in self.inputs else (self.inputs[0],)

    @property
    def num_outputs(self) -> int:
        """Output channels of the head."""
        return 1 if self.kind == "depth" else self.num_classes


def build_head(task: FinetuneTask, *, patch_size: int, depth: int) -> torch.nn.Module:
    """An unbound head for the task (bound to the encoder width by `FinetuneModel`)."""
    from multimae_core.model.heads import ConvNeXtSegHead, DPTDepthHead, LinearOutputAdapter, default_dpt_hooks

    if task.kind == "cls":
        return LinearOutputAdapter(task.num_classes, use_mean_pooling=True, init_scale=task.cls_init_scale)
    if task.kind == "semseg":
        return ConvNeXtSegHead(task.num_classes, main_tasks=task.head_inputs, patch_size=patch_size,
                               embed_dim=task.seg_embed_dim, preds_per_patch=task.seg_preds_per_patch,
                               depth=task.seg_depth)
    return DPTDepthHead(1, main_tasks=task.head_inputs, patch_size=patch_size,
                        hooks=task.dpt_hooks or default_dpt_hooks(depth), layer_dims=task.dpt_layer_dims,
                        feature_dim=task.dpt_feature_dim)


def build_finetune_model(task: FinetuneTask, model_cfg: ModelConfig) -> FinetuneModel:
    """A freshly initialised encoder for `task.inputs` (no decoders) plus the task's head."""
    from multimae_core.model.heads import FinetuneModel
    from multimae_core.model.presets import build_model

    backbone = build_model(model_cfg, inputs=list(task.inputs), outputs=[])
    head = build_head(task, patch_size=model_cfg.patch_size, depth=len(backbone.encoder))
    return FinetuneModel.from_multimae(backbone, head, name=task.kind)


def classification_loss(logits_BC: Tensor, target: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy for integer labels `[B]` (with label smoothing) or soft targets `[B, C]` (mixup/cutmix).

    Soft targets already carry their smoothing (timm's Mixup adds it), so `label_smoothing` applies to integer
    labels only.
    """
    logits_BC = logits_BC.float()
    if target.is_floating_point():
        if target.shape != logits_BC.shape:
            raise ValueError(f"soft targets {tuple(target.shape)} do not match logits {tuple(logits_BC.shape)}")
        return torch.sum(-target * F.log_softmax(logits_BC, dim=-1), dim=-1).mean()
    check_class_range(target, logits_BC.shape[1], name="labels")
    return F.cross_entropy(logits_BC, target, label_smoothing=label_smoothing)


def segmentation_loss(logits_BCHW: Tensor, target_BHW: Tensor, *, ignore_index: int = 255) -> Tensor:
    """Per-pixel cross-entropy in float32, averaged over the pixels whose label is not `ignore_index`."""
    if logits_BCHW.shape[-2:] != target_BHW.shape[-2:] or logits_BCHW.shape[0] != target_BHW.shape[0]:
        raise ValueError(f"semseg labels {tuple(target_BHW.shape)} do not match logits {tuple(logits_BCHW.shape)}")
    check_class_range(target_BHW, logits_BCHW.shape[1], ignore_index=ignore_index, name="labels")
    loss = F.cross_entropy(logits_BCHW.float(), target_BHW.long(), ignore_index=ignore_index, reduction="sum")
    # Mean over labelled pixels; a batch with none gives 0 (with a graph) instead of the NaN of reduction="mean".
    num_valid = (target_BHW != ignore_index).sum().clamp(min=1)
    return loss / num_valid


def _valid_pixels(pred: Tensor, target: Tensor, valid: Tensor | None) -> Tensor:
    if target.ndim == pred.ndim - 1:
        raise ValueError(f"depth target {tuple(target.shape)} needs the channel dim of the prediction "
                         f"{tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"depth prediction {tuple(pred.shape)} does not match target {tuple(target.shape)}")
    ok = torch.isfinite(target)
    if valid is not None:
        if valid.shape != target.shape:
            raise ValueError(f"valid mask {tuple(valid.shape)} does not match target {tuple(target.shape)}")
        ok = ok & valid.bool()
    return ok


def berhu_loss(pred: Tensor, target: Tensor, valid: Tensor | None = None, *, threshold: float = 0.2) -> Tensor:
    """Reverse Huber over valid pixels: |d| where |d| <= c, else (d^2 + c^2) / (2c), with c = threshold * max|d|.

    c is taken over the valid pixels of the whole batch and is not differentiated. Returns 0 (with a graph) when no
    pixel is valid.
    """
    ok = _valid_pixels(pred, target, valid)
    diff = (pred.float() - torch.where(ok, target, 0).float()).abs()
    diff = torch.where(ok, diff, torch.zeros_like(diff))
    c = (threshold * diff.detach().max()).clamp(min=1e-12)
    quad = (diff * diff + c * c) / (2 * c)
    per_pixel = torch.where(diff <= c, diff, quad)
    return (per_pixel * ok).sum() / ok.sum().clamp(min=1)


def depth_l1_loss(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean absolute error over valid pixels (finite targets where `valid` is set)."""
    ok = _valid_pixels(pred, target, valid)
    diff = (pred.float() - torch.where(ok, target, 0).float()).abs()
    return (diff * ok).sum() / ok.sum().clamp(min=1)


def task_loss(task: FinetuneTask, pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """The task's loss: `pred` is the model output, `target` labels `[B]` / `[B, C]` (cls), `[B, H, W]` (semseg)
    or depth `[B, 1, H, W]` with an optional valid mask of the same shape."""
    if task.kind == "cls":
        return classification_loss(pred, target, label_smoothing=task.label_smoothing)
    if task.kind == "semseg":
        return segmentation_loss(pred, target, ignore_index=task.ignore_index)
    if task.depth_loss == "berhu":
        return berhu_loss(pred, target, valid, threshold=task.berhu_threshold)
    return depth_l1_loss(pred, target, valid)

