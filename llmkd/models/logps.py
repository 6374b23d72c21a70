"""Log-likelihoods of given tokens from a model's output (full logits, or hidden states + its
head applied a chunk of rows at a time): what ALM and ULD compare across tokenizers."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from llmkd.models.head import LMHead
    from llmkd.models.output import HeadOutput


def _logp_rows(source: torch.Tensor, head: LMHead | None, b: torch.Tensor, j: torch.Tensor,
               target: torch.Tensor) -> torch.Tensor:
    """log p(target) from rows source[b, j]: hidden states through `head`, or logits as they are."""
    import torch

    x = source[b, j]
    logits = head.logits(x) if head is not None else x
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits.gather(-1, target[:, None])[:, 0] - logits.logsumexp(-1)


def token_logps(out: HeadOutput, ids: torch.Tensor, want: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(B, S): log p(ids[b, s] | ids[b, <s]) where `want` (positions >= 1), 0 elsewhere.

    Rows are taken `chunk_size` at a time; with a graph each piece is checkpointed (its logits
    are recomputed in backward), so no more than one piece of logits lives at once.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    want = want.clone()
    want[:, 0] = False            # nothing predicts the first token
    b, j = want.nonzero(as_tuple=True)
    target = ids[b, j]
    source, head = (out.logits, None) if out.logits is not None else (out.hidden, out.head)
    step = chunk_size if chunk_size > 0 else max(len(b), 1)
    grad = torch.is_grad_enabled() and (source.requires_grad or (head is not None and head.weight.requires_grad))
    pieces = []
    for lo in range(0, len(b), step):
        args = (source, head, b[lo:lo + step], j[lo:lo + step] - 1, target[lo:lo + step])
        pieces.append(checkpoint(_logp_rows, *args, use_reentrant=False) if grad else _logp_rows(*args))
    dtype = pieces[0].dtype if pieces else torch.float32
    flat = torch.cat(pieces) if pieces else torch.zeros(0, device=ids.device, dtype=dtype)
    return torch.zeros(ids.shape, dtype=dtype, device=ids.device).index_put((b, j), flat)


def chunk_logps(out: HeadOutput, ids: torch.Tensor, chunk_index: torch.Tensor, num_chunks: int,
                chunk_size: int) -> torch.Tensor:
    """(B, num_chunks): the summed log-likelihood of each chunk's tokens."""
    from llmkd.losses.alm import chunk_sums

    return chunk_sums(token_logps(out, ids, chunk_index >= 0, chunk_size), chunk_index, num_chunks)


def rows_at(out: HeadOutput, positions: torch.Tensor) -> torch.Tensor:
    """(B, C, V) logits at `positions` (B, C) (clamped to >= 0; padding is masked later)."""
    positions = positions.clamp(min=0)
    if out.logits is not None:
        return out.logits.gather(1, positions[..., None].expand(-1, -1, out.logits.shape[-1]))
    hidden = out.hidden.gather(1, positions[..., None].expand(-1, -1, out.hidden.shape[-1]))
    return out.head.logits(hidden)
