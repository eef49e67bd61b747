"""Fine-tuning end to end on real services (a `ray start` cluster, an MLflow tracking server), through the CLI.

A tiny pretraining run, then `mmae finetune --from-run` for depth (rgb) and for semseg with RGB-D input: the lineage
is in MLflow and in `mmae status --json`, the fine-tuned encoder started from the parent's weights, the task metrics
are logged. `mmae eval` evaluates without training; `mmae export` round-trips (timm strict load with equal features;
the original layout back through load_original). Bad input is one line and exit code 2.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import torch

from orchestrator.cli.app import main
from orchestrator.spec import render, validate_job

pytestmark = pytest.mark.slow

MODEL = {"preset": "tiny", "image_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2,
         "decoder_embed_dim": 64, "decoder_depth": 1, "decoder_num_heads": 2, "semseg_dim_class_emb": 16}
HEADS = {"seg_embed_dim": 256, "seg_depth": 1, "dpt_layer_dims": [16, 16, 32, 32], "dpt_feature_dim": 16}


def _common(name: str, data: Path, experiment: str, steps: int) -> dict:
    return {
        "name": name, "model": MODEL,
        "data": {"train_url": str(data / "train"), "val_url": str(data / "val"), "shuffle_buffer": 8,
                 "num_workers": 0},
        "train": {"max_steps": steps, "global_batch_size": 8, "per_worker_batch_size": 8, "log_every_steps": 1,
                  "image_every_steps": steps},
        "checkpoint": {"storage_url": ".mmae/checkpoints", "every_steps": 2, "keep": 3},
        "tracking": {"experiment": experiment, "log_system_metrics": False},
    }


def pretrain_job(data: Path, experiment: str) -> dict:
    return {**_common("e2e-pre", data, experiment, 4), "modalities": {"inputs": ["rgb", "depth"],
                                                                      "outputs": ["rgb", "depth"]},
            "masking": {"num_encoded_tokens": 12},
            "optim": {"lr": 3e-3, "warmup_steps": 1, "weight_decay": 0.0}}


def finetune_job(kind: str, data: Path, experiment: str, **finetune: object) -> dict:
    return {**_common(f"e2e-{kind}", data, experiment, 3), "stage": "finetune",
            "modalities": {"inputs": ["rgb"], "outputs": []},
            "finetune": {"kind": kind, "num_classes": 6 if kind == "semseg" else None, **HEADS, **finetune},
            "optim": {"lr": 1e-4, "warmup_steps": 0, "layer_decay": 0.75, "decay_all_params": False,
                      "betas": [0.9, 0.999]}}


def write_job(path: Path, data: dict) -> Path:
    path.write_text(render(validate_job(data)))
    return path


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return int(info.value.code or 0), out.out, out.err


def one_line_error(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _note(capsys, message: str) -> None:
    with capsys.disabled():
        print(message)


def test_pretrain_finetune_eval_export(mlflow_uri, ray_local, tmp_path, monkeypatch, capsys):
    import timm
    from mlflow import MlflowClient
    from safetensors import safe_open
    from safetensors.torch import load, load_file

    from multimae_core.data.synth import write_synth
    from multimae_core.model.state_dict import load_original
    from orchestrator.runtime.local import run_local

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MMAE_RUN_KEY", raising=False)
    data = tmp_path / "synth"
    write_synth(str(data / "train"), 16, size=32, seed=0, samples_per_shard=8, num_workers=1)
    write_synth(str(data / "val"), 8, size=32, seed=1, samples_per_shard=8, num_workers=1)
    experiment = f"e2e-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(mlflow_uri)

    t0 = time.monotonic()
    parent = run_local(validate_job(pretrain_job(data, experiment)))
    capsys.readouterr()
    _note(capsys, f"pretraining: {time.monotonic() - t0:.1f} s")
    parent_weights = load(Path(client.download_artifacts(parent, "weights/final.safetensors", str(tmp_path))
                              ).read_bytes())

    # 1. Depth from rgb, and semseg with RGB-D input, both from the pretraining run.
    depth_file = write_job(tmp_path / "depth.yaml", finetune_job("depth", data, experiment, depth_mean=5.0,
                                                                 depth_std=4.0, depth_max=20.0))
    semseg_file = write_job(tmp_path / "semseg.yaml", finetune_job("semseg", data, experiment))
    children = {}
    for kind, file, extra in (("depth", depth_file, []), ("semseg", semseg_file,
                                                          ["--set", "modalities.inputs=[rgb,depth]"])):
        t1 = time.monotonic()
        code, out, err = cli(capsys, "finetune", file, "--from-run", parent, "--local", *extra)
        _note(capsys, f"finetune {kind}: {time.monotonic() - t1:.1f} s")
        assert code == 0, err[-3000:]
        assert f"fine-tuning from run {parent}" in err
        children[kind] = out.strip().splitlines()[-1]

    for kind, run_id in children.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        tags, params = run.data.tags, run.data.params
        assert tags["mmae.parent_run_id"] == parent and tags["mlflow.parentRunId"] == parent
        assert tags["mmae.stage"] == "finetune"
        assert params["init.parent_run_id"] == parent
        assert params["init.checkpoint_url"] == f"runs:/{parent}/weights/final.safetensors"
        assert [s for s, _ in _history(client, run_id, "train/loss/total")] == [1, 2, 3]
        keys = {"depth": ("val/delta1", "val/delta2", "val/delta3", "val/rmse", "val/absrel"),
                "semseg": ("val/miou", "val/pixel_acc", "val/mean_acc")}[kind]
        for key in (*keys, "val/loss/total"):
            assert key in run.data.metrics, (kind, key)
        assert any(a.startswith("images/") for a in _artifacts(client, run_id)), kind
        tuned = load(Path(client.download_artifacts(run_id, "weights/final.safetensors", str(tmp_path / kind))
                          ).read_bytes())
        # Started from the parent: after 3 small steps the encoder is still close to it (a fresh init is far).
        drift = max((tuned[k] - parent_weights[k]).abs().max().item() for k in tuned if k.startswith("encoder."))
        assert drift < 0.02, (kind, drift)
        assert any(k.startswith(f"output_adapters.{kind}.") for k in tuned)
    assert "input_adapters.depth.proj.weight" in load_file(
        client.download_artifacts(children["semseg"], "weights/final.safetensors", str(tmp_path / "rgbd")))

    # 2. `mmae status` shows the lineage both ways.
    code, out, err = cli(capsys, "status", "--json")
    assert code == 0, err
    rows = {r["run_id"]: r for r in json.loads(out)["rows"] if r["run_id"]}
    assert sorted(rows[parent]["children"]) == sorted(children.values())
    assert all(rows[c]["parent_run_id"] == parent and rows[c]["parent"] == parent[:8] for c in children.values())

    # 3. eval: metrics of the fine-tuned depth model without training, recorded as its child run.
    code, out, err = cli(capsys, "eval", depth_file, "--from-run", children["depth"], "--json")
    assert code == 0, err[-3000:]
    assert out.strip().startswith("{"), (out, err[-3000:])
    result = json.loads(out)
    assert {"delta1", "rmse", "absrel", "loss/total"} <= set(result["metrics"])
    eval_run = client.get_run(result["run_id"])
    assert eval_run.data.tags["mmae.parent_run_id"] == children["depth"]
    assert eval_run.data.metrics["val/delta1"] == pytest.approx(result["metrics"]["delta1"])
    code, _, err = cli(capsys, "eval", depth_file, "--from-run", parent)
    assert "is a pretraining run" in one_line_error(code, err)

    # 4. export: timm (strict load, same features) and the original layout (back through load_original).
    code, _, err = cli(capsys, "export", tmp_path / "vit.safetensors", "--from-run", parent, "--format", "timm")
    assert code == 0, err
    with safe_open(str(tmp_path / "vit.safetensors"), "pt") as f:
        meta = f.metadata()
    kwargs = json.loads(meta["timm_kwargs"])
    assert f"timm.create_model('{meta['timm_model']}'" in err
    vit = timm.create_model(meta["timm_model"], pretrained=False, **kwargs).eval()
    vit.load_state_dict(load_file(str(tmp_path / "vit.safetensors")), strict=True)
    code, _, err = cli(capsys, "export", tmp_path / "full.pth", "--from-run", parent, "--format", "original")
    assert code == 0, err
    original = load_original(tmp_path / "full.pth", num_heads=2, decoder_num_heads=2, patch_size=8)
    assert original.state_dict().keys() == parent_weights.keys()
    assert all(torch.equal(original.state_dict()[k], v) for k, v in parent_weights.items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), torch.roll(original.encode({"rgb": x}), 1, dims=1),
                                   atol=1e-5, rtol=1e-5)

    # 5. Bad input: one line, exit code 2.
    code, _, err = cli(capsys, "finetune", depth_file, "--from-run", "0" * 32, "--local")
    assert "unknown run '00000000000000000000000000000000'" in one_line_error(code, err)
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    empty = client.create_run(exp_id, tags={"mmae.run_key": "no-weights", "mmae.stage": "pretrain"}).info.run_id
    code, _, err = cli(capsys, "finetune", depth_file, "--from-run", empty, "--local")
    assert f"run {empty} (RUNNING) has no weights" in one_line_error(code, err)
    code, _, err = cli(capsys, "finetune", depth_file, "--from-run", parent, "--local", "--set", "model.embed_dim=32")
    assert "do not fit the job e2e-depth" in one_line_error(code, err)
    code, _, err = cli(capsys, "finetune", depth_file, "--from-run", parent, "--local", "--checkpoint-step", "3")
    assert "no checkpoint at step 3 (stored steps: 2, 4)" in one_line_error(code, err)
    (tmp_path / "notes.pth").write_text("these are not weights")
    code, _, err = cli(capsys, "finetune", depth_file, "--from-checkpoint", tmp_path / "notes.pth", "--local")
    assert "is not a state dict of tensors" in one_line_error(code, err)
    code, _, err = cli(capsys, "finetune", semseg_file, "--from-run", parent, "--local", "--set",
                       "finetune.num_classes=3")
    assert "labels would fall outside the class range [0, 2]" in one_line_error(code, err)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out.extend(_artifacts(client, run_id, item.path) if item.is_dir else [item.path])
    return out
