"""`mmae data pseudolabel`: RGB images -> shards with depth and semseg predicted by off-the-shelf networks.

As the paper does (depth from a DPT, semantic classes from Mask2Former, spec section 5), with transformers models
loaded from a local folder, an fsspec URL of a saved model (`save_pretrained` output) or a Hugging Face id. Ray Data
batch inference: images are listed on the driver, decoded, resized (shorter side) and centre-cropped in CPU tasks,
labelled by an actor pool (one GPU per actor where GPUs exist, else CPU), PNG-encoded in CPU tasks, and written
into shards by the driver. The semseg label set (the segmentation model's id2label) goes into the manifest.

Depth: MiDaS-style models (DPT, Depth Anything) predict relative inverse depth; it is stored as depth-like values
(1 - disparity, per image min-max normalised: near is small), others as predicted, per image min-max normalised into
16 bits ("relative"). MultiMAE standardises depth per sample, so only the ordering and shape matter.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from multimae_core.data.shards import (
    MANIFEST_NAME,
    Encoding,
    Manifest,
    ShardWriter,
    check_shard_bytes,
    iter_records,
    open_folder,
    read_manifest,
)

__all__ = ["PseudolabelResult", "resolve_model", "pseudolabel"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".tif", ".tiff", ".webp")
DISPARITY_MODELS = ("dpt", "depth_anything", "depth_pro")
"""model_type values whose depth output is relative inverse depth (MiDaS convention)."""
_SAFE = re.compile(r"[^A-Za-z0-9_\-/]")


@dataclass
class PseudolabelResult:
    manifest: Manifest
    num_skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)


def _local_hint(ref: str, kind: str) -> str:
    cls = "AutoModelForDepthEstimation" if kind == "depth" else "AutoModelForUniversalSegmentation"
    flag = "--depth-model" if kind == "depth" else "--seg-model"
    return (f"download it where there is network access (python -c \"from transformers import {cls}; "
            f"{cls}.from_pretrained('{ref}').save_pretrained('DIR')\") and pass {flag} DIR, a local folder or an "
            f"fsspec URL of that folder (s3://bucket/models/...)")


def resolve_model(ref: str, kind: str) -> tuple[str, dict[str, Any]]:
    """(reference the actors load, config.json contents) of a model given as folder, fsspec URL or hub id.

    Raises ValueError with instructions for passing local weights when the model cannot be reached.
    """
    if os.path.isdir(ref):
        path = os.path.join(ref, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"{kind} model folder {ref} has no config.json (expected a save_pretrained folder)")
        with open(path) as f:
            return os.path.abspath(ref), json.load(f)
    if "://" in ref:
        fs, root = open_folder(ref)
        try:
            with fs.open(f"{root}/config.json", "rb") as f:
                return ref, json.loads(f.read())
        except (FileNotFoundError, OSError) as err:
            raise ValueError(f"{kind} model {ref}: no readable config.json there ({err})") from None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(ref)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0][:160]
        raise ValueError(f"cannot load the {kind} model '{ref}' ({reason}); {_local_hint(ref, kind)}") from None
    return ref, config.to_dict()


def _materialise(ref: str) -> str:
    """A local folder holding the model: `ref` itself, or a download of an fsspec URL into a temp folder."""
    if "://" not in ref:
        return ref
    fs, root = open_folder(ref)
    local = tempfile.mkdtemp(prefix="mmae-model-")
    for path in fs.find(root):
        rel = path[len(root):].lstrip("/")
        os.makedirs(os.path.dirname(os.path.join(local, rel)) or local, exist_ok=True)
        fs.get_file(path, os.path.join(local, rel))
    return local


def _norm_stats(folder: str, model_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Input mean/std: the saved image processor's if present, else the model family's convention."""
    path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            doc = json.load(f)
        if "image_mean" in doc and "image_std" in doc:
            return np.asarray(doc["image_mean"], np.float32), np.asarray(doc["image_std"], np.float32)
    if model_type == "dpt":
        return np.full(3, 0.5, np.float32), np.full(3, 0.5, np.float32)
    return np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


class Labeler:
    """Ray Data actor: loads both networks once, then predicts depth and semseg for batches of rgb."""

    def __init__(self, depth_ref: str, seg_ref: str, *, model_size: int, device: str | None = None):
        import torch
        from transformers import AutoConfig, AutoModelForDepthEstimation

        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model_size = model_size
        depth_dir, seg_dir = _materialise(depth_ref), _materialise(seg_ref)
        self.depth = AutoModelForDepthEstimation.from_pretrained(depth_dir).to(self.device).eval()
        self.depth_type = self.depth.config.model_type
        self.depth_stats = _norm_stats(depth_dir, self.depth_type)
        seg_type = AutoConfig.from_pretrained(seg_dir).model_type
        if seg_type in ("mask2former", "maskformer", "oneformer"):
            from transformers import AutoModelForUniversalSegmentation as SegModel
        else:
            from transformers import AutoModelForSemanticSegmentation as SegModel
        self.seg = SegModel.from_pretrained(seg_dir).to(self.device).eval()
        self.seg_type = seg_type
        self.seg_stats = _norm_stats(seg_dir, seg_type)

    def _input(self, rgb: np.ndarray, stats) -> Any:
        torch = self.torch
        x = torch.from_numpy(rgb).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        x = torch.nn.functional.interpolate(x, size=(self.model_size, self.model_size), mode="bilinear",
                                            align_corners=False, antialias=True)
        mean, std = (torch.as_tensor(s, device=self.device)[None, :, None, None] for s in stats)
        return (x - mean) / std

    def _semantic_logits(self, out) -> Any:
        if hasattr(out, "class_queries_logits"):
            # Mask2Former semantic inference (as its image processor's post_process_semantic_segmentation).
            classes = out.class_queries_logits.softmax(dim=-1)[..., :-1]
            masks = out.masks_queries_logits.sigmoid()
            return self.torch.einsum("bqc,bqhw->bchw", classes, masks)
        return out.logits

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        rgb = np.stack(batch["rgb"]) if batch["rgb"].dtype == object else batch["rgb"]
        size = rgb.shape[1:3]
        with torch.inference_mode():
            pred = self.depth(pixel_values=self._input(rgb, self.depth_stats)).predicted_depth
            pred = torch.nn.functional.interpolate(pred[:, None].float(), size=size, mode="bilinear",
                                                   align_corners=False)[:, 0]
            logits = self._semantic_logits(self.seg(pixel_values=self._input(rgb, self.seg_stats)))
            logits = torch.nn.functional.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
            semseg = logits.argmax(dim=1)
        d = pred.cpu().numpy().astype(np.float64)
        flat = d.reshape(len(d), -1)
        lo, hi = flat.min(axis=1)[:, None, None], flat.max(axis=1)[:, None, None]
        rel = (d - lo) / np.maximum(hi - lo, 1e-12)
        if self.depth_type in DISPARITY_MODELS:
            rel = 1.0 - rel
        out = dict(batch)
        out["rgb"] = rgb
        out["depth"] = np.rint(rel * 65535).astype(np.uint16)
        out["semseg"] = semseg.cpu().numpy().astype(np.int32)
        return out


def _prepare(batch: dict[str, np.ndarray], *, size: int, skip_bad: bool) -> dict[str, np.ndarray]:
    """Encoded image bytes -> rgb uint8 [B,S,S,3] (shorter side resized to S, centre crop); bad images raise or drop."""
    keys, rgbs = [], []
    for key, blob in zip(batch["key"], batch["bytes"], strict=True):
        try:
            img = Image.open(io.BytesIO(bytes(blob)))
            img = img.convert("RGB")
        except Exception as err:  # noqa: BLE001 - PIL raises many types for corrupt data
            msg = f"{key}: undecodable image ({type(err).__name__}: {err})"
            if not skip_bad:
                raise ValueError(msg) from None
            logger.warning("skipping %s", msg)
            continue
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        rgbs.append(np.asarray(img.crop((left, top, left + size, top + size))))
        keys.append(str(key))
    return {"key": np.asarray(keys, dtype=object),
            "rgb": np.stack(rgbs) if rgbs else np.zeros((0, size, size, 3), np.uint8)}


def _encode(batch: dict[str, np.ndarray], *, encodings: Mapping[str, Encoding]) -> dict[str, np.ndarray]:
    from multimae_core.data.shards import encode_sample

    cols: dict[str, list] = {"key": [], "rgb": [], "depth": [], "semseg": []}
    for i, key in enumerate(batch["key"]):
        files = encode_sample({"rgb": batch["rgb"][i], "semseg": batch["semseg"][i]}, encodings)
        buf = io.BytesIO()
        Image.fromarray(batch["depth"][i]).save(buf, format="PNG", compress_level=1)
        cols["key"].append(str(key))
        cols["rgb"].append(files[f"rgb.{encodings['rgb'].ext}"])
        cols["depth"].append(buf.getvalue())
        cols["semseg"].append(files["semseg.png"])
    return {k: np.asarray(v, dtype=object) for k, v in cols.items()}


def _list_images(url: str) -> tuple[Any, list[str], str]:
    fs, root = open_folder(url)
    if not fs.isdir(root):
        raise ValueError(f"{url}: not a folder")
    paths = sorted(p for p in fs.find(root) if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"{url}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    return fs, paths, root


def _image_dataset(images: str):
    """Rows {key, bytes} of the input: a shard folder with rgb, or a folder tree of image files."""
    import ray.data

    fs, root = open_folder(images)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    filesystem = None if "file" in protocols else fs
    if fs.exists(f"{root}/{MANIFEST_NAME}"):
        manifest = read_manifest(images)
        if "rgb" not in manifest.modalities:
            raise ValueError(f"{images}: the shards hold no rgb ({list(manifest.modalities)})")
        infos = {s.name: s for s in manifest.shards}

        def explode(row: dict[str, Any]) -> list[dict[str, Any]]:
            name = str(row["path"]).rsplit("/", 1)[-1]
            check_shard_bytes(infos[name], row["bytes"])
            return [{"key": key, "bytes": next(b for s, b in files.items() if s.startswith("rgb."))}
                    for key, files in iter_records(row["bytes"], name)]

        ds = ray.data.read_binary_files([f"{root}/{s.name}" for s in manifest.shards], include_paths=True,
                                        filesystem=filesystem, override_num_blocks=len(manifest.shards))
        return ds.flat_map(explode), manifest.num_samples
    fs, paths, root = _list_images(images)

    def with_key(row: dict[str, Any]) -> dict[str, Any]:
        rel = str(row["path"])[len(root):].lstrip("/")
        return {"key": _SAFE.sub("_", os.path.splitext(rel)[0]), "bytes": row["bytes"]}

    ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=filesystem,
                                    override_num_blocks=min(len(paths), 200))
    return ds.map(with_key), len(paths)


def pseudolabel(images: str, out: str, *, depth_model: str, seg_model: str, size: int = 224,
                model_size: int | None = None, batch_size: int = 16, samples_per_shard: int = 256,
                num_actors: int | None = None, skip_bad: bool = False, overwrite: bool = False,
                progress: bool = True) -> PseudolabelResult:
    """Label every RGB image under `images` (folder or shard folder, any fsspec URL) into a shard folder at `out`.

    Connects to the Ray cluster in RAY_ADDRESS, or starts a local one.
    """
    import ray

    depth_ref, depth_cfg = resolve_model(depth_model, "depth")
    seg_ref, seg_cfg = resolve_model(seg_model, "segmentation")
    id2label = {int(k): v for k, v in (seg_cfg.get("id2label") or {}).items()}
    if not id2label:
        raise ValueError(f"segmentation model {seg_model} has no id2label in its config (label set unknown)")
    labels = [id2label.get(i, str(i)) for i in range(max(id2label) + 1)]
    model_size = model_size or int(np.ceil(size / 32) * 32)
    encodings = {"rgb": Encoding("png8"), "depth": Encoding("png16", scale=1 / 65535, unit="relative"),
                 "semseg": Encoding("png8" if len(labels) <= 256 else "png16")}
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = progress
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = num_actors or max(1, gpus)
    ds, total = _image_dataset(images)
    writer = ShardWriter(
        out, modalities=["rgb", "depth", "semseg"], encodings=encodings, samples_per_shard=samples_per_shard,
        semseg_classes=labels,
        extra={"source": images, "pseudolabel": {
            "depth_model": depth_model, "depth_model_type": depth_cfg.get("model_type"),
            "depth": "1 - normalised disparity" if depth_cfg.get("model_type") in DISPARITY_MODELS else "normalised",
            "seg_model": seg_model, "seg_model_type": seg_cfg.get("model_type"), "size": size,
            "model_size": model_size}},
        overwrite=overwrite,
    )
    ds = ds.map_batches(_prepare, batch_size=batch_size, fn_kwargs={"size": size, "skip_bad": skip_bad})
    ds = ds.map_batches(Labeler, batch_size=batch_size, num_gpus=1 if gpus else 0,
                        compute=ray.data.ActorPoolStrategy(size=actors),
                        fn_constructor_kwargs={"depth_ref": depth_ref, "seg_ref": seg_ref, "model_size": model_size})
    ds = ds.map_batches(_encode, batch_size=batch_size, fn_kwargs={"encodings": encodings})
    count = 0
    try:
        for row in ds.iter_rows():
            files = {f"rgb.{encodings['rgb'].ext}": row["rgb"], "depth.png": row["depth"],
                     "semseg.png": row["semseg"]}
            writer.write_encoded(row["key"], files, size=(size, size))
            count += 1
    except Exception as err:
        message = _our_error(err)
        if message is None:
            raise
        raise ValueError(message) from err
    skipped = total - count
    if skipped and not skip_bad:
        raise ValueError(f"{images}: {skipped} images were lost in labelling")
    reasons = [f"{skipped} images could not be decoded (the Ray worker logs name them)"] if skipped else []
    return PseudolabelResult(writer.close(), skipped, reasons)


def _our_error(err: BaseException) -> str | None:
    """The message of a ValueError raised in one of our Ray Data functions, unwrapped from Ray's task errors (which
    carry the remote exception as text)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e) is ValueError or type(e).__name__ == "ShardDataError":
            return str(e)
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    found = re.search(r"^(?:ValueError|\S*ShardDataError): (.+)$", str(err), flags=re.MULTILINE)
    return found.group(1) if found else None
