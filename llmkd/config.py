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
import importlib.util
import os
import re
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmkd import config_checks
from llmkd.outdir import check_not_an_input
from llmkd.validation import check_keys, coerce  # noqa: F401  (check_keys, coerce: re-exported)

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
    teachers: dict | None = None       # several teachers: name -> {teacher | teacher_server | teacher_mode, ...}
    student_from: str | None = None    # with model.teachers: derive the student from this teacher
    teacher_timeout: float = 30.0      # teacher_server: seconds an attempt may take, plus ...
    teacher_timeout_per_token: float = 0.01   # ... this per token of the batch (then retries)


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


# --- YAML ----------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """safe_load that also refuses duplicate keys (plain YAML silently keeps the last one)."""


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, typing.Hashable) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first set on line {seen[key] + 1})", key_node.start_mark)
        if isinstance(key, typing.Hashable):
            seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _yaml_error(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML file (safe_load) whose top level is a mapping; clear errors otherwise."""
    p = Path(path)
    if p.is_dir():
        raise FileNotFoundError(f"{what} file {str(p)!r} is a directory; give the YAML file in it")
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {str(p)!r} does not exist")
    try:
        raw = yaml.load(p.read_text(), Loader=_Loader) or {}   # noqa: S506 (_Loader is a SafeLoader)
    except yaml.YAMLError as err:
        raise ValueError(f"{what} {str(p)!r}, {_yaml_error(err)}; fix the YAML (indentation, a space "
                         "after ':', matching quotes and brackets)") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {str(p)!r} is not UTF-8 text") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{what} {str(p)!r}: top level must be a mapping of keys to values, "
                         f"found {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides (values parsed as YAML) onto a raw config dict; a number indexes a
    list (`data.mixture.1.teacher=x`)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set method.beta=0.5")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({_yaml_error(err)}); "
                             "quote text, e.g. --set 'data.recipe=\"a: b\"'") from None
        node: Any = raw
        for depth, part in enumerate(parts):
            if isinstance(node, list):      # a list in the YAML (data.mixture): KEY.INDEX.KEY
                where = ".".join(parts[:depth])
                if not part.isdigit():
                    raise ValueError(f"--set {item!r}: {where} is a list: index it, e.g. {where}.0.KEY")
                if int(part) >= len(node):
                    raise ValueError(f"--set {item!r}: {where} has {len(node)} entries "
                                     f"(0 to {len(node) - 1})")
                part = int(part)
            elif not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {parts[depth - 1]!r} is not a section")
            if depth == len(parts) - 1:
                node[part] = parsed
            else:
                node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
    return raw


# --- TrainingArguments fields, without importing transformers ---------------------------------
_BUILTINS: dict[str, Any] = {"int": int, "float": float, "bool": bool, "str": str, "dict": dict,
                             "list": list, "tuple": tuple, "Any": Any, "List": list, "Dict": dict}
_ENUM_FILES = ("training_args.py", "trainer_utils.py", "debug_utils.py")


@functools.lru_cache(maxsize=1)
def training_args_schema() -> tuple[dict[str, Any], dict[str, tuple[str, ...]]]:
    """({field: type}, {field: allowed strings of its enum}) of transformers.TrainingArguments.
    Read from the installed source with `ast` (~0.1 s) instead of importing it (seconds: torch,
    accelerate); falls back to the import if the source is not laid out as expected."""
    try:
        return _schema_from_source()
    except (OSError, SyntaxError, LookupError):
        return _schema_from_import()


def _schema_from_source() -> tuple[dict[str, Any], dict[str, tuple[str, ...]]]:
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        raise LookupError("transformers is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    enums: dict[str, tuple[str, ...]] = {}
    for name in _ENUM_FILES:
        for node in ast.parse((root / name).read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and any(_dotted(b).endswith("Enum") for b in node.bases):
                values = tuple(s.value.value for s in node.body if isinstance(s, ast.Assign)
                               and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str))
                if values:
                    enums[node.name] = values
    tree = ast.parse((root / "training_args.py").read_text(encoding="utf-8"))
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainingArguments"), None)
    if cls is None or cls.bases:
        raise LookupError("TrainingArguments not found as a plain dataclass")
    types: dict[str, Any] = {}
    choices: dict[str, tuple[str, ...]] = {}
    for st in cls.body:
        if not (isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)) or _init_false(st.value):
            continue
        members = _union_members(st.annotation)
        types[st.target.id] = typing.Union[tuple(_to_type(m, enums) for m in members)]
        named = [enums[m.id] for m in members if isinstance(m, ast.Name) and m.id in enums]
        if named:
            choices[st.target.id] = named[0]
    if len(types) < 50:
        raise LookupError("too few TrainingArguments fields found")
    return types, choices


def _schema_from_import() -> tuple[dict[str, Any], dict[str, tuple[str, ...]]]:
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}, {}


def _dotted(node: ast.expr) -> str:
    return ast.unparse(node)


def _init_false(value: ast.expr | None) -> bool:
    return (isinstance(value, ast.Call) and _dotted(value.func).endswith("field")
            and any(k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False
                    for k in value.keywords))


def _union_members(node: ast.expr) -> list[ast.expr]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _union_members(node.left) + _union_members(node.right)
    if isinstance(node, ast.Subscript) and _dotted(node.value).split(".")[-1] in ("Union", "Optional"):
        inner = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        extra = [ast.Constant(None)] if _dotted(node.value).endswith("Optional") else []
        return [m for e in inner for m in _union_members(e)] + extra
    return [node]


def _to_type(node: ast.expr, enums: dict[str, tuple[str, ...]]) -> Any:
    if isinstance(node, ast.Constant):
        return type(None) if node.value is None else Any   # None, or a forward reference
    if isinstance(node, ast.Name):
        return str if node.id in enums else _BUILTINS.get(node.id, Any)
    if isinstance(node, ast.Subscript):
        base = _dotted(node.value).split(".")[-1]
        if base == "Literal":
            elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            return typing.Literal[tuple(ast.literal_eval(e) for e in elts)]
        return _BUILTINS.get(base, Any)
    return Any


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


def check_lora_keys(lora: dict[str, Any]) -> None:
    """model.lora keys against peft's LoraConfig fields, read from its source (importing peft
    costs seconds) so a typo fails before any weights load."""
    import importlib.util

    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.submodule_search_locations:
        return        # no peft: wrap_peft says so when it runs
    root = Path(list(spec.submodule_search_locations)[0])
    fields: list[str] = []
    for rel, cls in (("config.py", "PeftConfigMixin"), ("config.py", "PeftConfig"),
                     ("tuners/lora/config.py", "LoraConfig")):
        tree = ast.parse((root / rel).read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == cls:
                fields += [st.target.id for st in node.body
                           if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)]
    if "r" in fields:      # the parse found LoraConfig: trust it
        check_keys("model.lora.", lora, fields)


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


def _check_output(top: dict[str, Any], resume: Any) -> None:
    from llmkd.checkpoint import checkpoint_problem, describe_skipped, find_checkpoint
    from llmkd.outdir import OutputDirBusy, busy_message, check_overwrite, foreign_entries, holder_of
    from llmkd.preflight import check_output_dir

    out = Path(top["output_dir"]).expanduser()
    check_output_dir(top["output_dir"])
    overwrite = top.get("overwrite_output_dir", False)
    if resume not in (None, False) and overwrite:
        raise ValueError("config: resume_from_checkpoint and overwrite_output_dir=true contradict each "
                         "other: resume continues the run in output_dir, overwrite starts it over; set one")
    if resume is True:
        found, skipped = find_checkpoint(out)
        if found is None and (holder := holder_of(out)):    # its first checkpoint is not written yet
            raise OutputDirBusy(busy_message(out, holder))
        if found is None:
            raise FileNotFoundError(
                f"config: resume_from_checkpoint=true but output_dir={str(out)!r} has no complete "
                "checkpoint" + (f" ({describe_skipped(skipped)})" if skipped else "")
                + "; drop resume_from_checkpoint to start a new run")
    elif resume not in (None, False):
        if not Path(str(resume)).is_dir():
            raise FileNotFoundError(f"config: resume_from_checkpoint={resume!r} is not a checkpoint "
                                    "directory; give checkpoint-N under output_dir, or true for the last one")
        problem = checkpoint_problem(resume)
        if problem:
            raise ValueError(f"config: resume_from_checkpoint={resume!r} is not a complete checkpoint "
                             f"({problem}); give another checkpoint-N, or true for the newest complete one")
    elif overwrite:
        check_overwrite(out)
    elif foreign_entries(out):
        has_ckpt = find_checkpoint(out)[0] is not None
        raise FileExistsError(
            f"config: output_dir={str(out)!r} exists and is not empty"
            + ("; to continue its run: --set resume_from_checkpoint=true" if has_ckpt else "")
            + "; to start over (its checkpoints are deleted): --set overwrite_output_dir=true; "
            "or choose another output_dir (nothing was written)")


def resume_dir(output_dir: str, resume: Any) -> Path | None:
    """The checkpoint a run resumes from (None: a new run)."""
    if resume in (None, False):
        return None
    from llmkd.checkpoint import find_checkpoint

    return find_checkpoint(Path(output_dir).expanduser())[0] if resume is True else Path(str(resume))


def check_config(raw: dict) -> dict[str, Any]:
    """Validate a raw config dict (what YAML gives) without importing a model library, and
    return the keyword arguments of DistillationConfig. Cheap checks first: keys and types,
    values, then the file system (model dirs, data, output_dir, checkpoints)."""
    from llmkd.methods import get_params
    from llmkd.data.mixture import sources
    from llmkd.teachers.spec import check_resume_teachers, check_teachers

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
    _check_output(top, resume)
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
    from llmkd.checkpoint import check_resume_config

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
