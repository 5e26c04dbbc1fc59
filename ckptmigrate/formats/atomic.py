"""Atomic file replacement: write beside the target, fsync, rename over it, fsync the folder.

A crash (or Ctrl-C) at any moment leaves the old file or the new one, never half of one, and
no temporary file behind when Python gets the chance to clean up.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

TEMP_MARKER = ".ckptmigrate-tmp-"


def temp_path_for(path: Path) -> Path:
    """A fresh temporary name in the target's folder (never starting with a dot)."""
    return path.with_name(f"{path.name}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_path(path: Path) -> None:
    """Flush a file's (or folder's) contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    >>> with atomic_path("model.pth") as tmp:
    ...     torch.save(obj, tmp)
    """
    target = Path(path)
    tmp = temp_path_for(target)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp}")
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, target.stat().st_mode & 0o7777)
        fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_path(target.parent if str(target.parent) else Path("."))
