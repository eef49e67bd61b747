"""MultiMAE model: adapters, encoder blocks, presets and checkpoint conversion."""

from multimae_core.model.input_adapters import PatchInputAdapter, SemSegInputAdapter
from multimae_core.model.multimae import MultiMAE
from multimae_core.model.output_adapters import LinearOutputAdapter, SpatialOutputAdapter, TokenLayout
from multimae_core.model.presets import PRESETS, build_model
from multimae_core.model.state_dict import load_original, multimae_to_vit, to_original, vit_to_multimae

__all__ = [
    "PRESETS",
    "LinearOutputAdapter",
    "MultiMAE",
    "PatchInputAdapter",
    "SemSegInputAdapter",
    "SpatialOutputAdapter",
    "TokenLayout",
    "build_model",
    "load_original",
    "multimae_to_vit",
    "to_original",
    "vit_to_multimae",
]
