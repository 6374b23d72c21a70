"""An offline teacher: top-k log-probs that `llmkd generate` stored with each row."""
from __future__ import annotations

from typing import TYPE_CHECKING

from llmkd.teachers.base import Teacher

if TYPE_CHECKING:
    import torch

    from llmkd.models.output import TeacherTargets


class Offline(Teacher):
    kind = "offline"

    def __init__(self, *, name: str = "teacher") -> None:
        self.name = name

    def targets(self, batch: dict[str, torch.Tensor], *, hidden: bool, vocab: int | None) -> TeacherTargets:
        from llmkd.models.output import TeacherTargets

        if "teacher_topk_ids" not in batch:
            raise ValueError("model.teacher_mode=offline but the data has no teacher_topk_ids column; "
                             "point data.path at an `llmkd generate` output made with topk > 0")
        return TeacherTargets(topk_ids=batch["teacher_topk_ids"], topk_logprobs=batch["teacher_topk_logprobs"])
