"""Size presets and `build_model`, the one place where a `ModelConfig` becomes constructor arguments.

Modules never see a config object: this file reads `ModelConfig` and the modality registry
(`multimae_core.modalities`) and passes plain keyword arguments down.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from multimae_core.config import ModelConfig
from multimae_core.modalities import ModalitySpec, get_modality
from multimae_core.model.input_adapters import PatchInputAdapter, SemSegInputAdapter
from multimae_core.model.multimae import MultiMAE
from multimae_core.model.output_adapters import SpatialOutputAdapter

__all__ = ["PRESETS", "Preset", "build_model"]


@dataclass(frozen=True)
class Preset:
    """Encoder and decoder sizes of one named model size."""

    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int


PRESETS: dict[str, Preset] = {
    # tiny is for smoke tests and CPU runs; its decoder is shrunk with it.
    "tiny": Preset(192, 12, 3, decoder_embed_dim=128, decoder_depth=1, decoder_num_heads=4),
    "small": Preset(384, 12, 6, decoder_embed_dim=256, decoder_depth=2, decoder_num_heads=8),
    # base is the paper's ViT-B with the 1600-epoch config's decoder (256 wide, 2 blocks, 8 heads).
    "base": Preset(768, 12, 12, decoder_embed_dim=256, decoder_depth=2, decoder_num_heads=8),
    "large": Preset(1024, 24, 16, decoder_embed_dim=256, decoder_depth=2, decoder_num_heads=8),
}


def _pick(override: int | None, default: int) -> int:
    return default if override is None else override


def _input_adapter(spec: ModalitySpec, cfg: ModelConfig) -> nn.Module:
    geometry = dict(stride_level=spec.stride_level, patch_size=cfg.patch_size, image_size=cfg.image_size,
                    learnable_pos_emb=cfg.learnable_pos_emb)
    if spec.input_adapter == "patch":
        return PatchInputAdapter(spec.num_channels, **geometry)
    if spec.input_adapter == "semseg":
        return SemSegInputAdapter(spec.num_channels, dim_class_emb=cfg.semseg_dim_class_emb, **geometry)
    raise ValueError(f"modalities.inputs: modality '{spec.name}' has no input adapter (it is output-only)")


def build_model(cfg: ModelConfig, *, inputs: Sequence[str], outputs: Sequence[str]) -> MultiMAE:
    """Build a freshly initialised MultiMAE for the given input and output modalities (token order = `inputs`)."""
    preset = PRESETS[cfg.preset]
    embed_dim = _pick(cfg.embed_dim, preset.embed_dim)
    num_heads = _pick(cfg.num_heads, preset.num_heads)
    if embed_dim % num_heads or embed_dim % 4:
        raise ValueError(f"model.embed_dim ({embed_dim}) must be divisible by model.num_heads ({num_heads}) and 4")
    decoder_embed_dim = _pick(cfg.decoder_embed_dim, preset.decoder_embed_dim)
    decoder_num_heads = _pick(cfg.decoder_num_heads, preset.decoder_num_heads)
    if decoder_embed_dim % decoder_num_heads or decoder_embed_dim % 4:
        raise ValueError(f"model.decoder_embed_dim ({decoder_embed_dim}) must be divisible by "
                         f"model.decoder_num_heads ({decoder_num_heads}) and 4")

    input_adapters = {name: _input_adapter(get_modality(name), cfg) for name in inputs}
    output_adapters: dict[str, nn.Module] = {}
    fp32_outputs = []
    for name in outputs:
        spec = get_modality(name)
        if spec.output_adapter != "spatial":
            raise ValueError(f"modalities.outputs: modality '{name}' has no output adapter (it is input-only)")
        output_adapters[name] = SpatialOutputAdapter(
            spec.num_channels, stride_level=spec.stride_level, patch_size=cfg.patch_size, image_size=cfg.image_size,
            decoder_embed_dim=decoder_embed_dim, decoder_depth=_pick(cfg.decoder_depth, preset.decoder_depth),
            decoder_num_heads=decoder_num_heads, use_task_queries=cfg.decoder_use_task_queries,
            use_xattn=cfg.decoder_use_xattn,
            # A head that reconstructs another modality (norm_rgb -> rgb) queries with that modality's tokens.
            task=spec.target_name, context_tasks=list(inputs),
        )
        if spec.kind == "dense_classes":
            fp32_outputs.append(name)

    return MultiMAE(
        input_adapters, output_adapters, embed_dim=embed_dim, depth=_pick(cfg.depth, preset.depth),
        num_heads=num_heads, mlp_ratio=cfg.mlp_ratio, num_global_tokens=cfg.num_global_tokens,
        drop_path_rate=cfg.drop_path_rate, fp32_output_adapters=fp32_outputs,
    )
