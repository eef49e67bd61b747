"""Input adapters: one per modality, turning a tensor into encoder tokens plus 2-D sin-cos position embeddings.

Shapes: B batch, C channels, H x W pixels at the modality's resolution, P patch side at that resolution,
nh x nw token grid, N = nh * nw tokens, D encoder width (bound late by `init(embed_dim=...)`).

Adapters are built without the encoder width and bound to it by `MultiMAE`, as the original (and 4M) do, so a
modality can be described once and reused across model sizes. No modality embedding is added on the encoder side:
modalities are told apart only by their projections (MultiMAE paper, section 3).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from multimae_core.model.pos_embed import build_2d_sincos_posemb, resize_pos_emb

__all__ = ["PatchInputAdapter", "SemSegInputAdapter"]


def _pair(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


class _InputAdapter(nn.Module):
    """Shared geometry and late binding of the position table."""

    pos_emb: nn.Parameter

    def __init__(self, *, stride_level: int, patch_size: int | tuple[int, int], image_size: int | tuple[int, int],
                 learnable_pos_emb: bool) -> None:
        super().__init__()
        self.stride_level = stride_level
        self.patch_size = _pair(patch_size)
        self.image_size = _pair(image_size)
        self.learnable_pos_emb = learnable_pos_emb
        # Patch side at this modality's resolution: a stride-4 semseg map uses 4x4 patches for 16x16 pixels.
        self.P_H = max(1, self.patch_size[0] // stride_level)
        self.P_W = max(1, self.patch_size[1] // stride_level)
        self.embed_dim: int | None = None

    @property
    def pos_grid(self) -> tuple[int, int]:
        """Token grid of the stored position table (the grid at `image_size`)."""
        return (self.image_size[0] // (self.stride_level * self.P_H),
                self.image_size[1] // (self.stride_level * self.P_W))

    def _init_pos_emb(self, embed_dim: int) -> None:
        # Frozen by default but kept as a Parameter (not a buffer): it is part of the original's state dict and a
        # Parameter lets `learnable_pos_emb` switch training on without changing keys.
        table = build_2d_sincos_posemb(*self.pos_grid, embed_dim)
        self.pos_emb = nn.Parameter(table, requires_grad=self.learnable_pos_emb)

    def _grid(self, H: int, W: int) -> tuple[int, int]:
        if H % self.P_H or W % self.P_W:
            raise ValueError(f"input of {H}x{W} is not divisible into {self.P_H}x{self.P_W} patches")
        return H // self.P_H, W // self.P_W

    def no_weight_decay(self) -> set[str]:
        return {"pos_emb"}


class PatchInputAdapter(_InputAdapter):
    """Dense image-like input `[B, C, H, W]` -> tokens `[B, N, D]` via a strided Conv2d patch embedding."""

    def __init__(self, num_channels: int, *, stride_level: int = 1, patch_size: int | tuple[int, int] = 16,
                 image_size: int | tuple[int, int] = 224, learnable_pos_emb: bool = False,
                 embed_dim: int | None = None) -> None:
        super().__init__(stride_level=stride_level, patch_size=patch_size, image_size=image_size,
                         learnable_pos_emb=learnable_pos_emb)
        self.num_channels = num_channels
        if embed_dim is not None:
            self.init(embed_dim=embed_dim)

    def init(self, embed_dim: int) -> None:
        """Bind the encoder width: creates `pos_emb` and `proj`."""
        self.embed_dim = embed_dim
        self._init_pos_emb(embed_dim)
        self.proj = nn.Conv2d(self.num_channels, embed_dim, kernel_size=(self.P_H, self.P_W),
                              stride=(self.P_H, self.P_W))

    def forward(self, x_BCHW: Tensor) -> Tensor:
        nh, nw = self._grid(*x_BCHW.shape[-2:])
        tokens_BND = self.proj(x_BCHW).flatten(2).transpose(1, 2)
        # The original resizes rgb/depth tables with bicubic (semseg uses bilinear; see below).
        pos_BND = resize_pos_emb(self.pos_emb, (nh, nw), mode="bicubic").flatten(2).transpose(1, 2)
        return tokens_BND + pos_BND


class SemSegInputAdapter(_InputAdapter):
    """Class-id map `[B, H, W]` (int64) -> tokens `[B, N, D]` via a class embedding and a strided Conv2d."""

    def __init__(self, num_classes: int, *, stride_level: int = 4, patch_size: int | tuple[int, int] = 16,
                 image_size: int | tuple[int, int] = 224, dim_class_emb: int = 64, padding_idx: int | None = None,
                 learnable_pos_emb: bool = False, embed_dim: int | None = None) -> None:
        super().__init__(stride_level=stride_level, patch_size=patch_size, image_size=image_size,
                         learnable_pos_emb=learnable_pos_emb)
        # As the original: a padding index adds one extra embedding row (133 classes + pad -> 134 rows).
        self.num_classes = num_classes + (1 if padding_idx is not None else 0)
        self.dim_class_emb = dim_class_emb
        self.padding_idx = padding_idx
        if embed_dim is not None:
            self.init(embed_dim=embed_dim)

    def init(self, embed_dim: int) -> None:
        """Bind the encoder width: creates `pos_emb`, `class_emb` and `proj`."""
        self.embed_dim = embed_dim
        self._init_pos_emb(embed_dim)
        self.class_emb = nn.Embedding(self.num_classes, self.dim_class_emb, padding_idx=self.padding_idx)
        self.reset_class_emb()
        self.proj = nn.Conv2d(self.dim_class_emb, embed_dim, kernel_size=(self.P_H, self.P_W),
                              stride=(self.P_H, self.P_W))

    @torch.no_grad()
    def reset_class_emb(self) -> None:
        """trunc-normal(0.02) class table; the padding row (if any) stays zero so padded pixels add nothing."""
        nn.init.trunc_normal_(self.class_emb.weight, std=0.02)
        if self.padding_idx is not None:
            self.class_emb.weight[self.padding_idx].zero_()

    def forward(self, x_BHW: Tensor) -> Tensor:
        nh, nw = self._grid(*x_BHW.shape[-2:])
        emb_BEHW = self.class_emb(x_BHW).permute(0, 3, 1, 2)
        tokens_BND = self.proj(emb_BEHW).flatten(2).transpose(1, 2)
        # The original resizes the semseg table with bilinear, unlike the bicubic of the patch adapter.
        pos_BND = resize_pos_emb(self.pos_emb, (nh, nw), mode="bilinear").flatten(2).transpose(1, 2)
        return tokens_BND + pos_BND

    def no_weight_decay(self) -> set[str]:
        return {"pos_emb", "class_emb"}
