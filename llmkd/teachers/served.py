"""A served teacher: top-k log-probs from a vLLM server (`llmkd.teacher_server.ServedTeacher`),
requested before the student's forward and collected in the loss, so the two overlap."""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmkd.models.output import TeacherTargets
from llmkd.teachers.base import Teacher

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


@dataclass
class ServedTargets(TeacherTargets):
    """The server's top-k, still on the way: `wait` (via `llmkd.teachers.resolve`) gives them."""

    pending: Future | None = None
    device: Any = None
    client: Any = None     # the ServedTeacher: its `wait` gives up once a stop signal is old

    def wait(self) -> TeacherTargets:
        ids, logprobs = self.client.wait(self.pending)
        return TeacherTargets(topk_ids=ids.to(self.device), topk_logprobs=logprobs.to(self.device))


class Served(Teacher):
    kind = "served"

    def __init__(self, client: Any, *, name: str = "teacher") -> None:
        self.client, self.name = client, name     # a llmkd.teacher_server.ServedTeacher

    def targets(self, batch: dict[str, torch.Tensor], *, hidden: bool, vocab: int | None) -> TeacherTargets:
        """Top-k for the label positions, laid like the offline columns."""
        return ServedTargets(pending=self.client.submit(batch["input_ids"], batch["attention_mask"],
                                                        batch["labels"]), device=batch["labels"].device,
                              client=self.client)

    def check(self, student_tokenizer: PreTrainedTokenizerBase | None) -> None:
        self.client.check_tokenizer(student_tokenizer)
