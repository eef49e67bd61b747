"""Time one MultiMAE pretraining step (forward + losses + backward + AdamW) on the current device.

Prints images/s, the achieved FLOP rate from the analytic count in bench/flops.py, and the matmul ceiling measured in
the same process, so the ratio compares across machines. Example:

    .venv/bin/python bench/train_step.py --preset base --batch-size 16 --precision fp32
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flops import StepShape, forward_flops, matmul_ceiling, train_step_flops  # noqa: E402


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


def run(args) -> dict:
    import torch

    from multimae_core.training.loop import build_step

    device = torch.device(args.device)
    cfg = _job(args)
    step = build_step(cfg, device=device)
    batch = _batch(cfg, args.batch_size, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step(batch)
    sync()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(batch)
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    m = step.model
    shape = StepShape(
        embed_dim=m.embed_dim, depth=len(m.encoder), decoder_dim=step.decoder_dim, decoder_depth=step.decoder_depth,
        image_size=cfg.model.image_size, num_encoded_tokens=cfg.masking.num_encoded_tokens,
    )
    flop_img = train_step_flops(shape)
    dtype = "bfloat16" if args.precision == "bf16" else ("float16" if args.precision == "fp16" else "float32")
    ceiling = matmul_ceiling(dtype, device=args.device)
    ips = args.batch_size / step_s
    result = {
        "preset": args.preset, "batch_size": args.batch_size, "precision": args.precision, "device": args.device,
        "images_per_s": round(ips, 3), "step_s_median": round(step_s, 4), "gflop_per_image": round(flop_img / 1e9, 2),
        "achieved_gflops": round(ips * flop_img / 1e9, 1), "ceiling_gflops": round(ceiling / 1e9, 1),
        "share_of_ceiling": round(ips * flop_img / ceiling, 3),
        "forward_gflop_split": {k: round(v / 1e9, 3) for k, v in forward_flops(shape).items()},
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "torch_threads": torch.get_num_threads(),
    }
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
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args()
    result = run(args)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
