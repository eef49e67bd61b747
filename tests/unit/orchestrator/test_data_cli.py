"""`mmae data synth | inspect | import-folder` end to end through the CLI entry point, on local folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from multimae_core.data.shards import Encoding, ShardWriter, encode_sample, iter_shard_samples, read_manifest
from orchestrator.cli.app import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit:
        code = exit.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_synth_then_inspect(tmp_path, capsys):
    url = str(tmp_path / "train")
    code, _, err = _run(capsys, "data", "synth", "--out", url, "--num", "20", "--size", "32", "--shard-size", "8",
                        "--seed", "3")
    assert code == 0, err
    assert "wrote 20 samples in 3 shards" in err
    code, out, _ = _run(capsys, "data", "inspect", url, "--json", "--scan", "--grid", str(tmp_path / "g.png"),
                        "--num", "4")
    assert code == 0
    report = json.loads(out)
    assert report["num_samples"] == 20 and report["num_shards"] == 3 and report["num_read"] == 20
    assert report["modalities"] == ["rgb", "depth", "semseg", "normal"]
    assert sum(report["class_counts"].values()) == 20
    assert report["class_counts"] == dict(zip(read_manifest(url).class_names, read_manifest(url).class_counts,
                                              strict=True))
    assert abs(sum(report["semseg_pixel_share"].values()) - 1) < 1e-6
    grid = Image.open(tmp_path / "g.png")
    assert grid.size == (110 + 4 * 128, 16 + 4 * 128)
    # A second synth into the same folder is refused with one line and exit code 2.
    code, _, err = _run(capsys, "data", "synth", "--out", url, "--num", "4", "--size", "32")
    assert code == 2 and err.strip().count("\n") == 0 and "already holds a shard folder" in err


def _save(path, arr, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, **kw).save(path)


def _tree(root, *, extra_rgb=False, drop_semseg_class=False, corrupt_depth=False):
    """2 classes x 3 samples; file names sort differently in rgb (.JPEG) and depth/semseg (.png) folders only by
    name, and every modality encodes the sample id, so pairing can be checked after import."""
    ident = 0
    for cname in ("n01", "n02"):
        for stem in ("b_img", "a_img", "c_img"):
            ident += 1
            rgb = np.zeros((20, 24, 3), np.uint8)
            rgb[..., 0] = ident * 20
            _save(root / "rgb" / cname / f"{stem}.JPEG", rgb)
            _save(root / "depth" / cname / f"{stem}.png", np.full((20, 24), ident * 1000, np.uint16))
            if not (drop_semseg_class and cname == "n02"):
                _save(root / "semseg" / cname / f"{stem}.png", np.full((20, 24), ident, np.uint8))
    if extra_rgb:
        _save(root / "rgb" / "n01" / "zz_only_rgb.JPEG", np.zeros((20, 24, 3), np.uint8))
    if corrupt_depth:
        (root / "depth" / "n01" / "a_img.png").write_bytes(b"garbage")


def test_import_folder_pairs_by_name(tmp_path, capsys):
    root = tmp_path / "orig"
    _tree(root)
    url = str(tmp_path / "shards")
    code, _, err = _run(capsys, "data", "import-folder", str(root), "--out", url, "--shard-size", "4")
    assert code == 0, err
    man = read_manifest(url)
    assert man.modalities == ("rgb", "depth", "semseg") and man.class_names == ("n01", "n02")
    assert man.encodings["depth"] == Encoding("png16", scale=1 / 65536, unit="relative")
    assert man.encodings["rgb"].format == "jpg" and man.num_semseg_classes == 133
    samples = dict(iter_shard_samples(url))
    assert sorted(samples) == sorted(f"{c}/{s}" for c in ("n01", "n02") for s in ("a_img", "b_img", "c_img"))
    for key, s in samples.items():
        ident = int(s["semseg"][0, 0])
        assert abs(int(s["rgb"][5, 5, 0]) - ident * 20) <= 3  # JPEG
        np.testing.assert_allclose(s["depth"], ident * 1000 / 65536)
        assert s["cls"] == (0 if key.startswith("n01") else 1)
        assert (ident <= 3) == key.startswith("n01")


def test_import_folder_refuses_mismatched_tree(tmp_path, capsys):
    root = tmp_path / "orig"
    _tree(root, extra_rgb=True, drop_semseg_class=True)
    code, _, err = _run(capsys, "data", "import-folder", str(root), "--out", str(tmp_path / "s"))
    assert code == 2
    assert "files do not pair up across modalities (2 problems)" in err
    assert "class folder 'n02' missing in semseg" in err
    assert "rgb/n01/zz_only_rgb.JPEG has no partner in depth, semseg" in err
    assert not (tmp_path / "s").exists()


def test_import_folder_bad_file_and_skip_bad(tmp_path, capsys):
    root = tmp_path / "orig"
    _tree(root, corrupt_depth=True)
    code, _, err = _run(capsys, "data", "import-folder", str(root), "--out", str(tmp_path / "s"))
    assert code == 2 and "depth/n01/a_img.png: undecodable image" in err
    code, _, err = _run(capsys, "data", "import-folder", str(root), "--out", str(tmp_path / "s2"), "--skip-bad")
    assert code == 0 and "skipped 1 bad samples" in err and "wrote 5 samples" in err


def _bad_shards(url: str) -> None:
    rng = np.random.default_rng(0)
    enc = {"depth": Encoding("png16", scale=0.001, unit="m"), "semseg": Encoding("png8")}
    with ShardWriter(url, modalities=["rgb", "depth", "semseg"], samples_per_shard=4) as w:
        for i in range(8):
            files = encode_sample({"rgb": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
                                   "depth": np.ones((8, 8), np.float32), "semseg": np.zeros((8, 8), np.int32)}, enc)
            if i == 5:
                del files["semseg.png"]
            w.write_encoded(f"k{i}", files)


def test_inspect_reports_bad_samples(tmp_path, capsys):
    url = str(tmp_path / "bad")
    _bad_shards(url)
    code, _, err = _run(capsys, "data", "inspect", url, "--scan")
    assert code == 2
    assert "error: shard shard-000001.tar, sample 'k5': missing modality 'semseg' (sample has depth, rgb)" in err
    code, out, err = _run(capsys, "data", "inspect", url, "--scan", "--skip-bad")
    assert code == 0 and "warning: skipped 1 bad samples" in err and "7 samples read" in out


@pytest.mark.parametrize("argv", [["data", "inspect", "/nonexistent/folder"],
                                  ["data", "import-folder", "/nonexistent/folder", "--out", "/tmp/x"]])
def test_missing_input_is_one_line(capsys, argv):
    code, _, err = _run(capsys, *argv)
    assert code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0
