"""The output directory of a run: never an input, only llmkd's own files replaced, one run at a time.

A run writes into `output_dir` and, with `overwrite_output_dir`, deletes what an earlier run left
there. Pointed at the teacher's directory (or a git checkout) that would destroy files llmkd did
not write. So: an output_dir that is, holds or lies inside a model or data directory the run reads
is refused whatever the flags; a run marks its output_dir as its own (MARKER) and
`overwrite_output_dir` applies only to a directory carrying that mark; and a run holds an
exclusive lock (`flock`) on it, so a second run on the same directory stops with one line instead
of racing the first one's checkpoints. Nothing here imports a model library.
"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

MARKER = ".llmkd-run"          # written by llmkd into every output_dir it trains into
LOCK = ".llmkd.lock"           # flock'ed for the whole run, released when the process ends
OWN_FILES = (MARKER, LOCK)     # bookkeeping: a directory holding only these counts as empty


class OutputDirBusy(FileExistsError):
    """Another run holds the output_dir's lock."""


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_not_an_input(output_dir: str | Path, inputs: dict[str, str | None]) -> None:
    """Refuse an output_dir equal to, holding, or inside any local input path ({field: path});
    hub ids and unset fields (None) are skipped because they are not paths on this machine."""
    out = _real(output_dir)
    for field, value in inputs.items():
        if not value or not Path(value).expanduser().exists():
            continue
        src = _real(value)
        if out == src:
            how = "is"
        elif out in src.parents:
            how = "holds"
        elif src in out.parents:
            how = "lies inside"
        else:
            continue
        raise ValueError(f"config: output_dir={str(output_dir)!r} {how} {field}={value!r}: a run would "
                         f"write (and with overwrite_output_dir delete) files there; choose an output_dir "
                         "outside every model and data directory the run reads")


def foreign_entries(output_dir: str | Path) -> list[str]:
    """Names in an existing output_dir that llmkd's bookkeeping does not account for."""
    p = Path(output_dir).expanduser()
    return sorted(e.name for e in p.iterdir() if e.name not in OWN_FILES) if p.is_dir() else []


def check_overwrite(output_dir: str | Path) -> None:
    """`overwrite_output_dir` replaces only what an earlier llmkd run wrote: a non-empty directory
    without the run marker holds someone else's files (a model, a git checkout) and is refused."""
    p = Path(output_dir).expanduser()
    names = foreign_entries(p)
    if names and not (p / MARKER).is_file():
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise FileExistsError(
            f"config: overwrite_output_dir=true but output_dir={str(output_dir)!r} holds files no "
            f"llmkd run wrote ({shown}); overwrite replaces only an earlier llmkd run's output: "
            "choose another output_dir, or empty this one yourself")


def holder_of(output_dir: str | Path) -> str | None:
    """The pid text of another live run holding output_dir's lock, or None (a peek: takes and
    drops the lock at once), so an error about the directory's contents can name the real cause."""
    lock = Path(output_dir).expanduser() / LOCK
    if not lock.is_file():
        return None
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 64).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)
    return None


def busy_message(output_dir: str | Path, holder: str) -> str:
    return (f"output_dir={str(output_dir)!r} is in use by another llmkd run (pid {holder}); wait for "
            "it to end, or choose another output_dir")


@contextmanager
def claim_output_dir(output_dir: str | Path, *, main: bool = True) -> Iterator[None]:
    """Create output_dir, lock it for this process (the main rank only: the other ranks of the
    same run share it) and mark it as llmkd's. A second run gets `OutputDirBusy` at once."""
    if not main:
        yield
        return
    p = Path(output_dir).expanduser()
    p.mkdir(parents=True, exist_ok=True)
    fd = os.open(p / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            raise OutputDirBusy(busy_message(output_dir, holder)) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        mark_output_dir(p)
        yield
    finally:
        os.close(fd)           # closing the descriptor releases the lock (so does process exit)


def mark_output_dir(output_dir: str | Path) -> None:
    """Mark output_dir as an llmkd run's (what overwrite_output_dir may later replace)."""
    p = Path(output_dir).expanduser()
    p.mkdir(parents=True, exist_ok=True)
    if not (p / MARKER).is_file():
        (p / MARKER).write_text(json.dumps({"written_by": "llmkd"}) + "\n")
