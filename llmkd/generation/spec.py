"""What a sampler is asked for, what it returns, and where a sampled response ends: shared by
the teacher backends (generate) and the in-training samplers (HF, vLLM) without any of them
importing another. No model library is imported here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample: the distribution and the length, nothing inherited from a checkpoint.

    `n` completions per prompt; `logprobs` = top-k entries of the raw (T=1) distribution kept
    per generated token (0 = none). `seed=None` draws unseeded (the trainer sets one per
    (step, micro-batch, rank) for resumable draws; the generate backends read None as 0).
    `temperature=0` is greedy.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int | None = None
    n: int = 1
    logprobs: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"sampling n={self.n}: need at least 1 completion per prompt")
        if self.temperature < 0:
            raise ValueError(f"sampling temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling top_p={self.top_p}: must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.logprobs < 0:
            raise ValueError(f"sampling logprobs={self.logprobs}: must be >= 0 (0 = none)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Completion:
    """One generated continuation; top-k lists are per generated token, k entries, best first."""

    token_ids: list[int]
    text: str
    finish_reason: str                       # "stop" (EOS/stop token) | "length"
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None


def eos_ids(tokenizer: Any, model: Any = None) -> set[int]:
    """Every id that ends a response: the tokenizer's eos and the checkpoint's generation_config
    eos (chat models list several, e.g. <|im_end|> and <|endoftext|>)."""
    ids: set[int] = set()
    for eos in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return ids


def cut_at_eos(tokens: list[int], eos_ids: set[int], limit: int) -> list[int]:
    """Keep tokens up to and including the first eos (generate pads after it)."""
    out: list[int] = []
    for tok in tokens[:limit]:
        out.append(tok)
        if tok in eos_ids:
            break
    return out
