"""A served teacher: top-k log-probs or final hidden states from a vLLM server
(`llmkd.teacher_server.ServedTeacher`), requested before the student's forward and collected in
the loss, so the two overlap. Hidden states meet the teacher's output head here, exactly as
stored ones do (`llmkd.teachers.offline.head_output`)."""
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
    """The server's answer, still on the way: `wait` (via `llmkd.teachers.resolve`) gives it."""

    pending: Future | None = None
    device: Any = None
    client: Any = None     # the ServedTeacher: its `wait` gives up once a stop signal is old
    head: Any = None       # hidden targets: the teacher's LMHead (model.teacher_head)

    def wait(self) -> TeacherTargets:
        if self.head is not None:
            from llmkd.teachers.offline import head_output

            states = self.client.wait(self.pending).to(self.device)
            return TeacherTargets(output=head_output(states, self.head))
        ids, logprobs = self.client.wait(self.pending)
        return TeacherTargets(topk_ids=ids.to(self.device), topk_logprobs=logprobs.to(self.device))


class Served(Teacher):
    kind = "served"

    def __init__(self, client: Any, *, name: str = "teacher", head: tuple[Any, str] | None = None) -> None:
        # client: a llmkd.teacher_server.ServedTeacher; head: (the teacher's LMHead, its file's
        # dtype name) when the server returns hidden states (model.teacher_targets=hidden)
        self.client, self.name, self.head = client, name, head

    def targets(self, batch: dict[str, torch.Tensor], *, hidden: bool, vocab: int | None) -> TeacherTargets:
        """Top-k or hidden states for the label positions, laid like the offline columns."""
        return ServedTargets(pending=self.client.submit(batch["input_ids"], batch["attention_mask"],
                                                        batch["labels"]), device=batch["labels"].device,
                             client=self.client, head=None if self.head is None else self.head[0])

    def check(self, student_tokenizer: PreTrainedTokenizerBase | None) -> None:
        self.client.check_tokenizer(student_tokenizer)
        if self.head is not None:
            self.client.check_hidden(student_tokenizer, self.head[0].weight.shape[-1])
