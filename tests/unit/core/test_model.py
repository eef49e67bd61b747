"""Model construction, training mechanics and numerics over the presets (tiny widths on CPU)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from multimae_core.config import ModelConfig
from multimae_core.modalities import MODALITIES, ModalitySpec, register_modality
from multimae_core.model import PRESETS, LinearOutputAdapter, MultiMAE, PatchInputAdapter, build_model

INPUTS = ["rgb", "depth", "semseg"]
OUTPUTS = ["rgb", "depth", "semseg", "norm_rgb"]


def _small_cfg(preset: str = "tiny", **kw) -> ModelConfig:
    # Preset depths of the decoder are kept; widths shrink so every preset runs in well under a second.
    base = dict(preset=preset, image_size=32, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                decoder_num_heads=2)
    return ModelConfig(**(base | kw))


def _batch(B: int = 2, size: int = 32, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {"rgb": torch.randn(B, 3, size, size, generator=g), "depth": torch.randn(B, 1, size, size, generator=g),
           "semseg": torch.randint(0, 133, (B, size // 4, size // 4), generator=g)}
    return {k: v for k, v in out.items() if names is None or k in names}


def _loss(preds: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(p.float().pow(2).mean() for p in preds.values())


def test_base_preset_matches_original_parameter_count() -> None:
    with torch.device("meta"):
        model = build_model(ModelConfig(preset="base"), inputs=INPUTS, outputs=OUTPUTS)
    state = model.state_dict()
    assert len(state) == 351
    assert sum(v.numel() for v in state.values()) == 98_569_360
    assert sum(v.numel() for k, v in state.items() if not k.startswith("output_adapters.")) == 87_090_496
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == 652_288  # frozen sin-cos tables
    assert not list(model.buffers())


@pytest.mark.parametrize("preset", list(PRESETS))
def test_forward_backward_each_preset(preset: str) -> None:
    torch.manual_seed(0)
    model = build_model(_small_cfg(preset), inputs=INPUTS, outputs=OUTPUTS).train()
    decoder = model.output_adapters["rgb"].decoder_transformer
    assert len(decoder) == PRESETS[preset].decoder_depth
    preds, masks = model(_batch(), num_encoded_tokens=5, generator=torch.Generator().manual_seed(1))
    assert preds["rgb"].shape == preds["norm_rgb"].shape == (2, 3, 32, 32)
    assert preds["depth"].shape == (2, 1, 32, 32)
    assert preds["semseg"].shape == (2, 133, 8, 8)
    assert all(m.shape == (2, 4) for m in masks.values())
    assert torch.cat(list(masks.values()), 1).eq(0).sum(1).tolist() == [5, 5]
    _loss(preds).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(torch.isfinite(p).all() for p in preds.values())
    assert model.encoder[0].attn.qkv.weight.grad.abs().sum() > 0


def test_bf16_autocast_on_cpu_keeps_semseg_in_fp32() -> None:
    torch.manual_seed(0)
    model = build_model(_small_cfg(), inputs=INPUTS, outputs=OUTPUTS)
    masks = {"rgb": torch.tensor([[0, 1, 1, 0]] * 2), "depth": torch.tensor([[1, 1, 0, 1]] * 2),
             "semseg": torch.tensor([[1, 0, 1, 1]] * 2)}
    batch = _batch()
    ref, _ = model(batch, masks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        preds, _ = model(batch, masks)
    assert preds["semseg"].dtype == torch.float32
    assert preds["rgb"].dtype == torch.bfloat16
    for head in OUTPUTS:
        torch.testing.assert_close(preds[head].float(), ref[head], atol=0.1, rtol=0.1)
    _loss(preds).backward()
    assert torch.isfinite(model.encoder[0].mlp.fc1.weight.grad).all()


@pytest.fixture
def thermal() -> Iterator[str]:
    spec = ModalitySpec(name="test_thermal", kind="dense_regression", num_channels=1, loss="l1")
    register_modality(spec)
    try:
        yield spec.name
    finally:
        MODALITIES.pop(spec.name)


def test_new_modality_from_one_spec_entry_trains(thermal: str) -> None:
    torch.manual_seed(0)
    model = build_model(_small_cfg(), inputs=["rgb", thermal], outputs=["rgb", thermal])
    assert isinstance(model.input_adapters[thermal], PatchInputAdapter)
    batch = {"rgb": torch.randn(2, 3, 32, 32), thermal: torch.randn(2, 1, 32, 32)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = model.input_adapters[thermal].proj.weight.detach().clone()
    preds, masks = model(batch, num_encoded_tokens=4, generator=torch.Generator().manual_seed(0))
    assert preds[thermal].shape == (2, 1, 32, 32)
    loss = (preds[thermal] - batch[thermal]).abs().mean() + (preds["rgb"] - batch["rgb"]).pow(2).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.input_adapters[thermal].proj.weight)


def test_encode_return_layers() -> None:
    model = build_model(_small_cfg(depth=3), inputs=INPUTS, outputs=[]).eval()
    batch = _batch()
    with torch.no_grad():
        full = model.encode(batch)
        layers = model.encode(batch, return_layers=[1, 2])
        (last,) = model.encode(batch, return_layers=[3])
        manual = model.encoder[0](model._with_global(torch.cat(list(model._tokenize(batch)[0].values()), 1)))
    assert full.shape == (2, 3 * 4 + 1, 32)
    assert [t.shape for t in layers] == [torch.Size([2, 13, 32])] * 2
    assert torch.equal(last, full) and torch.equal(layers[0], manual)
    with pytest.raises(ValueError, match="return_layers"):
        model.encode(batch, return_layers=[4])


def test_weight_init_follows_original() -> None:
    torch.manual_seed(0)
    model = build_model(_small_cfg(embed_dim=64, num_heads=4), inputs=INPUTS, outputs=["rgb"])
    D = 64
    qkv = model.encoder[0].attn.qkv.weight
    # Per-slice xavier bound sqrt(6 / (D + D)) is larger than plain xavier's sqrt(6 / (3D + D)).
    assert qkv.abs().max() <= math.sqrt(6 / (2 * D)) and qkv.abs().max() > math.sqrt(6 / (4 * D))
    kv = model.output_adapters["rgb"].decoder.kv.weight
    assert kv.abs().max() <= math.sqrt(6 / (2 * 32)) and kv.abs().max() > math.sqrt(6 / (3 * 32))
    assert torch.count_nonzero(model.output_adapters["rgb"].mask_token) == 0
    assert torch.count_nonzero(model.encoder[0].attn.qkv.bias) == 0
    assert torch.equal(model.encoder[0].norm1.weight, torch.ones(D))
    conv = model.input_adapters["rgb"].proj.weight
    assert conv.abs().max() <= math.sqrt(6 / (D + 3 * 16 * 16))
    assert 0.01 < model.global_tokens.std() < 0.03


def test_linear_head_keeps_its_small_init() -> None:
    torch.manual_seed(0)
    head = LinearOutputAdapter(10, init_scale=1e-3)
    model = MultiMAE({"rgb": PatchInputAdapter(3, image_size=32)}, {"cls": head}, embed_dim=64, depth=1,
                     num_heads=4)
    assert 0.01e-3 < head.head.weight.std() < 0.03e-3  # trunc-normal(0.02) x init_scale, not xavier
    assert torch.count_nonzero(head.head.bias) == 0
    tokens = model.encode({"rgb": torch.randn(2, 3, 32, 32)})
    torch.testing.assert_close(head(tokens), head.head(head.norm(tokens.mean(1))))


def test_forward_errors() -> None:
    model = build_model(_small_cfg(), inputs=INPUTS, outputs=["rgb"])
    with pytest.raises(ValueError, match="num_encoded_tokens"):
        model(_batch())
    with pytest.raises(ValueError, match="none of the model's input"):
        model({"normal": torch.randn(2, 3, 32, 32)}, num_encoded_tokens=2)
    bad = {"rgb": torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]]), "depth": torch.ones(2, 4, dtype=torch.int64),
           "semseg": torch.ones(2, 4, dtype=torch.int64)}
    with pytest.raises(ValueError, match="same number of visible"):
        model(_batch(), bad)
    with pytest.raises(ValueError, match="masks.rgb"):
        model(_batch(), bad | {"rgb": torch.zeros(2, 5, dtype=torch.int64)})


def test_subset_of_inputs_and_drop_path() -> None:
    torch.manual_seed(0)
    model = build_model(_small_cfg(drop_path_rate=0.5), inputs=INPUTS, outputs=["depth"])
    rgb_only = _batch(names=["rgb"])
    masks = {"rgb": torch.tensor([[0, 1, 0, 1]] * 2)}
    model.eval()
    with torch.no_grad():
        a, _ = model(rgb_only, masks)
        b, _ = model(rgb_only, masks)
        model.train()
        torch.manual_seed(1)
        c, _ = model(rgb_only, masks)
    assert a["depth"].shape == (2, 1, 32, 32)
    assert torch.equal(a["depth"], b["depth"]) and not torch.equal(a["depth"], c["depth"])
