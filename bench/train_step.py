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
    for name in cfg.modalities.inputs:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    args = p.parse_args()
    result = run(args)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
