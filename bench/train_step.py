"""Time one MultiMAE pretraining step (forward + losses + backward + AdamW) on the current device.

Prints images/s, the achieved FLOP rate from the analytic count in bench/flops.py, and the matmul ceiling measured in
the same process (the best of several short runs before and after the timed steps, so a busy neighbour lowers the
share rather than raising it), so the ratio compares across machines. Examples:

    .venv/bin/python bench/train_step.py --preset base --batch-size 16 --precision fp32
    .venv/bin/python bench/train_step.py --preset small --breakdown          # time per phase of the step
    .venv/bin/python bench/train_step.py --preset base --precision bf16 \\
        --compare default attention=sdpa optimizer=foreach losses=image    # variants in one process

`--compare` runs each variant on a fresh model in the same process (ratios between them are what to read; the
peak RSS of such a run is not any one variant's). A variant is `default` or comma-separated toggles:
`attention=auto|sdpa|explicit` (blocks.attention_kernel), `optimizer=fused|foreach` (AdamW kernels),
`losses=patch|image` (image: full-resolution predictions and `compute_losses`, the pre-issue-7 loss path).

`--mode ray` measures the whole local training loop against the bare step in one run (issues 4 and 7):

    flock /tmp/mmae-cpu.lock .venv/bin/python bench/train_step.py --mode ray                 # jobs/pretrain_tiny.yaml
    flock /tmp/mmae-cpu.lock .venv/bin/python bench/train_step.py --mode ray --set model.preset=small \
        --set model.image_size=224 ...

It renders synthetic shards once into a temporary folder (`multimae_core.data.synth.write_synth`, what `mmae data
synth` runs), then (1) times the bare step of the job's model, batch and precision in this process (the job's
global batch as micro-batches of ``train.per_worker_batch_size``, random data; half of the timed steps before the
loop, half after it), and (2) runs the job through `orchestrator.runtime.local.run_local` -- the code of
`mmae launch JOB --local`: a Ray Train TorchTrainer on a local Ray (or ``RAY_ADDRESS``), the shard loader, Ray
Train checkpoints, MLflow (the default SQLite store under the temporary folder), the progress actor -- and reads the
loop's own metrics (``images_per_s``, ``step_time_s``, ``data_wait_s``, one value per ``train.log_every_steps``
window) back from the MLflow run. Steady state = the windows that end after ``--skip-steps``; medians of those.
The ratio is loop images/s over bare images/s; the data-wait share is data_wait_s / step_time_s. `--with-fit` adds
a third arm, the same job through `fit` in this process (same shard loader, no Ray, no MLflow), which separates the
runtime's cost from the data pipeline's. Results and their reading: BENCHMARKS.md, "Whole local loop vs the bare
step".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flops import StepShape, forward_flops, matmul_ceiling, train_step_flops  # noqa: E402

PHASES = ("encoder_fwd", "decoders_fwd", "losses_fwd", "losses_bwd", "decoders_bwd", "encoder_bwd", "grad_norm",
          "optimizer")


def _batch(cfg, batch_size: int, device):
    import torch

    from multimae_core.modalities import get_modality

    g = torch.Generator().manual_seed(0)
    size = cfg.model.image_size
    batch = {}
    targets = [get_modality(o).target_name for o in cfg.modalities.outputs]
    for name in dict.fromkeys([*cfg.modalities.inputs, *targets]):
        spec = get_modality(name)
        s = size // spec.stride_level
        if spec.kind == "dense_classes":
            batch[name] = torch.randint(0, spec.num_channels, (batch_size, s, s), generator=g)
        else:
            batch[name] = torch.randn(batch_size, spec.num_channels, s, s, generator=g)
    return {k: v.to(device) for k, v in batch.items()}


def _job(args):
    from multimae_core.config import TrainConfig

    return TrainConfig.model_validate({
        "name": "bench",
        "model": {"preset": args.preset, "image_size": args.image_size},
        "masking": {"num_encoded_tokens": args.num_encoded_tokens},
        "train": {"global_batch_size": args.batch_size, "per_worker_batch_size": args.batch_size,
                  "precision": args.precision, "compile": args.compile},
    })


class _ImageLossSettings:
    """Step settings whose losses take the reference path: full-resolution predictions and `compute_losses`."""

    def __init__(self, settings) -> None:
        self.inner = settings
        self.grad_clip = settings.grad_clip

    def losses(self, model, batch, generator, device):
        from multimae_core.losses import compute_losses
        from multimae_core.training.objectives import batch_masks

        s = self.inner
        masks = batch_masks(batch, s, generator, device)
        with s.autocast(device):
            preds, used = model({m: batch[m] for m in s.inputs}, masks)
        return compute_losses(preds, batch, used, weights=s.loss_weights, loss_on_unmasked=s.loss_on_unmasked)


def _parse_variant(text: str) -> dict[str, str]:
    allowed = {"attention": {"auto", "sdpa", "explicit"}, "optimizer": {"fused", "foreach"},
               "losses": {"patch", "image"}}
    out: dict[str, str] = {}
    if text == "default":
        return out
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in allowed or value not in allowed[key]:
            raise SystemExit(f"--compare: bad toggle {part!r}; choose from {allowed}")
        out[key] = value
    return out


def _build(cfg, device, toggles: dict[str, str]):
    """A bound step for ``cfg`` with the variant's toggles applied: (step, call, context manager factory)."""
    import torch

    from multimae_core.model.blocks import attention_kernel
    from multimae_core.training.loop import build_step, train_step
    from multimae_core.training.optim import param_groups, peak_lr, set_lr

    step = build_step(cfg, device=device)
    if toggles.get("optimizer") == "foreach":
        o = cfg.optim
        groups = param_groups(step.model, weight_decay=o.weight_decay, decay_all_params=o.decay_all_params,
                              layer_decay=o.layer_decay, num_layers=len(step.model.encoder))
        step.optimizer = torch.optim.AdamW(groups, lr=0.0, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                           foreach=True)
        set_lr(step.optimizer, peak_lr(o, cfg.train.global_batch_size))
    settings = _ImageLossSettings(step.settings) if toggles.get("losses") == "image" else step.settings

    def call(batch):
        return train_step(step.forward_model, step.optimizer, [batch], settings, device=step.device,
                          scaler=step.scaler, mask_generator=step.mask_generator)

    def context():
        kernel = toggles.get("attention")
        return attention_kernel(kernel) if kernel else contextlib.nullcontext()

    return step, call, context


def _time_steps(call, batch, warmup: int, steps: int, sync) -> list[float]:
    for _ in range(warmup):
        call(batch)
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        call(batch)
        sync()
        times.append(time.perf_counter() - t0)
    return times


def breakdown(step, batch, *, reps: int, sync) -> dict[str, float]:
    """Median seconds per phase of the default step, cut at detached leaves (same work, measured in pieces).

    Decoder time is `decoders_fwd + decoders_bwd`: the heads from the encoder tokens to the patch predictions.
    """
    import torch

    from multimae_core.losses import compute_patch_losses

    model, opt, s = step.model, step.optimizer, step.settings
    inputs = {m: batch[m] for m in s.inputs}

    def once() -> dict[str, float]:
        out: dict[str, float] = {}
        last = [time.perf_counter()]

        def tick(name: str) -> None:
            sync()
            now = time.perf_counter()
            out[name] = now - last[0]
            last[0] = now

        opt.zero_grad(set_to_none=True)
        from multimae_core.training.objectives import batch_masks

        masks = batch_masks(batch, s, step.mask_generator, step.device)
        with s.autocast(step.device):
            tokens, layout = model._tokenize(inputs)
            enc, ids_keep, ids_restore = model._encode_visible(tokens, masks, num_visible=s.drawn_visible(batch))
        tick("encoder_fwd")
        enc_leaf = enc.detach().requires_grad_()
        with s.autocast(step.device):
            preds = model.decode(enc_leaf, layout, ids_keep, ids_restore)
        tick("decoders_fwd")
        leaves = {k: v.detach().requires_grad_() for k, v in preds.items()}
        losses = compute_patch_losses(leaves, batch, masks, weights=s.loss_weights,
                                      loss_on_unmasked=s.loss_on_unmasked)
        tick("losses_fwd")
        losses["total"].backward()
        tick("losses_bwd")
        torch.autograd.backward([preds[k] for k in leaves], [leaves[k].grad for k in leaves])
        tick("decoders_bwd")
        enc.backward(enc_leaf.grad)
        tick("encoder_bwd")
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.get_total_norm([p.grad for p in params])
        tick("grad_norm")
        opt.step()
        tick("optimizer")
        return out

    once()
    runs = [once() for _ in range(reps)]
    return {k: statistics.median(r[k] for r in runs) for k in PHASES}


def _ceiling(dtype: str, device: str, samples: list[float]) -> None:
    for _ in range(3):
        samples.append(matmul_ceiling(dtype, device=device, seconds=1.0))


def run(args) -> dict[str, Any]:
    import torch

    from multimae_core.training.host import keep_freed_host_memory

    device = torch.device(args.device)
    # What fit() does on a CPU device, before anything large is allocated.
    tuned = device.type == "cpu" and not args.no_host_tuning and keep_freed_host_memory()
    cfg = _job(args)
    batch = _batch(cfg, args.batch_size, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = "bfloat16" if args.precision == "bf16" else ("float16" if args.precision == "fp16" else "float32")
    ceilings: list[float] = []
    _ceiling(dtype, args.device, ceilings)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    variants = args.compare or ["default"]
    timings: dict[str, list[float]] = {}
    step = None
    for text in variants:
        step, call, context = _build(cfg, device, _parse_variant(text))
        with context():
            timings[text] = _time_steps(call, batch, args.warmup, args.steps, sync)
        if len(variants) > 1:
            del step, call
            step = None
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    phases = None
    if args.breakdown:
        step = step or _build(cfg, device, {})[0]
        phases = breakdown(step, batch, reps=args.steps, sync=sync)
    _ceiling(dtype, args.device, ceilings)
    ceiling = max(ceilings)

    from multimae_core.model.presets import PRESETS

    preset = PRESETS[args.preset]
    shape = StepShape(
        embed_dim=preset.embed_dim, depth=preset.depth, decoder_dim=preset.decoder_embed_dim,
        decoder_depth=preset.decoder_depth, image_size=cfg.model.image_size,
        num_encoded_tokens=cfg.masking.num_encoded_tokens,
    )
    flop_img = train_step_flops(shape)
    result: dict[str, Any] = {
        "preset": args.preset, "batch_size": args.batch_size, "precision": args.precision, "device": args.device,
        "gflop_per_image": round(flop_img / 1e9, 2), "ceiling_gflops": round(ceiling / 1e9, 1),
        "ceiling_samples_gflops": [round(c / 1e9, 1) for c in ceilings],
        "forward_gflop_split": {k: round(v / 1e9, 3) for k, v in forward_flops(shape).items()},
        "torch_threads": torch.get_num_threads(), "host_allocator_tuned": tuned,
    }
    per_variant = {}
    for text, times in timings.items():
        step_s = statistics.median(times)
        ips = args.batch_size / step_s
        per_variant[text] = {
            "images_per_s": round(ips, 3), "step_s_median": round(step_s, 4),
            "step_s_all": [round(t, 3) for t in times],
            "achieved_gflops": round(ips * flop_img / 1e9, 1), "share_of_ceiling": round(ips * flop_img / ceiling, 3),
        }
    if len(per_variant) == 1:
        result.update(next(iter(per_variant.values())))
        result["peak_rss_gb"] = round(peak_rss, 2)
    else:
        result["variants"] = per_variant
        result["peak_rss_gb_all_variants"] = round(peak_rss, 2)
    if phases is not None:
        total = sum(phases.values())
        result["breakdown_s"] = {k: round(v, 4) for k, v in phases.items()}
        result["breakdown_share"] = {k: round(v / total, 3) for k, v in phases.items()}
        result["decoders_share_of_step"] = round((phases["decoders_fwd"] + phases["decoders_bwd"]) / total, 3)
    if device.type == "cuda":
        result["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        result["gpu"] = torch.cuda.get_device_name()
    return result


# -- Ray Train mode -----------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JOB = REPO / "jobs" / "pretrain_tiny.yaml"
LOOP_METRICS = ("images_per_s", "step_time_s", "data_wait_s")


def load_bench_job(job_path: Path, overrides: list[str], *, workdir: Path):
    """The job as given (file + ``--set`` overrides), its data, checkpoints and experiment moved into ``workdir``."""
    from orchestrator.spec import load_job

    job = load_job(job_path, overrides)
    place = [f"data.train_url={workdir / 'data' / 'train'}",
             f"data.val_url={workdir / 'data' / 'val'}" if job.data.val_url is not None else "data.val_url=null",
             f"checkpoint.storage_url={workdir / 'checkpoints'}",
             "tracking.experiment=bench/train_step"]
    return load_job(job_path, [*overrides, *place])


def default_train_samples(job) -> int:
    """Enough scenes for the run but at most 512 (the demo's set): later epochs re-read them."""
    steps = job.train.max_steps or 64
    return max(job.train.global_batch_size * 2, min(512, job.train.global_batch_size * steps))


def write_data(job, *, train_samples: int, val_samples: int) -> dict[str, float]:
    """Render the synthetic train (and val) shards the job reads; seconds spent."""
    from multimae_core.data.synth import write_synth

    t0 = time.perf_counter()
    size = job.model.image_size
    write_synth(job.data.train_url, train_samples, size=size, seed=0, samples_per_shard=64)
    if job.data.val_url is not None and val_samples > 0:
        write_synth(job.data.val_url, val_samples, size=size, seed=1, samples_per_shard=64)
    return {"synth_s": round(time.perf_counter() - t0, 2), "train_samples": train_samples,
            "val_samples": val_samples if job.data.val_url is not None else 0}


def bare_arm(job):
    """A bare step bound to the job's model, precision and optimizer: ``call()`` does one optimizer step over the
    job's global batch as micro-batches of ``train.per_worker_batch_size`` (what one worker does when it is alone);
    returns (call, images per call, accumulation)."""
    import torch

    from multimae_core.training.loop import build_step, derive_seed, train_step
    from multimae_core.training.optim import peak_lr, set_lr

    device = torch.device("cpu")
    per = job.train.per_worker_batch_size
    accum = job.train.global_batch_size // per
    step = build_step(job, device=device)
    set_lr(step.optimizer, peak_lr(job.optim, job.train.global_batch_size))
    batch = _batch(job, per, device)
    micro = [batch] * accum
    counter = [0]

    def call() -> None:
        seeds = [derive_seed(job.train.seed, counter[0], i) for i in range(accum)]
        counter[0] += 1
        train_step(step.forward_model, step.optimizer, micro, step.settings, device=device, scaler=step.scaler,
                   mask_generator=step.mask_generator, mask_seeds=seeds)

    return call, per * accum, accum


def time_bare(call, *, warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` calls of the bare arm after ``warmup`` untimed ones (CPU: nothing to sync)."""
    return _time_steps(lambda _batch: call(), None, warmup, steps, sync=lambda: None)


class _WorkerWatch:
    """Looks at the Ray Train worker processes while the loop runs (Linux /proc): their ``OMP_NUM_THREADS`` at start
    (absent: Ray sets it to the worker's reserved CPUs) and their peak thread count."""

    def __init__(self, interval_s: float = 1.0) -> None:
        import threading

        self.seen: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._interval = interval_s
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    if b"RayTrainWorker" not in (proc / "cmdline").read_bytes():
                        continue
                    env = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
                    threads = int(next(line.split()[1] for line in (proc / "status").read_text().splitlines()
                                       if line.startswith("Threads:")))
                except (OSError, StopIteration, ValueError):
                    continue
                info = self.seen.setdefault(int(proc.name), {"threads_max": 0})
                omp = env.get(b"OMP_NUM_THREADS")
                info["omp_num_threads_at_start"] = omp.decode() if omp is not None else None
                info["threads_max"] = max(info["threads_max"], threads)

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join(timeout=5)
        return list(self.seen.values())


def run_loop(job, *, workdir: Path, tracking_uri: str | None) -> dict[str, Any]:
    """`mmae launch JOB --local` on ``job`` from ``workdir`` (its default tracking store is ``workdir/.mmae``);
    returns the run id, the tracking URI and the wall time of the launch."""
    import os

    from orchestrator.runtime.local import default_tracking, run_local

    saved_cwd = Path.cwd()
    saved_uri = os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(workdir)
    try:
        if tracking_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        uri = default_tracking()[0]
        watch = _WorkerWatch()
        t0 = time.perf_counter()
        try:
            run_id = run_local(job, fresh=True)
        finally:
            wall = time.perf_counter() - t0
            workers = watch.stop()
    finally:
        os.chdir(saved_cwd)
        if saved_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_uri
    return {"run_id": run_id, "tracking_uri": uri, "launch_wall_s": wall, "worker_processes": workers}


def run_fit(job, *, workdir: Path) -> dict[str, dict[int, float]]:
    """The same job through `fit` in this process, without Ray and MLflow: the shard loader, checkpoints to a local
    folder (`MemoryReporter`); returns its per-window metrics as `loop_metrics` does."""
    from multimae_core.data.loader import ShardDataSource
    from multimae_core.training.loop import fit
    from multimae_core.training.reporting import MemoryReporter

    reporter = MemoryReporter(workdir / "fit-checkpoints", keep=job.checkpoint.keep)
    data = ShardDataSource.from_config(job)
    fit(job, reporter, data, device="cpu")
    return {key: {step: value for step, value in reporter.series(key)} for key in LOOP_METRICS}


def loop_metrics(tracking_uri: str, run_id: str) -> dict[str, dict[int, float]]:
    """The loop's per-window metrics of the run as ``{key: {step: value}}``, read back from MLflow."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    return {key: {int(m.step): float(m.value) for m in client.get_metric_history(run_id, key)}
            for key in LOOP_METRICS}


def steady_state(history: dict[str, dict[int, float]], *, skip_steps: int) -> dict[str, Any]:
    """Medians over the reporting windows that end after ``skip_steps`` (the first windows hold the warm-up)."""
    steps = sorted(s for s in history["images_per_s"] if s > skip_steps)
    if not steps:
        raise SystemExit(f"no reporting window ends after --skip-steps {skip_steps} (windows end at "
                         f"{sorted(history['images_per_s'])}); run more steps or skip fewer")
    all_steps = sorted(history["images_per_s"])
    lengths = [s - (all_steps[all_steps.index(s) - 1] if all_steps.index(s) else 0) for s in steps]
    ips = [history["images_per_s"][s] for s in steps]
    step_s = [history["step_time_s"][s] for s in steps]
    wait_s = [history["data_wait_s"][s] for s in steps]
    return {
        "windows": len(steps), "window_end_steps": steps,
        "images_per_s": statistics.median(ips), "step_s_median": statistics.median(step_s),
        "data_wait_s_median": statistics.median(wait_s),
        "data_wait_share": statistics.median(w / t for w, t in zip(wait_s, step_s, strict=True)),
        # every step of the steady windows, slow ones (checkpoint, figure, validation) included
        "step_s_mean": sum(n * t for n, t in zip(lengths, step_s, strict=True)) / sum(lengths),
        "data_wait_share_mean": sum(n * w for n, w in zip(lengths, wait_s, strict=True))
        / sum(n * t for n, t in zip(lengths, step_s, strict=True)),
        "images_per_s_all": [round(v, 3) for v in ips],
    }


def run_ray(args) -> dict[str, Any]:
    """Bare step vs the whole local Ray Train loop at the job's model, batch and precision (see the docstring)."""
    import os
    import shutil
    import tempfile

    import torch

    from multimae_core.model.presets import PRESETS
    from multimae_core.training.host import keep_freed_host_memory

    workdir = Path(tempfile.mkdtemp(prefix="mmae-bench-ray-", dir=args.workdir))
    try:
        job = load_bench_job(args.job.resolve(), args.set or [], workdir=workdir)
        workers = job.resources.max_workers or 1
        if job.train.global_batch_size % job.train.per_worker_batch_size:
            raise SystemExit("train.global_batch_size must be a multiple of train.per_worker_batch_size")
        data = write_data(job, train_samples=args.train_samples or default_train_samples(job),
                          val_samples=args.val_samples)
        skip = args.skip_steps if args.skip_steps is not None else max(2 * job.train.log_every_steps,
                                                                       (job.train.max_steps or 0) // 10)
        tuned = keep_freed_host_memory()  # what fit() does in the worker
        call, images, accum = bare_arm(job)
        first = args.bare_steps // 2
        before = time_bare(call, warmup=args.bare_warmup, steps=first)
        loop = run_loop(job, workdir=workdir, tracking_uri=args.tracking_uri)
        history = loop_metrics(loop["tracking_uri"], loop["run_id"])
        fit_steady = steady_state(run_fit(job, workdir=workdir), skip_steps=skip) if args.with_fit else None
        after = time_bare(call, warmup=1, steps=args.bare_steps - first)
        bare_times = before + after
        bare_step = statistics.median(bare_times)
        bare_ips = images / bare_step
        steady = steady_state(history, skip_steps=skip)
        total_steps = job.train.max_steps
        result: dict[str, Any] = {
            "mode": "ray", "job": str(args.job), "overrides": args.set or [],
            "preset": job.model.preset, "image_size": job.model.image_size,
            "embed_dim": job.model.embed_dim or PRESETS[job.model.preset].embed_dim,
            "depth": job.model.depth or PRESETS[job.model.preset].depth, "precision": job.train.precision,
            "global_batch_size": job.train.global_batch_size,
            "per_worker_batch_size": job.train.per_worker_batch_size, "ray_workers": workers,
            "bare_micro_batches": accum, "max_steps": total_steps, "log_every_steps": job.train.log_every_steps,
            "checkpoint_every_steps": job.checkpoint.every_steps, "data_loader_workers": job.data.num_workers,
            "skip_steps": skip, **data,
            "bare_images_per_s": round(bare_ips, 3), "bare_step_s_median": round(bare_step, 4),
            "bare_step_s_before": [round(t, 4) for t in before], "bare_step_s_after": [round(t, 4) for t in after],
            "bare_torch_threads": torch.get_num_threads(), "host_allocator_tuned": tuned,
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
            "loop_images_per_s": round(steady["images_per_s"], 3),
            "loop_step_s_median": round(steady["step_s_median"], 4),
            "loop_windows": steady["windows"], "loop_window_end_steps": steady["window_end_steps"],
            "loop_images_per_s_all_windows": steady["images_per_s_all"],
            "ratio": round(steady["images_per_s"] / bare_ips, 4),
            "loop_images_per_s_mean": round(job.train.global_batch_size / steady["step_s_mean"], 3),
            "ratio_mean": round(job.train.global_batch_size / steady["step_s_mean"] / bare_ips, 4),
            "data_wait_share_mean": round(steady["data_wait_share_mean"], 4),
            "data_wait_s_median": round(steady["data_wait_s_median"], 5),
            "data_wait_share": round(steady["data_wait_share"], 4),
            "launch_wall_s": round(loop["launch_wall_s"], 2),
            "launch_images_per_s": round(job.train.global_batch_size * (total_steps or 0) / loop["launch_wall_s"], 3),
            "run_id": loop["run_id"], "ray_worker_processes": loop["worker_processes"],
        }
        if fit_steady is not None:
            result.update({
                "fit_images_per_s": round(fit_steady["images_per_s"], 3),
                "fit_ratio": round(fit_steady["images_per_s"] / bare_ips, 4),
                "fit_data_wait_share": round(fit_steady["data_wait_share"], 4),
                "fit_images_per_s_all_windows": fit_steady["images_per_s_all"],
            })
        result["goal_ratio_met"] = result["ratio"] >= 0.9
        result["goal_data_wait_met"] = result["data_wait_share"] < 0.05
        return result
    finally:
        if args.keep_workdir:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def ray_table(r: dict[str, Any]) -> str:
    bare_n = len(r["bare_step_s_before"]) + len(r["bare_step_s_after"])
    ratio_goal = "goal >= 0.90 " + ("met" if r["goal_ratio_met"] else "NOT met")
    wait_goal = "goal < 5 % " + ("met" if r["goal_data_wait_met"] else "NOT met")
    rows = [
        ("bare step img/s", f"{r['bare_images_per_s']:.2f}",
         f"median of {bare_n} steps, {r['bare_step_s_median']:.4f} s/step"),
        ("loop img/s", f"{r['loop_images_per_s']:.2f}",
         f"median of {r['loop_windows']} windows, {r['loop_step_s_median']:.4f} s/step"),
        ("ratio loop/bare", f"{r['ratio']:.3f}", ratio_goal),
        ("data wait share", f"{100 * r['data_wait_share']:.2f} %", wait_goal),
        ("loop img/s, all steps", f"{r['loop_images_per_s_mean']:.2f}",
         f"ratio {r['ratio_mean']:.3f}, data wait {100 * r['data_wait_share_mean']:.2f} % (slow windows included)"),
    ]
    head = (f"{r['preset']} {r['image_size']} px, embed {r['embed_dim']} x {r['depth']}, {r['precision']}, "
            f"global batch {r['global_batch_size']} ({r['per_worker_batch_size']} per worker, {r['ray_workers']} "
            f"worker(s)), {r['max_steps']} steps, steady state after step {r['skip_steps']}")
    if "fit_images_per_s" in r:
        rows.append(("fit() in-process img/s", f"{r['fit_images_per_s']:.2f}",
                     f"ratio {r['fit_ratio']:.3f}, data wait {100 * r['fit_data_wait_share']:.2f} % "
                     "(no Ray, no MLflow)"))
    omp = sorted({str(p.get("omp_num_threads_at_start")) for p in r["ray_worker_processes"]})
    rows.append(("worker OMP_NUM_THREADS", ",".join(omp) or "?",
                 "None: set by Ray to the reserved CPUs; bare step: "
                 f"{r['bare_torch_threads']} torch threads"))
    w = max(len(a) for a, _, _ in rows)
    return "\n".join([head, *(f"  {a:<{w}}  {b:>10}   {c}" for a, b, c in rows)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="step", choices=["step", "ray"],
                   help="step: the bare step alone (default); ray: whole local Ray Train loop vs the bare step")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "base", "large"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-encoded-tokens", type=int, default=98)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--breakdown", action="store_true", help="also time each phase of the default step")
    p.add_argument("--compare", nargs="+", metavar="VARIANT", help="time these variants in one process")
    p.add_argument("--no-host-tuning", action="store_true",
                   help="leave glibc malloc at its defaults (fit() keeps freed memory on CPU devices; host.py)")
    p.add_argument("--json", type=Path, help="also write the result here")
    ray = p.add_argument_group("--mode ray")
    ray.add_argument("--job", type=Path, default=DEFAULT_JOB, help="job YAML (default jobs/pretrain_tiny.yaml)")
    ray.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="job override as `mmae launch --set` takes it (repeatable); e.g. model.preset=small, "
                          "model.image_size=224, train.per_worker_batch_size=16, train.max_steps=60")
    ray.add_argument("--train-samples", type=int, help="synthetic training scenes (default: one per sample the run "
                     "reads, at most 512)")
    ray.add_argument("--val-samples", type=int, default=64, help="synthetic validation scenes (the demo's 64)")
    ray.add_argument("--bare-steps", type=int, default=6, help="timed bare steps, half before and half after the loop")
    ray.add_argument("--bare-warmup", type=int, default=2)
    ray.add_argument("--skip-steps", type=int, help="steady state: use windows ending after this step (default: "
                     "two logging windows or 10 %% of the steps, whichever is more)")
    ray.add_argument("--with-fit", action="store_true",
                     help="also run the job through fit() in this process (shard loader, no Ray, no MLflow)")
    ray.add_argument("--tracking-uri", help="MLflow tracking URI (default: local mode's SQLite store in the temp dir)")
    ray.add_argument("--workdir", help="parent of the temporary folder (default: the system temp dir)")
    ray.add_argument("--keep-workdir", action="store_true")
    args = p.parse_args()
    if args.mode == "ray":
        result = run_ray(args)
        print(ray_table(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return
    result = run(args)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
