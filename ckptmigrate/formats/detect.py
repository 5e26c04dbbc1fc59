"""Tell which checkpoint format a path holds by its first bytes, without trusting its name.

>>> detect_format("model.pth")  # doctest: +SKIP
'torch-zip'
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path
from typing import BinaryIO

from ..errors import CheckpointFormatError, FileTooLargeError

__all__ = ["FORMATS", "INDEX_SUFFIX", "detect_format", "open_regular_file", "read_bounded"]

#: Every value :func:`detect_format` can return.
FORMATS = ("torch-zip", "torch-legacy", "safetensors", "dcp", "sharded")

#: How the index file of a Hugging Face-style sharded set is named (``model.safetensors.index.json``).
INDEX_SUFFIX = ".index.json"
ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
#: The int torch pickles first in a pre-zip (legacy) ``torch.save`` file.
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LONG1 = 0x8A
_FRAME = 0x95


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


def open_regular_file(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a regular file for binary reading; refuse directories, FIFOs, sockets and devices.

    The check happens before opening (so a FIFO never blocks) and again on the open descriptor
    (so a path swapped for a FIFO in between is still refused).
    """
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


def read_bounded(path: str | os.PathLike[str], limit: int, what: str, rule: str) -> bytes:
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
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise FileTooLargeError(what, size, limit, rule, path=path)
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise CheckpointFormatError(f"cannot read it: {exc.strerror}", path=path) from None
    if len(data) > limit:
        raise FileTooLargeError(what, len(data), limit, rule, path=path)
    return data


def _is_legacy_torch_pickle(head: bytes) -> bool:
    """True if ``head`` starts a pickle whose first object is torch's legacy magic number."""
    if len(head) < 2 or head[0] != 0x80:
        return False
    pos = 2
    if head[1] >= 4 and len(head) > pos and head[pos] == _FRAME:
        pos += 9  # FRAME opcode + 8-byte frame length (pickle protocol 4+)
    if len(head) < pos + 2 or head[pos] != _LONG1:
        return False
    size = head[pos + 1]
    raw = head[pos + 2 : pos + 2 + size]
    return len(raw) == size and int.from_bytes(raw, "little", signed=True) == TORCH_LEGACY_MAGIC


def _is_safetensors(head: bytes, file_size: int) -> bool:
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 0 < header_len <= file_size - 8 and head[8:9] == b"{"


def _detect_directory(path: Path) -> str:
    if (path / ".metadata").is_file():
        return "dcp"
    if any(child.is_file() for child in path.glob("*" + INDEX_SUFFIX)):
        return "sharded"
    from .model_folder import weights_file

    weights = weights_file(path)  # a save_pretrained folder of one file: that file's format
    if weights is not None:
        return detect_format(weights)
    raise CheckpointFormatError(
        "is a directory but neither a torch.distributed checkpoint (no .metadata file) nor a "
        "sharded checkpoint (no *.index.json file)",
        path=path,
    )


def detect_format(path: str | os.PathLike[str]) -> str:
    """Return the format of the checkpoint at ``path``: one of :data:`FORMATS`.

    Files are told apart by their magic bytes; directories by their index files; a sharded
    set may also be named by its index file (``*.index.json`` holding a JSON object). A model
    folder holding one weights file and no index (:mod:`.model_folder`) has that file's
    format. Raises
    :class:`~ckptmigrate.errors.CheckpointFormatError` for anything else.

    >>> detect_format("weights.safetensors")  # doctest: +SKIP
    'safetensors'
    """
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        return _detect_directory(Path(path))
    with open_regular_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise CheckpointFormatError("is empty (0 bytes), expected a checkpoint", path=path)
        head = f.read(64)
    if str(path).endswith(INDEX_SUFFIX) and head.lstrip().startswith(b"{"):
        return "sharded"
    if head.startswith(ZIP_MAGIC) or head.startswith(EMPTY_ZIP_MAGIC):
        return "torch-zip"
    if _is_legacy_torch_pickle(head):
        return "torch-legacy"
    if _is_safetensors(head, size):
        return "safetensors"
    raise CheckpointFormatError(
        f"unknown format (first bytes {head[:8]!r}): expected a torch.save zip or legacy "
        "file, or a safetensors file",
        path=path,
    )
