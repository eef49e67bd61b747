"""Fixed 2-D sin-cos position embeddings (MoCo v3 / MultiMAE) and their resizing.

Shapes: D embed dim, H x W token grid. Tables are stored channels-first, `[1, D, H, W]`, as the original keeps them,
so that `F.interpolate` can resize them to another grid directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["build_2d_sincos_posemb", "resize_pos_emb"]


def build_2d_sincos_posemb(h: int, w: int, embed_dim: int, *, temperature: float = 10000.0) -> Tensor:
    """2-D sin-cos table `[1, D, h, w]`, float32, laid out as the original MultiMAE builds it.

    With k = 0..D/4-1 and omega_k = 1 / temperature^(k / (D/4)), the channels at grid cell (row r, col c) are four
    contiguous blocks `[sin(r omega), cos(r omega), sin(c omega), cos(c omega)]` (not interleaved).

    On square grids this is bit-identical to the original's `build_2d_sincos_posemb`. On non-square grids the
    original's meshgrid/flatten order mixes rows and columns up; we keep the intended (r, c) layout instead, since
    no official checkpoint uses a non-square table.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for a 2-D sin-cos embedding, got {embed_dim}")
    pos_dim = embed_dim // 4
    # Same float32 op sequence as the original, so square tables match it exactly.
    omega_K = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
    omega_K = 1.0 / (temperature**omega_K)
    rows_HW = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w).flatten()
    cols_HW = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w).flatten()
    out_r = rows_HW[:, None] * omega_K[None, :]
    out_c = cols_HW[:, None] * omega_K[None, :]
    table_ND = torch.cat([out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()], dim=1)
    return table_ND.reshape(1, h, w, embed_dim).permute(0, 3, 1, 2).contiguous()


def resize_pos_emb(pos_emb: Tensor, size: tuple[int, int], *, mode: str) -> Tensor:
    """Resize a `[1, D, h, w]` table to `size` (align_corners=False); identity when the grid already matches.

    The original interpolates on every call; at scale 1 bicubic and bilinear interpolation are exact identities
    (the kernel weights are [0, 1, 0, 0]), so skipping the call changes no value and saves a kernel launch.
    """
    if tuple(pos_emb.shape[-2:]) == tuple(size):
        return pos_emb
    return F.interpolate(pos_emb, size=size, mode=mode, align_corners=False)
