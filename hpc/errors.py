"""One-line descriptions of the operating system's refusals (a full disk, a quota, permissions, a read-only
or vanished filesystem), wherever they surface: inside a stage job (raised again as StageError, whose message
the failure report shows) or in the CLI itself. A full disk often surfaces as MLflow's sqlite store saying
"database or disk is full" instead of an OSError; that is recognised too."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

ERROR_PREFIX = "hpcft: error: "  # a job's last stderr line when it knows why it failed (see executor.tail)
DISK_FULL_TEXT = ("database or disk is full", "No space left on device", "Disk quota exceeded")


class StageError(RuntimeError):
    """A stage failed for a reason its one-line message says in full (no traceback needed)."""


def _usage(path: Path):
    """shutil.disk_usage of the filesystem holding `path` (its nearest existing parent); None if unreadable."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p)
    except OSError:
        return None


def _free(path: Path) -> str:
    usage = _usage(path)
    if usage is None:
        return ""
    mb = 1024 * 1024
    return f"; {usage.free // mb} MB free of {usage.total // mb} MB there"


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def describe_os_error(err: BaseException, where: Path | None = None) -> str | None:
    """One line for an OS-level failure anywhere in `err`'s chain: the path (the error's own, else `where`),
    the errno's name and text, and for a full disk the space left; None when the chain holds no such
    failure."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno is not None:
            path = e.filename or where
            name = errno.errorcode.get(e.errno, str(e.errno))
            line = f"{path}: {e.strerror or os.strerror(e.errno)} ({name})" if path else f"{e.strerror} ({name})"
            if e.errno in (errno.ENOSPC, errno.EDQUOT) and path:
                line += _free(Path(path))
            return line
    for e in _chain(err):
        text = str(e)
        for marker in DISK_FULL_TEXT:
            if marker in text:
                line = f"{where}: {marker} (ENOSPC)" if where else f"{marker} (ENOSPC)"
                return line + (_free(Path(where)) if where else "")
    return None


def disk_full(path: Path, below_bytes: int = 1024 * 1024) -> str | None:
    """A line when the filesystem holding `path` is full (under `below_bytes` free): a stage that failed there,
    through whatever error its libraries made of it (datatrove's worker pool, a logger that could not write),
    failed for want of space."""
    usage = _usage(path)
    if usage is None or usage.free >= below_bytes:
        return None
    return f"{path}: No space left on device (ENOSPC){_free(path)}"
