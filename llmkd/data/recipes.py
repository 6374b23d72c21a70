"""Data recipes: a small YAML file that says where examples come from and how to phrase them.

A recipe turns any source (reasoning_gym task, local json/jsonl/parquet, hub dataset id) into a
`datasets.Dataset` with the columns every later stage relies on:
`id` (stable string), `prompt` (the user message), `answer` (gold answer string).
`datasets` is imported only when rows load: the config validation reads recipes without it.
"""
from __future__ import annotations

import difflib
import hashlib
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from llmkd.data.answers import KINDS as ANSWER_KINDS

if TYPE_CHECKING:
    from datasets import Dataset

RECIPE_DIR = Path(__file__).resolve().parents[2] / "data_recipes"
SOURCES = ("reasoning_gym", "local", "hub")
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _letter_choices(row: dict, choices: str) -> str:
    """Format multiple-choice options as '(A) text' lines (ARC's {text, label} dicts or lists)."""
    opts = row[choices]
    if isinstance(opts, dict):
        labels, texts = opts.get("label"), opts.get("text")
    else:
        labels, texts = [chr(ord("A") + i) for i in range(len(opts))], list(opts)
    return "\n".join(f"({lab}) {txt}" for lab, txt in zip(labels, texts))


# Answer transforms: the raw gold field -> the answer string `is_correct` compares against.
ANSWER_TRANSFORMS: dict[str, Callable[[Any], str]] = {
    "none": lambda a: str(a).strip(),
    "after_hashes": lambda a: str(a).split("####")[-1].strip().replace(",", ""),  # GSM8K
    "yesno": lambda a: ("yes" if a else "no") if isinstance(a, bool) else str(a).strip().lower(),
    "number": lambda a: (f"{float(a):g}" if str(a).strip() else ""),
    "strip_parens": lambda a: str(a).strip().strip("()"),
}


@dataclass
class Recipe:
    """One dataset recipe. Unknown keys in the YAML are rejected with the nearest valid one."""

    name: str
    source: str = "reasoning_gym"
    task: str | None = None                 # reasoning_gym dataset name
    task_kwargs: dict = field(default_factory=dict)
    hub_id: str | None = None
    hub_config: str | None = None
    split: str = "test"
    path: str | None = None                 # local file/dir; overrides hub_id when set
    prompt_template: str = "{question}"     # str.format over the source row (+ {choices})
    choices_field: str | None = None
    answer_field: str = "answer"
    answer_transform: str = "none"
    answer_kind: str = "exact"              # numeric | choice | yesno | exact
    response_template: str = "The answer is {answer}."
    system_prompt: str | None = None
    fewshot: list = field(default_factory=list)   # [{question, rationale, answer}] for CoT
    description: str = ""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"recipe {self.name}: source={self.source!r} is unknown; use one of {SOURCES}")
        if self.answer_transform not in ANSWER_TRANSFORMS:
            raise ValueError(f"recipe {self.name}: answer_transform={self.answer_transform!r} is unknown; "
                             f"use one of {sorted(ANSWER_TRANSFORMS)}")
        if self.answer_kind not in ANSWER_KINDS:
            raise ValueError(f"recipe {self.name}: answer_kind={self.answer_kind!r} is unknown; "
                             f"use one of {ANSWER_KINDS}")
        if self.source == "reasoning_gym" and not self.task:
            raise ValueError(f"recipe {self.name}: source reasoning_gym needs `task` (e.g. gsm_symbolic)")
        if self.source == "hub" and not (self.hub_id or self.path):
            raise ValueError(f"recipe {self.name}: source hub needs `hub_id` (or a local `path` override)")
        if self.source == "local" and not self.path:
            raise ValueError(f"recipe {self.name}: source local needs `path` (json/jsonl/parquet/csv)")

    # -- loading -----------------------------------------------------------------------------
    def _rows(self, size: int | None, seed: int) -> Dataset:
        from datasets import Dataset, load_dataset

        if self.path:   # a local override wins over any source (how hub recipes are tested)
            return _load_local(self.path, self.split)
        if self.source == "reasoning_gym":
            import reasoning_gym

            n = size or 1000
            ds = reasoning_gym.create_dataset(self.task, size=n, seed=seed, **self.task_kwargs)
            return Dataset.from_list([{"question": e["question"], "answer": e["answer"]} for e in ds])
        return load_dataset(self.hub_id, self.hub_config, split=self.split)

    def load(self, size: int | None = None, *, seed: int = 0, offset: int = 0) -> Dataset:
        """Rows [offset, offset + size) as (id, prompt, answer) plus the source columns."""
        raw = self._rows(None if size is None else size + offset, seed)
        missing = sorted({k for k in _template_keys(self.prompt_template) if k != "choices"}
                         .union({self.answer_field}) - set(raw.column_names))
        if missing:
            raise ValueError(
                f"recipe {self.name}: dataset columns {raw.column_names} lack {missing} needed by "
                "prompt_template/answer_field; fix the recipe fields or the data file")
        end = len(raw) if size is None else min(len(raw), offset + size)
        if offset >= end:
            raise ValueError(f"recipe {self.name}: offset={offset} leaves no rows (the data has "
                             f"{len(raw)}); use fewer training rows or more data")
        raw = raw.select(range(offset, end))
        transform = ANSWER_TRANSFORMS[self.answer_transform]

        def fmt(row: dict, idx: int) -> dict:
            extra = {"choices": _letter_choices(row, self.choices_field)} if self.choices_field else {}
            prompt = self.prompt_template.format(**{**row, **extra})   # ARC names its column "choices"
            key = hashlib.sha1(f"{self.name}|{seed}|{prompt}".encode()).hexdigest()[:16]
            return {"id": f"{self.name}-{offset + idx}-{key}", "prompt": prompt,
                    "answer": transform(row[self.answer_field])}

        return raw.map(fmt, with_indices=True, desc=f"recipe {self.name}")

    def load_split(self, num_train: int, num_eval: int, *, seed: int = 0,
                   allow_fewer: bool = False) -> tuple[Dataset, Dataset]:
        """Training rows [0, n_train) and the held-out rows after them. A file or hub dataset
        with fewer rows than asked fails, saying what exists (see `plan_split`)."""
        available = num_train + num_eval
        if self.path or self.source != "reasoning_gym":     # reasoning_gym generates any number
            available = len(self._rows(None, seed))
        source = f"recipe {self.name}" + (f" (data.path={self.path!r})" if self.path else "")
        n_train, n_eval = plan_split(available, num_train, num_eval, allow_fewer=allow_fewer,
                                     source=source, unit="rows")
        return self.load(n_train, seed=seed), self.load(n_eval, seed=seed, offset=n_train)

    def gold_response(self, answer: str) -> str:
        return self.response_template.format(answer=answer)


def _template_keys(template: str) -> set[str]:
    import string

    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def plan_split(available: int, num_train: int, num_eval: int, *, allow_fewer: bool, source: str,
               unit: str = "rows") -> tuple[int, int]:
    """(train, held-out) sizes from `available` rows or prompts: as asked when they exist.
    Otherwise fail, saying what exists and what was asked, unless data.allow_fewer: then hold
    out a fifth (at most num_eval, at least 1) and train on the rest (at most num_train)."""
    if available >= num_train + num_eval:
        return num_train, num_eval
    n_eval = min(num_eval, max(1, available // 5))
    n_train = min(num_train, available - n_eval)
    if not allow_fewer or n_train < 1:
        fewer = (f", or set data.allow_fewer=true to train on {n_train} and hold out {n_eval}"
                 if n_train >= 1 else "")
        raise ValueError(f"data: {source} has {available} {unit} but data.num_train={num_train} + "
                         f"data.num_eval={num_eval} = {num_train + num_eval} were asked; lower "
                         f"data.num_train / data.num_eval{fewer}")
    print(f"llmkd: data.allow_fewer: {source} has {available} {unit}; training on {n_train} and "
          f"holding out {n_eval} (asked {num_train} + {num_eval})", file=sys.stderr)
    return n_train, n_eval


def _load_local(path: str, split: str) -> Dataset:
    from datasets import load_dataset

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data path {str(p)!r} does not exist; point `path` at a json/jsonl/"
                                "parquet/csv file or a directory of them")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in LOCAL_FORMATS)
        if not files:
            raise FileNotFoundError(f"data dir {str(p)!r} holds no json/jsonl/parquet/csv files")
    else:
        files = [p]
    fmt = LOCAL_FORMATS.get(files[0].suffix)
    if fmt is None:
        raise ValueError(f"data file {str(p)!r}: unsupported suffix; use one of {sorted(LOCAL_FORMATS)}")
    empty = [f for f in files if f.stat().st_size < 4096 and not f.read_bytes().strip()]
    if empty:
        raise ValueError(f"data file {str(empty[0])!r} is empty; give it one example per row (jsonl: one "
                         "JSON object per line)")
    return load_dataset(fmt, data_files=[str(f) for f in files], split="train")


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str, **overrides: Any) -> Recipe:
    """A recipe by name (data_recipes/NAME.yaml) or by YAML path; `overrides` win (e.g. path=...)."""
    p = Path(name_or_path)
    if not (p.suffix in (".yaml", ".yml") and p.exists()):
        p = RECIPE_DIR / f"{name_or_path}.yaml"
        if not p.exists():
            names = available_recipes()
            near = difflib.get_close_matches(str(name_or_path), names, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"recipe {name_or_path!r} not found.{hint} Available: {', '.join(names)}")
    raw = yaml.safe_load(p.read_text()) or {}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    raw.setdefault("name", p.stem)
    valid = [f.name for f in fields(Recipe)]
    for key in raw:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"recipe {p}: unknown key {key!r}{hint}")
    return Recipe(**raw)
