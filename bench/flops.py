"""Analytic FLOP count of a MultiMAE pretraining step, and the matmul ceiling of the current device.

FLOPs count multiply-adds as 2. A training step is counted as 3x the forward matmul FLOPs (backward = 2x forward),
the convention behind "model FLOP utilisation". For the paper's ViT-B setup (rgb/depth/semseg in, rgb/depth/semseg/
norm_rgb out, 224 px, 98 visible tokens) this gives 67.0 GFLOP per image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class StepShape:
    """What the FLOP count depends on."""

    embed_dim: int
    depth: int
    decoder_dim: int
    decoder_depth: int
    image_size: int = 224
    patch_size: int = 16
    num_encoded_tokens: int = 98
    num_global_tokens: int = 1
    mlp_ratio: float = 4.0
    inputs: tuple[tuple[str, int, int], ...] = (("rgb", 3, 1), ("depth", 1, 1), ("semseg", 64, 4))
    """(name, channels seen by the patch projection, stride level); semseg projects its 64-wide class embedding."""
    outputs: tuple[tuple[str, int, int], ...] = (("rgb", 3, 1), ("depth", 1, 1), ("semseg", 133, 4), ("norm_rgb", 3, 1))
    """(name, output channels, stride level)."""


def _block_macs(n: int, d: int, mlp_ratio: float) -> float:
    """Multiply-adds of one pre-norm transformer block over n tokens of width d."""
    return n * (4 * d * d + 2 * mlp_ratio * d * d) + 2 * n * n * d


def forward_flops(s: StepShape) -> dict[str, float]:
    """Forward FLOPs per image, split into input adapters, encoder and decoders."""
    grid = (s.image_size // s.patch_size) ** 2
    adapters = sum(grid * (c * (s.patch_size // st) ** 2) * s.embed_dim for _, c, st in s.inputs)
    n_enc = s.num_encoded_tokens + s.num_global_tokens
    encoder = s.depth * _block_macs(n_enc, s.embed_dim, s.mlp_ratio)
    dd = s.decoder_dim
    decoders = 0.0
    for _, c, st in s.outputs:
        q = grid
        macs = n_enc * s.embed_dim * dd                      # proj_context
        macs += q * dd * dd + n_enc * dd * 2 * dd             # q, kv
        macs += 2 * q * n_enc * dd + q * dd * dd              # attention + proj
        macs += q * 2 * 4 * dd * dd                           # mlp after cross-attention
        macs += s.decoder_depth * _block_macs(q, dd, 4.0)     # self-attention blocks
        macs += q * dd * c * (s.patch_size // st) ** 2        # out_proj
        decoders += macs
    return {"input_adapters": 2 * adapters, "encoder": 2 * encoder, "decoders": 2 * decoders}


def train_step_flops(s: StepShape) -> float:
    """FLOPs of forward + backward per image (3x forward)."""
    return 3 * sum(forward_flops(s).values())


def matmul_ceiling(dtype_name: str = "float32", device: str = "cpu", n: int = 2048, seconds: float = 2.0) -> float:
    """Sustained FLOP/s of a large square matmul in `dtype_name` on `device` (the same process, the same threads)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return reps * 2 * n**3 / elapsed


if __name__ == "__main__":
    base = StepShape(embed_dim=768, depth=12, decoder_dim=256, decoder_depth=2)
    parts = forward_flops(base)
    print({k: round(v / 1e9, 3) for k, v in parts.items()},
          "train step GFLOP/img:", round(train_step_flops(base) / 1e9, 2))
