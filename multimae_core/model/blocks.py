"""Transformer building blocks of MultiMAE: self/cross attention, MLP, pre-norm block, stochastic depth.

Shapes: B batch, N query tokens, M context tokens, D width, h heads, d = D / h head width.

Module and parameter names (`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`, `q`, `kv`) are the
original's, so checkpoints load strictly. We do not reuse timm's `Block`: its attention only takes the SDPA path
when timm's global `use_fused_attn()` switch allows it, and it carries options (layer scale, gates, qk-norm) that
MultiMAE does not have. The math here is the original's; attention goes through `attention`, which differs from the
original's explicit softmax only by float rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Attention",
    "Block",
    "CrossAttention",
    "DropPath",
    "Mlp",
    "attention",
    "attention_kernel",
    "drop_path_rates",
    "layer_norm",
]

AttentionKernel = Literal["auto", "sdpa", "explicit"]
_kernel: AttentionKernel = "auto"
_LOW_PRECISION = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def attention_kernel(kernel: AttentionKernel) -> Iterator[None]:
    """Force one attention implementation inside the block (benchmarks and tests); ``"auto"`` is the default.

    ``"sdpa"`` always calls `F.scaled_dot_product_attention`; ``"explicit"`` always runs matmul, fp32 softmax,
    matmul (attention dropout still goes to SDPA).
    """
    global _kernel
    previous, _kernel = _kernel, kernel
    try:
        yield
    finally:
        _kernel = previous


def _low_precision_on_cpu(q: Tensor) -> bool:
    if q.device.type != "cpu":
        return False
    return q.dtype in _LOW_PRECISION or (torch.is_autocast_enabled("cpu")
                                         and torch.get_autocast_dtype("cpu") in _LOW_PRECISION)


def attention(q: Tensor, k: Tensor, v: Tensor, *, dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two axes (`[..., N, d]` queries, `[..., M, d]` keys and values).

    `F.scaled_dot_product_attention` everywhere except bf16/fp16 on the CPU, where its flash kernel is 3-6x slower
    (forward + backward at ViT-B shapes; BENCHMARKS.md) than two matmuls around a softmax. That explicit path is the
    original's formulation, with the softmax taken in fp32 as CUDA autocast runs it in the original.
    """
    explicit = _kernel == "explicit" or (_kernel == "auto" and _low_precision_on_cpu(q))
    if not explicit or dropout_p > 0.0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v)


def layer_norm(dim: int) -> nn.LayerNorm:
    """LayerNorm with the original's eps of 1e-6 (PyTorch's default is 1e-5)."""
    return nn.LayerNorm(dim, eps=1e-6)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability `drop_prob` while training."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        # One Bernoulli draw per sample, broadcast over all other dims; rescale so the expectation is unchanged.
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (scale d^-0.5)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x_BND: Tensor) -> Tensor:
        B, N, D = x_BND.shape
        # qkv output is laid out (3, h, d) along the last axis, as the original and timm split it.
        qkv = self.qkv(x_BND).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q_BhNd, k_BhNd, v_BhNd = qkv.unbind(0)
        drop = self.attn_drop if self.training else 0.0
        x_BhNd = attention(q_BhNd, k_BhNd, v_BhNd, dropout_p=drop)
        x_BND = x_BhNd.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(x_BND))


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from `x`, keys/values from `context` (separate `q` and fused `kv`)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x_BND: Tensor, context_BMD: Tensor) -> Tensor:
        B, N, D = x_BND.shape
        M = context_BMD.shape[1]
        h, d = self.num_heads, D // self.num_heads
        q_BhNd = self.q(x_BND).reshape(B, N, h, d).transpose(1, 2)
        kv = self.kv(context_BMD).reshape(B, M, 2, h, d).permute(2, 0, 3, 1, 4)
        drop = self.attn_drop if self.training else 0.0
        x_BhNd = attention(q_BhNd, kv[0], kv[1], dropout_p=drop)
        x_BND = x_BhNd.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(x_BND))


class Block(nn.Module):
    """Pre-norm ViT block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`, each branch with stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        # Identity when unused keeps the module tree (and the state dict) free of no-op entries.
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x_BND: Tensor) -> Tensor:
        x_BND = x_BND + self.drop_path(self.attn(self.norm1(x_BND)))
        return x_BND + self.drop_path(self.mlp(self.norm2(x_BND)))


def drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    """Per-block stochastic-depth rates, linearly spaced from 0 to `drop_path_rate` (as the original)."""
    # Explicit CPU device: callers may build the model under a meta-device context, where .tolist() would fail.
    return torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
