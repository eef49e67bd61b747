"""The training loop: `train_step` (one optimizer step over micro-batches), `evaluate` and `fit`.

`fit` runs unchanged in one process, under torchrun and inside Ray Train workers; it talks to the outside only
through a `Reporter` and reads batches from a `DataSource` (see `reporting.py`).

Optimisation does not depend on the worker count: every optimizer step consumes ``train.global_batch_size`` samples
as ``accum = global / (per_worker * world_size)`` micro-batches per rank, each loss scaled by ``1 / accum`` (DDP then
averages over ranks), so the gradient is the mean over all micro-batches. Token masks are drawn at the top of each
micro-step from a generator seeded by ``(seed, step, global micro-batch index)``, where rank ``r``'s micro-batch
``i`` has index ``r * accum + i``: the same masks whichever way the micro-batches are spread over ranks, and nothing to
restore on resume.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from multimae_core.config import TrainConfig
from multimae_core.losses import compute_losses
from multimae_core.masking import sample_masks
from multimae_core.modalities import get_modality
from multimae_core.training import distributed as dist_utils
from multimae_core.training.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from multimae_core.training.optim import build_optimizer, lr_at, peak_lr, set_lr
from multimae_core.training.reporting import MASK_KEY_PREFIX, DataSource, Reporter

__all__ = ["FitResult", "StepOutput", "StepSettings", "TrainStep", "build_step", "evaluate", "fit", "train_step"]

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
_VAL_STREAM = 1 << 40
"""Offset of the mask-seed 'step' used for validation batches (fixed across epochs)."""
_FIGURE_STREAM = (1 << 40) + 1
"""Offset of the mask-seed 'step' used for the reconstruction figure."""
_FIGURE_SAMPLES = 2


def derive_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 finaliser), so nearby inputs give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (part & _MASK64)) & _MASK64
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
        x ^= x >> 31
    return x & ((1 << 63) - 1)


@dataclass(frozen=True)
class StepSettings:
    """What one training step needs from the config (no model or optimizer)."""

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
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@dataclass
class StepOutput:
    """Result of one optimizer step on this rank (tensors stay on the device; no host sync)."""

    losses: dict[str, Tensor]
    """Per-head and total loss, mean over this rank's micro-batches, detached."""
    grad_norm: Tensor
    """Global gradient norm before clipping (unscaled under fp16)."""


def _to_device(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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
                   settings: StepSettings, device: torch.device) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Masked forward (under autocast) and fp32 losses; returns (losses, predictions)."""
    with settings.autocast(device):
        preds, used = model({m: batch[m] for m in settings.inputs}, masks)
    losses = compute_losses(preds, batch, used, weights=settings.loss_weights,
                            loss_on_unmasked=settings.loss_on_unmasked)
    return losses, preds


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[Mapping[str, Tensor]],
               settings: StepSettings, *, device: torch.device, scaler: torch.amp.GradScaler | None = None,
               mask_generator: torch.Generator | None = None, mask_seeds: Sequence[int] | None = None,
               ) -> StepOutput:
    """Forward, loss, backward over the micro-batches, then one (clipped, scaled) optimizer step.

    Args:
        model: The model, DDP-wrapped when distributed (gradients sync on the last micro-batch only).
        micro_batches: This rank's share of one global batch; each loss is scaled by ``1 / len(micro_batches)``.
        mask_generator: Generator on ``device`` for masks; re-seeded with ``mask_seeds[i]`` before micro-batch i
            when seeds are given. Batches carrying ``mask.<m>`` tensors use those instead.
    """
    n = len(micro_batches)
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, Tensor] = {}
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    for i, micro in enumerate(micro_batches):
        batch = _to_device(micro, device)
        if mask_generator is not None and mask_seeds is not None:
            mask_generator.manual_seed(mask_seeds[i])
        masks = batch_masks(batch, settings, mask_generator, device)
        sync = model.no_sync() if is_ddp and i < n - 1 else contextlib.nullcontext()
        with sync:
            losses, _ = forward_losses(model, batch, masks, settings, device)
            loss = losses["total"] / n
            (scaler.scale(loss) if scaler is not None else loss).backward()
        for k, v in losses.items():
            sums[k] = sums[k] + v.detach() / n if k in sums else v.detach() / n
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if settings.grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return StepOutput(losses=sums, grad_norm=grad_norm.detach())


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterator[Mapping[str, Tensor]], settings: StepSettings, *,
             device: torch.device, seed: int, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Sample-weighted mean losses over ``batches`` (this rank's shard), averaged over ranks.

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
        batch = _to_device(micro, device)
        generator.manual_seed(derive_seed(seed, _VAL_STREAM, i * world_size + rank))
        masks = batch_masks(batch, settings, generator, device)
        losses, _ = forward_losses(model, batch, masks, settings, device)
        B = batch[settings.inputs[0]].shape[0]
        for k in names:
            sums[k] += losses[k].double() * B
        count += B
    model.train(was_training)
    packed = _all_reduce_sum(torch.stack([count, *[sums[k] for k in names]])).tolist()
    if packed[0] == 0:
        return {}
    return {k: v / packed[0] for k, v in zip(names, packed[1:], strict=True)}


def _all_reduce_sum(t: Tensor) -> Tensor:
    if dist_utils.get_world_size() <= 1:
        return t
    target = dist_utils.collective_device(t.device)
    out = t.to(target)
    dist_utils.all_reduce_sum(out)
    return out.to(t.device)


@dataclass
class FitResult:
    """What `fit` ends with."""

    step: int
    """Optimizer steps done (including those of a resumed checkpoint)."""
    epoch: int
    """Epoch in progress at the end."""
    stopped_early: bool
    """The reporter asked to stop before the step / epoch budget was used up."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Last reported training metrics."""
    val_metrics: dict[str, float] = field(default_factory=dict)
    """Last validation metrics (empty without a val split)."""
    model: nn.Module | None = None
    """The trained model, unwrapped (no DDP / compile), on the training device."""


def _num_batches(data: DataSource, split: str) -> int | None:
    fn = getattr(data, "num_batches", None)
    if fn is None:
        return None
    try:
        return fn(split)
    except (KeyError, ValueError):
        return 0  # the split does not exist


def _accumulation(cfg: TrainConfig, world_size: int) -> int:
    per_step = cfg.train.per_worker_batch_size * world_size
    if cfg.train.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size ({cfg.train.global_batch_size}) must be a multiple of "
            f"train.per_worker_batch_size x workers ({cfg.train.per_worker_batch_size} x {world_size})"
        )
    return cfg.train.global_batch_size // per_step


@dataclass(frozen=True)
class _Schedule:
    steps_per_epoch: int | None
    total_steps: int
    warmup_steps: int
    peak_lr: float
    min_lr: float

    def lr(self, step: int) -> float:
        return lr_at(step, peak_lr=self.peak_lr, warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                     min_lr=self.min_lr)


def _schedule(cfg: TrainConfig, data: DataSource, accum: int) -> _Schedule:
    batches = _num_batches(data, "train")
    steps_per_epoch = None if batches is None else batches // accum
    if steps_per_epoch == 0:
        raise ValueError(f"data: the train split has {batches} batches per worker, fewer than the {accum} "
                         "micro-batches of one optimizer step (train.global_batch_size)")
    if cfg.train.max_steps is not None:
        total = cfg.train.max_steps
    elif steps_per_epoch is not None:
        total = cfg.train.epochs * steps_per_epoch
    else:
        raise ValueError("train.max_steps must be set when the data source does not know its epoch length")
    if cfg.optim.warmup_steps is not None:
        warmup = cfg.optim.warmup_steps
    elif cfg.optim.warmup_epochs == 0:
        warmup = 0
    elif steps_per_epoch is not None:
        warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    else:
        raise ValueError("optim.warmup_steps must be set when the data source does not know its epoch length")
    if warmup >= total:
        logger.warning("warmup (%d steps) covers the whole run (%d steps): the rate never reaches its peak",
                       warmup, total)
    return _Schedule(steps_per_epoch, total, warmup, peak_lr(cfg.optim, cfg.train.global_batch_size),
                     cfg.optim.min_lr)


def _note_unmasked_samples(cfg: TrainConfig) -> None:
    """Say when a modality can be fully visible in a sample, which makes loss means depend on micro-batching."""
    per_modality = (cfg.model.image_size // cfg.model.patch_size) ** 2
    if not cfg.loss.loss_on_unmasked and cfg.masking.num_encoded_tokens >= per_modality:
        logger.info(
            "masking.num_encoded_tokens (%d) >= %d tokens per modality: a sample can have a modality fully visible; "
            "it is then left out of that loss's mean over its micro-batch (the original's per-GPU nanmean), so "
            "results depend slightly on train.per_worker_batch_size", cfg.masking.num_encoded_tokens, per_modality)


def _seed_process(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))


class _Window:
    """Metric sums between two reports (device tensors, read once per report)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.losses: dict[str, Tensor] = {}
        self.grad_norm: Tensor | float = 0.0
        self.data_wait = 0.0
        self.start = time.perf_counter()

    def add(self, out: StepOutput, data_wait: float) -> None:
        self.steps += 1
        for k, v in out.losses.items():
            self.losses[k] = self.losses[k] + v if k in self.losses else v.clone()
        self.grad_norm = self.grad_norm + out.grad_norm.float()
        self.data_wait += data_wait


class _Run:
    """State of one `fit` call; methods are the phases of the loop."""

    def __init__(self, cfg: TrainConfig, reporter: Reporter, data: DataSource, info: dist_utils.DistInfo) -> None:
        from multimae_core.model.presets import build_model

        if cfg.stage != "pretrain":
            raise ValueError(f"stage: fit() trains the masked pretraining objective; stage '{cfg.stage}' has no loop")
        self.cfg, self.reporter, self.data, self.info = cfg, reporter, data, info
        self.device = info.device
        _note_unmasked_samples(cfg)
        self.settings = StepSettings.from_config(cfg)
        self.accum = _accumulation(cfg, info.world_size)
        self.schedule = _schedule(cfg, data, self.accum)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.raw = build_model(cfg.model, inputs=cfg.modalities.inputs, outputs=cfg.modalities.outputs)
        self.raw.to(self.device)
        _seed_process(cfg.train.seed + info.rank)  # dropout / drop-path streams differ per rank, as the original
        self.optimizer = build_optimizer(self.raw, cfg.optim, num_layers=len(self.raw.encoder))
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.train.precision == "fp16" else None
        self.mask_generator = torch.Generator(device=self.device)
        self.step = self.epoch = self.batches_in_epoch = 0
        self.last_checkpoint_step = -1
        self.resumed = self._resume()
        model: nn.Module = torch.compile(self.raw) if cfg.train.compile else self.raw
        # Every parameter gets a gradient in the default decoder; without cross-attention or task queries some
        # context parameters may not, and DDP then has to look for them each step.
        find_unused = not (cfg.model.decoder_use_xattn and cfg.model.decoder_use_task_queries)
        self.model = dist_utils.wrap_ddp(model, self.device, find_unused_parameters=find_unused)
        self.window = _Window()
        self.last_metrics: dict[str, float] = {}
        self.val_metrics: dict[str, float] = {}
        self.has_val = cfg.data.val_url is not None and _num_batches(data, "val") != 0
        self.figure_batch: dict[str, Tensor] | None = None
        self.val_done_at = -1

    def _resume(self) -> bool:
        with self.reporter.latest_checkpoint() as path:
            if path is None:
                return False
            state = load_checkpoint(path, self.raw, self.optimizer, self.scaler)
        self.step, self.epoch, self.batches_in_epoch = state.step, state.epoch, state.batches_in_epoch
        self.last_checkpoint_step = state.step
        rng = state.rng_for(self.info.rank)
        if rng is not None:
            restore_rng_state(rng, {"masks": self.mask_generator})
        else:
            _seed_process(derive_seed(self.cfg.train.seed, self.info.rank, state.step))
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch,
                    self.batches_in_epoch)
        return True

    def _agree(self, *flags: bool) -> list[bool]:
        """Logical OR of each flag over ranks (one small all-reduce per call when distributed)."""
        if self.info.world_size <= 1:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=dist_utils.collective_device(self.device))
        dist_utils.all_reduce_max(t)
        return [bool(v) for v in t.tolist()]

    def run(self) -> FitResult:
        self.model.train()
        self._take_figure_batch()
        stop_requested = stopped = False
        while self.step < self.schedule.total_steps and self.epoch < self.cfg.train.epochs:
            batches = self.data.epoch_batches(self.epoch, split="train", skip=self.batches_in_epoch)
            while self.step < self.schedule.total_steps:
                t0 = time.perf_counter()
                group = list(itertools.islice(batches, self.accum))
                data_wait = time.perf_counter() - t0
                exhausted, stopped = self._agree(len(group) < self.accum, stop_requested)
                if stopped or exhausted:
                    break
                self._step(group, data_wait)
                stop_requested = self.reporter.should_stop()
            _close(batches)
            if stopped or self.step >= self.schedule.total_steps:
                break
            self._validate()
            self.epoch += 1
            self.batches_in_epoch = 0
        return self._finish(stopped)

    def _step(self, group: list[dict[str, Tensor]], data_wait: float) -> None:
        if self.figure_batch is None and self.info.is_main:
            self.figure_batch = {k: v[:_FIGURE_SAMPLES].clone() for k, v in group[0].items()}
        set_lr(self.optimizer, self.schedule.lr(self.step))
        seeds = [derive_seed(self.cfg.train.seed, self.step, self.info.rank * self.accum + i)
                 for i in range(self.accum)]
        out = train_step(self.model, self.optimizer, group, self.settings, device=self.device, scaler=self.scaler,
                         mask_generator=self.mask_generator, mask_seeds=seeds)
        self.step += 1
        self.batches_in_epoch += self.accum
        self.window.add(out, data_wait)
        cfg = self.cfg
        if self.step % cfg.train.log_every_steps == 0 or self.step == self.schedule.total_steps:
            self._report()
        if self.step % cfg.train.image_every_steps == 0:
            self._log_figure()
        if self.step % cfg.checkpoint.every_steps == 0:
            self._checkpoint()

    def _report(self) -> None:
        w = self.window
        if w.steps == 0:
            return
        names = sorted(w.losses)
        packed = torch.stack([*[w.losses[k].float() for k in names], torch.as_tensor(w.grad_norm).float()])
        packed = _all_reduce_sum(packed.to(self.device)) / (w.steps * self.info.world_size)
        values = packed.tolist()  # the one host sync of a reporting window
        elapsed = time.perf_counter() - w.start
        metrics = {f"train/loss/{k}": v for k, v in zip(names, values[:-1], strict=True)}
        metrics.update({
            "grad_norm": values[-1],
            "lr": self.schedule.lr(self.step - 1),
            "images_per_s": self.cfg.train.global_batch_size * w.steps / max(elapsed, 1e-9),
            "step_time_s": elapsed / w.steps,
            "data_wait_s": w.data_wait / w.steps,
            "num_workers": float(self.info.world_size),
            "epoch": float(self.epoch),
        })
        if self.scaler is not None:
            metrics["loss_scale"] = float(self.scaler.get_scale())
        if self.device.type == "cuda":
            metrics["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if not all(math.isfinite(v) for v in values):
            dist_utils.warn_once(logger, "non-finite loss or gradient norm at step %d", self.step)
        self.reporter.report(self.step, metrics)
        self.last_metrics = metrics
        w.reset()

    def _validate(self) -> None:
        if not self.has_val:
            return
        batches = self.data.epoch_batches(self.epoch, split="val")
        values = evaluate(self.raw, batches, self.settings, device=self.device, seed=self.cfg.train.seed,
                          rank=self.info.rank, world_size=self.info.world_size)
        _close(batches)
        if values:
            self.val_metrics = {f"val/loss/{k}": v for k, v in values.items()}
            self.reporter.report(self.step, self.val_metrics)
        self.val_done_at = self.step

    def _take_figure_batch(self) -> None:
        """A fixed batch for figures: the first val batch (every rank pulls one, symmetric for streaming splits)."""
        if not self.has_val:
            return  # the first training batch of this run is used instead (see _step)
        batches = self.data.epoch_batches(0, split="val")
        first = next(batches, None)
        _close(batches)
        if first is not None and self.info.is_main:
            self.figure_batch = {k: v[:_FIGURE_SAMPLES].clone() for k, v in first.items()}

    @torch.no_grad()
    def _log_figure(self) -> None:
        if not self.info.is_main or self.figure_batch is None:
            return
        from multimae_core.training.figures import reconstruction_figure

        batch = _to_device(self.figure_batch, self.device)
        self.mask_generator.manual_seed(derive_seed(self.cfg.train.seed, _FIGURE_STREAM))
        masks = batch_masks(batch, self.settings, self.mask_generator, self.device)
        self.raw.eval()
        try:
            with self.settings.autocast(self.device):
                preds, used = self.raw({m: batch[m] for m in self.settings.inputs}, masks)
        finally:
            self.raw.train()
        image = reconstruction_figure(batch, preds, used, max_samples=_FIGURE_SAMPLES)
        self.reporter.log_image(self.step, "reconstruction", image)

    def _checkpoint(self) -> None:
        rng = dist_utils.all_gather_object(capture_rng_state({"masks": self.mask_generator}))
        step, epoch, position = self.step, self.epoch, self.batches_in_epoch
        extra = {"config": self.cfg.model_dump(mode="json"), "world_size": self.info.world_size,
                 "global_batch_size": self.cfg.train.global_batch_size}

        def write(path: str) -> None:
            if not self.info.is_main:
                return
            save_checkpoint(path, model=self.raw, optimizer=self.optimizer, scaler=self.scaler, step=step,
                            epoch=epoch, batches_in_epoch=position, rng=rng, extra=extra)

        self.reporter.save_checkpoint(self.step, write)
        self.last_checkpoint_step = self.step

    def _finish(self, stopped: bool) -> FitResult:
        if self.window.steps:
            self._report()
        if not stopped and self.has_val and self.val_done_at != self.step:
            self._validate()
        if self.last_checkpoint_step != self.step:
            self._checkpoint()
        logger.info("training ended at step %d (epoch %d)%s", self.step, self.epoch, " (stop requested)" * stopped)
        return FitResult(step=self.step, epoch=self.epoch, stopped_early=stopped, metrics=self.last_metrics,
                         val_metrics=self.val_metrics, model=self.raw)


def _close(iterator: Any) -> None:
    close = getattr(iterator, "close", None)
    if callable(close):
        close()


def fit(cfg: TrainConfig, reporter: Reporter, data: DataSource, *, device: str | torch.device | None = None,
        ) -> FitResult:
    """Train ``cfg`` to ``train.max_steps`` (or ``train.epochs``), resuming from the reporter's latest checkpoint.

    Reports ``train/loss/<head>``, ``train/loss/total``, ``lr``, ``grad_norm``, ``images_per_s``, ``step_time_s``,
    ``data_wait_s``, ``num_workers``, ``epoch`` (and ``gpu_mem_peak_gib`` on CUDA, ``loss_scale`` with fp16) every
    ``train.log_every_steps``; ``val/loss/<head>`` after each epoch when the data has a val split; a reconstruction
    figure every ``train.image_every_steps``; a checkpoint every ``checkpoint.every_steps`` and at the end.

    Args:
        device: Training device; None picks ``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU.
    """
    info = dist_utils.init_distributed(device)
    try:
        return _Run(cfg, reporter, data, info).run()
    finally:
        dist_utils.shutdown_distributed(info)


class TrainStep:
    """One-batch training step bound to a model and optimizer (for benchmarks): ``step(batch) -> StepOutput``."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        from multimae_core.model.presets import build_model

        self.device = device
        self.settings = StepSettings.from_config(cfg)
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, inputs=cfg.modalities.inputs, outputs=cfg.modalities.outputs).to(device)
        self.model.train()
        self.optimizer = build_optimizer(self.model, cfg.optim, num_layers=len(self.model.encoder))
        set_lr(self.optimizer, peak_lr(cfg.optim, cfg.train.global_batch_size))
        self.scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None
        self.forward_model: nn.Module = torch.compile(self.model) if cfg.train.compile else self.model
        self.mask_generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
        adapter = next(iter(self.model.output_adapters.values()))
        self.decoder_dim = int(adapter.decoder_embed_dim)
        self.decoder_depth = len(getattr(adapter, "decoder_transformer", ()))

    def __call__(self, batch: Mapping[str, Tensor]) -> StepOutput:
        return train_step(self.forward_model, self.optimizer, [batch], self.settings, device=self.device,
                          scaler=self.scaler, mask_generator=self.mask_generator)


def build_step(cfg: TrainConfig, *, device: str | torch.device = "cpu") -> TrainStep:
    """A `TrainStep` for ``cfg`` on ``device`` (masks drawn at the top of each step, on the device)."""
    return TrainStep(cfg, torch.device(device))

