"""Fine-tuning task losses against naive float64 references; task validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from multimae_core.finetune import (
    FinetuneTask,
    berhu_loss,
    classification_loss,
    depth_l1_loss,
    segmentation_loss,
    task_loss,
)


def naive_berhu(pred: np.ndarray, target: np.ndarray, valid: np.ndarray, threshold: float = 0.2) -> float:
    diffs = [abs(p - t) for p, t, v in zip(pred.ravel(), target.ravel(), valid.ravel(), strict=True)
             if v and np.isfinite(t)]
    c = threshold * max(diffs)
    return sum(d if d <= c else (d * d + c * c) / (2 * c) for d in diffs) / len(diffs)


def naive_log_softmax(row: np.ndarray) -> np.ndarray:
    m = row.max()
    return row - m - math.log(np.exp(row - m).sum())


def test_berhu_matches_naive_over_valid_pixels() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 1, 5, 6, generator=gen, requires_grad=True)
    target = torch.randn(2, 1, 5, 6, generator=gen)
    target[0, 0, 0, 0] = float("nan")
    target[1, 0, 4, 5] = 1e6  # invalid (masked out): must not set c
    valid = torch.rand(2, 1, 5, 6, generator=gen) > 0.25
    valid[1, 0, 4, 5] = False
    loss = berhu_loss(pred, target, valid)
    want = naive_berhu(pred.detach().double().numpy(), target.double().numpy(), valid.numpy())
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert torch.count_nonzero(pred.grad[~valid]) == 0


def test_berhu_degenerate_cases_stay_finite() -> None:
    target = torch.randn(1, 1, 3, 3)
    pred = target.clone().requires_grad_(True)
    loss = berhu_loss(pred, target)  # perfect prediction: c = 0
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(pred.grad).all()
    pred2 = torch.randn(1, 1, 3, 3, requires_grad=True)
    loss2 = berhu_loss(pred2, target, torch.zeros(1, 1, 3, 3, dtype=torch.bool))  # no valid pixel
    loss2.backward()
    assert loss2.item() == 0.0 and torch.count_nonzero(pred2.grad) == 0


def test_depth_l1_matches_naive() -> None:
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 1, 4, 4, generator=gen), torch.randn(3, 1, 4, 4, generator=gen)
    valid = torch.rand(3, 1, 4, 4, generator=gen) > 0.5
    want = np.abs(pred.double().numpy() - target.double().numpy())[valid.numpy()].mean()
    assert float(depth_l1_loss(pred, target, valid)) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="needs the channel dim"):
        depth_l1_loss(pred, target[:, 0])


def test_segmentation_loss_matches_naive_with_ignore_index() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 3, 5, generator=gen)
    labels = torch.randint(0, 4, (2, 3, 5), generator=gen)
    labels[0, 0, :3] = 255
    total, n = 0.0, 0
    lg = logits.double().numpy()
    for b in range(2):
        for i in range(3):
            for j in range(5):
                if labels[b, i, j] != 255:
                    total -= naive_log_softmax(lg[b, :, i, j])[labels[b, i, j]]
                    n += 1
    assert float(segmentation_loss(logits, labels)) == pytest.approx(total / n, rel=1e-6)
    all_ignored = torch.full((2, 3, 5), 255)
    assert float(segmentation_loss(logits, all_ignored)) == 0.0


def test_label_outside_class_range_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"label 4 is outside the class range \[0, 3\] \(or the ignore index 255\)"):
        segmentation_loss(torch.zeros(1, 4, 2, 2), torch.tensor([[[0, 4], [255, 1]]]))
    with pytest.raises(ValueError, match=r"label -1 is outside the class range \[0, 9\]"):
        classification_loss(torch.zeros(2, 10), torch.tensor([-1, 3]))


def test_classification_loss_matches_naive_label_smoothing() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, generator=gen)
    labels = torch.tensor([0, 5, 2, 2])
    eps = 0.1
    total = 0.0
    for row, y in zip(logits.double().numpy(), labels.numpy(), strict=True):
        logp = naive_log_softmax(row)
        total += (1 - eps) * -logp[y] + eps * -logp.mean()
    got = float(classification_loss(logits, labels, label_smoothing=eps))
    assert got == pytest.approx(total / 4, rel=1e-6)
    soft = torch.softmax(torch.randn(4, 6, generator=gen), dim=-1)
    want_soft = float(sum(-(s * naive_log_softmax(r)).sum() for r, s in zip(logits.double().numpy(),
                                                                            soft.double().numpy(), strict=True)) / 4)
    assert float(classification_loss(logits, soft)) == pytest.approx(want_soft, rel=1e-6)


def test_task_loss_dispatch_and_task_validation() -> None:
    pred, target = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, -2.0], [0.5, 0.0]]]])
    l1 = FinetuneTask(kind="depth", depth_loss="l1")
    assert float(task_loss(l1, pred, target)) == pytest.approx(3.5 / 4)
    berhu = FinetuneTask(kind="depth")
    assert float(task_loss(berhu, pred, target)) == pytest.approx(naive_berhu(pred.numpy(), target.numpy(),
                                                                              np.ones((1, 1, 2, 2), bool)))
    with pytest.raises(ValueError, match="num_classes must be >= 1 for semseg"):
        FinetuneTask(kind="semseg")
    with pytest.raises(ValueError, match="main_tasks"):
        FinetuneTask(kind="semseg", num_classes=3, inputs=("rgb",), main_tasks=("depth",))
    with pytest.raises(ValueError, match="unknown modality 'dept'"):
        FinetuneTask(kind="depth", inputs=("dept",))
    with pytest.raises(ValueError, match="output-only"):
        FinetuneTask(kind="depth", inputs=("norm_rgb",))
