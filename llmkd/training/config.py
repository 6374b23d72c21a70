"""DistillationConfig: `TrainingArguments` plus model / data / method sections, loaded from YAML.

Every TrainingArguments field keeps working at the top level of the YAML; the three sections are
validated strictly (unknown key -> nearest valid key, wrong type, missing path, bad method
parameter) before any model is loaded.

Validation imports no model library: importing torch + transformers + peft costs ~10 s on a small
machine, and a typo should fail in well under a second. The top-level keys are checked against
TrainingArguments' fields read from transformers' installed source with `ast` (not imported);
method parameters come from `llmkd.methods.params` (torch-free); model dirs, tokenizers and the
output dir are checked from file headers (`llmkd.preflight`). Only `DistillationConfig` itself,
the real TrainingArguments subclass, imports transformers, on first use.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmkd.training import config_checks
from llmkd.training.outdir import check_not_an_input
from llmkd.training.schema import check_lora_keys, training_args_schema
from llmkd.validation import check_keys, coerce
from llmkd.yaml_reader import apply_overrides, read_yaml_mapping

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
    teacher_server: str | None = None  # http://host:port of a vLLM server with the teacher (llmkd serve-teacher)
    teacher_topk: int = 20             # teacher_server: top-k log-probs per position (the sparse loss's k)
    teacher_targets: str = "topk"      # teacher_server: topk | hidden (final hidden states, vLLM pooling runner)
    teacher_head: str | None = None    # teacher_targets=hidden: teacher_head.safetensors (llmkd serve-teacher writes it)
    teachers: dict | None = None       # several teachers: name -> {teacher | teacher_server | teacher_mode, ...}
    student_from: str | None = None    # with model.teachers: derive the student from this teacher
    teacher_timeout: float = 30.0      # teacher_server: seconds an attempt may take, plus ...
    teacher_timeout_per_token: float = 0.01   # ... this per token of the batch (then retries)
    teacher_wait: float = 0.0          # teacher_server: seconds to wait at start-up for a server still loading


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
    allow_fewer: bool = False          # data smaller than num_train + num_eval: train on what exists
    mixture: list | None = None        # several sources, each {recipe | path, num_train, ..., teacher: NAME}


@dataclass
class MethodSpec:
    """The method plug-in and its parameters (validated by the method's own Params dataclass)."""

    name: str = "token_kd"
    params: dict = field(default_factory=dict)
    teacher_mix: str = "route"         # several teachers: route (rows by source) | mean (weighted average)


@dataclass
class MonitorSpec:
    """A golden metric beside the proxy, and teacher-hacking detection (`llmkd.eval.monitor`)."""

    golden: str | None = None          # gold_nll | accuracy | oracle_kl; None: no monitor
    oracle: str | None = None          # oracle_kl: model dir (or "embedded") with the student's tokenizer
    num_prompts: int = 64              # accuracy: held-out prompts answered at each evaluation
    patience: int = 3                  # evaluations of proxy-better / golden-worse before flagging
    on_hacking: str = "warn"           # warn | stop (end training; the best checkpoint stays)
    max_new_tokens: int = 128          # accuracy: greedy answer length


SECTIONS = {"model": ModelSpec, "data": DataSpec, "monitor": MonitorSpec}
# top-level keys DistillationConfig adds to TrainingArguments
EXTRA_KEYS: dict[str, Any] = {"model": dict, "data": dict, "method": dict, "monitor": dict,
                              "overwrite_output_dir": bool, "allow_config_change": bool}


def __getattr__(name: str) -> Any:
    # DistillationConfig subclasses TrainingArguments: defined (transformers imported) on first use
    if name == "DistillationConfig":
        return _distillation_config()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=1)
def _distillation_config() -> type:
    from transformers import TrainingArguments

    @dataclass
    class DistillationConfig(TrainingArguments):
        """TrainingArguments + distillation sections. Build with `load_config` or directly."""

        model: ModelSpec = field(default_factory=ModelSpec)
        data: DataSpec = field(default_factory=DataSpec)
        method: MethodSpec = field(default_factory=MethodSpec)
        monitor: MonitorSpec = field(default_factory=MonitorSpec)
        overwrite_output_dir: bool = False   # start over in a non-empty output_dir (old checkpoints go)
        allow_config_change: bool = False    # resume although the training config differs from the checkpoint's

        def to_dict(self) -> dict[str, Any]:
            d = super().to_dict()
            for name in ("model", "data", "method", "monitor"):
                d[name] = dataclasses.asdict(getattr(self, name))
            return d

    DistillationConfig.__qualname__ = "DistillationConfig"   # importable (and picklable) by name
    return DistillationConfig


# --- validation ------------------------------------------------------------------------------
POSITIVE = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
NON_NEGATIVE = ("learning_rate", "weight_decay", "warmup_steps", "max_grad_norm", "dataloader_num_workers",
                "label_smoothing_factor")


def _check_training_values(top: dict[str, Any], choices: dict[str, tuple[str, ...]]) -> None:
    """Values TrainingArguments would reject late (or accept and fail on: a negative lr)."""
    for key, allowed in choices.items():
        value = top.get(key)
        if isinstance(value, str) and value not in allowed:
            near = difflib.get_close_matches(value, allowed, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"config: {key}={value!r} is unknown{hint} Use one of: {', '.join(allowed)}")
    for key in POSITIVE:
        if key in top and top[key] < 1:
            raise ValueError(f"config: {key}={top[key]} must be >= 1")
    for key in NON_NEGATIVE:
        if isinstance(top.get(key), (int, float)) and top[key] < 0:
            raise ValueError(f"config: {key}={top[key]} must be >= 0" +
                             ("; e.g. learning_rate: 2.0e-4" if key == "learning_rate" else ""))
    steps = top.get("max_steps")
    if steps is not None and (steps == 0 or steps < -1):
        raise ValueError(f"config: max_steps={steps}: give a positive number of optimizer steps, "
                         "or -1 to train for num_train_epochs")
    for key in ("save_steps", "eval_steps", "logging_steps", "num_train_epochs"):
        if isinstance(top.get(key), (int, float)) and top[key] <= 0:
            raise ValueError(f"config: {key}={top[key]} must be > 0")
    ds = top.get("deepspeed")
    if isinstance(ds, str) and not ds.lstrip().startswith("{") and not Path(ds).is_file():
        raise FileNotFoundError(f"config: deepspeed={ds!r} is not a file; give a DeepSpeed JSON such "
                                "as configs/deepspeed/zero2.json (paths are relative to the working dir)")
    if not isinstance(top.get("output_dir", "x"), str) or not top.get("output_dir", "x").strip():
        raise ValueError(f"config: output_dir={top.get('output_dir')!r} must be a directory path")


def teacher_mode(m: ModelSpec) -> str:
    """'live' (a model in this process), 'offline' (top-k columns in the data) or 'served'
    (top-k from a vLLM server at model.teacher_server)."""
    return "served" if m.teacher_server else m.teacher_mode


def _check_model(m: ModelSpec) -> None:
    if m.teacher_mode not in ("live", "offline"):
        raise ValueError(f"config: model.teacher_mode={m.teacher_mode!r}; use 'live' or 'offline'")
    if teacher_mode(m) == "live" and m.teacher is None and not m.teachers:   # a served teacher needs no local copy
        raise ValueError("config: model.teacher is missing; set a model dir, 'embedded', "
                         "model.teacher_server=URL, or model.teacher_mode=offline with a generated "
                         "dataset in data.path")
    for name in ("teacher_dtype", "student_dtype"):
        if getattr(m, name) not in DTYPES:
            raise ValueError(f"config: model.{name}={getattr(m, name)!r} is unknown; use one of {DTYPES}")
    if m.student is None and m.teacher is None and not m.teachers:
        raise ValueError("config: model.student is missing and there is no teacher to derive it from")
    layers = m.student_layers
    if not (layers == "every_other" or (isinstance(layers, int) and not isinstance(layers, bool) and layers >= 1)
            or (isinstance(layers, list) and layers and all(isinstance(i, int) and i >= 0 for i in layers))):
        raise ValueError(f"config: model.student_layers={layers!r}; use 'every_other', a layer count "
                         "(e.g. 6) or a list of teacher layer indices (e.g. [0, 2, 4])")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    loads = {"teacher": m.teacher if (m.teacher_mode == "live" or m.student is None) else None,
             "student": m.student}
    if m.teacher_server and not str(m.teacher_server).startswith(("http://", "https://")):
        raise ValueError(f"config: model.teacher_server={m.teacher_server!r}; give the server's URL, "
                         "e.g. http://teacher-node:8000 (started by `llmkd serve-teacher CONFIG`)")
    from llmkd.training.teachers import check_served_targets

    check_served_targets("model.", m)
    for role, value in (("teacher", m.teacher), ("student", m.student)):
        if value is None or value == "embedded":   # llmkd converts and checks its own teacher
            continue
        if role == "teacher" and m.teacher_server and m.student is not None:
            continue   # served: the teacher's files may live on the server's machine only
        if not Path(value).expanduser().exists():
            if HUB_ID.match(value) and not offline and not value.startswith((".", "/", "~")):
                continue   # a hub id: resolved by from_pretrained
            raise ValueError(
                f"config: model.{role}={value!r} is not a model directory"
                + (" (and the hub is offline: HF_HUB_OFFLINE=1)" if HUB_ID.match(value) else "")
                + "; give a local directory with config.json + safetensors, or 'embedded' for the default teacher")
        if loads[role] is not None:
            from llmkd.preflight import check_model_dir

            check_model_dir(value, f"model.{role}")


def _check_data(d: DataSpec) -> None:
    for key in ("num_train", "num_eval", "max_length"):
        if getattr(d, key) < 1:
            raise ValueError(f"config: data.{key}={getattr(d, key)} must be >= 1")
    if d.recipe is None and d.path is None:
        raise ValueError("config: data.recipe (or data.path) is missing; e.g. data.recipe=arithmetic")
    if d.path and not Path(d.path).expanduser().exists():
        raise FileNotFoundError(f"config: data.path={d.path!r} does not exist")
    if d.path:
        from llmkd.generation.writer import is_generation_dir, read_manifest

        if is_generation_dir(Path(d.path).expanduser()):
            read_manifest(Path(d.path).expanduser())   # shards without their manifest: say so now
            return
    from llmkd.data.recipes import load_recipe

    try:
        load_recipe(d.recipe or "arithmetic", path=d.path)
    except ValueError as err:   # unknown recipe name, or a recipe YAML with a bad key
        raise ValueError(f"config: data.recipe={d.recipe!r}: {err}") from None


def resume_dir(output_dir: str, resume: Any) -> Path | None:
    """The checkpoint a run resumes from (None: a new run)."""
    if resume in (None, False):
        return None
    from llmkd.training.checkpoint import find_checkpoint

    return find_checkpoint(Path(output_dir).expanduser())[0] if resume is True else Path(str(resume))


def check_config(raw: dict) -> dict[str, Any]:
    """Validate a raw config dict (what YAML gives) without importing a model library, and
    return the keyword arguments of DistillationConfig. Cheap checks first: keys and types,
    values, then the file system (model dirs, data, output_dir, checkpoints)."""
    from llmkd.methods import get_params
    from llmkd.data.mixture import sources
    from llmkd.training.teachers import check_resume_teachers, check_teachers

    raw = dict(raw)
    types, choices = training_args_schema()
    check_keys("", raw, list(types) + list(EXTRA_KEYS))
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
    kwargs["method"] = MethodSpec(name=method.pop("name", "token_kd"), params=method,
                                  teacher_mix=method.pop("teacher_mix", "route"))
    params = get_params(kwargs["method"].name).from_dict(method)   # unknown name / bad params
    check_teachers(kwargs["model"], kwargs["data"], kwargs["method"], params)   # kinds, sets, mixture
    if kwargs["model"].lora is not None:
        check_lora_keys(kwargs["model"].lora)
        config_checks.check_lora_values(kwargs["model"].lora)
    resume = raw.pop("resume_from_checkpoint", None)   # a path, or true = the newest checkpoint
    if not isinstance(resume, (str, bool, type(None))):
        raise ValueError(f"config: resume_from_checkpoint={resume!r}; give true or a checkpoint-N path")
    top = coerce("", raw, {**types, **EXTRA_KEYS})
    top.setdefault("output_dir", "runs/distill")
    for where, section in (("", top), ("model", dataclasses.asdict(kwargs["model"])),
                           ("data", dataclasses.asdict(kwargs["data"])), ("method", dataclasses.asdict(params))):
        config_checks.check_finite(where, section)
    _check_training_values(top, choices)
    config_checks.check_seeds(top, kwargs["data"].seed)
    config_checks.check_launcher(top)
    _check_model(kwargs["model"])
    if kwargs["model"].student is None and kwargs["model"].teacher is not None:
        config_checks.check_student_layers(kwargs["model"].student_layers, kwargs["model"].teacher)
    if kwargs["model"].teacher_mode == "offline" and not kwargs["data"].path and not kwargs["data"].mixture:
        raise ValueError("config: model.teacher_mode=offline needs data.path pointing at an "
                         "`llmkd generate` output directory (it holds the teacher top-k columns)")
    for _, source in sources(kwargs["data"]):
        _check_data(source)
    check_not_an_input(top["output_dir"], input_paths(kwargs["model"], kwargs["data"]))
    from llmkd.eval.monitor import check_monitor

    check_monitor(kwargs["monitor"], top, kwargs["model"], kwargs["data"])
    config_checks.check_output(top, resume)
    check_resume_teachers(resume_dir(top["output_dir"], resume), kwargs["model"])
    if resume not in (None, False):
        top["resume_from_checkpoint"] = resume if resume is True else str(resume)
    top.setdefault("report_to", "none")
    top.setdefault("remove_unused_columns", False)   # collator needs the raw columns
    return {**top, **kwargs}


def input_paths(m: ModelSpec, d: DataSpec) -> dict[str, str | None]:
    """The local paths a run reads, by config field (an output_dir must stay clear of them)."""
    recipe = d.recipe if d.recipe and d.recipe.endswith((".yaml", ".yml")) else None
    return {"model.teacher": m.teacher, "model.student": m.student, "data.path": d.path, "data.recipe": recipe}


def config_from_dict(raw: dict) -> Any:
    """Build and validate a DistillationConfig from a plain dict (what YAML gives)."""
    from llmkd.training.checkpoint import check_resume_config

    kwargs = check_config(raw)                # first: it imports no model library
    cfg = _distillation_config()(**kwargs)
    check_resume_config(cfg)                  # a resume whose training config changed
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Any:
    """YAML (safe_load) + `--set` overrides -> validated DistillationConfig."""
    return config_from_dict(apply_overrides(read_yaml_mapping(path), overrides or []))


def config_help(width: int = 100) -> str:
    """The keys a distill config takes, for `llmkd distill --help` (no model library imported)."""
    from llmkd.methods import METHODS, PARAMS, get_params

    def wrap(head: str, items: list[str]) -> list[str]:
        return textwrap.wrap(", ".join(items), width, initial_indent=head, subsequent_indent=" " * len(head),
                             break_long_words=False, break_on_hyphens=False)

    lines = ["config keys (YAML; override any with --set KEY=VALUE, e.g. --set data.num_train=64):"]
    for name, cls in SECTIONS.items():
        lines += wrap(f"  {name}: ", [f.name for f in dataclasses.fields(cls)])
    lines.append(f"  method: name ({' | '.join(METHODS)}) and that method's parameters (defaults):")
    for name in METHODS:
        if name in PARAMS:
            lines += wrap(f"    {name}: ", [f"{f.name}={f.default!r}" for f in dataclasses.fields(get_params(name))])
        else:
            lines.append(f"    {name}: see llmkd/methods/{name}.py")
    lines.append("  top level: overwrite_output_dir and any transformers.TrainingArguments field, e.g.")
    lines += wrap("    ", ["output_dir", "max_steps", "num_train_epochs", "learning_rate", "lr_scheduler_type",
                   "per_device_train_batch_size", "gradient_accumulation_steps", "save_steps",
                   "save_total_limit", "logging_steps", "bf16", "gradient_checkpointing", "deepspeed",
                   "report_to", "resume_from_checkpoint", "use_cpu"])
    return "\n".join(lines)
