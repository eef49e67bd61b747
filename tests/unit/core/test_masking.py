"""Masking: exact budgets, reachability, seeding, the original's algorithm (vs a naive per-sample re-statement),
vectorisation, and explicit masks honoured by the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from multimae_core.config import ModelConfig
from multimae_core.masking import masks_to_ids, sample_masks
from multimae_core.model.presets import build_model

THREE = {"rgb": 16, "depth": 16, "semseg": 16}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def _budget_cases(draw):
    sizes = draw(st.lists(st.integers(1, 20), min_size=1, max_size=4))
    num_tokens = {f"m{i}": n for i, n in enumerate(sizes)}
    k = draw(st.integers(1, sum(sizes)))
    alphas = draw(st.one_of(st.floats(0.05, 5.0), st.fixed_dictionaries({n: st.floats(0.05, 5.0) for n in num_tokens})))
    return num_tokens, k, alphas, draw(st.booleans()), draw(st.integers(1, 8)), draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(_budget_cases())
def test_exact_budget_per_sample(case) -> None:
    num_tokens, k, alphas, uniform, batch, seed = case
    masks = sample_masks(num_tokens, batch, k, alphas=alphas, sample_tasks_uniformly=uniform, generator=_gen(seed))
    assert list(masks) == list(num_tokens)
    for name, mask in masks.items():
        assert mask.dtype == torch.int64 and mask.shape == (batch, num_tokens[name])
        assert set(mask.unique().tolist()) <= {0, 1}
    visible = torch.cat(list(masks.values()), dim=1).eq(0).sum(1)
    assert visible.tolist() == [k] * batch


def test_every_modality_reachable_and_empty_modalities_occur() -> None:
    masks = sample_masks(THREE, 512, 8, generator=_gen(0))
    visible = {n: m.eq(0).sum(1) for n, m in masks.items()}
    for name, counts in visible.items():
        assert counts.max() > 0, f"{name} never visible"
        assert (counts == 0).any(), f"{name} never fully masked"
    # A sample can also put its whole budget into one modality.
    assert any((c == 8).any() for c in visible.values())


def test_seeding() -> None:
    a = sample_masks(THREE, 4, 8, generator=_gen(123))
    b = sample_masks(THREE, 4, 8, generator=_gen(123))
    c = sample_masks(THREE, 4, 8, generator=_gen(124))
    assert all(torch.equal(a[n], b[n]) for n in THREE)
    assert not all(torch.equal(a[n], c[n]) for n in THREE)


def _naive_original(sizes: list[int], k: int, alphas: list[float], rng: np.random.Generator,
                    uniform: bool = False) -> list[np.ndarray]:
    """The original generate_random_masks for ONE sample, written out step by step (spec 3.1)."""
    alphas_arr = np.asarray(alphas, dtype=np.float64)
    if uniform:
        subsets = [np.array([(i >> (len(sizes) - 1 - j)) & 1 for j in range(len(sizes))]) for i in
                   range(1, 2 ** len(sizes))]
        alphas_arr = subsets[rng.integers(len(subsets))] * alphas_arr + 1e-5
    share = rng.dirichlet(alphas_arr)
    keep = np.round(share * k).astype(int)
    provisional = [(rng.permutation(n) >= keep[t]).astype(int) for t, n in enumerate(sizes)]
    mask = np.concatenate(provisional)
    order = np.argsort(mask + rng.random(mask.size), kind="stable")
    final = np.ones_like(mask)
    final[order[:k]] = 0
    return np.split(final, np.cumsum(sizes)[:-1])


@pytest.mark.parametrize("uniform", [False, True])
def test_distribution_matches_naive_original(uniform: bool) -> None:
    # Uneven sizes (4 < share * K is common) and uneven alphas exercise clamping, promotion and alpha order.
    sizes, k, alphas, n = [16, 4, 16], 12, [0.5, 1.0, 3.0], 4000
    num_tokens = dict(zip(["a", "b", "c"], sizes, strict=True))
    ours = sample_masks(num_tokens, n, k, alphas=dict(zip(num_tokens, alphas, strict=True)),
                        sample_tasks_uniformly=uniform, generator=_gen(7))
    ours_visible = np.stack([ours[m].eq(0).sum(1).numpy() for m in num_tokens], axis=1)
    rng = np.random.default_rng(7)
    naive_visible = np.array([[int((part == 0).sum()) for part in _naive_original(sizes, k, alphas, rng, uniform)]
                              for _ in range(n)])
    # Means within 0.25 tokens (standard error ~0.05) and empty-modality frequencies within 4 points.
    np.testing.assert_allclose(ours_visible.mean(0), naive_visible.mean(0), atol=0.25)
    np.testing.assert_allclose((ours_visible == 0).mean(0), (naive_visible == 0).mean(0), atol=0.04)
    assert ours_visible[:, 0].mean() < ours_visible[:, 2].mean()  # alpha 0.5 gets less than alpha 3


class _CountOps(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("uniform", [False, True])
def test_vectorised_over_samples(uniform: bool) -> None:
    # The number of torch calls must not grow with the batch: no Python loop over samples.
    counts = []
    for batch in (2, 64):
        with _CountOps() as mode:
            sample_masks(THREE, batch, 8, sample_tasks_uniformly=uniform, generator=_gen(0))
        counts.append(mode.calls)
    assert counts[0] == counts[1] > 0


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="num_encoded_tokens"):
        sample_masks(THREE, 2, 49)
    with pytest.raises(ValueError, match="alphas"):
        sample_masks(THREE, 2, 8, alphas={"rbg": 1.0})
    with pytest.raises(ValueError, match="alphas"):
        sample_masks(THREE, 2, 8, alphas=0.0)


@st.composite
def _equal_k_masks(draw):
    sizes = draw(st.lists(st.integers(1, 10), min_size=1, max_size=3))
    total, batch = sum(sizes), draw(st.integers(1, 4))
    k = draw(st.integers(0, total))
    rows = [draw(st.permutations([0] * k + [1] * (total - k))) for _ in range(batch)]
    mask = torch.tensor(rows, dtype=torch.int64).reshape(batch, total)
    return {f"m{i}": part for i, part in enumerate(mask.split(sizes, dim=1))}, mask, k


@settings(max_examples=60, deadline=None)
@given(_equal_k_masks())
def test_masks_to_ids(case) -> None:
    masks, mask_BN, k = case
    ids_keep, ids_restore = masks_to_ids(masks, list(masks))
    assert ids_keep.shape == (mask_BN.shape[0], k)
    for b in range(mask_BN.shape[0]):
        visible = torch.nonzero(mask_BN[b] == 0).flatten()
        masked = torch.nonzero(mask_BN[b] == 1).flatten()
        assert torch.equal(ids_keep[b], visible)  # ascending index order
        shuffle = torch.cat([visible, masked])
        assert torch.equal(ids_restore[b], torch.argsort(shuffle))


def test_masks_to_ids_rejects_disagreeing_samples() -> None:
    masks = {"a": torch.tensor([[0, 0, 1], [0, 1, 1]])}
    with pytest.raises(ValueError, match="same number of visible"):
        masks_to_ids(masks, ["a"])
    with pytest.raises(ValueError, match="no mask"):
        masks_to_ids(masks, ["a", "b"])


def test_model_honours_explicit_masks() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", image_size=32, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                      decoder_num_heads=2)
    model = build_model(cfg, inputs=["rgb", "depth", "semseg"], outputs=["rgb", "semseg"]).eval()
    # 2x2 token grid; sample 0 hides rgb tokens 1, 2 and semseg token 0, sample 1 hides all rgb.
    masks = {"rgb": torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]]), "depth": torch.tensor([[1, 1, 0, 1], [0, 0, 1, 1]]),
             "semseg": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 1]])}
    inputs = {"rgb": torch.randn(2, 3, 32, 32), "depth": torch.randn(2, 1, 32, 32),
              "semseg": torch.randint(0, 133, (2, 8, 8))}
    with torch.no_grad():
        tokens, _, _ = model.forward_encoder(inputs, masks)
        preds, _ = model(inputs, masks)
        changed = {k: v.clone() for k, v in inputs.items()}
        changed["rgb"][0, :, 0:16, 16:32] += 3.0  # rgb token 1 of sample 0: masked
        changed["rgb"][1] = torch.randn(3, 32, 32)  # all rgb of sample 1: masked
        changed["semseg"][0, 0:4, 0:4] = (changed["semseg"][0, 0:4, 0:4] + 1) % 133  # semseg token 0: masked
        tokens2, _, _ = model.forward_encoder(changed, masks)
        preds2, _ = model(changed, masks)
        assert torch.equal(tokens, tokens2)
        for head in preds:
            assert torch.equal(preds[head], preds2[head])
        changed["rgb"][0, :, 0:16, 0:16] += 3.0  # rgb token 0 of sample 0: visible
        tokens3, _, _ = model.forward_encoder(changed, masks)
    assert not torch.allclose(tokens[0], tokens3[0])
    assert torch.equal(tokens[1], tokens3[1])
