"""Starting weights for fine-tuning: read them in any supported format and load them into a `FinetuneModel`.

Formats (`init.format`): ``mmae`` (this project's safetensors, the original MultiMAE key layout), ``original-multivit``
(the original's released MultiViT ``.pth``, same keys), ``original-timm`` and ``timm-vit`` (timm ViT keys: the
original's timm-format release, MAE, timm). timm weights become MultiMAE keys with `vit_to_multimae`: the rgb adapter
and the encoder are filled, everything else keeps its fresh init. Reading never executes code (safetensors, or
`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from multimae_core.model.heads import EncoderLoadReport, load_pretrained_encoder
from multimae_core.model.state_dict import read_state_dict, vit_to_multimae

__all__ = [
    "FORMATS",
    "InitReport",
    "initialise_finetune_model",
    "read_init_weights",
    "unreadable_reason",
    "weights_file",
]

logger = logging.getLogger(__name__)

FORMATS = ("mmae", "original-multivit", "original-timm", "timm-vit")
_TIMM_FORMATS = ("original-timm", "timm-vit")
MODEL_FILE = "model.safetensors"
"""Weights file inside a checkpoint folder."""


def weights_file(url: str) -> str:
    """The file to read for ``url``: ``<url>/model.safetensors`` when ``url`` is a (checkpoint) folder."""
    if "://" in url and not url.startswith("file://"):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        if fs.isdir(path):
            return f"{url.rstrip('/')}/{MODEL_FILE}"
        return url
    local = url.removeprefix("file://")
    return os.path.join(local, MODEL_FILE) if os.path.isdir(local) else url


def read_init_weights(url: str, fmt: str = "mmae") -> dict[str, Tensor]:
    """A MultiMAE-layout state dict from the weights at ``url`` in format ``fmt`` (see the module docstring).

    Raises ValueError naming ``url`` when the file is missing, is not a state dict of tensors, or holds keys of
    another format than ``fmt``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"init.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    path = weights_file(url)
    try:
        state = read_state_dict(path)
    except FileNotFoundError:
        raise ValueError(f"init.checkpoint_url: no weights at {path}") from None
    except ValueError as err:
        raise ValueError(f"init.checkpoint_url: {path} is not a state dict of tensors ({err})") from None
    except Exception as err:  # noqa: BLE001 - safetensors / unpickler errors: the file is not a weights file
        raise ValueError(f"init.checkpoint_url: {path} is not a state dict of tensors ({unreadable_reason(err)})"
                         ) from None
    if not state:
        raise ValueError(f"init.checkpoint_url: {path} holds no tensors")
    timm_keys = "cls_token" in state and any(k.startswith("blocks.") for k in state)
    if fmt in _TIMM_FORMATS:
        if not timm_keys:
            raise ValueError(f"init.format {fmt}: {path} has no timm ViT keys (cls_token, blocks.*); "
                             f"{'set init.format=mmae' if 'global_tokens' in state else 'not a ViT checkpoint'}")
        return vit_to_multimae(state)
    if "global_tokens" not in state:
        hint = "; set init.format=timm-vit" if timm_keys else ""
        raise ValueError(f"init.format {fmt}: {path} has no MultiMAE keys (global_tokens, encoder.*){hint}")
    return state


def unreadable_reason(err: BaseException) -> str:
    """Why a weights file could not be read, in a few words (the unpickler's own message is a page long)."""
    import pickle

    if isinstance(err, pickle.UnpicklingError):
        return "the unpickler refused it (not a plain state dict of tensors); nothing in it was executed"
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


@dataclass(frozen=True)
class InitReport:
    """What `initialise_finetune_model` did."""

    encoder: EncoderLoadReport
    """The encoder-side load (resized / padded / dropped keys)."""
    head_loaded: bool
    """The checkpoint held the model's head (a fine-tuned checkpoint) and it was loaded too."""


def initialise_finetune_model(model: nn.Module, state: Mapping[str, Tensor], *, allow_new_inputs: bool = False,
                              require_head: bool = False, source: str = "checkpoint") -> InitReport:
    """Load ``state`` (MultiMAE layout) into a `FinetuneModel`: the encoder side as the original's fine-tuning
    scripts do (`load_pretrained_encoder`), plus the head when the checkpoint holds one of the same name and sizes.

    Pretraining decoders (`output_adapters.<modality>.*`) are told apart from a fine-tuned head by their key names.
    With ``require_head`` (evaluation of a fine-tuned model) a missing or different head is a ValueError.
    """
    report = load_pretrained_encoder(model, state, allow_new_inputs=allow_new_inputs, source=source)
    prefix = f"output_adapters.{model.name}."
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    given = {k: v for k, v in state.items() if k.startswith(prefix)}
    fits = bool(own) and given.keys() == own.keys() and all(given[k].shape == v.shape for k, v in own.items())
    if fits:
        head = {k.removeprefix(prefix): v for k, v in given.items()}
        model.output_adapters[model.name].load_state_dict(head, strict=True)
        logger.info("%s: loaded the fine-tuned %s head too", source, model.name)
    elif require_head:
        why = "has none" if not given else "holds one of other keys or sizes"
        raise ValueError(f"{source}: the weights must include the job's fine-tuned '{model.name}' head "
                         f"(output_adapters.{model.name}.*) but {why}; are they from a fine-tuning run of this job?")
    return InitReport(encoder=report, head_loaded=fits)
