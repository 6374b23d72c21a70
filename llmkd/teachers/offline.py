"""An offline teacher: what `llmkd generate` stored with each row, top-k log-probs or (with
`targets: hidden`) the teacher's final hidden states, read through its stored output head."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmkd.teachers.base import Teacher

if TYPE_CHECKING:
    import torch

    from llmkd.models.output import HeadOutput, TeacherTargets


class Offline(Teacher):
    kind = "offline"

    def __init__(self, *, name: str = "teacher", head: tuple[Any, str] | None = None) -> None:
        # head: (the stored teacher LMHead, the states' dtype name) for a targets=hidden dir
        self.name, self.head = name, head

    def targets(self, batch: dict[str, torch.Tensor], *, hidden: bool, vocab: int | None) -> TeacherTargets:
        from llmkd.models.output import TeacherTargets

        if self.head is not None:   # exact full-vocabulary targets: stored states x stored head
            return TeacherTargets(output=offline_hidden(batch, *self.head))
        if "teacher_topk_ids" not in batch:
            raise ValueError("model.teacher_mode=offline but the data has no teacher_topk_ids column; "
                             "point data.path at an `llmkd generate` output made with topk > 0")
        return TeacherTargets(topk_ids=batch["teacher_topk_ids"], topk_logprobs=batch["teacher_topk_logprobs"])


def offline_hidden(batch: dict[str, torch.Tensor], head: Any, dtype: str) -> HeadOutput:
    """The stored teacher hidden states of a batch with the stored head, on the batch's device."""
    import torch

    from llmkd.data.hidden import COLUMN

    if COLUMN not in batch:
        raise ValueError("model.teacher_mode=offline with a teacher head but the data has no "
                         f"{COLUMN} column; point data.path at an `llmkd generate` dir made with "
                         "targets=hidden")
    return head_output(batch[COLUMN].view(getattr(torch, dtype)), head)


def head_output(states: torch.Tensor, head: Any) -> HeadOutput:
    """Teacher hidden states (stored or served) with the teacher's head, on the states' device:
    the chunked loss then applies the head a chunk at a time (exact full-vocabulary targets)."""
    from llmkd.models.output import HeadOutput

    if head.weight.device != states.device:
        head.weight = head.weight.to(states.device)
        head.bias = None if head.bias is None else head.bias.to(states.device)
    # in the head's dtype: (B, S, H) is small, and full-logits paths (ce_weight > 0) need one dtype
    return HeadOutput(hidden=states.to(head.weight.dtype), head=head)
