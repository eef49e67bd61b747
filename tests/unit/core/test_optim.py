"""Learning-rate schedule and parameter groups against the formulas written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from multimae_core.config import OptimConfig
from multimae_core.training.optim import build_optimizer, layer_id, lr_at, param_groups, peak_lr, set_lr


def _naive_lr(step: int, peak: float, warmup: int, total: int, min_lr: float) -> float:
    if step < warmup:
        return peak * step / warmup
    t = min(step - warmup, total - warmup) / (total - warmup)
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize("warmup,total,min_lr", [(0, 10, 0.0), (4, 20, 1e-6), (10, 11, 0.0), (3, 1000, 5e-5)])
def test_lr_matches_naive_formula(warmup, total, min_lr):
    peak = 8e-4
    for step in range(total + 3):
        assert lr_at(step, peak_lr=peak, warmup_steps=warmup, total_steps=total, min_lr=min_lr) == pytest.approx(
            _naive_lr(step, peak, warmup, total, min_lr), rel=1e-12, abs=1e-15), step


def test_lr_shape():
    kw = dict(peak_lr=1.0, warmup_steps=5, total_steps=15, min_lr=0.1)
    assert lr_at(0, **kw) == 0.0  # warmup starts from 0, as the original
    assert lr_at(5, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(15, **kw) == pytest.approx(0.1) and lr_at(100, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(16)]
    assert values[:6] == sorted(values[:6]) and values[5:] == sorted(values[5:], reverse=True)


def test_peak_lr_scaling_rule():
    assert peak_lr(OptimConfig(blr=1e-4), 2048) == pytest.approx(8e-4)  # the paper's 8 x 256
    assert peak_lr(OptimConfig(blr=1e-4, lr=3e-3), 2048) == 3e-3


class _Toy(nn.Module):
    """Names like MultiMAE's: tokens, adapters with pos_emb, encoder blocks, heads."""

    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.global_tokens = nn.Parameter(torch.zeros(1, 1, 8))
        self.input_adapters = nn.ModuleDict({"rgb": nn.Linear(4, 8)})
        self.input_adapters.rgb.register_parameter("pos_emb", nn.Parameter(torch.zeros(1, 8, 2, 2)))
        self.encoder = nn.Sequential(*[nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(depth)])
        self.output_adapters = nn.ModuleDict({"rgb": nn.Linear(8, 4)})
        self.output_adapters.rgb.register_parameter("mask_token", nn.Parameter(torch.zeros(1, 1, 8)))
        self.frozen = nn.Parameter(torch.zeros(3), requires_grad=False)


def test_decay_all_params_is_one_group():
    model = _Toy()
    groups = param_groups(model, weight_decay=0.05, decay_all_params=True)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.05 and groups[0]["lr_scale"] == 1.0
    expected = [n for n, p in model.named_parameters() if p.requires_grad]
    assert groups[0]["param_names"] == expected  # registration order, frozen params left out


def test_no_decay_exemptions():
    model = _Toy()
    groups = param_groups(model, weight_decay=0.05, decay_all_params=False)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["param_names"]}
    exempt = {n for g in groups if g["weight_decay"] == 0 for n in g["param_names"]}
    naive_exempt = {n for n, p in model.named_parameters() if p.requires_grad and (
        p.ndim <= 1 or n.endswith(".bias") or "token" in n or "pos_emb" in n)}
    assert exempt == naive_exempt
    assert decayed == {"input_adapters.rgb.weight", "encoder.0.1.weight", "encoder.1.1.weight", "encoder.2.1.weight",
                       "output_adapters.rgb.weight"}


def test_layer_decay_scales():
    depth, decay = 3, 0.75
    model = _Toy(depth)
    groups = param_groups(model, weight_decay=0.05, decay_all_params=False, layer_decay=decay, num_layers=depth)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    naive = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if n.startswith("input_adapters") or n == "global_tokens":
            lid = 0
        elif n.startswith("encoder."):
            lid = int(n.split(".")[1]) + 1
        else:
            lid = depth + 1
        naive[n] = decay ** (depth + 1 - lid)
    assert scale == pytest.approx(naive)
    assert scale["input_adapters.rgb.pos_emb"] == pytest.approx(0.75 ** 4)
    assert scale["output_adapters.rgb.weight"] == 1.0
    assert layer_id("encoder.11.mlp.fc1.weight", 12) == 12

    opt = build_optimizer(model, OptimConfig(weight_decay=0.05, decay_all_params=False, layer_decay=decay),
                          num_layers=depth)
    set_lr(opt, 1e-3)
    for group in opt.param_groups:
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])


def test_layer_decay_needs_depth():
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups(_Toy(), weight_decay=0.0, layer_decay=0.5)


def test_adamw_step_matches_naive_update():
    """One AdamW step from our optimizer equals the textbook decoupled-decay update."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    w0 = model.weight.detach().clone()
    cfg = OptimConfig(weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    opt = build_optimizer(model, cfg)
    set_lr(opt, 0.01)
    model(torch.randn(4, 3)).pow(2).sum().backward()
    g = model.weight.grad.detach().clone()
    opt.step()
    m_hat = (1 - 0.9) * g / (1 - 0.9)
    v_hat = (1 - 0.95) * g * g / (1 - 0.95)
    expected = w0 * (1 - 0.01 * 0.1) - 0.01 * m_hat / (v_hat.sqrt() + 1e-8)
    torch.testing.assert_close(model.weight.detach(), expected, atol=1e-7, rtol=1e-6)
