"""The YAML reader every command uses (distill, generate, eval, serve-teacher): safe_load that
refuses duplicate keys, one-line errors with line and column, and `--set a.b=c` overrides."""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml


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
        loader = _Loader(p.read_text())      # a SafeLoader that also refuses duplicate keys
        try:
            raw = loader.get_single_data() or {}
        finally:
            loader.dispose()
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
