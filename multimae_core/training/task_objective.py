"""The fine-tuning objective: a task head on the unmasked encoder, its loss, and its metrics (spec section 7).

Batches hold the encoder inputs and the task target under ``target`` (`multimae_core.data.tasks`). Losses:
cross-entropy with label smoothing (cls), cross-entropy with an ignore index (semseg), berHu or L1 on standardised
depth (depth: the head predicts ``(d - finetune.depth_mean) / finetune.depth_std``; pixels that are not finite, <= 0
or >= ``finetune.depth_max`` are invalid). Validation accumulates the task metrics as sums over the whole split and
reduces them over workers (`multimae_core.metrics`): top-1/top-5; mIoU, pixel and mean accuracy; delta1/2/3, RMSE and
AbsRel on depth de-normalised to the shards' unit. Shapes: B batch, C classes, H x W pixels.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from multimae_core.config import TrainConfig
from multimae_core.finetune import FinetuneTask, build_finetune_model, task_loss
from multimae_core.metrics import ConfusionMatrix, DepthMetrics, TopKAccuracy
from multimae_core.training.objectives import FIGURE_SAMPLES, all_reduce_sum, autocast, to_device

__all__ = ["TARGET_KEY", "FinetuneObjective", "TaskStepSettings", "prediction_figure", "task_from_config"]

logger = logging.getLogger(__name__)

TARGET_KEY = "target"
"""Batch key of the task target (the same as `multimae_core.data.tasks.TARGET_KEY`)."""
_GAP = 2


def task_from_config(cfg: TrainConfig) -> FinetuneTask:
    """The `FinetuneTask` of a fine-tuning config (inputs from modalities.inputs, the rest from finetune.*)."""
    ft = cfg.finetune
    if ft is None:
        raise ValueError("finetune: the job has no fine-tuning task")
    return FinetuneTask(
        kind=ft.kind, inputs=tuple(cfg.modalities.inputs), num_classes=ft.num_classes or 0,
        main_tasks=tuple(ft.main_tasks) if ft.main_tasks is not None else None, ignore_index=ft.ignore_index,
        label_smoothing=ft.label_smoothing, depth_loss=ft.depth_loss, berhu_threshold=ft.berhu_threshold,
        cls_init_scale=ft.cls_init_scale, seg_embed_dim=ft.seg_embed_dim, seg_preds_per_patch=ft.seg_preds_per_patch,
        seg_depth=ft.seg_depth, dpt_hooks=tuple(ft.dpt_hooks) if ft.dpt_hooks is not None else None,
        dpt_layer_dims=tuple(ft.dpt_layer_dims), dpt_feature_dim=ft.dpt_feature_dim,
    )


@dataclass(frozen=True)
class TaskStepSettings:
    """What one fine-tuning step needs: the task, the depth standardisation and the numerics."""

    task: FinetuneTask
    depth_mean: float = 0.0
    depth_std: float = 1.0
    depth_max: float | None = None
    precision: str = "fp32"
    grad_clip: float | None = None

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> TaskStepSettings:
        ft = cfg.finetune
        assert ft is not None  # the config requires it for stage finetune
        return cls(task=task_from_config(cfg), depth_mean=ft.depth_mean, depth_std=ft.depth_std,
                   depth_max=ft.depth_max, precision=cfg.train.precision, grad_clip=cfg.train.grad_clip)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        return autocast(self.precision, device)

    def depth_valid(self, depth: Tensor) -> Tensor:
        """Valid depth pixels: finite, > 0 and below ``depth_max``."""
        ok = torch.isfinite(depth) & (depth > 0)
        return ok & (depth < self.depth_max) if self.depth_max is not None else ok

    def to_metric_depth(self, pred: Tensor) -> Tensor:
        """Head output (standardised) -> depth in the shards' unit."""
        return pred.float() * self.depth_std + self.depth_mean

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """The task loss of predictions against the batch's ``target`` (float32)."""
        if self.task.kind != "depth":
            return task_loss(self.task, pred.float(), target)
        valid = self.depth_valid(target)
        standard = (torch.where(valid, target, self.depth_mean) - self.depth_mean) / self.depth_std
        return task_loss(self.task, pred.float(), standard, valid)

    def losses(self, model: nn.Module, batch: Mapping[str, Tensor], generator: torch.Generator | None,
               device: torch.device) -> dict[str, Tensor]:
        """Forward under autocast and the task loss, as ``{<kind>: loss, "total": loss}`` (no masks: the generator
        is unused)."""
        if TARGET_KEY not in batch:
            raise ValueError(f"batch: no '{TARGET_KEY}' entry; fine-tuning batches come from a FinetuneDataSource")
        with self.autocast(device):
            pred = model(batch)
        loss = self.loss(pred, batch[TARGET_KEY])
        return {self.task.kind: loss, "total": loss}


class FinetuneObjective:
    """A downstream task: the model is the unmasked encoder plus the task head, started from ``init``."""

    figure_key = "predictions"
    find_unused_parameters = False  # every head parameter and every encoder input gets a gradient

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.settings = TaskStepSettings.from_config(cfg)
        self.task = self.settings.task

    def build_model(self) -> nn.Module:
        return build_finetune_model(self.task, self.cfg.model)

    def initialise(self, model: nn.Module, *, require_head: bool = False) -> None:
        """Load ``init.checkpoint_url`` (if any): encoder, input adapters and, when present, the head."""
        from multimae_core.model.pretrained import initialise_finetune_model, read_init_weights

        init = self.cfg.init
        if init.checkpoint_url is None:
            if require_head:
                raise ValueError("init.checkpoint_url: evaluation needs the weights of a fine-tuned model")
            logger.info("fine-tuning from random init (init.checkpoint_url is null)")
            return
        state = read_init_weights(init.checkpoint_url, init.format)
        allow_new = init.allow_new_inputs or init.format in ("original-timm", "timm-vit")
        report = initialise_finetune_model(model, state, allow_new_inputs=allow_new, require_head=require_head,
                                           source=init.checkpoint_url)
        logger.info("initialised from %s (%s): %d tensors loaded, %d position tables resized%s",
                    init.checkpoint_url, init.format, len(report.encoder.loaded), len(report.encoder.resized),
                    ", the head included" if report.head_loaded else "; the head starts from its init")

    def _metrics(self, device: torch.device) -> TopKAccuracy | ConfusionMatrix | DepthMetrics:
        if self.task.kind == "cls":
            return TopKAccuracy(topk=(1, 5), device=device)
        if self.task.kind == "semseg":
            return ConfusionMatrix(self.task.num_classes, ignore_index=self.task.ignore_index, device=device)
        return DepthMetrics(device=device)

    @torch.no_grad()
    def validate(self, model: nn.Module, batches: Iterator[Mapping[str, Tensor]], *, device: torch.device, seed: int,
                 rank: int = 0, world_size: int = 1) -> dict[str, float]:
        """Sample-weighted mean loss (``loss/<kind>``, ``loss/total``) and the task metrics over the whole split."""
        was_training = model.training
        model.eval()
        metric = self._metrics(device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.float64, device=device)
        settings = self.settings
        try:
            for micro in batches:
                batch = to_device(micro, device)
                with settings.autocast(device):
                    pred = model(batch)
                target = batch[TARGET_KEY]
                B = target.shape[0]
                loss_sum += settings.loss(pred, target).double() * B
                count += B
                if isinstance(metric, DepthMetrics):
                    metric.update(settings.to_metric_depth(pred), target, settings.depth_valid(target))
                else:
                    metric.update(pred.float(), target)
        finally:
            model.train(was_training)
        packed = all_reduce_sum(torch.stack([count, loss_sum])).tolist()
        metric.reduce_()
        if packed[0] == 0:
            return {}
        loss = packed[1] / packed[0]
        return {f"loss/{self.task.kind}": loss, "loss/total": loss, **metric.compute()}

    @torch.no_grad()
    def figure(self, model: nn.Module, batch: Mapping[str, Tensor], *, device: torch.device,
               generator: torch.Generator, seed: int) -> np.ndarray | None:
        batch = to_device(batch, device)
        was_training = model.training
        model.eval()
        try:
            with self.settings.autocast(device):
                pred = model(batch)
        finally:
            model.train(was_training)
        return prediction_figure(batch, pred.float(), self.settings, max_samples=FIGURE_SAMPLES)


def _input_image(batch: Mapping[str, Tensor], inputs: tuple[str, ...], b: int) -> np.ndarray:
    """The first input modality of sample ``b`` as uint8 [H, W, 3] (rgb un-normalised, others scaled 1-99 %)."""
    from multimae_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    name = "rgb" if "rgb" in inputs else inputs[0]
    x = batch[name][b].detach().float().cpu().numpy()
    if name == "rgb":
        img = x.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
        return (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8)
    if x.ndim == 2:  # a class map input
        from multimae_core.training.figures import class_palette

        return class_palette(int(x.max()) + 1)[x.astype(np.int64)]
    return _gray(x[0], x[0][np.isfinite(x[0])])


def _gray(x: np.ndarray, ref: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    lo, hi = np.percentile(ref, [1, 99]) if ref.size else (0.0, 1.0)
    img = (np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0) * 255).round().astype(np.uint8)
    if valid is not None:
        img = np.where(valid, img, 0)
    return np.repeat(img[..., None], 3, axis=-1)


def _panels(batch: Mapping[str, Tensor], pred: Tensor, settings: TaskStepSettings, b: int) -> list[np.ndarray]:
    from multimae_core.training.figures import class_palette

    task = settings.task
    image = _input_image(batch, task.inputs, b)
    H, W = image.shape[:2]
    target = batch[TARGET_KEY][b].detach().cpu()
    if task.kind == "cls":
        palette = class_palette(task.num_classes)
        # Colour swatches: predicted class | true class (the same colour when right).
        swatch = [np.broadcast_to(palette[int(c)], (H, W // 2, 3)).copy()
                  for c in (int(pred[b].argmax()), int(target))]
        return [image, *swatch]
    if task.kind == "semseg":
        palette = np.concatenate([class_palette(task.num_classes), np.zeros((1, 3), np.uint8)])
        labels = target.numpy().astype(np.int64)
        labels = np.where((labels >= 0) & (labels < task.num_classes), labels, task.num_classes)  # ignored: black
        return [image, palette[pred[b, : task.num_classes].argmax(0).cpu().numpy()], palette[labels]]
    depth_t = target[0].float().numpy()
    valid = settings.depth_valid(target[0]).numpy()
    depth_p = settings.to_metric_depth(pred[b, 0]).cpu().numpy()
    ref = depth_t[valid]
    return [image, _gray(depth_p, ref), _gray(depth_t, ref, valid)]


def _row(images: list[np.ndarray]) -> np.ndarray:
    H = max(i.shape[0] for i in images)
    parts: list[np.ndarray] = []
    for i, img in enumerate(images):
        if i:
            parts.append(np.full((H, _GAP, 3), 255, np.uint8))
        parts.append(np.concatenate([img, np.full((H - img.shape[0], img.shape[1], 3), 255, np.uint8)], axis=0))
    return np.concatenate(parts, axis=1)


def prediction_figure(batch: Mapping[str, Tensor], pred: Tensor, settings: TaskStepSettings, *,
                      max_samples: int = 2) -> np.ndarray:
    """Grid ``[H, W, 3]`` uint8, one row per sample: input | prediction | target (cls: colour swatches of the
    predicted and the true class; semseg: class colours, ignored pixels black; depth: grey levels over the target's
    1-99 % range, invalid pixels black)."""
    rows = [_row(_panels(batch, pred, settings, b)) for b in range(min(max_samples, pred.shape[0]))]
    W = max(r.shape[1] for r in rows)
    parts: list[np.ndarray] = []
    for i, row in enumerate(rows):
        if i:
            parts.append(np.full((_GAP, W, 3), 255, np.uint8))
        parts.append(np.concatenate([row, np.full((row.shape[0], W - row.shape[1], 3), 255, np.uint8)], axis=1))
    return np.concatenate(parts, axis=0)
