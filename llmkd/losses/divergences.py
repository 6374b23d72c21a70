"""Token-level divergences between teacher (p) and student (q) distributions.

Everything here is a pure function of tensors. The per-position core works on log-probabilities
so the dense, sparse (top-k + tail) and chunked forms all share one formula.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

# torch-free, so method configs check them before torch loads
from llmkd.validation import DIVERGENCES as KINDS, check_divergence as check_params  # noqa: F401

Kind = Literal["fkl", "rkl", "jsd", "tvd", "skew_fkl", "skew_rkl"]
Reduction = Literal["mean", "sum", "none"]

# log 0 is clamped to this so that 0 * (log 0 - log q) evaluates to 0 instead of nan,
# in values and in gradients (teacher tails can be exactly empty).
_LOG_FLOOR = -1e4


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half/bf16 inputs (softmax sums need it), the input's dtype if it is wider."""
    return torch.promote_types(x.dtype, torch.float32)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over the last dim, with 0 log 0 = 0."""
    logp = logp.clamp(min=_LOG_FLOOR)
    return (logp.exp() * (logp - logq.clamp(min=_LOG_FLOOR))).sum(-1)


def _log_mix(logp: torch.Tensor, logq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w p + (1 - w) q), computed in log space."""
    a = logp.clamp(min=_LOG_FLOOR) + math.log(w)
    b = logq.clamp(min=_LOG_FLOOR) + math.log1p(-w)
    return torch.logaddexp(a, b)


def per_token_divergence(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    kind: str = "fkl",
    *,
    beta: float = 0.5,
    lam: float = 0.1,
) -> torch.Tensor:
    """Divergence per position from normalised log-probs (..., V) -> (...).

    The convention matches TRL's GKD: jsd at beta=0 is exactly forward KL and at
    beta=1 exactly reverse KL; in between m = beta p + (1 - beta) q.
    """
    s, t = student_logp, teacher_logp
    if kind == "fkl":
        return _kl(t, s)
    if kind == "rkl":
        return _kl(s, t)
    if kind == "jsd":
        if beta == 0.0:
            return _kl(t, s)
        if beta == 1.0:
            return _kl(s, t)
        m = _log_mix(t, s, beta)
        return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)
    if kind == "tvd":
        return 0.5 * (t.exp() - s.exp()).abs().sum(-1)
    if kind == "skew_fkl":
        if lam == 1.0:
            return s.sum(-1) * 0.0  # identically 0, but still part of the graph
        return _kl(t, _log_mix(t, s, lam) if lam > 0 else s)
    if kind == "skew_rkl":
        if lam == 1.0:
            return s.sum(-1) * 0.0  # identically 0, but still part of the graph
        return _kl(s, _log_mix(s, t, lam) if lam > 0 else t)
    raise ValueError(f"divergence kind={kind!r} is unknown; use one of {', '.join(KINDS)}")


def reduce(
    values: torch.Tensor,
    mask: torch.Tensor | None,
    reduction: str,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-position values over unmasked positions.

    "mean" divides by the number of unmasked positions, or by `num_items` when given (the token
    count of the whole accumulated/global batch, so grad accumulation equals one big batch).
    """
    if reduction == "none":
        return values if mask is None else torch.where(mask.bool(), values, 0.0)
    if mask is not None:
        values = torch.where(mask.bool(), values, 0.0)  # where, not *: masked nan stays out
        count = mask.sum()
    else:
        count = torch.tensor(values.numel(), device=values.device)
    total = values.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        denom = count if num_items is None else num_items
        denom = torch.as_tensor(denom, device=total.device, dtype=total.dtype)
        return total / denom.clamp(min=1)
    raise ValueError(f"reduction={reduction!r} is unknown; use 'mean', 'sum' or 'none'")


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "fkl",
    *,
    beta: float = 0.5,
    lam: float = 0.1,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Divergence between tempered student and teacher distributions given logits (..., V).

    No T**2 factor is applied: the value is the divergence of the tempered distributions.
    """
    check_params(kind, beta, lam, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; token_kd needs one shared vocabulary "
            "(for different tokenizers use method.name=cross_tokenizer)"
        )
    dtype = compute_dtype(student_logits)
    s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    values = per_token_divergence(s, t, kind, beta=beta, lam=lam)
    return reduce(values, mask, reduction, num_items)
