"""fit() with stage finetune: each task learns, its validation metrics equal naive formulas on the trained model,
resume is bit-exact (the init weights are not loaded again over a checkpoint), evaluate_only, and the starting
weights in every supported format."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from multimae_core.config import ModelConfig, TrainConfig
from multimae_core.model.presets import build_model
from multimae_core.model.pretrained import read_init_weights
from multimae_core.model.state_dict import multimae_to_vit, to_original
from multimae_core.training.checkpoint import list_checkpoints, load_checkpoint
from multimae_core.training.loop import evaluate_only, fit
from multimae_core.training.optim import build_optimizer
from multimae_core.training.reporting import MemoryDataSource, MemoryReporter
from multimae_core.training.task_objective import FinetuneObjective

SIZE = 32
MODEL = {"preset": "tiny", "image_size": SIZE, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
HEADS = {"seg_embed_dim": 64, "dpt_layer_dims": [8, 8, 16, 16], "dpt_feature_dim": 8}


_EXECUTED: list[str] = []


def _run_payload() -> None:
    _EXECUTED.append("ran")


class _Payload:
    """Unpickling this calls a function: what a malicious checkpoint does."""

    def __reduce__(self):  # noqa: ANN204
        return (_run_payload, ())


def make_cfg(kind: str, *, max_steps: int = 30, init: dict | None = None, inputs=("rgb", "depth"), lr: float = 2e-3,
             every_steps: int = 1000, **finetune: object) -> TrainConfig:
    return TrainConfig.model_validate({
        "name": "ft", "stage": "finetune", "model": MODEL,
        "modalities": {"inputs": list(inputs), "outputs": []},
        "finetune": {"kind": kind, "num_classes": None if kind == "depth" else 4, **HEADS, **finetune},
        "init": init or {},
        "optim": {"lr": lr, "warmup_steps": 0, "layer_decay": 0.75, "decay_all_params": False, "weight_decay": 0.05,
                  "betas": [0.9, 0.999]},
        "train": {"max_steps": max_steps, "epochs": 10_000, "global_batch_size": 4, "per_worker_batch_size": 4,
                  "log_every_steps": 1, "image_every_steps": 10},
        "checkpoint": {"every_steps": every_steps},
    })


def make_batch(kind: str, seed: int, n: int = 4) -> dict[str, torch.Tensor]:
    """Smooth inputs; targets a function of the inputs (so there is something to learn)."""
    g = torch.Generator().manual_seed(seed)
    rgb = F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=(SIZE, SIZE), mode="bilinear")
    depth_in = F.interpolate(torch.randn(n, 1, 4, 4, generator=g), size=(SIZE, SIZE), mode="bilinear")
    batch = {"rgb": rgb, "depth": depth_in}
    if kind == "cls":
        batch["target"] = torch.arange(n) % 4
    elif kind == "semseg":
        labels = (rgb[:, 0] > 0).long() + 2 * (rgb[:, 1] > 0).long()
        labels[:, :2] = 255  # an ignored band
        batch["target"] = labels
    else:
        metric = 3.0 + rgb[:, :1]  # metres, mostly > 0
        metric[:, :, :3] = 80.0  # "sky": beyond depth_max, invalid
        batch["target"] = metric
    return batch


def naive_metrics(kind: str, model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: TrainConfig) -> dict:
    model.eval()
    with torch.no_grad():
        pred = model(batch).double()
    target = batch["target"]
    if kind == "cls":
        top1 = sum(int(pred[i].argmax()) == int(target[i]) for i in range(len(target))) / len(target)
        return {"top1": 100 * top1}
    if kind == "semseg":
        p, t = pred.argmax(1).flatten().tolist(), target.flatten().tolist()
        ious = []
        for c in range(4):
            inter = sum(1 for a, b in zip(p, t, strict=True) if b != 255 and a == c and b == c)
            union = sum(1 for a, b in zip(p, t, strict=True) if b != 255 and (a == c or b == c))
            if union:
                ious.append(inter / union)
        acc = sum(1 for a, b in zip(p, t, strict=True) if b != 255 and a == b) / sum(1 for b in t if b != 255)
        return {"miou": 100 * sum(ious) / len(ious), "pixel_acc": 100 * acc}
    ft = cfg.finetune
    p = (pred * ft.depth_std + ft.depth_mean).flatten().tolist()
    t = target.double().flatten().tolist()
    pairs = [(a, b) for a, b in zip(p, t, strict=True) if 0 < b < ft.depth_max]
    delta1 = sum(1 for a, b in pairs if a > 0 and max(a / b, b / a) < 1.25) / len(pairs)
    rmse = math.sqrt(sum((a - b) ** 2 for a, b in pairs) / len(pairs))
    absrel = sum(abs(a - b) / b for a, b in pairs) / len(pairs)
    return {"delta1": 100 * delta1, "rmse": rmse, "absrel": absrel}


@pytest.mark.parametrize("kind", ["cls", "semseg", "depth"])
def test_each_task_learns_and_reports_its_metrics(kind: str) -> None:
    extra = {"depth_mean": 3.0, "depth_std": 1.0, "depth_max": 20.0} if kind == "depth" else {}
    cfg = make_cfg(kind, **extra)
    batch = make_batch(kind, seed=0)
    reporter = MemoryReporter()
    result = fit(cfg, reporter, MemoryDataSource([batch], per_worker_batch_size=4, val_batches=[batch]))
    losses = [v for _, v in reporter.series("train/loss/total")]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.6 * losses[0], losses
    assert reporter.series(f"train/loss/{kind}") == reporter.series("train/loss/total")
    # The reported validation metrics are the naive ones of the trained model on the val batch.
    for key, want in naive_metrics(kind, result.model, batch, cfg).items():
        assert result.val_metrics[f"val/{key}"] == pytest.approx(want, rel=1e-6, abs=1e-9), key
    assert "val/loss/total" in result.val_metrics
    # Prediction figures: one row per sample (2), input | prediction | target.
    assert [(s, k) for s, k, _ in reporter.images] == [(10, "predictions"), (20, "predictions"), (30, "predictions")]
    image = reporter.images[-1][2]
    assert image.dtype == np.uint8 and image.shape[0] == 2 * SIZE + 2


def test_labels_outside_the_class_range_are_a_clear_error() -> None:
    batch = make_batch("semseg", seed=0)
    batch["target"][0, 5, 5] = 7
    with pytest.raises(ValueError, match=r"labels: label 7 is outside the class range \[0, 3\]"):
        fit(make_cfg("semseg", max_steps=1), MemoryReporter(), MemoryDataSource([batch], per_worker_batch_size=4))


def _pretrained(tmp_path: Path, inputs=("rgb", "depth")) -> tuple[dict[str, torch.Tensor], Path]:
    """A perturbed MultiMAE of the same size, saved as this project's weights."""
    torch.manual_seed(1)
    model = build_model(ModelConfig(**MODEL), inputs=list(inputs), outputs=["rgb"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = to_original(model)
    path = tmp_path / "pre.safetensors"
    save_file(state, str(path))
    return state, path


def test_fresh_run_starts_from_init_and_resume_is_bit_exact(tmp_path: Path) -> None:
    state, path = _pretrained(tmp_path)
    cfg = make_cfg("depth", max_steps=6, init={"checkpoint_url": str(path)}, depth_max=20.0, depth_mean=3.0)
    batches = [make_batch("depth", seed=s) for s in range(3)]

    first = fit(make_cfg("depth", max_steps=1, init={"checkpoint_url": str(path)}, lr=1e-12, depth_max=20.0),
                MemoryReporter(), MemoryDataSource(batches, per_worker_batch_size=4))
    got = first.model.state_dict()
    for key in ("global_tokens", "input_adapters.depth.proj.weight", "encoder.1.mlp.fc2.weight"):
        torch.testing.assert_close(got[key], state[key], rtol=0, atol=1e-8)  # one step at lr 1e-12: still the init

    straight = fit(cfg, MemoryReporter(tmp_path / "a"), MemoryDataSource(batches, per_worker_batch_size=4))
    stopper = MemoryReporter(tmp_path / "b", stop_after_step=3)
    assert fit(cfg, stopper, MemoryDataSource(batches, per_worker_batch_size=4)).step == 3
    assert load_checkpoint(list_checkpoints(tmp_path / "b")[-1][1]).step == 3
    resumed = fit(cfg, MemoryReporter(tmp_path / "b"), MemoryDataSource(batches, per_worker_batch_size=4))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_only_needs_the_head_and_matches_fit(tmp_path: Path) -> None:
    batch = make_batch("semseg", seed=3)
    cfg = make_cfg("semseg", max_steps=5)
    result = fit(cfg, MemoryReporter(), MemoryDataSource([batch], per_worker_batch_size=4, val_batches=[batch]))
    tuned = tmp_path / "tuned.safetensors"
    save_file(to_original(result.model), str(tuned))
    reporter = MemoryReporter()
    values = evaluate_only(make_cfg("semseg", init={"checkpoint_url": str(tuned)}),
                           MemoryDataSource([batch], per_worker_batch_size=4, val_batches=[batch]), reporter=reporter)
    assert values["miou"] == pytest.approx(result.val_metrics["val/miou"], rel=1e-12)
    assert reporter.metrics[0][0] == 0 and reporter.images[0][1] == "predictions"
    _, pre = _pretrained(tmp_path)
    with pytest.raises(ValueError, match="must include the job's fine-tuned 'semseg' head"):
        evaluate_only(make_cfg("semseg", init={"checkpoint_url": str(pre)}),
                      MemoryDataSource([batch], per_worker_batch_size=4, val_batches=[batch]))


def test_init_formats_fill_the_same_weights(tmp_path: Path) -> None:
    from timm.models.vision_transformer import VisionTransformer

    state, path = _pretrained(tmp_path)
    torch.save({"model": state}, tmp_path / "multivit.pth")
    folder = tmp_path / "checkpoint_000000010"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    for url, fmt in ((path, "mmae"), (tmp_path / "multivit.pth", "original-multivit"), (folder, "mmae")):
        loaded = read_init_weights(str(url), fmt)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())

    # timm ViT weights (e.g. MAE): the rgb adapter and the encoder are filled, the depth adapter starts fresh.
    vit = VisionTransformer(img_size=SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                            final_norm=False)
    vit.load_state_dict(multimae_to_vit(state), strict=True)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    cfg = make_cfg("depth", init={"checkpoint_url": str(tmp_path / "vit.safetensors"), "format": "timm-vit"})
    objective = FinetuneObjective(cfg)
    torch.manual_seed(0)
    model = objective.build_model()
    fresh_depth = model.state_dict()["input_adapters.depth.proj.weight"].clone()
    objective.initialise(model)
    got = model.state_dict()
    for key in ("input_adapters.rgb.proj.weight", "input_adapters.rgb.pos_emb", "encoder.0.attn.qkv.weight",
                "global_tokens"):
        torch.testing.assert_close(got[key], state[key], rtol=0, atol=1e-6)
    assert torch.equal(got["input_adapters.depth.proj.weight"], fresh_depth)

    with pytest.raises(ValueError, match="has no MultiMAE keys .*set init.format=timm-vit"):
        read_init_weights(str(tmp_path / "vit.safetensors"), "mmae")
    with pytest.raises(ValueError, match="has no timm ViT keys"):
        read_init_weights(str(path), "timm-vit")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.bin is not a state dict of tensors"):
        read_init_weights(str(tmp_path / "junk.bin"))
    torch.save({"model": {"w": torch.zeros(1)}, "args": _Payload()}, tmp_path / "code.pth")
    with pytest.raises(ValueError, match="nothing in it was executed"):
        read_init_weights(str(tmp_path / "code.pth"))
    assert _EXECUTED == []  # the payload's code never ran
    with pytest.raises(ValueError, match="no weights at"):
        read_init_weights(str(tmp_path / "missing.safetensors"))


def test_layer_wise_decay_groups_of_the_finetune_model() -> None:
    cfg = make_cfg("cls")
    model = FinetuneObjective(cfg).build_model()
    optimizer = build_optimizer(model, cfg.optim, num_layers=len(model.encoder))
    scale = {n: g["lr_scale"] for g in optimizer.param_groups for n in g["param_names"]}
    assert scale["input_adapters.rgb.proj.weight"] == pytest.approx(0.75 ** 3)
    assert scale["global_tokens"] == pytest.approx(0.75 ** 3)
    assert scale["encoder.0.attn.qkv.weight"] == pytest.approx(0.75 ** 2)
    assert scale["encoder.1.mlp.fc1.weight"] == pytest.approx(0.75)
    assert scale["output_adapters.cls.head.weight"] == 1.0
    decay = {n: g["weight_decay"] for g in optimizer.param_groups for n in g["param_names"]}
    assert decay["output_adapters.cls.head.weight"] == 0.05 and decay["output_adapters.cls.head.bias"] == 0.0
