"""Files that are either complete or absent: written under a temporary name, then renamed."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """No space left where llmkd writes; the CLI prints its one line (exit 2)."""


def disk_full(err: OSError, directory: str | Path, what: str) -> DiskFullError | None:
    """A `DiskFullError` naming `directory` and its free space when `err` is one (libraries such
    as pyarrow raise a bare OSError whose text says so), else None."""
    if err.errno not in NO_SPACE and "No space left" not in str(err) and "quota" not in str(err):
        return None
    try:
        free = f"{shutil.disk_usage(directory).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(f"disk full while writing {what} in {directory} ({free}); free space there or "
                         "choose another directory, then run again")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that a reader (or a killed run) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
