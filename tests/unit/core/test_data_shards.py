"""Shard format: round trips through local and memory:// folders, manifest contents, checksums, bad samples."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from multimae_core.data.shards import (
    Encoding,
    ShardDataError,
    ShardWriter,
    SkipCounter,
    encode_sample,
    iter_shard_samples,
    read_manifest,
)

MODS = ["rgb", "depth", "semseg", "normal"]


def _sample(rng: np.random.Generator, h: int = 12, w: int = 10, *, classes: int = 6) -> dict:
    normal = rng.normal(size=(h, w, 3))
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    return {
        "rgb": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "depth": rng.uniform(0.5, 60.0, (h, w)).astype(np.float32),
        "semseg": rng.integers(0, classes, (h, w)).astype(np.int32),
        "normal": normal.astype(np.float32),
        "cls": int(rng.integers(0, 3)),
    }


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("where", ["local", "memory"])
def test_round_trip(tmp_path, where):
    url = str(tmp_path / "ds") if where == "local" else f"memory://rt-{tmp_path.name}/ds"
    rng = np.random.default_rng(0)
    samples = [_sample(rng) for _ in range(7)]
    with ShardWriter(url, modalities=MODS, samples_per_shard=3, class_names=["a", "b", "c"],
                     semseg_classes=[f"c{i}" for i in range(6)]) as w:
        for i, s in enumerate(samples):
            w.write(f"s{i:03d}", s)
    man = read_manifest(url)
    assert [s.num_samples for s in man.shards] == [3, 3, 1]
    assert man.num_samples == 7 and man.image_size == (12, 10) and man.modalities == tuple(MODS)
    assert man.class_counts == tuple(np.bincount([s["cls"] for s in samples], minlength=3))
    assert man.encodings["depth"] == Encoding("png16", scale=0.001, unit="m")
    assert man.num_semseg_classes == 6
    got = list(iter_shard_samples(url))
    assert [k for k, _ in got] == [f"s{i:03d}" for i in range(7)]
    for (_, g), s in zip(got, samples, strict=True):
        np.testing.assert_array_equal(g["rgb"], s["rgb"])
        np.testing.assert_array_equal(g["semseg"], s["semseg"])
        np.testing.assert_allclose(g["depth"], s["depth"], atol=0.0005 + 1e-6)  # half a millimetre
        np.testing.assert_allclose(g["normal"], s["normal"], atol=1 / 255 + 1e-6)
        assert g["cls"] == s["cls"]


def test_manifest_checksums_match_files(tmp_path):
    url = str(tmp_path / "ds")
    rng = np.random.default_rng(1)
    with ShardWriter(url, modalities=["rgb", "depth"], samples_per_shard=2) as w:
        for i in range(3):
            s = _sample(rng)
            w.write(f"k{i}", {"rgb": s["rgb"], "depth": s["depth"]})
    doc = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert doc["num_samples"] == 3 and doc["class_names"] is None
    for shard in doc["shards"]:
        data = (tmp_path / "ds" / shard["name"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
        assert shard["num_bytes"] == len(data)


def test_wide_label_set_uses_16_bit(tmp_path):
    url = str(tmp_path / "ds")
    sem = np.arange(300 * 2, dtype=np.int32).reshape(20, 30) % 300
    with ShardWriter(url, modalities=["semseg"], num_semseg_classes=300) as w:
        w.write("a", {"semseg": sem})
    assert read_manifest(url).encodings["semseg"].format == "png16"
    (_, got), = iter_shard_samples(url)
    np.testing.assert_array_equal(got["semseg"], sem)


def test_writer_refuses_existing_folder(tmp_path):
    url = str(tmp_path / "ds")
    with ShardWriter(url, modalities=["rgb"]) as w:
        w.write("a", {"rgb": np.zeros((4, 4, 3), np.uint8)})
    with pytest.raises(ValueError, match="already holds a shard folder"):
        ShardWriter(url, modalities=["rgb"])
    with ShardWriter(url, modalities=["rgb"], overwrite=True) as w:
        w.write("b", {"rgb": np.zeros((4, 4, 3), np.uint8)})
    assert [k for k, _ in iter_shard_samples(url)] == ["b"]


def test_writer_rejects_dotted_keys_and_out_of_range_classes(tmp_path):
    w = ShardWriter(str(tmp_path / "ds"), modalities=["semseg"])
    with pytest.raises(ValueError, match="no dots"):
        w.write("a.b", {"semseg": np.zeros((4, 4), np.int32)})
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 255\]"):
        w.write("a", {"semseg": np.full((4, 4), 300, np.int32)})


def _write(url: str, records: dict[str, dict[str, bytes]], *, mods=("rgb", "depth", "semseg"), per_shard=10):
    with ShardWriter(url, modalities=list(mods), samples_per_shard=per_shard) as w:
        for key, files in records.items():
            w.write_encoded(key, files)


def _good(rng, h=8, w=8) -> dict[str, bytes]:
    s = _sample(rng, h, w)
    return encode_sample({k: s[k] for k in ("rgb", "depth", "semseg")},
                         {"depth": Encoding("png16", scale=0.001, unit="m"), "semseg": Encoding("png8")})


def _bad_cases(rng) -> dict[str, tuple[dict[str, bytes], str]]:
    missing = _good(rng)
    del missing["depth.png"]
    garbage = _good(rng)
    garbage["rgb.png"] = b"\x89PNG\r\n\x1a\n this is not a png"
    small = _good(rng)
    small["semseg.png"] = _png(np.zeros((4, 4), np.uint8))
    depth8 = _good(rng)
    depth8["depth.png"] = _png(np.full((8, 8), 7, np.uint8))
    return {
        "nodepth": (missing, r"missing modality 'depth' \(sample has rgb, semseg\)"),
        "garbage": (garbage, "rgb.png: undecodable image"),
        "small": (small, "modalities of different sizes: rgb is 8x8, semseg is 4x4"),
        "depth8": (depth8, r"depth.png: unexpected depth encoding: PNG mode 'L', manifest says png16"),
    }


@pytest.mark.parametrize("case", ["nodepth", "garbage", "small", "depth8"])
def test_bad_sample_names_shard_and_key(tmp_path, case):
    rng = np.random.default_rng(2)
    files, message = _bad_cases(rng)[case]
    url = str(tmp_path / "ds")
    _write(url, {"ok0": _good(rng), case: files, "ok1": _good(rng)})
    with pytest.raises(ShardDataError, match=rf"shard shard-000000.tar, sample '{case}': {message}") as info:
        list(iter_shard_samples(url))
    assert info.value.shard == "shard-000000.tar" and info.value.key == case


def test_skip_bad_counts_every_bad_sample(tmp_path):
    rng = np.random.default_rng(3)
    cases = _bad_cases(rng)
    records = {"ok0": _good(rng)}
    records.update({k: v[0] for k, v in cases.items()})
    records["ok1"] = _good(rng)
    url = str(tmp_path / "ds")
    _write(url, records, per_shard=3)
    counter = SkipCounter()
    keys = [k for k, _ in iter_shard_samples(url, skip_bad=True, skipped=counter)]
    assert keys == ["ok0", "ok1"]
    assert counter.count == 4
    assert all(any(k in r for r in counter.reasons) for k in cases)


def test_truncated_shard_is_caught(tmp_path):
    url = str(tmp_path / "ds")
    rng = np.random.default_rng(4)
    _write(url, {f"k{i}": _good(rng) for i in range(4)}, per_shard=2)
    path = tmp_path / "ds" / "shard-000001.tar"
    path.write_bytes(path.read_bytes()[:-1024])
    with pytest.raises(ShardDataError, match=r"shard shard-000001.tar: size \d+ bytes differs .*\(truncated"):
        list(iter_shard_samples(url))


def test_altered_shard_is_caught(tmp_path):
    url = str(tmp_path / "ds")
    rng = np.random.default_rng(5)
    _write(url, {f"k{i}": _good(rng) for i in range(2)})
    path = tmp_path / "ds" / "shard-000000.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardDataError, match=r"shard shard-000000.tar: sha256 .*\(altered shard"):
        list(iter_shard_samples(url))


def test_manifest_errors(tmp_path):
    with pytest.raises(ValueError, match="no manifest.json"):
        read_manifest(str(tmp_path / "nothing"))
    url = str(tmp_path / "ds")
    _write(url, {"a": _good(np.random.default_rng(6))})
    path = tmp_path / "ds" / "manifest.json"
    doc = json.loads(path.read_text())
    doc["encodings"]["depth"]["format"] = "jpg"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="unexpected depth encoding 'jpg'"):
        read_manifest(url)
    doc["encodings"]["depth"]["format"] = "png16"
    doc["modalities"].append("dpeth")
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="unknown modality 'dpeth'; did you mean 'depth'"):
        read_manifest(url)
    path.write_text("{}")
    with pytest.raises(ValueError, match="not an mmae shard manifest"):
        read_manifest(url)


def test_requesting_a_modality_the_shards_lack(tmp_path):
    url = str(tmp_path / "ds")
    _write(url, {"a": _good(np.random.default_rng(7))})
    with pytest.raises(ValueError, match=r"missing \['normal'\]"):
        list(iter_shard_samples(url, modalities=["rgb", "normal"]))


def test_format_code_is_torch_free():
    """Shards, synthetic scenes and transforms run where torch is absent (data prep boxes, Ray CPU tasks)."""
    import subprocess
    import sys

    code = ("import sys, multimae_core.data, multimae_core.data.shards, multimae_core.data.synth, "
            "multimae_core.data.transforms; print(sorted(m for m in ('torch', 'ray', 'typer', 'mlflow', 'orchestrator')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
