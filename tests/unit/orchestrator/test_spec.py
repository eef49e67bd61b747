"""JobSpec schema, job loading and its one-line errors, and the resolved forms (flatten, render, hash)."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from multimae_core.config import TrainConfig
from orchestrator import spec
from orchestrator.errors import UserError
from orchestrator.overrides import all_paths
from orchestrator.spec import JobSpec, ResourcesConfig, flatten, job_hash, load_job, render, validate_job

# A small valid job, written out here so these tests do not depend on the files in jobs/.
TINY = """\
name: tiny
model:
  preset: tiny
  image_size: 64
  embed_dim: 64
  depth: 2
  num_heads: 2
masking:
  num_encoded_tokens: 16
train:
  global_batch_size: 32
  per_worker_batch_size: 16
"""


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, overrides: list[str] | None = None) -> str:
    with pytest.raises(UserError) as info:
        load_job(write(tmp_path, text), overrides or [])
    message = str(info.value)
    assert "\n" not in message
    return message


class TestSchema:
    def test_loads_with_schema_defaults(self, tmp_path: Path) -> None:
        job = load_job(write(tmp_path, TINY))
        assert isinstance(job, TrainConfig)
        assert job.model.image_size == 64
        assert job.optim.blr == 1.0e-4  # schema default
        assert job.resources.accelerators is None
        assert job.resources.worker_bounds == (1, 1)

    def test_exponents_without_mantissa_are_coerced(self, tmp_path: Path) -> None:
        text = TINY + "optim:\n  blr: 1e-4\n  lr: 3e-3\n  betas: [9e-1, 95e-2]\n  eps: 1e-8\nmasking:\n  alphas: 5e-1\n"
        text = text.replace("masking:\n  num_encoded_tokens: 16\n", "")
        text = text.replace("alphas: 5e-1\n", "alphas: 5e-1\n  num_encoded_tokens: 16\n")
        raw = yaml.safe_load(text)
        assert raw["optim"]["blr"] == "1e-4"  # what PyYAML hands over
        job = load_job(write(tmp_path, text))
        assert job.optim.blr == pytest.approx(1.0e-4, rel=0, abs=0)
        assert job.optim.lr == 3.0e-3
        assert job.optim.betas == (0.9, 0.95)
        assert job.optim.eps == 1.0e-8
        assert job.masking.alphas == 0.5

    def test_exponent_strings_through_set(self, tmp_path: Path) -> None:
        job = load_job(write(tmp_path, TINY), ["optim.blr=2e-4", "optim.min_lr=1e-6"])
        assert job.optim.blr == 2.0e-4
        assert job.optim.min_lr == 1.0e-6

    def test_experiment_defaults_to_stage(self, tmp_path: Path) -> None:
        assert load_job(write(tmp_path, TINY)).tracking.experiment == "multimae/pretrain"
        finetune = load_job(write(tmp_path, TINY), ["stage=finetune", "modalities.outputs=[]", "finetune.kind=depth"])
        assert finetune.tracking.experiment == "multimae/finetune"
        explicit = load_job(write(tmp_path, TINY), ["tracking.experiment=team/x"])
        assert explicit.tracking.experiment == "team/x"
        assert JobSpec(name="x", tracking=spec.TrackingConfig(run_name="r")).tracking.experiment == "multimae/pretrain"

    def test_no_tracking_uri_in_the_job(self, tmp_path: Path) -> None:
        message = error_of(tmp_path, TINY + "tracking:\n  uri: http://mlflow:5000\n")
        assert "tracking.uri: unknown key" in message
        assert "MLFLOW_TRACKING_URI" in message

    def test_sections_are_frozen(self, tmp_path: Path) -> None:
        job = load_job(write(tmp_path, TINY))
        with pytest.raises(ValidationError):
            job.optim.blr = 1.0  # type: ignore[misc]

    def test_every_field_is_documented(self) -> None:
        def walk(model: type[BaseModel], prefix: str) -> list[str]:
            missing = []
            for name, info in model.model_fields.items():
                if not (info.description or "").strip():
                    missing.append(prefix + name)
                for arg in typing.get_args(info.annotation) or (info.annotation,):
                    if isinstance(arg, type) and issubclass(arg, BaseModel):
                        missing += walk(arg, f"{prefix}{name}.")
            return missing

        assert walk(JobSpec, "") == []


class TestResources:
    @pytest.mark.parametrize(
        ("fields", "bounds", "gpus"),
        [
            ({}, (1, 1), 0),
            ({"num_nodes": 3}, (3, 3), 0),  # CPU: one worker per node
            ({"accelerators": "H100:8", "num_nodes": 4}, (32, 32), 8),
            ({"accelerators": "H100:8", "num_nodes": 4, "min_workers": 16}, (16, 32), 8),
            ({"accelerators": "A100", "num_nodes": 2}, (2, 2), 1),
            ({"accelerators": "L4:4", "max_workers": 2}, (2, 2), 4),
            ({"max_workers": 4, "min_workers": 1}, (1, 4), 0),  # several CPU workers on one machine
        ],
    )
    def test_worker_bounds(self, fields: dict[str, Any], bounds: tuple[int, int], gpus: int) -> None:
        resources = ResourcesConfig(**fields)
        assert resources.worker_bounds == bounds
        assert resources.gpus_per_node == gpus

    @pytest.mark.parametrize(
        ("sets", "match"),
        [
            (
                ["resources.accelerators=H100:8", "resources.max_workers=9"],
                r"resources.max_workers \(9\) exceeds the 8 GPUs",
            ),
            (
                ["resources.min_workers=4", "resources.max_workers=2"],
                r"resources.min_workers \(4\) exceeds the maximum",
            ),
            (["resources.zone=us-east-1a"], "resources.zone needs resources.region"),
            (["resources.region=us-east-1"], "resources.region needs resources.cloud"),
            (["resources.accelerators=H100:x"], "resources.accelerators: String should match pattern"),
            (["resources.num_nodes=0"], "resources.num_nodes: Input should be greater than or equal to 1"),
            (["resources.num_nodes=2"], r"checkpoint.storage_url \('.mmae/checkpoints'\) must be shared storage"),
        ],
    )
    def test_bad_resources(self, tmp_path: Path, sets: list[str], match: str) -> None:
        assert re.search(match, error_of(tmp_path, TINY, sets))

    def test_workers_must_share_the_global_batch(self, tmp_path: Path) -> None:
        # 32 / 16 = 2 micro-batches: 1 or 2 workers share them, 3 cannot.
        assert load_job(write(tmp_path, TINY), ["resources.max_workers=2"]).resources.worker_bounds == (2, 2)
        message = error_of(tmp_path, TINY, ["resources.max_workers=4", "resources.min_workers=1"])
        assert "train.global_batch_size (32) is 2 micro-batches" in message
        assert "4 workers (resources.max_workers)" in message
        message = error_of(
            tmp_path, TINY, ["train.per_worker_batch_size=4", "resources.max_workers=8", "resources.min_workers=3"]
        )
        assert "3 workers (resources.min_workers) cannot share evenly" in message

    def test_data_ingest(self, tmp_path: Path) -> None:
        assert load_job(write(tmp_path, TINY)).data.ingest == "loader"
        assert load_job(write(tmp_path, TINY), ["data.ingest=ray"]).data.ingest == "ray"
        assert "data.ingest: Input should be 'loader' or 'ray'" in error_of(tmp_path, TINY, ["data.ingest=spark"])
        finetune = ["stage=finetune", "modalities.outputs=[]", "finetune.kind=depth", "data.ingest=ray"]
        assert "data.ingest: fine-tuning reads its task targets through the plain loader" in error_of(
            tmp_path, TINY, finetune)

    def test_global_batch_not_divisible_by_worker_batch(self, tmp_path: Path) -> None:
        message = error_of(tmp_path, TINY, ["train.per_worker_batch_size=12"])
        assert message.startswith("train.per_worker_batch_size (12) must divide train.global_batch_size (32)")


class TestLoadErrors:
    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(UserError, match="job file not found: .*nope.yaml"):
            load_job(tmp_path / "nope.yaml")

    def test_directory(self, tmp_path: Path) -> None:
        with pytest.raises(UserError, match="job file is a directory"):
            load_job(tmp_path)

    def test_empty_file(self, tmp_path: Path) -> None:
        assert error_of(tmp_path, "# only a comment\n").endswith("the job file is empty")

    def test_top_level_must_be_a_mapping(self, tmp_path: Path) -> None:
        assert "a job file is a mapping of sections" in error_of(tmp_path, "- name\n- model\n")

    def test_yaml_syntax_error_names_its_line(self, tmp_path: Path) -> None:
        text = TINY.replace("  depth: 2\n", "  depth: 2\n   num_heads: [2\n")
        line = text.splitlines().index("   num_heads: [2") + 1
        message = error_of(tmp_path, text)
        assert re.match(rf".*job\.yaml:{line}:\d+: invalid YAML: ", message), message

    def test_duplicate_key_is_an_error(self, tmp_path: Path) -> None:
        message = error_of(tmp_path, TINY + "name: other\n")
        assert "duplicate key 'name' (first set on line 1)" in message
        assert f"job.yaml:{len(TINY.splitlines()) + 1}:" in message

    def test_unknown_key_names_the_closest_with_its_line(self, tmp_path: Path) -> None:
        message = error_of(tmp_path, TINY + "optim:\n  blrr: 1.0e-4\n")
        line = len(TINY.splitlines()) + 2
        assert message.endswith(f"job.yaml:{line}: optim.blrr: unknown key; did you mean 'optim.blr'?")

    def test_misspelt_required_key_reports_the_spelling(self, tmp_path: Path) -> None:
        message = error_of(tmp_path, TINY.replace("name: tiny", "nmae: tiny"))
        assert "job.yaml:1: nmae: unknown key; did you mean 'name'? (and 1 more error)" in message

    def test_unknown_key_far_from_any(self, tmp_path: Path) -> None:
        message = error_of(tmp_path, TINY + "train:\n  zzz: 1\n".replace("train:\n", "resources:\n"))
        assert "resources.zzz: unknown key (valid keys under 'resources': accelerators, num_nodes" in message

    def test_wrong_type_names_the_dotted_path_and_line(self, tmp_path: Path) -> None:
        message = error_of(tmp_path, TINY.replace("depth: 2", "depth: two"))
        assert message.endswith(
            "job.yaml:6: model.depth: Input should be a valid integer, unable to parse string as an integer (got 'two')"
        )

    def test_wrong_item_type_in_a_list(self, tmp_path: Path) -> None:
        message = error_of(tmp_path, TINY + "modalities:\n  inputs:\n  - rgb\n  - 7\n")
        assert message.endswith(
            f":{len(TINY.splitlines()) + 4}: modalities.inputs[1]: Input should be a valid string (got 7)"
        )

    def test_out_of_range(self, tmp_path: Path) -> None:
        message = error_of(tmp_path, TINY + "data:\n  hflip: 1.5\n")
        assert message.endswith(
            f":{len(TINY.splitlines()) + 2}: data.hflip: Input should be less than or equal to 1 (got 1.5)"
        )

    def test_errors_from_set_say_so(self, tmp_path: Path) -> None:
        message = error_of(tmp_path, TINY, ["train.epochs=0"])
        assert message == "train.epochs: Input should be greater than or equal to 1 (got 0) (from --set)"

    @pytest.mark.parametrize(
        ("text", "match"),
        [
            ("optim.blr", "--set optim.blr: expected KEY=VALUE"),
            ("optim.bl=1.0", "--set optim.bl=1.0: unknown key 'optim.bl'; did you mean 'optim.blr'?"),
            ("tracking.uri=http://x", "MLFLOW_TRACKING_URI"),
        ],
    )
    def test_bad_set(self, tmp_path: Path, text: str, match: str) -> None:
        assert match in error_of(tmp_path, TINY, [text])

    @pytest.mark.parametrize(
        ("extra", "match", "key"),
        [
            (
                "  alphas: {rgb: 1.0, normal: 1.0}\n",
                "masking.alphas: 'normal' is not among modalities.inputs",
                "alphas",
            ),
            ("  alphas: {rgb: 1.0}\n", r"masking.alphas: no value for \['depth', 'semseg'\]", "alphas"),
            ("loss:\n  weights: {normal: 2.0}\n", "loss.weights: 'normal' is not among modalities.outputs", "weights"),
            (
                "modalities:\n  inputs: [rgb, dept]\n",
                "modalities.inputs: unknown modality 'dept'; did you mean",
                "inputs",
            ),
            (
                "modalities:\n  inputs: [rgb, norm_rgb]\n",
                "modalities.inputs: modality 'norm_rgb' is output-only",
                "inputs",
            ),
            ("modalities:\n  inputs: [rgb]\n  outputs: [rgb, depth]\n", "'depth' needs 'depth' among", "outputs"),
        ],
    )
    def test_modalities_in_masking_and_losses_must_exist(
        self, tmp_path: Path, extra: str, match: str, key: str
    ) -> None:
        # The masking section goes last, so `extra` either continues it or adds a section after it.
        text = TINY.replace("masking:\n  num_encoded_tokens: 16\n", "") + "masking:\n  num_encoded_tokens: 16\n" + extra
        message = error_of(tmp_path, text)
        assert re.search(match, message), message
        line = next(i for i, row in enumerate(text.splitlines(), 1) if row.startswith(f"  {key}:"))
        assert re.match(rf".*job\.yaml:{line}: ", message), message


class TestResolvedForms:
    RICH = TINY + (
        "tracking:\n  run_name: '0042'\n  tags: {team: vision, commit: '1e5'}\n"
        "loss:\n  weights: {depth: 2.0, rgb: 0.5}\n"
        "data:\n  train_url: s3://bucket/train\n  val_url: null\n"
    )

    @pytest.mark.parametrize("text", [TINY, RICH])
    def test_flatten_keys_are_set_paths_and_values_round_trip(self, tmp_path: Path, text: str) -> None:
        job = load_job(write(tmp_path, text))
        flat = flatten(job)
        sections = {p for p in all_paths(JobSpec) if any(q.startswith(p + ".") for q in all_paths(JobSpec))}
        # An optional section that is null (finetune in a pretraining job) is one param, "null".
        null = {p for p in sections if flat.get(p) == "null"}
        assert list(flat) == [p for p in all_paths(JobSpec) if (p not in sections or p in null)
                              and not any(p.startswith(n + ".") for n in null)]
        assert all(isinstance(v, str) for v in flat.values())
        # The params are the --set strings: replaying them onto nothing rebuilds the same job.
        rebuilt = validate_job({}, [f"{key}={value}" for key, value in flat.items()])
        assert rebuilt == job

    def test_flatten_examples(self, tmp_path: Path) -> None:
        flat = flatten(load_job(write(tmp_path, self.RICH)))
        assert flat["optim.blr"] == "0.0001"
        assert flat["optim.eps"] == "1.0e-08"
        assert flat["modalities.inputs"] == "[rgb, depth, semseg]"
        assert flat["loss.weights"] == "{depth: 2.0, rgb: 0.5}"
        assert flat["tracking.run_name"] == "0042"
        assert flat["data.val_url"] == "null"
        assert flat["train.compile"] == "false"
        assert flat["resources.job_recovery.max_restarts_on_errors"] == "0"

    @pytest.mark.parametrize("text", [TINY, RICH])
    def test_render_round_trips(self, tmp_path: Path, text: str) -> None:
        job = load_job(write(tmp_path, text))
        rendered = render(job)
        assert load_job(write(tmp_path, rendered, "rendered.yaml")) == job
        assert "inputs: [rgb, depth, semseg]" in rendered  # lists of scalars in flow style, as job files are written
        assert validate_job(json.loads(render(job, "json"))) == job

    def test_job_hash(self, tmp_path: Path) -> None:
        path = write(tmp_path, TINY)
        base = job_hash(load_job(path))
        assert re.fullmatch(r"[0-9a-f]{8}", base)
        assert job_hash(load_job(path)) == base
        # Writing a default explicitly does not change the resolved config.
        assert job_hash(load_job(path, ["optim.blr=1.0e-4"])) == base
        assert job_hash(load_job(path, ["optim.blr=2.0e-4"])) != base
        # Where it runs and how it is tracked are not part of the training config.
        assert job_hash(load_job(path, ["resources.max_workers=2", "tracking.run_name=x"])) == base

    def test_run_name(self, tmp_path: Path) -> None:
        job = load_job(write(tmp_path, TINY))
        assert spec.run_name(job) == f"tiny-{job_hash(job)}"
        assert spec.run_name(load_job(write(tmp_path, TINY), ["tracking.run_name=mine"])) == "mine"

    def test_schema_json_describes_job_files(self) -> None:
        schema = json.loads(spec.schema_json())
        assert schema["title"] == "mmae job"
        assert schema["additionalProperties"] is False
        assert schema["required"] == ["name"]
        assert {"tracking", "resources", "optim", "model"} <= set(schema["properties"])
        blr = schema["$defs"]["OptimConfig"]["properties"]["blr"]
        assert blr["type"] == "number" and "global_batch_size / 256" in blr["description"]
