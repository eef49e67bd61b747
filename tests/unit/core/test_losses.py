"""Losses against the original's values (shared/reference) and against a naive float64 re-statement of its code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from multimae_core.losses import compute_losses, norm_pix_target, standardize_depth

HEADS = ("rgb", "depth", "semseg", "norm_rgb")


def _find_reference() -> Path:
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "reference" / "multimae_tiny"
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("no shared/reference/multimae_tiny above the test file")


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(_find_reference() / "tensors.safetensors"))


def _split(ref: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}


def _naive_standardize(depth: torch.Tensor) -> torch.Tensor:
    out = []
    for d in depth.double():
        s = torch.sort(d.flatten())[0]
        t = s[int(0.1 * len(s)): int((1 - 0.1) * len(s))]
        out.append((d - t.mean()) / torch.sqrt(t.var() + 1e-6))
    return torch.stack(out)


def _naive_loss(kind: str, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, p: int) -> torch.Tensor:
    """The original criterion, written out with loops in float64 (pixel masks by explicit repetition)."""
    pred = pred.double()
    if kind == "ce":
        loss = F.cross_entropy(pred, target, reduction="none")
    else:
        target = target.double()
        if kind == "norm_pix_mse":
            B, C, H, W = target.shape
            patches = target.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # b nh nw p1 p2 c
            patches = patches.reshape(B, (H // p) * (W // p), p * p * C)
            patches = (patches - patches.mean(-1, keepdim=True)) / torch.sqrt(patches.var(-1, keepdim=True) + 1e-6)
            target = patches.reshape(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
        elementwise = (pred - target) ** 2 if kind in ("mse", "norm_pix_mse") else (pred - target).abs()
        loss = elementwise.mean(dim=1)
    if mask is None:
        return loss.mean()
    B, H, W = loss.shape
    per_sample = []
    for b in range(B):
        grid = mask[b].reshape(H // p, W // p).double()
        pix = grid.repeat_interleave(p, 0).repeat_interleave(p, 1)
        per_sample.append((loss[b] * pix).sum() / pix.sum())
    values = torch.stack(per_sample)
    if mask.sum() == 0:
        return torch.zeros((), dtype=torch.float64)
    return values.nanmean()


_KIND = {"rgb": "mse", "depth": "l1", "semseg": "ce", "norm_rgb": "norm_pix_mse"}
_SOURCE = {"rgb": "rgb", "depth": "depth", "semseg": "semseg", "norm_rgb": "rgb"}
_P = {"rgb": 16, "depth": 16, "semseg": 4, "norm_rgb": 16}


def _naive_all(preds, inputs, masks, loss_on_unmasked=False):
    out = {}
    for head in preds:
        src = _SOURCE[head]
        out[head] = _naive_loss(_KIND[head], preds[head], inputs[src], None if loss_on_unmasked else masks[src],
                                _P[head])
    out["total"] = sum(out.values())
    return out


def test_standardize_depth_matches_reference(ref):
    depth = standardize_depth(ref["inputs.depth_raw"])
    torch.testing.assert_close(depth, ref["inputs.depth"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(depth.double(), _naive_standardize(ref["inputs.depth_raw"]), atol=1e-5, rtol=1e-5)


def test_losses_match_reference_values(ref):
    preds, inputs, masks = _split(ref, "preds."), _split(ref, "inputs."), _split(ref, "task_masks.")
    losses = compute_losses(preds, inputs, masks)
    assert set(losses) == {*HEADS, "total"}
    for key in (*HEADS, "total"):
        assert losses[key].dtype == torch.float32
        torch.testing.assert_close(losses[key], ref[f"losses.{key}"], atol=1e-5, rtol=1e-5, msg=key)


def test_losses_match_naive_float64(ref):
    preds, inputs, masks = _split(ref, "preds."), _split(ref, "inputs."), _split(ref, "task_masks.")
    naive = _naive_all(preds, inputs, masks)
    losses = compute_losses(preds, inputs, masks)
    for key in naive:
        torch.testing.assert_close(losses[key].double(), naive[key], atol=1e-5, rtol=1e-5, msg=key)


def test_random_inputs_match_naive_float64():
    g = torch.Generator().manual_seed(3)
    B = 3
    inputs = {"rgb": torch.randn(B, 3, 32, 48, generator=g), "depth": torch.randn(B, 1, 32, 48, generator=g),
              "semseg": torch.randint(0, 133, (B, 8, 12), generator=g)}
    preds = {"rgb": torch.randn(B, 3, 32, 48, generator=g), "depth": torch.randn(B, 1, 32, 48, generator=g),
             "semseg": torch.randn(B, 133, 8, 12, generator=g), "norm_rgb": torch.randn(B, 3, 32, 48, generator=g)}
    masks = {m: torch.randint(0, 2, (B, 6), generator=g) for m in ("rgb", "depth", "semseg")}
    masks["rgb"][1] = 0  # a sample without masked rgb tokens is left out of the rgb and norm_rgb means
    naive = _naive_all(preds, inputs, masks)
    losses = compute_losses(preds, inputs, masks)
    for key in naive:
        torch.testing.assert_close(losses[key].double(), naive[key], atol=1e-5, rtol=1e-5, msg=key)
    # the skipped sample does not count: equal to the loss over samples 0 and 2 alone
    keep = [0, 2]
    sub = compute_losses({"rgb": preds["rgb"][keep]}, {"rgb": inputs["rgb"][keep]}, {"rgb": masks["rgb"][keep]})
    torch.testing.assert_close(losses["rgb"], sub["rgb"])


def test_weights_and_unmasked_mean(ref):
    preds, inputs, masks = _split(ref, "preds."), _split(ref, "inputs."), _split(ref, "task_masks.")
    weights = {"rgb": 2.0, "semseg": 0.5}
    losses = compute_losses(preds, inputs, masks, weights=weights)
    expected = sum(weights.get(h, 1.0) * ref[f"losses.{h}"].double() for h in HEADS)
    torch.testing.assert_close(losses["total"].double(), expected, atol=1e-5, rtol=1e-5)

    unmasked = compute_losses(preds, inputs, masks, loss_on_unmasked=True)
    naive = _naive_all(preds, inputs, masks, loss_on_unmasked=True)
    for key in naive:
        torch.testing.assert_close(unmasked[key].double(), naive[key], atol=1e-5, rtol=1e-5, msg=key)
    torch.testing.assert_close(unmasked["rgb"].double(), F.mse_loss(preds["rgb"], inputs["rgb"]).double())


def test_all_visible_batch_returns_zero_with_zero_grad(ref):
    preds = {k: v.clone().requires_grad_(True) for k, v in _split(ref, "preds.").items()}
    inputs = _split(ref, "inputs.")
    masks = {m: torch.zeros_like(v) for m, v in _split(ref, "task_masks.").items()}
    losses = compute_losses(preds, inputs, masks)
    for key in (*HEADS, "total"):
        assert losses[key].item() == 0.0, key
    losses["total"].backward()
    for name, p in preds.items():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name


def test_skipped_sample_gets_no_gradient_and_no_nan(ref):
    preds = {k: v.clone().requires_grad_(True) for k, v in _split(ref, "preds.").items()}
    inputs, masks = _split(ref, "inputs."), _split(ref, "task_masks.")
    masks = {k: v.clone() for k, v in masks.items()}
    masks["depth"][0] = 0
    losses = compute_losses(preds, inputs, masks)
    losses["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in preds.values())
    assert torch.count_nonzero(preds["depth"].grad[0]) == 0
    assert torch.count_nonzero(preds["depth"].grad[1]) > 0


def test_norm_pix_target_statistics():
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = norm_pix_target(x, 16)
    patches = y.reshape(2, 3, 2, 16, 2, 16).permute(0, 2, 4, 1, 3, 5).reshape(2, 4, -1)
    torch.testing.assert_close(patches.mean(-1), torch.zeros(2, 4, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(patches.var(-1), torch.ones(2, 4, dtype=torch.float64), atol=1e-4, rtol=0)


def test_bad_shapes_name_the_head(ref):
    preds, inputs, masks = _split(ref, "preds."), _split(ref, "inputs."), _split(ref, "task_masks.")
    with pytest.raises(ValueError, match="'depth'"):
        compute_losses({"depth": preds["depth"][:, :, :32]}, inputs, masks)
    with pytest.raises(ValueError, match="'rgb'"):
        compute_losses({"rgb": preds["rgb"]}, inputs, {"depth": masks["depth"]})
