"""2-D sin-cos tables against a float64 formula and the original's code; resizing as the adapters use it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from multimae_core.model.input_adapters import PatchInputAdapter, SemSegInputAdapter
from multimae_core.model.pos_embed import build_2d_sincos_posemb, resize_pos_emb


def _formula(h: int, w: int, dim: int) -> torch.Tensor:
    """Spec 1.2 in float64: channels [sin(r w_k), cos(r w_k), sin(c w_k), cos(c w_k)] at (row r, col c)."""
    k = dim // 4
    out = torch.empty(1, dim, h, w, dtype=torch.float64)
    for r in range(h):
        for c in range(w):
            for i in range(k):
                omega = 1.0 / 10000 ** (i / k)
                out[0, i, r, c] = math.sin(r * omega)
                out[0, k + i, r, c] = math.cos(r * omega)
                out[0, 2 * k + i, r, c] = math.sin(c * omega)
                out[0, 3 * k + i, r, c] = math.cos(c * omega)
    return out


def _original_code(h: int, w: int, dim: int) -> torch.Tensor:
    """The original's build_2d_sincos_posemb, transcribed (meshgrid 'ij', einsum outer products, rearrange)."""
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                    indexing="ij")
    pos_dim = dim // 4
    omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
    omega = 1.0 / (10000.0**omega)
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    emb = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None]
    return emb.reshape(1, h, w, dim).permute(0, 3, 1, 2)


@pytest.mark.parametrize(("h", "w", "dim"), [(4, 4, 64), (14, 14, 32), (3, 5, 16), (6, 2, 8)])
def test_matches_float64_formula(h: int, w: int, dim: int) -> None:
    table = build_2d_sincos_posemb(h, w, dim)
    assert table.shape == (1, dim, h, w) and table.dtype == torch.float32
    torch.testing.assert_close(table.double(), _formula(h, w, dim), atol=2e-6, rtol=0)


@pytest.mark.parametrize(("n", "dim"), [(4, 64), (14, 768), (7, 32)])
def test_bitwise_equal_to_original_on_square_grids(n: int, dim: int) -> None:
    assert torch.equal(build_2d_sincos_posemb(n, n, dim), _original_code(n, n, dim))


def test_rejects_width_not_divisible_by_four() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        build_2d_sincos_posemb(4, 4, 30)


def test_resize() -> None:
    table = build_2d_sincos_posemb(4, 4, 16)
    assert resize_pos_emb(table, (4, 4), mode="bicubic") is table
    for mode in ("bicubic", "bilinear"):
        # At scale 1 the original's interpolation is an exact identity, so skipping it changes nothing.
        assert torch.equal(F.interpolate(table, size=(4, 4), mode=mode, align_corners=False), table)
        expected = F.interpolate(table, size=(6, 5), mode=mode, align_corners=False)
        assert torch.equal(resize_pos_emb(table, (6, 5), mode=mode), expected)


def test_adapters_resize_tables_with_the_originals_modes() -> None:
    torch.manual_seed(0)
    patch = PatchInputAdapter(3, image_size=32, embed_dim=16)  # table 2x2, fed 48x64 -> 3x4 grid
    x = torch.randn(1, 3, 48, 64)
    expected = patch.proj(x).flatten(2).transpose(1, 2) + F.interpolate(
        patch.pos_emb, size=(3, 4), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(patch(x), expected, atol=0, rtol=0)

    semseg = SemSegInputAdapter(10, image_size=32, embed_dim=16)  # stride 4 -> 4x4 patches of a 12x16 map
    ids = torch.randint(0, 10, (1, 12, 16))
    emb = semseg.class_emb(ids).permute(0, 3, 1, 2)
    expected = semseg.proj(emb).flatten(2).transpose(1, 2) + F.interpolate(
        semseg.pos_emb, size=(3, 4), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(semseg(ids), expected, atol=0, rtol=0)


def test_learnable_switch() -> None:
    frozen = PatchInputAdapter(3, image_size=32, embed_dim=16)
    learnable = PatchInputAdapter(3, image_size=32, embed_dim=16, learnable_pos_emb=True)
    assert not frozen.pos_emb.requires_grad and learnable.pos_emb.requires_grad
    assert torch.equal(frozen.pos_emb, learnable.pos_emb)  # both start from the sin-cos table
