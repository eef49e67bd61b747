"""MultiMAE in plain PyTorch: masking, model, losses and the training loop.

Importing the package is cheap: it pulls in no torch. `build_model`, `load_original` and `MultiMAE` are loaded on
first attribute access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["MultiMAE", "__version__", "build_model", "load_original"]

if TYPE_CHECKING:
    from multimae_core.model.multimae import MultiMAE
    from multimae_core.model.presets import build_model
    from multimae_core.model.state_dict import load_original

_LAZY = {
    "MultiMAE": "multimae_core.model.multimae",
    "build_model": "multimae_core.model.presets",
    "load_original": "multimae_core.model.state_dict",
}


def __getattr__(name: str) -> Any:
    # PEP 562 lazy attribute: torch is imported only when a model symbol is first used.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'multimae_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
