"""Rewrite a torch.save zip checkpoint's object graph while copying its tensor data as stored.

:func:`read_zip_graph` decodes ``data.pkl`` with the restricted metadata reader and also
records, for every tensor stub, the exact rebuild call the pickle made (function, storage,
offset, size, stride, ...). :func:`write_zip_graph` pickles a new object graph holding those
stubs the way ``torch.save`` would (protocol 2, ``('storage', <storage type>, key, location,
numel)`` persistent ids, ``torch._utils._rebuild_tensor_v2`` reduces) and copies every storage
record it references byte for byte, so ``torch.load(weights_only=True)`` and
``torch.load(mmap=True)`` read the result. Torch is not imported.

>>> graph = read_zip_graph("model.pth")  # doctest: +SKIP
>>> write_zip_graph("renamed.pth", graph, {"new.weight": graph.obj["old.weight"]})  # doctest: +SKIP
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

from ...errors import (
    CheckpointFormatError,
    InternalError,
    NotReplayableError,
    UnsafeCheckpointError,
)
from ...values.pieces import DerivedStub, Piece
from ...values.tensorinfo import DTYPE_SIZES, TensorStub
from ..crc import crc32_of_parts, crc32_of_reads
from ..remote import location
from ..sink import open_copy_source
from .allowlist import REDIRECT_ONLY_TARGETS, WEIGHTS_ONLY_GLOBALS, allowed_map, redirect_map
from .archive import ZipRecordInfo, decode_zip, read_zip_records
from .guards import GuardedCall
from .placeholders import OpaqueMeta, OpaqueObject, TorchConstant
from .read_errors import with_path
from .storages import StorageRef, StorageType
from .zip_writer import JoinedRecord, TorchZipWriter, write_zip_copy

__all__ = ["ZipGraph", "NotReplayableError", "read_zip_graph", "write_zip_graph"]

#: The pickle protocol torch.save uses (``torch.serialization.DEFAULT_PROTOCOL``).
TORCH_PICKLE_PROTOCOL = 2
# Globals whose decoded value would not pickle back to the same thing (a device as a str,
# a Size as a tuple, a layout constant): a graph naming them is rewritten by the full path.
_LOSSY = ("torch.device", "torch.Size", "torch.serialization._get_layout")


@dataclass
class ZipGraph:
    """A torch zip checkpoint's decoded object graph plus what is needed to write it back."""

    path: Path
    obj: Any
    prefix: str  # the archive folder, e.g. "model/"
    records: dict[str, ZipRecordInfo]
    recipes: dict[int, tuple[str, tuple[Any, ...]]]  # id(stub) -> (rebuild global, args)
    pids: dict[int, tuple[Any, ...]]  # id(storage ref) -> the persistent id as read
    lossy: list[str] = field(default_factory=list)
    keepalive: list[Any] = field(default_factory=list, repr=False)
    #: the object ``path`` is a private copy of (its records are copied server-side from it)
    origin: Any = None
    _byteorder: str | None = field(default=None, repr=False)

    def byteorder(self) -> str:
        """The byte order of the archive's storages: its ``byteorder`` record (``little`` or
        ``big``; torch refuses any other), or ``little`` without one, as torch.load reads such
        an archive by default (torch < 2.1 wrote none). Read once, on first use."""
        if self._byteorder is None:
            record = self.records.get(self.prefix + "byteorder")
            if record is None:
                self._byteorder = "little"
            elif record.compress_type != 0 or record.size > 16:
                self._byteorder = "unreadable"  # equal to no other: never copied across
            else:
                with open_copy_source(self.path) as f:
                    raw = f.read(record.data_offset, record.size)
                self._byteorder = raw.decode("ascii", "replace")
        return self._byteorder


def _recording(name: str, fn: Callable[..., Any], graph: ZipGraph) -> Callable[..., Any]:
    def rebuild(*args: Any) -> Any:
        out = fn(*args)
        if isinstance(out, TensorStub):
            graph.recipes[id(out)] = (name, args)
            graph.keepalive.append(out)  # ids must stay unique while recipes are looked up
        return out

    return GuardedCall(rebuild, name)  # BUILD on it is refused, as on the reader's own


def _flagging(name: str, fn: Callable[..., Any], graph: ZipGraph) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        graph.lossy.append(name)
        return fn(*args)

    return GuardedCall(call, name)


def read_zip_graph(
    path: str | os.PathLike[str], *, allowed_globals: Iterable[Any] = ()
) -> ZipGraph:
    """Decode a torch zip checkpoint into stubs, recording how each tensor was rebuilt.

    Refuses unsafe pickles exactly like :func:`~.metadata.read_torch_metadata`.
    """
    path = location(path)  # type: ignore[assignment]
    records = read_zip_records(path)
    graph = ZipGraph(path, None, "", records, {}, {})
    given = list(allowed_globals)
    allowed = allowed_map(given)
    redirects = redirect_map(given)  # a redirected name replays as its target
    for name, value in list(allowed.items()):
        target = redirects.get(name, name)
        if (
            target.startswith("torch._utils._rebuild")
            or target == "torch._tensor._rebuild_from_type_v2"
        ):
            allowed[name] = _recording(target, value, graph)
        elif target in REDIRECT_ONLY_TARGETS:
            continue  # a real dict, written back as the dict it is
        elif target in _LOSSY or target not in WEIGHTS_ONLY_GLOBALS:
            # an allowed global's class stays a class (NEWOBJ needs one); the replay pickler
            # refuses its placeholders instead
            if callable(value) and not isinstance(value, OpaqueMeta):
                allowed[name] = _flagging(name, value, graph)

    def keep(ref: Any, pid: Any) -> None:
        graph.pids[id(ref)] = pid
        graph.keepalive.append(ref)

    try:
        decoded = decode_zip(path, allowed, keep)  # every check the metadata reader makes
    except (CheckpointFormatError, UnsafeCheckpointError) as exc:
        raise with_path(exc, path) from exc.__cause__
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointFormatError(f"corrupt zip archive ({exc})", path=path) from exc
    graph.obj, graph.prefix = decoded.obj, decoded.prefix
    return graph


class _GlobalName:
    """A global to emit by name (a rebuild function, a dtype, a storage class)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any) -> Any:  # pickle's save_reduce wants a callable
        raise InternalError("a placeholder for pickling only")


_REBUILD_V2 = "torch._utils._rebuild_tensor_v2"


class _NewStorage:
    """A storage the replay writes anew (a merged tensor's), by its persistent id."""

    def __init__(self, pid: tuple[Any, ...]) -> None:
        self.pid = pid


@dataclass(frozen=True)
class _Run:
    """Where a stub's C-contiguous bytes lie: in ``record`` of ``graph``, from byte ``start``."""

    graph: ZipGraph
    ref: StorageRef
    record: ZipRecordInfo
    start: int


def _c_contiguous(shape: Sequence[int], stride: Sequence[int]) -> bool:
    expected = 1
    for size, step in zip(reversed(list(shape)), reversed(list(stride))):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def _stored_run(graph: ZipGraph, stub: TensorStub) -> _Run | None:
    """Where ``stub`` (decoded from ``graph``) lies as C-contiguous bytes of one stored record;
    None when it is not ``graph``'s; :class:`NotReplayableError` when it is not such bytes."""
    recipe = graph.recipes.get(id(stub))
    if recipe is None:
        return None
    name, args = recipe
    if name != _REBUILD_V2 or len(args) < 4:
        raise NotReplayableError(f"a tensor rebuilt by {name} has no plain bytes to copy")
    ref, offset, size, stride = args[:4]
    hooks = args[5] if len(args) > 5 else None
    metadata = args[6] if len(args) > 6 else None
    if (len(args) > 4 and args[4]) or hooks or metadata:
        raise NotReplayableError("a tensor with grad, hooks or metadata is rebuilt by torch")
    if (
        not isinstance(ref, StorageRef)
        or ref.untyped
        or ref.view_offset
        or (ref.dtype != stub.info.dtype)
    ):
        raise NotReplayableError(f"the storage of {stub!r} is a view or of another dtype")
    if not _c_contiguous(size, stride):
        raise NotReplayableError(f"{stub!r} is not C-contiguous in its storage")
    record = graph.records.get(ref.key)
    start = offset * DTYPE_SIZES[stub.info.dtype]
    if record is None or record.compress_type != 0 or start + stub.info.nbytes > record.size:
        raise NotReplayableError(f"the storage of {stub!r} is not a stored record")
    return _Run(graph, ref, record, start)


class _ReplayPickler(pickle._Pickler):  # type: ignore[name-defined, misc]
    """Pickles stubs back into torch's tensor reduces and storage persistent ids; a
    :class:`~ckptmigrate.values.pieces.DerivedStub` becomes a view of the storage it is a run
    of, or a new storage whose record is its pieces' bytes (:attr:`new_records`)."""

    def __init__(self, file: Any, graph: ZipGraph, others: Sequence[ZipGraph] = ()) -> None:
        super().__init__(file, protocol=TORCH_PICKLE_PROTOCOL)
        self.graph = graph
        self.others = list(others)
        self.storage_keys: dict[str, None] = {}  # insertion-ordered set
        self.globals: dict[str, _GlobalName] = {}
        #: record name -> the joined bytes of a storage written anew
        self.new_records: dict[str, JoinedRecord] = {}
        data_prefix = graph.prefix + "data/"
        taken = {n[len(data_prefix) :] for n in graph.records if n.startswith(data_prefix)}
        start = len(graph.records)
        self._fresh = (str(n) for n in range(start, 1 << 62) if str(n) not in taken)

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, StorageRef):
            self.storage_keys[obj.key] = None
            return self.graph.pids[id(obj)]
        if isinstance(obj, _NewStorage):
            return obj.pid
        return None

    def _locate(self, stub: TensorStub) -> _Run:
        for graph in (self.graph, *self.others):
            found = _stored_run(graph, stub)
            if found is not None:
                return found
        raise NotReplayableError(f"a tensor {stub!r} was not decoded from {self.graph.path}")

    def _derived(self, obj: DerivedStub) -> Any:
        runs = [(piece, self._locate(piece.stub)) for piece in obj.pieces]
        if not runs:
            raise NotReplayableError("an empty merged tensor has no storage to copy")
        for _, run in runs:
            # one archive says one byte order for all its storages: bytes of the other order
            # laid into it would read back swapped
            if run.graph is not self.graph and run.graph.byteorder() != self.graph.byteorder():
                raise NotReplayableError(
                    f"a merged tensor's part is stored {run.graph.byteorder()}-endian in "
                    f"{run.graph.path}, the archive it goes into {self.graph.byteorder()}-endian"
                )
        itemsize = DTYPE_SIZES[obj.info.dtype]
        shape = tuple(obj.info.shape)
        stride = tuple(prod(shape[i + 1 :]) for i in range(len(shape)))
        rebuild = self.globals.setdefault(_REBUILD_V2, _GlobalName(_REBUILD_V2))
        if len(runs) == 1 and runs[0][1].graph is self.graph:  # a split's part: a view
            piece, run = runs[0]
            offset = (run.start + piece.start) // itemsize
            return (rebuild, (run.ref, offset, shape, stride, False, OrderedDict()))
        return (rebuild, (self._new_storage(obj, runs), 0, shape, stride, False, OrderedDict()))

    def _new_storage(self, obj: DerivedStub, runs: list[tuple[Piece, _Run]]) -> _NewStorage:
        key = next(self._fresh)
        storage_type = runs[0][1].graph.pids[id(runs[0][1].ref)][1]
        numel = obj.info.nbytes // DTYPE_SIZES[obj.info.dtype]
        parts = []
        for piece, run in runs:
            at = run.record.data_offset + run.start + piece.start
            if run.start + piece.start == 0 and piece.nbytes == run.record.size:
                crc = run.record.crc  # a whole record: its CRC from the central directory
            else:
                with open_copy_source(run.graph.path) as f:  # a file, or an object by range
                    crc = crc32_of_reads(f.read, at, piece.nbytes)
            parts.append(((crc, piece.nbytes), (run.graph.path, at, piece.nbytes)))
        record = JoinedRecord(tuple(r for _, r in parts), crc32_of_parts(c for c, _ in parts))
        self.new_records[self.graph.prefix + "data/" + key] = record
        return _NewStorage(("storage", storage_type, key, "cpu", numel))

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, DerivedStub):
            return self._derived(obj)
        if isinstance(obj, TensorStub):
            recipe = self.graph.recipes.get(id(obj))
            if recipe is None:
                raise NotReplayableError(f"a tensor {obj!r} was not decoded from {self.graph.path}")
            name, args = recipe
            return (self.globals.setdefault(name, _GlobalName(name)), args)
        return NotImplemented

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if isinstance(obj, (_GlobalName, TorchConstant, StorageType)):
            memo = self.memo.get(id(obj))
            if memo is not None:
                self.write(self.get(memo[0]))
                return
            module, _, attr = obj.name.rpartition(".")
            self.write(pickle.GLOBAL + f"{module}\n{attr}\n".encode())
            self.memoize(obj)
            return
        if isinstance(obj, OpaqueObject):
            raise NotReplayableError(
                f"the graph holds a placeholder of the allowed global {obj.name}"
            )
        if callable(obj) and getattr(obj, "__module__", "").startswith("ckptmigrate"):
            raise NotReplayableError(f"the graph holds a decoder object {obj!r}")
        super().save(obj, save_persistent_id)


def dump_graph(
    obj: Any, graph: ZipGraph, others: Sequence[ZipGraph] = ()
) -> tuple[bytes, list[str], dict[str, JoinedRecord]]:
    """The new ``data.pkl`` for ``obj``, the storage records (full names) it references, and
    the records it writes anew (merged tensors' storages, their bytes in ``graph`` or
    ``others``)."""
    if graph.lossy:
        raise NotReplayableError(f"the pickle names {sorted(set(graph.lossy))[0]}")
    buf = io.BytesIO()
    pickler = _ReplayPickler(buf, graph, others)
    pickler.dump(obj)
    return buf.getvalue(), list(pickler.storage_keys), pickler.new_records


def write_zip_graph(
    dst: str | os.PathLike[str], graph: ZipGraph, obj: Any, others: Sequence[ZipGraph] = ()
) -> TorchZipWriter:
    """Write ``obj`` (stubs from ``graph``) to ``dst`` atomically; storages copied as stored.

    Records other than ``data.pkl`` and the storages (``byteorder``, ``version``,
    ``.data/serialization_id``...) are copied as they are; storages nothing references are left
    out. A :class:`~ckptmigrate.values.pieces.DerivedStub` (a Merge or Split along dim 0 run
    on stubs) is a view of the record it is a run of, or a new record copied from its pieces
    (found in ``graph`` or ``others``: a set's other shards), whose CRC is combined from the
    parts' (:mod:`..crc`). The archive goes through :func:`.zip_writer.write_zip_copy` (the
    temporary is not truncated, the disk writes behind the copy). Raises
    ``NotReplayableError`` before writing anything. Returns the writer, whose
    ``bytes_copied`` / ``bytes_through_python`` tell what moved.
    """
    data, keys, new_records = dump_graph(obj, graph, others)
    used = set(keys)
    data_prefix = graph.prefix + "data/"
    depth = graph.prefix.count("/") + 1
    members: list[tuple[str, Any]] = []
    after = None  # the new records go after the last storage kept (or data.pkl)
    for name, record in graph.records.items():
        if name == graph.prefix + "data.pkl":
            members.append((name, data))
            after = after if after is not None else len(members)
        elif name.startswith(data_prefix) and name.count("/") == depth:
            if name in used:
                members.append((name, record))
                after = len(members)
        else:
            members.append((name, record))
    at = len(members) if after is None else after
    members[at:at] = list(new_records.items())
    return write_zip_copy(
        dst, graph.path, members, origin=graph.origin, records=graph.records.values()
    )
