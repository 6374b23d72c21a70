"""Tensor helpers the methods share (the loss mask, a head's full logits, the token KD
divergence), so no method imports another method's module for them. Imports torch: the
methods' Params (`llmkd.methods.params`) stay torch-free for config validation."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llmkd.losses import divergence
from llmkd.methods.base import HeadOutput, TeacherTargets
from llmkd.models.head import chunked_divergence_heads

if TYPE_CHECKING:
    from llmkd.methods.params import TokenKDParams


def shifted_mask(labels: torch.Tensor) -> torch.Tensor:
    """Position i predicts token i+1: the loss mask is labels[:, 1:] != -100."""
    return labels[:, 1:] != -100


def head_logits(out: HeadOutput) -> torch.Tensor:
    """Full logits of a `HeadOutput`, applying its head where only hidden states were kept."""
    return out.logits if out.logits is not None else out.head.logits(out.hidden)


def kd_divergence(student: HeadOutput, targets: TeacherTargets, labels: torch.Tensor,
                  p: "TokenKDParams", num_items: torch.Tensor | int | None) -> torch.Tensor:
    """The token KD divergence, dispatched on what the teacher and student provided: sparse
    top-k targets, both heads chunked (no full logits), or full logits on both sides."""
    mask = shifted_mask(labels)
    kw = dict(beta=p.beta, lam=p.lam, temperature=p.temperature, num_items=num_items)
    if targets.topk_ids is not None:
        from llmkd.losses import sparse_divergence

        logits = head_logits(student)
        return sparse_divergence(logits[:, :-1], targets.topk_ids[:, 1:], targets.topk_logprobs[:, 1:],
                                 p.kind, mask=mask, **kw)
    t = targets.output
    if student.logits is None and t.logits is None:
        return chunked_divergence_heads(student.hidden[:, :-1], student.head, t.hidden[:, :-1], t.head,
                                        p.kind, mask=mask, chunk_size=p.chunk_size, fused=p.fused, **kw)
    # one side fell back to full logits (a head the chunked loss cannot apply): both full
    return divergence(head_logits(student)[:, :-1], head_logits(t)[:, :-1], p.kind, mask=mask, **kw)
