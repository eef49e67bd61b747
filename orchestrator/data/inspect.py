"""`mmae data inspect`: what a shard folder holds (counts, modalities, class histogram) and a picture grid."""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from multimae_core.data.shards import Manifest, SkipCounter, iter_shard_samples, read_manifest
from multimae_core.modalities import get_modality

__all__ = ["InspectReport", "inspect_folder", "render_grid"]

logger = logging.getLogger(__name__)

TILE = 128
"""Side of one picture in the grid (pixels)."""


@dataclass
class InspectReport:
    """Summary of a shard folder; `scanned` is True when every sample was read (checksums, decoding, histograms)."""

    url: str
    num_samples: int
    num_shards: int
    modalities: list[str]
    encodings: dict[str, str]
    image_size: list[int] | None
    class_counts: dict[str, int] | None
    semseg_pixel_share: dict[str, float] | None = None
    scanned: bool = False
    num_read: int = 0
    num_skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)
    grid: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """Key/value rows for a plain-text table."""
        rows = [
            {"field": "url", "value": self.url},
            {"field": "samples", "value": self.num_samples},
            {"field": "shards", "value": self.num_shards},
            {"field": "modalities", "value": ", ".join(f"{m} ({self.encodings[m]})" for m in self.modalities)},
            {"field": "image size", "value": "x".join(map(str, self.image_size)) if self.image_size else "varied"},
        ]
        if self.class_counts is not None:
            top = sorted(self.class_counts.items(), key=lambda kv: -kv[1])
            shown = ", ".join(f"{k}: {v}" for k, v in top[:12]) + (f", ... ({len(top)} classes)" if len(top) > 12
                                                                     else "")
            rows.append({"field": "classes", "value": shown})
        if self.semseg_pixel_share is not None:
            top = sorted(self.semseg_pixel_share.items(), key=lambda kv: -kv[1])[:12]
            rows.append({"field": "semseg pixels", "value": ", ".join(f"{k}: {v:.1%}" for k, v in top)})
        if self.scanned:
            rows.append({"field": "checked", "value": f"{self.num_read} samples read, checksums verified"})
        if self.num_skipped:
            rows.append({"field": "skipped", "value": f"{self.num_skipped} bad samples"})
        if self.grid:
            rows.append({"field": "grid", "value": self.grid})
        return rows


def _palette(n: int) -> np.ndarray:
    rng = np.random.default_rng(12345)
    pal = rng.integers(40, 256, (max(n, 1), 3)).astype(np.uint8)
    pal[0] = (70, 130, 180)
    return pal


def _turbo(x: np.ndarray) -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps["turbo"](np.clip(x, 0, 1))[..., :3] * 255).astype(np.uint8)


def _picture(name: str, arr: np.ndarray, num_classes: int) -> np.ndarray:
    """One decoded modality as an RGB uint8 picture of TILE x TILE."""
    spec = get_modality(name)
    if spec.kind == "image":
        pic = arr if arr.ndim == 3 else np.repeat(arr[..., None], 3, axis=-1)
        resample = Image.BILINEAR
    elif spec.kind == "dense_classes":
        pic = _palette(max(num_classes, int(arr.max()) + 1))[np.clip(arr, 0, None)]
        resample = Image.NEAREST
    elif arr.ndim == 2:
        # Depth reads best as inverse depth (near = warm); far sky and horizon would squash a linear scale.
        shown = 1.0 / np.maximum(arr, 1e-3) if name == "depth" and arr.min() >= 0 else arr
        lo, hi = np.percentile(shown, [2, 98])
        pic = _turbo((shown - lo) / max(hi - lo, 1e-6))
        resample = Image.BILINEAR
    else:
        pic = np.clip((arr[..., :3] + 1) / 2 * 255, 0, 255).astype(np.uint8)
        resample = Image.BILINEAR
    return np.asarray(Image.fromarray(pic).resize((TILE, TILE), resample))


def render_grid(samples: Sequence[tuple[str, Mapping[str, Any]]], manifest: Manifest) -> Image.Image:
    """One row per sample, one column per modality, with a header row of modality names."""
    mods = list(manifest.modalities)
    num_classes = manifest.num_semseg_classes or 256
    header, label_w = 16, 110
    grid = Image.new("RGB", (label_w + TILE * len(mods), header + TILE * len(samples)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, m in enumerate(mods):
        draw.text((label_w + j * TILE + 4, 2), m, fill=(0, 0, 0))
    for i, (key, sample) in enumerate(samples):
        y = header + i * TILE
        label = key[-16:]
        if "cls" in sample and manifest.class_names:
            label += f"\n{manifest.class_names[sample['cls']][:16]}"
        draw.text((4, y + 4), label, fill=(0, 0, 0))
        for j, m in enumerate(mods):
            grid.paste(Image.fromarray(_picture(m, sample[m], num_classes)), (label_w + j * TILE, y))
    return grid


def _write_png(img: Image.Image, url: str) -> None:
    import fsspec

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    with fsspec.open(url, "wb") as f:
        f.write(buf.getvalue())


def inspect_folder(url: str, *, grid: str | None = None, num: int = 8, scan: bool = False,
                   skip_bad: bool = False) -> InspectReport:
    """Summarise a shard folder; `scan` reads every sample (verifying checksums and decoding each one),
    otherwise only the first `num` samples for the grid are read. `grid` is a PNG path or URL to write."""
    manifest = read_manifest(url)
    counts = None
    if manifest.class_names is not None and manifest.class_counts is not None:
        counts = dict(zip(manifest.class_names, manifest.class_counts, strict=True))
    report = InspectReport(
        url=url, num_samples=manifest.num_samples, num_shards=len(manifest.shards),
        modalities=list(manifest.modalities),
        encodings={m: manifest.encodings[m].format for m in manifest.modalities},
        image_size=list(manifest.image_size) if manifest.image_size else None, class_counts=counts,
        extra=manifest.extra,
    )
    skipped = SkipCounter()
    shown: list[tuple[str, dict[str, Any]]] = []
    semseg = "semseg" if "semseg" in manifest.modalities else None
    sem_hist = np.zeros(0, dtype=np.int64)
    cls_hist = np.zeros(len(manifest.class_names or ()), dtype=np.int64)
    shards = None if scan else list(range(min(len(manifest.shards), max(1, num))))
    for key, sample in iter_shard_samples(url, shards=shards, skip_bad=skip_bad, skipped=skipped):
        report.num_read += 1
        if len(shown) < num:
            shown.append((key, sample))
        if not scan:
            if len(shown) >= num:
                break
            continue
        if semseg:
            h = np.bincount(sample[semseg].ravel())
            sem_hist = np.pad(sem_hist, (0, max(0, len(h) - len(sem_hist))))
            sem_hist[: len(h)] += h
        if "cls" in sample:
            cls_hist[sample["cls"]] += 1
    report.num_skipped, report.skipped_reasons = skipped.count, skipped.reasons
    if scan:
        report.scanned = True
        if manifest.class_names is not None:
            report.class_counts = dict(zip(manifest.class_names, cls_hist.tolist(), strict=True))
        if semseg and sem_hist.sum():
            names = manifest.semseg_classes or ()
            share = sem_hist / sem_hist.sum()
            report.semseg_pixel_share = {
                (names[i] if i < len(names) else str(i)): float(s) for i, s in enumerate(share) if s > 0
            }
    if grid:
        if not shown:
            raise ValueError(f"{url}: no readable sample to draw")
        _write_png(render_grid(shown, manifest), grid)
        report.grid = grid
    return report
