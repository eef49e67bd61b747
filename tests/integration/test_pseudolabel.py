"""`mmae data pseudolabel` end to end through Ray Data on photographs shipped with scikit-image, with tiny randomly
initialised transformers models saved locally (no network)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multimae_core.data.shards import iter_shard_samples, read_manifest

SIZE = 64
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png"]
LABELS = ["sky", "cat", "cup", "person", "rocket"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from transformers import DPTConfig, DPTForDepthEstimation, SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    dpt = DPTForDepthEstimation(DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=SIZE,
        patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 64],
        reassemble_factors=[4, 2, 1, 0.5], fusion_hidden_size=16, head_in_index=-1))
    dpt.save_pretrained(root / "dpt")
    seg = SegformerForSemanticSegmentation(SegformerConfig(
        depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=16,
        num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}))
    seg.save_pretrained(root / "seg")
    return {"dpt": root / "dpt", "seg": root / "seg"}


@pytest.fixture
def photos(tmp_path) -> Path:
    import skimage

    src = Path(skimage.__file__).parent / "data"
    root = tmp_path / "photos"
    for i, name in enumerate(PHOTOS):
        dest = root / ("a" if i % 2 else "b") / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / name, dest)
    return root


@pytest.fixture(scope="module")
def ray_session(ray_local):
    import ray

    ray.init(address=ray_local, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


def _centre_crop(path: Path) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = SIZE / min(w, h)
    nw, nh = max(SIZE, round(w * s)), max(SIZE, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - SIZE) // 2, (nh - SIZE) // 2
    return np.asarray(img.crop((left, top, left + SIZE, top + SIZE)))


def _reference_depth(model_dir: Path, rgb: np.ndarray) -> np.ndarray:
    """Depth the way the manifest describes it: 1 - min-max normalised DPT disparity, at the image size."""
    from transformers import DPTForDepthEstimation

    model = DPTForDepthEstimation.from_pretrained(model_dir).eval()
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].double() / 255  # a writable copy
    x = ((x - 0.5) / 0.5).float()
    with torch.no_grad():
        disp = model(pixel_values=x).predicted_depth[:, None]
    disp = torch.nn.functional.interpolate(disp, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0]
    d = disp.double().numpy()
    return 1 - (d - d.min()) / (d.max() - d.min())


def test_pseudolabel_folder_end_to_end(ray_session, models, photos, tmp_path, capsys):
    from orchestrator.cli.app import main

    out = tmp_path / "labelled"
    argv = ["data", "pseudolabel", "--images", str(photos), "--out", str(out), "--depth-model", str(models["dpt"]),
            "--seg-model", f"file://{models['seg']}", "--size", str(SIZE), "--batch-size", "2", "--shard-size", "3"]
    try:
        main(argv)
    except SystemExit as exit:
        assert exit.code in (0, None), capsys.readouterr().err
    assert "wrote 5 pseudo-labelled samples in 2 shards" in capsys.readouterr().err

    man = read_manifest(str(out))
    assert man.modalities == ("rgb", "depth", "semseg") and man.image_size == (SIZE, SIZE)
    assert man.semseg_classes == tuple(LABELS) and man.num_semseg_classes == len(LABELS)
    info = man.extra["pseudolabel"]
    assert info["depth_model_type"] == "dpt" and info["seg_model_type"] == "segformer"
    assert info["depth"] == "1 - normalised disparity"
    samples = dict(iter_shard_samples(str(out)))
    want_keys = {f"{'a' if i % 2 else 'b'}/{Path(n).stem}" for i, n in enumerate(PHOTOS)}
    assert set(samples) == want_keys
    for key, s in samples.items():
        name = next(n for n in PHOTOS if Path(n).stem == key.split("/")[1])
        rgb = _centre_crop(photos / key.split("/")[0] / name)
        np.testing.assert_array_equal(s["rgb"], rgb)
        assert s["semseg"].shape == (SIZE, SIZE) and 0 <= s["semseg"].min() and s["semseg"].max() < len(LABELS)
        assert s["depth"].min() == 0.0 and s["depth"].max() == 1.0
    # DPT's input resolution equals the output size here (64 is a multiple of 32), so the reference is exact
    # up to 16-bit quantisation and float32 arithmetic.
    s = samples["b/astronaut"]
    np.testing.assert_allclose(s["depth"], _reference_depth(models["dpt"], s["rgb"]), atol=2e-3)


def test_pseudolabel_from_shards_and_bad_images(ray_session, models, photos, tmp_path):
    from multimae_core.data.synth import write_synth
    from orchestrator.data.pseudolabel import pseudolabel

    shards = str(tmp_path / "synth")
    write_synth(shards, 4, size=48, seed=0, samples_per_shard=2, num_workers=1)
    result = pseudolabel(shards, str(tmp_path / "from-shards"), depth_model=str(models["dpt"]),
                         seg_model=str(models["seg"]), size=SIZE, batch_size=2, progress=False)
    assert result.manifest.num_samples == 4 and result.num_skipped == 0
    assert sorted(k for k, _ in iter_shard_samples(str(tmp_path / "from-shards"))) == [f"{i:08d}" for i in range(4)]

    (photos / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match=r"a/broken: undecodable image"):
        pseudolabel(str(photos), str(tmp_path / "x"), depth_model=str(models["dpt"]), seg_model=str(models["seg"]),
                    size=SIZE, batch_size=2, progress=False)
    result = pseudolabel(str(photos), str(tmp_path / "y"), depth_model=str(models["dpt"]),
                         seg_model=str(models["seg"]), size=SIZE, batch_size=2, skip_bad=True, progress=False)
    assert result.num_skipped == 1 and result.manifest.num_samples == len(PHOTOS)


def test_unreachable_model_id_says_how_to_pass_local_weights(models, photos, tmp_path, monkeypatch, capsys):
    from orchestrator.cli.app import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit:
        main(["data", "pseudolabel", "--images", str(photos), "--out", str(tmp_path / "o"),
              "--depth-model", "Intel/dpt-hybrid-midas", "--seg-model", str(models["seg"])])
    assert exit.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot load the depth model 'Intel/dpt-hybrid-midas'")
    assert "save_pretrained('DIR')" in errors[0] and "pass --depth-model DIR" in errors[0]
    assert not (tmp_path / "o").exists()


def test_mask2former_semantic_maps_match_the_image_processor(models, tmp_path):
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    from orchestrator.data.pseudolabel import Labeler

    torch.manual_seed(1)
    cfg = Mask2FormerConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                                   out_features=["stage1", "stage2", "stage3", "stage4"]),
        feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_layers=1, decoder_layers=2, num_queries=8,
        encoder_feedforward_dim=64, dim_feedforward=64, num_attention_heads=2, num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    model = Mask2FormerForUniversalSegmentation(cfg).eval()
    model.save_pretrained(tmp_path / "m2f")
    rgb = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    out = Labeler(str(models["dpt"]), str(tmp_path / "m2f"), model_size=SIZE, device="cpu")(
        {"key": np.array(["a", "b"], dtype=object), "rgb": rgb})

    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = torch.from_numpy(((rgb / 255.0 - mean) / std).transpose(0, 3, 1, 2)).float()
    with torch.no_grad():
        outputs = model(pixel_values=x)
    want = Mask2FormerImageProcessor().post_process_semantic_segmentation(outputs, target_sizes=[(SIZE, SIZE)] * 2)
    for i in range(2):
        assert (out["semseg"][i] == want[i].numpy()).mean() > 0.99
