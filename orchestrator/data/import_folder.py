"""`mmae data import-folder`: the original MultiMAE folder layout -> shards.

Layout: `ROOT/<modality>/<class>/<file>` (`ROOT/rgb/n01440764/x.JPEG`, `ROOT/depth/n01440764/x.png`, ...). The
original pairs files by their sorted position in each folder; here files are paired by name (the stem before the
extension), and any file without a partner in every modality, or class folder missing in one, is listed and the
import refused. Samples are shuffled (seeded) before sharding so that shards mix classes. Files that are valid
images are copied byte for byte; others are re-encoded.
"""

from __future__ import annotations

import io
import logging
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from multimae_core.data.shards import Encoding, Manifest, ShardWriter, open_folder
from multimae_core.modalities import COCO_SEMSEG_NUM_CLASSES, MODALITIES, get_modality

__all__ = ["ImportResult", "PairingError", "import_folder", "pair_files"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_SAFE = re.compile(r"[^A-Za-z0-9_\-]")


class PairingError(ValueError):
    """Files that do not pair up across modalities; `problems` lists every one."""

    def __init__(self, root: str, problems: list[str]):
        self.problems = problems
        shown = "; ".join(problems[:20]) + (f"; ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        super().__init__(f"{root}: files do not pair up across modalities ({len(problems)} problems): {shown}")


@dataclass
class ImportResult:
    manifest: Manifest
    num_skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Pair:
    cls: int
    key: str
    paths: dict[str, str]


def pair_files(fs, root: str, modalities: Sequence[str]) -> tuple[list[str], list[_Pair]]:
    """(class names, pairs) of the tree; raises PairingError listing every file or folder without a partner."""
    problems: list[str] = []
    by_mod: dict[str, dict[str, dict[str, str]]] = {}  # modality -> class -> stem -> path
    for m in modalities:
        classes: dict[str, dict[str, str]] = {}
        for entry in sorted(fs.ls(f"{root}/{m}", detail=True), key=lambda e: e["name"]):
            if entry["type"] != "directory":
                continue
            cname = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            stems: dict[str, str] = {}
            for path in sorted(fs.ls(entry["name"], detail=False)):
                base = path.rsplit("/", 1)[-1]
                stem, ext = (base.rsplit(".", 1) + [""])[:2]
                if f".{ext.lower()}" not in IMAGE_EXTENSIONS:
                    continue
                if stem in stems:
                    problems.append(f"{m}/{cname}/{stem}.* appears twice")
                stems[stem] = path
            classes[cname] = stems
        by_mod[m] = classes
    class_names = sorted(set().union(*(set(c) for c in by_mod.values())))
    for cname in class_names:
        missing = [m for m in modalities if cname not in by_mod[m]]
        if missing:
            problems.append(f"class folder '{cname}' missing in {', '.join(missing)}")
    pairs: list[_Pair] = []
    keys: dict[str, str] = {}
    for ci, cname in enumerate(class_names):
        if any(cname not in by_mod[m] for m in modalities):
            continue
        stems = sorted(set().union(*(set(by_mod[m][cname]) for m in modalities)))
        for stem in stems:
            have = {m: by_mod[m][cname].get(stem) for m in modalities}
            lacking = [m for m, p in have.items() if p is None]
            if lacking:
                present = next(p for p in have.values() if p is not None)
                rel = present[len(root) + 1:] if present.startswith(root + "/") else present
                problems.append(f"{rel} has no partner in {', '.join(lacking)}")
                continue
            key = f"{_SAFE.sub('_', cname)}/{_SAFE.sub('_', stem)}"
            if key in keys:
                problems.append(f"{cname}/{stem} and {keys[key]} map to the same sample key {key!r}")
                continue
            keys[key] = f"{cname}/{stem}"
            pairs.append(_Pair(ci, key, have))
    if problems:
        raise PairingError(root, problems)
    return class_names, pairs


def _ordered_map(fn: Callable, items: Iterable, workers: int, window: int = 64) -> Iterator:
    """Like ThreadPoolExecutor.map, in order, with at most `window` items in flight (bounded memory)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class _Converter:
    """Checks and converts the files of one sample; encodings are fixed from the first sample."""

    def __init__(self, fs, modalities: Sequence[str], encodings: Mapping[str, Encoding]):
        self.fs, self.modalities, self.encodings = fs, modalities, encodings

    def __call__(self, pair: _Pair) -> tuple[_Pair, dict[str, bytes] | None, tuple[int, int] | None, str | None]:
        files: dict[str, bytes] = {}
        size = None
        try:
            for m in self.modalities:
                path = pair.paths[m]
                blob, img = _open(self.fs, path)
                files.update(self._convert(m, path, blob, img))
                if size is None:
                    size = (m, img.size)
                elif img.size != size[1]:
                    raise ValueError(f"{path}: modalities of different sizes: {size[0]} is {size[1][1]}x{size[1][0]}, "
                                     f"{m} is {img.size[1]}x{img.size[0]} (HxW)")
        except ValueError as err:
            return pair, None, None, str(err)
        files["cls"] = str(pair.cls).encode()
        return pair, files, (size[1][1], size[1][0]), None

    def _convert(self, m: str, path: str, blob: bytes, img: Image.Image) -> dict[str, bytes]:
        spec, enc = get_modality(m), self.encodings[m]
        if spec.kind == "image":
            want = "JPEG" if enc.format == "jpg" else "PNG"
            if img.format == want and img.mode == "RGB":
                return {f"{m}.{enc.ext}": blob}
            rgb = img.convert("RGB")
            buf = io.BytesIO()
            rgb.save(buf, format=want, **({"quality": 95} if want == "JPEG" else {}))
            return {f"{m}.{enc.ext}": buf.getvalue()}
        mode16 = img.mode in ("I;16", "I;16B", "I;16L", "I")
        if spec.kind == "dense_classes":
            if img.mode not in ("L", "P") and not mode16:
                raise ValueError(f"{path}: {m} must be a 1-channel image of class ids, got mode {img.mode!r}")
        elif spec.num_channels == 1 and (enc.format == "png16") != mode16:
            raise ValueError(f"{path}: unexpected {m} encoding: mode {img.mode!r}, the first {m} file was "
                             f"{'16' if enc.format == 'png16' else '8'}-bit")
        if img.format == "PNG" and (not mode16 or enc.format == "png16"):
            return {f"{m}.png": blob}
        return {f"{m}.png": _png(np.asarray(img))}


def _open(fs, path: str) -> tuple[bytes, Image.Image]:
    blob = fs.cat_file(path)
    try:
        img = Image.open(io.BytesIO(blob))
        img.load()
    except Exception as err:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise ValueError(f"{path}: undecodable image ({type(err).__name__}: {err})") from None
    return blob, img


def _encodings(fs, first: _Pair, modalities: Sequence[str], num_semseg_classes: int) -> dict[str, Encoding]:
    enc: dict[str, Encoding] = {}
    for m in modalities:
        spec = get_modality(m)
        _, img = _open(fs, first.paths[m])
        mode16 = img.mode in ("I;16", "I;16B", "I;16L", "I")
        if spec.kind == "image":
            enc[m] = Encoding("jpg" if img.format == "JPEG" else "png8")
        elif spec.kind == "dense_classes":
            enc[m] = Encoding("png16" if mode16 or num_semseg_classes > 256 else "png8")
        elif spec.num_channels == 1:
            # The original stores depth as uint16 and reads it as value / 2**16 (relative; it is standardised).
            enc[m] = Encoding("png16", scale=1 / 65536, unit="relative") if mode16 else Encoding(
                "png8", scale=1 / 256, unit="relative")
        else:
            enc[m] = Encoding("png8", scale=2 / 255, offset=-1.0)
    return enc


def import_folder(root: str, out: str, *, modalities: Sequence[str] | None = None, samples_per_shard: int = 256,
                  num_semseg_classes: int = COCO_SEMSEG_NUM_CLASSES, seed: int = 0, skip_bad: bool = False,
                  overwrite: bool = False, workers: int = 8, progress: bool = False) -> ImportResult:
    """Convert `root` (any fsspec URL) into a shard folder at `out`.

    Raises PairingError (nothing written) when files do not pair up; a file that cannot be read, or modalities of
    different sizes, raise ValueError naming the file, or with `skip_bad` are skipped and counted.
    """
    fs, base = open_folder(root)
    if not fs.isdir(base):
        raise ValueError(f"{root}: not a folder")
    subdirs = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(base, detail=True)
                     if e["type"] == "directory")
    if modalities is None:
        modalities = [d for d in subdirs if d in MODALITIES and get_modality(d).is_input]
        ignored = [d for d in subdirs if d not in modalities]
        if ignored:
            logger.warning("%s: ignoring folders that are not modalities: %s", root, ", ".join(ignored))
    else:
        for m in modalities:
            get_modality(m)
        absent = [m for m in modalities if m not in subdirs]
        if absent:
            raise ValueError(f"{root}: no folder for modalities {absent} (found {subdirs})")
    if "rgb" not in modalities:
        raise ValueError(f"{root}: expected ROOT/rgb/<class>/<file> (and depth/, semseg/, ...), found {subdirs}")
    modalities = ["rgb", *sorted(m for m in modalities if m != "rgb")]
    class_names, pairs = pair_files(fs, base, modalities)
    if not pairs:
        raise ValueError(f"{root}: no image files found under {', '.join(f'{m}/<class>/' for m in modalities)}")
    order = np.random.default_rng(seed).permutation(len(pairs))
    pairs = [pairs[i] for i in order]
    encodings = _encodings(fs, pairs[0], modalities, num_semseg_classes)
    writer = ShardWriter(
        out, modalities=modalities, encodings=encodings, samples_per_shard=samples_per_shard,
        class_names=class_names, num_semseg_classes=num_semseg_classes if "semseg" in modalities else None,
        extra={"source": root, "layout": "ROOT/<modality>/<class>/<file>, paired by file name", "seed": seed},
        overwrite=overwrite,
    )
    result_skipped, reasons = 0, []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), desc="import", unit="sample")
    try:
        for pair, files, hw, err in _ordered_map(_Converter(fs, modalities, encodings), pairs, workers):
            if bar is not None:
                bar.update(1)
            if err is not None:
                if not skip_bad:
                    raise ValueError(err)
                result_skipped += 1
                if len(reasons) < 5:
                    reasons.append(err)
                logger.warning("skipping %s: %s", pair.key, err)
                continue
            writer.write_encoded(pair.key, files, size=hw)
    finally:
        if bar is not None:
            bar.close()
    return ImportResult(writer.close(), result_skipped, reasons)
