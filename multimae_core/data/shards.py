"""Multi-modal tar shards (WebDataset layout) with a manifest, written and read through fsspec (torch-free).

A shard folder holds `manifest.json` and `shard-NNNNNN.tar` files. Each sample is a run of consecutive tar members
sharing a key: `<key>.rgb.png|jpg`, `<key>.depth.png` (16-bit), `<key>.semseg.png` (class ids, 8- or 16-bit),
`<key>.normal.png`, any further registered modality as `<key>.<name>.png`, and an optional `<key>.cls` (text int).
Stored values decode as `value = raw * scale + offset` with the per-modality `Encoding` recorded in the manifest.
The manifest is written last, so a folder without one is an unfinished write. Tars are written with fixed member
metadata, so the same samples give byte-identical shards and the same sha256.

Decoded samples are numpy arrays at full resolution (H, W): rgb uint8 [H,W,3], depth float32 [H,W] (in `unit`),
class maps int32 [H,W], normals float32 [H,W,3], cls int.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import re
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image

from multimae_core.modalities import get_modality

__all__ = [
    "DEFAULT_ENCODINGS",
    "MANIFEST_NAME",
    "Encoding",
    "Manifest",
    "ShardDataError",
    "ShardInfo",
    "ShardWriter",
    "SkipCounter",
    "check_shard_bytes",
    "decode_record",
    "default_encoding",
    "encode_sample",
    "iter_records",
    "iter_shard_samples",
    "open_folder",
    "prefetch_shards",
    "read_manifest",
    "read_shard_bytes",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT = "mmae-shards"
FORMAT_VERSION = 1
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-/]+$")


class ShardDataError(ValueError):
    """A bad shard or sample; the message names the shard and, where known, the sample key."""

    def __init__(self, shard: str, key: str | None, message: str):
        self.shard, self.key, self.reason = shard, key, message
        where = f"shard {shard}" + (f", sample {key!r}" if key is not None else "")
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Encoding:
    """How one modality is stored: file format and the affine map from stored integers to values."""

    format: Literal["png8", "png16", "jpg", "text"]
    """png8/png16: 8/16-bit PNG (1 or 3 channels); jpg: 8-bit JPEG; text: a decimal integer (cls)."""
    scale: float = 1.0
    """value = raw * scale + offset."""
    offset: float = 0.0
    """value = raw * scale + offset."""
    unit: str = ""
    """Unit of the decoded values, e.g. 'm' for metric depth or 'relative'."""

    @property
    def ext(self) -> str:
        return {"png8": "png", "png16": "png", "jpg": "jpg", "text": "txt"}[self.format]


DEFAULT_ENCODINGS: dict[str, Encoding] = {
    "rgb": Encoding("png8"),
    "depth": Encoding("png16", scale=0.001, unit="m"),
    "semseg": Encoding("png8"),
    "normal": Encoding("png8", scale=2.0 / 255.0, offset=-1.0),
    "cls": Encoding("text"),
}
"""Encodings the writer uses unless told otherwise (depth in millimetres, so up to 65.535 m)."""


def default_encoding(name: str, *, num_classes: int | None = None) -> Encoding:
    """Encoding for a modality: the table above, else one chosen from its registry kind."""
    if name == "cls":
        return DEFAULT_ENCODINGS["cls"]
    spec = get_modality(name)
    if spec.kind == "dense_classes":
        n = num_classes if num_classes is not None else spec.num_channels
        return Encoding("png8" if n <= 256 else "png16")
    if name in DEFAULT_ENCODINGS:
        return DEFAULT_ENCODINGS[name]
    if spec.kind == "image":
        return Encoding("png8")
    return Encoding("png16", scale=1.0 / 65536.0, unit="relative")


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard as the manifest lists it."""

    name: str
    num_samples: int
    sha256: str
    num_bytes: int


@dataclass(frozen=True)
class Manifest:
    """`manifest.json`: what a shard folder holds."""

    modalities: tuple[str, ...]
    """Stored modalities (registry names), `cls` not included."""
    encodings: dict[str, Encoding]
    """Per stored modality (and `cls` when present)."""
    shards: tuple[ShardInfo, ...]
    image_size: tuple[int, int] | None = None
    """(H, W) when every sample has the same size, else None."""
    class_names: tuple[str, ...] | None = None
    """Names of the per-image labels in `<key>.cls`; None when samples carry no label."""
    class_counts: tuple[int, ...] | None = None
    """Samples per image class, aligned with class_names."""
    semseg_classes: tuple[str, ...] | None = None
    """Names of the semseg class ids (id i -> semseg_classes[i]); None when unknown."""
    num_semseg_classes: int | None = None
    """Size of the semseg label set."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Provenance: generator, seed, pseudo-labelling models, source folder."""

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def has_cls(self) -> bool:
        return self.class_names is not None

    def to_json(self) -> str:
        doc = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "num_samples": self.num_samples,
            "modalities": list(self.modalities),
            "encodings": {k: dataclasses.asdict(v) for k, v in self.encodings.items()},
            "image_size": list(self.image_size) if self.image_size else None,
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "class_counts": list(self.class_counts) if self.class_counts is not None else None,
            "semseg_classes": list(self.semseg_classes) if self.semseg_classes is not None else None,
            "num_semseg_classes": self.num_semseg_classes,
            "extra": self.extra,
            "shards": [dataclasses.asdict(s) for s in self.shards],
        }
        return json.dumps(doc, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = MANIFEST_NAME) -> Manifest:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: not valid JSON ({err})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"{source}: not an mmae shard manifest (format must be {FORMAT!r})")
        if doc.get("version") != FORMAT_VERSION:
            raise ValueError(f"{source}: manifest version {doc.get('version')} is not supported ({FORMAT_VERSION})")
        try:
            encodings = {k: Encoding(**v) for k, v in doc["encodings"].items()}
            shards = tuple(ShardInfo(**s) for s in doc["shards"])
            manifest = cls(
                modalities=tuple(doc["modalities"]),
                encodings=encodings,
                shards=shards,
                image_size=tuple(doc["image_size"]) if doc.get("image_size") else None,
                class_names=tuple(doc["class_names"]) if doc.get("class_names") is not None else None,
                class_counts=tuple(doc["class_counts"]) if doc.get("class_counts") is not None else None,
                semseg_classes=tuple(doc["semseg_classes"]) if doc.get("semseg_classes") is not None else None,
                num_semseg_classes=doc.get("num_semseg_classes"),
                extra=doc.get("extra") or {},
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"{source}: malformed manifest ({type(err).__name__}: {err})") from None
        for name in manifest.modalities:
            try:
                get_modality(name)
            except ValueError as err:
                raise ValueError(f"{source}: modalities: {err}") from None
        for name, enc in manifest.encodings.items():
            if enc.format not in ("png8", "png16", "jpg", "text"):
                raise ValueError(f"{source}: encodings.{name}.format {enc.format!r} is not supported")
            if name != "cls" and enc.format == "text":
                raise ValueError(f"{source}: encodings.{name}.format 'text' is only for cls")
            if name in manifest.modalities and get_modality(name).kind != "image" and enc.format not in (
                    "png8", "png16"):
                raise ValueError(f"{source}: unexpected {name} encoding {enc.format!r} (png8 or png16 expected)")
            if enc.scale == 0:
                raise ValueError(f"{source}: encodings.{name}.scale must be non-zero")
        missing = [m for m in manifest.modalities if m not in manifest.encodings]
        if missing:
            raise ValueError(f"{source}: encodings missing for modalities {missing}")
        return manifest


def open_folder(url: str, storage_options: Mapping[str, Any] | None = None):
    """(fsspec filesystem, root path) of a shard folder URL."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, root.rstrip("/")


def read_manifest(url: str, *, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Read and validate `<url>/manifest.json`."""
    fs, root = open_folder(url, storage_options)
    path = f"{root}/{MANIFEST_NAME}"
    try:
        with fs.open(path, "rb") as f:
            text = f.read().decode()
    except FileNotFoundError:
        raise ValueError(
            f"{url}: no {MANIFEST_NAME} (not a shard folder, or its write did not finish)"
        ) from None
    return Manifest.from_json(text, source=f"{url}/{MANIFEST_NAME}")


def read_shard_bytes(fs, root: str, info: ShardInfo, *, verify: bool = True) -> bytes:
    """Whole shard bytes, checked against the manifest's size and sha256."""
    try:
        with fs.open(f"{root}/{info.name}", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ShardDataError(info.name, None, "listed in the manifest but missing from the folder") from None
    if verify:
        check_shard_bytes(info, data)
    return data


def check_shard_bytes(info: ShardInfo, data: bytes) -> None:
    """Raise ShardDataError unless `data` has the manifest's size and sha256 for this shard."""
    if len(data) != info.num_bytes:
        raise ShardDataError(
            info.name, None, f"size {len(data)} bytes differs from the manifest's {info.num_bytes} "
            "(truncated or altered shard)",
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.sha256:
        raise ShardDataError(info.name, None, f"sha256 {digest[:12]}... differs from the manifest's "
                             f"{info.sha256[:12]}... (altered shard)")


def prefetch_shards(fs, root: str, infos: Sequence[ShardInfo], *, verify: bool = True,
                    depth: int = 2) -> Iterator[tuple[ShardInfo, bytes]]:
    """Yield (info, bytes) in order while up to `depth` further shards download in background threads."""
    if not infos:
        return
    with ThreadPoolExecutor(max_workers=max(1, depth)) as pool:
        futures = [pool.submit(read_shard_bytes, fs, root, info, verify=verify) for info in infos[:depth]]
        for i, info in enumerate(infos):
            data = futures[i].result()
            if i + depth < len(infos):
                futures.append(pool.submit(read_shard_bytes, fs, root, infos[i + depth], verify=verify))
            futures[i] = None  # release the bytes once consumed
            yield info, data


def _split_member(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    prefix = name[: len(name) - len(base)]
    key, dot, suffix = base.partition(".")
    return prefix + key, suffix if dot else ""


def iter_records(data: bytes, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) per sample, in tar order; suffix is e.g. 'rgb.png' or 'cls'."""
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
        key: str | None = None
        files: dict[str, bytes] = {}
        for member in tar:
            if not member.isfile():
                continue
            k, suffix = _split_member(member.name)
            if k != key:
                if key is not None:
                    yield key, files
                key, files = k, {}
            if suffix in files:
                raise ShardDataError(shard, k, f"duplicate member {member.name!r}")
            files[suffix] = tar.extractfile(member).read()
        if key is not None:
            yield key, files
    except tarfile.TarError as err:
        raise ShardDataError(shard, None, f"not a readable tar file ({err})") from None


def _find(files: Mapping[str, bytes], name: str) -> tuple[str, bytes] | None:
    for suffix, blob in files.items():
        if suffix == name or suffix.startswith(name + "."):
            return suffix, blob
    return None


def _decode_image(blob: bytes, shard: str, key: str, suffix: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(blob))
        img.load()
    except Exception as err:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise ShardDataError(shard, key, f"{suffix}: undecodable image ({type(err).__name__}: {err})") from None
    return img


def _decode_modality(name: str, enc: Encoding, blob: bytes, suffix: str, shard: str, key: str) -> np.ndarray:
    img = _decode_image(blob, shard, key, suffix)
    spec = get_modality(name)
    mode = img.mode
    if spec.kind == "image":
        if enc.format not in ("png8", "jpg"):
            raise ShardDataError(shard, key, f"{suffix}: image modalities must be png8 or jpg, manifest says "
                                 f"{enc.format}")
        want = "L" if spec.num_channels == 1 else "RGB"
        return np.asarray(img if img.mode == want else img.convert(want))
    if spec.kind == "dense_classes":
        if mode in ("L", "P"):
            arr = np.asarray(img)
        elif mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img)
        else:
            raise ShardDataError(shard, key, f"{suffix}: class map must be a 1-channel PNG, got mode {mode!r}")
        return arr.astype(np.int32)
    # dense_regression
    want16 = enc.format == "png16"
    if spec.num_channels == 1:
        ok = mode in ("I;16", "I;16B", "I;16L", "I") if want16 else mode == "L"
        if not ok:
            bits = "16-bit 1-channel" if want16 else "8-bit 1-channel"
            raise ShardDataError(
                shard, key, f"{suffix}: unexpected {name} encoding: PNG mode {mode!r}, manifest says {enc.format} "
                f"({bits})",
            )
        raw = np.asarray(img)
    else:
        if want16 or mode != "RGB" or spec.num_channels != 3:
            raise ShardDataError(shard, key, f"{suffix}: unexpected {name} encoding: PNG mode {mode!r}, manifest "
                                 f"says {enc.format} with {spec.num_channels} channels (8-bit RGB expected)")
        raw = np.asarray(img)
    out = raw.astype(np.float32)
    out *= np.float32(enc.scale)
    if enc.offset:
        out += np.float32(enc.offset)
    return out


def decode_record(key: str, files: Mapping[str, bytes], manifest: Manifest, modalities: Sequence[str], *,
                  shard: str, with_cls: bool = False) -> dict[str, Any]:
    """Decode one sample's files into numpy arrays; every requested modality must be there, at one size."""
    sample: dict[str, Any] = {}
    size: tuple[str, tuple[int, int]] | None = None
    for name in modalities:
        found = _find(files, name)
        if found is None:
            have = sorted(s.split(".")[0] for s in files)
            raise ShardDataError(shard, key, f"missing modality '{name}' (sample has {', '.join(have) or 'nothing'})")
        suffix, blob = found
        arr = _decode_modality(name, manifest.encodings[name], blob, suffix, shard, key)
        hw = (arr.shape[0], arr.shape[1])
        if size is None:
            size = (name, hw)
        elif hw != size[1]:
            raise ShardDataError(
                shard, key, f"modalities of different sizes: {size[0]} is {size[1][0]}x{size[1][1]}, "
                f"{name} is {hw[0]}x{hw[1]} (HxW)",
            )
        sample[name] = arr
    if with_cls:
        found = _find(files, "cls")
        if found is None:
            raise ShardDataError(shard, key, "missing modality 'cls' (the manifest lists class_names)")
        try:
            sample["cls"] = int(found[1].decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise ShardDataError(shard, key, f"cls: not an integer: {found[1][:20]!r}") from None
        if manifest.class_names is not None and not 0 <= sample["cls"] < len(manifest.class_names):
            raise ShardDataError(shard, key, f"cls {sample['cls']} outside the manifest's "
                                 f"{len(manifest.class_names)} class_names")
    return sample


@dataclass
class SkipCounter:
    """Counts samples skipped by `skip_bad`, with the first few reasons."""

    count: int = 0
    reasons: list[str] = field(default_factory=list)

    def add(self, err: ShardDataError) -> None:
        self.count += 1
        if len(self.reasons) < 5:
            self.reasons.append(str(err))
        logger.warning("skipping bad sample: %s", err)


def iter_shard_samples(url: str, *, modalities: Sequence[str] | None = None, shards: Sequence[int] | None = None,
                       with_cls: bool | None = None, skip_bad: bool = False, skipped: SkipCounter | None = None,
                       verify: bool = True, storage_options: Mapping[str, Any] | None = None,
                       ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Decoded (key, sample) of a shard folder in manifest order; bad samples raise or, with skip_bad, are counted."""
    manifest = read_manifest(url, storage_options=storage_options)
    mods = tuple(modalities) if modalities is not None else manifest.modalities
    _check_wanted(manifest, mods, url)
    cls = manifest.has_cls if with_cls is None else with_cls
    fs, root = open_folder(url, storage_options)
    infos = [manifest.shards[i] for i in shards] if shards is not None else list(manifest.shards)
    counter = skipped if skipped is not None else SkipCounter()
    for info, data in prefetch_shards(fs, root, infos, verify=verify):
        n = 0
        for key, files in iter_records(data, info.name):
            n += 1
            try:
                yield key, decode_record(key, files, manifest, mods, shard=info.name, with_cls=cls)
            except ShardDataError as err:
                if not skip_bad:
                    raise
                counter.add(err)
        if n != info.num_samples:
            raise ShardDataError(info.name, None, f"holds {n} samples, the manifest says {info.num_samples}")


def _check_wanted(manifest: Manifest, modalities: Sequence[str], url: str) -> None:
    missing = [m for m in modalities if m not in manifest.modalities]
    if missing:
        raise ValueError(f"{url}: shards hold modalities {list(manifest.modalities)}, missing {missing}")


def _encode_png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_sample(sample: Mapping[str, Any], encodings: Mapping[str, Encoding]) -> dict[str, bytes]:
    """Encode one decoded sample (arrays as `decode_record` returns them) into {suffix: bytes}."""
    out: dict[str, bytes] = {}
    for name, value in sample.items():
        enc = encodings.get(name) or default_encoding(name)
        if name == "cls" or enc.format == "text":
            out["cls"] = str(int(value)).encode()
            continue
        arr = np.asarray(value)
        spec = get_modality(name)
        if spec.kind == "image":
            arr8 = arr if arr.dtype == np.uint8 else np.clip(np.rint(arr), 0, 255).astype(np.uint8)
            if enc.format == "jpg":
                buf = io.BytesIO()
                Image.fromarray(arr8).save(buf, format="JPEG", quality=95)
                out[f"{name}.jpg"] = buf.getvalue()
            else:
                out[f"{name}.png"] = _encode_png(arr8)
            continue
        if spec.kind == "dense_classes":
            top = 255 if enc.format == "png8" else 65535
            if arr.size and (arr.min() < 0 or arr.max() > top):
                raise ValueError(f"{name}: class ids must lie in [0, {top}] for {enc.format}, got "
                                 f"[{arr.min()}, {arr.max()}]")
            dtype = np.uint8 if enc.format == "png8" else np.uint16
            out[f"{name}.png"] = _encode_png(arr.astype(dtype))
            continue
        top = 255 if enc.format == "png8" else 65535
        raw = np.clip(np.rint((arr.astype(np.float64) - enc.offset) / enc.scale), 0, top)
        out[f"{name}.png"] = _encode_png(raw.astype(np.uint8 if top == 255 else np.uint16))
    return out


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Write samples into numbered tar shards and, on close, the manifest.

    Example:
        with ShardWriter("s3://bucket/synth/train", modalities=["rgb", "depth"]) as w:
            w.write("000000", {"rgb": rgb_HW3_uint8, "depth": depth_HW_float32})
    """

    def __init__(self, url: str, *, modalities: Sequence[str], encodings: Mapping[str, Encoding] | None = None,
                 samples_per_shard: int = 256, class_names: Sequence[str] | None = None,
                 semseg_classes: Sequence[str] | None = None, num_semseg_classes: int | None = None,
                 extra: Mapping[str, Any] | None = None, overwrite: bool = False,
                 storage_options: Mapping[str, Any] | None = None):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        for m in modalities:
            get_modality(m)
        self.url = url
        self.modalities = tuple(modalities)
        if num_semseg_classes is None and semseg_classes is not None:
            num_semseg_classes = len(semseg_classes)
        self.encodings = {m: default_encoding(m, num_classes=num_semseg_classes) for m in self.modalities}
        self.encodings.update(encodings or {})
        if class_names is not None:
            self.encodings["cls"] = DEFAULT_ENCODINGS["cls"]
        self.samples_per_shard = samples_per_shard
        self.class_names = tuple(class_names) if class_names is not None else None
        self.class_counts = [0] * len(self.class_names) if self.class_names is not None else None
        self.semseg_classes = tuple(semseg_classes) if semseg_classes is not None else None
        self.num_semseg_classes = num_semseg_classes
        self.extra = dict(extra or {})
        self.fs, self.root = open_folder(url, storage_options)
        if self.fs.exists(f"{self.root}/{MANIFEST_NAME}"):
            if not overwrite:
                raise ValueError(f"{url} already holds a shard folder ({MANIFEST_NAME} exists)")
            # Manifest first: an interrupted overwrite must not look like a finished folder.
            self.fs.rm(f"{self.root}/{MANIFEST_NAME}")
            old = self.fs.glob(f"{self.root}/shard-*.tar")
            if old:
                self.fs.rm(old)
        self.fs.makedirs(self.root, exist_ok=True)
        self.shards: list[ShardInfo] = []
        self._sizes: set[tuple[int, int]] = set()
        self._keys: set[str] = set()
        self._buf: io.BytesIO | None = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._closed = False

    def write(self, key: str, sample: Mapping[str, Any]) -> None:
        """Encode and add one sample (every modality of the writer, plus `cls` when class_names were given)."""
        missing = [m for m in self.modalities if m not in sample]
        if self.class_names is not None and "cls" not in sample:
            missing.append("cls")
        if missing:
            raise ValueError(f"sample {key!r}: missing {missing}")
        shapes = {np.asarray(sample[m]).shape[:2] for m in self.modalities}
        if len(shapes) != 1:
            raise ValueError(f"sample {key!r}: modalities of different sizes {shapes}")
        sub = {m: sample[m] for m in self.modalities}
        if self.class_names is not None:
            sub["cls"] = sample["cls"]
        self.write_encoded(key, encode_sample(sub, self.encodings), size=shapes.pop())

    def write_encoded(self, key: str, files: Mapping[str, bytes], *, size: tuple[int, int] | None = None) -> None:
        """Add one already encoded sample: {suffix: bytes}, suffixes as `encode_sample` makes them."""
        if not _KEY_RE.match(key):
            raise ValueError(f"sample key {key!r} may hold only letters, digits, '_', '-' and '/' (no dots)")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        if "cls" in files and self.class_counts is not None:
            c = int(files["cls"].decode())
            if not 0 <= c < len(self.class_counts):
                raise ValueError(f"sample {key!r}: cls {c} outside the {len(self.class_counts)} class_names")
            self.class_counts[c] += 1
        if size is not None:
            self._sizes.add(tuple(size))
        if self._tar is None:
            self._buf = io.BytesIO()
            self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.USTAR_FORMAT)
        for suffix in sorted(files):
            _tar_add(self._tar, f"{key}.{suffix}", files[suffix])
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._flush()

    def _flush(self) -> None:
        if self._tar is None or self._count == 0:
            return
        self._tar.close()
        data = self._buf.getvalue()
        name = f"shard-{len(self.shards):06d}.tar"
        with self.fs.open(f"{self.root}/{name}", "wb") as f:
            f.write(data)
        self.shards.append(ShardInfo(name, self._count, hashlib.sha256(data).hexdigest(), len(data)))
        logger.debug("wrote %s (%d samples, %d bytes)", name, self._count, len(data))
        self._tar, self._buf, self._count = None, None, 0

    def close(self) -> Manifest:
        """Flush the last shard and write the manifest."""
        if self._closed:
            raise ValueError("ShardWriter is already closed")
        self._flush()
        self._closed = True
        manifest = Manifest(
            modalities=self.modalities,
            encodings=self.encodings,
            shards=tuple(self.shards),
            image_size=next(iter(self._sizes)) if len(self._sizes) == 1 else None,
            class_names=self.class_names,
            class_counts=tuple(self.class_counts) if self.class_counts is not None else None,
            semseg_classes=self.semseg_classes,
            num_semseg_classes=self.num_semseg_classes,
            extra=self.extra,
        )
        with self.fs.open(f"{self.root}/{MANIFEST_NAME}", "wb") as f:
            f.write(manifest.to_json().encode())
        return manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            self._tar.close()
