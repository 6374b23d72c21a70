"""Approximate likelihood matching (ALM; Minixhofer et al., 2025): cross-tokenizer distillation
on chunks of text that both tokenizations cover exactly (see `llmkd.data.alignment`).

Per chunk, l_T and l_S are the summed log-likelihoods of the chunk's actual tokens under the
teacher and the student. Both are probabilities of the *same text*, so they are comparable even
though the tokens differ. With a = exp(l_T / tau) and b = exp(l_S / tau) the loss is the
binarised cross-entropy -[a log b + (1 - a) log(1 - b)], minimised at b = a.
"""
from __future__ import annotations

import math

import torch

from llmkd.losses.divergences import compute_dtype, reduce

# b is capped at exp(-_EPS) inside log(1 - b) only, so a student that puts probability ~1 on a
# chunk gives a finite loss instead of -inf / nan. The cap passes the gradient straight through
# (evaluated at the cap): d loss / d x_S = (b - a) / (1 - b) keeps its sign, so a student more
# confident than the teacher is still pushed down (a zero gradient there left -a, pushing it up).
_EPS = 1e-6


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler's switch at -log 2)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def alm_loss(
    teacher_chunk_logp: torch.Tensor,
    student_chunk_logp: torch.Tensor,
    *,
    tau: float = 100.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Binarised cross-entropy between chunk likelihoods, per chunk then reduced.

    Inputs are per-chunk summed log-likelihoods of the same shape; the teacher side gets no
    gradient. "mean" divides by the unmasked chunks (or by `num_items`, the accumulated batch's
    chunk count), "sum" sums them, "none" returns the per-chunk values.
    """
    if not tau > 0:
        raise ValueError(f"method.tau={tau} must be > 0 (tokenkit's default is 100)")
    if teacher_chunk_logp.shape != student_chunk_logp.shape:
        raise ValueError(f"teacher chunk log-likelihoods {tuple(teacher_chunk_logp.shape)} and student "
                         f"{tuple(student_chunk_logp.shape)} differ; both must be laid out per chunk")
    dtype = compute_dtype(student_chunk_logp)
    # log-likelihoods are <= 0; rounding can push a sum of zeros slightly above
    x_t = (teacher_chunk_logp.detach().to(dtype) / tau).clamp(max=0.0)
    x_s = (student_chunk_logp.to(dtype) / tau).clamp(max=0.0)
    a = x_t.exp()
    x_cap = x_s + (x_s.clamp(max=-_EPS) - x_s).detach()   # value capped, gradient straight through
    values = -(a * x_s + (1.0 - a) * log1mexp(x_cap))
    return reduce(values, mask, reduction, num_items)


def chunk_sums(token_logp: torch.Tensor, chunk_index: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """Segment sums: (B, S) per-token log-likelihoods -> (B, num_chunks) per-chunk sums.

    `chunk_index[b, s]` is the chunk token s belongs to, or -1 for tokens in no chunk (prompt,
    padding, template). Gradients flow back to every token of its chunk.
    """
    if token_logp.shape != chunk_index.shape:
        raise ValueError(f"token log-likelihoods {tuple(token_logp.shape)} and chunk index "
                         f"{tuple(chunk_index.shape)} must have the same shape")
    inside = chunk_index >= 0
    values = torch.where(inside, token_logp, torch.zeros((), dtype=token_logp.dtype, device=token_logp.device))
    out = torch.zeros(token_logp.shape[0], num_chunks, dtype=token_logp.dtype, device=token_logp.device)
    return out.scatter_add(1, chunk_index.clamp(min=0), values)


def boundary_logp(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log sum_{v in ids} softmax(logits)_v over the last dim: the log-probability that the next
    token is one of `ids` (debiased ALM: the tokens that start a new word). (..., V) -> (...)."""
    x = logits.to(compute_dtype(logits))
    return x.index_select(-1, ids).logsumexp(-1) - x.logsumexp(-1)
