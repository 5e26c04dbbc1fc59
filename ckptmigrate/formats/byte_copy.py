"""Copy bytes between two files' offsets inside the kernel where it can, through a bounded
buffer where it cannot; a :class:`~.atomic.Writeback` hears of each chunk written.

A file system that shares extents (XFS with reflink, btrfs) clones what ``copy_file_range``
is given only when both offsets and the length are whole blocks; so a range that starts and
ends off a block boundary is copied as three calls, the unaligned head, the aligned middle
(cloned: no data moves, no space is used) and the tail. The writers lay a copied record out at
the same offset modulo :data:`BLOCK` as in its source so that the middle can be cloned.

>>> copy_range(src_fd, 4096, dst_fd, 0, size)  # doctest: +SKIP
0
"""

from __future__ import annotations

import errno
import os

from ..errors import CheckpointFormatError
from . import atomic
from .atomic import Writeback

__all__ = ["BLOCK", "WRITEBACK_STEP", "copy_file", "copy_range", "next_call"]

_CHUNK = 8 << 20
#: With a writeback, copy_file_range moves this much per call, so the disk hears of it early.
WRITEBACK_STEP = 16 << 20
#: The block a clone shares: ranges are split at multiples of it (4 KiB, the page size and the
#: block size of XFS and btrfs as made by default).
BLOCK = 4096
# copy_file_range is missing or refused across some filesystems: fall back to pread/pwrite
_NO_KERNEL_COPY = {errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}


def copy_range(
    src_fd: int,
    src_offset: int,
    dst_fd: int,
    dst_offset: int,
    count: int,
    writeback: Writeback | None = None,
) -> int:
    """Copy ``count`` bytes between file offsets; returns how many went through Python.

    Uses ``os.copy_file_range`` (no user-space copy; one call per block-aligned part, or one
    per writeback window: :func:`next_call`) and falls back to 8 MiB pread/pwrite chunks where the kernel refuses, so memory stays
    bounded either way. ``writeback`` hears of every chunk written (see
    :class:`~.atomic.Writeback`).
    """
    through_python = 0
    kernel = hasattr(os, "copy_file_range")
    step = WRITEBACK_STEP if writeback is not None else count
    while count > 0:
        atomic.crash_point("write")  # looked up here: tests record it
        if kernel:
            try:
                ask = next_call(src_offset, dst_offset, count, step)
                n = os.copy_file_range(src_fd, dst_fd, ask, src_offset, dst_offset)
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY:
                    raise
                kernel = False
                continue
        else:
            data = os.pread(src_fd, min(count, _CHUNK), src_offset)
            n = len(data)
            if n:
                written = 0
                while written < n:
                    written += os.pwrite(dst_fd, data[written:], dst_offset + written)
                through_python += n
        if n == 0:
            raise CheckpointFormatError(f"source ends {count} bytes early while copying a member")
        src_offset += n
        dst_offset += n
        count -= n
        if writeback is not None:
            writeback.wrote(dst_offset)
    return through_python


def copy_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> int:
    """Copy the file ``src`` to ``dst`` whole, atomically and durably (a shard no tensor of
    which changed), inside the kernel where it can (cloned on XFS reflink, btrfs); returns how
    many bytes went through Python."""
    from .detect import open_regular_file

    with open_regular_file(src) as source, atomic.atomic_fd(dst) as out:
        size = os.fstat(source.fileno()).st_size
        return copy_range(source.fileno(), 0, out, 0, size, Writeback(out))


def next_call(src_offset: int, dst_offset: int, count: int, step: int) -> int:
    """How many bytes the next ``copy_file_range`` call asks for: at most ``step``, and where
    both offsets sit alike within a :data:`BLOCK`, the head up to the next block boundary, then
    whole blocks, then the tail, so that a file system that clones clones the middle.

    >>> next_call(4000, 8096, 10000, 1 << 30), next_call(4096, 8192, 9904, 1 << 30)
    (96, 8192)
    """
    ask = min(count, step)
    if src_offset % BLOCK != dst_offset % BLOCK:
        return ask  # no clone can line up: one plain copy
    head = -src_offset % BLOCK
    if head:
        return min(ask, head)
    whole = count - count % BLOCK
    return min(ask, whole) if whole else ask
