"""Checkpoint directories: bit-exact round trip, original key layout, RNG states, atomic writes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from multimae_core.config import ModelConfig, OptimConfig
from multimae_core.model.presets import build_model
from multimae_core.training import checkpoint as ckpt
from multimae_core.training.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from multimae_core.training.optim import build_optimizer, set_lr

MODEL = ModelConfig(preset="tiny", image_size=32, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
                    decoder_depth=1, decoder_num_heads=4)
INPUTS, OUTPUTS = ["rgb", "depth", "semseg"], ["rgb", "depth", "semseg", "norm_rgb"]


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(MODEL, inputs=INPUTS, outputs=OUTPUTS)


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"rgb": torch.randn(2, 3, 32, 32, generator=g), "depth": torch.randn(2, 1, 32, 32, generator=g),
            "semseg": torch.randint(0, 133, (2, 8, 8), generator=g)}


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    batch = _batch()
    for _ in range(steps):
        set_lr(opt, 1e-3)
        opt.zero_grad()
        preds, _ = model(batch, num_encoded_tokens=4, generator=g)
        sum(p.float().pow(2).mean() for p in preds.values()).backward()
        opt.step()


def _setup(seed: int = 0):
    model = _model(seed)
    opt = build_optimizer(model, OptimConfig())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return model, opt, scaler


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            _assert_same_state(a[k], b[k])
        else:
            assert a[k] == b[k], k


def test_round_trip_is_bit_exact(tmp_path: Path):
    model, opt, scaler = _setup(0)
    _train(model, opt, 2)
    scaler.scale(torch.ones(()))  # lazily creates the scale tensor
    scaler.update(512.0)
    mask_gen = torch.Generator().manual_seed(7)
    path = save_checkpoint(tmp_path / "ck", model=model, optimizer=opt, scaler=scaler, step=2, epoch=1,
                           batches_in_epoch=5, rng=capture_rng_state({"masks": mask_gen}), extra={"run": "abc"})
    assert sorted(p.name for p in Path(path).iterdir()) == ["meta.json", "model.safetensors", "train_state.pt"]

    weights = load_file(str(Path(path) / "model.safetensors"))
    assert list(weights) and set(weights) == set(model.state_dict())  # original key layout, nothing prefixed
    assert "global_tokens" in weights and any(k.startswith("encoder.0.") for k in weights)
    state = torch.load(Path(path) / "train_state.pt", weights_only=True)  # plain tensors and builtins only
    assert state["step"] == 2

    fresh, fresh_opt, fresh_scaler = _setup(1)
    loaded = load_checkpoint(path, fresh, fresh_opt, fresh_scaler)
    assert (loaded.step, loaded.epoch, loaded.batches_in_epoch) == (2, 1, 5)
    assert loaded.extra == {"run": "abc"} and json.loads((Path(path) / "meta.json").read_text())["step"] == 2
    _assert_same_state(model.state_dict(), fresh.state_dict())
    _assert_same_state(opt.state_dict()["state"], fresh_opt.state_dict()["state"])
    assert fresh_scaler.get_scale() == 512.0

    # Training continues identically from both.
    _train(model, opt, 2, seed=3)
    _train(fresh, fresh_opt, 2, seed=3)
    _assert_same_state(model.state_dict(), fresh.state_dict())


def test_rng_states_round_trip(tmp_path: Path):
    model, opt, _ = _setup()
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    state = capture_rng_state({"masks": gen})
    path = save_checkpoint(tmp_path / "ck", model=model, optimizer=opt, step=0, rng=state)
    expected = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=gen))

    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    gen.manual_seed(99)
    restore_rng_state(load_checkpoint(path).rng_for(0), {"masks": gen})
    got = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=gen))
    assert torch.equal(expected[0], got[0]) and expected[1] == got[1] and expected[2] == got[2]
    assert torch.equal(expected[3], got[3])
    assert load_checkpoint(path).rng_for(1) is None


def test_wrapped_model_saves_plain_keys(tmp_path: Path):
    model, opt, _ = _setup()
    path = save_checkpoint(tmp_path / "ck", model=nn.DataParallel(model), optimizer=opt, step=1)
    assert set(load_file(str(Path(path) / "model.safetensors"))) == set(model.state_dict())


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    model, opt, scaler = _setup()
    first = save_checkpoint(tmp_path / "checkpoint_1", model=model, optimizer=opt, scaler=scaler, step=1)
    before = load_file(str(Path(first) / "model.safetensors"))
    _train(model, opt, 1)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", boom)  # fails after model.safetensors was written to the temp dir
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path / "checkpoint_2", model=model, optimizer=opt, scaler=scaler, step=2)
    with pytest.raises(RuntimeError, match="disk full"):  # overwriting an existing checkpoint fails the same way
        save_checkpoint(tmp_path / "checkpoint_1", model=model, optimizer=opt, scaler=scaler, step=2)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1"]  # no final dir, no temp leftovers
    assert latest_checkpoint(tmp_path) == first
    fresh, fresh_opt, fresh_scaler = _setup(5)
    assert load_checkpoint(first, fresh, fresh_opt, fresh_scaler).step == 1
    _assert_same_state(before, fresh.state_dict())


def test_latest_checkpoint_ignores_partial_dirs(tmp_path: Path):
    model, opt, _ = _setup()
    for step in (3, 10, 7):
        save_checkpoint(tmp_path / f"c{step}", model=model, optimizer=opt, step=step)
    (tmp_path / "c99.tmp-123").mkdir()  # a crashed writer's leftovers
    (tmp_path / "c99.tmp-123" / "meta.json").write_text(json.dumps({"step": 99}))
    (tmp_path / "empty").mkdir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 7, 10]
    assert latest_checkpoint(tmp_path) == str(tmp_path / "c10")
    assert latest_checkpoint(tmp_path / "missing") is None


def test_save_replaces_existing_directory(tmp_path: Path):
    model, opt, _ = _setup()
    save_checkpoint(tmp_path / "ck", model=model, optimizer=opt, step=1)
    save_checkpoint(tmp_path / "ck", model=model, optimizer=opt, step=2)
    assert load_checkpoint(tmp_path / "ck").step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
