"""Save an object graph as ``torch.save`` does, copying the storages it shares with a source
archive as stored and writing only the others from memory.

A migration run over the tensors mapped from a file returns tensors that are mostly the file's
own (kept, renamed, moved) and a few new ones (merged, cast). :func:`save_copying` pickles the
result the way ``torch.save`` pickles it (protocol 2, torch's tensor reduces, ``('storage',
<type>, key, location, numel)`` persistent ids), but a storage that ``stored(storage)`` finds in
the source archive keeps its record's key and is copied byte for byte, CRC included (cloned
where the file system can: :mod:`..byte_copy`); a new storage is written from its memory under
a fresh key. ``torch.load(weights_only=True)`` and ``torch.load(mmap=True)`` read the result.

>>> save_copying("new.pth", {"w": w, "m": merged}, graph, stored)  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import io
import os
import pickle
import sys
from collections.abc import Callable
from typing import Any

from ...errors import CheckpointWriteError
from .archive import ZipRecordInfo
from .zip_graph import TORCH_PICKLE_PROTOCOL, ZipGraph
from .zip_writer import JoinedRecord, TorchZipWriter, write_zip_copy

__all__ = ["save_copying", "storage_buffer"]


def storage_buffer(storage: Any) -> memoryview:
    """The bytes of a CPU storage as a buffer over its memory (nothing copied); the caller
    keeps the storage alive while the buffer is used."""
    size = storage.nbytes()
    if size == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * size).from_address(storage.data_ptr())).cast("B")


class _SavePickler(pickle.Pickler):
    """``torch.save``'s pickler, with each storage's key chosen by :func:`save_copying`."""

    def __init__(self, file: Any, key_of: Callable[[Any], str]) -> None:
        super().__init__(file, protocol=TORCH_PICKLE_PROTOCOL)
        self.key_of = key_of

    def persistent_id(self, obj: Any) -> Any:
        import torch

        # what torch.serialization's own persistent_id returns for a storage
        if isinstance(obj, torch.storage.TypedStorage):
            storage = obj._untyped_storage
            storage_type = getattr(torch, obj._pickle_storage_type())
            numel = obj._size()
        elif torch.is_storage(obj):
            storage, storage_type, numel = obj, torch.UntypedStorage, obj.nbytes()
        else:
            return None
        if storage.device.type != "cpu":
            raise CheckpointWriteError(
                f"a tensor lies on {storage.device}; the copying writer saves CPU tensors only"
            )
        return ("storage", storage_type, self.key_of(storage), "cpu", numel)


def save_copying(
    dst: str | os.PathLike[str],
    obj: Any,
    graph: ZipGraph,
    stored: Callable[[Any], ZipRecordInfo | JoinedRecord | None],
) -> TorchZipWriter:
    """Write ``obj`` to ``dst`` atomically as a torch zip archive laid out like ``graph``'s
    (its folder name and its other records, ``version``...): storages for which
    ``stored(untyped_storage)`` returns a record of ``graph``'s archive are copied as stored,
    those it finds in another file (a :class:`~.zip_writer.JoinedRecord`: another shard's
    record, of this machine's byte order: the caller's to check) copied from there under a
    fresh key, the others written from memory. The archive says this machine's byte order
    (``sys.byteorder``: what memory holds); a ``graph`` of the other order has its records
    written from memory too. Returns the closed writer (``bytes_copied``: the copied
    records; ``bytes_through_python``: the bytes written from memory)."""
    native = graph.byteorder() == sys.byteorder
    data_prefix = graph.prefix + "data/"
    taken = {name[len(data_prefix) :] for name in graph.records if name.startswith(data_prefix)}
    fresh = (str(n) for n in range(len(taken) + len(graph.records), 1 << 62) if str(n) not in taken)
    keys: dict[int, str] = {}  # storage handle -> its key
    storages: dict[str, ZipRecordInfo | Any] = {}  # key -> record copied, or storage written

    def key_of(storage: Any) -> str:
        handle = storage._cdata
        if handle not in keys:
            record = stored(storage)
            if isinstance(record, ZipRecordInfo) and not native:
                record = None  # stored in the other byte order: its memory is swapped
            if isinstance(record, ZipRecordInfo):
                key = record.name[len(data_prefix) :]
            else:
                key = next(fresh)
            keys[handle] = key
            storages.setdefault(key, record if record is not None else storage)
        return keys[handle]

    buf = io.BytesIO()
    _SavePickler(buf, key_of).dump(obj)
    members: list[tuple[str, Any]] = []
    placed = False
    byteorder = graph.prefix + "byteorder"
    for name, record in graph.records.items():
        if name == graph.prefix + "data.pkl":
            members.append((name, buf.getvalue()))
            if not native and byteorder not in graph.records:
                members.append((byteorder, sys.byteorder.encode()))
            continue
        if name == byteorder and not native:
            members.append((name, sys.byteorder.encode()))
            continue
        if name.startswith(data_prefix) and name.count("/") == data_prefix.count("/"):
            if not placed:  # the storages go where the source's lay, in the pickle's order
                members += _storage_members(data_prefix, storages)
                placed = True
            continue
        members.append((name, record))
    if not placed:
        at = next(i for i, (n, _) in enumerate(members) if n == graph.prefix + "data.pkl") + 1
        members[at:at] = _storage_members(data_prefix, storages)
    return write_zip_copy(
        dst, graph.path, members, origin=graph.origin, records=graph.records.values()
    )


def _storage_members(prefix: str, storages: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        (
            prefix + key,
            item if isinstance(item, (ZipRecordInfo, JoinedRecord)) else storage_buffer(item),
        )
        for key, item in storages.items()
    ]
