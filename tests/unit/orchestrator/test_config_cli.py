"""`mmae config render|validate|schema`, and how the CLI reports bad input: one `error:` line on stderr, exit code 2,
no traceback (unless MMAE_DEBUG=1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator import spec
from orchestrator.cli.app import app, main

REPO = Path(__file__).resolve().parents[3]
TINY_JOB = REPO / "jobs" / "pretrain_tiny.yaml"
runner = CliRunner()

TINY = """\
name: tiny
model:
  preset: tiny
  image_size: 64
masking:
  num_encoded_tokens: 16
train:
  global_batch_size: 32
  per_worker_batch_size: 16
"""


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the real entry point in-process; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        main(argv)
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class TestRender:
    def test_yaml_to_stdout_is_the_resolved_job(self) -> None:
        result = runner.invoke(app, ["config", "render", str(TINY_JOB)])
        assert result.exit_code == 0, result.output
        assert result.stderr == ""
        assert yaml.safe_load(result.stdout) == spec.load_job(TINY_JOB).model_dump(mode="json")

    def test_set_is_applied_left_to_right(self) -> None:
        args = [
            "config",
            "render",
            str(TINY_JOB),
            "--set",
            "optim.blr=1.0e-3",
            "-s",
            "optim.blr=2e-3",
            "--set",
            "modalities.inputs=[rgb,depth]",
            "--set",
            "modalities.outputs=[rgb,norm_rgb]",
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        data = yaml.safe_load(result.stdout)
        assert data["optim"]["blr"] == 2.0e-3
        assert data["modalities"] == {"inputs": ["rgb", "depth"], "outputs": ["rgb", "norm_rgb"]}

    def test_json_format(self) -> None:
        result = runner.invoke(app, ["config", "render", str(TINY_JOB), "--format", "json"])
        assert result.exit_code == 0, result.output
        assert spec.validate_job(json.loads(result.stdout)) == spec.load_job(TINY_JOB)

    def test_rendered_yaml_is_a_job_file(self, tmp_path: Path) -> None:
        result = runner.invoke(app, ["config", "render", str(TINY_JOB), "--set", "train.seed=3"])
        rendered = tmp_path / "resolved.yaml"
        rendered.write_text(result.stdout)
        assert spec.load_job(rendered) == spec.load_job(TINY_JOB, ["train.seed=3"])


class TestSchemaAndValidate:
    def test_schema_to_stdout(self) -> None:
        result = runner.invoke(app, ["config", "schema"])
        assert result.exit_code == 0
        assert json.loads(result.stdout) == json.loads(spec.schema_json())

    def test_schema_to_file(self, tmp_path: Path) -> None:
        out = tmp_path / "schema.json"
        result = runner.invoke(app, ["config", "schema", "--out", str(out)])
        assert result.exit_code == 0
        assert result.stdout == ""
        assert out.read_text() == spec.schema_json() == (REPO / "jobs" / "schema.json").read_text()

    def test_validate_lists_each_job(self) -> None:
        jobs = sorted((REPO / "jobs").glob("*.yaml"))
        result = runner.invoke(app, ["config", "validate", *map(str, jobs)])
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert len(lines) == len(jobs)
        for line, path in zip(lines, jobs, strict=True):
            assert line.split() == ["ok", str(path), path.stem, spec.job_hash(spec.load_job(path))]


# name -> (files to write, argv with {tmp} for their folder, text the error line must contain)
BAD_INPUTS: dict[str, tuple[dict[str, str], list[str], str]] = {
    "missing file": ({}, ["config", "render", "{tmp}/nope.yaml"], "job file not found: "),
    "yaml syntax": (
        {"syntax.yaml": TINY.replace("  image_size: 64\n", "  image_size: 64\n   bad: [1\n")},
        ["config", "render", "{tmp}/syntax.yaml"],
        "syntax.yaml:5:",
    ),
    "unknown key": (
        {"unknown.yaml": TINY + "optim:\n  blrr: 1.0e-4\n"},
        ["config", "render", "{tmp}/unknown.yaml"],
        "unknown.yaml:11: optim.blrr: unknown key; did you mean 'optim.blr'?",
    ),
    "wrong type": (
        {"type.yaml": TINY.replace("image_size: 64", "image_size: big")},
        ["config", "render", "{tmp}/type.yaml"],
        "type.yaml:4: model.image_size: Input should be a valid integer",
    ),
    "out of range": (
        {"range.yaml": TINY + "data:\n  hflip: 2.0\n"},
        ["config", "render", "{tmp}/range.yaml"],
        "range.yaml:11: data.hflip: Input should be less than or equal to 1 (got 2.0)",
    ),
    "masking modality not an input": (
        {"mask.yaml": TINY},
        ["config", "render", "{tmp}/mask.yaml", "--set", "masking.alphas={rgb: 1.0, normal: 1.0}"],
        "masking.alphas: 'normal' is not among modalities.inputs",
    ),
    "loss modality not an output": (
        {"loss.yaml": TINY + "loss:\n  weights: {normal: 2.0}\n"},
        ["config", "render", "{tmp}/loss.yaml"],
        "loss.yaml:11: loss.weights: 'normal' is not among modalities.outputs",
    ),
    "global batch vs worker batch": (
        {"batch.yaml": TINY},
        ["config", "render", "{tmp}/batch.yaml", "--set", "train.per_worker_batch_size=24"],
        "train.per_worker_batch_size (24) must divide train.global_batch_size (32)",
    ),
    "global batch vs workers": (
        {"workers.yaml": TINY},
        ["config", "render", "{tmp}/workers.yaml", "--set", "resources.max_workers=4"],
        "which 4 workers (resources.max_workers) cannot share evenly",
    ),
    "bad --set syntax": (
        {"set.yaml": TINY},
        ["config", "render", "{tmp}/set.yaml", "--set", "optim.blr"],
        "expected KEY=VALUE",
    ),
    "unknown --set key": (
        {"set.yaml": TINY},
        ["config", "render", "{tmp}/set.yaml", "--set", "optim.blrr=1.0"],
        "unknown key 'optim.blrr'; did you mean 'optim.blr'?",
    ),
    "second file of validate": (
        {"bad.yaml": "name: [x\n"},
        ["config", "validate", str(TINY_JOB), "{tmp}/bad.yaml"],
        "bad.yaml:2:",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MMAE_DEBUG", raising=False)
    files, argv, expected = BAD_INPUTS[case]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    code, out, err = run_main([arg.replace("{tmp}", str(tmp_path)) for arg in argv], capsys)
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert expected in lines[0]
    assert "Traceback" not in err
    if argv[1] == "render":
        assert out == ""


def test_a_bug_keeps_its_traceback(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(spec, "load_job", broken)
    with pytest.raises(RuntimeError, match="boom"):
        main(["config", "render", str(TINY_JOB)])


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["config", "render"], capsys)
    assert code == 2
    assert "Missing argument 'JOB'" in err


class TestSubprocess:
    """The installed entry point behaves the same in a real process."""

    def _run(self, *args: str, debug: bool = False) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "MMAE_DEBUG"}
        env["PYTHONPATH"] = str(REPO)
        if debug:
            env["MMAE_DEBUG"] = "1"
        return subprocess.run(
            [sys.executable, "-m", "orchestrator", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=120,
        )

    def test_missing_file(self) -> None:
        proc = self._run("config", "render", "jobs/does_not_exist.yaml")
        assert proc.returncode == 2
        assert proc.stderr == "error: job file not found: jobs/does_not_exist.yaml\n"
        assert proc.stdout == ""

    def test_debug_shows_the_traceback(self) -> None:
        proc = self._run("config", "render", "jobs/does_not_exist.yaml", debug=True)
        assert proc.returncode == 2
        assert "Traceback (most recent call last)" in proc.stderr
        assert proc.stderr.rstrip().endswith("error: job file not found: jobs/does_not_exist.yaml")
