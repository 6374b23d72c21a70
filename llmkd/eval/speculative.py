"""Speculative-decoding quality of a draft (student) for a target (teacher), analytically.

With draft distribution q and target p at one position, speculative sampling accepts the drafted
token with probability β = Σ_v min(p_v, q_v) = 1 - TVD(p, q) (Leviathan et al., 2023). The
expected acceptance α = E[β] over positions, and with draft length γ the expected number of
tokens produced per target call (block efficiency) is τ = (1 - α^(γ+1)) / (1 - α).
"""
from __future__ import annotations

import torch


def acceptance_rate(target_probs: torch.Tensor, draft_probs: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """α = mean over (unmasked) positions of Σ_v min(p, q); inputs (..., V), mask (...).

    Returns a 0-dim tensor (`float(...)` for a number); NaN when every position is masked.
    """
    if target_probs.shape != draft_probs.shape:
        raise ValueError(f"target_probs {tuple(target_probs.shape)} and draft_probs "
                         f"{tuple(draft_probs.shape)} must have the same shape (..., V)")
    beta = torch.minimum(target_probs, draft_probs).sum(-1)
    if mask is None:
        return beta.mean()
    if mask.shape != beta.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match the positions {tuple(beta.shape)}")
    mask = mask.to(beta.dtype)
    return (beta * mask).sum() / mask.sum()


def block_efficiency(alpha: float, gamma: int) -> float:
    """τ = (1 - α^(γ+1)) / (1 - α): expected tokens per target forward with γ drafted tokens.

    Computed as the geometric sum Σ_{i=0..γ} α^i, which equals the closed form, is exact at
    α = 1 (τ = γ + 1) and has no cancellation near it.
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1]")
    if int(gamma) != gamma or gamma < 0:
        raise ValueError(f"gamma={gamma} must be a non-negative integer (draft length)")
    return sum(alpha ** i for i in range(int(gamma) + 1))
