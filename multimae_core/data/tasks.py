"""Fine-tuning data: the encoder inputs plus one task target per sample, from the same shard folders.

The inputs go through the pretraining pipeline's joint transform (one random-resized crop and flip per sample,
the same for every modality, then the per-modality normalisation: ImageNet rgb, per-sample standardised depth).
The target of the task is cropped and flipped with the *same* box, under the batch key ``target``:

* cls: the per-image label `cls`, int64 ``[B]``;
* semseg: the `semseg` class map at full input resolution ``[B, H, W]`` int64 (nearest neighbour from the stored
  full-resolution map, not the stride-4 input map), with the original's `reduce_zero_label` option;
* depth: the stored metric depth ``[B, 1, H, W]`` float32 in the shards' unit (nearest neighbour, so no value is a
  blend of a foreground and a background depth); the loss standardises it with fixed statistics.

Train splits use `data.crop_scale` / `data.hflip`; validation takes the centred square. Colour jitter, RandAugment,
mixup and large-scale jitter of the original's recipes are not applied.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from multimae_core.data.loader import ShardDataSource
from multimae_core.data.shards import Manifest
from multimae_core.data.transforms import CropParams, JointTransform, apply_crop, normalize_modality

__all__ = ["TARGET_KEY", "TARGET_SOURCE", "FinetuneDataSource", "TaskTransform", "check_task_labels", "crop_target"]

logger = logging.getLogger(__name__)

TARGET_KEY = "target"
"""Batch key of the task target."""
TARGET_SOURCE = {"cls": "cls", "semseg": "semseg", "depth": "depth"}
"""Task kind -> the shard entry its target is read from."""


def crop_target(arr: np.ndarray, params: CropParams, out_hw: tuple[int, int]) -> np.ndarray:
    """Crop `params`' box of a full-resolution 2-D map, resize it to `out_hw` with nearest neighbour, flip.

    Class maps (integers) stay integers; float maps (depth) stay float32.
    """
    box = (params.left, params.top, params.left + params.width, params.top + params.height)
    if np.issubdtype(arr.dtype, np.integer):
        img = Image.fromarray(arr.astype(np.int32), mode="I")
    else:
        img = Image.fromarray(arr.astype(np.float32), mode="F")
    out = np.asarray(img.resize((out_hw[1], out_hw[0]), resample=Image.NEAREST, box=box))
    if params.flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def check_task_labels(manifest: Manifest, *, kind: str, num_classes: int | None, reduce_zero_label: bool = False,
                      where: str = "data") -> None:
    """Raise a ValueError when a shard folder cannot feed the task: no `cls` labels for cls, or more label classes
    (per its manifest) than ``num_classes``."""
    if kind == "cls":
        if not manifest.has_cls:
            raise ValueError(f"{where}: the shards carry no per-image labels (cls) for finetune.kind cls")
        count, what = len(manifest.class_names or ()), "image classes"
    elif kind == "semseg":
        count = manifest.num_semseg_classes or (len(manifest.semseg_classes) if manifest.semseg_classes else None)
        count = count - 1 if count is not None and reduce_zero_label else count
        what = "semseg classes" + (" (after reduce_zero_label)" if reduce_zero_label else "")
    else:
        return
    if count is not None and num_classes is not None and count > num_classes:
        raise ValueError(f"{where}: the shards have {count} {what} but finetune.num_classes is {num_classes}: "
                         f"labels would fall outside the class range [0, {num_classes - 1}]")


class TaskTransform(JointTransform):
    """`JointTransform` over the encoder inputs plus the task target under ``target`` (see the module docstring).

    Args:
        kind: cls, semseg or depth.
        inputs: encoder input modalities.
        reduce_zero_label: semseg: stored label 0 becomes `ignore_index`, every other label shifts down by one.
    """

    def __init__(self, image_size: int | tuple[int, int], *, kind: str, inputs: Sequence[str], train: bool = True,
                 scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5, reduce_zero_label: bool = False,
                 ignore_index: int = 255) -> None:
        super().__init__(image_size, train=train, scale=scale, hflip=hflip)
        if kind not in TARGET_SOURCE:
            raise ValueError(f"finetune.kind must be one of {sorted(TARGET_SOURCE)}, got {kind!r}")
        self.kind, self.inputs = kind, tuple(inputs)
        self.reduce_zero_label, self.ignore_index = reduce_zero_label, ignore_index

    def apply(self, sample: Mapping[str, Any], params: CropParams, *, normalize: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.inputs:
            cropped = apply_crop(name, sample[name], params, self.out_hw)
            out[name] = normalize_modality(name, cropped) if normalize else cropped
        source = TARGET_SOURCE[self.kind]
        if self.kind == "cls":
            out[TARGET_KEY] = np.int64(sample[source])
        elif self.kind == "semseg":
            labels = crop_target(sample[source], params, self.out_hw).astype(np.int64)
            if self.reduce_zero_label:
                labels = np.where(labels == 0, self.ignore_index, labels - 1)
            out[TARGET_KEY] = labels
        else:
            out[TARGET_KEY] = crop_target(sample[source], params, self.out_hw).astype(np.float32)[None]
        return out


class FinetuneDataSource(ShardDataSource):
    """`ShardDataSource` whose batches hold the encoder inputs and the task target (``target``).

    Checks on construction that the shards hold the inputs and the target, and that their label set fits
    `num_classes`, so a mismatch is one clear error before any training.
    """

    def __init__(self, url: str | Mapping[str, str], *, kind: str, inputs: Sequence[str],
                 num_classes: int | None = None, reduce_zero_label: bool = False, ignore_index: int = 255,
                 **kwargs: Any) -> None:
        if kind not in TARGET_SOURCE:
            raise ValueError(f"finetune.kind must be one of {sorted(TARGET_SOURCE)}, got {kind!r}")
        self.kind, self.inputs = kind, tuple(inputs)
        self.num_classes = num_classes
        self.reduce_zero_label, self.ignore_index = reduce_zero_label, ignore_index
        source = TARGET_SOURCE[kind]
        modalities = list(dict.fromkeys([*inputs, *([source] if source != "cls" else [])]))
        super().__init__(url, modalities=modalities, **kwargs)
        for split in self.urls:
            self._check_labels(split)

    def _check_labels(self, split: str) -> None:
        check_task_labels(self.manifest(split), kind=self.kind, num_classes=self.num_classes,
                          reduce_zero_label=self.reduce_zero_label, where=f"data.{split}_url ({self.urls[split]})")

    @classmethod
    def from_config(cls, cfg, *, rank: int = 0, world_size: int = 1, **kwargs: Any) -> FinetuneDataSource:
        """From a fine-tuning TrainConfig: data.* urls and augmentation, the task, model.image_size, batch, seed."""
        if cfg.finetune is None:
            raise ValueError("finetune: the job has no fine-tuning task")
        ft = cfg.finetune
        opts: dict[str, Any] = dict(
            kind=ft.kind, inputs=list(cfg.modalities.inputs), num_classes=ft.num_classes,
            reduce_zero_label=ft.reduce_zero_label, ignore_index=ft.ignore_index,
            per_worker_batch_size=cfg.train.per_worker_batch_size, image_size=cfg.model.image_size, rank=rank,
            world_size=world_size, seed=cfg.train.seed, num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer, crop_scale=cfg.data.crop_scale, hflip=cfg.data.hflip,
        )
        opts.update(kwargs)
        return cls({"train": cfg.data.train_url, "val": cfg.data.val_url}, **opts)

    def make_transform(self, *, train: bool) -> TaskTransform:
        """Inputs plus the task target, cropped and flipped together."""
        return TaskTransform(self.image_size, kind=self.kind, inputs=self.inputs, train=train, scale=self.crop_scale,
                             hflip=self.hflip, reduce_zero_label=self.reduce_zero_label,
                             ignore_index=self.ignore_index)
