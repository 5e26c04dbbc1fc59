"""Open a checkpoint file safely (no FIFO, no device, bounded reads), and the bytes that tell
the formats apart; :mod:`.registry` holds the formats and the one sniff.

>>> detect_format("model.pth")  # doctest: +SKIP
'torch-zip'
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

from ..errors import CheckpointFormatError, FileTooLargeError
from .remote import RemoteFile, RemotePath, is_url, location

__all__ = [
    "FORMATS",
    "INDEX_SUFFIX",
    "detect_format",
    "file_size",
    "open_regular_file",
    "read_bounded",
]

#: Every value :func:`detect_format` can return.
FORMATS = ("torch-zip", "torch-legacy", "safetensors", "dcp", "sharded")

#: How the index file of a Hugging Face-style sharded set is named (``model.safetensors.index.json``).
INDEX_SUFFIX = ".index.json"
ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
#: The int torch pickles first in a pre-zip (legacy) ``torch.save`` file.
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _stat_regular(path: str | os.PathLike[str]) -> os.stat_result:
    """``os.stat`` the path and insist on a regular file, with errors that name the problem."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        from .folder_swap import interrupted_swap_hint

        hint = interrupted_swap_hint(path)
        detail = f"no such file or directory: {hint}" if hint else "no such file or directory"
        raise CheckpointFormatError(detail, path=path) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointFormatError("symbolic link loop", path=path) from None
        raise CheckpointFormatError(f"cannot read it: {exc.strerror}", path=path) from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointFormatError("is a directory, expected a checkpoint file", path=path)
    if not stat.S_ISREG(st.st_mode):
        # A FIFO or device would block or stream forever; refuse before opening it.
        raise CheckpointFormatError(
            "is not a regular file (a pipe, socket or device?), expected a checkpoint file",
            path=path,
        )
    return st


def open_regular_file(path: str | os.PathLike[str] | RemotePath) -> BinaryIO:
    """Open a regular file for binary reading; refuse directories, FIFOs, sockets and devices.

    The check happens before opening (so a FIFO never blocks) and again on the open descriptor
    (so a path swapped for a FIFO in between is still refused). A URL opens its object for
    reads by range (:class:`~.remote.RemoteFile`).
    """
    if isinstance(path, RemotePath) or is_url(path):
        path = location(path)
        if isinstance(path, RemotePath):
            return path.open()  # type: ignore[return-value]
    _stat_regular(path)
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CheckpointFormatError("no such file or directory", path=path) from None
    except OSError as exc:
        raise CheckpointFormatError(f"cannot read it: {exc.strerror}", path=path) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointFormatError("is not a regular file", path=path)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_size(f: BinaryIO) -> int:
    """The size of the open file ``f``: its descriptor's, or a remote object's."""
    if isinstance(f, RemoteFile):
        return f.size
    return os.fstat(f.fileno()).st_size


def read_bounded(
    path: str | os.PathLike[str] | RemotePath, limit: int, what: str, rule: str
) -> bytes:
    """The bytes of the regular file at ``path``, refused past ``limit`` bytes with a
    :class:`~ckptmigrate.errors.FileTooLargeError` naming ``what`` and ``rule`` (the cap's
    purpose).

    Opened as :func:`open_regular_file` opens (a FIFO is refused and never blocks); the size is
    read from the open descriptor, and at most ``limit + 1`` bytes are read, so a file that
    grows while it is read is refused too (a 20 GB sparse index was read whole).

    >>> read_bounded("ckpt/.metadata", 1 << 30, "DCP metadata", "a pickle")  # doctest: +SKIP
    b'\\x80\\x04...'
    """
    with open_regular_file(path) as f:
        size = file_size(f)
        if size > limit:
            raise FileTooLargeError(what, size, limit, rule, path=path)
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise CheckpointFormatError(f"cannot read it: {exc.strerror}", path=path) from None
    if len(data) > limit:
        raise FileTooLargeError(what, len(data), limit, rule, path=path)
    return data


def detect_format(path: str | os.PathLike[str]) -> str:
    """Return the format of the checkpoint at ``path``: one of :data:`FORMATS`.

    The name of what :func:`~ckptmigrate.formats.registry.detect` finds (a model folder of one
    weights file has that file's format). Raises
    :class:`~ckptmigrate.errors.CheckpointFormatError` for anything else.

    >>> detect_format("weights.safetensors")  # doctest: +SKIP
    'safetensors'
    """
    from .registry import reader_for

    return reader_for(path)[1].name
