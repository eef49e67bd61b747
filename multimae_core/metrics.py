"""Evaluation metrics for fine-tuning, accumulated as sums over the whole evaluation set (spec 7.2-7.4).

Every accumulator keeps only sums and counts, so the metric over a data set split across workers is exact:
`reduce_()` all-reduces the sums over the process group, then `compute()` forms the ratios. Nothing is averaged per
batch (the original averages its depth metrics per batch; we do not).

Shape legend: B batch, C classes, H/W pixels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ConfusionMatrix", "DepthMetrics", "TopKAccuracy", "check_class_range"]

logger = logging.getLogger(__name__)


def check_class_range(labels: Tensor, num_classes: int, *, ignore_index: int | None = None,
                      name: str = "labels") -> None:
    """Raise a ValueError naming the first label outside [0, num_classes) (ignore_index excepted)."""
    if labels.is_floating_point():
        raise ValueError(f"{name}: class labels must be integers, got dtype {labels.dtype}")
    if labels.numel() == 0:
        return
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if bool(bad.any()):
        value = int(labels[bad].flatten()[0])
        allowed = f"[0, {num_classes - 1}]"
        if ignore_index is not None:
            allowed += f" (or the ignore index {ignore_index})"
        raise ValueError(f"{name}: label {value} is outside the class range {allowed}")


class _SumMetric:
    """Base of the accumulators: named sum tensors, an all-reduce over them, and reset."""

    _sum_names: tuple[str, ...] = ()

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._reduced = False
        self.reset()

    def _zeros(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def reset(self) -> None:
        """Zero every sum."""
        for key, value in self._zeros().items():
            setattr(self, key, value)
        self._reduced = False

    def _to_device(self, device: torch.device) -> None:
        if device != self.device:
            for key in self._sum_names:
                setattr(self, key, getattr(self, key).to(device))
            self.device = device

    def reduce_(self, process_group: dist.ProcessGroup | None = None) -> _SumMetric:
        """Sum the accumulators of every rank in place (a no-op without an initialised process group).

        Call once, after the last `update` of an evaluation pass; a second call would count twice and raises.
        """
        if self._reduced:
            raise RuntimeError(f"{type(self).__name__}.reduce_() was already called; call reset() to start over")
        self._reduced = True
        if not (dist.is_available() and dist.is_initialized()):
            return self
        backend = dist.get_backend(process_group)
        # NCCL only reduces CUDA tensors; the sums may live on the CPU (they are tiny).
        comm_device = self.device
        if backend == "nccl" and self.device.type != "cuda":
            comm_device = torch.device("cuda", torch.cuda.current_device())
        for key in self._sum_names:
            value = getattr(self, key).to(comm_device)
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=process_group)
            setattr(self, key, value.to(self.device))
        return self

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


def _pct(num: Tensor, den: Tensor) -> float:
    """100 * num / den as a float; NaN when den is 0."""
    den_f = float(den)
    return math.nan if den_f == 0 else 100.0 * float(num) / den_f


class TopKAccuracy(_SumMetric):
    """Top-k classification accuracy in percent (`top1`, `top5`, ...), counted over all samples seen.

    A sample is top-k correct when its label is among the k largest logits; k is clipped to the number of classes,
    as timm's `accuracy` does.
    """

    _sum_names = ("correct", "count")

    def __init__(self, topk: Sequence[int] = (1, 5), device: torch.device | str | None = None) -> None:
        if not topk or any(k < 1 for k in topk):
            raise ValueError(f"topk must be a non-empty list of positive ints, got {list(topk)}")
        self.topk = tuple(int(k) for k in topk)
        super().__init__(device)

    def _zeros(self) -> dict[str, Tensor]:
        return {
            "correct": torch.zeros(len(self.topk), dtype=torch.int64, device=self.device),
            "count": torch.zeros((), dtype=torch.int64, device=self.device),
        }

    @torch.no_grad()
    def update(self, logits_BC: Tensor, target_B: Tensor) -> None:
        """Add a batch of logits [B, C] and integer labels [B]."""
        if logits_BC.ndim != 2 or target_B.shape != logits_BC.shape[:1]:
            raise ValueError(f"expected logits [B, C] and labels [B], got {tuple(logits_BC.shape)} and "
                             f"{tuple(target_B.shape)}")
        num_classes = logits_BC.shape[1]
        check_class_range(target_B, num_classes, name="labels")
        self._to_device(logits_BC.device)
        maxk = min(max(self.topk), num_classes)
        top_BK = logits_BC.topk(maxk, dim=1).indices
        hit_BK = top_BK == target_B[:, None]
        for i, k in enumerate(self.topk):
            self.correct[i] += hit_BK[:, : min(k, num_classes)].any(dim=1).sum()
        self.count += target_B.numel()

    def compute(self) -> dict[str, float]:
        return {f"top{k}": _pct(self.correct[i], self.count) for i, k in enumerate(self.topk)}


class ConfusionMatrix(_SumMetric):
    """Semantic-segmentation confusion matrix over a whole set; mIoU, pixel and mean accuracy (mmseg-style, in %).

    Rows are labels, columns predictions. Pixels whose label is `ignore_index` are skipped. IoU_c = I_c / U_c with
    U_c = label_c + pred_c - I_c; mIoU is the mean over classes whose union is not empty (nanmean).
    """

    _sum_names = ("matrix",)

    def __init__(self, num_classes: int, *, ignore_index: int | None = 255,
                 device: torch.device | str | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        super().__init__(device)

    def _zeros(self) -> dict[str, Tensor]:
        return {"matrix": torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=self.device)}

    @torch.no_grad()
    def update(self, pred: Tensor, target_BHW: Tensor) -> None:
        """Add predictions (class ids [B, H, W], or logits [B, C', H, W] with C' >= num_classes) and labels [B, H, W].

        Logits are reduced with an argmax over their first `num_classes` channels, as the original does.
        """
        if pred.ndim == target_BHW.ndim + 1:
            if pred.shape[1] < self.num_classes:
                raise ValueError(f"logits have {pred.shape[1]} channels, fewer than num_classes={self.num_classes}")
            pred = pred[:, : self.num_classes].argmax(dim=1)
        if pred.shape != target_BHW.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} does not match label shape "
                             f"{tuple(target_BHW.shape)}")
        check_class_range(target_BHW, self.num_classes, ignore_index=self.ignore_index, name="labels")
        check_class_range(pred, self.num_classes, name="predictions")
        self._to_device(pred.device)
        target = target_BHW.to(pred.device).flatten()
        pred = pred.flatten()
        if self.ignore_index is not None:
            valid = target != self.ignore_index
            target, pred = target[valid], pred[valid]
        idx = target.long() * self.num_classes + pred.long()
        self.matrix += torch.bincount(idx, minlength=self.num_classes**2).view(self.num_classes, self.num_classes)

    def per_class_iou(self) -> Tensor:
        """IoU of every class as float64 [C] (NaN where the class is neither labelled nor predicted)."""
        m = self.matrix.double()
        inter = m.diag()
        union = m.sum(0) + m.sum(1) - inter
        return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, math.nan))

    def compute(self) -> dict[str, float]:
        m = self.matrix.double()
        inter = m.diag()
        label_area = m.sum(1)
        iou = self.per_class_iou()
        acc = torch.where(label_area > 0, inter / label_area.clamp(min=1), torch.full_like(inter, math.nan))
        return {
            "miou": 100.0 * float(iou.nanmean()) if bool((~iou.isnan()).any()) else math.nan,
            "pixel_acc": _pct(inter.sum(), m.sum()),
            "mean_acc": 100.0 * float(acc.nanmean()) if bool((~acc.isnan()).any()) else math.nan,
        }


class DepthMetrics(_SumMetric):
    """Depth metrics over all valid pixels of a set: delta1/2/3 (in %), RMSE and AbsRel.

    Pass depth in the units it should be scored in (the original de-normalises to millimetres first). A pixel is
    valid where the mask is set, the target is finite and > 0. delta_k is the share of valid pixels with
    max(p/g, g/p) < 1.25**k (a prediction <= 0 counts as wrong); RMSE = sqrt(sum (p-g)^2 / n);
    AbsRel = sum |p-g|/g / n.
    """

    _sum_names = ("count", "delta_hits", "sq_err", "abs_rel")

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__(device)

    def _zeros(self) -> dict[str, Tensor]:
        return {
            "count": torch.zeros((), dtype=torch.int64, device=self.device),
            "delta_hits": torch.zeros(3, dtype=torch.int64, device=self.device),
            "sq_err": torch.zeros((), dtype=torch.float64, device=self.device),
            "abs_rel": torch.zeros((), dtype=torch.float64, device=self.device),
        }

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor, valid: Tensor | None = None) -> None:
        """Add predictions and targets of the same shape (e.g. [B, 1, H, W]) and an optional boolean valid mask."""
        if pred.shape != target.shape:
            raise ValueError(f"depth prediction shape {tuple(pred.shape)} does not match target {tuple(target.shape)}")
        self._to_device(pred.device)
        p = pred.detach().double()
        g = target.detach().to(p.device).double()
        ok = torch.isfinite(g) & (g > 0)
        if valid is not None:
            if valid.shape != g.shape:
                raise ValueError(f"valid mask shape {tuple(valid.shape)} does not match target {tuple(g.shape)}")
            ok &= valid.to(p.device).bool()
        p, g = p[ok], g[ok]
        ratio = torch.maximum(p / g, g / p)
        ratio = torch.where(p > 0, ratio, torch.full_like(ratio, math.inf))
        self.count += g.numel()
        for i in range(3):
            self.delta_hits[i] += (ratio < 1.25 ** (i + 1)).sum()
        self.sq_err += ((p - g) ** 2).sum()
        self.abs_rel += ((p - g).abs() / g).sum()

    def compute(self) -> dict[str, float]:
        n = float(self.count)
        if n == 0:
            logger.warning("depth metrics computed over zero valid pixels")
            return {k: math.nan for k in ("delta1", "delta2", "delta3", "rmse", "absrel")}
        out = {f"delta{i + 1}": 100.0 * float(self.delta_hits[i]) / n for i in range(3)}
        out["rmse"] = math.sqrt(float(self.sq_err) / n)
        out["absrel"] = float(self.abs_rel) / n
        return out
