"""A lock beside a checkpoint file, held while ckptmigrate rewrites it in place.

The lock is the file ``NAME.ckptmigrate.lock`` next to ``NAME``, holding the holder's identity
(pid, host, process start and boot id: :class:`.formats.atomic.WriterIdentity`) and the time it
took the lock (JSON), so that a waiter can say who holds it.

Where the OS and file system support it (Linux, macOS, NFSv4), the lock is an ``flock`` on that
file: the kernel drops it when its holder exits, however it exits, so a lock left by a killed
process is never mistaken for a live one and no timeout guesses are needed. The holder removes
the file on release, while still holding the ``flock``; a waiter that locked a file which was
meanwhile unlinked or replaced sees its inode differ from the path's and tries again.

Where ``flock`` is missing or refused (Windows, some network or FUSE file systems) the lock
is the file's existence, created with ``O_CREAT|O_EXCL``. It is stale, and taken over, when its
holder is gone from this host (no process of its pid, or one that started at another time or
boot), or when it has not been refreshed for ``stale_after`` seconds (its holder refreshes it
every ``stale_after / 4`` seconds while it works).

>>> with file_lock("model.pth", timeout=60):
...     ...  # re-read model.pth, plan, write it atomically
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import LockError, LockTimeoutError, UsageError
from .atomic import recorded_writer_alive, this_writer
from .detect import INDEX_SUFFIX, open_regular_file

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_SUFFIX", "FileLock", "file_lock", "lock_path_for", "read_lock_holder"]

LOCK_SUFFIX = ".ckptmigrate.lock"
#: How long a waiter waits by default before :class:`LockTimeoutError`.
DEFAULT_TIMEOUT = 120.0
#: Exclusive-file mode only: a lock not refreshed for this long is stale.
DEFAULT_STALE_AFTER = 600.0
# flock errors that mean "this file system cannot lock", not "someone holds it"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def lock_path_for(path: str | os.PathLike[str]) -> Path:
    """``model.pth`` -> ``model.pth.ckptmigrate.lock`` (same folder).

    One checkpoint, one lock, whatever name it goes by: a link resolves to what it names, and
    a sharded set named by its index file locks as its folder does (``llama/`` and
    ``llama/model.safetensors.index.json`` both take ``llama.ckptmigrate.lock``).
    """
    path = Path(os.path.realpath(path))
    if path.name.endswith(INDEX_SUFFIX):
        path = path.parent
    return path.with_name(path.name + LOCK_SUFFIX)


def read_lock_holder(lock: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What a lock file says about its holder (pid, host, time), or None if unreadable."""
    try:
        with open_regular_file(lock) as f:  # a FIFO planted at the name would block a read
            data = json.loads(f.read(4096).decode("utf-8"))
    except (OSError, ValueError):  # CheckpointFormatError is a ValueError
        return None
    return data if isinstance(data, dict) else None


def _holder_record() -> bytes:
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    record = {**this_writer().record(), "time": now}
    return json.dumps(record).encode()


class FileLock:
    """An exclusive lock on ``path`` through ``NAME.ckptmigrate.lock`` beside it.

    ``mode`` is ``"auto"`` (flock where it works, else an exclusive file), ``"flock"`` or
    ``"exclusive"``. ``acquire`` waits up to ``timeout`` seconds, then raises
    :class:`~ckptmigrate.errors.LockTimeoutError` naming the holder.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        poll: float = 0.05,
        stale_after: float = DEFAULT_STALE_AFTER,
        mode: str = "auto",
    ) -> None:
        if mode not in ("auto", "flock", "exclusive"):
            raise UsageError(f"mode must be 'auto', 'flock' or 'exclusive', not {mode!r}")
        self.path = Path(path)
        self.lock_path = lock_path_for(self.path)
        self.timeout = timeout
        self.poll = poll
        self.stale_after = stale_after
        self.mode = "exclusive" if mode == "auto" and fcntl is None else mode
        self._fd: int | None = None
        self._ino: tuple[int, int] | None = None
        self._stop: threading.Event | None = None

    @property
    def held(self) -> bool:
        return self._ino is not None

    def acquire(self) -> FileLock:
        """Take the lock, waiting at most ``timeout`` seconds."""
        if self.held:
            raise LockError(f"{self.lock_path} is already held by this FileLock")
        deadline = time.monotonic() + self.timeout
        while True:
            if self.mode != "exclusive" and self._try_flock():
                return self
            if self.mode == "exclusive" and self._try_exclusive():
                return self
            if time.monotonic() >= deadline:
                raise LockTimeoutError(
                    self.path, self.lock_path, read_lock_holder(self.lock_path), self.timeout
                )
            time.sleep(self.poll)

    def release(self) -> None:
        """Remove the lock file and let the next waiter in (idempotent)."""
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        if self._ino is not None:
            with contextlib.suppress(OSError):
                st = os.stat(self.lock_path, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == self._ino:
                    os.unlink(self.lock_path)  # still holding the flock: nobody sees it free
            self._ino = None
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- flock mode ------------------------------------------------------------------------

    def _open_lock_file(self, flags: int) -> int:
        flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        flags |= getattr(os, "O_NONBLOCK", 0)  # a FIFO at the name must not block the open
        try:
            fd = os.open(self.lock_path, flags, 0o666)
        except FileExistsError:
            raise
        except OSError as exc:
            raise LockError(
                f"cannot create the lock file {self.lock_path} ({exc.strerror}): an in-place "
                "rewrite needs write access to the file's folder"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise LockError(
                f"{self.lock_path} is not a regular file, so it is not a lock ckptmigrate made: "
                "remove it and run again"
            )
        return fd

    def _try_flock(self) -> bool:
        fd = self._open_lock_file(os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_FLOCK and self.mode == "auto":
                self.mode = "exclusive"
                return False
            raise LockError(f"cannot lock {self.lock_path}: {exc.strerror}") from None
        try:
            here = os.stat(self.lock_path, follow_symlinks=False)
        except FileNotFoundError:
            here = None
        mine = os.fstat(fd)
        if here is None or (here.st_dev, here.st_ino) != (mine.st_dev, mine.st_ino):
            os.close(fd)  # the holder before us removed or replaced it: lock the new one
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_record(), 0)
        self._fd, self._ino = fd, (mine.st_dev, mine.st_ino)
        return True

    # -- exclusive-file mode ---------------------------------------------------------------

    def _try_exclusive(self) -> bool:
        try:
            fd = self._open_lock_file(os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            self._break_if_stale()
            return False
        try:
            os.write(fd, _holder_record())
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self._ino = (st.st_dev, st.st_ino)
        self._stop = threading.Event()
        threading.Thread(target=self._refresh, args=(self._stop,), daemon=True).start()
        return True

    def _refresh(self, stop: threading.Event) -> None:
        while not stop.wait(self.stale_after / 4):
            with contextlib.suppress(OSError):
                os.utime(self.lock_path)

    def is_stale(self) -> bool:
        """True if the lock file's holder is gone (from this host: see
        :func:`.formats.atomic.writer_alive`) or stopped refreshing."""
        try:
            age = time.time() - os.stat(self.lock_path, follow_symlinks=False).st_mtime
        except FileNotFoundError:
            return False
        if age > self.stale_after:
            return True
        holder = read_lock_holder(self.lock_path)
        if holder is None or holder.get("host") != socket.gethostname():
            return False  # being written right now, or another host's: only age tells
        return not recorded_writer_alive(holder)

    def _break_if_stale(self) -> None:
        if not self.is_stale():
            return
        # Rename, not unlink: of several waiters judging the same stale file, one wins.
        grave = self.lock_path.with_name(f"{self.lock_path.name}.stale-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.lock_path, grave)
            os.unlink(grave)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str], **options: Any) -> Iterator[FileLock]:
    """Hold the lock beside ``path`` for the ``with`` block (released on any exit)."""
    lock = FileLock(path, **options)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
