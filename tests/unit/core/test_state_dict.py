"""Checkpoint reading and architecture inference, export, and the timm ViT key maps (checked by running timm)."""

from __future__ import annotations

import pickle
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import save, save_file
from torch import nn

from multimae_core.config import ModelConfig
from multimae_core.model import (
    LinearOutputAdapter,
    MultiMAE,
    PatchInputAdapter,
    build_model,
    load_original,
    multimae_to_vit,
    to_original,
    vit_to_multimae,
)

INPUTS = ["rgb", "depth", "normal"]
OUTPUTS = ["rgb", "normal", "norm_rgb"]
MASKS = {"rgb": torch.tensor([[0, 1, 1, 0]] * 2), "depth": torch.tensor([[1, 1, 0, 1]] * 2),
         "normal": torch.tensor([[1, 0, 1, 1]] * 2)}


@pytest.fixture(scope="module")
def model() -> MultiMAE:
    """A non-default architecture: 2 global tokens, no decoder blocks, a 'normal' modality, odd widths."""
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", image_size=32, embed_dim=32, depth=3, num_heads=2, num_global_tokens=2,
                      decoder_embed_dim=16, decoder_depth=0, decoder_num_heads=2, mlp_ratio=2.0)
    return build_model(cfg, inputs=INPUTS, outputs=OUTPUTS).eval()


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"rgb": torch.randn(2, 3, 32, 32, generator=g), "depth": torch.randn(2, 1, 32, 32, generator=g),
            "normal": torch.randn(2, 3, 32, 32, generator=g)}


def _assert_same_model(loaded: MultiMAE, model: MultiMAE, batch: dict[str, torch.Tensor]) -> None:
    assert list(loaded.input_adapters) == INPUTS and set(loaded.output_adapters) == set(OUTPUTS)
    assert loaded.num_global_tokens == 2 and len(loaded.encoder) == 3 and not loaded.training
    assert isinstance(loaded.output_adapters["rgb"].decoder_transformer, nn.Identity)
    loaded_state, state = loaded.state_dict(), model.state_dict()
    assert loaded_state.keys() == state.keys()
    assert all(torch.equal(loaded_state[k], v) for k, v in state.items())
    with torch.no_grad():
        expected, _ = model(batch, MASKS)
        got, _ = loaded(batch, MASKS)
    for head in OUTPUTS:
        assert torch.equal(got[head], expected[head])


@pytest.mark.parametrize("form", ["dict", "model_key", "safetensors", "torch", "memory_url", "file_url"])
def test_load_original_from_every_source(form: str, model: MultiMAE, batch, tmp_path: Path) -> None:
    state = to_original(model)
    if form == "dict":
        source = state
    elif form == "model_key":
        source = {"model": state, "epoch": 3}  # the original's checkpoint layout
    elif form == "safetensors":
        source = tmp_path / "w.safetensors"
        save_file(state, str(source))
    elif form == "torch":
        source = tmp_path / "w.pth"
        torch.save({"model": state}, source)
    elif form == "memory_url":
        source = f"memory://mmae-test/{tmp_path.name}/w.safetensors"
        with fsspec.open(source, "wb") as f:
            f.write(save(state))
    else:
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
        source = f"file://{path}"
    _assert_same_model(load_original(source, num_heads=2, decoder_num_heads=2), model, batch)


def test_wrapper_prefixes_and_to_original_unwrap(model: MultiMAE, batch) -> None:
    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    exported = to_original(Wrapper(model))
    assert exported.keys() == model.state_dict().keys()
    ddp_state = {f"module.{k}": v for k, v in exported.items()}
    _assert_same_model(load_original(ddp_state, num_heads=2, decoder_num_heads=2), model, batch)


def test_strict_loading_and_bad_input(model: MultiMAE) -> None:
    state = to_original(model)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_original(state | {"encoder.0.attn.extra": torch.zeros(1)}, num_heads=2, decoder_num_heads=2)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_original({k: v for k, v in state.items() if k != "encoder.1.norm2.bias"}, num_heads=2,
                      decoder_num_heads=2)
    with pytest.raises(TypeError, match="unknown overrides"):
        load_original(state, num_heads=2, decoder_heads=2)
    with pytest.raises(ValueError, match="global_tokens"):
        load_original({k: v for k, v in state.items() if k != "global_tokens"}, num_heads=2)


class _Payload:
    """Anything that is not a tensor container; a weights_only load must refuse to build it."""


def test_torch_files_load_without_executing_code(model: MultiMAE, tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": to_original(model), "payload": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_original(path, num_heads=2)


def test_input_order_override(model: MultiMAE) -> None:
    loaded = load_original(to_original(model), num_heads=2, decoder_num_heads=2, input_order=["normal", "rgb", "depth"])
    assert list(loaded.input_adapters) == ["normal", "rgb", "depth"]


def test_semseg_padding_row_and_linear_head() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", image_size=32, embed_dim=32, depth=1, num_heads=2)
    src = build_model(cfg, inputs=["rgb", "semseg"], outputs=[])
    state = to_original(src)
    # The original's fine-tuning pads the 133-row table with one zero row for the padding index 133.
    table = state["input_adapters.semseg.class_emb.weight"]
    state["input_adapters.semseg.class_emb.weight"] = torch.cat([table, torch.zeros(1, table.shape[1])])
    head = LinearOutputAdapter(7, embed_dim=32)
    state |= {f"output_adapters.cls.{k}": v for k, v in head.state_dict().items()}
    loaded = load_original(state, num_heads=2, emb_padding_idx={"semseg": 133})
    adapter = loaded.input_adapters["semseg"]
    assert adapter.num_classes == 134 and adapter.padding_idx == 133 and adapter.stride_level == 4
    assert isinstance(loaded.output_adapters["cls"], LinearOutputAdapter)
    tokens = loaded.encode({"rgb": torch.randn(1, 3, 32, 32), "semseg": torch.full((1, 8, 8), 133)})
    assert loaded.output_adapters["cls"](tokens).shape == (1, 7)


def _perturbed_encoder(head: bool) -> MultiMAE:
    torch.manual_seed(0)
    outputs = {"cls": LinearOutputAdapter(10)} if head else {}
    model = MultiMAE({"rgb": PatchInputAdapter(3, image_size=64)}, outputs, embed_dim=64, depth=2, num_heads=4)
    with torch.no_grad():  # move norms, biases and tables off their init so every mapped key matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_multimae_to_vit_runs_in_timm() -> None:
    from timm.models.vision_transformer import VisionTransformer

    x = torch.randn(2, 3, 64, 64)
    model = _perturbed_encoder(head=True)
    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=0,
                            final_norm=False).eval()
    vit.load_state_dict(multimae_to_vit(to_original(model)), strict=True)
    with torch.no_grad():
        ours = model.encode({"rgb": x})
        # timm puts the class token first, MultiMAE puts the global token last.
        torch.testing.assert_close(vit.forward_features(x), torch.roll(ours, 1, dims=1), atol=1e-5, rtol=1e-5)
        classifier = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=10,
                                       global_pool="avg", pool_include_prefix=True).eval()
        classifier.load_state_dict(multimae_to_vit(to_original(model), head="cls"), strict=True)
        torch.testing.assert_close(classifier(x), model.output_adapters["cls"](ours), atol=1e-5, rtol=1e-5)


def test_vit_to_multimae_runs_in_multimae() -> None:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=0,
                            final_norm=False).eval()
    with torch.no_grad():
        nn.init.normal_(vit.cls_token)
        nn.init.normal_(vit.pos_embed)  # a non-zero class slot must be folded into the global token
    model = _perturbed_encoder(head=False)
    model.load_state_dict(vit_to_multimae(vit.state_dict()), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.roll(model.encode({"rgb": x}), 1, dims=1), vit.forward_features(x),
                                   atol=1e-5, rtol=1e-5)


def test_base_exports_strictly_into_timm_vit_base() -> None:
    import timm

    with torch.device("meta"):
        model = build_model(ModelConfig(preset="base"), inputs=["rgb", "depth", "semseg"], outputs=["rgb"])
        vit = timm.create_model("vit_base_patch16_224", num_classes=0, final_norm=False)
    exported = multimae_to_vit(model.state_dict())
    vit_state = vit.state_dict()
    assert exported.keys() == vit_state.keys()
    assert all(exported[k].shape == v.shape for k, v in vit_state.items())
    back = vit_to_multimae(exported)
    assert back.keys() == {k for k in model.state_dict() if not k.startswith(("output_", "input_adapters.d",
                                                                              "input_adapters.s"))}
