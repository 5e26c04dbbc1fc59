"""Write a safetensors file whose tensor bytes are copied from other safetensors files as stored.

A rename or drop changes only the header; the data of each kept tensor moves with
``os.copy_file_range`` from wherever it lies (one file, or the shards of a set), so no tensor
passes through Python, and the disk writes behind the copy (:class:`~.atomic.Writeback`).
Tied names (one stub under several keys) are stored once and recorded as
``ckptmigrate.aliases``, as :mod:`.safetensors_file` does.

>>> write_safetensors_copy("new.safetensors", [("w", stub)], {id(stub): (src, 1024)}, {})  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from ..values.tensorinfo import SAFETENSORS_DTYPES, TensorStub
from . import atomic
from .atomic import Writeback, atomic_fd
from .byte_copy import copy_range
from .detect import open_regular_file
from .safetensors_file import ALIASES

__all__ = ["data_start", "write_safetensors_copy"]

_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def data_start(path: str | os.PathLike[str]) -> int:
    """The file offset where a safetensors file's data section begins."""
    with open_regular_file(path) as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    return 8 + header_len


def write_safetensors_copy(
    dst: str | os.PathLike[str],
    entries: list[tuple[str, TensorStub]],
    sources: dict[int, tuple[Path, int]],
    metadata: dict[str, str],
) -> tuple[int, int]:
    """Write ``entries`` to ``dst`` atomically, each stub's bytes copied from its source.

    ``sources`` maps ``id(stub)`` to ``(file, absolute offset of its first byte)``. Returns
    ``(bytes copied, bytes that went through Python)``.
    """
    header: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    stored: dict[int, str] = {}
    copies: list[tuple[Path, int, int, int]] = []
    position = 0
    for key, stub in entries:
        if id(stub) in stored:
            aliases[key] = stored[id(stub)]
            continue
        stored[id(stub)] = key
        nbytes = stub.info.nbytes
        header[key] = {
            "dtype": _CODES[stub.dtype],
            "shape": list(stub.shape),
            "data_offsets": [position, position + nbytes],
        }
        src, offset = sources[id(stub)]
        copies.append((src, offset, position, nbytes))
        position += nbytes
    meta = dict(metadata)
    meta.pop(ALIASES, None)
    if aliases:
        meta[ALIASES] = json.dumps(aliases)
    meta["ckptmigrate.order"] = json.dumps([key for key, _ in entries])
    raw = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors pads it
    head = struct.pack("<Q", len(raw)) + raw
    copied = through_python = 0
    with atomic_fd(dst) as out:
        _pwrite_all(out, head, 0)
        writeback = Writeback(out)
        opened: dict[Path, Any] = {}
        try:
            for src, offset, position, nbytes in copies:
                if src not in opened:
                    opened[src] = open_regular_file(src)
                through_python += copy_range(
                    opened[src].fileno(), offset, out, len(head) + position, nbytes, writeback
                )
                copied += nbytes
        finally:
            for f in opened.values():
                f.close()
    return copied, through_python


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        atomic.crash_point("write")  # looked up here: tests record it
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
