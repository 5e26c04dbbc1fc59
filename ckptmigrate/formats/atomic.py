"""Atomic file replacement: write beside the target, fsync, rename over it, fsync the folder.

A crash (or Ctrl-C, or SIGKILL) at any moment leaves the old file or the new one, never half
of one. Python cleans the temporary file up when it gets the chance; after SIGKILL a stale one
may stay (``NAME.ckptmigrate-tmp-PID-TAG-TOKEN``), and :func:`remove_stale_temps` clears those of
dead writers. ``PID-TAG`` names the writer (:class:`WriterIdentity`): a pid alone may be another
process's after a reboot, in another container or on another host.

``CKPTMIGRATE_CRASH_AT`` is a test hook: ``EVENT`` or ``EVENT:N`` (the Nth time) SIGKILLs the
process at one of :data:`CRASH_EVENTS`, so tests can check the promise at every step.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import CheckpointWriteError

TEMP_MARKER = ".ckptmigrate-tmp-"
CRASH_ENV = "CKPTMIGRATE_CRASH_AT"
#: Where ``CKPTMIGRATE_CRASH_AT`` can kill: each write() into a temporary file (a Python
#: write, a pwrite or a copy_file_range call of the byte copiers), before the
#: temporary is fsynced, before and after the rename, and before the folder is fsynced.
CRASH_EVENTS = ("write", "fsync", "replace", "replaced", "fsync-dir")

_crash_state: dict[str, Any] = {"spec": None, "seen": 0}
#: The writer at the head of a temporary's or swap folder's token: ``PID-TAG-`` (groups: pid,
#: tag), or ``PID-`` in names written before writers were tagged (tag None: the pid rule).
WRITER_PATTERN = r"(\d+)-(?:([0-9a-f]{8})-)?"
_TEMP_NAME = re.compile(re.escape(TEMP_MARKER) + WRITER_PATTERN + r"[0-9a-f]+$")


def crash_point(event: str) -> None:
    """SIGKILL this process if ``CKPTMIGRATE_CRASH_AT`` names ``event`` (test hook; a no-op
    unless that variable is set)."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    if spec != _crash_state["spec"]:
        _crash_state.update(spec=spec, seen=0)
    name, _, nth = spec.partition(":")
    if name != event:
        return
    _crash_state["seen"] += 1
    if _crash_state["seen"] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def temp_path_for(path: Path) -> Path:
    """A fresh temporary name in the target's folder (never starting with a dot)."""
    import secrets

    token = f"{this_writer().token}-{secrets.token_hex(8)}"
    return path.with_name(f"{path.name}{TEMP_MARKER}{token}")


def fsync_path(path: Path) -> None:
    """Flush a file's (or folder's) contents to disk."""
    crash_point("fsync-dir" if path.is_dir() else "fsync")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _claim(tmp: Path) -> None:
    # O_EXCL|O_NOFOLLOW: the name is ours, and not a link someone planted to redirect the write.
    # 0600 until the last byte is in: a checkpoint being written (or left by a kill) is never
    # readable by another user, whatever the final permissions will be.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    os.close(os.open(tmp, flags, 0o600))


def _umask() -> int:
    """This process's umask, read without changing it where the system tells it."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: the classic read (set and restore)
    os.umask(mask)
    return mask


#: The checkpoint a new file is written from (see :func:`permissions_from`).
_MODE_SOURCE: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "ckptmigrate_mode_source", default=None
)


@contextlib.contextmanager
def permissions_from(source: str | os.PathLike[str]) -> Iterator[None]:
    """New files written inside get the permission bits of the file ``source`` (an upgrade's
    ``-o`` of a private 0600 checkpoint stays 0600), not the umask's.

    >>> with permissions_from("private.pth"):
    ...     write_checkpoint("copy.pth", ckpt)
    """
    token = _MODE_SOURCE.set(Path(source))
    try:
        yield
    finally:
        _MODE_SOURCE.reset(token)


def _new_file_mode() -> int:
    source = _MODE_SOURCE.get()
    if source is not None:
        with contextlib.suppress(OSError):
            st = source.stat()
            if not os.path.isdir(source):  # a set or a DCP folder: its files' modes vary
                return st.st_mode & 0o777
    return 0o666 & ~_umask()


def _give_final_mode(tmp: Path, target: Path) -> None:
    """The replaced file's permissions, owner and group; a new file's from the checkpoint it
    is written from (:func:`permissions_from`), else the umask's."""
    try:
        st = target.stat()
    except FileNotFoundError:
        os.chmod(tmp, _new_file_mode())
        return
    if hasattr(os, "chown"):
        with contextlib.suppress(PermissionError):  # only root may give a file to another user
            os.chown(tmp, st.st_uid, st.st_gid)
    os.chmod(tmp, st.st_mode & 0o7777)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    The temporary exists (empty, mode 0600) when the body starts; it is fsynced, given the old
    file's permissions, owner and group (a new file: the umask's permissions) and renamed over
    ``path``; on any error it is removed and ``path`` untouched.

    >>> with atomic_path("model.pth") as tmp:
    ...     torch.save(obj, tmp)
    """
    target = Path(path)
    if target.is_dir():
        raise CheckpointWriteError(f"{target} is a folder: pass a file name to write to")
    if not target.parent.is_dir():
        raise CheckpointWriteError(
            f"cannot write {target}: its folder {target.parent} does not exist (create it first)"
        )
    tmp = temp_path_for(target)
    _claim(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(errno.ENOENT, "nothing was written", str(tmp))
        _give_final_mode(tmp, target)
        fsync_path(tmp)
        crash_point("replace")
        os.replace(tmp, target)
        crash_point("replaced")
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_path(target.parent if str(target.parent) else Path("."))


def _open_temp(tmp: Path) -> int:
    # No O_TRUNC: atomic_path created the file empty, and truncating a file to 0 on ext4 arms
    # its auto_da_alloc heuristic, which makes close() flush the whole file synchronously.
    flags = os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    return os.open(tmp, flags)


@contextlib.contextmanager
def atomic_fd(path: str | os.PathLike[str]) -> Iterator[int]:
    """Yield a file descriptor to write (``os.pwrite``, ``os.copy_file_range``); on success
    its contents replace ``path`` atomically, as :func:`atomic_path` does.

    >>> with atomic_fd("model.pth") as fd:
    ...     os.pwrite(fd, data, 0)
    """
    with atomic_path(path) as tmp:
        fd = _open_temp(tmp)
        try:
            yield fd
        finally:
            os.close(fd)


#: How many written bytes :class:`Writeback` lets pile up before it hands them to the disk.
WRITEBACK_WINDOW = 32 << 20

_SYNC_FILE_RANGE: list[Any] = []  # [libc function or None], resolved on first use
_WRITE = 2  # SYNC_FILE_RANGE_WRITE (linux/fs.h): start writeback, wait for nothing


def _sync_file_range() -> Any:
    if not _SYNC_FILE_RANGE:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
            except (OSError, AttributeError, ImportError):
                fn = None
        _SYNC_FILE_RANGE.append(fn)
    return _SYNC_FILE_RANGE[0]


class Writeback:
    """Start the disk writing a file that is being written front to back, window by window.

    Call :meth:`wrote` with how far the file is written; every ``window`` bytes, the kernel is
    asked to start writing them out (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which waits
    for nothing), so the disk works while the copy runs and the closing fsync has less left to
    do. Nothing is waited for here: the kernel's dirty-page limits hold memory back, as for any
    writer (waiting for each window made the copy stall, and measured slower). This promises no
    durability (``sync_file_range`` flushes no metadata and no disk cache): the fsync before
    the rename still does, and must still run. A no-op off Linux, and after the first error (a
    file system that refuses it).
    """

    #: whether the byte copier writes this file's copied blocks directly (``O_DIRECT``:
    #: :func:`~.byte_copy.copy_range`); None until its first copy decides
    direct: bool | None = None

    def __init__(self, fd: int, window: int = WRITEBACK_WINDOW) -> None:
        self._fd = fd
        self._window = window
        self._started = 0  # [0, _started) has been handed to the disk
        self._fn = _sync_file_range() if window > 0 else None

    def wrote(self, end: int) -> None:
        """``[0, end)`` of the file is written."""
        if self._fn is None or end - self._started < self._window:
            return
        if self._fn(self._fd, self._started, end - self._started, _WRITE):
            self._fn = None  # refused (EINVAL, ESPIPE...): the fsync at the end does it all
        self._started = end


class KeptErrorWriter:
    """A binary file that remembers the first error its write() raised (torch.save hides a
    full disk, or a Ctrl-C, behind a RuntimeError from closing its zip); passes the crash
    hook first."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.error: BaseException | None = None

    def write(self, data: Any) -> int:
        try:
            crash_point("write")
            return self._file.write(data)
        except BaseException as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary file to write; on success its contents replace ``path`` atomically.

    >>> with atomic_file("model.pth") as f:
    ...     torch.save(obj, f)
    """
    with atomic_path(path) as tmp:
        with open(tmp, "r+b") as f:
            writer = KeptErrorWriter(f)
            try:
                yield writer  # type: ignore[misc]
            except BaseException as exc:
                if writer.error is not None and exc is not writer.error:
                    raise writer.error from exc  # the disk's error, not the writer's symptom
                raise


def copy_tree_synced(
    src: Path, dst: Path, copy_function: Callable[[str, str], object] | None = None
) -> None:
    """Copy the tree ``src`` to the new path ``dst`` and flush every file and folder in it
    (each file with ``copy_function``, default :func:`shutil.copy2`)."""
    import shutil

    copy = copy_function or shutil.copy2

    def copy_one(a: str, b: str) -> object:
        crash_point("write")
        return copy(a, b)

    shutil.copytree(src, dst, symlinks=True, copy_function=copy_one)
    for path in sorted(dst.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if not path.is_symlink():
            fsync_path(path)
    fsync_path(dst)


def remove_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries of ``path`` left by writers that died (their pid is gone).

    Only safe under the in-place lock (:mod:`ckptmigrate.formats.lock`), which every writer of an
    in-place file holds; returns what it removed.
    """
    target = Path(path)
    return remove_stale_temps_where(target.parent, lambda base: base == target.name)


def remove_stale_temps_where(folder: Path, wanted: Callable[[str], bool]) -> list[Path]:
    """Remove the temporaries in ``folder`` of dead writers whose target's name passes
    ``wanted`` (a sharded set sweeps those of its index, journal and new shards at once)."""
    import shutil

    removed = []
    with contextlib.suppress(OSError):
        for child in folder.iterdir():
            base, marker, _ = child.name.partition(TEMP_MARKER)
            match = _TEMP_NAME.fullmatch(child.name[len(base) :]) if marker else None
            if match is None or not wanted(base):
                continue
            if writer_alive(int(match.group(1)), match.group(2)):
                continue
            with contextlib.suppress(OSError):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)  # a half-copied folder backup or set
                else:
                    child.unlink()
                removed.append(child)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with ``pid`` runs (this one counts as running): the rule
    for names and records written before writers were tagged (:func:`writer_alive`)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _read_boot_id() -> str | None:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return Path("/proc/sys/kernel/random/boot_id").read_text("ascii").strip() or None
    return None


_BOOT_ID: list[str | None] = []  # [this boot's id or None], read on first use


def _boot_id() -> str | None:
    if not _BOOT_ID:
        _BOOT_ID.append(_read_boot_id())
    return _BOOT_ID[0]


def process_start(pid: int) -> int | None:
    """When the process ``pid`` started, in clock ticks after boot (``/proc/PID/stat`` field
    22), or None where that cannot be read (no such process, no ``/proc``, hidden from us)."""
    if pid <= 0:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        # field 2, the command, is in parentheses and may hold anything: count after the last ")"
        return int(stat[stat.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class WriterIdentity:
    """A process as the files it leaves name it: its pid, its start time and the boot and host
    it runs on. A pid alone may name another process later: after a reboot, in another pid
    namespace (containers sharing a volume) or on another host (NFS).

    Names carry :attr:`token` (``PID-TAG``, the tag a digest of the rest); journals and lock
    files carry :meth:`record`.

    >>> WriterIdentity.of(os.getpid()).token  # doctest: +SKIP
    '4242-9f3c01ab'
    """

    pid: int
    #: clock ticks after boot (``/proc/PID/stat`` field 22); None where unknown
    start: int | None
    #: ``/proc/sys/kernel/random/boot_id``; None where unknown
    boot: str | None
    host: str

    @classmethod
    def of(cls, pid: int) -> WriterIdentity:
        """The process ``pid`` of this boot and host, as it runs now."""
        import socket

        return cls(pid, process_start(pid), _boot_id(), socket.gethostname())

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> WriterIdentity | None:
        """The identity :meth:`record` wrote, or None for a record without one (written before
        writers were tagged, or not ours)."""
        pid, start, boot, host = (record.get(k) for k in ("pid", "start", "boot", "host"))
        if "boot" not in record or type(pid) is not int or not isinstance(host, str):
            return None
        if not (start is None or type(start) is int) or not (boot is None or type(boot) is str):
            return None
        return cls(pid, start, boot, host)

    @property
    def tag(self) -> str:
        """8 hex digits that differ, but for chance, when the start, boot or host differ."""
        import hashlib

        text = f"{self.start}\0{self.boot}\0{self.host}"
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]

    @property
    def token(self) -> str:
        """``PID-TAG``: what temporary and swap folder names carry."""
        return f"{self.pid}-{self.tag}"

    def record(self) -> dict[str, Any]:
        """The identity as a journal or lock file keeps it (JSON)."""
        return {"pid": self.pid, "start": self.start, "boot": self.boot, "host": self.host}

    def alive(self) -> bool:
        """Whether this very process still runs (see :func:`writer_alive`)."""
        return writer_alive(self.pid, self.tag)


_THIS_WRITER: dict[int, WriterIdentity] = {}  # by pid: a forked child is another writer


def this_writer() -> WriterIdentity:
    """This process's identity."""
    pid = os.getpid()
    if pid not in _THIS_WRITER:
        _THIS_WRITER[pid] = WriterIdentity.of(pid)
    return _THIS_WRITER[pid]


def writer_alive(pid: int, tag: str | None) -> bool:
    """Whether the writer that left ``PID-TAG`` in a name (or record) still runs: only if this
    boot and host run a process ``pid`` that started when the tagged one did. Our own pid with
    another start or boot is a previous container's or boot's writer, dead. ``tag`` None (a
    name written before writers were tagged): :func:`pid_alive`, the pid rule.
    """
    if tag is None:
        return pid_alive(pid)
    if pid <= 0 or not pid_alive(pid):
        return False
    now = WriterIdentity.of(pid)
    if now.start is None and os.path.isdir("/proc/self"):
        return True  # it runs, but /proc hides its start from us (hidepid): it may be ours
    return now.tag == tag


def recorded_writer_alive(record: Mapping[str, Any]) -> bool:
    """Whether the writer a journal or lock file records (its ``pid`` and ``host``, and since
    writers are tagged its ``start`` and ``boot``) still runs, as :func:`writer_alive` tells.
    A record of an older version (no ``boot``): on another host it cannot be told, so it
    counts as running; on this one, :func:`pid_alive`.
    """
    import socket

    writer = WriterIdentity.from_record(record)
    if writer is not None:
        return writer.alive()
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or type(pid) is not int or pid <= 0:
        return True
    return pid_alive(pid)
