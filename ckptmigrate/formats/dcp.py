"""torch.distributed.checkpoint (DCP) folders: ``.metadata``, ``*.distcp`` data, our stamp.

DCP's ``.metadata`` is a pickle that torch's ``FileSystemReader`` reads with plain
``pickle.load``. We never let that run: :func:`read_dcp_metadata` decodes it with a restricted
unpickler that resolves only DCP's own metadata classes (and torch dtypes, ``torch.Size``,
paths), refusing anything else with :class:`~ckptmigrate.errors.UnsafeCheckpointError`;
:class:`SafeFileSystemReader` plugs that into torch's loader, and the non-tensor values DCP
stores as bytes are read with ``torch.load(weights_only=True)``.

The stamp lives in ``ckptmigrate.json`` beside ``.metadata``::

    {"stamp": {...the stamp...}, "hparams": {...}, "meta": {...}}

(``hparams`` and ``meta`` only when the checkpoint's layout has no place for them in the state
dict). Keys, shapes and dtypes come from ``.metadata`` alone, without torch
(:func:`read_dcp_metadata_checkpoint`); :func:`read_dcp` loads tensors through DCP's own loader
and :func:`write_dcp` saves through ``torch.distributed.checkpoint``'s writer, into a new folder
that then replaces the old one.

>>> ckpt = read_dcp_metadata_checkpoint("ckpt/step-1000")  # doctest: +SKIP
>>> ckpt.state_dict["model.fc.weight"]
TensorStub(Tensor, shape=(10, 20), dtype=float32)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import stat
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..base.readable import bounded_repr
from ..errors import (
    BudgetExceededError,
    CheckpointFormatError,
    CheckpointWriteError,
    OutputOccupiedError,
    UnsafeCheckpointError,
)
from ..values.checkpoint import Checkpoint
from ..values.stamp import Stamp, stamp_of
from ..values.tensorinfo import DTYPE_SIZES, MAX_DIM, TensorInfo, TensorStub
from .atomic import TEMP_MARKER, KeptErrorWriter, atomic_path, copy_tree_synced, temp_path_for
from .bounds import (
    DECODE_ALLOWANCE,
    DECODE_FACTOR,
    DecodeBudget,
    decode_bounded,
    read_json_file,
    tuple_chain_bound,
)
from .detect import read_bounded
from .folder_swap import recover_interrupted_write, swap_folder
from .layout import LAYOUTS, assemble, from_parts, split
from .remote import Location, location
from .torch import (
    MAX_PICKLE_BYTES,
    TorchConstant,
    check_torch_bytes,
    python3_name,
    scan_pickle,
)
from .torch.guards import GuardedCall, GuardedType

__all__ = [
    "CHUNK_FRAMING_ALLOWANCE",
    "DCP_ENUMS",
    "DCP_GLOBALS",
    "STAMP_FILE",
    "DcpValue",
    "InflateBound",
    "METADATA_FILE",
    "SafeFileSystemReader",
    "check_replaceable",
    "read_dcp",
    "read_dcp_metadata",
    "read_dcp_metadata_checkpoint",
    "write_dcp",
    "write_swapped",
]

METADATA_FILE = ".metadata"
#: Our stamp file beside ``.metadata``.
STAMP_FILE = "ckptmigrate.json"
_MD = "torch.distributed.checkpoint.metadata."
_DCP_CLASSES = [
    _MD + name
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
] + ["torch.distributed.checkpoint.filesystem._StorageInfo"]
_PLAIN = ["collections.OrderedDict", "builtins.set", "builtins.frozenset"]
_PATHS = [
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "pathlib.PurePosixPath",
    "pathlib.PureWindowsPath",
]
_TORCH_VALUES = ["torch.Size", "torch.serialization._get_layout"] + [
    f"torch.{name}" for name in DTYPE_SIZES
]
# Early Python 3.11 releases (3.11.2 here; 3.11.7 no longer) pickle an enum member as
# ``getattr(EnumClass, "NAME")``: DCP's ``_MEM_FORMAT_ENCODING`` in every ``.metadata`` written
# there. The name resolves to a lookup that takes only a member of one of DCP's enums
# (:func:`_enum_member`), never builtins.getattr.
_GETATTR = "builtins.getattr"
#: Every global a DCP ``.metadata`` pickle may name; anything else is refused.
DCP_GLOBALS: frozenset[str] = frozenset(_DCP_CLASSES + _PLAIN + _PATHS + _TORCH_VALUES + [_GETATTR])
#: DCP's enums, by member name: what a torch-free read decodes a member to (its value).
DCP_ENUMS: dict[str, dict[str, int]] = {
    _MD
    + "_MEM_FORMAT_ENCODING": {
        "TORCH_CONTIGUOUS_FORMAT": 0,
        "TORCH_CHANNELS_LAST": 1,
        "TORCH_PRESERVE_FORMAT": 2,
    }
}


class DcpValue:
    """A non-tensor entry of a DCP checkpoint, seen from its metadata (the value is not read)."""

    def __init__(self, fqn: str) -> None:
        self.fqn = fqn

    def __repr__(self) -> str:
        return f"<value stored in DCP: {self.fqn}>"


class _Record:
    """A torch-free stand-in for a DCP metadata dataclass: keeps what BUILD gives it."""

    dcp_name = ""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict state, slot state)
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"{self.dcp_name.rpartition('.')[2]}({self.__dict__})"

    def graph_children(self) -> tuple[Any, ...]:
        """What it holds, for :func:`bounds.check_graph`."""
        return tuple(self.__dict__.values())


def _enum_member(members: dict[Any, dict[str, Any]], path: object) -> Any:
    """What ``builtins.getattr`` decodes to: ``(cls, name)`` gives member ``name`` of ``cls``,
    one of the enums in ``members``; anything else is refused as unsafe."""

    def member(cls: Any, name: Any) -> Any:
        found = members.get(cls) if isinstance(cls, type) else None
        if found is None or type(name) is not str or name not in found:
            raise UnsafeCheckpointError(
                _GETATTR,
                path=path,
                detail=f"getattr({bounded_repr(cls, 80)}, {bounded_repr(name, 80)}) is not a "
                "member of one of DCP's enums",
            )
        return found[name]

    return member


class _EnumStandIn(int):
    """A torch-free stand-in for one of DCP's enums: built from a member's value, it is the
    value (an ``int``), as ``getattr(cls, NAME)`` gives it."""

    dcp_name = ""

    def __new__(cls, value: Any) -> Any:  # type: ignore[misc]
        if type(value) is not int or value not in DCP_ENUMS[cls.dcp_name].values():
            raise CheckpointFormatError(
                f"{bounded_repr(value, 80)} is not a value of {cls.dcp_name.rpartition('.')[2]}"
            )
        return value


def _join(*parts: Any) -> str:
    return os.path.join(*map(str, parts)) if parts else ""


def _size(dims: Any = ()) -> tuple[Any, ...]:
    return tuple(dims)


def _stand_ins(path: object = None) -> dict[str, Any]:
    """What each global decodes to without torch: stand-ins that a pickle's BUILD cannot patch
    (classes of :class:`~.torch.guards.GuardedType`, functions wrapped in
    :class:`~.torch.guards.GuardedCall`), so this decode also proves the pickle never BUILDs
    on a global before the one with torch's own classes runs (those it would patch for the
    whole process)."""
    out: dict[str, Any] = {}
    for name in _DCP_CLASSES:
        out[name] = GuardedType(name.rpartition(".")[2], (_Record,), {"dcp_name": name})
    enums: dict[Any, dict[str, Any]] = {}
    for name, values in DCP_ENUMS.items():
        out[name] = GuardedType(name.rpartition(".")[2], (_EnumStandIn,), {"dcp_name": name})
        enums[out[name]] = values
    out[_GETATTR] = GuardedCall(_enum_member(enums, path), _GETATTR)
    for name in _PATHS:
        out[name] = GuardedCall(_join, name)
    out["torch.Size"] = GuardedCall(_size, "torch.Size")
    out["torch.serialization._get_layout"] = GuardedCall(
        TorchConstant, "torch.serialization._get_layout"
    )
    for name in DTYPE_SIZES:
        out[f"torch.{name}"] = TorchConstant(f"torch.{name}")
    out.update({"collections.OrderedDict": OrderedDict, "builtins.set": set})
    out["builtins.frozenset"] = frozenset
    return out


def _real_classes(path: object = None) -> dict[str, Any]:
    import importlib
    import pathlib

    out: dict[str, Any] = {}
    for name in DCP_GLOBALS - {_GETATTR}:
        module, _, attr = name.rpartition(".")
        out[name] = getattr(importlib.import_module(module), attr)
    out[_GETATTR] = _enum_member({out[n]: out[n].__members__ for n in DCP_ENUMS}, path)
    # a Windows path cannot be built on POSIX (and vice versa): keep the pure form
    out["pathlib.WindowsPath"] = pathlib.PureWindowsPath
    out["pathlib.PosixPath"] = pathlib.PurePosixPath if os.name == "nt" else pathlib.PosixPath
    return out


class _DcpUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, resolve: dict[str, Any], path: object) -> None:
        super().__init__(file)
        self._resolve = resolve
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        full = python3_name(module, name)
        if full not in self._resolve:
            raise UnsafeCheckpointError(
                full, path=self._path, detail="not one of DCP's metadata classes"
            )
        return self._resolve[full]

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointFormatError("DCP metadata has a persistent id", path=self._path)


def _metadata_path(path: str | os.PathLike[str]) -> Location:
    path = location(path)
    return path / METADATA_FILE if path.is_dir() else path


def read_dcp_metadata(path: str | os.PathLike[str], *, torch_classes: bool = False) -> Any:
    """Decode a DCP folder's ``.metadata`` with the restricted unpickler.

    With ``torch_classes=False`` (metadata-only use) torch is not imported and the dataclasses
    come back as stand-ins with the same attributes; with ``True`` they are torch's own, as
    torch's loader needs them. A global outside :data:`DCP_GLOBALS` raises
    :class:`UnsafeCheckpointError` before anything is built; a ``.metadata`` over
    :data:`~.torch.MAX_PICKLE_BYTES` is refused unread.
    """
    md_path = _metadata_path(path)
    data = read_bounded(md_path, MAX_PICKLE_BYTES, "DCP metadata", "a pickle (as on data.pkl)")
    allowed = dict.fromkeys(DCP_GLOBALS)
    try:
        scan = scan_pickle(data, 0, len(data), allowed, md_path)  # unsafe beats corrupt
    except UnsafeCheckpointError:
        raise
    except Exception as exc:
        raise CheckpointFormatError(f"corrupt DCP metadata ({exc})", path=md_path) from None
    md = _decode(data, scan, _stand_ins(md_path), md_path)
    if torch_classes:  # the stand-ins' decode refused any BUILD on a global first
        md = _decode(data, scan, _real_classes(md_path), md_path)
    check_storage_data(md, md_path.parent, md_path)
    check_state_dict_metadata(md, md_path)
    return md


def _decode(data: bytes, scan: Any, resolve: dict[str, Any], md_path: object) -> Any:
    """``data`` decoded under the decode budgets, its globals resolved through ``resolve``."""
    bound = tuple_chain_bound(data, 0, len(data))
    try:
        budget = DecodeBudget(
            len(data), 2 * len(data) + scan.estimate, path=md_path, hashed=scan.hashed
        )
        unpickler = _DcpUnpickler(io.BytesIO(data), resolve, md_path)
        return decode_bounded(unpickler.load, bound, md_path, budget)
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    except Exception as exc:
        raise CheckpointFormatError(f"corrupt DCP metadata ({exc})", path=md_path) from exc


def _dims(value: Any, what: str, path: object) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
        type(d) is int and 0 <= d <= MAX_DIM for d in value
    ):
        raise CheckpointFormatError(
            f"{what} {bounded_repr(value)}, expected a tuple of non-negative integers below "
            "2**63",
            path=path,
        )
    return tuple(value)


def check_state_dict_metadata(md: Any, md_path: object = None) -> None:
    """Every entry of ``.metadata`` is a value stored as bytes, or a tensor with a dtype, a
    size and chunks that lie inside it: what the readers (ours and torch's) then rely on."""
    entries = getattr(md, "state_dict_metadata", None)
    if not isinstance(entries, dict):
        raise CheckpointFormatError("DCP metadata has no state_dict_metadata", path=md_path)
    for fqn, entry in entries.items():
        if not isinstance(fqn, str):
            raise CheckpointFormatError(
                f"DCP metadata names an entry {bounded_repr(fqn)}: entry names are strings",
                path=md_path,
            )
        kind = type(entry).__name__
        if kind == "BytesStorageMetadata":
            continue
        where = f"DCP entry {bounded_repr(fqn)}"
        if kind != "TensorStorageMetadata":
            raise CheckpointFormatError(
                f"{where} is a {kind}, expected tensor or bytes storage metadata", path=md_path
            )
        shape = _dims(getattr(entry, "size", None), f"{where} has size", md_path)
        _dtype_name(getattr(entry, "properties", None), md_path)
        chunks = getattr(entry, "chunks", None)
        if not isinstance(chunks, list):
            raise CheckpointFormatError(f"{where} has no list of chunks", path=md_path)
        for chunk in chunks:
            if type(chunk).__name__ != "ChunkStorageMetadata":
                raise CheckpointFormatError(
                    f"{where} has a chunk that is a {type(chunk).__name__}", path=md_path
                )
            offsets = _dims(getattr(chunk, "offsets", None), f"{where} has chunk offsets", md_path)
            sizes = _dims(getattr(chunk, "sizes", None), f"{where} has chunk sizes", md_path)
            if (
                len(offsets) != len(shape)
                or len(sizes) != len(shape)
                or any(o + n > d for o, n, d in zip(offsets, sizes, shape))
            ):
                raise CheckpointFormatError(
                    f"{where} of size {bounded_repr(shape)} has a chunk at "
                    f"{bounded_repr(offsets)} of size {bounded_repr(sizes)}, which does not lie "
                    "inside it",
                    path=md_path,
                )


def check_storage_data(md: Any, folder: Path, md_path: object = None) -> None:
    """Every byte range ``.metadata`` points to lies in a regular file inside ``folder``.

    torch's reader opens ``folder / relative_path`` as it finds it: ``../x`` or an absolute
    path read another checkpoint's tensors, a FIFO blocks forever, ``/dev/zero`` never ends.
    """
    storage = getattr(md, "storage_data", None)
    if storage is None:
        return
    if not isinstance(storage, dict):
        raise CheckpointFormatError("DCP metadata's storage_data is not a dict", path=md_path)
    sizes: dict[str, int] = {}
    for info in storage.values():
        name = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if (
            not isinstance(name, str)
            or name in ("", ".", "..")
            or any(c in name for c in ("/", "\\", "\0"))
        ):
            raise CheckpointFormatError(
                f"DCP metadata points to {bounded_repr(name)}: only the plain name of a file "
                "in the checkpoint's folder is allowed",
                path=md_path,
            )
        if name not in sizes:
            try:
                st = (folder / name).lstat()
            except OSError:
                raise CheckpointFormatError(
                    f"DCP metadata points to {bounded_repr(name)}, which is not in the folder",
                    path=md_path,
                ) from None
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointFormatError(
                    f"DCP metadata points to {bounded_repr(name)}, which is not a regular file "
                    "(a link, a FIFO or a device)",
                    path=md_path,
                )
            sizes[name] = st.st_size
        if not (
            type(offset) is int
            and type(length) is int
            and 0 <= offset
            and 0 <= length
            and offset + length <= sizes[name]
        ):
            raise CheckpointFormatError(
                f"DCP metadata claims bytes {bounded_repr(offset)}+{bounded_repr(length)} of "
                f"{bounded_repr(name)}, a file of "
                f"{sizes[name]} bytes",
                path=md_path,
            )


def _dtype_name(properties: Any, path: object = None) -> str:
    dtype = getattr(properties, "dtype", None)
    state = getattr(properties, "state", None)
    if dtype is None and isinstance(state, tuple) and state:
        dtype = state[0]  # TensorProperties pickles a tuple, dtype first
    # a string or an int is no torch dtype (and str() of a 5,000-digit int raises)
    name = "" if isinstance(dtype, (str, int)) else str(getattr(dtype, "name", dtype))
    if name.removeprefix("torch.") not in DTYPE_SIZES:  # a string is not a torch dtype
        raise CheckpointFormatError(
            f"DCP metadata names an unknown dtype {bounded_repr(dtype)}", path=path
        )
    return name.removeprefix("torch.")


def _route(planner_data: Any, fqn: str, path: object) -> tuple[Any, ...]:
    """Where DCP's planner put an entry in the nested state dict: keys and list indices."""
    route = planner_data.get(fqn) if isinstance(planner_data, dict) else None
    if route is None or (isinstance(route, (tuple, list)) and not route):
        return (fqn,)
    if not isinstance(route, (tuple, list)) or not all(
        isinstance(p, str) or type(p) is int for p in route
    ):
        raise CheckpointFormatError(
            f"DCP planner_data places {bounded_repr(fqn)} at {bounded_repr(route)}, expected a "
            "tuple of keys",
            path=path,
        )
    return tuple(route)


def _set_path(tree: dict[Any, Any], route: tuple[Any, ...], value: Any, path: object) -> None:
    for part in route[:-1]:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise CheckpointFormatError(
                f"DCP planner_data places an entry inside another at {bounded_repr(route)}",
                path=path,
            )
    if route[-1] in tree:
        raise CheckpointFormatError(
            f"DCP planner_data places two entries at {bounded_repr(route)}", path=path
        )
    tree[route[-1]] = value


def read_stamp_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``ckptmigrate.json`` of a DCP folder, or ``{}`` when it has none."""
    stamp_path = location(path) / STAMP_FILE
    if not stamp_path.exists():
        return {}
    data = read_json_file(stamp_path, what="the stamp file")  # a FIFO or folder is refused
    if not isinstance(data, dict):
        raise CheckpointFormatError("the stamp file must hold a JSON object", path=stamp_path)
    return data


def state_checkpoint(obj: dict[str, Any], folder: Path) -> Checkpoint:
    """The folder's object in its layout, with the stamp, hparams and meta its stamp file
    keeps (where it keeps them) over those the object held."""
    inner = split(obj, path=folder)
    data = read_stamp_file(folder)
    kept = Stamp(inner.schema, inner.version, inner.history, mounts=inner.mounts)

    def parts() -> dict[str, Any]:
        found = {f: getattr(inner, f) for f in ("optimizer", "extra", "module_metadata")}
        for slot in ("hparams", "meta"):
            value = data.get(slot)
            if value is not None and not isinstance(value, dict):
                raise CheckpointFormatError(
                    f"the stamp file's {slot} must be a JSON object, found {type(value).__name__}",
                    path=folder / STAMP_FILE,
                )
            found[slot] = dict(value) if isinstance(value, dict) else getattr(inner, slot)
        return found

    stamp = data.get("stamp")
    return from_parts(
        inner.state_dict,
        layout="dcp-" + inner.layout,
        stamp=kept if stamp is None else stamp,
        parts=parts,
        path=folder / STAMP_FILE,
    )


def read_dcp_metadata_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """A DCP folder as a Checkpoint of stubs (values stored as bytes are :class:`DcpValue`)."""
    folder = location(path)
    md = read_dcp_metadata(folder)  # its entries checked: check_state_dict_metadata
    md_path = folder / METADATA_FILE
    planner_data = getattr(md, "planner_data", None)
    if planner_data is not None and not isinstance(planner_data, dict):
        raise CheckpointFormatError("DCP metadata's planner_data is not a dict", path=md_path)
    obj: dict[Any, Any] = {}
    for fqn, entry in md.state_dict_metadata.items():
        if type(entry).__name__ == "TensorStorageMetadata":
            shape = tuple(entry.size)
            dtype = _dtype_name(entry.properties, md_path)
            nbytes = DTYPE_SIZES[dtype]
            for d in shape:
                nbytes *= d
            value: Any = TensorStub(TensorInfo(shape, dtype, nbytes, storage_key=fqn))
        else:
            value = DcpValue(fqn)
        _set_path(obj, _route(planner_data, fqn, md_path), value, md_path)
    return state_checkpoint(obj, folder)


#: A transformed (zstd) tensor chunk may inflate to its declared bytes plus this much: the
#: torch.save zip around one tensor (its pickle, records, padding) takes a few KiB.
CHUNK_FRAMING_ALLOWANCE = 1 << 20


class InflateBound(io.RawIOBase):
    """A DCP transform stream (zstd) that refuses to produce more than ``limit`` bytes.

    torch's ``FileSystemReader.read_data`` reads a transformed chunk whole
    (``transform_from.read(-1)``) before anything checks its size: 38 KB of zstd inflated
    past 1.4 GiB.
    """

    def __init__(self, stream: Any, limit: int, what: str, rule: str, path: object) -> None:
        super().__init__()
        self._stream, self._limit, self._what, self._rule, self._path = (
            stream,
            limit,
            what,
            rule,
            path,
        )
        self._produced = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._limit + 1 - self._produced)
        data = self._stream.read(max(want, 1))
        self._produced += len(data)
        if self._produced > self._limit:
            raise BudgetExceededError(
                self._what, self._produced, self._limit, self._rule, path=self._path
            )
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size >= 0:
            return super().read(size)
        chunks = []
        while data := super().read(1 << 20):
            chunks.append(data)
        return b"".join(chunks)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stream.close()
        super().close()


def _chunk_bound(md: Any, read_item: Any, stored: int) -> tuple[int, str, str]:
    """How many bytes a transformed item may inflate to, the rule (for the message), and the
    item's name: a tensor chunk by its index, a value stored as bytes by its FQN."""
    index = read_item.storage_index
    entry = getattr(md, "state_dict_metadata", {}).get(index.fqn)
    chunks = getattr(entry, "chunks", None)
    if chunks is not None and isinstance(index.index, int) and 0 <= index.index < len(chunks):
        nbytes = DTYPE_SIZES[_dtype_name(entry.properties)]
        for size in chunks[index.index].sizes:
            nbytes *= int(size)
        rule = f"its declared {nbytes} bytes plus {CHUNK_FRAMING_ALLOWANCE >> 20} MiB"
        item = f"chunk {index.index} of {index.fqn!r} (offset {tuple(index.offset or ())})"
        return nbytes + CHUNK_FRAMING_ALLOWANCE, rule, item
    # a value stored as bytes declares no size, and zstd shrinks an honest one (an LR history
    # of 10M equal floats) 10,000 times: the cap of a data.pkl, then its pickle's own budget
    budget = DECODE_FACTOR * stored + DECODE_ALLOWANCE
    rule = (
        f"the larger of {MAX_PICKLE_BYTES >> 20} MiB and {DECODE_FACTOR} times its {stored} "
        f"stored bytes plus {DECODE_ALLOWANCE >> 20} MiB"
    )
    return max(budget, MAX_PICKLE_BYTES), rule, f"value {index.fqn!r}"


def _torch_reader_classes() -> tuple[type, type]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.filesystem import _StorageReaderTransforms
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _BoundedTransforms(_StorageReaderTransforms):
        """torch's transforms (zstd), each stream bounded by what its item declares."""

        def __init__(self, reader: Any) -> None:
            super().__init__(reader.transforms.extension_registry)
            self.reader = reader

        def transform_load_stream(
            self, read_item: Any, transform_descriptors: Any, raw_stream: Any
        ) -> Any:
            stream = super().transform_load_stream(read_item, transform_descriptors, raw_stream)
            if not transform_descriptors:
                return stream  # a plain byte range, already checked against the file
            info = self.reader.storage_data[read_item.storage_index]
            limit, rule, item = _chunk_bound(self.reader.metadata, read_item, info.length)
            what = f"{item} in {info.relative_path}, inflated by {', '.join(transform_descriptors)}"
            return InflateBound(stream, limit, what, rule, self.reader.path)

    class _SafeFileSystemReader(FileSystemReader):
        """torch's FileSystemReader, reading ``.metadata`` with the restricted unpickler and
        each transformed chunk no larger than it declares."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.metadata: Any = None
            self.transforms = _BoundedTransforms(self)

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = self._get_metadata_path(kwargs.get("rank"))
            md = read_dcp_metadata(path, torch_classes=True)
            if not isinstance(getattr(md, "storage_meta", None), StorageMeta):  # odd: ignored
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            self.metadata = md
            return md

        def set_up_storage_reader(self, metadata: Any, *args: Any, **kwargs: Any) -> None:
            super().set_up_storage_reader(metadata, *args, **kwargs)
            self.metadata = metadata

    class _SafeEmptyPlanner(_EmptyStateDictLoadPlanner):
        """Rebuilds the whole state dict; values stored as bytes load weights-only, once
        their pickle fits its budget."""

        path: object = None  # the folder, for errors

        def _should_include_key(self, key: str, metadata: Any) -> bool:
            return self.keys is None or key in self.keys  # torch's walks planner_data

        def load_bytes(self, read_item: Any, value: Any) -> None:
            import torch
            from torch.distributed.checkpoint._nested_dict import set_element

            fqn = read_item.storage_index.fqn
            check_torch_bytes(value, what=f"value {fqn!r}", path=self.path)
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(
                    self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded
                )
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return _SafeFileSystemReader, _SafeEmptyPlanner


def SafeFileSystemReader(path: str | os.PathLike[str]) -> Any:  # noqa: N802 - a class to callers
    """A ``FileSystemReader`` whose ``read_metadata`` never runs torch's plain pickle.load.

    >>> dcp.load(state_dict, storage_reader=SafeFileSystemReader("ckpt/"))  # doctest: +SKIP
    """
    return _torch_reader_classes()[0](path)


def read_dcp(path: str | os.PathLike[str]) -> Checkpoint:
    """Load every tensor and value of a DCP folder (single process) into a Checkpoint."""
    folder = Path(path)
    read_dcp_metadata(folder)  # refuse a hostile .metadata with our error, not DCP's wrapper
    return state_checkpoint(_load_state(folder), folder)


def load_dcp_state(folder: Path, tensor: Callable[[str], Any]) -> dict[str, Any]:
    """The folder's state dict as DCP's loader builds it (the same nesting and key order),
    each value stored as bytes read and each tensor entry ``tensor(fqn)``, not read."""
    md = read_dcp_metadata(folder, torch_classes=True)
    from torch.distributed.checkpoint._traverse import get_element, set_element

    stored = {
        fqn
        for fqn, entry in md.state_dict_metadata.items()
        if type(entry).__name__ != "TensorStorageMetadata"
    }
    loaded = _load_state(folder, stored) if stored else {}
    routes = md.planner_data if isinstance(md.planner_data, dict) else {}
    state: dict[str, Any] = {}
    for fqn in md.state_dict_metadata:
        route = routes.get(fqn)
        if fqn in stored:
            value = loaded.get(fqn) if route is None else get_element(loaded, route)
        else:
            value = tensor(fqn)
        if route is None:
            state[fqn] = value
        else:
            set_element(state, route, value)
    return state


def _load_state(folder: Path, keys: set[str] | None = None) -> dict[str, Any]:
    """What DCP's own loader reads from the folder: every entry, or those ``keys`` name."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader_cls, planner_cls = _torch_reader_classes()
    state: dict[str, Any] = {}
    planner = planner_cls(keys)
    planner.path = folder
    try:
        _load_state_dict(state, storage_reader=reader_cls(folder), planner=planner, no_dist=True)
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    # DCP's CheckpointException derives from BaseException: it went past every handler, and a
    # truncated .distcp printed a 48-line traceback
    except (Exception, CheckpointException) as exc:
        cause = exc.__cause__ or exc
        if isinstance(exc, CheckpointException) and exc.failures:
            exc = cause = next(iter(exc.failures.values()))[0]  # (the rank's error, traceback)
        if isinstance(exc, CheckpointFormatError):  # a budget our reader's streams enforce
            raise exc
        if "Weights only load failed" in str(exc) or "Unsupported global" in str(cause):
            raise UnsafeCheckpointError(
                "a value stored in the DCP checkpoint", path=folder
            ) from exc
        raise CheckpointFormatError(
            f"DCP could not load it ({type(exc).__name__}: {exc})", path=folder
        ) from exc
    return state


#: The files of a DCP folder of ours: DCP's (``.metadata``, each rank's ``*.distcp``) and our stamp.
_DCP_FILE = re.compile(r"\.metadata|[^/]*\.distcp|" + re.escape(STAMP_FILE))


def check_replaceable(target: str | os.PathLike[str]) -> None:
    """Refuse, with :class:`~ckptmigrate.errors.OutputOccupiedError` and before anything is
    touched, to put a DCP folder at ``target`` over anything but nothing, an empty folder, or
    a DCP folder: ``.metadata`` and nothing but ``.metadata``, ``*.distcp``,
    ``ckptmigrate.json`` (and our temporaries of them), all plain files.

    >>> check_replaceable("runs/notes")  # doctest: +SKIP
    OutputOccupiedError: runs/notes holds notes.txt, which writing a DCP checkpoint folder ...
    """
    target = Path(target)
    what = "a DCP checkpoint folder"
    if not os.path.lexists(target):
        return
    if target.is_symlink() or not target.is_dir():
        raise OutputOccupiedError(target, [], what)
    names = sorted(os.listdir(target))
    foreign = [
        name
        for name in names
        if not _DCP_FILE.fullmatch(name.split(TEMP_MARKER)[0])
        or not stat.S_ISREG(os.lstat(target / name).st_mode)
    ]
    if names and not foreign and METADATA_FILE not in names:
        foreign = names  # DCP's names without a .metadata: a save not finished, not ours
    if foreign:
        raise OutputOccupiedError(target, foreign, what)


def write_dcp(path: str | os.PathLike[str], ckpt: Checkpoint) -> None:
    """Save ``ckpt`` as a DCP folder at ``path`` (replacing a DCP folder there, never other
    files: :func:`check_replaceable`), stamp file included.

    The new folder is written beside the target and swapped in (:func:`swap_folder`), so a
    crash leaves the old folder or the new one; what a killed writer left is finished or
    removed first.
    """
    import torch
    from torch.distributed.checkpoint.state_dict_saver import _save_state_dict
    from torch.utils._pytree import tree_flatten

    layout = ckpt.layout.removeprefix("dcp-")
    plain = Checkpoint(**{**ckpt.__dict__, "layout": layout, "module_metadata": None})
    obj = assemble(plain, None)  # the stamp goes to the JSON file, not into DCP's bytes
    for value in tree_flatten(obj)[0]:
        if isinstance(value, torch.Tensor):
            check_dcp_storable(value)

    def save(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled...": single process
            _save_state_dict(obj, storage_writer=_writer(tmp), no_dist=True)

    write_swapped(Path(path), save, ckpt)


def check_dcp_storable(tensor: Any) -> None:
    """Refuse, as a :class:`CheckpointWriteError`, a tensor a DCP folder cannot hold: a meta
    tensor has no values, and DCP stores dense, unquantized, non-nested tensors only."""
    import torch

    if tensor.is_meta:
        problem = "a meta tensor: it has no values (made with .to('meta') or on device='meta')"
    elif getattr(tensor, "is_nested", False):
        problem = "a nested tensor"
    elif tensor.is_quantized:
        problem = "a quantized tensor"
    elif tensor.layout != torch.strided:
        problem = f"a {str(tensor.layout).removeprefix('torch.')} tensor"
    else:
        return
    raise CheckpointWriteError(
        f"a tensor of the result is {problem}; a DCP folder stores dense tensors only "
        "(write .to_dense() or .dequantize(), or write a .pth)"
    )


def write_swapped(target: Path, fill: Callable[[Path], object], ckpt: Checkpoint) -> None:
    """Fill a folder beside ``target`` (``fill(tmp)``), stamp it, swap it in: refused first if
    ``target`` is not ours to replace; a killed writer's leftovers finished or removed."""
    check_replaceable(target)
    recover_interrupted_write(target)
    tmp = _temp_beside(target)
    try:
        fill(tmp)
        write_stamp_file(tmp, ckpt)
        swap_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _writer(folder: Path) -> Any:
    """DCP's FileSystemWriter, each write() into its files passing the crash hook first."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import FileSystem

    class _HookedFileSystem(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path: Any, mode: str) -> Any:
            with super().create_stream(path, mode) as stream:
                yield KeptErrorWriter(stream) if "w" in mode else stream

    writer = FileSystemWriter(folder)
    writer.fs = _HookedFileSystem()
    return writer


def write_stamp_file(folder: str | os.PathLike[str], ckpt: Checkpoint) -> None:
    """Write ``ckpt``'s stamp (and hparams/meta its layout has no slot for) as ``ckptmigrate.json``."""
    layout = ckpt.layout.removeprefix("dcp-")
    stamp = stamp_of(ckpt)
    data: dict[str, Any] = {"stamp": stamp}
    slots = LAYOUTS.get(layout, LAYOUTS["ckptmigrate"])
    if slots.hparams is None:
        data["hparams"] = ckpt.hparams
    if slots.meta is None:
        data["meta"] = ckpt.meta
    try:
        text = json.dumps(data, indent=2) + "\n"
    except (TypeError, ValueError) as exc:
        raise CheckpointWriteError(
            f"a DCP folder keeps its hparams and meta as JSON in {STAMP_FILE}, and they hold a "
            f"value JSON cannot ({exc}): keep tensors in the state dict, and numbers, strings, "
            "lists and dicts in hparams"
        ) from None
    with atomic_path(Path(folder) / STAMP_FILE) as stamp_tmp:
        stamp_tmp.write_text(text, "utf-8")


def stamp_dcp(src: str | os.PathLike[str], dst: str | os.PathLike[str], ckpt: Checkpoint) -> None:
    """Give the DCP folder ``src`` the stamp of ``ckpt`` (read from it), at ``dst``.

    Only ``ckptmigrate.json`` is new: in place it is written atomically beside ``.metadata``;
    elsewhere the folder is copied as it is (every rank's data file, fsynced), stamped, and
    swapped in.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() and os.path.samefile(src, dst):
        write_stamp_file(src, ckpt)
        return
    write_swapped(dst, lambda tmp: copy_tree_synced(src, tmp), ckpt)


def _temp_beside(target: Path) -> Path:
    return temp_path_for(target)  # names the writer's pid: a dead writer's folder is swept
