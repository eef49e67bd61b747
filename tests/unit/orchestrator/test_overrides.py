"""`--set a.b.c=value` parsing, schema checks and application (orchestrator.overrides)."""

from __future__ import annotations

import copy

import pytest

from orchestrator.overrides import Override, all_paths, apply_overrides, check_path, parse_override
from orchestrator.spec import JobSpec


class TestParse:
    @pytest.mark.parametrize(
        ("text", "path", "value"),
        [
            ("optim.blr=2.0e-4", ("optim", "blr"), 2.0e-4),
            ("model.image_size=64", ("model", "image_size"), 64),
            ("modalities.inputs=[rgb,depth]", ("modalities", "inputs"), ["rgb", "depth"]),
            ("modalities.inputs=[rgb, depth]", ("modalities", "inputs"), ["rgb", "depth"]),
            ("loss.weights={depth: 2.0}", ("loss", "weights"), {"depth": 2.0}),
            ("train.compile=true", ("train", "compile"), True),
            ("optim.lr=null", ("optim", "lr"), None),
            ("tracking.tags.note=a=b", ("tracking", "tags", "note"), "a=b"),  # splits at the first '=' only
            ("  name = demo", ("name",), "demo"),
            ("resources.accelerators=H100:8", ("resources", "accelerators"), "H100:8"),
        ],
    )
    def test_values_are_yaml(self, text: str, path: tuple[str, ...], value: object) -> None:
        override = parse_override(text)
        assert override.path == path
        assert override.value == value
        assert type(override.value) is type(value)

    def test_pyyaml_reads_exponent_without_mantissa_as_text(self) -> None:
        # The trap the schema has to coerce: YAML 1.1 floats need a dot, so 1e-4 is a string.
        assert parse_override("optim.blr=1e-4").value == "1e-4"

    @pytest.mark.parametrize(
        ("text", "match"),
        [
            ("optim.blr", "expected KEY=VALUE"),
            ("=3", "missing key"),
            ("optim..blr=1", "bad key"),
            (".optim=1", "bad key"),
            ("optim.=1", "bad key"),
            ("optim blr=1", "bad key"),
            ("optim.blr=", "no value after '='"),
            ("optim.blr=   ", "no value after '='"),
            ("modalities.inputs=[rgb,", "not valid YAML"),
            ("loss.weights={a: 1", "not valid YAML"),
        ],
    )
    def test_bad_syntax(self, text: str, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            parse_override(text)


class TestApply:
    def test_left_to_right_later_wins(self) -> None:
        result = apply_overrides({}, ["optim.blr=1.0e-3", "optim.blr=2.0e-3", "optim.min_lr=0.0"])
        assert result == {"optim": {"blr": 2.0e-3, "min_lr": 0.0}}

    def test_creates_and_replaces_intermediate_sections(self) -> None:
        data = {"optim": None, "model": {"depth": 2}}
        result = apply_overrides(data, ["optim.blr=1.0", "model.embed_dim=64", "masking.alphas.rgb=0.5"])
        assert result == {
            "optim": {"blr": 1.0},
            "model": {"depth": 2, "embed_dim": 64},
            "masking": {"alphas": {"rgb": 0.5}},
        }

    def test_input_is_not_mutated(self) -> None:
        data = {"model": {"depth": 2}, "modalities": {"inputs": ["rgb"]}}
        before = copy.deepcopy(data)
        result = apply_overrides(data, ["model.depth=3"])
        assert data == before
        result["modalities"]["inputs"].append("depth")
        assert data == before

    def test_accepts_parsed_overrides(self) -> None:
        override = parse_override("train.seed=7")
        assert isinstance(override, Override)
        assert apply_overrides({"train": {"seed": 0}}, [override]) == {"train": {"seed": 7}}

    def test_a_whole_section_can_be_set(self) -> None:
        result = apply_overrides({}, ["modalities={inputs: [rgb], outputs: [rgb]}"], schema=JobSpec)
        assert result == {"modalities": {"inputs": ["rgb"], "outputs": ["rgb"]}}


class TestSchemaPaths:
    @pytest.mark.parametrize(
        ("text", "suggestion"),
        [
            ("optim.blrr=1.0", "'optim.blr'"),
            ("optm.blr=1.0", "'optim.blr'"),  # the section is misspelt: the whole corrected path is suggested
            ("modalites.inputs=[rgb]", "'modalities.inputs'"),
            ("train.global_batch=64", "'train.global_batch_size'"),
            ("resources.job_recovery.max_restarts=2", "'resources.job_recovery.max_restarts_on_errors'"),
            ("nmae=x", "'name'"),
        ],
    )
    def test_unknown_key_names_the_closest_path(self, text: str, suggestion: str) -> None:
        with pytest.raises(ValueError, match="unknown key") as info:
            apply_overrides({}, [text], schema=JobSpec)
        assert f"did you mean {suggestion}?" in str(info.value)

    def test_unknown_key_without_a_close_match_lists_the_valid_keys(self) -> None:
        with pytest.raises(ValueError, match="valid keys under 'tracking': experiment, run_name") as info:
            apply_overrides({}, ["tracking.zzz=1"], schema=JobSpec)
        assert "did you mean" not in str(info.value)

    def test_cannot_go_below_a_value(self) -> None:
        with pytest.raises(ValueError, match="'model.image_size' is a value, not a section"):
            apply_overrides({}, ["model.image_size.x=1"], schema=JobSpec)

    def test_dict_fields_take_free_keys(self) -> None:
        result = apply_overrides({}, ["loss.weights.depth=2.0", "tracking.tags.team=vision"], schema=JobSpec)
        assert result == {"loss": {"weights": {"depth": 2.0}}, "tracking": {"tags": {"team": "vision"}}}
        with pytest.raises(ValueError, match="is a value, not a section"):
            apply_overrides({}, ["loss.weights.depth.x=2.0"], schema=JobSpec)

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("tracking.run_name=0042", "0042"),  # YAML would read an int
            ("tracking.run_name=2024-01-31", "2024-01-31"),  # ... or a date
            ("name=true", "true"),
            ("tracking.tags.commit=1e5", "1e5"),  # dict[str, str] values are text too
            ("tracking.run_name=null", None),  # nullable text fields still take null
        ],
    )
    def test_text_fields_keep_what_was_typed(self, text: str, expected: object) -> None:
        result = apply_overrides({}, [text], schema=JobSpec)
        node = result
        for key in parse_override(text).path:
            node = node[key]
        assert node == expected

    def test_every_schema_path_is_accepted(self) -> None:
        paths = all_paths(JobSpec)
        assert len(paths) == len(set(paths))
        for expected in ("name", "optim.blr", "resources.job_recovery.max_restarts_on_errors", "tracking.experiment"):
            assert expected in paths
        for path in paths:
            check_path(JobSpec, path.split("."))

    def test_check_path_returns_what_the_path_holds(self) -> None:
        assert check_path(JobSpec, ["model", "image_size"]) is int
        assert check_path(JobSpec, ["loss", "weights", "rgb"]) is float
        assert check_path(JobSpec, ["resources"]).__name__ == "ResourcesConfig"
