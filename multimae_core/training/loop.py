"""The training loop: `train_step` (one optimizer step over micro-batches), `fit` and `evaluate_only`.

`fit` runs unchanged in one process, under torchrun and inside Ray Train workers; it talks to the outside only
through a `Reporter` and reads batches from a `DataSource` (see `reporting.py`). What is optimised is an `Objective`
(`objectives.py`): masked reconstruction for ``stage: pretrain``, a task loss and task metrics for
``stage: finetune``; accumulation, DDP, schedules, layer-wise decay, checkpoints, resume and reporting are the same.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from multimae_core.config import TrainConfig
from multimae_core.training import distributed as dist_utils
from multimae_core.training.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from multimae_core.training.host import keep_freed_host_memory
from multimae_core.training.objectives import (
    FIGURE_SAMPLES,
    Objective,
    StepSettings,
    all_reduce_sum,
    batch_masks,
    derive_seed,
    evaluate,
    forward_losses,
    make_objective,
    to_device,
)
from multimae_core.training.optim import build_optimizer, lr_at, peak_lr, set_lr
from multimae_core.training.reporting import DataSource, Reporter

__all__ = [
    "FitResult",
    "StepOutput",
    "StepSettings",
    "TrainStep",
    "batch_masks",
    "build_step",
    "derive_seed",
    "evaluate",
    "evaluate_only",
    "fit",
    "forward_losses",
    "train_step",
]

logger = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """Result of one optimizer step on this rank (tensors stay on the device; no host sync)."""

    losses: dict[str, Tensor]
    """Per-head and total loss, mean over this rank's micro-batches, detached."""
    grad_norm: Tensor
    """Global gradient norm before clipping (unscaled under fp16)."""


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[Mapping[str, Tensor]],
               settings: Any, *, device: torch.device, scaler: torch.amp.GradScaler | None = None,
               mask_generator: torch.Generator | None = None, mask_seeds: Sequence[int] | None = None,
               ) -> StepOutput:
    """Forward, loss, backward over the micro-batches, then one (clipped, scaled) optimizer step.

    Args:
        model: The model, DDP-wrapped when distributed (gradients sync on the last micro-batch only).
        micro_batches: This rank's share of one global batch; each loss is scaled by ``1 / len(micro_batches)``.
        settings: The objective's step settings (`StepSettings` for pretraining): ``losses(model, batch, generator,
            device)`` gives the micro-batch's losses with a ``total``; ``grad_clip`` the clipping norm.
        mask_generator: Generator on ``device`` for masks; re-seeded with ``mask_seeds[i]`` before micro-batch i
            when seeds are given. Batches carrying ``mask.<m>`` tensors use those instead.
    """
    n = len(micro_batches)
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, Tensor] = {}
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    for i, micro in enumerate(micro_batches):
        batch = to_device(micro, device)
        if mask_generator is not None and mask_seeds is not None:
            mask_generator.manual_seed(mask_seeds[i])
        sync = model.no_sync() if is_ddp and i < n - 1 else contextlib.nullcontext()
        with sync:
            losses = settings.losses(model, batch, mask_generator, device)
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
        self.cfg, self.reporter, self.data, self.info = cfg, reporter, data, info
        self.device = info.device
        if cfg.stage == "pretrain":
            _note_unmasked_samples(cfg)
        self.objective: Objective = make_objective(cfg)
        self.settings = self.objective.settings
        self.accum = _accumulation(cfg, info.world_size)
        self.schedule = _schedule(cfg, data, self.accum)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.raw = self.objective.build_model()
        self.raw.to(self.device)
        _seed_process(cfg.train.seed + info.rank)  # dropout / drop-path streams differ per rank, as the original
        self.optimizer = build_optimizer(self.raw, cfg.optim, num_layers=len(self.raw.encoder))
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.train.precision == "fp16" else None
        self.mask_generator = torch.Generator(device=self.device)
        self.step = self.epoch = self.batches_in_epoch = 0
        self.data_resume: dict[str, int] = {}  # {"skip_world_size": n}: resumed inside an epoch run by n ranks
        self.last_checkpoint_step = -1
        self.resumed = self._resume()
        if not self.resumed:
            # Pretrained weights are loaded in place (the optimizer keeps its parameter references); every rank
            # reads the same file, so the replicas start equal.
            self.objective.initialise(self.raw)
        model: nn.Module = torch.compile(self.raw) if cfg.train.compile else self.raw
        self.model = dist_utils.wrap_ddp(model, self.device,
                                         find_unused_parameters=self.objective.find_unused_parameters)
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
        old_world = int(state.extra.get("world_size", self.info.world_size))
        if self.batches_in_epoch and old_world != self.info.world_size:
            self.data_resume = {"skip_world_size": old_world}  # the source splits the rest of the epoch anew
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
            batches = self.data.epoch_batches(self.epoch, split="train", skip=self.batches_in_epoch,
                                              **self.data_resume)
            if self.data_resume:  # count on in this world's batches (whole: a step always takes one global batch)
                self.batches_in_epoch = (self.batches_in_epoch * self.data_resume.pop("skip_world_size")
                                         // self.info.world_size)
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
            self.figure_batch = {k: v[:FIGURE_SAMPLES].clone() for k, v in group[0].items()}
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
        packed = all_reduce_sum(packed.to(self.device)) / (w.steps * self.info.world_size)
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
        values = self.objective.validate(self.raw, batches, device=self.device, seed=self.cfg.train.seed,
                                         rank=self.info.rank, world_size=self.info.world_size)
        _close(batches)
        if values:
            self.val_metrics = {f"val/{k}": v for k, v in values.items()}
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
            self.figure_batch = {k: v[:FIGURE_SAMPLES].clone() for k, v in first.items()}

    def _log_figure(self) -> None:
        if not self.info.is_main or self.figure_batch is None:
            return
        image = self.objective.figure(self.raw, self.figure_batch, device=self.device,
                                      generator=self.mask_generator, seed=self.cfg.train.seed)
        if image is not None:
            self.reporter.log_image(self.step, self.objective.figure_key, image)

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

    ``cfg.stage`` picks the objective: masked reconstruction (pretrain) or the ``finetune`` task, which starts from
    ``init.checkpoint_url`` when the run does not resume. Reports ``train/loss/<head>``, ``train/loss/total``,
    ``lr``, ``grad_norm``, ``images_per_s``, ``step_time_s``, ``data_wait_s``, ``num_workers``, ``epoch`` (and
    ``gpu_mem_peak_gib`` on CUDA, ``loss_scale`` with fp16) every ``train.log_every_steps``; ``val/...`` after each
    epoch when the data has a val split (``val/loss/<head>``; fine-tuning adds the task metrics, e.g. ``val/top1``,
    ``val/miou``, ``val/delta1``); a figure every ``train.image_every_steps``; a checkpoint every
    ``checkpoint.every_steps`` and at the end.

    Args:
        device: Training device; None picks ``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU.
    """
    info = dist_utils.init_distributed(device)
    if info.device.type == "cpu":
        keep_freed_host_memory()  # no page-fault churn between steps (host.py)
    return _Run(cfg, reporter, data, info).run()  # a group made here stays for the next call (distributed.py)


def evaluate_only(cfg: TrainConfig, data: DataSource, *, reporter: Reporter | None = None,
                  device: str | torch.device | None = None) -> dict[str, float]:
    """Validation metrics of the weights in ``init.checkpoint_url`` on ``data``'s val split, without training.

    The checkpoint must hold the whole model (a fine-tuned head included). With a ``reporter`` the metrics are
    reported at step 0 as ``val/<metric>`` and a prediction figure is logged. Returns the metrics without the
    ``val/`` prefix.
    """
    info = dist_utils.init_distributed(device)
    objective = make_objective(cfg)
    torch.manual_seed(cfg.train.seed)
    model = objective.build_model().to(info.device)
    objective.initialise(model, require_head=True)
    batches = data.epoch_batches(0, split="val")
    first: dict[str, Tensor] | None = None

    def keep_first(it: Any) -> Any:
        nonlocal first
        for batch in it:
            if first is None:
                first = {k: v[:FIGURE_SAMPLES].clone() for k, v in batch.items()}
            yield batch

    values = objective.validate(model, keep_first(batches), device=info.device, seed=cfg.train.seed,
                                rank=info.rank, world_size=info.world_size)
    _close(batches)
    if reporter is not None and values:
        reporter.report(0, {f"val/{k}": v for k, v in values.items()})
        if info.is_main and first is not None:
            image = objective.figure(model, first, device=info.device,
                                     generator=torch.Generator(device=info.device), seed=cfg.train.seed)
            if image is not None:
                reporter.log_image(0, objective.figure_key, image)
    return values


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

