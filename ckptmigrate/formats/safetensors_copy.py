"""Write a safetensors file whose tensor bytes are copied from other safetensors files as stored.

A rename or drop changes only the header; the data of each kept tensor moves with
``os.copy_file_range`` from wherever it lies (one file, or the shards of a set), so no tensor
passes through Python, and the disk writes behind the copy (:class:`~.atomic.Writeback`).
Tied names (one stub under several keys) are stored once and recorded as
``ckptmigrate.aliases``, as :mod:`.safetensors_file` does. :func:`write_safetensors_parts`
mixes copied tensors with new ones written from memory (a migration's merged or cast tensors).
The header is padded so that copied bytes keep their offset within a block where they can, and
a file system that clones shares them.

>>> write_safetensors_copy("new.safetensors", [("w", stub)], {id(stub): (src, 1024)}, {})  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointWriteError, NotReplayableError
from ..values.pieces import DerivedStub
from ..values.tensorinfo import SAFETENSORS_DTYPES, TensorStub
from .byte_copy import BLOCK
from .detect import open_regular_file
from .safetensors_file import ALIASES
from .sink import open_copy

__all__ = [
    "Part",
    "data_start",
    "write_safetensors_copy",
    "write_safetensors_parts",
]

_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def data_start(path: str | os.PathLike[str]) -> int:
    """The file offset where a safetensors file's data section begins."""
    with open_regular_file(path) as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    return 8 + header_len


@dataclass(frozen=True, eq=False)
class Part:
    """One tensor of a safetensors file to write: its header entry, and its bytes either at
    ``source`` (a file and the offset of its first byte: copied as stored), in ``runs`` (ranges
    of files laid end to end: a merged tensor's parts, copied as stored) or in ``data``
    (written from memory). The same part under several keys is stored once (tied names)."""

    dtype: str  # a ckptmigrate dtype name: "float32", "bfloat16"...
    shape: tuple[int, ...]
    nbytes: int
    source: tuple[Path, int] | None = None
    data: memoryview | None = None
    keep: Any = None  # what ``data`` points into, kept alive until it is written
    #: the bytes, made when their turn comes (a tensor read or computed): one in memory
    produce: Callable[[], memoryview] | None = None
    runs: tuple[tuple[Path, int, int], ...] | None = None  # (file, offset, byte count)

    @property
    def copied_from(self) -> tuple[tuple[Path, int, int], ...] | None:
        """The ranges of files its bytes are copied from, in order; None: written from memory."""
        if self.runs is not None:
            return self.runs
        return None if self.source is None else ((*self.source, self.nbytes),)


def write_safetensors_copy(
    dst: str | os.PathLike[str],
    entries: list[tuple[str, TensorStub]],
    sources: dict[int, tuple[Path, int]],
    metadata: dict[str, str],
) -> tuple[int, int]:
    """Write ``entries`` to ``dst`` atomically, each stub's bytes copied from its source.

    ``sources`` maps ``id(stub)`` to ``(file, absolute offset of its first byte)``; a
    :class:`~ckptmigrate.values.pieces.DerivedStub` (a Merge or Split along dim 0 run on the
    stubs) is copied from its pieces' bytes. Returns ``(bytes copied, bytes that went through
    Python)``.
    """
    parts: dict[int, Part] = {}
    for _, stub in entries:
        if id(stub) not in parts:
            info = stub.info
            if isinstance(stub, DerivedStub):
                runs = []
                for piece in stub.pieces:
                    if id(piece.stub) not in sources:
                        raise NotReplayableError(f"a tensor {piece.stub!r} has no stored bytes")
                    path, offset = sources[id(piece.stub)]
                    runs.append((path, offset + piece.start, piece.nbytes))
                part = Part(info.dtype, tuple(info.shape), info.nbytes, runs=tuple(runs))
            else:
                part = Part(info.dtype, tuple(info.shape), info.nbytes, sources[id(stub)])
            parts[id(stub)] = part
    return write_safetensors_parts(dst, [(key, parts[id(stub)]) for key, stub in entries], metadata)


def write_safetensors_parts(
    dst: str | os.PathLike[str],
    entries: list[tuple[str, Part]],
    metadata: dict[str, str],
    *,
    origins: dict[Any, Any] | None = None,
) -> tuple[int, int]:
    """Write ``entries`` to ``dst`` atomically: a header, then each part's bytes, copied from
    its source or written from memory. The header is padded so that the data start where
    most copied bytes keep their source's offset modulo :data:`~.byte_copy.BLOCK`, so a file
    system that clones (XFS reflink, btrfs) shares their blocks. Returns ``(bytes copied,
    bytes that went through Python)``. ``dst`` and the sources may be objects
    (:mod:`.sink`); ``origins`` maps a local source to the object it is a private copy of,
    whose bytes an upload to its store copies server-side."""
    aliases: dict[str, str] = {}
    stored: dict[int, str] = {}
    unique: list[tuple[str, Part]] = []
    for key, part in entries:
        if id(part) in stored:
            aliases[key] = stored[id(part)]
            continue
        stored[id(part)] = key
        unique.append((key, part))
    # the data lie in the order of their sources (so a run copied from one file keeps one
    # offset within a block throughout: a rename that reorders keys still clones), the new
    # tensors after them; the header keeps the keys' order
    order = sorted(
        range(len(unique)),
        key=lambda i: (0, str(s[0][0]), s[0][1]) if (s := unique[i][1].copied_from) else (1, "", i),
    )
    offsets: dict[int, int] = {}
    placed: list[tuple[Part, int]] = []
    position = 0
    for i in order:
        part = unique[i][1]
        offsets[i] = position
        placed.append((part, position))
        position += part.nbytes
    header: dict[str, Any] = {
        key: {
            "dtype": _CODES[part.dtype],
            "shape": list(part.shape),
            "data_offsets": [offsets[i], offsets[i] + part.nbytes],
        }
        for i, (key, part) in enumerate(unique)
    }
    meta = dict(metadata)
    meta.pop(ALIASES, None)
    if aliases:
        meta[ALIASES] = json.dumps(aliases)
    meta["ckptmigrate.order"] = json.dumps([key for key, _ in entries])
    raw = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode("utf-8")
    # the data section starts 8-byte aligned, as safetensors pads it, and where clones line up
    residue = _data_residue(placed)
    raw += b" " * ((-8 - len(raw)) % 8 if residue is None else (residue - 8 - len(raw)) % BLOCK)
    head = struct.pack("<Q", len(raw)) + raw
    copied = through_python = 0
    sources = [
        (src, origins.get(src) if origins else None)
        for part, _ in placed
        for src, _, _ in part.copied_from or ()
    ]
    with open_copy(dst, sources) as job:
        sink = job.sink
        sink.write(head)
        for part, _ in placed:  # front to back: each part lies right after the one before
            runs = part.copied_from
            if runs is None:
                data = part.produce() if part.produce is not None else part.data
                if data is not None and len(data) != part.nbytes:
                    raise CheckpointWriteError(
                        f"a tensor came out {len(data)} bytes long, but its header entry "
                        f"says {part.nbytes}"
                    )
                sink.write(data if data is not None else b"")
                del data
                through_python += part.nbytes
                continue
            # a merged tensor's runs one after another: a local file copies each with
            # copy_file_range, an upload copies each on the server (or reads a short one)
            for src, offset, count in runs:
                through_python += sink.copy(job.source(src), offset, count)
                copied += count
    through_python += sink.bytes_read_through
    return copied, through_python


def _data_residue(placed: list[tuple[Part, int]]) -> int | None:
    """Where in a block the data section should start: the residue (a multiple of 8) that
    puts the most copied bytes at their source's offset modulo a block."""
    votes: Counter[int] = Counter()
    for part, at in placed:
        runs = part.copied_from
        if runs:
            residue = (runs[0][1] - at) % BLOCK
            if residue % 8 == 0:
                votes[residue] += part.nbytes
    return votes.most_common(1)[0][0] if votes else None
