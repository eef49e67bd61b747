"""MultiMAE: per-modality input adapters, a shared ViT encoder over the visible tokens, per-modality decoders.

Shapes: B batch, N all patch tokens of the present input modalities, K visible tokens per sample, G global tokens,
D encoder width. Token order is the order of `input_adapters` (restricted to the modalities present), with the
global tokens appended LAST, as the original (Bachmann et al. 2022, "MultiMAE", section 3; spec section 1).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from multimae_core.masking import masks_to_ids, sample_masks
from multimae_core.model.blocks import Block, drop_path_rates
from multimae_core.model.output_adapters import (
    LinearOutputAdapter,
    SpatialOutputAdapter,
    TokenLayout,
    decode_spatial,
)

__all__ = ["MultiMAE", "encode_unmasked", "tokenize", "with_global_tokens"]

logger = logging.getLogger(__name__)


class MultiMAE(nn.Module):
    """Multi-modal masked autoencoder with the original's module names, so original checkpoints load strictly.

    Args:
        input_adapters: modality -> input adapter (bound here with `init(embed_dim=...)`).
        output_adapters: modality -> output adapter, or None for an encoder only.
        fp32_output_adapters: output adapters run in float32 with autocast disabled (the original runs semseg
            that way, because 133-way logits overflow/underflow in fp16).
    """

    def __init__(self, input_adapters: Mapping[str, nn.Module], output_adapters: Mapping[str, nn.Module] | None = None,
                 *, embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, num_global_tokens: int = 1, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 fp32_output_adapters: Sequence[str] = ()) -> None:
        super().__init__()
        for adapter in input_adapters.values():
            adapter.init(embed_dim=embed_dim)
        for adapter in (output_adapters or {}).values():
            adapter.init(embed_dim=embed_dim)
        self.embed_dim = embed_dim
        self.num_global_tokens = num_global_tokens
        self.fp32_output_adapters = tuple(fp32_output_adapters)
        self.input_adapters = nn.ModuleDict(dict(input_adapters))
        self.output_adapters = nn.ModuleDict(dict(output_adapters or {}))
        self.global_tokens = nn.Parameter(torch.zeros(1, num_global_tokens, embed_dim))
        dpr = drop_path_rates(drop_path_rate, depth)
        self.encoder = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i]) for i in range(depth)
        ])
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The original's from-scratch init (spec 1.2); irrelevant when a checkpoint is loaded afterwards."""
        nn.init.trunc_normal_(self.global_tokens, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                # Fused projections: xavier bounds per Q/K/V slice, i.e. as if each were its own Linear (MAE).
                slices = 3 if name.endswith("qkv") else 2 if name.endswith("kv") else 1
                bound = math.sqrt(6.0 / (m.weight.shape[0] // slices + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d) and name.endswith(".proj"):
                # Patch projections are initialised like a Linear on the flattened kernel (MAE); bias stays
                # PyTorch's default, as the original leaves it.
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
        # The classifier head keeps its own small init (the global pass above would overwrite it).
        for adapter in self.output_adapters.values():
            if isinstance(adapter, LinearOutputAdapter):
                adapter.reset_parameters()

    def no_weight_decay(self) -> set[str]:
        """Parameter names the original's fine-tuning excludes from weight decay."""
        names = {"global_tokens"}
        for group in ("input_adapters", "output_adapters"):
            for key, adapter in getattr(self, group).items():
                if hasattr(adapter, "no_weight_decay"):
                    names |= {f"{group}.{key}.{n}" for n in adapter.no_weight_decay()}
        return names

    def _tokenize(self, inputs: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], TokenLayout]:
        return tokenize(self.input_adapters, inputs, self.num_global_tokens)

    def _with_global(self, tokens_BND: Tensor) -> Tensor:
        return with_global_tokens(tokens_BND, self.global_tokens)

    def _encode_visible(self, tokens: dict[str, Tensor], masks: Mapping[str, Tensor], *,
                        num_visible: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        for name, t in tokens.items():
            if name in masks and tuple(masks[name].shape) != tuple(t.shape[:2]):
                raise ValueError(f"masks.{name}: expected shape {tuple(t.shape[:2])}, got {tuple(masks[name].shape)}")
        tokens_BND = torch.cat(list(tokens.values()), dim=1)
        # Masks may come from CPU collate workers; the ids must live where the tokens are.
        masks = {n: m.to(tokens_BND.device, non_blocking=True) for n, m in masks.items() if n in tokens}
        ids_keep_BK, ids_restore_BN = masks_to_ids(masks, list(tokens), num_visible=num_visible)
        visible_BKD = torch.gather(tokens_BND, 1, ids_keep_BK.unsqueeze(-1).expand(-1, -1, tokens_BND.shape[-1]))
        return self.encoder(self._with_global(visible_BKD)), ids_keep_BK, ids_restore_BN

    def forward_encoder(self, inputs: Mapping[str, Tensor], masks: Mapping[str, Tensor], *,
                        num_encoded_tokens: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Encode the visible tokens: (tokens `[B, K + G, D]` in ids_keep order, ids_keep `[B, K]`,
        ids_restore `[B, N]`). `num_encoded_tokens` is K when known (see `forward`)."""
        tokens, _ = self._tokenize(inputs)
        return self._encode_visible(tokens, masks, num_visible=num_encoded_tokens)

    def forward(self, inputs: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None, *,
                num_encoded_tokens: int | None = None, alphas: float | Mapping[str, float] = 1.0,
                generator: torch.Generator | None = None, patches: bool = False,
                ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Masked forward pass.

        Args:
            inputs: modality -> tensor (`[B, C, H/s, W/s]` float, or `[B, H/s, W/s]` int64 class ids).
            masks: modality -> int64 `[B, N_t]`, 1 = masked. Drawn with `sample_masks` when None (then
                `num_encoded_tokens` is required); normally the data pipeline draws them.
            num_encoded_tokens: K, visible tokens per sample. Without masks: the budget to draw. With masks: their
                known visible count, which keeps shapes static and the step free of host syncs (checked by an
                asynchronous device assert); leave it None for masks of unknown count, which are then counted and
                validated (one host sync on an accelerator).
            patches: Return the spatial heads' predictions as patch tokens `[B, n, C * P * P]` (the decoders'
                output before `SpatialOutputAdapter.unpatchify`), which `losses.compute_patch_losses` takes; the
                training step uses this to skip building full-resolution images.

        Returns:
            (predictions per output adapter, e.g. `[B, C, H/s, W/s]`; the masks used).
        """
        tokens, layout = self._tokenize(inputs)
        if masks is None:
            if num_encoded_tokens is None:
                raise ValueError("forward: pass either masks or num_encoded_tokens")
            B = next(iter(tokens.values())).shape[0]
            masks = sample_masks(dict(layout.modalities), B, num_encoded_tokens, alphas=alphas,
                                 generator=generator, device=next(iter(tokens.values())).device)
        masks = {n: masks[n] for n in tokens if n in masks}
        encoder_tokens, ids_keep, ids_restore = self._encode_visible(tokens, masks, num_visible=num_encoded_tokens)
        preds = self.decode(encoder_tokens, layout, ids_keep, ids_restore)
        if not patches:
            preds = {name: adapter.unpatchify(preds[name], layout) if isinstance(adapter, SpatialOutputAdapter)
                     else preds[name] for name, adapter in self.output_adapters.items()}
        return preds, masks

    def decode(self, encoder_tokens_BTE: Tensor, layout: TokenLayout, ids_keep_BK: Tensor, ids_restore_BN: Tensor,
               ) -> dict[str, Tensor]:
        """Run every output adapter; spatial heads give patch predictions `[B, n, C * P * P]`.

        Spatial heads that share a numeric mode run together (`decode_spatial`: one context projection for all).
        Heads in `fp32_output_adapters` run on fp32 tokens with autocast off, as the original runs semseg.
        """
        device_type = encoder_tokens_BTE.device.type
        mixed = torch.is_autocast_enabled(device_type)
        groups: dict[bool, list[str]] = {False: [], True: []}
        outputs: dict[str, Tensor] = {}
        for name, adapter in self.output_adapters.items():
            fp32 = mixed and name in self.fp32_output_adapters
            if isinstance(adapter, SpatialOutputAdapter):
                groups[fp32].append(name)
            elif fp32:
                with torch.autocast(device_type=device_type, enabled=False):
                    outputs[name] = adapter(encoder_tokens_BTE.float(), layout, ids_keep_BK, ids_restore_BN)
            else:
                outputs[name] = adapter(encoder_tokens_BTE, layout, ids_keep_BK, ids_restore_BN)
        for fp32, names in groups.items():
            adapters = [self.output_adapters[n] for n in names]
            if fp32:
                # Autocast off and fp32 inputs: the original runs the semseg head this way for stable logits.
                with torch.autocast(device_type=device_type, enabled=False):
                    decoded = decode_spatial(adapters, encoder_tokens_BTE.float(), layout, ids_keep_BK,
                                             ids_restore_BN)
            else:
                decoded = decode_spatial(adapters, encoder_tokens_BTE, layout, ids_keep_BK, ids_restore_BN)
            outputs.update(zip(names, decoded, strict=True))
        return {name: outputs[name] for name in self.output_adapters}

    def encode(self, inputs: Mapping[str, Tensor], *, return_layers: Sequence[int] | None = None,
               ) -> Tensor | list[Tensor]:
        """Unmasked encoder for downstream use (the original's MultiViT): `[B, N + G, D]`, global tokens last.

        Args:
            return_layers: 1-based encoder block numbers whose outputs to return (e.g. DPT's [3, 6, 9, 12]);
                None returns the last block's output.
        """
        return encode_unmasked(self.input_adapters, self.encoder, self.global_tokens, inputs,
                               return_layers=return_layers)[0]


def tokenize(input_adapters: Mapping[str, nn.Module], inputs: Mapping[str, Tensor], num_global_tokens: int,
             ) -> tuple[dict[str, Tensor], TokenLayout]:
    """Run the input adapters of the present modalities (adapter order); extra input keys are ignored.

    Returns the tokens per modality (`[B, N_m, D]`) and their `TokenLayout` once concatenated.
    """
    names = [n for n in input_adapters if n in inputs]
    if not names:
        raise ValueError(f"inputs: none of the model's input modalities {list(input_adapters)} is present "
                         f"(got {sorted(inputs)})")
    tokens = {n: input_adapters[n](inputs[n]) for n in names}
    # Full-resolution image size from the first modality: its grid times its stride.
    stride = input_adapters[names[0]].stride_level
    H, W = inputs[names[0]].shape[-2:]
    layout = TokenLayout(tuple((n, t.shape[1]) for n, t in tokens.items()), (H * stride, W * stride),
                         num_global_tokens)
    return tokens, layout


def with_global_tokens(tokens_BND: Tensor, global_tokens_1GD: Tensor) -> Tensor:
    """Append the global tokens after the patch tokens: `[B, N + G, D]`."""
    return torch.cat([tokens_BND, global_tokens_1GD.expand(tokens_BND.shape[0], -1, -1)], dim=1)


def encode_unmasked(input_adapters: Mapping[str, nn.Module], encoder: nn.Sequential, global_tokens_1GD: Tensor,
                    inputs: Mapping[str, Tensor], *, return_layers: Sequence[int] | None = None,
                    ) -> tuple[Tensor | list[Tensor], TokenLayout]:
    """The unmasked encoder pass shared by `MultiMAE.encode` and the fine-tuning model (the original's MultiViT).

    Tokenises the present modalities in adapter order, appends the global tokens and runs the encoder blocks.

    Args:
        return_layers: 1-based block numbers whose outputs to return, in that order; None returns the last block's
            output `[B, N + G, D]`. Blocks after the deepest requested one are not run.

    Returns:
        (the encoder output or the list of requested block outputs, the token layout of the inputs).
    """
    tokens, layout = tokenize(input_adapters, inputs, global_tokens_1GD.shape[1])
    x_BND = with_global_tokens(torch.cat(list(tokens.values()), dim=1), global_tokens_1GD)
    if return_layers is None:
        return encoder(x_BND), layout
    depth = len(encoder)
    bad = [i for i in return_layers if not 1 <= i <= depth]
    if bad:
        raise ValueError(f"return_layers: {bad} out of range 1..{depth}")
    wanted, outputs = set(return_layers), {}
    if not wanted:
        return [], layout
    for i, block in enumerate(encoder, start=1):
        x_BND = block(x_BND)
        if i in wanted:
            outputs[i] = x_BND
        if i >= max(wanted):
            break
    return [outputs[i] for i in return_layers], layout
