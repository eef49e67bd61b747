"""Checkpoint conversion: original MultiMAE checkpoints in and out, and key maps to/from timm ViTs.

Shapes: D encoder width, n x n token grid, G global tokens. Our module names equal the original's, so the MultiMAE
direction is a plain state dict; `load_original` only has to infer the architecture from the tensors. Loading never
executes code: safetensors, or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from multimae_core.modalities import MODALITIES
from multimae_core.model.input_adapters import PatchInputAdapter, SemSegInputAdapter
from multimae_core.model.multimae import MultiMAE
from multimae_core.model.output_adapters import LinearOutputAdapter, SpatialOutputAdapter

__all__ = ["load_original", "multimae_to_vit", "read_state_dict", "to_original", "vit_to_multimae"]

logger = logging.getLogger(__name__)

_OVERRIDES = {
    "patch_size", "image_size", "input_order", "output_tasks", "strides", "fp32_output_adapters", "drop_rate",
    "attn_drop_rate", "drop_path_rate", "decoder_use_task_queries", "emb_padding_idx", "learnable_pos_emb",
}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(checkpoint: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Tensor]:
    """A state dict from a dict, a `{'model': ...}` dict, a local path or an fsspec URL (safetensors or torch)."""
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if "://" in path and not path.startswith("file://"):
            import fsspec

            with fsspec.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path.removeprefix("file://"), "rb") as f:
                data = f.read()
        checkpoint = _deserialize(data, path)
    if "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        checkpoint = checkpoint["model"]
    state = {}
    for key, value in checkpoint.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"checkpoint: entry '{key}' is a {type(value).__name__}, not a tensor")
        for prefix in _WRAPPER_PREFIXES:  # DDP / torch.compile wrappers
            key = key.removeprefix(prefix)
        state[key] = value
    return state


def _deserialize(data: bytes, name: str) -> Mapping[str, Any]:
    # A torch file is a zip ("PK") or a legacy pickle (0x80); safetensors starts with an 8-byte header length.
    if name.endswith(".safetensors") or not (data[:2] == b"PK" or data[:1] == b"\x80"):
        from safetensors.torch import load

        return load(data)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _indices(state: Mapping[str, Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.fullmatch(pattern, k))}
    if found != set(range(len(found))):
        raise ValueError(f"checkpoint: non-contiguous block indices for {pattern}: {sorted(found)}")
    return len(found)


def _ordered(names: list[str], order: Sequence[str] | None) -> list[str]:
    # safetensors stores keys sorted, so checkpoint order is meaningless: use the registry order (rgb, depth,
    # semseg, ...) unless told otherwise. Token order matters: it fixes ids_keep / ids_restore.
    if order is not None:
        if sorted(order) != sorted(names):
            raise ValueError(f"load_original: input_order {list(order)} must list exactly {names}")
        return list(order)
    known = [n for n in MODALITIES if n in names]
    return known + [n for n in names if n not in known]


def _input_adapter(state: Mapping[str, Tensor], name: str, opts: dict[str, Any]) -> tuple[nn.Module, tuple[int, int]]:
    p, patch = f"input_adapters.{name}.", opts["patch_size"]
    if p + "proj.1.weight" in state:
        raise ValueError(f"checkpoint: {p}proj is an interpolate_class_emb projection, which is not supported")
    weight = state[p + "proj.weight"]
    grid = tuple(state[p + "pos_emb"].shape[-2:])
    stride = opts["strides"].get(name, max(1, patch // weight.shape[-1]))
    geometry = dict(stride_level=stride, patch_size=patch, learnable_pos_emb=opts["learnable_pos_emb"],
                    image_size=opts["image_size"] or (grid[0] * patch, grid[1] * patch))
    if p + "class_emb.weight" in state:
        rows, dim_class_emb = state[p + "class_emb.weight"].shape
        pad = opts["emb_padding_idx"].get(name)
        adapter = SemSegInputAdapter(rows - (pad is not None), dim_class_emb=dim_class_emb, padding_idx=pad,
                                     **geometry)
    else:
        adapter = PatchInputAdapter(weight.shape[1], **geometry)
    return adapter, geometry["image_size"]


def _output_adapter(state: Mapping[str, Tensor], name: str, opts: dict[str, Any], num_heads: int,
                    input_strides: Mapping[str, int]) -> nn.Module:
    p, patch = f"output_adapters.{name}.", opts["patch_size"]
    if p + "head.weight" in state:
        return LinearOutputAdapter(state[p + "head.weight"].shape[0])
    if p + "mask_token" not in state:
        raise ValueError(f"checkpoint: output adapter '{name}' is neither spatial (mask_token) nor linear (head)")
    spec = MODALITIES.get(name)
    stride = opts["strides"].get(name) or (spec.stride_level if spec else input_strides.get(name, 1))
    P = max(1, patch // stride)
    out_rows = state[p + "out_proj.weight"].shape[0]
    if out_rows % (P * P):
        raise ValueError(f"checkpoint: {p}out_proj has {out_rows} rows, not a multiple of {P}x{P} patches")
    dim = state[p + "mask_token"].shape[-1]
    grid = state[p + "pos_emb"].shape[-2:]
    fc1 = state.get(p + "mlp.fc1.weight", state.get(p + "decoder_transformer.0.mlp.fc1.weight"))
    depth = _indices(state, re.escape(p) + r"decoder_transformer\.(\d+)\.norm1\.weight")
    return SpatialOutputAdapter(
        out_rows // (P * P), stride_level=stride, patch_size=patch,
        image_size=opts["image_size"] or (grid[0] * patch, grid[1] * patch),
        decoder_embed_dim=dim, decoder_depth=depth,
        decoder_num_heads=num_heads, mlp_ratio=fc1.shape[0] / dim if fc1 is not None else 4.0,
        qkv_bias=(p + "decoder.q.bias") in state or (p + "decoder_transformer.0.attn.qkv.bias") in state,
        use_xattn=(p + "decoder.q.weight") in state, use_task_queries=opts["decoder_use_task_queries"],
        task=opts["output_tasks"].get(name) or (spec.target_name if spec else name),
        context_tasks=[k[len(p + "task_embeddings."):] for k in state if k.startswith(p + "task_embeddings.")],
        drop_rate=opts["drop_rate"], attn_drop_rate=opts["attn_drop_rate"],
    )


def load_original(checkpoint: Mapping[str, Any] | str | os.PathLike[str], *, num_heads: int,
                  decoder_num_heads: int = 8, **overrides: Any) -> MultiMAE:
    """Build a MultiMAE that matches an original-layout checkpoint, load it strictly, return it in eval mode.

    Inferred from the tensors: encoder width/depth/MLP ratio, global tokens, input and output modalities, channels,
    class counts, image size (pos_emb grid x patch), decoder width/depth and task-embedding keys. Head counts are not
    stored in weights, hence `num_heads` / `decoder_num_heads`.

    Overrides: `patch_size` (16), `image_size`, `input_order`, `output_tasks` ({head: queried modality}),
    `strides` ({modality: stride_level}), `fp32_output_adapters` (default: dense_classes heads), `drop_rate`,
    `attn_drop_rate`, `drop_path_rate`, `decoder_use_task_queries` (True), `emb_padding_idx` ({modality: idx}),
    `learnable_pos_emb` (False).
    """
    unknown = set(overrides) - _OVERRIDES
    if unknown:
        raise TypeError(f"load_original: unknown overrides {sorted(unknown)} (known: {sorted(_OVERRIDES)})")
    opts: dict[str, Any] = dict(patch_size=16, image_size=None, input_order=None, output_tasks={}, strides={},
                                drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, decoder_use_task_queries=True,
                                emb_padding_idx={}, learnable_pos_emb=False) | overrides
    state = read_state_dict(checkpoint)
    if "global_tokens" not in state:
        raise ValueError("checkpoint: no 'global_tokens'; is this a MultiMAE checkpoint (timm ViTs: vit_to_multimae)?")

    def names(group: str) -> list[str]:
        return list(dict.fromkeys(k.split(".")[1] for k in state if k.startswith(group + ".")))

    inputs: dict[str, nn.Module] = {}
    sizes = set()
    for name in _ordered(names("input_adapters"), opts["input_order"]):
        inputs[name], size = _input_adapter(state, name, opts)
        sizes.add(size)
    if len(sizes) > 1:
        raise ValueError(f"checkpoint: input adapters disagree on the image size {sorted(sizes)}; pass image_size")
    strides = {n: a.stride_level for n, a in inputs.items()}
    outputs = {n: _output_adapter(state, n, opts, decoder_num_heads, strides)
               for n in _ordered(names("output_adapters"), None)}
    fp32 = opts.get("fp32_output_adapters")
    if fp32 is None:
        fp32 = [n for n in outputs if n in MODALITIES and MODALITIES[n].kind == "dense_classes"]

    _, G, D = state["global_tokens"].shape
    model = MultiMAE(
        inputs, outputs, embed_dim=D, depth=_indices(state, r"encoder\.(\d+)\.norm1\.weight"), num_heads=num_heads,
        mlp_ratio=state["encoder.0.mlp.fc1.weight"].shape[0] / D if "encoder.0.mlp.fc1.weight" in state else 4.0,
        qkv_bias="encoder.0.attn.qkv.bias" in state, num_global_tokens=G, drop_rate=opts["drop_rate"],
        attn_drop_rate=opts["attn_drop_rate"], drop_path_rate=opts["drop_path_rate"], fp32_output_adapters=fp32,
    )
    model.load_state_dict(state, strict=True)
    logger.info("loaded original MultiMAE: D=%d, depth=%d, inputs=%s, outputs=%s", D, len(model.encoder),
                list(inputs), list(outputs))
    return model.eval()


def to_original(model: nn.Module) -> dict[str, Tensor]:
    """State dict in the original's layout (CPU, contiguous, detached); unwraps DDP and torch.compile."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def vit_to_multimae(vit_state: Mapping[str, Tensor], *, head: str | None = None) -> dict[str, Tensor]:
    """timm ViT (class token, learned pos_embed) -> MultiMAE keys with an rgb input adapter (original vit2multimae).

    `cls_token + pos_embed[:, 0]` becomes the global token (the original mutated the source in place; we do not).
    The final `norm`, `fc_norm` and `head` are dropped unless `head` names a LinearOutputAdapter to receive
    `fc_norm` -> `norm` and `head` -> `head`.
    """
    state = dict(read_state_dict(dict(vit_state)))
    if "cls_token" not in state:
        raise ValueError("vit_to_multimae: the ViT needs a class token (it becomes the global token)")
    pos_1ND = state["pos_embed"]
    out = {"global_tokens": state["cls_token"] + pos_1ND[:, :1]}
    n = math.isqrt(pos_1ND.shape[1] - 1)
    if n * n != pos_1ND.shape[1] - 1:
        raise ValueError(f"vit_to_multimae: pos_embed of {pos_1ND.shape[1] - 1} patches is not a square grid")
    out["input_adapters.rgb.pos_emb"] = pos_1ND[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2).contiguous()
    for key, value in state.items():
        if key.startswith("patch_embed.proj."):
            out["input_adapters.rgb.proj." + key.removeprefix("patch_embed.proj.")] = value
        elif key.startswith("blocks."):
            out["encoder." + key.removeprefix("blocks.")] = value
        elif head is not None and key.startswith(("fc_norm.", "head.")):
            out[f"output_adapters.{head}.{key.replace('fc_norm.', 'norm.')}"] = value
    return out


def multimae_to_vit(state: Mapping[str, Tensor], *, head: str | None = None) -> dict[str, Tensor]:
    """MultiMAE -> timm ViT keys (original multimae2vit); only rgb input and encoder are kept.

    Loads strictly into `timm.create_model("vit_base_patch16_224", num_classes=0, final_norm=False)` (no final norm
    exists to export). With `head` naming a LinearOutputAdapter, its `norm`/`head` become `fc_norm`/`head`; that
    matches `timm.create_model(..., num_classes=N, global_pool="avg", pool_include_prefix=True)`, whose mean
    includes the class token like the original head's mean includes the global token.
    """
    state = read_state_dict(dict(state))
    global_1GD = state["global_tokens"]
    if global_1GD.shape[1] != 1:
        raise ValueError(f"multimae_to_vit: a timm ViT has one class token, the model has {global_1GD.shape[1]}")
    pos_1DHW = state["input_adapters.rgb.pos_emb"]
    pos_1ND = pos_1DHW.flatten(2).transpose(1, 2)
    # The class slot gets a zero position embedding, so timm's cls + pos[0] is exactly the global token.
    out = {"cls_token": global_1GD, "pos_embed": torch.cat([pos_1ND.new_zeros(1, 1, pos_1ND.shape[-1]), pos_1ND], 1)}
    for key, value in state.items():
        if key.startswith("input_adapters.rgb.proj."):
            out["patch_embed.proj." + key.removeprefix("input_adapters.rgb.proj.")] = value
        elif key.startswith("encoder."):
            out["blocks." + key.removeprefix("encoder.")] = value
        elif head is not None and key.startswith(f"output_adapters.{head}."):
            sub = key.removeprefix(f"output_adapters.{head}.")
            out[sub.replace("norm.", "fc_norm.", 1) if sub.startswith("norm.") else sub] = value
    return out
