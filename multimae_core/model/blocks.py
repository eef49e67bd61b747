"""Transformer building blocks of MultiMAE: self/cross attention, MLP, pre-norm block, stochastic depth.

Shapes: B batch, N query tokens, M context tokens, D width, h heads, d = D / h head width.

Module and parameter names (`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`, `q`, `kv`) are the
original's, so checkpoints load strictly. We do not reuse timm's `Block`: its attention only takes the SDPA path
when timm's global `use_fused_attn()` switch allows it, and it carries options (layer scale, gates, qk-norm) that
MultiMAE does not have. The math here is the original's; attention goes through
`F.scaled_dot_product_attention`, which differs from the original's explicit softmax only by float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Attention", "Block", "CrossAttention", "DropPath", "Mlp", "drop_path_rates", "layer_norm"]


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
        x_BhNd = F.scaled_dot_product_attention(q_BhNd, k_BhNd, v_BhNd, dropout_p=drop)
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
        x_BhNd = F.scaled_dot_product_attention(q_BhNd, kv[0], kv[1], dropout_p=drop)
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
