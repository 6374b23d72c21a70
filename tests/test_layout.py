"""The package's layout rules, read from the source with `ast`: imports flow one way between the
rooms (no upward import), no import circles between modules, no file over 400 lines.

Rooms, bottom to top (a module may import its own room and the rooms below it):
  the root modules (llmkd/*.py: small leaf helpers) < losses < data < models < generation < eval
  < teachers < methods < training < cli.
Imports under `if TYPE_CHECKING:` are skipped (they never run). `llmkd/__init__.py` and the
re-export module kept for a documented path (`llmkd/alignment.py`) sit above everything and no
module of the package imports them.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOMS = ("", "losses", "data", "models", "generation", "eval", "teachers", "methods", "training", "cli")
FACADES = {"llmkd", "llmkd.alignment"}
MAX_LINES = 400
PACKAGE = Path(__file__).resolve().parents[1] / "llmkd"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ROOMS) else ""


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those inside `if TYPE_CHECKING:` blocks."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)
    return out


def imports(path: Path, root: Path) -> set[str]:
    """The package's own modules that `path` imports (at module level or inside a function)."""
    me = module_name(path, root)
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = me.split(".")[: len(me.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                rel = Path(*sub.split(".")[1:])
                is_module = (root / rel).with_suffix(".py").exists() or (root / rel).is_dir()
                found.add(sub if is_module else base)
    return {m for m in found if m.split(".")[0] == root.name and m != me}


def graph(root: Path) -> dict[str, set[str]]:
    return {module_name(p, root): imports(p, root) for p in sorted(root.rglob("*.py"))}


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in g.items():
        if mod in FACADES:
            continue
        for dep in deps:
            if dep in FACADES:
                bad.append(f"{mod} imports {dep} (a re-export facade; import the module itself)")
            elif ROOMS.index(room(dep)) > ROOMS.index(room(mod)):
                bad.append(f"{mod} ({room(mod) or 'root'}) imports {dep} ({room(dep)}), a room above it")
    return sorted(bad)


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def long_files(root: Path) -> list[str]:
    return [f"{p.relative_to(root.parent)}: {n} lines" for p in sorted(root.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]


def test_no_import_circles() -> None:
    assert circles(graph(PACKAGE)) == []


def test_no_upward_imports() -> None:
    assert upward_imports(graph(PACKAGE)) == []


def test_every_module_is_in_a_room() -> None:
    assert sorted({room(m) for m in graph(PACKAGE)} - set(ROOMS)) == []


def test_no_file_over_400_lines() -> None:
    assert long_files(PACKAGE) == []


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    """A package that breaks each rule once: every check must report it."""
    pkg = tmp_path / "llmkd"
    for rel, text in {
        "__init__.py": "",
        "losses/__init__.py": "",
        "losses/a.py": "from llmkd.methods import b\n",                    # upward
        "methods/__init__.py": "",
        "methods/b.py": "def f():\n    from llmkd.methods.c import g\n",   # circle b <-> c
        "methods/c.py": "from llmkd.methods import b\n" + "x = 1\n" * MAX_LINES,   # too long
        "methods/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from llmkd.cli import e\n",
        "cli/__init__.py": "",
        "cli/e.py": "",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    g = graph(pkg)
    assert circles(g) == [["llmkd.methods.b", "llmkd.methods.c"]]
    assert upward_imports(g) == ["llmkd.losses.a (losses) imports llmkd.methods.b (methods), a room above it"]
    assert long_files(pkg) == [f"llmkd/methods/c.py: {MAX_LINES + 1} lines"]
