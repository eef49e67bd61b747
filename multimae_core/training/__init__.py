"""Framework-agnostic training: reporter / data seams, distributed helpers, optimizer, checkpoints and the loop.

Import the submodules directly (``from multimae_core.training.loop import fit``); the names below are loaded lazily
so that importing the package stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DataSource", "FitResult", "MemoryReporter", "NullReporter", "Reporter", "fit", "train_step"]

_LAZY = {
    "DataSource": "multimae_core.training.reporting",
    "MemoryReporter": "multimae_core.training.reporting",
    "NullReporter": "multimae_core.training.reporting",
    "Reporter": "multimae_core.training.reporting",
    "FitResult": "multimae_core.training.loop",
    "fit": "multimae_core.training.loop",
    "train_step": "multimae_core.training.loop",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'multimae_core.training' has no attribute {name!r}")
