"""What a sampler is asked for, and where a sampled response ends: shared by the in-training
samplers (HF, vLLM) without either importing the other."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingSpec:
    """What a method asks of a sampler: the distribution and the length, nothing else."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int | None = None      # set by the trainer per (step, micro-batch, rank): resumable draws

def cut_at_eos(tokens: list[int], eos_ids: set[int], limit: int) -> list[int]:
    """Keep tokens up to and including the first eos (generate pads after it)."""
    out: list[int] = []
    for tok in tokens[:limit]:
        out.append(tok)
        if tok in eos_ids:
            break
    return out
