"""Replace a folder with a new one so that a crash at any moment loses nothing.

Where the kernel has it (Linux >= 3.15 on most local file systems) the two folders trade
names in one step, ``renameat2(RENAME_EXCHANGE)``: the path always names a whole folder, the
old one or the new one. Elsewhere (an overlayfs or NFS that refuses the flag, another OS) the
swap takes two renames, and the names say what each folder is::

    NAME.ckptmigrate-new-PID-TAG-TOKEN   the new folder, complete and flushed
    NAME.ckptmigrate-old-PID-TAG-TOKEN   the old folder, moved aside

(``PID-TAG``: the writer, :class:`.atomic.WriterIdentity`; names without a tag, of older
versions, are judged by their pid.)

A writer killed between the renames leaves nothing at ``NAME``;
:func:`finish_interrupted_swap` (run by every command that writes the checkpoint) finishes
the swap, and readers that find nothing at ``NAME`` say where the data is
(:func:`interrupted_swap_hint`).

>>> swap_folder(Path("ckpt.ckptmigrate-tmp-123-ab"), Path("ckpt"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

from . import atomic
from .atomic import (
    WRITER_PATTERN,
    fsync_path,
    remove_stale_temps,
    remove_stale_temps_where,
    this_writer,
    writer_alive,
)

__all__ = [
    "NEW_MARKER",
    "OLD_MARKER",
    "exchange",
    "finish_interrupted_swap",
    "interrupted_swap_hint",
    "recover_interrupted_write",
    "swap_folder",
]

OLD_MARKER = ".ckptmigrate-old-"
NEW_MARKER = ".ckptmigrate-new-"
_SWAP_NAME = re.compile(r"\.ckptmigrate-(old|new)-" + WRITER_PATTERN + r"([0-9a-f]+)$")

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_SYS_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276}
# renameat2 errors that mean "not here" (an old kernel, a file system without the flag, a
# seccomp filter), not "this rename is wrong": fall back to two renames
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP}
_RENAMEAT2: list[Any] = []  # [callable or None], resolved on first use


def _resolve_renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "renameat2", None)  # glibc >= 2.28
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    number = _SYS_RENAMEAT2.get(platform.machine().lower())
    syscall = getattr(libc, "syscall", None)
    if number is None or syscall is None:
        return None
    syscall.restype = ctypes.c_long

    def via_syscall(olddir: int, old: bytes, newdir: int, new: bytes, flags: int) -> int:
        return int(
            syscall(
                ctypes.c_long(number),
                ctypes.c_int(olddir),
                ctypes.c_char_p(old),
                ctypes.c_int(newdir),
                ctypes.c_char_p(new),
                ctypes.c_uint(flags),
            )
        )

    return via_syscall


def _renameat2() -> Any:
    if not _RENAMEAT2:
        _RENAMEAT2.append(_resolve_renameat2())
    return _RENAMEAT2[0]


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Atomically trade the names of two existing paths; False (nothing moved) where the
    system or file system cannot; any other failure raises ``OSError``."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _parent(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _fsync_parent(path: Path) -> None:
    with contextlib.suppress(OSError):
        fsync_path(_parent(path))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _rename(src: Path, dst: Path) -> None:
    atomic.crash_point("replace")
    os.replace(src, dst)
    atomic.crash_point("replaced")


def swap_folder(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` at ``target``, replacing what is there, and remove the
    old one; a crash at any moment leaves the old folder or the new one at ``target``, or (two
    renames, where the kernel cannot exchange) both beside it for the next run to finish."""
    new, target = Path(new), Path(target)
    fsync_path(new)
    if not os.path.lexists(target):
        _rename(new, target)  # nothing to replace: one atomic rename
        _fsync_parent(target)
        return
    atomic.crash_point("replace")
    if exchange(new, target):
        atomic.crash_point("replaced")
        _fsync_parent(target)  # the new folder is at target on disk before the old one goes
        _remove(new)  # the old folder, now under the temporary's name
        _fsync_parent(target)
        return
    _swap_by_renames(new, target)


def _swap_by_renames(new: Path, target: Path) -> None:
    token = f"{this_writer().token}-{secrets.token_hex(4)}"
    ready = target.with_name(f"{target.name}{NEW_MARKER}{token}")
    old = target.with_name(f"{target.name}{OLD_MARKER}{token}")
    os.replace(new, ready)  # complete and flushed: from here the next run may finish the swap
    atomic.crash_point("replaced")
    _fsync_parent(target)
    try:
        _rename(target, old)
        _rename(ready, target)
    except BaseException:
        if not os.path.lexists(target) and os.path.lexists(old):
            os.replace(old, target)  # undo: the old folder back at its name
        _remove(ready)
        raise
    _fsync_parent(target)
    _remove(old)
    _fsync_parent(target)


def _swap_leftovers(target: Path) -> dict[str, dict[str, Any]]:
    """``{token: {"pid": int, "tag": str | None, "old": Path, "new": Path}}`` for the swap
    names beside target."""
    found: dict[str, dict[str, Any]] = {}
    with contextlib.suppress(OSError):
        for child in _parent(target).iterdir():
            if not child.name.startswith(target.name):
                continue
            match = _SWAP_NAME.fullmatch(child.name[len(target.name) :])
            if match is None:
                continue
            kind, pid, tag, token = match.groups()
            entry = found.setdefault(f"{pid}-{tag}-{token}", {"pid": int(pid), "tag": tag})
            entry[kind] = child
    return found


def finish_interrupted_swap(target: str | os.PathLike[str]) -> list[str]:
    """Finish, or undo, the folder swaps of ``target`` that writers killed midway left
    behind, and remove what they left; returns what it did (one line each).

    Nothing at ``target`` and the new folder beside it: the new one goes in (its writer had
    written and flushed it whole). Nothing at ``target`` and only the old one: it goes back.
    A folder at ``target``: the leftovers beside it go. Swaps of live writers are left alone.
    """
    target = Path(target)
    done = []
    leftovers = sorted(_swap_leftovers(target).items(), key=lambda kv: "new" not in kv[1])
    for _, parts in leftovers:
        if writer_alive(parts["pid"], parts["tag"]):
            continue
        ready, old = parts.get("new"), parts.get("old")
        if not os.path.lexists(target):
            back = ready if ready is not None else old
            os.replace(back, target)
            _fsync_parent(target)
            done.append(f"finished an interrupted swap: {back.name} -> {target.name}")
            ready = None if back is ready else ready
            old = None if back is old else old
        for leftover in (ready, old):
            if leftover is not None:
                _remove(leftover)
                done.append(f"removed {leftover.name}")
    return done


def recover_interrupted_write(target: str | os.PathLike[str]) -> list[str]:
    """Before rewriting ``target``: finish the swaps its killed writers left half done, then
    remove their temporaries, beside it and (for a folder) inside it.

    Run it under the in-place lock, or for a new output path; returns what it did.
    """
    target = Path(target)
    done = finish_interrupted_swap(target)
    done += [f"removed {p.name}" for p in remove_stale_temps(target)]
    if target.is_dir() and not target.is_symlink():
        # e.g. the stamp file's temporary of a killed in-place stamp
        inside = remove_stale_temps_where(target, lambda base: True)
        done += [f"removed {target.name}/{p.name}" for p in inside]
    return done


def interrupted_swap_hint(target: str | os.PathLike[str]) -> str | None:
    """For a reader that finds nothing at ``target``: where an interrupted swap left the
    checkpoint and how to put it back, or None when nothing is left beside it."""
    target = Path(target)
    leftovers = _swap_leftovers(target)
    if not leftovers:
        return None
    for parts in leftovers.values():
        keep = parts.get("new") or parts.get("old")
        what = "complete new" if keep is parts.get("new") else "old"
        if writer_alive(parts["pid"], parts["tag"]):
            return (
                f"process {parts['pid']} is replacing it right now (the {what} folder is "
                f"{keep.name}); try again in a moment"
            )
    parts = next((p for p in leftovers.values() if "new" in p), next(iter(leftovers.values())))
    keep = parts.get("new") or parts.get("old")
    what = "complete new" if keep is parts.get("new") else "old"
    return (
        f"a ckptmigrate write was interrupted while it swapped folders: the {what} folder is "
        f"{keep}; rerun the command that wrote it (it finishes the swap), or move it back: "
        f"mv '{keep}' '{target}'"
    )
