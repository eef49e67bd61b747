"""Fine-tuning batches: targets cropped with the inputs' box (nearest, full resolution), label checks, the config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from multimae_core.config import TrainConfig
from multimae_core.data.synth import render_sample, write_synth
from multimae_core.data.tasks import FinetuneDataSource, TaskTransform, crop_target
from multimae_core.data.transforms import CropParams, apply_crop, normalize_modality


def test_targets_share_the_inputs_crop_and_flip() -> None:
    sample = render_sample(0, 3, 32)
    params = CropParams(top=4, left=6, height=20, width=20, flip=True)
    # semseg: full resolution (not the stride-4 input map), nearest neighbour, same box and flip as the inputs.
    out = TaskTransform(40, kind="semseg", inputs=["rgb", "depth"]).apply(sample, params)
    rows = np.minimum(4 + (np.arange(40) + 0.5) * 20 / 40, 23.999).astype(int)
    cols = np.minimum(6 + (np.arange(40) + 0.5) * 20 / 40, 25.999).astype(int)
    naive = sample["semseg"][rows][:, cols][:, ::-1]
    np.testing.assert_array_equal(out["target"], naive)
    assert out["target"].dtype == np.int64 and out["target"].shape == (40, 40)
    np.testing.assert_array_equal(out["rgb"], normalize_modality("rgb", apply_crop("rgb", sample["rgb"], params,
                                                                                    (40, 40))))
    # depth: the stored metric depth (not standardised), float32 [1, H, W], nearest (no blended values).
    out = TaskTransform(40, kind="depth", inputs=["rgb"]).apply(sample, params)
    np.testing.assert_array_equal(out["target"][0], sample["depth"][rows][:, cols][:, ::-1])
    assert set(np.unique(out["target"])) <= set(np.unique(sample["depth"]))
    assert "depth" not in out  # not an input here
    out = TaskTransform(32, kind="cls", inputs=["rgb"]).apply(sample, params)
    assert out["target"] == sample["cls"] and out["target"].dtype == np.int64


def test_reduce_zero_label_and_integer_crop() -> None:
    labels = np.array([[0, 1], [2, 3]], dtype=np.int32)
    params = CropParams(0, 0, 2, 2, flip=False)
    assert crop_target(labels, params, (2, 2)).tolist() == [[0, 1], [2, 3]]
    sample = {"rgb": np.zeros((2, 2, 3), np.uint8), "semseg": labels}
    out = TaskTransform(2, kind="semseg", inputs=["rgb"], reduce_zero_label=True, ignore_index=255).apply(sample,
                                                                                                         params)
    assert out["target"].tolist() == [[255, 0], [1, 2]]


def test_data_source_batches_and_label_checks(tmp_path: Path) -> None:
    write_synth(str(tmp_path / "s"), 8, size=32, seed=0, samples_per_shard=8, num_workers=1)
    src = FinetuneDataSource({"train": str(tmp_path / "s"), "val": str(tmp_path / "s")}, kind="semseg",
                             inputs=["rgb", "depth"], num_classes=6, per_worker_batch_size=4, image_size=32)
    batch = next(src.epoch_batches(0, split="val"))
    assert batch["target"].shape == (4, 32, 32) and batch["depth"].shape == (4, 1, 32, 32)
    assert int(batch["target"].max()) < 6
    with pytest.raises(ValueError, match=r"shards have 6 semseg classes but finetune.num_classes is 3: labels would "
                                         r"fall outside the class range \[0, 2\]"):
        FinetuneDataSource(str(tmp_path / "s"), kind="semseg", inputs=["rgb"], num_classes=3, per_worker_batch_size=4)
    with pytest.raises(ValueError, match="4 image classes but finetune.num_classes is 2"):
        FinetuneDataSource(str(tmp_path / "s"), kind="cls", inputs=["rgb"], num_classes=2, per_worker_batch_size=4)


BASE = {"name": "x", "stage": "finetune", "modalities": {"inputs": ["rgb"], "outputs": []}}


@pytest.mark.parametrize(("data", "message"), [
    ({"finetune": None}, "stage finetune needs the task section"),
    ({"finetune": {"kind": "semseg"}}, "finetune.num_classes is required for finetune.kind semseg"),
    ({"finetune": {"kind": "depth"}, "modalities": {"inputs": ["rgb"], "outputs": ["rgb"]}},
     "modalities.outputs: fine-tuning has no"),
    ({"finetune": {"kind": "depth", "main_tasks": ["depth"]}}, r"finetune.main_tasks \['depth'\] must be a"),
    ({"finetune": {"kind": "depth", "dpt_hooks": [1, 2, 3, 9]}, "model": {"depth": 4}}, "finetune.dpt_hooks"),
    ({"finetune": {"kind": "semseg", "num_classes": 3, "seg_preds_per_patch": 8}}, "square number"),
    ({"stage": "pretrain", "modalities": {"inputs": ["rgb"], "outputs": ["rgb"]}, "finetune": {"kind": "depth"}},
     "the task section is for stage finetune"),
    ({"stage": "pretrain", "modalities": {"inputs": ["rgb"], "outputs": ["rgb"]},
      "init": {"checkpoint_url": "w.safetensors"}}, "init.checkpoint_url: starting from weights is for stage"),
    ({"finetune": {"kind": "depth"}, "init": {"format": "keras"}}, "init.format"),
])
def test_config_errors_name_the_field(data: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TrainConfig.model_validate({**BASE, **data})
    assert TrainConfig.model_validate({**BASE, "finetune": {"kind": "depth"}}).init.checkpoint_url is None
