"""AdamW parameter groups and the learning-rate schedule as a pure function of the optimizer step.

Pretraining (spec section 6) decays every trainable parameter; fine-tuning (spec 7.1) exempts 1-D parameters, biases,
tokens and embeddings and may scale the rate per layer (layer-wise decay).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from multimae_core.config import OptimConfig

__all__ = [
    "NO_DECAY_NAME_PARTS",
    "build_optimizer",
    "layer_id",
    "lr_at",
    "param_groups",
    "peak_lr",
    "set_lr",
]

logger = logging.getLogger(__name__)

NO_DECAY_NAME_PARTS = ("global_tokens", "mask_token", "cls_token", "pos_emb", "pos_embed", "task_embeddings",
                       "class_emb")
"""Name fragments of parameters exempt from weight decay when ``optim.decay_all_params`` is False."""

_LAYER_ZERO_NAMES = ("global_tokens", "mask_token", "cls_token", "pos_embed")


def peak_lr(optim: OptimConfig, global_batch_size: int) -> float:
    """``optim.lr`` when set, else the linear scaling rule ``blr * global_batch_size / 256``."""
    return optim.lr if optim.lr is not None else optim.blr * global_batch_size / 256


def lr_at(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup from 0, then half-cosine to ``min_lr``.

    Step 0 of a warmup runs at 0, as the original's per-iteration schedule does. Past ``total_steps`` the rate stays
    at ``min_lr``.
    """
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def layer_id(name: str, num_layers: int) -> int:
    """Layer index for layer-wise decay: input adapters and global tokens 0, ``encoder.k`` k+1, the rest L+1."""
    if name.startswith("input_adapters.") or name.split(".")[0] in _LAYER_ZERO_NAMES:
        return 0
    if name.startswith("encoder."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def _exempt_from_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or any(part in name for part in NO_DECAY_NAME_PARTS)


def param_groups(model: nn.Module, *, weight_decay: float, decay_all_params: bool = True,
                 layer_decay: float | None = None, num_layers: int | None = None) -> list[dict[str, Any]]:
    """AdamW parameter groups over the trainable parameters, in registration order within each group.

    Each group carries ``weight_decay`` and ``lr_scale`` (multiplied into the scheduled rate by `set_lr`).

    Args:
        decay_all_params: Decay everything, as the original pretraining does; False exempts 1-D parameters, biases,
            tokens and position / class / task embeddings.
        layer_decay: Layer-wise rate decay: a parameter of layer ``i`` (see `layer_id`) gets
            ``layer_decay ** (num_layers + 1 - i)``. Needs ``num_layers`` (the encoder depth).
    """
    if layer_decay is not None and num_layers is None:
        raise ValueError("optim.layer_decay needs the number of encoder layers")
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = decay_all_params or not _exempt_from_decay(name, param)
        lid = layer_id(name, num_layers) if layer_decay is not None and num_layers is not None else 0
        key = (lid, decay)
        if key not in groups:
            scale = layer_decay ** (num_layers + 1 - lid) if layer_decay is not None and num_layers is not None else 1.0
            groups[key] = {"params": [], "param_names": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": scale}
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


def build_optimizer(model: nn.Module, optim: OptimConfig, *, num_layers: int | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups`; rates are set per step by `set_lr`.

    Fused kernels (one pass over parameter, gradient and both moments) when every parameter is a CUDA or CPU float
    tensor: on the CPU that is ~4x faster than foreach for ViT-B (BENCHMARKS.md), and on CUDA it also takes the
    GradScaler's inf check without a host sync. Foreach elsewhere.
    """
    groups = param_groups(model, weight_decay=optim.weight_decay, decay_all_params=optim.decay_all_params,
                          layer_decay=optim.layer_decay, num_layers=num_layers)
    params = [p for g in groups for p in g["params"]]
    devices = {p.device.type for p in params}
    fused = len(devices) == 1 and devices <= {"cuda", "cpu"} and all(p.is_floating_point() for p in params)
    kwargs: dict[str, Any] = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=0.0, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                             **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's rate to ``lr * group['lr_scale']``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
