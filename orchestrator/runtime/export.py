"""`mmae export`: a run's weights as a timm ViT state dict or as a checkpoint in the original MultiMAE layout.

* ``timm``: the rgb input adapter and the encoder as timm ViT keys (`multimae_to_vit`), written as safetensors with
  the matching ``timm.create_model(...)`` arguments in its metadata (``timm_model``, ``timm_kwargs``). It loads
  strictly into that model and gives the same features as the MultiMAE encoder on rgb (class token first instead
  of the global token last). A fine-tuned classifier (``cls``) comes along as timm's ``fc_norm`` + ``head``.
* ``original``: the whole model in the original's key layout (what `load_original` reads back), as
  ``{"model": state_dict}`` in a ``.pth`` file, or as plain safetensors when OUT ends with ``.safetensors``. Dense
  fine-tuning heads keep this project's module names (the encoder side is the original's).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError
from orchestrator.runtime import pretrained

__all__ = ["EXPORT_FORMATS", "ExportResult", "export_run", "timm_arguments"]

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("timm", "original")
TIMM_BASE_MODEL = "vit_base_patch16_224"
"""timm model name the exported sizes override (any timm ViT name with a class token works the same)."""


@dataclass(frozen=True)
class ExportResult:
    """What `export_run` wrote."""

    path: str
    format: str
    num_tensors: int
    timm_model: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    """Arguments of ``timm.create_model(timm_model, **timm_kwargs)`` that the export loads into (timm format)."""

    def timm_call(self) -> str | None:
        """The ``timm.create_model(...)`` call as Python text."""
        if self.timm_model is None:
            return None
        args = ", ".join(f"{k}={v!r}" for k, v in self.timm_kwargs.items())
        return f"timm.create_model({self.timm_model!r}, pretrained=False, {args})"


def _num_heads(params: dict[str, str], embed_dim: int) -> int:
    """Encoder heads from the run's params (model.num_heads, else the preset's): weights do not store them."""
    from multimae_core.model.presets import PRESETS

    value = params.get("model.num_heads")
    if value and value not in ("null", "None"):
        return int(value)
    preset = PRESETS.get(params.get("model.preset", ""))
    if preset is not None:
        return preset.num_heads
    return max(1, embed_dim // 64)  # ViT convention: 64-wide heads


def timm_arguments(state: dict[str, Any], *, num_heads: int, head: str | None) -> dict[str, Any]:
    """``timm.create_model`` keyword arguments matching a MultiMAE state dict's rgb encoder (and cls head)."""
    proj = state["input_adapters.rgb.proj.weight"]
    embed_dim, _, patch, _ = proj.shape
    grid = state["input_adapters.rgb.pos_emb"].shape[-2:]
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"encoder\.(\d+)\.", k))})
    hidden = state["encoder.0.mlp.fc1.weight"].shape[0]
    kwargs: dict[str, Any] = {
        "img_size": (int(grid[0]) * patch, int(grid[1]) * patch) if grid[0] != grid[1] else int(grid[0]) * patch,
        "patch_size": int(patch), "embed_dim": int(embed_dim), "depth": depth, "num_heads": num_heads,
        "mlp_ratio": hidden / embed_dim, "qkv_bias": "encoder.0.attn.qkv.bias" in state,
    }
    if head is None:
        kwargs.update(num_classes=0, final_norm=False)
    else:
        kwargs.update(num_classes=int(state[f"output_adapters.{head}.head.weight"].shape[0]), global_pool="avg",
                      pool_include_prefix=True)
    return kwargs


def export_run(run_id: str, fmt: str, out: str | Path, *, checkpoint_step: int | None = None) -> ExportResult:
    """Write the weights of ``run_id`` (final, or the checkpoint of ``checkpoint_step``) to ``out`` in ``fmt``."""
    import torch
    from safetensors.torch import save_file

    from multimae_core.model.pretrained import read_init_weights
    from multimae_core.model.state_dict import multimae_to_vit

    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    weights = pretrained.resolve_run_weights(run_id, checkpoint_step=checkpoint_step)
    with tempfile.TemporaryDirectory(prefix="mmae-export-") as tmp:
        local = pretrained.localize(weights.url, tmp)
        try:
            state = read_init_weights(local, "mmae")
        except ValueError as err:
            raise UserError(f"run {run_id}: {str(err).removeprefix('init.checkpoint_url: ')}") from None
    out = Path(out)
    if out.parent and not out.parent.exists():
        raise UserError(f"cannot write {out}: folder {out.parent} does not exist")
    state = {k: v.contiguous() for k, v in state.items()}
    if fmt == "original":
        if out.suffix == ".safetensors":
            save_file(state, str(out), metadata={"format": "pt", "layout": "multimae-original", "run_id": run_id})
        else:
            torch.save({"model": state}, out)
        return ExportResult(path=str(out), format=fmt, num_tensors=len(state))

    if "input_adapters.rgb.proj.weight" not in state:
        inputs = sorted({k.split(".")[1] for k in state if k.startswith("input_adapters.")})
        raise UserError(f"run {run_id} has no rgb input adapter (inputs: {', '.join(inputs)}); a timm ViT reads rgb")
    if state["global_tokens"].shape[1] != 1:
        raise UserError(f"run {run_id} has {state['global_tokens'].shape[1]} global tokens; a timm ViT has one class "
                        f"token")
    head = "cls" if "output_adapters.cls.head.weight" in state else None
    params = _run_params(run_id)
    kwargs = timm_arguments(state, num_heads=_num_heads(params, state["global_tokens"].shape[-1]), head=head)
    vit = {k: v.contiguous() for k, v in multimae_to_vit(state, head=head).items()}
    save_file(vit, str(out), metadata={"format": "pt", "timm_model": TIMM_BASE_MODEL,
                                       "timm_kwargs": json.dumps(kwargs), "run_id": run_id})
    return ExportResult(path=str(out), format=fmt, num_tensors=len(vit), timm_model=TIMM_BASE_MODEL,
                        timm_kwargs=kwargs)


def _run_params(run_id: str) -> dict[str, str]:
    from mlflow import MlflowClient

    try:
        return dict(MlflowClient(tracking_uri=pretrained.tracking_uri()).get_run(run_id).data.params)
    except Exception as err:  # noqa: BLE001 - resolve_run_weights already found the run; params are a nicety
        logger.debug("cannot read the params of %s: %s", run_id, err)
        return {}
