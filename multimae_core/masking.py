"""Multi-modal token masking: Dirichlet token budgets per sample, and masks -> gather indices.

Shapes: B batch, M modalities, N_t tokens of modality t, N = sum_t N_t, K visible (encoded) tokens per sample.
Masks are int64 `[B, N_t]` with 1 = masked, 0 = visible, as the original.

`sample_masks` follows the original's `generate_random_masks` (MultiMAE paper, section 3.1 "multi-modal masking";
spec section 3.1): per sample, a Dirichlet(alpha) share of the K-token budget goes to each modality, rounded; a random
permutation per modality picks the provisionally visible tokens; rounding surplus/deficit is then fixed by keeping
exactly K tokens of a random order that puts provisionally visible tokens first. Every draw comes from the explicit
`generator`, so masks can be drawn in DataLoader workers and reproduced from a seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["masks_to_ids", "sample_masks"]

_UNIFORM_TASK_EPS = 1e-5
"""Concentration given to unselected modalities when sampling task subsets uniformly (the original's eps)."""


def _alphas_M(alphas: float | Mapping[str, float], names: Sequence[str], device: torch.device | None) -> Tensor:
    if isinstance(alphas, Mapping):
        unknown = set(alphas) - set(names)
        if unknown:
            raise ValueError(f"masking.alphas: {sorted(unknown)} are not among the modalities {list(names)}")
        values = [float(alphas.get(n, 1.0)) for n in names]
    else:
        values = [float(alphas)] * len(names)
    if any(a <= 0 for a in values):
        raise ValueError("masking.alphas must be positive")
    # Built on the host and copied without blocking: a plain torch.tensor(..., device="cuda") waits for the copy.
    return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)


def _nonempty_subsets(num_modalities: int, device: torch.device | str | None) -> Tensor:
    """The 2^M - 1 non-empty binary subset vectors `[S, M]` in `itertools.product([0, 1], repeat=M)` order."""
    codes_S = torch.arange(1, 2**num_modalities, device=device)
    shifts_M = torch.arange(num_modalities - 1, -1, -1, device=device)
    return ((codes_S[:, None] >> shifts_M) & 1).float()


def sample_masks(num_tokens: Mapping[str, int], batch_size: int, num_encoded_tokens: int, *,
                 alphas: float | Mapping[str, float] = 1.0, sample_tasks_uniformly: bool = False,
                 generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Draw per-modality masks with exactly `num_encoded_tokens` visible tokens per sample.

    Args:
        num_tokens: tokens per modality, in concatenation order.
        batch_size: B.
        num_encoded_tokens: K, visible tokens per sample over all modalities (1 <= K <= N).
        alphas: Dirichlet concentration, one value or one per modality (missing names get 1.0).
        sample_tasks_uniformly: first pick one of the 2^M - 1 non-empty modality subsets uniformly per sample;
            modalities outside it get concentration 1e-5 (so almost never a visible token).
        generator: source of all randomness; must live on `device`.
        device: where the masks are built.

    Returns:
        `{modality: int64 [B, N_t]}`, 1 = masked.
    """
    names = list(num_tokens)
    sizes = [int(num_tokens[n]) for n in names]
    total = sum(sizes)
    if not names:
        raise ValueError("sample_masks needs at least one modality")
    if not 1 <= num_encoded_tokens <= total:
        raise ValueError(f"masking.num_encoded_tokens must be in [1, {total}], got {num_encoded_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    B, K = batch_size, num_encoded_tokens
    alpha_M = _alphas_M(alphas, names, device)

    if sample_tasks_uniformly:
        # Binary subset vectors in itertools.product order, all-zeros excluded (the original's sample_alphas).
        subsets_SM = _nonempty_subsets(len(names), device)
        choice_B = torch.randint(0, subsets_SM.shape[0], (B,), generator=generator, device=device)
        alpha_BM = subsets_SM[choice_B] * alpha_M + _UNIFORM_TASK_EPS
    else:
        alpha_BM = alpha_M.expand(B, -1).contiguous()
    # torch.distributions.Dirichlet takes no generator; _sample_dirichlet is what it calls underneath and does.
    share_BM = torch._sample_dirichlet(alpha_BM, generator=generator)
    # Rounding may give a total != K and a modality more tokens than it has; both are fixed below.
    keep_BM = (share_BM * K).round().long()

    provisional = []
    for t, n_t in enumerate(sizes):  # loop over modalities only; every op is batched over samples
        noise_BN = torch.rand(B, n_t, generator=generator, device=device)
        # perm[j] is a uniformly random rank for token j; the first keep[t] ranks are provisionally visible.
        perm_BN = noise_BN.argsort(dim=1)
        provisional.append((perm_BN >= keep_BM[:, t:t + 1]).long())
    mask_BN = torch.cat(provisional, dim=1)

    # Random order with provisionally visible tokens first (mask 0 + U[0,1) < mask 1 + U[0,1)); the first K of
    # it are kept. This drops random visible tokens on a surplus and promotes random masked ones on a deficit.
    noise_BN = torch.rand(B, total, generator=generator, device=device)
    ids_shuffle_BN = (mask_BN + noise_BN).argsort(dim=1)
    final_BN = torch.ones_like(mask_BN)
    final_BN.scatter_(1, ids_shuffle_BN[:, :K], 0)
    return dict(zip(names, final_BN.split(sizes, dim=1), strict=True))


def masks_to_ids(masks: Mapping[str, Tensor], order: Sequence[str], *, num_visible: int | None = None,
                 ) -> tuple[Tensor, Tensor]:
    """Gather indices for the encoder and decoders from per-modality masks.

    Args:
        num_visible: The visible-token count K when the caller knows it (masks from `sample_masks`): shapes are then
            static and nothing waits for the device; the count is still checked, by an asynchronous device assert.
            None counts it from the masks (one host sync on an accelerator) and checks it with a ValueError.

    Returns:
        ids_keep `[B, K]`: visible tokens of the concatenation in `order`, ascending (a stable argsort; the
        original's unstable sort gives the same set in arbitrary order, which changes outputs only by rounding).
        ids_restore `[B, N]`: inverse of the permutation "visible ascending, then masked ascending".

    Raises:
        ValueError: a modality in `order` has no mask, or samples disagree on K (the original silently encoded
        masked tokens in that case; see spec section 3.2).
    """
    missing = [n for n in order if n not in masks]
    if missing:
        raise ValueError(f"masks: no mask for modalities {missing} (have {sorted(masks)})")
    mask_BN = torch.cat([masks[n].to(torch.int64) for n in order], dim=1)
    visible_B = (mask_BN == 0).sum(dim=1)
    if num_visible is None:
        K = int(visible_B[0])
        if bool((visible_B != K).any()):
            raise ValueError(
                f"masks: every sample must have the same number of visible tokens, got {visible_B.tolist()}")
    else:
        K = num_visible
        if not 0 <= K <= mask_BN.shape[1]:
            raise ValueError(f"num_visible: {K} is not in [0, {mask_BN.shape[1]}]")
        torch._assert_async(visible_B.eq(K).all(), f"masks: every sample must have exactly {K} visible tokens")
    ids_shuffle_BN = torch.argsort(mask_BN, dim=1, stable=True)
    # Inverse permutation by scatter (same result as argsort(ids_shuffle), linear instead of N log N).
    ids_restore_BN = torch.empty_like(ids_shuffle_BN)
    ids_restore_BN.scatter_(1, ids_shuffle_BN, torch.arange(mask_BN.shape[1], device=mask_BN.device)
                            .expand_as(ids_shuffle_BN))
    return ids_shuffle_BN[:, :K], ids_restore_BN
