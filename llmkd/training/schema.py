"""The fields of transformers.TrainingArguments and peft's LoraConfig, read from their installed
source with `ast` rather than imported (seconds of torch/accelerate), so a config typo fails
before any model library loads."""
from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import typing
from pathlib import Path
from typing import Any

from llmkd.validation import check_keys

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


def check_lora_keys(lora: dict[str, Any]) -> None:
    """model.lora keys against peft's LoraConfig fields, read from its source (importing peft
    costs seconds) so a typo fails before any weights load."""
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
