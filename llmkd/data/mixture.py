"""A data mixture: several sources (recipes or generated dirs), each routed to a named teacher.

`data.mixture` is a list of sources, each a small `data` section (recipe / path / num_train /
num_eval / ...) plus `teacher: NAME`; the keys it does not set come from the `data` section
(max_length, seed, response, allow_fewer). Rows carry their teacher's name in a `teacher` column,
which `llmkd.methods.mix` routes on. Without a mixture the `data` section is the one source.
A generated dir of several teachers (`llmkd generate` with a mixture) already has that column:
its rows keep their teachers (`split_sources`), or a source's `teacher: NAME` takes that
teacher's rows only.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkd.validation import check_keys, coerce

if TYPE_CHECKING:
    from datasets import Dataset

TEACHER_COLUMN = "teacher"
SOURCE_KEYS = ("recipe", "path", "num_train", "num_eval", "seed", "response", "allow_fewer", "teacher")


def sources(data: Any) -> list[tuple[str | None, Any]]:
    """[(teacher name or None, a data section for that source)] of a `DataSpec`."""
    if not data.mixture:
        return [(None, data)]
    if data.recipe is not None or data.path is not None:
        raise ValueError("config: data.mixture and data.recipe / data.path are both set; give each "
                         "source its recipe or path inside data.mixture, and drop data.recipe / data.path")
    out = []
    for where, teacher, entry in mixture_entries("data.mixture", data.mixture, SOURCE_KEYS):
        if teacher is not None and not isinstance(teacher, str):
            raise ValueError(f"config: {where}teacher={teacher!r} must be a teacher's name (model.teachers)")
        out.append((teacher, dataclasses.replace(data, **{"mixture": None, "recipe": None, "path": None,
                                                           **coerce(where, entry, type(data))})))
    return out


def mixture_entries(field: str, mixture: Any, keys: tuple[str, ...]) -> list[tuple[str, Any, dict[str, Any]]]:
    """[(where, teacher, the entry's other keys)] of a mixture list (`data.mixture`, and the
    generate config's `mixture`): a list of mappings with known keys, one-line errors otherwise."""
    if not isinstance(mixture, list):
        raise ValueError(f"config: {field} must be a list of sources, found {mixture!r}; e.g. "
                         "[{recipe: arithmetic, teacher: math}]")
    out = []
    for i, entry in enumerate(mixture):
        where = f"{field}[{i}]."
        if not isinstance(entry, dict):
            raise ValueError(f"config: {where[:-1]} must be a mapping, found {entry!r}")
        check_keys(where, entry, list(keys))
        entry = dict(entry)
        out.append((where, entry.pop("teacher", None), entry))
    return out


def generated_teachers(path: str | None) -> list[str]:
    """The teachers of a generated dir written by several (its manifest's `teachers`); [] for a
    dir of one teacher, a recipe file or no path. Reads only the manifest (no shards, no torch)."""
    manifest = Path(path) / "manifest.json" if path else None
    if manifest is None or not manifest.is_file():
        return []
    try:
        return list(json.loads(manifest.read_text()).get("metadata", {}).get("teachers", {}))
    except (ValueError, AttributeError):
        return []


def split_sources(teacher: str | None, src: Any) -> list[tuple[str | None, str | None]]:
    """[(teacher, rows to take: that teacher's of a several-teacher dir, or None for all)] of one
    source: a several-teacher dir without `teacher:` is one part per teacher in it."""
    inside = generated_teachers(src.path)
    if not inside:
        return [(teacher, None)]
    if teacher is not None:
        return [(teacher, teacher)]
    return [(name, name) for name in inside]


def tag(rows: Dataset, teacher: str) -> Dataset:
    """The rows of one source, each marked with its teacher's name."""
    if TEACHER_COLUMN in rows.column_names:
        rows = rows.remove_columns(TEACHER_COLUMN)
    return rows.add_column(TEACHER_COLUMN, [teacher] * len(rows))


def concat(parts: list[Dataset]) -> Dataset:
    """The sources' rows in one dataset; a column one source lacks (e.g. an offline teacher's
    top-k) is None in its rows."""
    from datasets import concatenate_datasets

    columns = list(dict.fromkeys(c for p in parts for c in p.column_names))
    filled = []
    for p in parts:
        for c in columns:
            if c not in p.column_names:
                p = p.add_column(c, [None] * len(p))
        filled.append(p.select_columns(columns))
    return concatenate_datasets(filled)
