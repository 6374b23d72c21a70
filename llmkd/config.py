"""DistillationConfig: `TrainingArguments` plus model / data / method sections, loaded from YAML.

Every TrainingArguments field keeps working at the top level of the YAML; the three sections are
validated strictly (unknown key -> nearest valid key, wrong type, missing path, bad method
parameter) before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments

from llmkd.validation import check_keys, coerce

DTYPES = ("float32", "bfloat16", "float16")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelSpec:
    """Which teacher and student to use, and how to load them."""

    teacher: str | None = None         # model dir, hub id, "embedded", or None with teacher_mode offline
    teacher_mode: str = "live"         # live: run the teacher; offline: top-k columns in the data
    student: str | None = None         # model dir / hub id; None -> derived from the teacher
    student_layers: Any = "every_other"  # derive: "every_other", a layer count or a list of indices
    teacher_dtype: str = "float32"
    student_dtype: str = "float32"
    lora: dict | None = None           # peft LoraConfig fields -> train a LoRA adapter
    gradient_checkpointing_teacher: bool = False


@dataclass
class DataSpec:
    """Where training/eval examples come from (a recipe, or a generated dataset dir)."""

    recipe: str | None = None          # data_recipes name or YAML path
    path: str | None = None            # local data override for the recipe, or `llmkd generate` output
    num_train: int = 256
    num_eval: int = 32
    seed: int = 0
    max_length: int = 512
    response: str = "gold"             # gold: recipe answer template; column name: use that column


@dataclass
class MethodSpec:
    """The method plug-in and its parameters (validated by the method's own Params dataclass)."""

    name: str = "token_kd"
    params: dict = field(default_factory=dict)


SECTIONS = {"model": ModelSpec, "data": DataSpec}


@dataclass
class DistillationConfig(TrainingArguments):
    """TrainingArguments + distillation sections. Build with `load_config` or directly."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    method: MethodSpec = field(default_factory=MethodSpec)
    overwrite_output_dir: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        for name in ("model", "data", "method"):
            d[name] = dataclasses.asdict(getattr(self, name))
        return d


# --- YAML loading and validation ------------------------------------------------------------
def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides (values parsed as YAML scalars) onto a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set method.beta=0.5")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def _check_model_path(name: str, value: str | None) -> None:
    if value is None or value == "embedded" or Path(value).expanduser().is_dir():
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    if HUB_ID.match(value) and not offline and not value.startswith((".", "/", "~")):
        return   # a hub id: resolved by from_pretrained
    raise ValueError(
        f"config: model.{name}={value!r} is not a model directory"
        + (" (and the hub is offline: HF_HUB_OFFLINE=1)" if HUB_ID.match(value) else "")
        + "; give a local directory with config.json + safetensors, or 'embedded' for the default teacher")


def validate_sections(cfg: DistillationConfig) -> None:
    """Semantic checks that need no model: paths, method params, output dir, combinations."""
    from llmkd.methods import get_method

    m = cfg.model
    if m.teacher_mode not in ("live", "offline"):
        raise ValueError(f"config: model.teacher_mode={m.teacher_mode!r}; use 'live' or 'offline'")
    if m.teacher_mode == "live" and m.teacher is None:
        raise ValueError("config: model.teacher is missing; set a model dir, 'embedded', or "
                         "model.teacher_mode=offline with a generated dataset in data.path")
    for name in ("teacher_dtype", "student_dtype"):
        if getattr(m, name) not in DTYPES:
            raise ValueError(f"config: model.{name}={getattr(m, name)!r} is unknown; use one of {DTYPES}")
    _check_model_path("teacher", m.teacher)
    _check_model_path("student", m.student)
    if m.student is None and m.teacher is None:
        raise ValueError("config: model.student is missing and there is no teacher to derive it from")
    if m.teacher_mode == "offline" and not cfg.data.path:
        raise ValueError("config: model.teacher_mode=offline needs data.path pointing at an "
                         "`llmkd generate` output directory (it holds the teacher top-k columns)")
    if cfg.data.recipe is None and cfg.data.path is None:
        raise ValueError("config: data.recipe (or data.path) is missing; e.g. data.recipe=arithmetic")
    if cfg.data.path and not Path(cfg.data.path).expanduser().exists():
        raise FileNotFoundError(f"config: data.path={cfg.data.path!r} does not exist")
    get_method(cfg.method.name).Params.from_dict(cfg.method.params)   # raises on bad params
    out = Path(cfg.output_dir)
    if (out.is_dir() and any(out.iterdir()) and not cfg.overwrite_output_dir
            and not cfg.resume_from_checkpoint):
        raise FileExistsError(
            f"config: output_dir={str(out)!r} exists and is not empty; set overwrite_output_dir=true, "
            "resume_from_checkpoint, or choose another output_dir (nothing was written)")


def config_from_dict(raw: dict) -> DistillationConfig:
    """Build and validate a DistillationConfig from a plain dict (what YAML gives)."""
    raw = dict(raw)
    ta_fields = {f.name: f for f in dataclasses.fields(DistillationConfig) if f.init}
    check_keys("", raw, list(ta_fields))
    kwargs: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        section = raw.pop(name, None) or {}
        if not isinstance(section, dict):
            raise ValueError(f"config: {name} must be a mapping, found {section!r}")
        check_keys(f"{name}.", section, [f.name for f in dataclasses.fields(cls)])
        kwargs[name] = cls(**coerce(f"{name}.", section, cls))
    method = raw.pop("method", None) or {"name": "token_kd"}
    if not isinstance(method, dict):
        raise ValueError(f"config: method must be a mapping, found {method!r}; "
                         f"e.g. method: {{name: {method}}}")
    method = dict(method)
    kwargs["method"] = MethodSpec(name=method.pop("name", "token_kd"), params=method)
    resume = raw.pop("resume_from_checkpoint", None)   # a path, or true = the last checkpoint
    raw = coerce("", raw, DistillationConfig)
    if resume not in (None, False):
        if resume is not True and not Path(str(resume)).is_dir():
            raise FileNotFoundError(f"config: resume_from_checkpoint={resume!r} is not a checkpoint "
                                    "directory; give checkpoint-N under output_dir, or true for the last one")
        raw["resume_from_checkpoint"] = resume if resume is True else str(resume)
    raw.setdefault("output_dir", "runs/distill")
    raw.setdefault("report_to", "none")
    raw.setdefault("remove_unused_columns", False)   # collator needs the raw columns
    cfg = DistillationConfig(**raw, **kwargs)
    validate_sections(cfg)
    return cfg


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML file (safe_load) whose top level is a mapping; clear errors otherwise."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {str(p)!r} does not exist")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{what} {str(p)!r}: top level must be a mapping of keys to values")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> DistillationConfig:
    """YAML (safe_load) + `--set` overrides -> validated DistillationConfig."""
    return config_from_dict(apply_overrides(read_yaml_mapping(path), overrides or []))
