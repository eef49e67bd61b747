"""Every job file in jobs/ validates, is complete and matches the checked-in JSON Schema; the paper's job matches
the paper."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from orchestrator import spec

REPO = Path(__file__).resolve().parents[3]
JOBS = sorted((REPO / "jobs").glob("*.yaml"))


def test_the_jobs_exist() -> None:
    assert {"pretrain_tiny.yaml", "pretrain_base.yaml"} <= {p.name for p in JOBS}


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
class TestEveryJob:
    def test_validates(self, path: Path) -> None:
        job = spec.load_job(path)
        assert job.name == path.stem, "a job's name is its file name"

    def test_is_complete(self, path: Path) -> None:
        # Job files spell out every field (no inheritance, nothing left to defaults), so the file is the resolved job.
        raw = yaml.safe_load(path.read_text())
        resolved = yaml.safe_load(spec.render(spec.load_job(path)))
        missing = sorted(set(spec.flatten(spec.validate_job(resolved))) - set(spec.flatten(spec.validate_job(raw))))
        assert raw == resolved, f"{path.name} differs from `mmae config render {path.name}`; missing: {missing}"

    def test_numbers_have_a_mantissa(self, path: Path) -> None:
        # PyYAML reads 1e-4 as a string; job files write 1.0e-4.
        bare = [line for line in path.read_text().splitlines() if re.search(r"(?<![\w.])\d+[eE][-+]?\d+", line)]
        assert bare == []

    def test_matches_the_json_schema(self, path: Path) -> None:
        schema = json.loads((REPO / "jobs" / "schema.json").read_text())
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)


def test_schema_file_is_up_to_date() -> None:
    on_disk = (REPO / "jobs" / "schema.json").read_text()
    assert on_disk == spec.schema_json(), "regenerate with: mmae config schema --out jobs/schema.json"


def test_schema_file_rejects_unknown_keys() -> None:
    # Editors validate job files against schema.json; it must catch what load_job catches.
    schema = json.loads((REPO / "jobs" / "schema.json").read_text())
    job = yaml.safe_load((REPO / "jobs" / "pretrain_tiny.yaml").read_text())
    job["optim"]["blrr"] = 1.0
    with pytest.raises(jsonschema.ValidationError, match="blrr"):
        jsonschema.validate(job, schema)


def test_base_job_is_the_papers_setup() -> None:
    # Numbers from MultiMAE's multimae-b_98_rgb+-depth-semseg_1600e config (../shared/docs/multimae_spec.md, section 6).
    job = spec.load_job(REPO / "jobs" / "pretrain_base.yaml")
    assert job.stage == "pretrain"
    assert (job.model.image_size, job.model.patch_size) == (224, 16)
    assert (job.model.embed_dim, job.model.depth, job.model.num_heads) == (768, 12, 12)
    assert (job.model.decoder_embed_dim, job.model.decoder_depth, job.model.decoder_num_heads) == (256, 2, 8)
    assert job.model.num_global_tokens == 1 and job.model.drop_path_rate == 0.0
    assert job.modalities.inputs == ["rgb", "depth", "semseg"]
    assert job.modalities.outputs == ["rgb", "depth", "semseg", "norm_rgb"]
    assert job.masking.num_encoded_tokens == 98 and job.masking.alphas == 1.0
    assert job.train.epochs == 1600 and job.train.global_batch_size == 2048
    assert job.optim.blr == 1.0e-4 and job.optim.lr is None and job.optim.min_lr == 0.0
    assert job.optim.blr * job.train.global_batch_size / 256 == pytest.approx(8.0e-4)
    assert job.optim.betas == (0.9, 0.95) and job.optim.eps == 1.0e-8
    assert job.optim.weight_decay == 0.05 and job.optim.decay_all_params
    assert job.optim.warmup_epochs == 40 and job.optim.warmup_steps is None
    assert job.train.precision == "fp16" and job.train.grad_clip is None
    assert job.loss.weights == {} and not job.loss.loss_on_unmasked
    assert job.data.crop_scale == (0.2, 1.0) and job.data.hflip == 0.5
    # Several nodes of 8 GPUs, on spot, with data and checkpoints in a bucket.
    res = job.resources
    assert res.num_nodes > 1 and res.gpus_per_node == 8 and res.use_spot
    assert job.checkpoint.storage_url.startswith("s3://") and job.data.train_url.startswith("s3://")
    low, high = res.worker_bounds
    assert high == res.num_nodes * 8
    for workers in (low, high):
        assert job.train.global_batch_size % (workers * job.train.per_worker_batch_size) == 0


def test_tiny_job_is_small() -> None:
    job = spec.load_job(REPO / "jobs" / "pretrain_tiny.yaml")
    tokens_per_modality = (job.model.image_size // job.model.patch_size) ** 2
    assert tokens_per_modality == 16
    assert job.masking.num_encoded_tokens <= tokens_per_modality * len(job.modalities.inputs)
    assert job.modalities.inputs == ["rgb", "depth", "semseg"]
    assert job.modalities.outputs == ["rgb", "depth", "semseg", "norm_rgb"]
    assert (job.data.train_url, job.data.val_url) == ("data/synth/train", "data/synth/val")
    assert job.checkpoint.storage_url == ".mmae/checkpoints"
    assert job.resources.accelerators is None and job.resources.num_nodes == 1
    assert job.train.max_steps is not None and job.train.max_steps <= 500
    assert job.model.embed_dim is not None and job.model.embed_dim <= 192
    assert job.model.depth is not None and job.model.depth <= 4
