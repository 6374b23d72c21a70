"""Teachers: one interface for the three places a teacher's targets come from.

A `Teacher` turns a batch into the targets a method's loss reads (`TeacherTargets`: a live
model's full logits, or its hidden states + lm_head; or top-k ids / log-probs whose missing mass
the sparse loss puts in a tail bucket), whatever its kind:

- `live`: a model in this process (`llmkd.teachers.live.Live`);
- `offline`: top-k columns `llmkd generate` wrote into the rows (`llmkd.teachers.offline.Offline`);
- `served`: top-k or final hidden states from a vLLM server (`llmkd.teachers.served.Served`, over
  `llmkd.teacher_server`).

What a method can use is declared once, in its Params (`MethodParams.unsupported_teachers`), and
checked by `check_teacher_kind` at config time (before weights load) and again on attach.
Several teachers at once are a `TeacherSet` (multi-teacher distillation, `llmkd.methods.mix`).
This module imports no model library: configs validate without torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from llmkd.methods.base import MethodParams
    from llmkd.models.output import TeacherTargets

KINDS = ("live", "offline", "served")


class Teacher:
    """Something that, given a batch, yields the teacher's targets for it."""

    kind: ClassVar[str]
    name: str = "teacher"
    model: PreTrainedModel | None = None      # live only: the model (placement, sampling, head checks)
    offload: str | None = None                # live only: "cpu" keeps it off the device between uses

    def targets(self, batch: dict[str, torch.Tensor], *, hidden: bool, vocab: int | None) -> TeacherTargets:
        """The targets for `batch` (student token ids; `hidden`: keep hidden states + head)."""
        raise NotImplementedError

    def check(self, student_tokenizer: PreTrainedTokenizerBase | None) -> None:
        """Checks that need the teacher itself, once before training (a server's tokenizer)."""

    def members(self) -> list[Teacher]:
        """The single teachers behind this one (itself, or a set's members)."""
        return [self]


def check_teacher_kind(params: MethodParams, kind: str, name: str | None = None) -> None:
    """Raise the method's own one-line reason when its configuration cannot use a `kind` teacher."""
    why = params.unsupported_teachers().get(kind)
    if why:
        raise ValueError(why if name is None else f"config: model.teachers.{name} ({kind}): "
                         + why.removeprefix("config: "))


def resolve(targets: TeacherTargets) -> TeacherTargets:
    """Targets still on the way (a server's answer) as plain top-k targets on the batch's device."""
    wait = getattr(targets, "wait", None)
    return wait() if wait is not None else targets


class TeacherSet(Teacher):
    """Several named teachers: `route` sends each row to its source's teacher, `mean` scores every
    row with the weighted average of the teachers' distributions (`llmkd.methods.mix`)."""

    kind = "set"

    def __init__(self, teachers: dict[str, Teacher], *, mix: str = "route",
                 weights: dict[str, float] | None = None) -> None:
        for name, t in teachers.items():
            t.name = name
        self.teachers = teachers
        self.mix = mix
        self.weights = weights or {name: 1.0 for name in teachers}

    def members(self) -> list[Teacher]:
        return list(self.teachers.values())
