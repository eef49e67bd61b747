"""`mmae finetune` without services: --from-checkpoint resolution and checks, one-line errors, lineage helpers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file

from orchestrator.cli.app import main
from orchestrator.errors import UserError
from orchestrator.launch.status import link_children
from orchestrator.runtime.pretrained import as_user_error

REPO = Path(__file__).resolve().parents[3]
JOB = REPO / "jobs" / "finetune_tiny_depth.yaml"


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out, captured.err


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pretrain_tiny-sized MultiMAE weights (rgb, depth, semseg inputs) as this project's safetensors."""
    from multimae_core.model.presets import build_model
    from orchestrator.spec import load_job

    job = load_job(REPO / "jobs" / "pretrain_tiny.yaml")
    model = build_model(job.model, inputs=job.modalities.inputs, outputs=["rgb"])
    path = tmp_path_factory.mktemp("w") / "pre.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_from_checkpoint_dry_run_prints_the_job_with_init(capsys, weights: Path, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # the job's relative data folders do not exist here: the label check is skipped
    code, out, err = run_cli(capsys, "finetune", JOB, "--from-checkpoint", weights, "--local", "--dry-run")
    assert code == 0, err
    job = yaml.safe_load(out)
    assert job["init"] == {"checkpoint_url": str(weights), "format": "mmae", "parent_run_id": None,
                           "allow_new_inputs": False}
    assert job["tracking"]["tags"] == {}  # no run: no lineage tags
    assert "depth fine-tuning from" in err and "dry run" in err


@pytest.mark.parametrize(("extra", "message"), [
    (["--set", "model.embed_dim=64"], "do not fit the job finetune_tiny_depth: checkpoint does not fit the model's "
                                      "sizes"),
    (["--set", "model.depth=2"], "keys the model lacks: \\['encoder.2."),
    (["--set", "modalities.inputs=[rgb,normal]"], "has no input adapter for \\['normal'\\]"),
])
def test_weights_that_do_not_fit_are_one_line(capsys, weights: Path, extra: list[str], message: str) -> None:
    code, out, err = run_cli(capsys, "finetune", JOB, "--from-checkpoint", weights, "--local", "--dry-run", *extra)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert re.search(message, lines[0]), lines[0]
    assert out == ""


def test_bad_checkpoints_and_options(capsys, weights: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\x04not really a pickle")
    cases = [
        (["--from-checkpoint", junk, "--local"], f"error: {junk} is not a state dict of tensors"),
        (["--from-checkpoint", tmp_path / "none.pth", "--local"], "no such file or folder"),
        (["--local"], "give exactly one of --from-run RUN_ID and --from-checkpoint"),
        (["--from-checkpoint", weights, "--from-run", "abc", "--local"], "give exactly one of"),
        (["--from-checkpoint", weights, "--checkpoint-step", "3", "--local"], "--checkpoint-step needs --from-run"),
        (["--from-checkpoint", weights], "out of the cluster's reach"),
    ]
    for args, message in cases:
        code, _, err = run_cli(capsys, "finetune", JOB, *args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
    code, _, err = run_cli(capsys, "finetune", REPO / "jobs" / "pretrain_tiny.yaml", "--from-checkpoint", weights)
    assert code == 2 and "stage is 'pretrain'; fine-tuning needs a job with stage finetune" in err


def test_timm_weights_are_detected(capsys, weights: Path, tmp_path: Path, monkeypatch) -> None:
    from safetensors.torch import load_file

    from multimae_core.model.state_dict import multimae_to_vit

    vit = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in multimae_to_vit(load_file(str(weights))).items()}, str(vit))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "finetune", JOB, "--from-checkpoint", vit, "--local", "--dry-run",
                             "--set", "modalities.inputs=[rgb,depth]")
    assert code == 0, err
    assert yaml.safe_load(out)["init"]["format"] == "timm-vit"  # the depth adapter starts fresh (timm has rgb only)


def test_link_children_and_training_errors() -> None:
    rows = [{"run_id": "p", "parent_run_id": None}, {"run_id": "a", "parent_run_id": "p"},
            {"run_id": "b", "parent_run_id": "p"}, {"run_id": "c", "parent_run_id": "gone"}]
    linked = {r["run_id"]: r["children"] for r in link_children(rows)}
    assert linked == {"p": ["a", "b"], "a": [], "b": [], "c": []}

    class WorkerGroupError(Exception):
        def __init__(self, failures: dict[int, Exception]) -> None:
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    bad_label = ValueError("Traceback ...\n  ...\nValueError: labels: label 7 is outside the class range [0, 5]")
    user = as_user_error(WorkerGroupError({1: bad_label, 0: ValueError("labels: label 9 is outside")}))
    assert isinstance(user, UserError) and user.message == "training failed on rank 0: labels: label 9 is outside"
    assert as_user_error(WorkerGroupError({0: RuntimeError("CUDA error")})) is None  # a bug keeps its traceback
    assert as_user_error(KeyError("x")) is None
