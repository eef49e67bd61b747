"""On CUDA a pretraining step never waits for the device (issue 7): no host-device sync inside `train_step`.

`torch.cuda.set_sync_debug_mode("error")` makes every synchronising call (`.item()`, `int(tensor)`, blocking copies,
`nonzero`, stream syncs) raise. The first step runs outside it: optimizer state and cuBLAS handles are created then.
"""

from __future__ import annotations

import pytest
import torch

from multimae_core.config import TrainConfig
from multimae_core.masking import sample_masks
from multimae_core.training.loop import build_step

SIZE = 64


def _cfg(precision: str, **masking) -> TrainConfig:
    return TrainConfig.model_validate({
        "name": "sync",
        "model": {"preset": "tiny", "image_size": SIZE, "embed_dim": 64, "depth": 2, "num_heads": 4,
                  "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 4},
        "modalities": {"inputs": ["rgb", "depth", "semseg"], "outputs": ["rgb", "depth", "semseg", "norm_rgb"]},
        "masking": {"num_encoded_tokens": 12, **masking},
        "train": {"global_batch_size": 4, "per_worker_batch_size": 4, "precision": precision},
    })


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    return {"rgb": torch.randn(4, 3, SIZE, SIZE, device="cuda", generator=g),
            "depth": torch.randn(4, 1, SIZE, SIZE, device="cuda", generator=g),
            "semseg": torch.randint(0, 133, (4, SIZE // 4, SIZE // 4), device="cuda", generator=g)}


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("uniform", [False, True])
def test_train_step_has_no_host_sync(precision: str, uniform: bool) -> None:
    step = build_step(_cfg(precision, sample_tasks_uniformly=uniform), device="cuda")
    batch = _batch()
    first = step(batch)  # warm-up: lazy state creation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [step(batch) for _ in range(2)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    for out in (first, *outs):
        assert torch.isfinite(out.losses["total"]).item() and torch.isfinite(out.grad_norm).item()
    assert set(outs[-1].losses) == {"rgb", "depth", "semseg", "norm_rgb", "total"}


@pytest.mark.gpu
def test_sync_debug_mode_catches_the_counted_mask_path() -> None:
    """The check above can fail: counting the visible tokens of given masks is a host sync."""
    from multimae_core.masking import masks_to_ids

    masks = sample_masks({"a": 8, "b": 8}, 4, 5, generator=torch.Generator(device="cuda").manual_seed(0),
                         device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        masks_to_ids(masks, ["a", "b"], num_visible=5)  # static count: fine
        with pytest.raises(RuntimeError):
            masks_to_ids(masks, ["a", "b"])
    finally:
        torch.cuda.set_sync_debug_mode(0)
