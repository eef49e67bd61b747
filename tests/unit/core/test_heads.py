"""Fine-tuning heads and FinetuneModel at tiny sizes (embed 64, depth 4, 64 px); pretrained encoder loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from multimae_core.config import ModelConfig
from multimae_core.finetune import FinetuneTask, build_finetune_model, task_loss
from multimae_core.model.heads import (
    ConvNeXtSegHead,
    FinetuneModel,
    default_dpt_hooks,
    load_pretrained_encoder,
)
from multimae_core.model.input_adapters import PatchInputAdapter, SemSegInputAdapter
from multimae_core.model.multimae import MultiMAE
from multimae_core.model.output_adapters import TokenLayout
from multimae_core.training.optim import layer_id

TINY_HEADS = dict(seg_embed_dim=256, dpt_layer_dims=(16, 32, 64, 128), dpt_feature_dim=32)
INPUT_SETS = [("rgb",), ("depth",), ("rgb", "depth")]


def tiny_cfg(**kw: object) -> ModelConfig:
    return ModelConfig(**{"preset": "tiny", "image_size": 64, "patch_size": 16, "embed_dim": 64, "depth": 4,
                          "num_heads": 4, **kw})


def batch(size: int = 64, b: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"rgb": torch.randn(b, 3, size, size, generator=gen), "depth": torch.randn(b, 1, size, size, generator=gen),
            "semseg": torch.randint(0, 133, (b, size // 4, size // 4), generator=gen)}


def make(kind: str, inputs: tuple[str, ...], **kw: object) -> tuple[FinetuneTask, FinetuneModel]:
    torch.manual_seed(0)
    task = FinetuneTask(kind=kind, inputs=inputs, num_classes=5, **{**TINY_HEADS, **kw})  # type: ignore[arg-type]
    return task, build_finetune_model(task, tiny_cfg())


@pytest.mark.parametrize("inputs", INPUT_SETS, ids="+".join)
@pytest.mark.parametrize("kind", ["cls", "semseg", "depth"])
def test_shapes_and_backward(kind: str, inputs: tuple[str, ...]) -> None:
    task, model = make(kind, inputs)
    data = batch()
    out = model(data)
    want = {"cls": (2, 5), "semseg": (2, 5, 64, 64), "depth": (2, 1, 64, 64)}[kind]
    assert tuple(out.shape) == want
    assert torch.isfinite(out).all()
    target = {"cls": torch.tensor([0, 4]), "semseg": torch.randint(0, 5, (2, 64, 64)),
              "depth": torch.randn(2, 1, 64, 64)}[kind]
    task_loss(task, out, target).backward()
    # Every trainable parameter gets a gradient: no unused parameters (DDP needs no find_unused_parameters).
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []


def test_state_dict_keys_and_layer_ids_follow_the_original() -> None:
    _, model = make("depth", ("rgb", "depth"))
    keys = list(model.state_dict())
    assert keys[0] == "global_tokens"
    assert {k.split(".")[0] for k in keys} == {"global_tokens", "input_adapters", "encoder", "output_adapters"}
    assert all(k.startswith("output_adapters.depth.") for k in keys if k.startswith("output_adapters"))
    assert len(keys) == len(set(keys))
    # Layer-wise decay ids: adapters 0, encoder block k -> k + 1, head -> depth + 1.
    assert layer_id("input_adapters.depth.proj.weight", 4) == 0
    assert layer_id("encoder.3.mlp.fc1.weight", 4) == 4
    assert {layer_id(k, 4) for k in keys if k.startswith("output_adapters")} == {5}


def test_dpt_taps_the_hooked_layers() -> None:
    hooks = (1, 2, 2, 4)
    _, model = make("depth", ("rgb",), dpt_hooks=hooks)
    assert model.head.hooks == hooks
    captured: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.encoder, start=1):
        block.register_forward_hook(lambda _m, _i, out, i=i: captured.__setitem__(i, out))
    data = batch()
    out = model(data)
    layout = model.layout({"rgb": data["rgb"]})
    want = model.head([captured[h] for h in hooks], layout)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    wrong = model.head([captured[h] for h in (1, 2, 3, 4)], layout)
    assert not torch.allclose(out, wrong)


def test_default_dpt_hooks() -> None:
    assert default_dpt_hooks(12) == (3, 6, 9, 12)  # the original's 0-based [2, 5, 8, 11]
    assert default_dpt_hooks(24) == (6, 12, 18, 24)
    assert default_dpt_hooks(4) == (1, 2, 3, 4)


def test_classification_head_is_mean_layernorm_linear() -> None:
    _, model = make("cls", ("rgb", "depth"))
    head = model.head
    # trunc-normal(0.02) x 0.001 weights, zero bias (the original's ImageNet fine-tuning init).
    assert 1.5e-5 < float(head.head.weight.detach().std()) < 2.5e-5
    assert torch.count_nonzero(head.head.bias) == 0
    last: dict[str, torch.Tensor] = {}
    model.encoder[-1].register_forward_hook(lambda _m, _i, out: last.__setitem__("x", out))
    data = batch()
    out = model(data)
    tokens = last["x"].double()
    assert tokens.shape == (2, 16 + 16 + 1, 64)  # rgb + depth tokens + the global token
    pooled = tokens.mean(1)
    normed = (pooled - pooled.mean(-1, keepdim=True)) / torch.sqrt(pooled.var(-1, unbiased=False, keepdim=True) + 1e-6)
    normed = normed * head.norm.weight.double() + head.norm.bias.double()
    want = normed @ head.head.weight.double().T + head.head.bias.double()
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-9)


def test_convnext_head_lays_sub_tokens_out_as_square_blocks() -> None:
    # A 4x4 image of 2 px patches (2x2 token grid), 4 sub-tokens of 3 channels per token: a 4x4 map, the image size,
    # so the final resize is an identity. With no ConvNeXt blocks and an identity 1x1 conv the output is the map.
    head = ConvNeXtSegHead(3, main_tasks=("rgb",), patch_size=2, embed_dim=12, preds_per_patch=4, depth=0)
    head.init(embed_dim=8)
    with torch.no_grad():
        head.final_layer.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        head.final_layer.bias.zero_()
    tokens = torch.randn(2, 4 + 1, 8)
    layout = TokenLayout((("rgb", 4),), (4, 4), 1)
    out = head(tokens, layout)
    proj = head.proj_dec(tokens[:, :4])  # [B, 4 tokens, 4 sub-tokens * 3 channels]
    want = torch.empty(2, 3, 4, 4)
    for b in range(2):
        for t in range(4):
            r, q = divmod(t, 2)
            for p in range(4):
                i, j = divmod(p, 2)
                want[b, :, 2 * r + i, 2 * q + j] = proj[b, t, 3 * p:3 * p + 3]
    torch.testing.assert_close(out, want)


def test_encoder_matches_the_original_multivit(reference_dir) -> None:  # noqa: ANN001
    weights = load_file(reference_dir / "weights.safetensors")
    tensors = load_file(reference_dir / "tensors.safetensors")
    task = FinetuneTask(kind="cls", inputs=("rgb", "depth", "semseg"), num_classes=5)
    model = build_finetune_model(task, tiny_cfg(depth=2))
    report = load_pretrained_encoder(model, weights)
    assert report.resized == () and report.padded == ()
    assert all(k.startswith("output_adapters.") for k in report.dropped)
    data = {m: tensors[f"inputs.{m}"] for m in ("rgb", "depth", "semseg")}
    out = model(data)
    ref_tokens = tensors["encoder_tokens_unmasked"]  # the official MultiViT: rgb|depth|semseg|global
    head = model.head
    want = head.head(head.norm(ref_tokens.mean(1)))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_pretrained_load_resizes_pos_emb_and_drops_unused_adapters(reference_dir) -> None:  # noqa: ANN001
    weights = load_file(reference_dir / "weights.safetensors")
    task = FinetuneTask(kind="depth", inputs=("rgb", "depth"), **TINY_HEADS)  # type: ignore[arg-type]
    model = build_finetune_model(task, tiny_cfg(depth=2, image_size=96))
    report = load_pretrained_encoder(model, weights)
    assert set(report.resized) == {"input_adapters.rgb.pos_emb", "input_adapters.depth.pos_emb"}
    assert "input_adapters.semseg.class_emb.weight" in report.dropped
    assert "output_adapters.rgb.mask_token" in report.dropped
    assert all(k.startswith("output_adapters.depth.") for k in report.initialised)
    state = model.state_dict()
    assert state["input_adapters.rgb.pos_emb"].shape == (1, 64, 6, 6)
    want = F.interpolate(weights["input_adapters.rgb.pos_emb"], size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(state["input_adapters.rgb.pos_emb"], want)
    torch.testing.assert_close(state["encoder.1.attn.qkv.weight"], weights["encoder.1.attn.qkv.weight"])
    torch.testing.assert_close(state["global_tokens"], weights["global_tokens"])
    assert model(batch(96)).shape == (2, 1, 96, 96)


def test_pretrained_load_pads_semseg_class_embedding(reference_dir) -> None:  # noqa: ANN001
    weights = load_file(reference_dir / "weights.safetensors")
    adapters = {"semseg": SemSegInputAdapter(133, padding_idx=133, image_size=64, patch_size=16)}
    backbone = MultiMAE(adapters, embed_dim=64, depth=2, num_heads=4)
    model = FinetuneModel.from_multimae(backbone, ConvNeXtSegHead(5, main_tasks=("semseg",), embed_dim=256),
                                        name="semseg")
    report = load_pretrained_encoder(model, weights)
    assert report.padded == ("input_adapters.semseg.class_emb.weight",)
    table = model.state_dict()["input_adapters.semseg.class_emb.weight"]
    assert table.shape == (134, 64)
    torch.testing.assert_close(table[:133], weights["input_adapters.semseg.class_emb.weight"])
    assert torch.count_nonzero(table[133]) == 0


def test_pretrained_load_errors_name_what_does_not_fit(reference_dir) -> None:  # noqa: ANN001
    weights = load_file(reference_dir / "weights.safetensors")
    normal_task = FinetuneTask(kind="cls", inputs=("rgb", "normal"), num_classes=5)
    model = build_finetune_model(normal_task, tiny_cfg(depth=2))
    with pytest.raises(ValueError, match=r"no input adapter for \['normal'\]"):
        load_pretrained_encoder(model, weights)
    report = load_pretrained_encoder(model, weights, allow_new_inputs=True)
    assert "input_adapters.normal.proj.weight" in report.initialised
    torch.testing.assert_close(model.state_dict()["input_adapters.rgb.proj.weight"],
                               weights["input_adapters.rgb.proj.weight"])

    rgb_task = FinetuneTask(kind="cls", inputs=("rgb",), num_classes=5)
    with pytest.raises(ValueError, match=r"model keys it lacks: \['encoder\.2\."):
        load_pretrained_encoder(build_finetune_model(rgb_task, tiny_cfg(depth=4)), weights)
    sizes = r"does not fit the model's sizes: .*proj\.weight: checkpoint \(64, 64\) vs model \(32, 32\)"
    with pytest.raises(ValueError, match=sizes):
        load_pretrained_encoder(build_finetune_model(rgb_task, tiny_cfg(depth=2, embed_dim=32)), weights)
    with pytest.raises(ValueError, match="no modality in common"):
        only_normal = FinetuneTask(kind="cls", inputs=("normal",), num_classes=5)
        load_pretrained_encoder(build_finetune_model(only_normal, tiny_cfg(depth=2)), weights)
    with pytest.raises(ValueError, match="not a state dict of tensors: 'epoch' holds a int"):
        load_pretrained_encoder(build_finetune_model(rgb_task, tiny_cfg(depth=2)), {**weights, "epoch": 3})


def test_forward_errors_and_hook_range() -> None:
    _, model = make("semseg", ("rgb", "depth"))
    with pytest.raises(ValueError, match=r"lacks \['depth'\]"):
        model({"rgb": batch()["rgb"]})
    with pytest.raises(ValueError, match=r"hooks \[1, 2, 3, 9\] must be encoder layers in 1\.\.4"):
        make("depth", ("rgb",), dpt_hooks=(1, 2, 3, 9))
    task = FinetuneTask(kind="semseg", inputs=("depth",), num_classes=3)
    assert task.head_inputs == ("depth",)
    assert FinetuneTask(kind="semseg", inputs=("depth", "rgb"), num_classes=3).head_inputs == ("rgb",)


def test_dtype_and_device_changes_reach_every_tensor() -> None:
    _, model = make("cls", ("rgb",))
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.global_tokens.dtype == torch.float64
    assert model({"rgb": batch()["rgb"].double()}).dtype == torch.float64


def test_encode_is_multimae_encode() -> None:
    """The fine-tuning model's encoder pass is MultiMAE.encode's, on the same weights."""
    torch.manual_seed(0)
    backbone = MultiMAE({"rgb": PatchInputAdapter(3, image_size=64, patch_size=16),
                         "semseg": SemSegInputAdapter(7, image_size=64, patch_size=16)}, embed_dim=64, depth=2,
                        num_heads=4)
    data = {"rgb": torch.randn(2, 3, 64, 64), "semseg": torch.randint(0, 7, (2, 16, 16))}
    with torch.no_grad():
        want = backbone.encode(data)
        want_layers = backbone.encode(data, return_layers=[2, 1])
    model = FinetuneModel.from_multimae(backbone, ConvNeXtSegHead(3, main_tasks=("rgb",), embed_dim=64), name="x")
    with torch.no_grad():
        torch.testing.assert_close(model.encode(data), want, rtol=0, atol=0)
        for got, ref in zip(model.encode(data, return_layers=[2, 1]), want_layers, strict=True):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
