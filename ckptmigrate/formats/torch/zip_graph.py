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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import (
    CheckpointFormatError,
    InternalError,
    NotReplayableError,
    UnsafeCheckpointError,
)
from ...values.tensorinfo import TensorStub
from ..remote import location
from .allowlist import REDIRECT_ONLY_TARGETS, WEIGHTS_ONLY_GLOBALS, allowed_map, redirect_map
from .archive import ZipRecordInfo, decode_zip, read_zip_records
from .guards import GuardedCall
from .placeholders import OpaqueMeta, OpaqueObject, TorchConstant
from .read_errors import with_path
from .storages import StorageRef, StorageType
from .zip_writer import TorchZipWriter, write_zip_copy

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


class _ReplayPickler(pickle._Pickler):  # type: ignore[name-defined, misc]
    """Pickles stubs back into torch's tensor reduces and storage persistent ids."""

    def __init__(self, file: Any, graph: ZipGraph) -> None:
        super().__init__(file, protocol=TORCH_PICKLE_PROTOCOL)
        self.graph = graph
        self.storage_keys: dict[str, None] = {}  # insertion-ordered set
        self.globals: dict[str, _GlobalName] = {}

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, StorageRef):
            self.storage_keys[obj.key] = None
            return self.graph.pids[id(obj)]
        return None

    def reducer_override(self, obj: Any) -> Any:
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


def dump_graph(obj: Any, graph: ZipGraph) -> tuple[bytes, list[str]]:
    """The new ``data.pkl`` for ``obj`` and the storage records (full names) it references."""
    if graph.lossy:
        raise NotReplayableError(f"the pickle names {sorted(set(graph.lossy))[0]}")
    buf = io.BytesIO()
    pickler = _ReplayPickler(buf, graph)
    pickler.dump(obj)
    return buf.getvalue(), list(pickler.storage_keys)


def write_zip_graph(dst: str | os.PathLike[str], graph: ZipGraph, obj: Any) -> TorchZipWriter:
    """Write ``obj`` (stubs from ``graph``) to ``dst`` atomically; storages copied as stored.

    Records other than ``data.pkl`` and the storages (``byteorder``, ``version``,
    ``.data/serialization_id``...) are copied as they are; storages nothing references are left
    out. The archive goes through :func:`.zip_writer.write_zip_copy` (the temporary is not
    truncated, the disk writes behind the copy). Raises ``NotReplayableError`` before writing
    anything. Returns the writer, whose ``bytes_copied`` / ``bytes_through_python`` tell what
    moved.
    """
    data, keys = dump_graph(obj, graph)
    used = set(keys)
    data_prefix = graph.prefix + "data/"
    depth = graph.prefix.count("/") + 1
    members: list[tuple[str, Any]] = []
    for name, record in graph.records.items():
        if name == graph.prefix + "data.pkl":
            members.append((name, data))
        elif name.startswith(data_prefix) and name.count("/") == depth and name not in used:
            continue  # a storage only dropped keys referenced
        else:
            members.append((name, record))
    return write_zip_copy(
        dst, graph.path, members, origin=graph.origin, records=graph.records.values()
    )
