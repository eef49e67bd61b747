"""The training fast path (issue 7) computes the original's function.

Reference for the decoders: the original's per-head un-shuffle (mask tokens appended, all N tokens gathered back to
canonical order, embeddings added everywhere, queries sliced, context re-gathered), written out here independently
of `SpatialOutputAdapter.decode`; reference for the losses: `compute_losses` on full images, itself checked against
naive float64 code in test_losses.py. Tolerance 1e-5 for losses and gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from multimae_core.config import ModelConfig
from multimae_core.losses import compute_losses, compute_patch_losses, patchify
from multimae_core.masking import masks_to_ids, sample_masks
from multimae_core.model import build_model
from multimae_core.model.blocks import Attention, attention, attention_kernel
from multimae_core.model.output_adapters import SpatialOutputAdapter, decode_spatial
from multimae_core.training.objectives import StepSettings, forward_losses

INPUTS = ["rgb", "depth", "semseg"]
OUTPUTS = ["rgb", "depth", "semseg", "norm_rgb"]
TOL = dict(atol=1e-5, rtol=1e-5)
SIZE = 32  # 2 x 2 tokens per modality with 16 px patches


def _model(decoder_depth: int = 1):
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", image_size=SIZE, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
                      decoder_depth=decoder_depth, decoder_num_heads=4)
    return build_model(cfg, inputs=INPUTS, outputs=OUTPUTS)


def _batch(B: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"rgb": torch.randn(B, 3, SIZE, SIZE, generator=g), "depth": torch.randn(B, 1, SIZE, SIZE, generator=g),
            "semseg": torch.randint(0, 133, (B, SIZE // 4, SIZE // 4), generator=g)}


def _edge_masks() -> dict[str, torch.Tensor]:
    """B = 4, K = 5 of 12: sample 0 hides all rgb, sample 1 shows all rgb (no rgb loss) and hides all depth."""
    return {"rgb": torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0], [1, 1, 0, 1]]),
            "depth": torch.tensor([[0, 0, 1, 0], [1, 1, 1, 1], [1, 1, 0, 1], [0, 0, 1, 1]]),
            "semseg": torch.tensor([[0, 1, 0, 1], [1, 1, 1, 0], [0, 1, 1, 0], [1, 0, 1, 0]])}


def _original_decoder(adapter: SpatialOutputAdapter, encoder_tokens, layout, ids_keep, ids_restore) -> torch.Tensor:
    """The original's SpatialOutputAdapter.forward (spec 1.2, steps 1-7), image output."""
    B = encoder_tokens.shape[0]
    G = layout.num_global_tokens
    ctx = adapter.proj_context(encoder_tokens)
    visible, glob = ctx[:, :-G], ctx[:, -G:]
    full = torch.cat([visible, adapter.mask_token.expand(B, layout.num_tokens - visible.shape[1], -1)], dim=1)
    full = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    pos = adapter.pos_emb.flatten(2).transpose(1, 2)  # same grid: no resize
    emb = torch.cat([adapter.task_embeddings[name] + pos for name, _ in layout.modalities], dim=1)
    full = full + emb
    start, end = layout.span(adapter.task)
    queries = full[:, start:end]
    context = torch.cat([torch.gather(full, 1, ids_keep.unsqueeze(-1).expand(-1, -1, full.shape[-1])), glob], dim=1)
    x = adapter.decoder(adapter.query_norm(queries), adapter.context_norm(context))
    x = x + adapter.mlp(adapter.out_norm(x))
    x = adapter.out_proj(adapter.decoder_transformer(x))
    nh, nw = adapter.query_grid(layout)
    x = x.reshape(B, nh, nw, adapter.num_channels, adapter.P_H, adapter.P_W)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, adapter.num_channels, nh * adapter.P_H, nw * adapter.P_W)


def _reference_losses(model, batch, masks):
    """Original path: encoder, each head on its own (semseg in fp32), full-resolution images, compute_losses."""
    tokens, layout = model._tokenize(batch)
    encoder_tokens, ids_keep, ids_restore = model._encode_visible(tokens, masks)
    preds = {name: _original_decoder(a, encoder_tokens, layout, ids_keep, ids_restore)
             for name, a in model.output_adapters.items()}
    return compute_losses(preds, batch, masks)


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("decoder_depth", [0, 2])
@pytest.mark.parametrize("drawn", [True, False])
def test_fast_training_path_matches_original_losses_and_gradients(decoder_depth: int, drawn: bool) -> None:
    model = _model(decoder_depth).train()
    B = 4
    batch = _batch(B, seed=decoder_depth)
    if drawn:
        masks = sample_masks({m: 4 for m in INPUTS}, B, 5, generator=torch.Generator().manual_seed(3))
    else:
        masks = _edge_masks()
        batch.update({f"mask.{m}": v for m, v in masks.items()})  # precomputed: counted and validated
    settings = StepSettings(inputs=tuple(INPUTS), patch_size=16, num_encoded_tokens=5)

    ref = _reference_losses(model, batch, masks)
    ref["total"].backward()
    ref_grads = _grads(model)
    assert settings.drawn_visible(batch) == (5 if drawn else None)
    fast, patches = forward_losses(model, batch, masks, settings, torch.device("cpu"),
                                   num_visible=settings.drawn_visible(batch))
    fast["total"].backward()
    fast_grads = _grads(model)

    assert patches["semseg"].shape == (B, 4, 133 * 4 * 4) and patches["rgb"].shape == (B, 4, 3 * 16 * 16)
    assert fast.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(fast[k], ref[k], **TOL, msg=k)
    assert ref_grads.keys() == fast_grads.keys() and len(ref_grads) > 20
    for k in ref_grads:
        torch.testing.assert_close(fast_grads[k], ref_grads[k], **TOL, msg=k)
    # the comparison can fail: other masks give other losses
    other, _ = forward_losses(model, batch, {m: v.flip(0) for m, v in masks.items()}, settings, torch.device("cpu"))
    assert abs(other["total"].item() - ref["total"].item()) > 1e-4


def _unpatchify64(x_BNX: torch.Tensor, C: int, p: int, h: int, w: int) -> torch.Tensor:
    B = x_BNX.shape[0]
    return x_BNX.double().reshape(B, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h * p, w * p)


@pytest.mark.parametrize("loss_on_unmasked", [False, True])
def test_patch_losses_equal_image_losses(loss_on_unmasked: bool) -> None:
    g = torch.Generator().manual_seed(1)
    B, h, w = 4, 2, 2
    targets = {"rgb": torch.randn(B, 3, 32, 32, generator=g), "depth": torch.randn(B, 1, 32, 32, generator=g),
               "semseg": torch.randint(0, 7, (B, 8, 8), generator=g)}
    targets["semseg"][0, 0, 0] = -100  # ignored pixel: 0 loss, still in the denominator
    patches = {"rgb": torch.randn(B, 4, 3 * 256, generator=g), "norm_rgb": torch.randn(B, 4, 3 * 256, generator=g),
               "depth": torch.randn(B, 4, 256, generator=g), "semseg": torch.randn(B, 4, 7 * 16, generator=g)}
    geometry = {"rgb": (3, 16), "norm_rgb": (3, 16), "depth": (1, 16), "semseg": (7, 4)}
    masks = _edge_masks()
    weights = {"depth": 0.5, "semseg": 2.0}
    leaves = {k: v.clone().requires_grad_() for k, v in patches.items()}
    images = {k: _unpatchify64(v, *geometry[k], h, w).float().detach().requires_grad_() for k, v in patches.items()}

    fast = compute_patch_losses(leaves, targets, masks, weights=weights, loss_on_unmasked=loss_on_unmasked)
    ref = compute_losses(images, targets, masks, weights=weights, loss_on_unmasked=loss_on_unmasked)
    for k in ref:
        torch.testing.assert_close(fast[k], ref[k], **TOL, msg=k)
    fast["total"].backward()
    ref["total"].backward()
    for k in patches:
        grad_img = _unpatchify64(leaves[k].grad, *geometry[k], h, w).float()
        torch.testing.assert_close(grad_img, images[k].grad, atol=1e-7, rtol=1e-5, msg=k)
    if not loss_on_unmasked:  # sample 1 shows all rgb: no gradient reaches its rgb prediction
        assert leaves["rgb"].grad[1].abs().max() == 0 and leaves["rgb"].grad[0].abs().max() > 0


def test_patchify_round_trips_through_the_decoder_layout() -> None:
    model = _model()
    tokens, layout = model._tokenize(_batch(2))
    x = torch.randn(2, 3, SIZE, SIZE)
    adapter = model.output_adapters["rgb"]
    assert torch.equal(adapter.unpatchify(patchify(x, 16), layout), x)
    labels = torch.randint(0, 133, (2, 8, 8))
    assert torch.equal(patchify(labels, 4).reshape(2, 2, 2, 4, 4).permute(0, 1, 3, 2, 4).reshape(2, 8, 8), labels)


def test_patch_losses_reject_mismatched_shapes() -> None:
    masks = {"rgb": torch.zeros(2, 4, dtype=torch.long)}
    with pytest.raises(ValueError, match="'rgb'"):
        compute_patch_losses({"rgb": torch.randn(2, 4, 100)}, {"rgb": torch.randn(2, 3, 32, 32)}, masks)
    with pytest.raises(ValueError, match="'rgb'"):
        compute_patch_losses({"rgb": torch.randn(2, 3, 32, 32)}, {"rgb": torch.randn(2, 3, 32, 32)}, masks)


def test_static_visible_count_matches_validated_count() -> None:
    masks = sample_masks({"a": 6, "b": 10}, 5, 7, generator=torch.Generator().manual_seed(0))
    counted = masks_to_ids(masks, ["a", "b"])
    static = masks_to_ids(masks, ["a", "b"], num_visible=7)
    assert all(torch.equal(x, y) for x, y in zip(counted, static, strict=True))
    with pytest.raises(RuntimeError, match="exactly 6 visible"):  # checked asynchronously (immediately on CPU)
        masks_to_ids(masks, ["a", "b"], num_visible=6)
    with pytest.raises(ValueError, match="num_visible"):
        masks_to_ids(masks, ["a", "b"], num_visible=17)


def test_model_forward_with_known_count_equals_counted() -> None:
    model = _model().eval()
    batch = _batch(4)
    masks = _edge_masks()
    with torch.no_grad():
        counted, _ = model(batch, masks)
        static, _ = model(batch, masks, num_encoded_tokens=5)
        patches, _ = model(batch, masks, num_encoded_tokens=5, patches=True)
    for k in counted:
        assert torch.equal(counted[k], static[k])
        assert torch.equal(model.output_adapters[k].unpatchify(patches[k], model._tokenize(batch)[1]), counted[k])
    with pytest.raises(RuntimeError, match="visible"):
        model(batch, masks, num_encoded_tokens=4)


def test_decode_spatial_equals_each_head_alone() -> None:
    model = _model(decoder_depth=2).eval()
    batch = _batch(3)
    masks = sample_masks({m: 4 for m in INPUTS}, 3, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tokens, layout = model._tokenize(batch)
        enc, ids_keep, ids_restore = model._encode_visible(tokens, masks)
        heads = list(model.output_adapters.values())
        together = decode_spatial(heads, enc, layout, ids_keep, ids_restore)
        for head, out in zip(heads, together, strict=True):
            alone = head.decode(head.proj_context(enc), layout, ids_keep, ids_restore)
            torch.testing.assert_close(out, alone, atol=1e-6, rtol=1e-6)
            original = _original_decoder(head, enc, layout, ids_keep, ids_restore)
            torch.testing.assert_close(head.unpatchify(out, layout), original, **TOL)


def test_explicit_attention_equals_sdpa() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g, dtype=torch.float64) for n in (5, 7, 7))
    naive = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1) @ v
    with attention_kernel("explicit"):
        explicit = attention(q.float(), k.float(), v.float())
    with attention_kernel("sdpa"):
        sdpa = attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(explicit.double(), naive, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sdpa.double(), naive, atol=1e-6, rtol=1e-5)


def test_cpu_autocast_attention_takes_the_explicit_path(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        fp32 = attn(x)

    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA called under CPU bf16 autocast")

    monkeypatch.setattr(F, "scaled_dot_product_attention", no_sdpa)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = attn(x)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), fp32, atol=3e-2, rtol=3e-2)
    with pytest.raises(AssertionError, match="SDPA called"), torch.no_grad():
        attn(x)  # fp32 still goes to SDPA
