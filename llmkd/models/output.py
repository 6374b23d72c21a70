"""What a model's head returns for distillation, and what a teacher contributes to a batch. Torch-free at import, like the method protocol
that passes it around (configs validate before any model library loads)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from llmkd.models.head import LMHead


@dataclass
class HeadOutput:
    """A model's output for distillation: full logits, or final hidden states + its lm_head
    (the chunked loss applies the head itself so (B, S, V) logits are never materialised)."""

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    head: LMHead | None = None


@dataclass
class TeacherTargets:
    """What the teacher contributes to a batch: live output, or offline top-k log-probs."""

    output: HeadOutput | None = None
    topk_ids: torch.Tensor | None = None        # (B, S, k) aligned with labels
    topk_logprobs: torch.Tensor | None = None
