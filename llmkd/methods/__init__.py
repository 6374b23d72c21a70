"""Method plug-ins. Adding a method = one module here + one YAML in configs/distill/."""
from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmkd.methods.base import Method, MethodParams

METHODS = {"token_kd": "llmkd.methods.token_kd:TokenKD",
           "cross_tokenizer": "llmkd.methods.cross_tokenizer:CrossTokenizer",
           "rationale": "llmkd.methods.rationale:Rationale",
           "taid": "llmkd.methods.taid:TAID",
           "distillspec": "llmkd.methods.distillspec:DistillSpec"}
# Where a method's Params live without torch (configs are validated before torch loads); a
# method missing here still works: its Params are then reached through the method module.
PARAMS = {"token_kd": "llmkd.methods.params:TokenKDParams",
          "rationale": "llmkd.methods.params:RationaleParams",
          "cross_tokenizer": "llmkd.methods.cross_tokenizer:CrossTokenizerParams"}   # module is torch-free


def register(name: str, method: str, params: str | None = None) -> None:
    """Make `method.name: NAME` available: `method` and `params` are "module:Class" paths, imported
    only when the method is used; `params` names a torch-free home for its Params class (configs
    are validated before torch loads), otherwise they are read from the method class."""
    METHODS[name] = method
    if params is not None:
        PARAMS[name] = params


def _check_name(name: str) -> None:
    if name not in METHODS:
        near = difflib.get_close_matches(str(name), list(METHODS), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"config: method.name={name!r} is unknown.{hint} "
                         f"Available: {', '.join(sorted(METHODS))}")


def _load(spec: str) -> type:
    module, cls = spec.split(":")
    return getattr(importlib.import_module(module), cls)


def get_method(name: str) -> type[Method]:
    _check_name(name)
    return _load(METHODS[name])


def get_params(name: str) -> type[MethodParams]:
    """The method's Params class, without importing torch where the method registered it."""
    _check_name(name)
    return _load(PARAMS[name]) if name in PARAMS else get_method(name).Params
