"""Output adapters: turn encoder tokens into a prediction per output modality.

Shapes: B batch, K encoded (visible) tokens, G global tokens, N all patch tokens of all input modalities,
n = nh * nw tokens of one modality's grid, E encoder width, D decoder width, C output channels,
P patch side at the output's resolution.

`SpatialOutputAdapter` is the original's pretraining decoder (MultiMAE paper, section 3.3; original
`SpatialOutputAdapter`): one cross-attention from this modality's queries into all visible tokens, an MLP, optional
self-attention blocks and a linear patch projection. Its `decode` returns patch tokens `[B, n, C * P * P]` (the
training losses take them directly) and `unpatchify` turns them into the image; `decode_spatial` runs several heads
with one shared context projection. `LinearOutputAdapter` is the fine-tuning classifier head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multimae_core.model.blocks import Block, CrossAttention, Mlp, drop_path_rates, layer_norm
from multimae_core.model.pos_embed import build_2d_sincos_posemb, resize_pos_emb

__all__ = ["LinearOutputAdapter", "SpatialOutputAdapter", "TokenLayout", "decode_spatial"]


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

    def query_grid(self, layout: TokenLayout) -> tuple[int, int]:
        """(nh, nw): this head's token grid for inputs of `layout.image_size`."""
        H, W = layout.image_size
        return H // (self.stride_level * self.P_H), W // (self.stride_level * self.P_W)

    def _context_embeddings(self, layout: TokenLayout, grid: tuple[int, int]) -> Tensor:
        """Task embedding + this adapter's pos table for every token of every input modality: `[1, N, D]`."""
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
        """`encoder_tokens_BKE` is `[B, K + G, E]` (visible tokens in `ids_keep` order, global tokens last);
        returns the prediction `[B, C, H/stride, W/stride]`."""
        context_BKD = self.proj_context(encoder_tokens_BKE)
        return self.unpatchify(self.decode(context_BKD, layout, ids_keep_BK, ids_restore_BN), layout)

    def decode(self, context_BTD: Tensor, layout: TokenLayout, ids_keep_BK: Tensor, ids_restore_BN: Tensor,
               ) -> Tensor:
        """Decode already projected encoder tokens (`proj_context` output, `[B, K + G, D]`) into patch predictions
        `[B, n, C * P_H * P_W]`, each token vector in the original's (c, ph, pw) order (see `unpatchify`).

        The original fills the masked positions with the mask token, un-shuffles all N tokens to canonical order,
        adds task + position embeddings everywhere, then slices the queries and re-gathers the visible context. Only
        n query rows and K context rows are built here, with the same values: a query row is the projected visible
        token or the mask token, plus its embedding; a context row is a visible token plus its embedding.
        """
        B, T, _ = context_BTD.shape
        K = T - layout.num_global_tokens
        if ids_keep_BK.shape[1] != K:
            raise ValueError(f"decoder '{self.task}': {T} encoder tokens with {layout.num_global_tokens} global ones, "
                             f"but ids_keep has {ids_keep_BK.shape[1]} visible tokens")
        nh, nw = self.query_grid(layout)
        emb_1ND = self._context_embeddings(layout, (nh, nw))
        visible_BKD, global_BGD = context_BTD[:, :K], context_BTD[:, K:]
        # Context: only the visible tokens (with their embeddings) plus the projected global tokens. Under autocast
        # the projected tokens are low precision and the embeddings fp32; the add promotes, as the original's cat.
        context_BMD = torch.cat([visible_BKD + _gather_tokens(emb_1ND.expand(B, -1, -1), ids_keep_BK), global_BGD],
                                dim=1)
        # Queries: this task's positions (projected visible tokens or mask tokens, with embeddings).
        span = layout.span(self.task) if self.task is not None else None
        if self.use_task_queries and span is not None:
            # ids_restore gives each token's place in "visible (ids_keep order), then masked": < K means visible.
            place_Bn = ids_restore_BN[:, span[0]:span[1]]
            if K > 0:
                picked_BnD = _gather_tokens(visible_BKD, place_Bn.clamp(max=K - 1))
                tokens_BnD = torch.where((place_Bn < K).unsqueeze(-1), picked_BnD, self.mask_token)
            else:
                tokens_BnD = self.mask_token.expand(B, place_Bn.shape[1], -1)
            queries_BnD = tokens_BnD + emb_1ND[:, span[0]:span[1]]
        else:
            pos_nD = resize_pos_emb(self.pos_emb, (nh, nw), mode="bilinear").flatten(2).transpose(1, 2)
            queries_BnD = self.mask_token.expand(B, nh * nw, -1) + pos_nD
            if self.task is not None and self.task in self.task_embeddings:
                queries_BnD = queries_BnD + self.task_embeddings[self.task]

        # Cross-attention WITHOUT a residual (the original's choice), then a residual MLP.
        if self.use_xattn:
            x_BnD = self.decoder(self.query_norm(queries_BnD), self.context_norm(context_BMD))
            x_BnD = x_BnD + self.mlp(self.out_norm(x_BnD))
        else:
            x_BnD = queries_BnD
        x_BnD = self.decoder_transformer(x_BnD)
        return self.out_proj(x_BnD)

    def unpatchify(self, patches_BnX: Tensor, layout: TokenLayout) -> Tensor:
        """Patch predictions `[B, n, C * P_H * P_W]` -> image `[B, C, H/stride, W/stride]`.

        Each token vector is read as (c, ph, pw), the original's rearrange order (its loss patchify uses (ph, pw, c),
        but that only concerns targets, which are images there).
        """
        B = patches_BnX.shape[0]
        nh, nw = self.query_grid(layout)
        x = patches_BnX.reshape(B, nh, nw, self.num_channels, self.P_H, self.P_W)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(B, self.num_channels, nh * self.P_H, nw * self.P_W)

    def no_weight_decay(self) -> set[str]:
        return {"pos_emb", "mask_token", "task_embeddings"}


def decode_spatial(adapters: Sequence[SpatialOutputAdapter], encoder_tokens_BTE: Tensor, layout: TokenLayout,
                   ids_keep_BK: Tensor, ids_restore_BN: Tensor) -> list[Tensor]:
    """Patch predictions of several spatial heads on the same encoder tokens (`SpatialOutputAdapter.decode` each).

    The heads' `proj_context` layers run as one matmul over their concatenated weights (one wide GEMM instead of one
    per head, same values); the rest is each head's own decoder.
    """
    if not adapters:
        return []
    if len(adapters) == 1:
        contexts = [adapters[0].proj_context(encoder_tokens_BTE)]
    else:
        weight = torch.cat([a.proj_context.weight for a in adapters])
        bias = torch.cat([a.proj_context.bias for a in adapters])
        contexts = F.linear(encoder_tokens_BTE, weight, bias).split([a.decoder_embed_dim for a in adapters], dim=-1)
    return [a.decode(c, layout, ids_keep_BK, ids_restore_BN) for a, c in zip(adapters, contexts, strict=True)]


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
