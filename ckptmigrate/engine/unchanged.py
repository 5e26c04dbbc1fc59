"""Which tensors of a planned result are the input's own, unchanged: those are copied as stored.

A plan that is not metadata-only runs over the tensors mapped from the file
(:meth:`~.rewrite.Source.tensors`). Every tensor it returns untouched (renamed, moved, kept,
or a view of one) still points into the input's memory, and the read-only guard
(:mod:`.guard`) has refused any step that wrote into that memory; so its bytes are the file's,
and the writer copies them from the file instead of serialising them. :class:`InputBytes`
records, right after the load and before any step runs, where each input tensor's memory lies
in its file, and answers for an output tensor or storage: where its bytes lie, or None (a new
tensor: written from memory).

The guard is not the only proof. The loaders map the file private (``MAP_PRIVATE``), so a
page written by any path (a tensor's ``untyped_storage()`` assigned, ctypes) turns anonymous
(copy on write). On Linux ``/proc/self/pagemap`` tells, for each run right after the load
and again when the writer asks, whether its pages are still the file's: a run whose memory is
a copy (anonymous pages) is written from memory, and a page written after the load is an
:class:`~ckptmigrate.errors.InPlaceWriteError`, nothing written.

>>> inputs = InputBytes.of(source, loaded)  # doctest: +SKIP
>>> inputs.storage_record(merged.untyped_storage()) is None  # doctest: +SKIP
True
"""

from __future__ import annotations

import bisect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InPlaceWriteError
from ..values.checkpoint import Checkpoint
from ..values.tensorinfo import TensorStub

__all__ = ["InputBytes", "Stored"]


@dataclass(frozen=True)
class Stored:
    """A run of an input file's bytes that an input tensor's memory holds as read."""

    path: Path
    offset: int  # of its first byte in the file
    nbytes: int
    record: Any = None  # a torch zip storage: its ZipRecordInfo (copied whole, CRC kept)


class InputBytes:
    """Where the memory of each input tensor (or storage) lies in its file, by address."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._runs: list[Stored] = []
        self._pages = MappedPages.open()

    def add(self, address: int, stored: Stored) -> None:
        """The memory at ``address`` holds ``stored``'s bytes (kept alive by the caller), if it
        is the file's private mapping, no page written yet (where the system can tell)."""
        if address == 0 or stored.nbytes == 0:
            return
        if self._pages is not None and self._pages.written(address, stored.nbytes):
            return  # a copy in memory, or changed by the load: written from memory
        at = bisect.bisect_left(self._starts, address)
        if at < len(self._starts) and self._starts[at] == address:
            if self._runs[at].nbytes >= stored.nbytes:
                return
            del self._starts[at], self._runs[at]
        self._starts.insert(at, address)
        self._runs.insert(at, stored)

    def _run(self, address: int, nbytes: int) -> tuple[int, Stored] | None:
        at = bisect.bisect_right(self._starts, address) - 1
        if at < 0:
            return None
        start, run = self._starts[at], self._runs[at]
        if address + nbytes > start + run.nbytes:
            return None
        if self._pages is not None and self._pages.written(address, nbytes):
            raise InPlaceWriteError(
                f"a step wrote into the memory of an input tensor (bytes at offset "
                f"{run.offset + address - start} of {run.path}) in place, past the read-only "
                "guard (through its storage?); build a new tensor instead. Nothing was written."
            )
        return start, run

    def storage_record(self, storage: Any) -> Any:
        """The zip record an untyped storage is, whole and unchanged; else None."""
        found = self.stored_storage(storage)
        return None if found is None else found.record

    def stored_storage(self, storage: Any) -> Stored | None:
        """The input bytes an untyped storage is, whole and unchanged (a zip record, with the
        file it lies in); else None."""
        found = self._run(storage.data_ptr(), storage.nbytes())
        if found is None:
            return None
        start, run = found
        exact = start == storage.data_ptr() and run.nbytes == storage.nbytes()
        return run if exact else None

    def tensor_bytes(self, tensor: Any) -> tuple[Path, int] | None:
        """The file and offset a contiguous tensor's bytes lie at, unchanged; else None."""
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0 or not tensor.is_contiguous():
            return None
        found = self._run(tensor.data_ptr(), nbytes)
        if found is None:
            return None
        start, run = found
        return run.path, run.offset + tensor.data_ptr() - start

    def __len__(self) -> int:
        return len(self._runs)

    @classmethod
    def of(cls, source: Any, loaded: Checkpoint) -> InputBytes:
        """The input bytes of ``loaded``, the tensors of ``source`` (a
        :class:`~.rewrite.Source`) as its ``tensors()`` read
        them, matched to its stubs by position in the checkpoint (state dict, optimizer state,
        extra entries)."""
        inputs = cls()
        start = None
        if source.format == "safetensors":
            from ..formats.safetensors_copy import data_start

            start = data_start(source.path)
        for stub, tensor, key in _pairs(source.stubs, loaded):
            stored = _stored(source, stub, key, start)
            if stored is None:
                continue
            if stored.record is not None:  # a zip storage: the whole record
                storage = tensor.untyped_storage()
                if storage.nbytes() == stored.nbytes:
                    inputs.add(storage.data_ptr(), stored)
            elif tensor.is_contiguous() and tensor.numel() * tensor.element_size() == stored.nbytes:
                inputs.add(tensor.data_ptr(), stored)
        return inputs


#: where each 8-byte pagemap entry keeps its top byte (bits 56-63: present 0x80, swapped 0x40,
#: file-backed or shared 0x20)
_FLAG_BYTE = 7 if sys.byteorder == "little" else 0
#: 1 for a top byte that says "not the file's page": swapped, or present and anonymous
_ANONYMOUS = bytes(int(bool(b & 0x40 or (b & 0x80 and not b & 0x20))) for b in range(256))


class MappedPages:
    """Which pages of this process's memory were written since they were mapped from a file
    (``/proc/self/pagemap``: a written page of a private file mapping is anonymous, copy on
    write; a page never touched reads from the file)."""

    def __init__(self, pagemap: int) -> None:
        self._pagemap = pagemap
        self._page = os.sysconf("SC_PAGE_SIZE")

    @classmethod
    def open(cls) -> MappedPages | None:
        """None off Linux or where ``/proc`` cannot be read (the guard is the only proof)."""
        try:
            return cls(os.open("/proc/self/pagemap", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
        except (OSError, ValueError):
            return None

    def __del__(self) -> None:
        try:
            os.close(self._pagemap)
        except (OSError, AttributeError):
            pass

    def written(self, address: int, nbytes: int) -> bool:
        """Whether a page of ``[address, address + nbytes)`` holds bytes that are not the
        file's: anonymous memory (present or swapped out), a copy or a page written."""
        first, last = address // self._page, (address + nbytes - 1) // self._page
        try:
            data = os.pread(self._pagemap, (last - first + 1) * 8, first * 8)
        except OSError:
            return False
        if not data.strip(b"\0"):
            return False  # no page touched yet: all of it reads from the file
        # the flags are each entry's top byte; a table marks the bytes of an anonymous page
        return 1 in data[_FLAG_BYTE::8].translate(_ANONYMOUS)


def _stored(source: Any, stub: TensorStub, key: str | None, start: int | None) -> Stored | None:
    """Where a stub's bytes lie in ``source``'s files."""
    info = stub.info
    graph = source.graph
    if source.sset is not None:
        if id(stub) in source.sset.sources:
            path, offset = source.sset.sources[id(stub)]
            return Stored(path, offset, info.nbytes)
        graph = source.sset.graphs.get(source.sset.weight_map.get(key or "", ""))
    if graph is not None:
        if info.storage_key is None:
            return None
        record = graph.records.get(info.storage_key)  # the record's full name
        if record is None or record.compress_type != 0:
            return None
        return Stored(graph.path, record.data_offset, record.size, record)
    if start is not None and info.data_offsets is not None:  # a safetensors file
        return Stored(source.path, start + info.data_offsets[0], info.nbytes)
    return None


def _pairs(stubs: Checkpoint, loaded: Checkpoint) -> list[tuple[TensorStub, Any, str | None]]:
    """Each stub with the tensor read in its place (and its state-dict key)."""
    import torch

    out: list[tuple[TensorStub, Any, str | None]] = []

    def walk(a: Any, b: Any, key: str | None) -> None:
        if isinstance(a, TensorStub):
            if isinstance(b, torch.Tensor) and b.device.type == "cpu":
                out.append((a, b, key))
        elif isinstance(a, dict) and isinstance(b, dict):
            for k in a.keys() & b.keys():
                walk(a[k], b[k], None)
        elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
            for x, y in zip(a, b):
                walk(x, y, None)

    for key, stub in stubs.state_dict.items():
        walk(stub, loaded.state_dict.get(key), key)
    walk(stubs.optimizer, loaded.optimizer, None)
    walk(stubs.extra, loaded.extra, None)
    return out
