"""Copy bytes between two files' offsets inside the kernel where it can, through a bounded
buffer where it cannot; a :class:`~.atomic.Writeback` hears of each chunk written.

A file system that shares extents (XFS with reflink, btrfs) clones what ``copy_file_range``
is given only when both offsets and the length are whole blocks; so a range that starts and
ends off a block boundary is copied as three calls, the unaligned head, the aligned middle
(cloned: no data moves, no space is used) and the tail. The writers lay a copied record out at
the same offset modulo :data:`BLOCK` as in its source so that the middle can be cloned.

Where the copy goes to a file that is written front to back and fsynced before its rename (a
:class:`~.atomic.Writeback` comes with it) on a file system whose ``copy_file_range`` neither
clones nor copies on a server, only through the page cache (ext2/3/4), the whole blocks are
written with ``O_DIRECT`` straight from the source's pages, mapped :data:`DIRECT_STEP` at a
time: no second copy of the bytes in memory, no dirty pages for the fsync to wait on, and
memory bounded by one window. The fsync before the rename stays (it makes the file's metadata
and the disk's cache durable). A file system that refuses ``O_DIRECT`` gets the kernel copy.

>>> copy_range(src_fd, 4096, dst_fd, 0, size)  # doctest: +SKIP
0
"""

from __future__ import annotations

import errno
import os
import sys

from ..errors import CheckpointFormatError
from . import atomic
from .atomic import Writeback

__all__ = [
    "BLOCK",
    "DIRECT_LEAST",
    "DIRECT_STEP",
    "WRITEBACK_STEP",
    "copy_file",
    "copy_range",
    "next_call",
]

_CHUNK = 8 << 20
#: With a writeback, copy_file_range moves this much per call, so the disk hears of it early.
WRITEBACK_STEP = 16 << 20
#: The block a clone shares: ranges are split at multiples of it (4 KiB, the page size and the
#: block size of XFS and btrfs as made by default).
BLOCK = 4096
# copy_file_range is missing or refused across some filesystems: fall back to pread/pwrite
_NO_KERNEL_COPY = {errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}
#: A direct copy writes this much per call, from this much of the source mapped (then unmapped:
#: the process holds one window of the source's pages at a time).
DIRECT_STEP = 16 << 20
#: A range shorter than this is left to the kernel copy (not worth a mapping).
DIRECT_LEAST = 1 << 20
#: ``statfs`` magic numbers of the file systems whose copy_file_range copies through the page
#: cache (no ``remap_file_range`` clone, no server-side copy): ext2, ext3 and ext4 share one.
PAGE_COPYING_FILE_SYSTEMS = frozenset({0xEF53})


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
    per writeback window: :func:`next_call`) and falls back to 8 MiB pread/pwrite chunks where
    the kernel refuses, so memory stays bounded either way. With ``writeback`` (the
    destination is a new file written front to back, fsynced before it is renamed into place),
    on a file system that would copy through the page cache, the whole blocks go to the disk
    directly (:func:`_copy_direct`) where both offsets sit alike within a :data:`BLOCK`.
    ``writeback`` hears of every chunk written (see :class:`~.atomic.Writeback`).
    """
    through_python = 0
    if (
        writeback is not None
        and count >= DIRECT_LEAST
        and (src_offset - dst_offset) % BLOCK == 0
        and _goes_direct(writeback, dst_fd)
    ):
        head = min(-dst_offset % BLOCK, count)  # a range shorter than its head: all head
        whole = (count - head) // BLOCK * BLOCK
        through_python += _kernel_copy(src_fd, src_offset, dst_fd, dst_offset, head, writeback)
        done = head + _copy_direct(
            src_fd, src_offset + head, dst_fd, dst_offset + head, whole, writeback
        )
        src_offset, dst_offset, count = src_offset + done, dst_offset + done, count - done
    return through_python + _kernel_copy(src_fd, src_offset, dst_fd, dst_offset, count, writeback)


def _kernel_copy(
    src_fd: int,
    src_offset: int,
    dst_fd: int,
    dst_offset: int,
    count: int,
    writeback: Writeback | None,
) -> int:
    """:func:`copy_range` by ``copy_file_range``, or pread/pwrite where it is refused."""
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


def _goes_direct(writeback: Writeback, dst_fd: int) -> bool:
    """Whether copies into ``dst_fd`` write whole blocks directly: decided once per file."""
    if writeback.direct is None:
        writeback.direct = hasattr(os, "O_DIRECT") and (
            file_system_type(dst_fd) in PAGE_COPYING_FILE_SYSTEMS
        )
    return writeback.direct


def file_system_type(fd: int) -> int | None:
    """The ``statfs`` magic number of the file system holding ``fd`` (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fstatfs = ctypes.CDLL(None, use_errno=True).fstatfs
        buf = ctypes.create_string_buffer(512)  # struct statfs: 120 bytes on 64-bit Linux
        if fstatfs(fd, buf) != 0:
            return None
        return ctypes.c_long.from_buffer(buf).value  # f_type, its first field
    except (OSError, AttributeError, ImportError):
        return None


def _copy_direct(
    src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, count: int, writeback: Writeback
) -> int:
    """Write ``count`` bytes of the source from ``src_offset`` at ``dst_offset`` (all three
    whole blocks) with ``O_DIRECT``, from the source's pages mapped :data:`DIRECT_STEP` at a
    time; returns how many were written. Where the file system refuses (no ``O_DIRECT``, a
    file that cannot be mapped, an alignment it does not take) it stops early, and this file's
    later copies, with the rest, go through the kernel copy."""
    import fcntl
    import mmap

    flags = fcntl.fcntl(dst_fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(dst_fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        writeback.direct = False
        return 0
    done = 0
    try:
        while done < count:
            atomic.crash_point("write")  # looked up here: tests record it
            at, n = src_offset + done, min(DIRECT_STEP, count - done)
            base = at - at % mmap.ALLOCATIONGRANULARITY
            try:
                window = mmap.mmap(
                    src_fd, at - base + n, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=base
                )
            except ValueError:  # the range runs past the source's end
                raise CheckpointFormatError(
                    f"source ends {count - done} bytes early while copying a member"
                ) from None
            except OSError:
                writeback.direct = False  # a file that cannot be mapped
                break
            try:
                with memoryview(window)[at - base :] as view:
                    written = os.pwrite(dst_fd, view, dst_offset + done)
            except OSError as exc:
                if exc.errno == errno.EFAULT:  # a mapped page past the end: the source shrank
                    raise CheckpointFormatError(
                        "the source got shorter while a member was copied from it"
                    ) from None
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                writeback.direct = False  # an alignment or a file it refuses
                break
            finally:
                window.close()
            if written <= 0:
                writeback.direct = False
                break
            done += written
            writeback.wrote(dst_offset + done)
    finally:
        fcntl.fcntl(dst_fd, fcntl.F_SETFL, flags)
    return done


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
