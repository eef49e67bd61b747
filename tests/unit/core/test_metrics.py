"""Fine-tuning metrics against naive float64 numpy references, over several uneven batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from multimae_core.metrics import ConfusionMatrix, DepthMetrics, TopKAccuracy, check_class_range


def naive_topk(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    hits = 0
    for row, label in zip(logits, labels, strict=True):
        order = sorted(range(len(row)), key=lambda c: -row[c])
        hits += label in order[:k]
    return 100.0 * hits / len(labels)


def naive_segmentation(preds: np.ndarray, labels: np.ndarray, num_classes: int, ignore: int) -> dict[str, float]:
    ious, accs = [], []
    keep = labels != ignore
    p, g = preds[keep], labels[keep]
    for c in range(num_classes):
        inter = np.sum((p == c) & (g == c))
        union = np.sum((p == c) | (g == c))
        if union > 0:
            ious.append(inter / union)
        if np.sum(g == c) > 0:
            accs.append(inter / np.sum(g == c))
    return {"miou": 100 * float(np.mean(ious)), "pixel_acc": 100 * float(np.mean(p == g)),
            "mean_acc": 100 * float(np.mean(accs))}


def naive_depth(pred: np.ndarray, target: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    out = {f"delta{k}": 0.0 for k in (1, 2, 3)}
    n, sq, rel = 0, 0.0, 0.0
    for p, g, v in zip(pred.ravel(), target.ravel(), valid.ravel(), strict=True):
        if not v or not np.isfinite(g) or g <= 0:
            continue
        n += 1
        ratio = max(p / g, g / p) if p > 0 else math.inf
        for k in (1, 2, 3):
            out[f"delta{k}"] += ratio < 1.25**k
        sq += (p - g) ** 2
        rel += abs(p - g) / g
    out = {key: 100.0 * val / n for key, val in out.items()}
    out["rmse"] = math.sqrt(sq / n)
    out["absrel"] = rel / n
    return out


def test_topk_matches_naive_over_uneven_batches() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 10, generator=gen)
    labels = torch.randint(0, 10, (37,), generator=gen)
    metric = TopKAccuracy(topk=(1, 5))
    for lo, hi in [(0, 5), (5, 6), (6, 37)]:
        metric.update(logits[lo:hi], labels[lo:hi])
    got = metric.compute()
    for k in (1, 5):
        assert got[f"top{k}"] == pytest.approx(naive_topk(logits.double().numpy(), labels.numpy(), k), abs=1e-9)


def test_topk_known_values_and_clipped_k() -> None:
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]])
    labels = torch.tensor([1, 1, 0, 2])
    metric = TopKAccuracy(topk=(1, 2, 5))
    metric.update(logits, labels)
    # top1: samples 0 and 3 right; top2: 0, 1, 3; top5 clips to 3 classes: all.
    assert metric.compute() == {"top1": 50.0, "top2": 75.0, "top5": 100.0}


def test_topk_rejects_label_outside_class_range() -> None:
    metric = TopKAccuracy()
    with pytest.raises(ValueError, match=r"label 12 is outside the class range \[0, 9\]"):
        metric.update(torch.zeros(2, 10), torch.tensor([3, 12]))


def test_confusion_matrix_matches_naive_with_ignore_and_absent_class() -> None:
    gen = torch.Generator().manual_seed(1)
    num_classes = 6
    # Class 5 is never labelled nor predicted: its IoU is NaN and must not count in the mean.
    labels = torch.randint(0, 5, (5, 9, 11), generator=gen)
    noise = torch.randint(0, 5, (5, 9, 11), generator=gen)
    preds = torch.where(torch.rand(5, 9, 11, generator=gen) < 0.6, labels, noise)
    labels[torch.rand(5, 9, 11, generator=gen) < 0.2] = 255
    metric = ConfusionMatrix(num_classes, ignore_index=255)
    for lo, hi in [(0, 1), (1, 4), (4, 5)]:
        metric.update(preds[lo:hi], labels[lo:hi])
    got = metric.compute()
    want = naive_segmentation(preds.numpy(), labels.numpy(), num_classes, 255)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert math.isnan(float(metric.per_class_iou()[5]))


def test_confusion_matrix_known_values_from_logits() -> None:
    # 2x2 image. Labels [[0, 1], [1, 255]]; predictions [[0, 0], [1, 1]] taken from logits whose extra
    # (third) channel is the largest everywhere and must be ignored (argmax over the first num_classes).
    labels = torch.tensor([[[0, 1], [1, 255]]])
    pred = torch.tensor([[[0, 0], [1, 1]]])
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()
    logits[:, 2] = 5.0
    metric = ConfusionMatrix(2, ignore_index=255)
    metric.update(logits, labels)
    got = metric.compute()
    # class 0: I=1, U=2 -> 0.5; class 1: I=1, U=2 -> 0.5. Pixel acc 2/3; class acc 1 and 1/2.
    assert got["miou"] == pytest.approx(50.0)
    assert got["pixel_acc"] == pytest.approx(200 / 3)
    assert got["mean_acc"] == pytest.approx(75.0)


def test_confusion_matrix_rejects_out_of_range_labels() -> None:
    metric = ConfusionMatrix(4, ignore_index=255)
    with pytest.raises(ValueError, match=r"label 7 is outside the class range \[0, 3\] \(or the ignore index 255\)"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 7], [255, 1]]]))


def test_depth_metrics_match_naive_over_whole_set() -> None:
    gen = torch.Generator().manual_seed(2)
    target = torch.rand(6, 1, 8, 8, generator=gen) * 5 + 0.1
    pred = target * torch.exp(torch.randn(6, 1, 8, 8, generator=gen) * 0.3)
    pred[0, 0, 0, :3] = torch.tensor([-1.0, 0.0, 2.0])  # non-positive predictions count as wrong
    target[1, 0, 2, :2] = torch.tensor([0.0, float("nan")])  # invalid targets are skipped
    valid = torch.rand(6, 1, 8, 8, generator=gen) > 0.3
    metric = DepthMetrics()
    # Batches with different numbers of valid pixels: a per-batch mean would differ from the set-level value.
    for lo, hi in [(0, 1), (1, 5), (5, 6)]:
        metric.update(pred[lo:hi], target[lo:hi], valid[lo:hi])
    got = metric.compute()
    want = naive_depth(pred.double().numpy(), target.double().numpy(), valid.numpy())
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key

    per_batch = DepthMetrics()
    per_batch.update(pred[0:1], target[0:1], valid[0:1])
    assert per_batch.compute()["rmse"] != pytest.approx(got["rmse"], rel=1e-3)


def test_depth_metrics_known_values() -> None:
    target = torch.tensor([1.0, 2.0, 4.0, 1.0])
    pred = torch.tensor([1.2, 1.0, 4.0, 1.3])
    metric = DepthMetrics()
    metric.update(pred, target)
    got = metric.compute()
    # ratios: 1.2, 2.0, 1.0, 1.3 -> delta1 2/4, delta2 (<1.5625) 3/4, delta3 (<1.953125) 3/4
    assert got["delta1"] == pytest.approx(50.0)
    assert got["delta2"] == pytest.approx(75.0)
    assert got["delta3"] == pytest.approx(75.0)
    assert got["rmse"] == pytest.approx(math.sqrt((0.04 + 1.0 + 0.0 + 0.09) / 4))
    assert got["absrel"] == pytest.approx((0.2 + 0.5 + 0.0 + 0.3) / 4)


def test_reduce_without_process_group_is_a_no_op_once() -> None:
    metric = TopKAccuracy(topk=(1,))
    metric.update(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert metric.reduce_().compute() == {"top1": 100.0}
    with pytest.raises(RuntimeError, match="already called"):
        metric.reduce_()
    metric.reset()
    assert math.isnan(metric.compute()["top1"])


def test_check_class_range_rejects_float_labels() -> None:
    with pytest.raises(ValueError, match="must be integers"):
        check_class_range(torch.tensor([0.0, 1.0]), 3)
