"""Method plug-ins. Adding a method = one module here + one YAML in configs/distill/."""
from __future__ import annotations

import difflib
import importlib

from llmkd.methods.base import Method

METHODS = {"token_kd": "llmkd.methods.token_kd:TokenKD",
           "rationale": "llmkd.methods.rationale:Rationale"}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        near = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"config: method.name={name!r} is unknown.{hint} "
                         f"Available: {', '.join(sorted(METHODS))}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)
