"""Strict checks of plain-dict config sections against dataclasses: unknown keys name the nearest
valid key, values are type-checked against annotations. No heavy imports: the config, the method
plug-ins and the CLI all validate through here before any model library loads."""
from __future__ import annotations

import difflib
import types
import typing
from typing import Any


def _nearest(key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(sorted(valid))}"


def check_keys(where: str, raw: dict, valid: list[str]) -> None:
    for key in raw:
        if key not in valid:
            raise ValueError(f"config: unknown key {where + str(key)!r}{_nearest(str(key), valid)}")


def type_ok(value: Any, tp: Any) -> bool:
    """A small structural type check for YAML values (covers the annotations used here)."""
    if tp is Any or value is None and _optional(tp):
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (list, dict, tuple):
        return isinstance(value, origin)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def coerce(where: str, raw: dict, cls: type | dict[str, Any]) -> dict:
    """Type-check YAML values against the dataclass annotations (or a {name: type} mapping).
    Undo two YAML 1.1 surprises: "1e-4" (no dot) is read as a string, and no/yes as booleans."""
    hints = cls if isinstance(cls, dict) else typing.get_type_hints(cls)
    out = {}
    for key, value in raw.items():
        tp = hints.get(key, Any)
        if isinstance(value, bool) and key.endswith("_strategy") and not type_ok(value, tp):
            value = "yes" if value else "no"    # YAML 1.1 reads save_strategy: no as False
        if isinstance(value, str) and not type_ok(value, tp) and type_ok(1.0, tp):
            try:
                value = float(value)
            except ValueError:
                pass
        if not type_ok(value, tp):
            raise ValueError(f"config: {where}{key}={value!r} has type {type(value).__name__}; "
                             f"expected {getattr(tp, '__name__', tp)}")
        out[key] = value
    return out


# Divergence parameters: checked by the losses and, before torch loads, by the method configs.
DIVERGENCES: tuple[str, ...] = ("fkl", "rkl", "jsd", "tvd", "skew_fkl", "skew_rkl")


def check_divergence(kind: str, beta: float, lam: float, temperature: float, where: str = "") -> None:
    """Fail early, naming the parameter (`where` is its prefix, e.g. "method."), on values the
    divergence formulas are not defined for."""
    if kind not in DIVERGENCES:
        raise ValueError(f"{where or 'divergence '}kind={kind!r} is unknown; use one of {', '.join(DIVERGENCES)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{where}beta={beta} is outside [0, 1]; 0 is forward KL, 1 is reverse KL")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"{where}lam={lam} is outside [0, 1]; DistiLLM uses 0.1")
    if not temperature > 0:
        raise ValueError(f"{where}temperature={temperature} must be > 0 (1.0 leaves logits unchanged)")


# The chunked loss's compiled element-wise math (`llmkd.losses.fused`): auto = on where faster.
FUSED_MODES: tuple[str, ...] = ("auto", "on", "off")


def check_fused(value: str | bool, where: str = "") -> str:
    """The `fused` mode as a string; YAML 1.1 reads a bare on / off as true / false."""
    mode = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
    if mode not in FUSED_MODES:
        raise ValueError(f"{where}fused={value!r} is unknown; use one of {', '.join(FUSED_MODES)} "
                         "(auto: compiled where it is faster)")
    return mode


def check_fused_applies(mode: str, chunk_size: int, ce_weight: float = 0.0, where: str = "") -> None:
    """`fused: on` is a request for the compiled chunked loss: refuse settings that never run it
    (full logits, a CE term) instead of ignoring the request silently."""
    if mode == "on" and (chunk_size == 0 or ce_weight > 0):
        raise ValueError(f"{where}fused=on compiles the chunked loss, which runs only with {where}chunk_size "
                         f"> 0 and {where}ce_weight=0 (found chunk_size={chunk_size}, ce_weight={ce_weight}); "
                         "use fused: auto or off")


FUSED_ON_SPARSE = ("config: method.fused=on compiles the chunked loss of a live teacher; an offline or "
                   "served teacher's sparse top-k loss is not fused; use fused: auto or off")
