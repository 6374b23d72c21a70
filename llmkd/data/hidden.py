"""Teacher hidden-state rows (`llmkd generate` with targets=hidden) in training batches.

A row's `teacher_hidden` holds the (T, H) 16-bit final hidden states of its T response tokens,
row j being the state whose logits give response token j. They travel as raw int16 bits; the
method views them as the dtype recorded with the teacher head (`llmkd.generation.hidden`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

COLUMN = "teacher_hidden"


def truncate(blob: bytes, total: int, keep: int) -> bytes:
    """The first `keep` of a row's `total` response states (data.max_length cut the response)."""
    return blob if keep >= total else blob[: len(blob) // total * keep]


def lay_hidden(rows: list[dict[str, Any]], width: int) -> torch.Tensor:
    """(B, width, H) int16 bits: row j of a response on the position that predicts its token j
    (prompt_len - 1 + j), zeros elsewhere (those positions are masked out of the loss)."""
    states = [np.frombuffer(r[COLUMN], dtype=np.int16) for r in rows]
    counts = [len(r["input_ids"]) - r["prompt_len"] for r in rows]
    size = next((len(s) // n for s, n in zip(states, counts) if n), 1)
    out = torch.zeros((len(rows), width, size), dtype=torch.int16)
    for i, (s, n, r) in enumerate(zip(states, counts, rows)):
        if n:
            start = r["prompt_len"] - 1
            out[i, start:start + n] = torch.from_numpy(s.copy()).view(n, size)
    return out
