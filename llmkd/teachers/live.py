"""A live teacher: a model in this process, run on the same batch as the student."""
from __future__ import annotations

from typing import TYPE_CHECKING

from llmkd.teachers.base import Teacher

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from llmkd.models.output import TeacherTargets


class Live(Teacher):
    """`offload="cpu"`: the weights stay in host memory and visit the device only for this
    teacher's forward (several teachers that do not fit on the device together). Its output is
    then full logits (the chunked loss would read a head that went back to the host)."""

    kind = "live"

    def __init__(self, model: PreTrainedModel, *, name: str = "teacher", offload: str | None = None) -> None:
        self.model, self.name, self.offload = model, name, offload

    def targets(self, batch: dict[str, torch.Tensor], *, hidden: bool, vocab: int | None) -> TeacherTargets:
        from llmkd.models.output import TeacherTargets
        from llmkd.models.head import run_head

        if self.offload is None:
            return TeacherTargets(output=run_head(self.model, batch, hidden=hidden, vocab=vocab))
        device = batch["input_ids"].device
        self.model.to(device)
        try:
            return TeacherTargets(output=run_head(self.model, batch, hidden=False, vocab=vocab))
        finally:
            self.model.to(self.offload)
