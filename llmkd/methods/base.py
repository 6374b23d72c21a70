"""The method protocol: every distillation method is a small plug-in on this interface.

Losses know tensors, methods know batches, the Trainer knows neither formula. The Trainer asks
the method for (1) where this batch's responses come from, (2) the teacher's targets for a batch,
(3) the loss given the student's output, and it saves/restores the method's state.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from transformers import PreTrainedModel

from llmkd.validation import check_keys, coerce

if TYPE_CHECKING:
    from datasets import Dataset

    from llmkd.models.head import LMHead


@dataclass
class MethodParams:
    """Base for a method's parameters: strict keys and types, validated on construction."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "MethodParams":
        check_keys("method.", raw, [f.name for f in dataclasses.fields(cls)] + ["name"])
        return cls(**coerce("method.", {k: v for k, v in raw.items() if k != "name"}, cls))


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


class Method:
    """Base class for methods. Subclasses set `name`, `Params` and implement `loss`."""

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    # True: `loss` divides its sums by `num_items` (grad accumulation = one big batch). False: it
    # returns a per-micro-batch mean (e.g. a weighted mean of per-task means, which no single
    # global count can give) and the Trainer divides it by the grad-accumulation steps.
    uses_num_items: ClassVar[bool] = True
    # The trainer sets this False where the lm_head weight cannot be read outside the model's
    # forward (DeepSpeed ZeRO-3 partitions it); `wants_hidden` must then say False.
    hidden_ok: bool = True

    def __init__(self, params: MethodParams, teacher: PreTrainedModel | None) -> None:
        self.params = params
        self.teacher = teacher

    # -- data -------------------------------------------------------------------------------
    @classmethod
    def build_examples(cls, params: MethodParams, rows: "Dataset") -> "Dataset":
        """Reshape (prompt, response, ...) rows before tokenization (e.g. one row -> two tasks).
        Rows may carry an integer `task` column; the collator passes it through."""
        return rows

    # -- what the trainer asks ---------------------------------------------------------------
    def response_source(self, rng: Any) -> str:
        """'dataset' (off-policy), 'student' (on-policy samples) or 'teacher' (sequence-level KD).
        `rng` has `.random()`; the trainer passes the `random` module, whose state checkpoints keep."""
        return "dataset"

    def wants_hidden(self) -> bool:
        """True when the loss applies the lm_head itself (chunked); the trainer then skips logits."""
        return False

    def teacher_targets(self, batch: dict[str, torch.Tensor]) -> TeacherTargets:
        raise NotImplementedError

    def loss(self, student: HeadOutput, targets: TeacherTargets, batch: dict[str, torch.Tensor],
             num_items: torch.Tensor | int | None) -> tuple[torch.Tensor, dict[str, float]]:
        """Return (loss, metrics to log). `num_items` = label tokens of the accumulated batch."""
        raise NotImplementedError

    def on_step_end(self, step: int, loss: float) -> None:
        """Update method state after an optimizer step (e.g. a schedule)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state saved by `state_dict` (called on resume_from_checkpoint)."""
