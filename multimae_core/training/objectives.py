"""What `fit` optimises: an `Objective` supplies the model, the losses of one micro-batch, validation and a figure.

The loop (`loop.py`) owns everything the stages share: accumulation, DDP, schedules, layer-wise decay, checkpoints,
resume and reporting. `PretrainObjective` is masked multi-modal reconstruction (masks drawn per micro-batch from a
seeded generator); `multimae_core.training.task_objective.FinetuneObjective` is a downstream task (task loss, task
metrics reduced over workers). `make_objective(cfg)` picks one by `cfg.stage`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from multimae_core.config import TrainConfig
from multimae_core.losses import compute_patch_losses
from multimae_core.masking import sample_masks
from multimae_core.modalities import get_modality
from multimae_core.training import distributed as dist_utils
from multimae_core.training.reporting import MASK_KEY_PREFIX

__all__ = [
    "Objective",
    "PretrainObjective",
    "StepSettings",
    "all_reduce_sum",
    "batch_masks",
    "derive_seed",
    "evaluate",
    "forward_losses",
    "make_objective",
    "to_device",
]

_MASK64 = (1 << 64) - 1
VAL_STREAM = 1 << 40
"""Offset of the mask-seed 'step' used for validation batches (fixed across epochs)."""
FIGURE_STREAM = (1 << 40) + 1
"""Offset of the mask-seed 'step' used for figures."""
FIGURE_SAMPLES = 2


def derive_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 finaliser), so nearby inputs give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (part & _MASK64)) & _MASK64
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
        x ^= x >> 31
    return x & ((1 << 63) - 1)


def to_device(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Every tensor of a batch on ``device`` (non-blocking)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over ranks (identity in one process), on a device the backend can reduce."""
    if dist_utils.get_world_size() <= 1:
        return t
    target = dist_utils.collective_device(t.device)
    out = t.to(target)
    dist_utils.all_reduce_sum(out)
    return out.to(t.device)


class Objective(Protocol):
    """What `fit` needs from a training stage."""

    settings: Any
    """Step settings: ``losses(model, batch, generator, device) -> {name: loss, "total": loss}``, ``grad_clip``,
    ``precision`` and ``autocast(device)``."""
    figure_key: str
    """Image key of the figures."""
    find_unused_parameters: bool
    """Whether DDP must look for parameters without gradients every step."""

    def build_model(self) -> nn.Module:
        """A freshly initialised model (the loop seeds the RNG first, so every rank builds the same one)."""

    def initialise(self, model: nn.Module, *, require_head: bool = False) -> None:
        """Load starting weights into ``model`` (fresh runs only; a resumed run takes its checkpoint instead)."""

    def validate(self, model: nn.Module, batches: Iterator[Mapping[str, Tensor]], *, device: torch.device, seed: int,
                 rank: int = 0, world_size: int = 1) -> dict[str, float]:
        """Metrics over this rank's share of the validation split, reduced over ranks; keys without ``val/``.

        Every rank must call it (it ends with collectives); empty when no rank had a batch.
        """

    def figure(self, model: nn.Module, batch: Mapping[str, Tensor], *, device: torch.device,
               generator: torch.Generator, seed: int) -> np.ndarray | None:
        """A uint8 ``[H, W, 3]`` figure of predictions on a fixed batch (rank 0 only), or None."""


@dataclass(frozen=True)
class StepSettings:
    """What one pretraining step needs from the config (no model or optimizer)."""

    inputs: tuple[str, ...]
    patch_size: int
    num_encoded_tokens: int
    alphas: float | Mapping[str, float] = 1.0
    sample_tasks_uniformly: bool = False
    loss_weights: Mapping[str, float] = field(default_factory=dict)
    loss_on_unmasked: bool = False
    precision: str = "fp32"
    grad_clip: float | None = None

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> StepSettings:
        """Read the masking, loss and numerics sections."""
        return cls(inputs=tuple(cfg.modalities.inputs), patch_size=cfg.model.patch_size,
                   num_encoded_tokens=cfg.masking.num_encoded_tokens, alphas=cfg.masking.alphas,
                   sample_tasks_uniformly=cfg.masking.sample_tasks_uniformly, loss_weights=dict(cfg.loss.weights),
                   loss_on_unmasked=cfg.loss.loss_on_unmasked, precision=cfg.train.precision,
                   grad_clip=cfg.train.grad_clip)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """Autocast context for the forward pass (disabled for fp32)."""
        return autocast(self.precision, device)

    def losses(self, model: nn.Module, batch: Mapping[str, Tensor], generator: torch.Generator | None,
               device: torch.device) -> dict[str, Tensor]:
        """Masks for the micro-batch (drawn from ``generator`` unless the batch carries them), masked forward,
        losses per head and ``total``."""
        masks = batch_masks(batch, self, generator, device)
        return forward_losses(model, batch, masks, self, device, num_visible=self.drawn_visible(batch))[0]

    def drawn_visible(self, batch: Mapping[str, Tensor]) -> int | None:
        """Visible tokens per sample of the masks `batch_masks` gives: known when it draws them, None (to be counted
        and validated) when the batch carries its own ``mask.<m>`` tensors."""
        return None if any(k.startswith(MASK_KEY_PREFIX) for k in batch) else self.num_encoded_tokens


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast context of a ``train.precision`` (disabled for fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _num_tokens(batch: Mapping[str, Tensor], inputs: Sequence[str], patch_size: int) -> dict[str, int]:
    """Tokens per input modality from the tensor sizes (a modality at stride s uses patches of patch_size/s)."""
    out = {}
    for name in inputs:
        p = patch_size // get_modality(name).stride_level
        H, W = batch[name].shape[-2:]
        out[name] = (H // p) * (W // p)
    return out


def batch_masks(batch: Mapping[str, Tensor], settings: StepSettings, generator: torch.Generator | None,
                device: torch.device) -> dict[str, Tensor]:
    """The batch's precomputed ``mask.<m>`` tensors when present, else masks drawn from ``generator``."""
    given = {k[len(MASK_KEY_PREFIX):]: v for k, v in batch.items() if k.startswith(MASK_KEY_PREFIX)}
    if given:
        missing = [m for m in settings.inputs if m not in given]
        if missing:
            raise ValueError(f"batch: precomputed masks lack input modalities {missing}")
        return {m: given[m].to(device) for m in settings.inputs}
    B = batch[settings.inputs[0]].shape[0]
    return sample_masks(_num_tokens(batch, settings.inputs, settings.patch_size), B, settings.num_encoded_tokens,
                        alphas=settings.alphas, sample_tasks_uniformly=settings.sample_tasks_uniformly,
                        generator=generator, device=device)


def forward_losses(model: nn.Module, batch: Mapping[str, Tensor], masks: Mapping[str, Tensor],
                   settings: StepSettings, device: torch.device, *, num_visible: int | None = None,
                   ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Masked forward (under autocast) and fp32 losses; returns (losses, patch predictions ``[B, N, C * p * p]``).

    The model returns patch tokens and the losses patchify the targets (`compute_patch_losses`: the values of
    `compute_losses` on full images, without building them). ``num_visible`` is the masks' visible count when known
    (drawn masks): shapes stay static and nothing waits for the device.
    """
    with settings.autocast(device):
        preds, used = model({m: batch[m] for m in settings.inputs}, masks, num_encoded_tokens=num_visible,
                            patches=True)
    losses = compute_patch_losses(preds, batch, used, weights=settings.loss_weights,
                                  loss_on_unmasked=settings.loss_on_unmasked)
    return losses, preds


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterator[Mapping[str, Tensor]], settings: StepSettings, *,
             device: torch.device, seed: int, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Sample-weighted mean reconstruction losses over ``batches`` (this rank's shard), averaged over ranks.

    Batch i of rank r uses masks seeded by ``(seed, i * world_size + r)``, the same every epoch. Every rank must call
    this (one all-reduce at the end); a rank with no batches contributes nothing.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device)
    names = sorted([*dist_utils.unwrap_model(model).output_adapters, "total"])
    sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in names}
    count = torch.zeros((), dtype=torch.float64, device=device)
    for i, micro in enumerate(batches):
        batch = to_device(micro, device)
        generator.manual_seed(derive_seed(seed, VAL_STREAM, i * world_size + rank))
        masks = batch_masks(batch, settings, generator, device)
        losses, _ = forward_losses(model, batch, masks, settings, device, num_visible=settings.drawn_visible(batch))
        B = batch[settings.inputs[0]].shape[0]
        for k in names:
            sums[k] += losses[k].double() * B
        count += B
    model.train(was_training)
    packed = all_reduce_sum(torch.stack([count, *[sums[k] for k in names]])).tolist()
    if packed[0] == 0:
        return {}
    return {k: v / packed[0] for k, v in zip(names, packed[1:], strict=True)}


class PretrainObjective:
    """Masked multi-modal reconstruction (MultiMAE pretraining): validation reports ``loss/<head>``, the figure is a
    reconstruction of masked inputs."""

    figure_key = "reconstruction"

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.settings = StepSettings.from_config(cfg)
        # Every parameter gets a gradient in the default decoder; without cross-attention or task queries some
        # context parameters may not, and DDP then has to look for them each step.
        self.find_unused_parameters = not (cfg.model.decoder_use_xattn and cfg.model.decoder_use_task_queries)

    def build_model(self) -> nn.Module:
        from multimae_core.model.presets import build_model

        cfg = self.cfg
        return build_model(cfg.model, inputs=cfg.modalities.inputs, outputs=cfg.modalities.outputs)

    def initialise(self, model: nn.Module, *, require_head: bool = False) -> None:
        """Pretraining starts from the builder's init (the config rejects init.checkpoint_url for it)."""

    def validate(self, model: nn.Module, batches: Iterator[Mapping[str, Tensor]], *, device: torch.device, seed: int,
                 rank: int = 0, world_size: int = 1) -> dict[str, float]:
        values = evaluate(model, batches, self.settings, device=device, seed=seed, rank=rank, world_size=world_size)
        return {f"loss/{k}": v for k, v in values.items()}

    @torch.no_grad()
    def figure(self, model: nn.Module, batch: Mapping[str, Tensor], *, device: torch.device,
               generator: torch.Generator, seed: int) -> np.ndarray | None:
        from multimae_core.training.figures import reconstruction_figure

        batch = to_device(batch, device)
        generator.manual_seed(derive_seed(seed, FIGURE_STREAM))
        masks = batch_masks(batch, self.settings, generator, device)
        was_training = model.training
        model.eval()
        try:
            with self.settings.autocast(device):
                preds, used = model({m: batch[m] for m in self.settings.inputs}, masks)
        finally:
            model.train(was_training)
        return reconstruction_figure(batch, preds, used, max_samples=FIGURE_SAMPLES)


def make_objective(cfg: TrainConfig) -> Objective:
    """The objective of ``cfg.stage``."""
    if cfg.stage == "pretrain":
        return PretrainObjective(cfg)
    if cfg.stage == "finetune":
        from multimae_core.training.task_objective import FinetuneObjective

        return FinetuneObjective(cfg)
    raise ValueError(f"stage: no training objective for stage {cfg.stage!r}")
