"""Multi-modal data: tar shards with a manifest (`shards`), synthetic scenes (`synth`), joint augmentation
(`transforms`) and the streaming PyTorch loader (`loader`). Importing this package imports neither torch nor PIL;
names are loaded on first use."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Encoding": "shards",
    "Manifest": "shards",
    "ShardDataError": "shards",
    "ShardInfo": "shards",
    "ShardWriter": "shards",
    "iter_shard_samples": "shards",
    "read_manifest": "shards",
    "render_sample": "synth",
    "write_synth": "synth",
    "CropParams": "transforms",
    "JointTransform": "transforms",
    "SampleProcessor": "transforms",
    "ShardDataSource": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
