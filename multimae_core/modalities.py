"""Modality registry: what each modality is, how it is tokenised, reconstructed, normalised and scored (torch-free).

Adding a modality is one `register_modality(ModalitySpec(...))` call; the model, losses, data pipeline and config
validation all read this table.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

__all__ = ["MODALITIES", "ModalitySpec", "get_modality", "register_modality"]

COCO_SEMSEG_NUM_CLASSES = 133
"""Classes of the COCO-panoptic label set the original's Mask2Former pseudo-labeler predicts (80 things + 53 stuff)."""


@dataclass(frozen=True)
class ModalitySpec:
    """One modality: tensor layout, adapters, loss and normalisation."""

    name: str
    """Canonical lowercase key used in YAML, ModuleDicts, batches and metric names."""
    kind: Literal["image", "dense_regression", "dense_classes"]
    """image: float [C,H,W]; dense_regression: float [C,H,W] per-pixel values; dense_classes: int64 [H,W] class ids."""
    num_channels: int
    """Tensor channels; for dense_classes the number of classes."""
    stride_level: int = 1
    """Resolution divisor: the tensor is [H/stride, W/stride] (semseg uses 4, as the original)."""
    input_adapter: Literal["patch", "semseg"] | None = "patch"
    """Input adapter kind; None for output-only heads."""
    output_adapter: Literal["spatial"] | None = "spatial"
    """Output adapter kind; None for input-only modalities."""
    loss: Literal["mse", "norm_pix_mse", "l1", "ce"] = "mse"
    """Reconstruction loss of the output head."""
    normalization: Literal["imagenet", "standardize", "none"] = "none"
    """Input normalisation: ImageNet mean/std, per-sample truncated standardisation (depth), or none."""
    target: str | None = None
    """For heads that reconstruct another modality (norm_rgb -> rgb): the modality whose tensor and mask are used."""
    description: str = ""
    """One line for `mmae config schema` and docs."""

    def __post_init__(self) -> None:
        if self.name != self.name.lower() or not self.name.replace("_", "").isalnum():
            raise ValueError(f"modality name must be lowercase alphanumeric/underscore, got {self.name!r}")
        if self.num_channels < 1 or self.stride_level < 1:
            raise ValueError(f"modality {self.name!r}: num_channels and stride_level must be >= 1")
        if self.kind == "dense_classes" and self.loss != "ce":
            raise ValueError(f"modality {self.name!r}: dense_classes needs the 'ce' loss")
        if self.input_adapter == "semseg" and self.kind != "dense_classes":
            raise ValueError(f"modality {self.name!r}: the semseg input adapter needs kind 'dense_classes'")

    @property
    def is_input(self) -> bool:
        """Whether the modality can be fed to the encoder."""
        return self.input_adapter is not None

    @property
    def is_output(self) -> bool:
        """Whether the modality has a reconstruction head."""
        return self.output_adapter is not None

    @property
    def target_name(self) -> str:
        """Modality whose tensor is this head's target (itself unless `target` is set)."""
        return self.target or self.name


MODALITIES: dict[str, ModalitySpec] = {}


def register_modality(spec: ModalitySpec, *, replace: bool = False) -> ModalitySpec:
    """Add a modality to the registry; refuses to overwrite an existing name unless `replace`."""
    if spec.name in MODALITIES and not replace:
        raise ValueError(f"modality {spec.name!r} is already registered")
    if spec.target is not None and spec.target not in MODALITIES:
        raise ValueError(f"modality {spec.name!r}: target {spec.target!r} is not registered")
    MODALITIES[spec.name] = spec
    return spec


def get_modality(name: str) -> ModalitySpec:
    """Look a modality up by name; the error names the closest registered one."""
    try:
        return MODALITIES[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(MODALITIES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown modality '{name}'{hint} (known: {', '.join(MODALITIES)})") from None


register_modality(ModalitySpec(
    name="rgb", kind="image", num_channels=3, loss="mse", normalization="imagenet",
    description="Colour image, ImageNet-normalised; MSE on un-normalised pixels of masked patches.",
))
register_modality(ModalitySpec(
    name="depth", kind="dense_regression", num_channels=1, loss="l1", normalization="standardize",
    description="Depth map, standardised per sample (10-90 % truncated); L1 on masked patches.",
))
register_modality(ModalitySpec(
    name="semseg", kind="dense_classes", num_channels=COCO_SEMSEG_NUM_CLASSES, stride_level=4,
    input_adapter="semseg", loss="ce",
    description="Semantic class ids at 1/4 resolution (COCO panoptic, 133 classes); cross-entropy in fp32.",
))
register_modality(ModalitySpec(
    name="norm_rgb", kind="image", num_channels=3, input_adapter=None, loss="norm_pix_mse", target="rgb",
    description="Extra rgb head trained on per-patch normalised pixels (the 1600-epoch config's norm-pix loss).",
))
register_modality(ModalitySpec(
    name="normal", kind="dense_regression", num_channels=3, loss="l1", normalization="none",
    description="Surface normals (unit vectors, xyz in [-1, 1]); L1 on masked patches.",
))
