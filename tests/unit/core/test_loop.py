"""fit() on a tiny model: it learns, resumes bit-exactly, and accumulation equals a larger per-worker batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from multimae_core.config import TrainConfig
from multimae_core.masking import sample_masks
from multimae_core.training.checkpoint import list_checkpoints, load_checkpoint
from multimae_core.training.loop import StepSettings, build_step, fit, train_step
from multimae_core.training.optim import build_optimizer, set_lr
from multimae_core.training.reporting import LogReporter, MemoryDataSource, MemoryReporter

INPUTS = ["rgb", "depth", "semseg"]
OUTPUTS = ["rgb", "depth", "semseg", "norm_rgb"]
SIZE = 32


def make_batch(n: int, seed: int, *, with_masks: bool = False, num_encoded_tokens: int = 3) -> dict[str, torch.Tensor]:
    """Smooth random rgb / depth and a blocky 4-class label map; optionally fixed masks under mask.<m>.

    3 visible of 3 x 4 tokens leaves every modality of every sample with a masked token, so no sample is dropped
    from a loss mean and micro-batch means average to the full-batch mean.
    """
    g = torch.Generator().manual_seed(seed)
    low = SIZE // 8
    batch = {
        "rgb": F.interpolate(torch.randn(n, 3, low, low, generator=g), size=(SIZE, SIZE), mode="bilinear"),
        "depth": F.interpolate(torch.randn(n, 1, low, low, generator=g), size=(SIZE, SIZE), mode="bilinear"),
        "semseg": torch.randint(0, 4, (n, SIZE // 16, SIZE // 16), generator=g)
        .repeat_interleave(4, 1).repeat_interleave(4, 2),
    }
    if with_masks:
        tokens = {m: (SIZE // 16) ** 2 for m in INPUTS}
        masks = sample_masks(tokens, n, num_encoded_tokens, generator=torch.Generator().manual_seed(seed + 1))
        batch.update({f"mask.{m}": v for m, v in masks.items()})
    return batch


def make_cfg(*, max_steps: int, global_batch: int = 4, per_worker: int = 4, every_steps: int = 1000,
             log_every: int = 1, lr: float = 2e-3, warmup: int = 0, precision: str = "fp32",
             num_encoded_tokens: int = 6, eps: float = 1e-8, image_every: int = 50) -> TrainConfig:
    return TrainConfig.model_validate({
        "name": "unit",
        "model": {"preset": "tiny", "image_size": SIZE, "embed_dim": 64, "depth": 2, "num_heads": 4,
                  "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 4},
        "modalities": {"inputs": INPUTS, "outputs": OUTPUTS},
        "masking": {"num_encoded_tokens": num_encoded_tokens},
        "optim": {"lr": lr, "warmup_steps": warmup, "weight_decay": 0.05, "eps": eps},
        "train": {"max_steps": max_steps, "epochs": 10_000, "global_batch_size": global_batch,
                  "per_worker_batch_size": per_worker, "log_every_steps": log_every, "image_every_steps": image_every,
                  "precision": precision},
        "checkpoint": {"every_steps": every_steps},
    })


def _state(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def test_overfits_one_fixed_batch(tmp_path: Path):
    reporter = MemoryReporter(tmp_path)
    data = MemoryDataSource([make_batch(4, seed=0)], per_worker_batch_size=4)
    result = fit(make_cfg(max_steps=100), reporter, data)
    losses = [v for _, v in reporter.series("train/loss/total")]
    assert len(losses) == 100 and result.step == 100
    assert all(np.isfinite(losses))
    first, last = losses[0], float(np.mean(losses[-10:]))
    assert last < 0.5 * first, (first, last)
    # the rest of the reporting contract
    final = reporter.metrics[-1][1]
    for key in ("lr", "grad_norm", "images_per_s", "step_time_s", "data_wait_s", "num_workers",
                *(f"train/loss/{h}" for h in OUTPUTS)):
        assert key in final, key
    assert [s for s, _, _ in reporter.images] == [50, 100]
    image = reporter.images[-1][2]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert [s for s, _ in list_checkpoints(tmp_path)] == [100]


def test_resume_is_bit_exact(tmp_path: Path):
    """6 steps straight == 3 steps, stop, resume from the checkpoint, 3 more (epoch of 4 batches: crosses a border)."""
    batches = [make_batch(4, seed=s) for s in range(4)]
    val = [make_batch(4, seed=100)]
    cfg = make_cfg(max_steps=6, every_steps=1000, warmup=2)

    straight = fit(cfg, MemoryReporter(tmp_path / "a"), MemoryDataSource(batches, per_worker_batch_size=4,
                                                                        val_batches=val))
    interrupted = MemoryReporter(tmp_path / "b", stop_after_step=3)
    first = fit(cfg, interrupted, MemoryDataSource(batches, per_worker_batch_size=4, val_batches=val))
    assert first.stopped_early and first.step == 3
    state = load_checkpoint(list_checkpoints(tmp_path / "b")[-1][1])
    assert (state.step, state.epoch, state.batches_in_epoch) == (3, 0, 3)

    resumed_reporter = MemoryReporter(tmp_path / "b")
    resumed = fit(cfg, resumed_reporter, MemoryDataSource(batches, per_worker_batch_size=4, val_batches=val))
    assert resumed.step == 6 and not resumed.stopped_early
    assert resumed_reporter.metrics[0][0] == 4  # the step count continues
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert "val/loss/total" in resumed.val_metrics
    assert straight.val_metrics == resumed.val_metrics


def test_accumulation_matches_one_big_batch(tmp_path: Path):
    """global 8 = 2 x 4 (accumulation) gives what 1 x 8 gives.

    AdamW's eps is raised to 1e-6 here: some gradients are exactly zero in exact arithmetic (attention key biases),
    and eps 1e-8 lets Adam turn their 1e-9 rounding noise into full-size updates of either sign.
    """
    batches = [make_batch(8, seed=s, with_masks=True) for s in range(3)]

    def run(per_worker: int, data_batches) -> tuple[MemoryReporter, dict[str, torch.Tensor]]:
        reporter = MemoryReporter()
        cfg = make_cfg(max_steps=3, global_batch=8, per_worker=per_worker, num_encoded_tokens=3, eps=1e-6)
        result = fit(cfg, reporter, MemoryDataSource(data_batches, per_worker_batch_size=per_worker))
        return reporter, _state(result)

    (rep_a, a), (rep_b, b) = run(8, batches), run(4, batches)
    for key in ("train/loss/total", "train/loss/semseg", "grad_norm"):
        torch.testing.assert_close(torch.tensor(rep_a.series(key)), torch.tensor(rep_b.series(key)), atol=1e-5,
                                   rtol=1e-5, msg=key)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    # the comparison is sensitive: other data ends far away
    _, other = run(8, [make_batch(8, seed=s + 10, with_masks=True) for s in range(3)])
    assert max((a[k] - other[k]).abs().max().item() for k in a) > 1e-3


def test_accumulation_averages_gradients():
    """train_step over two halves accumulates the same gradient as one pass over the whole batch."""
    cfg = make_cfg(max_steps=1, global_batch=8, per_worker=8, num_encoded_tokens=3)
    settings = StepSettings.from_config(cfg)
    batch = make_batch(8, seed=5, with_masks=True)
    results = []
    for micro in ([batch], [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]):
        step = build_step(cfg)
        set_lr(step.optimizer, 1e-3)
        out = train_step(step.model, step.optimizer, micro, settings, device=torch.device("cpu"))
        grads = {n: p.grad.detach().clone() for n, p in step.model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (out_a, g_a), (out_b, g_b) = results
    for k in out_a.losses:
        torch.testing.assert_close(out_a.losses[k], out_b.losses[k], atol=1e-5, rtol=1e-5, msg=k)
    torch.testing.assert_close(out_a.grad_norm, out_b.grad_norm, atol=1e-5, rtol=1e-5)
    assert g_a.keys() == g_b.keys() and len(g_a) > 0
    for k in g_a:
        torch.testing.assert_close(g_a[k], g_b[k], atol=1e-6, rtol=1e-4, msg=k)
    naive_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in g_a.values()))
    torch.testing.assert_close(out_a.grad_norm.double(), naive_norm, atol=1e-5, rtol=1e-5)


def test_indivisible_batch_is_rejected():
    cfg = make_cfg(max_steps=1, global_batch=8, per_worker=8)
    data = MemoryDataSource([make_batch(8, seed=0)], per_worker_batch_size=8)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"per_worker_batch_size": 3})})
    with pytest.raises(ValueError, match="train.global_batch_size"):
        fit(cfg, MemoryReporter(), data)


def test_bf16_autocast_trains(tmp_path: Path):
    reporter = MemoryReporter()
    data = MemoryDataSource([make_batch(4, seed=0)], per_worker_batch_size=4)
    fit(make_cfg(max_steps=5, precision="bf16"), reporter, data)
    losses = [v for _, v in reporter.series("train/loss/total")]
    assert len(losses) == 5 and all(np.isfinite(losses))
    assert losses[-1] < losses[0]


def test_optimizer_param_groups_cover_model():
    step = build_step(make_cfg(max_steps=1))
    grouped = [p for g in step.optimizer.param_groups for p in g["params"]]
    trainable = [p for p in step.model.parameters() if p.requires_grad]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    assert all(g["weight_decay"] == 0.05 for g in step.optimizer.param_groups)  # decay_all_params
    assert isinstance(build_optimizer(step.model, make_cfg(max_steps=1).optim), torch.optim.AdamW)


def test_log_reporter_writes_pngs_and_checkpoints(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    from PIL import Image

    reporter = LogReporter(tmp_path / "ck", keep=1, image_dir=tmp_path / "img")
    data = MemoryDataSource([make_batch(4, seed=0)], per_worker_batch_size=4, val_batches=[make_batch(2, seed=9)])
    with caplog.at_level("INFO", logger="multimae_core.training.reporting"):
        fit(make_cfg(max_steps=4, every_steps=2, log_every=2, image_every=2), reporter, data)
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [4]  # keep=1 pruned step 2
    pngs = sorted((tmp_path / "img").glob("*.png"))
    assert [p.name for p in pngs] == ["reconstruction_000000002.png", "reconstruction_000000004.png"]
    # 2 samples x 4 heads rows of 3 panels of 32 px, 2 px gaps
    assert Image.open(pngs[0]).size == (3 * SIZE + 2 * 2, 8 * SIZE + 7 * 2)
    assert any("train/loss/total=" in r.getMessage() for r in caplog.records)
    assert any("val/loss/total=" in r.getMessage() for r in caplog.records)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision(tmp_path: Path, precision: str):
    """On CUDA: autocast training learns, the first-step loss is close to fp32's, and a stopped run resumes.

    Resume exactness is checked on the CPU (test_resume_is_bit_exact); CUDA attention kernels need not be
    deterministic, so here only the continued step count and loss level are checked.
    """
    batches = [make_batch(4, seed=s, with_masks=True) for s in range(2)]
    fp32 = MemoryReporter()
    fit(make_cfg(max_steps=1, num_encoded_tokens=3), fp32, MemoryDataSource(batches, per_worker_batch_size=4),
        device="cuda")
    reporter = MemoryReporter(tmp_path / "a")
    cfg = make_cfg(max_steps=30, every_steps=10, precision=precision, num_encoded_tokens=3)
    straight = fit(cfg, reporter, MemoryDataSource(batches, per_worker_batch_size=4), device="cuda")
    losses = [v for _, v in reporter.series("train/loss/total")]
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < 0.7 * losses[0]
    assert losses[0] == pytest.approx(fp32.series("train/loss/total")[0][1], rel=3e-2)
    assert reporter.metrics[-1][1]["gpu_mem_peak_gib"] > 0
    assert ("loss_scale" in reporter.metrics[-1][1]) == (precision == "fp16")

    stopper = MemoryReporter(tmp_path / "b", stop_after_step=10)
    fit(cfg, stopper, MemoryDataSource(batches, per_worker_batch_size=4), device="cuda")
    resumed_reporter = MemoryReporter(tmp_path / "b")
    resumed = fit(cfg, resumed_reporter, MemoryDataSource(batches, per_worker_batch_size=4), device="cuda")
    assert resumed.step == straight.step == 30 and resumed_reporter.metrics[0][0] == 11
    assert resumed_reporter.series("train/loss/total")[-1][1] == pytest.approx(losses[-1], rel=0.1)
