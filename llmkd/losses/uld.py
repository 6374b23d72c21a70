"""Universal logit distillation (ULD; Boizard et al., 2024): a cross-tokenizer baseline.

Two vocabularies have no shared ids, so ULD compares the *shapes* of the distributions: both are
sorted in descending order, the shorter is padded with zeros, and the loss per aligned position
is the L1 distance sum_i |p_(i) - q_(i)| (the closed-form Wasserstein-1 bound the paper uses).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkd.losses.divergences import compute_dtype, reduce


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Sorted-probability L1 between student (..., V_s) and teacher (..., V_t) logits at the same
    aligned positions; vocab sizes may differ, the teacher gets no gradient. Reductions as in
    `divergence` ("mean" over unmasked positions or by `num_items`)."""
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must share every dim but the vocabulary "
                         "(one row per aligned position)")
    dtype = compute_dtype(student_logits)
    p_s = F.softmax(student_logits.to(dtype), dim=-1).sort(dim=-1, descending=True).values
    p_t = F.softmax(teacher_logits.detach().to(dtype), dim=-1).sort(dim=-1, descending=True).values
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = F.pad(p_s, (0, width - p_s.shape[-1]))
    p_t = F.pad(p_t, (0, width - p_t.shape[-1]))
    return reduce((p_s - p_t).abs().sum(-1), mask, reduction, num_items)
