"""Output adapters: turn encoder tokens into a prediction per output modality.

Shapes: B batch, K encoded (visible) tokens, G global tokens, N all patch tokens of all input modalities,
n = nh * nw tokens of one modality's grid, E encoder width, D decoder width, C output channels,
P patch side at the output's resolution.

`SpatialOutputAdapter` is the original's pretraining decoder (MultiMAE paper, section 3.3; original
`SpatialOutputAdapter`): one cross-attention from this modality's queries into all visible tokens, an MLP, optional
self-attention blocks and a linear patch projection. `LinearOutputAdapter` is the fine-tuning classifier head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from multimae_core.model.blocks import Block, CrossAttention, Mlp, drop_path_rates, layer_norm
from multimae_core.model.pos_embed import build_2d_sincos_posemb, resize_pos_emb

__all__ = ["LinearOutputAdapter", "SpatialOutputAdapter", "TokenLayout"]


@dataclass(frozen=True)
class TokenLayout:
    """Where each input modality's tokens sit in the concatenated (unmasked) sequence; the original's `input_info`."""

    modalities: tuple[tuple[str, int], ...]
    """(modality, number of tokens) in concatenation order."""
    image_size: tuple[int, int]
    """Full-resolution input size (H, W) in pixels."""
    num_global_tokens: int
    """Global tokens appended after the patch tokens."""

    @property
    def num_tokens(self) -> int:
        """All patch tokens of all modalities (global tokens excluded)."""
        return sum(n for _, n in self.modalities)

    def span(self, name: str) -> tuple[int, int] | None:
        """[start, end) of a modality's tokens, or None when it is not among the inputs."""
        start = 0
        for modality, n in self.modalities:
            if modality == name:
                return start, start + n
            start += n
        return None


def _gather_tokens(x_BND: Tensor, ids_BK: Tensor) -> Tensor:
    return torch.gather(x_BND, 1, ids_BK.unsqueeze(-1).expand(-1, -1, x_BND.shape[-1]))


class SpatialOutputAdapter(nn.Module):
    """Cross-attention decoder for one dense output: encoder tokens -> `[B, C, H/stride, W/stride]`."""

    def __init__(self, num_channels: int, *, stride_level: int = 1, patch_size: int | tuple[int, int] = 16,
                 image_size: int | tuple[int, int] = 224, decoder_embed_dim: int = 256, decoder_depth: int = 0,
                 decoder_num_heads: int = 8, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, use_task_queries: bool = True,
                 use_xattn: bool = True, task: str | None = None, context_tasks: Sequence[str] | None = None,
                 embed_dim: int | None = None) -> None:
        super().__init__()
        ps = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.num_channels = num_channels
        self.stride_level = stride_level
        self.P_H, self.P_W = max(1, ps[0] // stride_level), max(1, ps[1] // stride_level)
        self.decoder_embed_dim = D = decoder_embed_dim
        self.use_task_queries = use_task_queries
        self.use_xattn = use_xattn
        self.task = task
        self.embed_dim: int | None = None

        # Keys sorted: the original's ParameterDict (torch 1.10) stored plain-dict keys sorted.
        self.task_embeddings = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(1, 1, D)) for t in sorted(context_tasks or [])})
        for emb in self.task_embeddings.values():
            nn.init.trunc_normal_(emb, std=0.02)
        # Stays zero at init, as the original (MAE initialises it with noise; MultiMAE does not).
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        grid = (self.image_size[0] // (stride_level * self.P_H), self.image_size[1] // (stride_level * self.P_W))
        self.pos_emb = nn.Parameter(build_2d_sincos_posemb(*grid, D), requires_grad=False)

        if use_xattn:
            self.decoder = CrossAttention(D, num_heads=decoder_num_heads, qkv_bias=qkv_bias,
                                          attn_drop=attn_drop_rate, proj_drop=drop_rate)
            self.context_norm = layer_norm(D)
            self.query_norm = layer_norm(D)
            self.out_norm = layer_norm(D)
            self.mlp = Mlp(D, int(D * mlp_ratio))
        dpr = drop_path_rates(drop_path_rate, decoder_depth)
        self.decoder_transformer: nn.Module = nn.Sequential(*[
            Block(D, decoder_num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i]) for i in range(decoder_depth)
        ]) if decoder_depth > 0 else nn.Identity()
        self.out_proj = nn.Linear(D, num_channels * self.P_H * self.P_W)
        if embed_dim is not None:
            self.init(embed_dim=embed_dim)

    def init(self, embed_dim: int) -> None:
        """Bind the encoder width: creates `proj_context` (E -> D)."""
        self.embed_dim = embed_dim
        self.proj_context = nn.Linear(embed_dim, self.decoder_embed_dim)

    def _context_embeddings(self, layout: TokenLayout, grid: tuple[int, int], B: int) -> Tensor:
        """Task embedding + this adapter's pos table for every token of every input modality: `[B|1, N, D]`."""
        pos_nD = resize_pos_emb(self.pos_emb, grid, mode="bilinear").flatten(2).transpose(1, 2)[0]
        parts = []
        for name, n in layout.modalities:
            if n != pos_nD.shape[0]:
                raise ValueError(f"modality '{name}' has {n} tokens but the '{self.task}' decoder grid has "
                                 f"{pos_nD.shape[0]}; all input modalities must share one token grid")
            task_1D = self.task_embeddings[name][0] if name in self.task_embeddings else pos_nD.new_zeros(1, n)
            parts.append(task_1D + pos_nD)
        return torch.cat(parts, dim=0).unsqueeze(0)

    def forward(self, encoder_tokens_BKE: Tensor, layout: TokenLayout, ids_keep_BK: Tensor,
                ids_restore_BN: Tensor) -> Tensor:
        """`encoder_tokens_BKE` is `[B, K + G, E]` (visible tokens in `ids_keep` order, global tokens last)."""
        B = encoder_tokens_BKE.shape[0]
        H, W = layout.image_size
        nh, nw = H // (self.stride_level * self.P_H), W // (self.stride_level * self.P_W)
        G = layout.num_global_tokens

        # 1. Project to the decoder width (global tokens included).
        context_BKD = self.proj_context(encoder_tokens_BKE)
        visible_BKD, global_BGD = context_BKD[:, :context_BKD.shape[1] - G], context_BKD[:, context_BKD.shape[1] - G:]
        # 2. Fill masked positions with the mask token and undo the shuffle: canonical order rgb|depth|semseg.
        # (Under autocast the projected tokens are low precision and the mask token fp32; cat promotes.)
        num_masked = layout.num_tokens - visible_BKD.shape[1]
        mask_BMD = self.mask_token.expand(B, num_masked, -1)
        full_BND = _gather_tokens(torch.cat([visible_BKD, mask_BMD], dim=1), ids_restore_BN)
        # 3. Add task + position embeddings at every position.
        full_BND = full_BND + self._context_embeddings(layout, (nh, nw), B)
        # 4. Queries: this task's slice (projected visible tokens or mask tokens, with embeddings).
        span = layout.span(self.task) if self.task is not None else None
        if self.use_task_queries and span is not None:
            queries_BnD = full_BND[:, span[0]:span[1]]
        else:
            pos_nD = resize_pos_emb(self.pos_emb, (nh, nw), mode="bilinear").flatten(2).transpose(1, 2)
            queries_BnD = self.mask_token.expand(B, nh * nw, -1) + pos_nD
            if self.task is not None and self.task in self.task_embeddings:
                queries_BnD = queries_BnD + self.task_embeddings[self.task]
        # 5. Context: only the visible tokens (now with embeddings) plus the projected global tokens.
        context_BKD = torch.cat([_gather_tokens(full_BND, ids_keep_BK), global_BGD], dim=1)

        # 6. Cross-attention WITHOUT a residual (the original's choice), then a residual MLP.
        if self.use_xattn:
            x_BnD = self.decoder(self.query_norm(queries_BnD), self.context_norm(context_BKD))
            x_BnD = x_BnD + self.mlp(self.out_norm(x_BnD))
        else:
            x_BnD = queries_BnD
        x_BnD = self.decoder_transformer(x_BnD)
        x_BnX = self.out_proj(x_BnD)
        # 7. Each token vector is read as (c, ph, pw), the original's rearrange order (the loss patchify uses
        # (ph, pw, c), but that only affects targets, which are images here).
        x = x_BnX.reshape(B, nh, nw, self.num_channels, self.P_H, self.P_W)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(B, self.num_channels, nh * self.P_H, nw * self.P_W)

    def no_weight_decay(self) -> set[str]:
        return {"pos_emb", "mask_token", "task_embeddings"}


class LinearOutputAdapter(nn.Module):
    """Classification head: mean over all encoder tokens (global included) -> LayerNorm -> Linear, `[B, classes]`."""

    def __init__(self, num_classes: int, *, use_mean_pooling: bool = True, init_scale: float = 1.0,
                 embed_dim: int | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.use_mean_pooling = use_mean_pooling
        self.init_scale = init_scale
        self.embed_dim: int | None = None
        if embed_dim is not None:
            self.init(embed_dim=embed_dim)

    def init(self, embed_dim: int) -> None:
        """Bind the encoder width: creates `norm` and `head`."""
        self.embed_dim = embed_dim
        self.norm = layer_norm(embed_dim)
        self.head = nn.Linear(embed_dim, self.num_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """trunc-normal(0.02) x init_scale head (0.001 in the original's ImageNet fine-tuning), zero bias."""
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        self.head.weight.mul_(self.init_scale)
        nn.init.zeros_(self.head.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def forward(self, encoder_tokens_BKE: Tensor, layout: TokenLayout | None = None, ids_keep_BK: Tensor | None = None,
                ids_restore_BN: Tensor | None = None) -> Tensor:
        # Mean pooling includes the global token, as the original; otherwise the (last) global token is used.
        x_BE = encoder_tokens_BKE.mean(1) if self.use_mean_pooling else encoder_tokens_BKE[:, -1]
        return self.head(self.norm(x_BE))
