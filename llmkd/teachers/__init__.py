"""Teachers: one interface (`Teacher`, in `llmkd.teachers.base`) for the three places a teacher's
targets come from -- live (`live.Live`), offline top-k columns (`offline.Offline`), a vLLM server
(`served.Served`) -- and several at once (`TeacherSet`). Imports no model library."""
from __future__ import annotations

from typing import Any

from llmkd.teachers.base import KINDS, Teacher, TeacherSet, check_teacher_kind, resolve
from llmkd.teachers.live import Live
from llmkd.teachers.offline import Offline

__all__ = ["KINDS", "Teacher", "TeacherSet", "as_teacher", "check_teacher_kind", "resolve"]


def as_teacher(teacher: Any) -> Teacher:
    """A `Teacher` from what callers hand the trainer: a Teacher, a model (live) or None (offline)."""
    if isinstance(teacher, Teacher):
        return teacher
    if teacher is None:
        return Offline()
    return Live(teacher)
