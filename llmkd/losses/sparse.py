"""Divergence against a sparse teacher: top-k token ids + log-probs, the rest in one tail bucket.

Offline teachers (``llmkd generate``) store only the top-k log-probs per position. Comparing the
student on those k tokens alone would not be a divergence between two distributions; instead the
teacher's missing mass 1 - sum(exp(top-k)) becomes one extra "tail" bin, the student's
distribution is collapsed onto the same k + 1 bins (its tail = mass outside the top-k ids), and
the dense formula runs on those bins. With k = V this is exactly the dense divergence.

A confident teacher's top-k can sum to 1 in float32 although k < V. Its tail is then floored at
the resolution of the stored log-probs (the dtype's eps), never empty: an empty teacher bin
facing a non-empty student tail would charge reverse KL about q_tail * 1e4 (the log floor).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmkd.losses.divergences import check_params, compute_dtype, per_token_divergence, reduce

# Log-mass given to empty bins (padded ids, the tails when k = V). Far below divergences._LOG_FLOOR so
# that exp() of it is exactly 0 and the floor clamp cuts its gradient; finite so that a
# logsumexp over only empty bins is finite too (an all -inf logsumexp has a nan gradient).
_EMPTY = -3e4


def _teacher_tail(top_mass: torch.Tensor, full: torch.Tensor, eps: float) -> torch.Tensor:
    """log max(1 - exp(top_mass), eps): the teacher's tail log-mass; _EMPTY where ``full``.

    -expm1 keeps precision when the top-k mass is close to 1; clamping its input to log(1 - eps)
    keeps the log finite (no inf even in an unused branch) and the tail at least eps.
    """
    tail = torch.log(-torch.expm1(top_mass.clamp(max=math.log1p(-eps))))
    return tail.masked_fill(full, _EMPTY)


def sparse_divergence(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    kind: str = "fkl",
    *,
    beta: float = 0.5,
    lam: float = 0.1,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Divergence between the student (logits (..., V)) and a top-k teacher on k + 1 bins.

    ``teacher_topk_ids`` (..., k) are token ids, -1 marks padding (that entry is ignored);
    ``teacher_topk_logprobs`` (..., k) are the teacher's raw (temperature 1) log-probs.
    Temperature divides the student logits before the softmax, and the teacher bins' log-masses
    (top-k and tail) before renormalising them. That is exact when the top-k covers the
    vocabulary; otherwise it is an approximation (the tail's tokens would each be tempered on
    their own, which a single bin cannot represent). Reductions are as in ``divergence``.
    """
    check_params(kind, beta, lam, temperature)
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(
            f"teacher_topk_ids {tuple(teacher_topk_ids.shape)} and teacher_topk_logprobs "
            f"{tuple(teacher_topk_logprobs.shape)} must have the same shape (..., k)"
        )
    if teacher_topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher top-k positions {tuple(teacher_topk_ids.shape[:-1])} do not match student "
            f"logits positions {tuple(student_logits.shape[:-1])}"
        )
    if teacher_topk_ids.dtype.is_floating_point:
        raise ValueError(f"teacher_topk_ids must be integer ids, got {teacher_topk_ids.dtype}")
    vocab = student_logits.shape[-1]
    if teacher_topk_ids.numel() and int(teacher_topk_ids.max()) >= vocab:
        raise ValueError(
            f"teacher top-k id {int(teacher_topk_ids.max())} is outside the student vocabulary "
            f"of {vocab}; teacher and student must share one tokenizer (for different "
            "tokenizers use method.name=cross_tokenizer)"
        )

    dtype = compute_dtype(student_logits)
    valid = teacher_topk_ids >= 0
    # Padded ids point at an extra, always empty column V: gather/scatter never hit a real token.
    ids = torch.where(valid, teacher_topk_ids, vocab).long()
    # Both tails are empty when the valid ids cover the vocabulary (k = V): any leftover
    # teacher "tail" is then rounding error and must not be compared with an empty student tail.
    full = valid.sum(-1, keepdim=True) >= vocab

    student_logp = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    padded = F.pad(student_logp, (0, 1), value=_EMPTY)
    student_top = padded.gather(-1, ids)
    outside = padded.scatter(-1, ids, _EMPTY)
    student_tail = torch.logsumexp(outside, dim=-1, keepdim=True).masked_fill(full, _EMPTY)
    student_bins = torch.cat([student_top, student_tail], dim=-1)

    teacher_top = teacher_topk_logprobs.to(dtype).masked_fill(~valid, _EMPTY)
    top_mass = torch.logsumexp(teacher_top, dim=-1, keepdim=True)
    # tail floor: the coarser of the stored log-probs' and the compute dtype's resolution
    stored = teacher_topk_logprobs.dtype if teacher_topk_logprobs.is_floating_point() else dtype
    teacher_tail = _teacher_tail(top_mass, full, max(torch.finfo(stored).eps, torch.finfo(dtype).eps))
    teacher_bins = torch.cat([teacher_top, teacher_tail], dim=-1)
    # Empty bins stay empty after dividing by T (_EMPTY / T alone could carry mass for large T).
    empty = teacher_bins <= _EMPTY
    teacher_bins = F.log_softmax((teacher_bins / temperature).masked_fill(empty, _EMPTY), dim=-1)

    values = per_token_divergence(student_bins, teacher_bins, kind, beta=beta, lam=lam)
    return reduce(values, mask, reduction, num_items)
