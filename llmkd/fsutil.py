"""Files that are either complete or absent: written under a temporary name, then renamed."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# what libraries that do not set errno say (pyarrow, safetensors' Rust side, cloud file systems)
NO_SPACE_TEXT = ("No space left", "os error 28", "StorageFull", "quota")


class DiskFullError(OSError):
    """No space left where llmkd writes; the CLI prints its one line (exit 2)."""


def disk_full(err: OSError, directory: str | Path, what: str) -> DiskFullError | None:
    """A `DiskFullError` naming `directory` and its free space when `err` is one (libraries such
    as pyarrow raise a bare OSError whose text says so), else None."""
    if not no_space(err):
        return None
    try:
        free = f"{shutil.disk_usage(directory).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(f"disk full while writing {what} in {directory} ({free}); free space there or "
                         "choose another directory, then run again")


def no_space(err: BaseException, probe: str | Path | None = None) -> bool:
    """Did a write fail for lack of space? By errno or the library's text; with `probe`, also when
    the file system there is (almost) full: torch on a full tmpfs raises "enforce fail at
    inline_container.cc: unexpected pos", which names no cause."""
    if isinstance(err, OSError) and err.errno in NO_SPACE or any(t in str(err) for t in NO_SPACE_TEXT):
        return True
    if probe is None:
        return False
    try:
        return shutil.disk_usage(existing_parent(Path(probe))).free < 1 << 20
    except OSError:
        return False


def existing_parent(p: Path) -> Path:
    """`p`, or its nearest ancestor that exists (where a failed write's space can be asked)."""
    while not p.exists():
        p = p.parent
    return p


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that a reader (or a killed run) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
