"""Decode a ``torch.save`` file's object graph without torch and without reading tensor data.

Tensors come back as :class:`~ckptmigrate.formats.tensorinfo.TensorStub` records (shape, dtype,
storage key, offset, device). The pickle is decoded by a restricted unpickler that accepts
exactly the globals ``torch.load(weights_only=True)`` accepts, plus the ones a caller allows by
name (which decode to :class:`OpaqueObject` placeholders); nothing from the file is ever
imported or called.

>>> obj = read_torch_metadata("model.pth")  # doctest: +SKIP
>>> obj["state_dict"]["fc.weight"]
TensorStub(Parameter, shape=(10, 20), dtype=float32)

Zip members named with ``..`` or an absolute path are a
:class:`~ckptmigrate.errors.CheckpointFormatError` (torch never writes them, so the archive
was tampered with), not an :class:`~ckptmigrate.errors.UnsafeCheckpointError`: no global is
involved, and allowing one by name could not make the file loadable.
"""

from __future__ import annotations

import _compat_pickle
import io
import mmap
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from math import prod
from types import FunctionType
from typing import Any, BinaryIO, NoReturn, TypeVar

from ...errors import CheckpointFormatError, UnsafeCheckpointError, UsageError
from ...readable import bounded_repr
from ..bounds import (
    DECODE_ALLOWANCE,
    DECODE_FACTOR,
    HASH_ALLOWANCE,
    HASH_FACTOR,
    DecodeBudget,
    charge_decode,
    decode_bounded,
    tuple_chain_bound,
)
from ..detect import TORCH_LEGACY_MAGIC, detect_format, open_regular_file
from ..tensorinfo import DTYPE_SIZES, MAX_DIM, TensorInfo, TensorStub

__all__ = [
    "MAX_PICKLE_BYTES",
    "WEIGHTS_ONLY_GLOBALS",
    "OpaqueObject",
    "TorchConstant",
    "ZipRecordInfo",
    "check_torch_bytes",
    "read_torch_metadata",
    "read_zip_records",
    "scan_pickle_globals",
]

#: The largest pickle (``data.pkl`` or legacy main pickle) we decode.
MAX_PICKLE_BYTES = 1 << 30

_LEGACY_PROTOCOL_VERSION = 1001

# Errors a malformed pickle or zip raises from the stdlib; all mean "corrupt file".
_FORMAT_ERRORS = (
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    EOFError,
    struct.error,
    ValueError,
    RecursionError,
    MemoryError,
    OverflowError,
    LookupError,
    TypeError,
    AttributeError,
    NotImplementedError,
)

# Modules torch never lets a pickle reach, even when a caller allows a name in them.
_BLOCKED_MODULES = frozenset({"sys", "os", "posix", "nt"})


# --------------------------------------------------------------------------- BUILD guards
# A pickle's BUILD opcode sets attributes on the object below it, through __setstate__, the
# object's __dict__ (even of a frozen dataclass) or setattr. Aimed at a global it would rewrite
# our shared allow-list (turn torch.float32 into float64 for every later file) or a class for
# the whole process (collections.Counter). torch's loader refuses BUILD on anything but
# tensors, parameters and OrderedDicts; so does every object a global resolves to here.


def _refuse_build(what: str) -> NoReturn:
    raise UnsafeCheckpointError(
        f"BUILD on {what}",
        detail="the BUILD opcode sets attributes on a value that only OrderedDicts, tensors "
        "and allowed classes may receive",
    )


class _GuardedType(type):
    """Metaclass of the classes a global resolves to: neither BUILD nor setattr changes them."""

    def __setstate__(cls, state: Any) -> None:
        _refuse_build(cls.__name__)

    def __setattr__(cls, name: str, value: Any) -> None:
        _refuse_build(cls.__name__)


class _GuardedCall:
    """A function a global resolves to, wrapped so BUILD cannot set its ``__defaults__``."""

    __slots__ = ("_func", "_name")

    def __init__(self, func: Callable[..., Any], name: str) -> None:
        object.__setattr__(self, "_func", func)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._func(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        _refuse_build(self._name)

    def __setstate__(self, state: Any) -> None:
        _refuse_build(self._name)

    def __repr__(self) -> str:
        return self._name


# --------------------------------------------------------------------------- placeholders


@dataclass(frozen=True)
class TorchConstant:
    """A torch value a pickle names but we do not import: a dtype, layout, qscheme, class."""

    name: str

    def __repr__(self) -> str:
        return self.name

    def __reduce__(self) -> Any:
        return (TorchConstant, (self.name,))  # copies rebuild it; they never set its state

    def __setstate__(self, state: Any) -> None:
        _refuse_build(self.name)


@dataclass(eq=False)
class OpaqueObject:
    """What a caller-allowed global (``allowed_globals``) decodes to: its name and its args.

    ``state`` holds what the pickle's BUILD opcode would have passed to ``__setstate__``;
    ``items`` what SETITEMS stored into it (a dict subclass such as Lightning's AttributeDict).
    """

    name: str
    args: tuple[Any, ...] = ()
    state: Any = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    items: dict[Any, Any] = field(default_factory=dict)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def fields(self) -> dict[Any, Any] | None:
        """The mapping the object held: its dict items and the attributes BUILD set
        (``argparse.Namespace``); None when it held neither."""
        attributes = self.state if isinstance(self.state, dict) else {}
        if not self.items and not attributes:
            return None
        return {**self.items, **attributes}

    def graph_children(self) -> tuple[Any, ...]:
        """What it holds, for :func:`bounds.check_graph`."""
        return (self.args, self.state, self.kwargs, self.items)


class _OpaqueMeta(_GuardedType):
    def __repr__(cls) -> str:
        return f"<opaque global {cls.global_name}>"  # type: ignore[attr-defined]


class _OpaqueGlobal(metaclass=_OpaqueMeta):
    """Base of the classes a caller-allowed global name resolves to (NEWOBJ needs a type)."""

    global_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
        return OpaqueObject(cls.global_name, args, None, kwargs)


def _opaque_global(name: str) -> type:
    return _OpaqueMeta(name.rpartition(".")[2], (_OpaqueGlobal,), {"global_name": name})


# --------------------------------------------------------------------------- the allow-list

_STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "qint8",
    "QInt32Storage": "qint32",
    "QUInt8Storage": "quint8",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
}
_TENSOR_TYPES = ["Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte"]
_QSCHEMES = [
    "per_tensor_affine",
    "per_tensor_symmetric",
    "per_channel_affine",
    "per_channel_symmetric",
    "per_channel_affine_float_qparams",
]


@dataclass(frozen=True)
class _StorageType:
    """A storage class named in a pickle: ``torch.FloatStorage``, ``torch.UntypedStorage``..."""

    name: str
    dtype: str | None  # None for TypedStorage, whose dtype a pickle never names here

    def __repr__(self) -> str:
        return self.name

    def __reduce__(self) -> Any:
        return (_StorageType, (self.name, self.dtype))

    def __setstate__(self, state: Any) -> None:
        _refuse_build(self.name)


@dataclass(frozen=True)
class _StorageRef:
    """A storage as its persistent id describes it; ``numel`` counts elements of ``dtype``."""

    key: str
    dtype: str
    numel: int
    location: str
    untyped: bool
    view_offset: int = 0  # legacy storage views: elements into the root storage
    root_numel: int = -1  # elements in the whole stored storage; -1: same as numel

    @property
    def stored_numel(self) -> int:
        return self.numel if self.root_numel < 0 else self.root_numel

    def __setstate__(self, state: Any) -> None:
        _refuse_build(f"storage {self.key!r}")  # it was checked; it must stay as checked


class _TensorType(metaclass=_GuardedType):
    """``torch.Tensor``: accepted as a sub-type marker, never constructed."""

    def __new__(cls, *args: Any) -> Any:  # type: ignore[misc]
        raise CheckpointFormatError(
            "the pickle constructs torch.Tensor directly (a pre-1.0 layout), which the metadata "
            "reader does not support"
        )


class _ParameterType(metaclass=_GuardedType):
    """``torch.nn.parameter.Parameter``: NEWOBJ on it wraps a stub as a parameter."""

    def __new__(cls, data: Any = None, requires_grad: bool = True) -> Any:  # type: ignore[misc]
        stub = _expect_stub(data, "Parameter")
        return TensorStub(stub.info, requires_grad=requires_grad, is_parameter=True)


class _SizeType(metaclass=_GuardedType):
    """``torch.Size``: decodes to a plain tuple of ints."""

    def __new__(cls, dims: Any = ()) -> Any:  # type: ignore[misc]
        return _expect_dims(dims, "torch.Size")


class _DeviceType(metaclass=_GuardedType):
    """``torch.device``: decodes to its string form, e.g. ``"cuda:0"``."""

    def __new__(cls, kind: Any, index: Any = None) -> Any:  # type: ignore[misc]
        if not isinstance(kind, str) or not (index is None or type(index) is int):
            raise CheckpointFormatError(
                f"torch.device({bounded_repr(kind, 80)}, {bounded_repr(index)}) is malformed"
            )
        charge_decode(len(kind) + 64)
        return kind if index is None or ":" in kind else f"{kind}:{index}"


def _charge_copy(args: tuple[Any, ...], per_item: int) -> None:
    """Charge the decode budget for a stand-in that copies its first argument's items."""
    if args and hasattr(args[0], "__len__"):
        charge_decode(per_item * len(args[0]) + 256)


class _CounterType(metaclass=_GuardedType):
    """``collections.Counter``: builds a real Counter, but BUILD cannot patch the class."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
        _charge_copy(args, 128)  # each item may become a new key
        return Counter(*args, **kwargs)


class _OrderedDictType(metaclass=_GuardedType):
    """``collections.OrderedDict``: a real OrderedDict, its copied items charged first."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
        _charge_copy(args, 160)
        return OrderedDict(*args, **kwargs)


class _SetType(metaclass=_GuardedType):
    """``builtins.set``: a real set, its copied items charged first."""

    def __new__(cls, *args: Any) -> Any:  # type: ignore[misc]
        _charge_copy(args, 64)
        return set(*args)


class _SafeBytearray(metaclass=_GuardedType):
    """``builtins.bytearray`` from data only: an int argument would allocate that many bytes."""

    def __new__(cls, *args: Any) -> Any:  # type: ignore[misc]
        if not args:
            return bytearray()
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray, list)):
            charge_decode(len(args[0]) + 64)  # a memoised value copied again and again
            return bytearray(args[0])
        if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
            charge_decode(len(args[0]) + 64)
            return bytearray(args[0], "latin-1")
        raise CheckpointFormatError("bytearray(...) with unexpected arguments in the pickle")


def _codecs_encode(value: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    # Protocol-2 pickles spell bytes as encode(str, "latin1"); no other codec is ever looked up.
    if not isinstance(value, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise CheckpointFormatError("_codecs.encode(...) with an unexpected codec in the pickle")
    charge_decode(len(value) + 48)
    return value.encode("latin-1")


def _get_layout(name: Any) -> TorchConstant:
    if not isinstance(name, str) or not name.startswith("torch."):
        raise CheckpointFormatError(f"unknown tensor layout {bounded_repr(name)}")
    return TorchConstant(name)


# ---- tensor rebuild functions: same names and arguments as torch._utils, building stubs


def _expect_dims(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
        type(d) is int and 0 <= d <= MAX_DIM for d in value
    ):
        raise CheckpointFormatError(
            f"{what} is {bounded_repr(value, 200)}, expected a tuple of sizes below 2**63"
        )
    if type(value) is not tuple:
        charge_decode(8 * len(value) + 64)  # a memoised size list copied per tensor
    return tuple(value)


def _expect_stub(value: Any, what: str) -> TensorStub:
    if not isinstance(value, TensorStub):
        raise CheckpointFormatError(f"{what} wraps {type(value).__name__}, expected a tensor")
    return value


def _dtype_name(value: Any) -> str:
    if isinstance(value, TorchConstant) and value.name.startswith("torch."):
        name = value.name[len("torch.") :]
        if name in DTYPE_SIZES:
            return name
    raise CheckpointFormatError(f"{bounded_repr(value)} is not a torch dtype")


def _stub_from_storage(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    dtype: str | None = None,
) -> TensorStub:
    if not isinstance(storage, _StorageRef):
        raise CheckpointFormatError(f"tensor storage is {type(storage).__name__}, not a storage")
    shape = _expect_dims(size, "tensor size")
    if not isinstance(stride, (tuple, list)) or len(stride) != len(shape):
        raise CheckpointFormatError(
            f"tensor stride {bounded_repr(stride)} does not match size {bounded_repr(shape)}"
        )
    if not all(type(s) is int for s in stride) or type(offset) is not int or offset < 0:
        raise CheckpointFormatError(
            f"tensor stride {bounded_repr(stride)} or offset {bounded_repr(offset)} is malformed"
        )
    dtype = dtype or storage.dtype
    itemsize = DTYPE_SIZES[dtype]
    numel = prod(shape)
    # Highest element the tensor can touch: strides may skip (x[::2]) or repeat (expand).
    extent = 0 if numel == 0 else 1 + sum((n - 1) * abs(s) for n, s in zip(shape, stride))
    available = storage.numel * DTYPE_SIZES[storage.dtype]
    if (offset + extent) * itemsize > available:
        raise CheckpointFormatError(
            f"storage shorter than its tensor claims: storage {bounded_repr(storage.key)} holds "
            f"{available} bytes, a {dtype} tensor of shape {bounded_repr(shape)} at offset "
            f"{bounded_repr(offset)} needs {bounded_repr((offset + extent) * itemsize)}"
        )
    info = TensorInfo(
        shape=shape,
        dtype=dtype,
        nbytes=numel * itemsize,
        storage_key=storage.key,
        storage_offset=storage.view_offset + offset,
        device=storage.location,
    )
    return TensorStub(info, requires_grad=bool(requires_grad))


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> TensorStub:
    return _stub_from_storage(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> TensorStub:
    return _stub_from_storage(storage, storage_offset, size, stride, requires_grad)


def _rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> TensorStub:
    name = _dtype_name(dtype)
    return _stub_from_storage(storage, storage_offset, size, stride, requires_grad, name)


def _rebuild_qtensor(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    quantizer_params: Any,
    requires_grad: Any,
    backward_hooks: Any,
) -> TensorStub:
    return _stub_from_storage(storage, storage_offset, size, stride, requires_grad)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> TensorStub:
    stub = _expect_stub(data, "Parameter")
    return TensorStub(stub.info, requires_grad=bool(requires_grad), is_parameter=True)


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any, backward_hooks: Any, state: Any
) -> TensorStub:
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _rebuild_meta_tensor_no_storage(
    dtype: Any, size: Any, stride: Any, requires_grad: Any
) -> TensorStub:
    name = _dtype_name(dtype)
    shape = _expect_dims(size, "meta tensor size")
    info = TensorInfo(shape, name, prod(shape) * DTYPE_SIZES[name], device="meta")
    return TensorStub(info, requires_grad=bool(requires_grad))


def _rebuild_device_tensor_from_cpu_tensor(
    data: Any, dtype: Any, device: Any, requires_grad: Any
) -> TensorStub:
    stub = _expect_stub(data, "device tensor")
    name = _dtype_name(dtype)
    if not isinstance(device, str):  # str() of a shared list would build its whole tree
        raise CheckpointFormatError(f"device tensor on {type(device).__name__}, not a device")
    info = TensorInfo(
        stub.shape,
        name,
        stub.info.numel * DTYPE_SIZES[name],
        storage_key=stub.info.storage_key,
        storage_offset=stub.info.storage_offset,
        device=str(device),
    )
    return TensorStub(info, requires_grad=bool(requires_grad))


def _unsupported_rebuild(what: str) -> Callable[..., Any]:
    def rebuild(*args: Any) -> Any:
        raise CheckpointFormatError(
            f"the file holds {what}, which the metadata reader does not decode; load it with "
            "torch.load(weights_only=True) instead"
        )

    return rebuild


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if not callable(func) or not isinstance(args, tuple):
        raise CheckpointFormatError("_rebuild_from_type_v2 with malformed arguments")
    result = func(*args)
    if new_type is _ParameterType and isinstance(result, TensorStub):
        return TensorStub(result.info, requires_grad=result.requires_grad, is_parameter=True)
    return result


def _weights_only_globals() -> dict[str, Any]:
    """Every global torch's weights-only unpickler accepts, mapped to what we decode it to."""
    allowed: dict[str, Any] = {
        "collections.OrderedDict": _OrderedDictType,
        "collections.Counter": _CounterType,
        "torch.nn.parameter.Parameter": _ParameterType,
        "torch.serialization._get_layout": _get_layout,
        "torch.Size": _SizeType,
        "torch.Tensor": _TensorType,
        "torch.device": _DeviceType,
        "_codecs.encode": _codecs_encode,
        "builtins.bytearray": _SafeBytearray,
        "builtins.set": _SetType,
        "builtins.complex": complex,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    }
    for dtype in DTYPE_SIZES:
        allowed[f"torch.{dtype}"] = TorchConstant(f"torch.{dtype}")
    for module in ("torch", "torch.cuda"):
        for kind in _TENSOR_TYPES + ["Bool"]:
            allowed[f"{module}.{kind}Tensor"] = TorchConstant(f"{module}.{kind}Tensor")
    for module in ("torch.sparse", "torch.cuda.sparse"):
        for kind in _TENSOR_TYPES:
            allowed[f"{module}.{kind}Tensor"] = TorchConstant(f"{module}.{kind}Tensor")
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[f"torch.{name}"] = _StorageType(f"torch.{name}", dtype)
        if not name.startswith("Q"):  # no quantized storages on cuda
            allowed[f"torch.cuda.{name}"] = _StorageType(f"torch.cuda.{name}", dtype)
    allowed["torch.storage.UntypedStorage"] = _StorageType("torch.storage.UntypedStorage", "uint8")
    allowed["torch.storage.TypedStorage"] = _StorageType("torch.storage.TypedStorage", None)
    for scheme in _QSCHEMES:
        allowed[f"torch.{scheme}"] = TorchConstant(f"torch.{scheme}")
    rebuilds: dict[str, Any] = {
        "_rebuild_tensor": _rebuild_tensor,
        "_rebuild_tensor_v2": _rebuild_tensor_v2,
        "_rebuild_tensor_v3": _rebuild_tensor_v3,
        "_rebuild_qtensor": _rebuild_qtensor,
        "_rebuild_parameter": _rebuild_parameter,
        "_rebuild_parameter_with_state": _rebuild_parameter_with_state,
        "_rebuild_meta_tensor_no_storage": _rebuild_meta_tensor_no_storage,
        "_rebuild_device_tensor_from_cpu_tensor": _rebuild_device_tensor_from_cpu_tensor,
        "_rebuild_sparse_tensor": _unsupported_rebuild("a sparse tensor"),
        "_rebuild_nested_tensor": _unsupported_rebuild("a nested tensor"),
        "_rebuild_wrapper_subclass": _unsupported_rebuild("a tensor wrapper subclass"),
        "_rebuild_device_tensor_from_numpy": _unsupported_rebuild("a numpy-backed tensor"),
    }
    for name, rebuild in rebuilds.items():
        allowed[f"torch._utils.{name}"] = rebuild
    return {
        name: _GuardedCall(value, name) if isinstance(value, FunctionType) else value
        for name, value in allowed.items()
    }


_ALLOWED = _weights_only_globals()

#: The global names ``torch.load(weights_only=True)`` accepts; the only ones we decode.
WEIGHTS_ONLY_GLOBALS: frozenset[str] = frozenset(_ALLOWED)


# --------------------------------------------------------------------------- the unpickler


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves globals only to our stub builders; storages only to :class:`_StorageRef`."""

    def __init__(
        self,
        file: Any,
        *,
        allowed: dict[str, Any],
        persistent_load: Callable[[Any], Any] | None = None,
        path: object = None,
    ) -> None:
        super().__init__(file, encoding="ASCII")
        self._allowed = allowed
        self._load_storage = persistent_load
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        full = _python3_name(module, name)
        _check_global(full, self._allowed, self._path)
        return self._allowed[full]

    def persistent_load(self, pid: Any) -> Any:
        if self._load_storage is None:
            raise CheckpointFormatError("unexpected persistent id in a torch header pickle")
        return self._load_storage(pid)


def _allowed_map(allowed_globals: Iterable[str]) -> dict[str, Any]:
    allowed = dict(_ALLOWED)
    for name in allowed_globals:
        if not isinstance(name, str) or "." not in name:
            raise UsageError(f"allowed_globals holds {name!r}, expected 'module.Name' strings")
        if name not in allowed:
            allowed[name] = _opaque_global(name)
    return allowed


def _check_global(name: str, allowed: dict[str, Any], path: object) -> None:
    module = name.partition(".")[0]
    if module in _BLOCKED_MODULES:
        raise UnsafeCheckpointError(name, path=path, detail=f"module {module!r} is never allowed")
    if name not in allowed:
        raise UnsafeCheckpointError(name, path=path)


def _python3_name(module: str, name: str) -> str:
    """Python 2 names (``__builtin__.set``) as Python 3 spells them, as torch's loader maps them."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


class _ScanCorrupt(CheckpointFormatError):
    """The opcode walk found a malformed pickle; ``pos`` is where the bad opcode starts and
    ``effects`` what the opcodes before it do (the unpickler still runs them)."""

    def __init__(self, message: str, pos: int, effects: _Effects | None = None) -> None:
        super().__init__(message)
        self.pos = pos
        self.effects = effects if effects is not None else _Effects()


# --------------------------------------------------------------------------- the opcode walk
# A hand-written walk over a pickle's bytes, checked against pickletools in the tests. It only
# parses each opcode's argument length (the C unpickler checks the contents), names globals,
# refuses opcodes that build objects outside the allow-list and memo indices the C unpickler
# would allocate gigabytes for. It never slices a string or bytes argument it does not need.

_ARG_FIXED = {"uint1": 1, "uint2": 2, "int4": 4, "uint4": 4, "uint8": 8, "float8": 8}
_ARG_COUNTED = {  # argument = a little-endian byte count of this width, then that many bytes
    "long1": (1, False),
    "string1": (1, False),
    "bytes1": (1, False),
    "unicodestring1": (1, False),
    "bytes4": (4, False),
    "unicodestring4": (4, False),
    "long4": (4, True),
    "string4": (4, True),
    "bytes8": (8, False),
    "unicodestring8": (8, False),
    "bytearray8": (8, False),
}
_ARG_LINES = {  # argument = this many newline-terminated lines
    "decimalnl_short": 1,
    "decimalnl_long": 1,
    "stringnl": 1,
    "unicodestringnl": 1,
    "floatnl": 1,
    "stringnl_noescape": 1,
    "stringnl_noescape_pair": 2,
}

# Per opcode byte: FIXED[op] = argument bytes when fixed (-1 unknown opcode, -2 variable).
_FIXED = [-1] * 256
_COUNTED: dict[int, tuple[int, bool]] = {}
_LINES: dict[int, int] = {}
_OPCODE_NAMES: dict[int, str] = {}
for _op in pickletools.opcodes:
    _code = ord(_op.code)
    _OPCODE_NAMES[_code] = _op.name
    _arg = _op.arg.name if _op.arg is not None else None
    if _arg is None:
        _FIXED[_code] = 0
    elif _arg in _ARG_FIXED:
        _FIXED[_code] = _ARG_FIXED[_arg]
    elif _arg in _ARG_COUNTED:
        _FIXED[_code], _COUNTED[_code] = -2, _ARG_COUNTED[_arg]
    else:
        _FIXED[_code], _LINES[_code] = -2, _ARG_LINES[_arg]  # KeyError: a new argument kind
del _op, _code, _arg

_OP = {name: code for code, name in _OPCODE_NAMES.items()}
_FORBIDDEN = frozenset(_OP[n] for n in ("INST", "OBJ", "EXT1", "EXT2", "EXT4"))
_STRINGS = frozenset(_OP[n] for n in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"))
_PUTS = frozenset(_OP[n] for n in ("PUT", "BINPUT", "LONG_BINPUT"))
_GETS = frozenset(_OP[n] for n in ("GET", "BINGET", "LONG_BINGET"))
_STOP, _GLOBAL, _INST = _OP["STOP"], _OP["GLOBAL"], _OP["INST"]
_STACK_GLOBAL, _MEMOIZE, _UNICODE = _OP["STACK_GLOBAL"], _OP["MEMOIZE"], _OP["UNICODE"]
_NO_PUSH = frozenset(_OP[n] for n in ("FRAME", "PROTO"))  # framing only
_PROTO, _FRAME = _OP["PROTO"], _OP["FRAME"]
#: The opcodes torch's weights-only unpickler implements (torch/_weights_only_unpickler.py).
TORCH_OPCODES = frozenset(
    _OP[n]
    for n in (
        "APPEND APPENDS BINFLOAT BINGET LONG_BINGET BININT BININT1 BININT2 BINPERSID BINPUT "
        "LONG_BINPUT BINUNICODE BUILD EMPTY_DICT EMPTY_LIST EMPTY_SET EMPTY_TUPLE GLOBAL LONG1 "
        "MARK NEWFALSE NEWOBJ NEWTRUE NONE PROTO REDUCE SETITEM SETITEMS SHORT_BINSTRING STOP "
        "TUPLE TUPLE1 TUPLE2 TUPLE3"
    ).split()
)

# Opcodes the walk must look at beyond their length: when STACK_GLOBAL operands are tracked,
# every opcode that pushes a string or touches the memo; always globals, forbidden ones, STOP,
# PROTO, LONG_BINPUT / PUT (the memo indices that can be large) and those torch lacks.
_ALWAYS = (
    frozenset({_STOP, _GLOBAL, _INST, _PROTO, _OP["LONG_BINPUT"], _OP["PUT"]})
    | _FORBIDDEN
    | (frozenset(range(256)) - TORCH_OPCODES)
)
_SPECIAL_TRACKED = bytes(
    1 if code in _ALWAYS | _STRINGS | _PUTS | _GETS | _NO_PUSH | {_STACK_GLOBAL, _MEMOIZE} else 0
    for code in range(256)
)
_INT_FORMATS = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}
_LONG1 = _OP["LONG1"]
_LONGS = frozenset(_OP[name] for name in ("INT", "LONG", "LONG1", "LONG4"))
#: Long ints (see _PickleWalk.long_ints) a pickle may hold before the stack model runs.
_LONG_INTS = 1024
_UNPACK = {size: struct.Struct(fmt).unpack_from for size, fmt in _INT_FORMATS.items()}

# The plain walk's dispatch: what to do with each opcode byte, and how far _K_SKIP skips
# (the whole opcode) or how wide _K_COUNTED's unsigned byte count is.
_K_SKIP, _K_COUNTED, _K_LONG_BINPUT, _K_STOP, _K_STACK_GLOBAL, _K_OTHER = range(6)
_KIND = bytearray([_K_OTHER] * 256)
_SKIP = bytearray(256)
for _code in range(256):
    if _FIXED[_code] >= 0 and _code not in _ALWAYS | {_STACK_GLOBAL}:
        _KIND[_code], _SKIP[_code] = _K_SKIP, 1 + _FIXED[_code]
    elif _code in _COUNTED and not _COUNTED[_code][1] and _code not in _ALWAYS:
        _KIND[_code], _SKIP[_code] = _K_COUNTED, _COUNTED[_code][0]
_KIND[_OP["LONG_BINPUT"]] = _K_LONG_BINPUT
_KIND[_STOP] = _K_STOP
_KIND[_STACK_GLOBAL] = _K_STACK_GLOBAL
# The plain walk also notes which memo slots may hold a container, tuple or object (not a
# string, number or global): only a pickle that fetches one of those again (GET, DUP) can
# make the unpickler copy or hash more than its opcodes build, and needs the stack model.
_K_BINPUT, _K_BINGET, _K_LONG_BINGET, _K_MEMO = range(6, 10)
_KIND[_OP["BINPUT"]], _KIND[_OP["BINGET"]] = _K_BINPUT, _K_BINGET
_KIND[_OP["LONG_BINGET"]] = _K_LONG_BINGET
for _name in ("PUT", "GET", "MEMOIZE", "DUP"):
    _KIND[_OP[_name]] = _K_MEMO
_LEAF, _HOLDER = 1, 2  # what the top of the stack is after an opcode
_TOP = bytearray([_HOLDER] * 256)
for _op in pickletools.opcodes:
    if (
        _op.stack_after
        and all(
            t.name not in ("any", "list", "dict", "set", "frozenset", "tuple")
            for t in _op.stack_after
        )
        and _op.name != "BUILD"
    ):
        _TOP[ord(_op.code)] = _LEAF
_TOP[_OP["MARK"]] = _HOLDER
for _name in ("GLOBAL", "STACK_GLOBAL", "EMPTY_TUPLE", "BINPERSID", "PERSID"):
    _TOP[_OP[_name]] = _LEAF
del _code, _name, _op

# The decode's memory estimate (bounds.DecodeBudget): bytes each opcode makes the C unpickler
# and the graph check allocate (CPython 3.11, 64-bit), and bytes per argument byte. Counting
# objects, not bytes, is what matters: MARK and two million EMPTY_SETs are 2 MB on disk and
# 800 MB decoded.
_REF = 32  # a reference on the stack and in its container; a dict entry takes two
_WALKED = 160  # what check_graph keeps for each container it walks
_COST = [0] * 256
_PER_BYTE = bytearray(256)
for _op in pickletools.opcodes:
    if _op.stack_after:
        _COST[ord(_op.code)] = _REF
for _names, _bytes in (
    ("EMPTY_SET FROZENSET", 232 + _WALKED + _REF),
    ("EMPTY_DICT DICT", 80 + _WALKED + _REF),
    ("EMPTY_LIST LIST", 72 + _WALKED + _REF),
    ("TUPLE TUPLE1 TUPLE2 TUPLE3", 80 + _WALKED + _REF),
    ("BININT BININT2 INT LONG LONG1 LONG4 BINFLOAT FLOAT", 32 + _REF),
    ("REDUCE NEWOBJ NEWOBJ_EX INST OBJ BINPERSID PERSID", 512 + _WALKED),
    ("BUILD SETITEM", 64),
    ("MARK PUT BINPUT LONG_BINPUT MEMOIZE", 16),
):
    for _name in _names.split():
        _COST[_OP[_name]] = _bytes
for _names, _factor, _bytes in (
    ("SHORT_BINUNICODE BINUNICODE BINUNICODE8 UNICODE", 4, 80 + _REF),  # UCS-4 at worst
    ("SHORT_BINSTRING BINSTRING STRING", 1, 80 + _REF),  # decoded as ASCII
    ("SHORT_BINBYTES BINBYTES BINBYTES8 BYTEARRAY8", 1, 48 + _REF),
    ("INT LONG LONG1 LONG4 FLOAT", 1, 32 + _REF),
):
    for _name in _names.split():
        _COST[_OP[_name]], _PER_BYTE[_OP[_name]] = _bytes, _factor
del _op, _names, _bytes, _name, _factor


@dataclass
class _ScanResult:
    """What the walk found: globals in order, the end of the pickle, the opcodes it used."""

    globals: list[str]
    end: int  # just past STOP
    protocol: int | None = None  # the last PROTO's argument
    outside_torch: set[str] = field(default_factory=set)  # opcodes outside TORCH_OPCODES
    estimate: int = 0  # bytes the decode allocates at most, before any copies (see _COST)
    hashed: int = 0  # items the decode's hashing visits at most (see _StackModel)


class _PickleWalk:
    """One walk over ``buf[pos:end]``; see :func:`_scan_pickle`."""

    def __init__(
        self, buf: Any, pos: int, end: int, allowed: dict[str, Any] | None, path: object
    ) -> None:
        self.buf = buf
        self.pos = pos
        self.end = end
        # Inside a FRAME, no opcode may run past the frame's end: the C unpickler would drop
        # the frame's tail and read on from the next bytes, out of step with this walk (the
        # pure-Python unpickler refuses such a pickle, and so does the walk).
        self.limit = end
        self.allowed = allowed
        self.path = path
        self.seen: list[str] = []
        self.protocol: int | None = None
        self.outside_torch: set[str] = set()
        # STACK_GLOBAL takes its names from the stack: once one is met, the walk starts over
        # tracking the last two values pushed (a string's (start, end, opcode) or None).
        self.track = False
        self.recent: list[Any] = [None, None]
        self.memo: dict[int, Any] = {}
        self.cost = 0
        self.slots = bytearray()  # per memo slot: 0 unset, _LEAF or _HOLDER (plain walk)
        self.filled = 0  # memo slots set, as MEMOIZE numbers them
        self.shares = True  # fetches a container or object again; known after a plain walk
        # ints of 8+ bytes (or text digits): only those can share a hash (modulo 2**61 - 1), so
        # past _LONG_INTS of them the stack model runs to count the keys that may collide
        self.long_ints = 0

    def corrupt(self, message: str, at: int) -> NoReturn:
        raise _ScanCorrupt(message, at)

    def need(self, opcode_at: int, at: int, size: int) -> int:
        """Position after ``size`` argument bytes at ``at``; corrupt when the pickle ends first."""
        stop = at + size
        if stop > self.limit:
            self.corrupt(f"pickle ends inside the opcode at byte {opcode_at}", opcode_at)
        return stop

    def uint(self, opcode_at: int, at: int, size: int, signed: bool = False) -> int:
        self.need(opcode_at, at, size)
        fmt = _INT_FORMATS[size]
        return struct.unpack_from(fmt.lower() if signed else fmt, self.buf, at)[0]

    def line(self, at: int, opcode_at: int) -> int:
        """Position of the newline ending the line that starts at ``at``."""
        newline = self.buf.find(b"\n", at, self.limit)
        if newline < 0:
            self.corrupt(f"no newline after the opcode at byte {opcode_at}", opcode_at)
        return newline

    def text(self, start: int, stop: int, encoding: str = "utf-8") -> str:
        return str(self.buf[start:stop], encoding, "surrogatepass")

    def run(self) -> _ScanResult:
        try:
            result = self.walk_plain()
            if result is None:  # a STACK_GLOBAL: walk again, tracking the strings it may name
                self.seen, self.track, self.outside_torch = [], True, set()
                self.recent, self.memo, self.limit = [None, None], {}, self.end
                self.protocol, self.cost = None, 0
                result = self.walk_tracked()
            self.shares = self.shares or self.track or self.long_ints > _LONG_INTS
        except _ScanCorrupt as exc:
            if self.allowed is not None:  # the opcodes before the bad one still run
                exc.effects = _StackModel(self, exc.pos).run()
            raise
        if self.allowed is not None and self.shares:
            effects = _StackModel(self, result.end).run()
            result.estimate, result.hashed = effects.estimate, effects.hashed
        return result

    def frame_done(self, pos: int) -> bool:
        """At the end of the current frame: the walk goes on to the pickle's end."""
        if pos == self.limit < self.end:
            self.limit = self.end
            return True
        return False

    def walk_plain(self) -> _ScanResult | None:
        """The common case, no STACK_GLOBAL: skip every argument but globals' and memo indices.

        Returns None at the first STACK_GLOBAL.
        """
        self.shares = False
        buf, kinds, skips, costs = self.buf, _KIND, _SKIP, _COST
        pos = self.pos
        end = self.limit
        cost = 0
        tops, slots, top = _TOP, self.slots, _HOLDER
        while pos < end or self.frame_done(pos) and pos < (end := self.limit):
            op = buf[pos]
            kind = kinds[op]
            if kind == _K_SKIP:
                pos += skips[op]
                cost += costs[op]
                top = tops[op]
            elif kind == _K_COUNTED:
                width = skips[op]
                if pos + 1 + width > end:
                    self.corrupt(f"pickle ends inside the opcode at byte {pos}", pos)
                count = _UNPACK[width](buf, pos + 1)[0]
                if op == _LONG1 and count >= 8:
                    self.long_ints += 1
                pos += 1 + width + count
                cost += costs[op] + _PER_BYTE[op] * count
                top = _LEAF
            elif kind == _K_BINGET or kind == _K_LONG_BINGET:
                width = 1 if kind == _K_BINGET else 4
                if pos + 1 + width > end:
                    self.corrupt(f"pickle ends inside the opcode at byte {pos}", pos)
                index = buf[pos + 1] if width == 1 else _UNPACK[4](buf, pos + 1)[0]
                top = slots[index] if index < len(slots) else 0
                if top != _LEAF:
                    self.shares = True
                pos += 1 + width
                cost += costs[op]
            elif kind == _K_BINPUT or kind == _K_LONG_BINPUT:
                width = 1 if kind == _K_BINPUT else 4
                if pos + 1 + width > end:
                    self.corrupt(f"pickle ends inside the opcode at byte {pos}", pos)
                index = buf[pos + 1] if width == 1 else _UNPACK[4](buf, pos + 1)[0]
                if index > pos + 1024:
                    raise CheckpointFormatError(f"memo index {index} at byte {pos} is out of range")
                self.note_slot(index, top)
                pos += 1 + width
                cost += costs[op]
            elif kind == _K_STOP:
                self.cost += cost
                return self.result(pos + 1)
            elif kind == _K_STACK_GLOBAL:
                return None
            elif kind == _K_MEMO:
                at, pos = pos, self.special(op, pos)
                top = self.memo_op(op, at, pos, top)
                end = self.limit
            else:
                pos = self.special(op, pos)
                end = self.limit
                top = tops[op]
        return self.ran_out(pos)

    def note_slot(self, index: int, top: int) -> None:
        """Memo slot ``index`` now holds a value of kind ``top`` (_LEAF or _HOLDER)."""
        slots = self.slots
        if index >= len(slots):
            slots.extend(bytes(index + 1 - len(slots) + 4096))
        if not slots[index]:
            self.filled += 1
        slots[index] = top

    def memo_op(self, op: int, at: int, after: int, top: int) -> int:
        """PUT, GET, MEMOIZE or DUP in the plain walk; returns the kind of the new top."""
        if op == _OP["DUP"]:
            self.shares = self.shares or top != _LEAF
        elif op == _OP["MEMOIZE"]:
            self.note_slot(self.filled, top)
        elif op == _OP["PUT"]:
            self.note_slot(self.memo_index(op, at + 1, after, at), top)
        else:
            index = self.memo_index(op, at + 1, after, at)
            top = self.slots[index] if index < len(self.slots) else 0
            self.shares = self.shares or top != _LEAF
        return top

    def walk_tracked(self) -> _ScanResult:
        buf = self.buf
        fixed, special, costs = _FIXED, _SPECIAL_TRACKED, _COST
        pos = self.pos
        end = self.limit
        recent = self.recent
        cost = 0
        while pos < end or self.frame_done(pos) and pos < (end := self.limit):
            op = buf[pos]
            size = fixed[op]
            if size >= 0 and not special[op]:
                pos += 1 + size
                cost += costs[op]
                recent[0], recent[1] = recent[1], None
                continue
            if op == _STOP:
                self.cost += cost
                return self.result(pos + 1)
            pos = self.special(op, pos)
            end = self.limit
        return self.ran_out(pos)

    def result(self, end: int) -> _ScanResult:
        names = {_OPCODE_NAMES[op] for op in self.outside_torch}
        return _ScanResult(self.seen, end, self.protocol, names, self.cost)

    def ran_out(self, pos: int) -> NoReturn:
        if pos > self.limit:
            where = "frame" if self.limit < self.end else "pickle"
            self.corrupt(f"the {where} ends inside an opcode before byte {self.limit}", self.limit)
        self.corrupt("pickle exhausted before seeing STOP", self.end)

    def special(self, op: int, at: int) -> int:
        """Handle one opcode that needs more than skipping; returns the next position."""
        arg = at + 1
        size = _FIXED[op]
        if size == -1:
            self.corrupt(f"at position {at}, opcode {bytes([op])!r} unknown", at)
        if size >= 0:
            after = self.need(at, arg, size)
        elif op in _COUNTED:
            width, signed = _COUNTED[op]
            count = self.uint(at, arg, width, signed)
            if count < 0:
                self.corrupt(f"negative byte count at byte {at}", at)
            after = self.need(at, arg + width, count)
        else:
            after = self.line(arg, at)
            if _LINES[op] == 2:
                after = self.line(after + 1, at)
            after += 1
        self.cost += _COST[op] + _PER_BYTE[op] * (after - arg)
        if op in _LONGS:  # as _StackModel weighs it: 8+ bytes (LONG1, LONG4), or 8+ with "\n"
            if after - arg - (_COUNTED[op][0] if op in _COUNTED else 0) >= 8:
                self.long_ints += 1
        found: str | None = None
        pushed: Any = None
        if op not in TORCH_OPCODES:
            self.outside_torch.add(op)
        if op == _PROTO:
            self.protocol = self.buf[arg]
        elif op == _FRAME:
            if self.limit < self.end:
                self.corrupt(f"a frame begins at byte {at}, before the current one ends", at)
            stop = after + self.uint(at, arg, 8)
            if stop > self.end:
                self.corrupt(f"the frame at byte {at} runs past the end of the pickle", at)
            self.limit = stop
        if op == _GLOBAL or op == _INST:
            found = self.global_name(arg, after, at, strict=op == _GLOBAL)
        elif op == _STACK_GLOBAL:
            found = self.stack_global_name()
        if found is not None:
            self.seen.append(found)
            if self.allowed is not None:
                _check_global(found, self.allowed, self.path)
        if self.allowed is not None and op in _FORBIDDEN:
            name = _OPCODE_NAMES[op]
            raise UnsafeCheckpointError(
                found or f"{name} opcode",
                path=self.path,
                detail=f"the {name} opcode builds objects outside the allow-list",
            )
        if op in _NO_PUSH:
            return after
        if op in _PUTS:
            index = self.memo_index(op, arg, after, at)
            if index > at + 1024:
                # The C unpickler sizes its memo to the index: LONG_BINPUT 2**31 asks for
                # gigabytes. A real pickle numbers its memo from 0, never past its own length.
                raise CheckpointFormatError(f"memo index {index} at byte {at} is out of range")
            if self.track:
                self.memo[index] = self.recent[1]
            return after
        if op == _MEMOIZE:
            if self.track:
                self.memo[len(self.memo)] = self.recent[1]
            return after
        if op in _GETS:
            pushed = self.memo.get(self.memo_index(op, arg, after, at)) if self.track else None
        elif op == _UNICODE:
            pushed = (arg, after - 1, op)
        elif op in _STRINGS:
            pushed = (arg + _COUNTED[op][0], after, op)
        self.recent[0], self.recent[1] = self.recent[1], pushed
        return after

    def memo_index(self, op: int, arg: int, after: int, at: int) -> int:
        size = _FIXED[op]
        if size > 0:
            return self.uint(at, arg, size)
        try:
            return int(self.text(arg, after - 1, "ascii"))
        except ValueError:
            self.corrupt(f"memo index at byte {at} is not a number", at)

    def global_name(self, arg: int, after: int, at: int, *, strict: bool) -> str | None:
        """``module.name`` of GLOBAL / INST, decoded as the C unpickler decodes it (UTF-8)."""
        split = self.buf.find(b"\n", arg, after)
        try:
            module, name = self.text(arg, split), self.text(split + 1, after - 1)
        except UnicodeDecodeError:
            if strict:
                self.corrupt(f"global name at byte {at} is not UTF-8", at)
            return None
        return _python3_name(module, name)

    def stack_global_name(self) -> str | None:
        names = []
        for value in self.recent:
            if value is None:
                return None
            start, stop, op = value
            try:
                codec = "raw-unicode-escape" if op == _UNICODE else "utf-8"
                text = self.text(start, stop, codec)
            except UnicodeDecodeError:
                return None
            names.append(text)
        return _python3_name(names[0], names[1])


# --------------------------------------------------------------------------- the stack model
# Some work of the C unpickler is proportional to what the objects hold, not to opcode bytes:
# BUILD copies its state dict into an OrderedDict's __dict__ (a memoised 100k-entry dict is
# 7 bytes a copy), and hashing a dict key or set item walks a tuple as a tree (``t = (t, t)``
# through the memo: 40 levels in 300 bytes, 2**40 steps). None of it can be interrupted once
# the unpickler runs, so a second pass over the checked opcodes models the stack first:
#
# - an int is an immutable value: the number of items hashing it visits (1 for a leaf;
#   1 + the items' for a tuple, capped at _WEIGHT_CAP);
# - a tuple ``(weight, *items)`` is a pickle tuple holding a container or an object, and
#   ``(weight, *items, _Collides)`` one whose hash can collide with others' (it holds a long
#   int: its hash is the int's modulo 2**61 - 1, so k * (2**61 - 1) all hash alike); a long int
#   (8+ bytes, or 8+ characters with its newline) is ``(weight, _Collides)``;
# - a list ``[count, weight, keys]`` is a container or an object a callable returned:
#   ``count`` the items a copy of it makes, ``weight`` the items hashing what it holds can
#   visit, ``keys`` the :class:`_KeyHashes` of its items (keys) that are such tuples;
# - a :class:`_SimGlobal` is a global, marked when calling it hashes its argument's items.
#
# Only keys of one hash probe each other: each container counts its keys per hash, and a key
# inserted is charged the earlier keys of its hash (random 64-bit keys: nothing; k * (2**61 -
# 1): n**2 / 2). A tuple's hash is made of its items': the model knows it when every item is
# a long int or such a tuple; otherwise it may equal any (_UNKNOWN), as charged before.

_WEIGHT_CAP = 1 << 62
#: Globals whose call (REDUCE, NEWOBJ) hashes the items of its argument: set(list), ...
_HASHING_GLOBALS = frozenset(
    {
        "builtins.set",
        "builtins.frozenset",
        "collections.Counter",
        "collections.OrderedDict",
        "torch._tensor._rebuild_from_type_v2",  # calls its first argument on the rest
    }
)
#: Bytes per entry a BUILD copies into an object's ``__dict__`` (measured: 39 on 3.11).
_BUILD_ENTRY = 64


#: The hash of a key the model cannot tell: it may equal any other key's.
_UNKNOWN = object()
#: The model works out a tuple's hash only up to this weight (a shared tree hashes as a tree).
_EXACT_WEIGHT = 32


class _Collides:
    """Ends a modelled tuple whose hash may equal that of many others (see above).

    ``proxy`` is a value of the same hash (None: unknown), ``key`` that hash or _UNKNOWN, and
    ``items`` the :class:`_KeyHashes` of what a hashing callable given the value inserts
    (counted from ``members``, a tuple's items, when first asked).
    """

    __slots__ = ("proxy", "key", "members", "counted")

    def __init__(
        self, proxy: Any, items: _KeyHashes | None = None, members: list[Any] | None = None
    ) -> None:
        self.proxy = proxy
        self.key = _UNKNOWN if proxy is None else hash(proxy)
        self.members = members
        self.counted = items

    @property
    def items(self) -> _KeyHashes | None:
        if self.members is not None:
            self.counted, self.members = _item_keys(self.members), None
        return self.counted


class _KeyHashes:
    """How many keys of a container (or items of a sequence) have each hash that may repeat."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts: dict[Any, int] = {}
        self.total = 0

    def insert(self, key: Any, times: int = 1) -> int:
        """Count ``times`` keys of hash ``key``; returns the probes they make of earlier keys
        of that hash (or of any, for _UNKNOWN) and of each other."""
        counts = self.counts
        if key is _UNKNOWN:
            earlier = self.total
        else:
            earlier = counts.get(key, 0) + counts.get(_UNKNOWN, 0)
        counts[key] = counts.get(key, 0) + times
        self.total += times
        return times * earlier + times * (times - 1) // 2

    def insert_all(self, other: _KeyHashes) -> int:
        """Insert every key ``other`` counts (a copy, or a hashing callable's insertions)."""
        return sum(self.insert(key, times) for key, times in list(other.counts.items()))


def _hash_key(value: Any) -> Any:
    """The hash of ``value`` (a key or set item) if it may share it with other keys: it holds
    a long int; else None."""
    if type(value) is tuple:
        last = value[-1]
        if type(last) is _Collides:
            return last.key
    return None


def _hashes(keys: list[Any]) -> Iterator[Any]:
    """The hashes of those ``keys`` that may share theirs with others."""
    for key in keys:
        if type(key) is tuple and type(key[-1]) is _Collides:
            yield key[-1].key


def _proxy(value: Any) -> Any:
    """A value hashing as ``value`` does, or None when the model cannot tell."""
    if type(value) is tuple and type(value[-1]) is _Collides:
        return value[-1].proxy
    return None


def _item_keys(items: list[Any]) -> _KeyHashes | None:
    """The hashes a hashing callable given a sequence of ``items`` may insert: each item's,
    and for a pair the first item's (``OrderedDict([(k, v), ...])``)."""
    keys = None
    for item in items:
        key = _hash_key(item)
        if key is not None:
            keys = keys or _KeyHashes()
            keys.insert(key)
        if type(item) is tuple and len(item) == 3 + (key is not None):
            first = _hash_key(item[1])
            if first is not None:
                keys = keys or _KeyHashes()
                keys.insert(first)
    return keys


def _held(value: Any) -> tuple[_KeyHashes | None, int]:
    """What a hashing callable given ``value`` (an argument tuple, or a BUILD state) inserts,
    and the work of gathering it."""
    kind = type(value)
    if kind is list:
        return value[2], 0
    if kind is not tuple:
        return None, 0
    parts = []
    for item in value[1:]:
        if type(item) is list:
            parts.append(item[2])
        elif type(item) is tuple and type(item[-1]) is _Collides:
            parts.append(item[-1].items)
    return _merged(parts)


def _merged(parts: list[_KeyHashes | None]) -> tuple[_KeyHashes | None, int]:
    """One argument's keys as they are; several merged, the work their distinct hashes."""
    parts = [part for part in parts if part is not None]
    if len(parts) <= 1:
        return (parts[0] if parts else None), 0
    merged = _KeyHashes()
    for part in parts:
        merged.insert_all(part)
    return merged, sum(len(part.counts) for part in parts)


def _insert_keys(target: Any, keys: Iterable[Any]) -> int:
    """Insert ``keys`` (hashes) into the container ``target`` models; returns the probes."""
    if type(target) is list:
        if target[2] is None:
            target[2] = _KeyHashes()
        into = target[2]
    else:
        into = _KeyHashes()
    return sum(into.insert(key) for key in keys)


def _long_proxy(buf: Any, op: int, arg: int, after: int) -> Any:
    """An int hashing as the long int of this opcode does (None: the model cannot tell)."""
    if op in _COUNTED:
        value = int.from_bytes(buf[arg:after], "little", signed=True)
    else:
        try:
            value = int(bytes(buf[arg : after - 1]).rstrip(b"L"))
        except ValueError:  # past int's digit limit: the unpickler refuses it too
            return None
    return hash(value)


def _memo_arg(buf: bytes, arg: int, after: int, size: int) -> int:
    """The memo index a PUT or GET names: one byte, four bytes, or a line of digits."""
    if size == 1:
        return buf[arg]
    if size == 4:
        return _UNPACK[4](buf, arg)[0]
    return int(buf[arg : after - 1])


class _SimGlobal:
    __slots__ = ("hashes",)

    def __init__(self, hashes: bool) -> None:
        self.hashes = hashes


def _weight(value: Any) -> int:
    kind = type(value)
    if kind is int:
        return value
    if kind is tuple:
        return value[0]
    if kind is list:
        return value[1]
    return 1


def _count(value: Any) -> int:
    """How many entries a dict or copy made from ``value`` can have."""
    kind = type(value)
    if kind is list:
        return value[0]
    if kind is tuple:
        return sum(_weight(item) if type(item) is not list else item[0] for item in value[1:])
    return 1


(
    _S_LEAF,
    _S_PUT,
    _S_GET,
    _S_MEMOIZE,
    _S_MARK,
    _S_TUPLE,
    _S_TUPLE_N,
    _S_BOX,
    _S_SETITEM,
    _S_SETITEMS,
    _S_APPEND,
    _S_APPENDS,
    _S_ADDITEMS,
    _S_DICT,
    _S_LIST,
    _S_FROZENSET,
    _S_REDUCE,
    _S_NEWOBJ,
    _S_NEWOBJ_EX,
    _S_BUILD,
    _S_POP,
    _S_POP_MARK,
    _S_DUP,
    _S_GLOBAL,
    _S_STACK_GLOBAL,
    _S_PERSID,
    _S_BINPERSID,
    _S_INST,
    _S_OBJ,
    _S_NONE,
    _S_SAME,
    _S_LONG,
) = range(32)
_SIM = bytearray([_S_LEAF] * 256)
for _names, _kind in (
    ("PUT BINPUT LONG_BINPUT", _S_PUT),
    ("GET BINGET LONG_BINGET", _S_GET),
    ("MEMOIZE", _S_MEMOIZE),
    ("MARK", _S_MARK),
    ("TUPLE", _S_TUPLE),
    ("EMPTY_TUPLE TUPLE1 TUPLE2 TUPLE3", _S_TUPLE_N),
    ("EMPTY_LIST EMPTY_DICT EMPTY_SET", _S_BOX),
    ("SETITEM", _S_SETITEM),
    ("SETITEMS", _S_SETITEMS),
    ("APPEND", _S_APPEND),
    ("APPENDS", _S_APPENDS),
    ("ADDITEMS", _S_ADDITEMS),
    ("DICT", _S_DICT),
    ("LIST", _S_LIST),
    ("FROZENSET", _S_FROZENSET),
    ("REDUCE", _S_REDUCE),
    ("NEWOBJ", _S_NEWOBJ),
    ("NEWOBJ_EX", _S_NEWOBJ_EX),
    ("BUILD", _S_BUILD),
    ("POP", _S_POP),
    ("POP_MARK", _S_POP_MARK),
    ("DUP", _S_DUP),
    ("GLOBAL", _S_GLOBAL),
    ("STACK_GLOBAL", _S_STACK_GLOBAL),
    ("PERSID", _S_PERSID),
    ("BINPERSID", _S_BINPERSID),
    ("INST", _S_INST),
    ("OBJ", _S_OBJ),
    ("PROTO FRAME STOP", _S_NONE),
    ("READONLY_BUFFER", _S_SAME),
    ("INT LONG LONG1 LONG4", _S_LONG),  # hashing an int walks its digits
):
    for _name in _names.split():
        _SIM[_OP[_name]] = _kind
del _names, _kind, _name
_TUPLE_N = {_OP["EMPTY_TUPLE"]: 0, _OP["TUPLE1"]: 1, _OP["TUPLE2"]: 2, _OP["TUPLE3"]: 3}


@dataclass
class _Effects:
    """What the stack model found: bytes the decode allocates, items it hashes."""

    estimate: int = 0
    hashed: int = 0


class _StackModel:
    """Runs the opcodes of ``buf[pos:stop]`` (already checked by :class:`_PickleWalk`) on a
    model of the unpickler's stack; see the comment above."""

    def __init__(self, walk: _PickleWalk, stop: int) -> None:
        self.walk = walk
        self.stop = stop
        self.effects = _Effects()

    def corrupt(self, message: str, at: int) -> NoReturn:
        raise _ScanCorrupt(f"{message} at byte {at}", at, self.effects)

    def run(self) -> _Effects:
        walk, buf, stop, effects = self.walk, self.walk.buf, self.stop, self.effects
        sim, fixed, costs, per_byte = _SIM, _FIXED, _COST, _PER_BYTE
        stack: list[Any] = []
        marks: list[int] = []
        memo: list[Any] = []
        filled = 0  # memo slots set, as MEMOIZE numbers them
        push, pop = stack.append, stack.pop
        pos = walk.pos
        cost = hashed = 0
        longs = walk.long_ints > 0  # else no value is a long int: no key shares a hash
        # past either budget the decode is refused: stop before the model grows as large
        most = DECODE_FACTOR * (stop - pos) + DECODE_ALLOWANCE
        most_hashed = HASH_FACTOR * (stop - pos) + HASH_ALLOWANCE
        check_at = pos
        try:
            while pos < stop:
                if pos >= check_at:
                    if cost > most or hashed > most_hashed:
                        break
                    check_at = pos + 65536
                op = buf[pos]
                kind = sim[op]
                size = fixed[op]
                if size >= 0:
                    arg, after = pos + 1, pos + 1 + size
                    cost += costs[op]
                elif op in _COUNTED:
                    width = _COUNTED[op][0]
                    count = int.from_bytes(buf[pos + 1 : pos + 1 + width], "little", signed=True)
                    arg, after = pos + 1 + width, pos + 1 + width + count
                    cost += costs[op] + per_byte[op] * count
                else:
                    arg = pos + 1
                    after = buf.find(b"\n", arg, stop) + 1
                    if _LINES[op] == 2:
                        after = buf.find(b"\n", after, stop) + 1
                    if after <= 0:
                        self.corrupt("no newline", pos)
                    cost += costs[op] + per_byte[op] * (after - arg)
                if kind == _S_LEAF:
                    push(1)
                elif kind == _S_PUT:
                    index = _memo_arg(buf, arg, after, size)
                    if not stack or len(stack) == (marks[-1] if marks else -1):
                        self.corrupt("memo put from an empty stack", pos)
                    if index >= len(memo):
                        memo.extend([None] * (index + 1 - len(memo)))
                    if memo[index] is None:
                        filled += 1
                    memo[index] = stack[-1]
                elif kind == _S_GET:
                    index = _memo_arg(buf, arg, after, size)
                    value = memo[index] if index < len(memo) else None
                    if value is None:
                        self.corrupt(f"memo value {index} not found", pos)
                    push(value)
                elif kind == _S_MARK:
                    marks.append(len(stack))
                elif kind == _S_TUPLE_N:
                    n = _TUPLE_N[op]
                    if n:
                        if len(stack) < n:
                            self.corrupt("stack underflow", pos)
                        items = stack[-n:]
                        del stack[-n:]
                        push(self.tuple_value(items))
                    else:
                        push(1)
                elif kind == _S_TUPLE:
                    items = self.take(stack, marks, pos)
                    push(self.tuple_value(items))
                elif kind == _S_BOX:
                    push([0, 1, None])
                elif kind == _S_SETITEM:
                    if len(stack) < 3:
                        self.corrupt("stack underflow", pos)
                    value = pop()
                    key = pop()
                    hashed += _weight(key)
                    if longs and (same := _hash_key(key)) is not None:
                        hashed += _insert_keys(stack[-1], (same,))
                    self.add(stack[-1], 1, _weight(key) + _weight(value))
                elif kind == _S_SETITEMS or kind == _S_APPENDS or kind == _S_ADDITEMS:
                    items = self.take(stack, marks, pos)
                    if not stack:
                        self.corrupt("stack underflow", pos)
                    weight = sum(map(_weight, items))
                    if kind == _S_SETITEMS:
                        hashed += sum(map(_weight, items[::2]))
                        if longs:
                            hashed += _insert_keys(stack[-1], _hashes(items[::2]))
                        self.add(stack[-1], len(items) // 2, weight)
                    else:
                        if kind == _S_ADDITEMS:
                            hashed += weight
                            if longs:
                                hashed += _insert_keys(stack[-1], _hashes(items))
                        elif longs:  # a list's items: hashed when a callable is given it
                            self.record(stack[-1], items)
                        self.add(stack[-1], len(items), weight)
                elif kind == _S_APPEND:
                    if len(stack) < 2:
                        self.corrupt("stack underflow", pos)
                    value = pop()
                    if longs:
                        self.record(stack[-1], [value])
                    self.add(stack[-1], 1, _weight(value))
                elif kind == _S_DICT or kind == _S_LIST or kind == _S_FROZENSET:
                    items = self.take(stack, marks, pos)
                    weight = 1 + sum(map(_weight, items))
                    if kind == _S_DICT:
                        hashed += sum(map(_weight, items[::2]))
                        made = [len(items) // 2, weight, None]
                        if longs:
                            hashed += _insert_keys(made, _hashes(items[::2]))
                        push(made)
                    elif kind == _S_LIST:
                        push([len(items), weight, _item_keys(items) if longs else None])
                    else:
                        hashed += weight
                        weight = min(weight, _WEIGHT_CAP)
                        keys = _KeyHashes()
                        if longs:
                            hashed += sum(map(keys.insert, _hashes(items)))
                        # a frozenset's hash is made of its items': it collides as they do
                        push((weight, self.frozenset_hash(items, keys)) if keys.total else weight)
                elif kind == _S_REDUCE or kind == _S_NEWOBJ or kind == _S_NEWOBJ_EX:
                    need = 3 if kind == _S_NEWOBJ_EX else 2
                    if len(stack) < need:
                        self.corrupt("stack underflow", pos)
                    args = stack[-need + 1 :]
                    del stack[-need + 1 :]
                    callable_ = pop()
                    count = sum(map(_count, args))
                    weight = min(sum(map(_weight, args)), _WEIGHT_CAP)
                    keys = None
                    if longs:
                        keys, work = self.gather(args)
                        hashed += work
                    if type(callable_) is not _SimGlobal or callable_.hashes:
                        hashed += weight
                        if keys is not None:  # a new container: its keys inserted afresh
                            made = _KeyHashes()
                            hashed += made.insert_all(keys)
                            keys = made
                            if hashed > most_hashed:
                                break
                    push([count, weight, keys])
                elif kind == _S_BUILD:
                    if len(stack) < 2:
                        self.corrupt("stack underflow", pos)
                    state = pop()
                    # a copy of each entry (its key hashed again), or __setstate__ sees it
                    copied = _count(state)
                    cost += _BUILD_ENTRY * copied
                    hashed += _weight(state)
                    if longs:
                        keys, work = _held(state)
                        if keys is not None:  # inserted into the object's __dict__
                            target = stack[-1]
                            if type(target) is list and target[2] is None:
                                target[2] = _KeyHashes()
                            into = target[2] if type(target) is list else _KeyHashes()
                            hashed += work + into.insert_all(keys)
                            if hashed > most_hashed:
                                break
                    self.add(stack[-1], 0, _weight(state))
                elif kind == _S_POP:
                    if marks and marks[-1] == len(stack):
                        marks.pop()
                    elif stack:
                        pop()
                    else:
                        self.corrupt("stack underflow", pos)
                elif kind == _S_POP_MARK:
                    self.take(stack, marks, pos)
                elif kind == _S_DUP:
                    if not stack:
                        self.corrupt("stack underflow", pos)
                    push(stack[-1])
                elif kind == _S_GLOBAL:
                    name = walk.global_name(arg, after, pos, strict=False)
                    push(_SimGlobal(name is None or name in _HASHING_GLOBALS))
                elif kind == _S_STACK_GLOBAL:
                    if len(stack) < 2:
                        self.corrupt("stack underflow", pos)
                    del stack[-2:]
                    push(_SimGlobal(True))  # its name came from the stack: assume the worst
                elif kind == _S_PERSID:
                    push([0, 1, None])
                elif kind == _S_BINPERSID:
                    if not stack:
                        self.corrupt("stack underflow", pos)
                    stack[-1] = [0, _weight(stack[-1]), None]
                elif kind == _S_INST or kind == _S_OBJ:
                    items = self.take(stack, marks, pos)
                    weight = min(sum(map(_weight, items)), _WEIGHT_CAP)
                    push(
                        [
                            sum(map(_count, items)),
                            weight,
                            _item_keys(items) if longs else None,
                        ]
                    )
                elif kind == _S_MEMOIZE:
                    if not stack:
                        self.corrupt("memo put from an empty stack", pos)
                    if filled >= len(memo):
                        memo.extend([None] * (filled + 1 - len(memo)))
                    if memo[filled] is None:
                        memo[filled] = stack[-1]
                        filled += 1
                    else:
                        memo[filled] = stack[-1]
                elif kind == _S_LONG:
                    weight = 1 + (after - arg) // 8
                    push((weight, _Collides(_long_proxy(buf, op, arg, after))) if weight > 1 else 1)
                elif kind == _S_SAME:
                    if not stack:
                        self.corrupt("stack underflow", pos)
                # _S_NONE: framing, STOP
                pos = after
        finally:
            effects.estimate += cost
            effects.hashed += hashed
        return effects

    def take(self, stack: list[Any], marks: list[int], at: int) -> list[Any]:
        """Pop the items above the last MARK, and the mark."""
        if not marks:
            self.corrupt("no MARK", at)
        mark = marks.pop()
        items = stack[mark:]
        del stack[mark:]
        return items

    @staticmethod
    def tuple_value(items: list[Any]) -> Any:
        weight = 1
        plain = True
        flagged = False
        for item in items:
            kind = type(item)
            if kind is int:
                weight += item
            else:
                plain = False
                if kind is tuple:
                    weight += item[0]
                    flagged = flagged or type(item[-1]) is _Collides
                else:
                    weight += item[1] if kind is list else 1
        weight = min(weight, _WEIGHT_CAP)
        if plain:
            return weight
        if not flagged:
            return (weight, *items)
        # a tuple's hash is made of its items': one holding a long int collides as they do
        proxies = None
        if weight <= _EXACT_WEIGHT:
            proxies = [_proxy(item) for item in items]
            if None in proxies:
                proxies = None
        return (weight, *items, _Collides(proxies and tuple(proxies), members=items))

    @staticmethod
    def frozenset_hash(items: list[Any], keys: _KeyHashes) -> _Collides:
        """The hash of a frozenset of ``items``, ``keys`` their hashes that may repeat."""
        proxies = None
        if len(keys.counts) == len(items) and _UNKNOWN not in keys.counts:
            proxies = frozenset(map(_proxy, items))  # one proxy an item: none repeats
        return _Collides(proxies, keys)

    @staticmethod
    def gather(args: list[Any]) -> tuple[_KeyHashes | None, int]:
        """What a callable given ``args`` (its argument tuple, NEWOBJ_EX's keywords) holds."""
        held = [_held(arg) for arg in args]
        keys, work = _merged([keys for keys, _ in held])
        return keys, work + sum(work for _, work in held)

    @staticmethod
    def record(target: Any, items: list[Any]) -> None:
        """A list (or an object APPENDS extends) gains ``items``: count their hashes."""
        keys = _item_keys(items)
        if keys is not None and type(target) is list:
            if target[2] is None:
                target[2] = keys
            else:
                target[2].insert_all(keys)

    @staticmethod
    def add(target: Any, count: int, weight: int) -> None:
        """A container (or an object BUILD set state on) gains items."""
        if type(target) is list:
            target[0] += count
            target[1] = min(target[1] + weight, _WEIGHT_CAP)


def _scan_pickle(
    buf: Any, pos: int, end: int, allowed: dict[str, Any] | None, path: object = None
) -> _ScanResult:
    """Walk the pickle at ``buf[pos:end]`` (bytes or mmap) without running it.

    Lists its globals; with ``allowed`` given, the first unsafe global or opcode raises
    :class:`UnsafeCheckpointError` at once, so a file both malicious and corrupt is reported as
    malicious. A memo index far past the pickle's length raises :class:`CheckpointFormatError`; a malformed
    pickle :class:`_ScanCorrupt`, whose ``pos`` is where the walk stopped.
    """
    return _PickleWalk(buf, pos, end, allowed, path).run()


def _scan(file: BinaryIO, allowed: dict[str, Any] | None, path: object = None) -> list[str]:
    """:func:`_scan_pickle` from ``file``'s position; leaves the position unchanged."""
    start = file.tell()
    with _pickle_bytes(file) as (buf, end):
        return _scan_pickle(buf, start, end, allowed, path).globals


@contextmanager
def _pickle_bytes(file: BinaryIO) -> Iterator[tuple[Any, int]]:
    """The bytes ``file`` reads from, indexed by its positions, and where its data ends.

    A BytesIO shares its bytes (no copy); a :class:`_BoundedReader` over a file is mapped.
    """
    if isinstance(file, io.BytesIO):
        data = file.getvalue()
        yield data, len(data)
    elif isinstance(file, _BoundedReader):
        if os.fstat(file.fileno()).st_size == 0:
            yield b"", 0
            return
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            yield mapped, min(file.limit, len(mapped))
    else:
        raise UsageError(f"cannot scan a pickle from {type(file).__name__}")


def _load_pickle(
    file: BinaryIO,
    allowed: dict[str, Any],
    persistent_load: Callable[[Any], Any] | None = None,
    path: object = None,
) -> Any:
    """Scan, then decode one pickle from ``file``'s current position; unsafe beats corrupt."""
    return _load_pickle_scanned(file, allowed, persistent_load, path)[0]


def _load_pickle_scanned(
    file: BinaryIO,
    allowed: dict[str, Any],
    persistent_load: Callable[[Any], Any] | None = None,
    path: object = None,
) -> tuple[Any, _ScanResult]:
    """:func:`_load_pickle`, also returning what the opcode walk found.

    Only the opcodes the walk has seen reach the C unpickler: when the walk stops on a
    malformed opcode, the unpickler gets the pickle cut there (a global it names might still
    be refused as unsafe, but no memo index the walk has not checked is ever read).
    """
    start = file.tell()
    scan_error: _ScanCorrupt | None = None
    with _pickle_bytes(file) as (buf, end):
        try:
            scan = _scan_pickle(buf, start, end, allowed, path)
        except _ScanCorrupt as exc:
            scan_error = exc
            scan = _ScanResult([], exc.pos, estimate=exc.effects.estimate)
            scan.hashed = exc.effects.hashed
        tuple_bound = tuple_chain_bound(buf, start, scan.end)
    stored = scan.end - start
    # the pickle's bytes are held, and a frame or string is read into a copy of its own
    budget = DecodeBudget(stored, 2 * stored + scan.estimate, path=path, hashed=scan.hashed)
    file.seek(start)
    source = file if scan_error is None else _BoundedReader(file, scan.end)
    try:
        unpickler = _MetadataUnpickler(
            source, allowed=allowed, persistent_load=persistent_load, path=path
        )
        obj = decode_bounded(unpickler.load, tuple_bound, path, budget)
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    except _FORMAT_ERRORS as exc:
        problem = scan_error or exc
        raise CheckpointFormatError(
            f"corrupt pickle ({type(problem).__name__}: {problem})"
        ) from exc
    if scan_error is not None:  # cannot happen: the cut pickle has no STOP
        raise CheckpointFormatError(f"corrupt pickle (_ScanCorrupt: {scan_error})")
    return obj, scan


class _BoundedReader(io.RawIOBase):
    """Reads from ``file`` but refuses any single read past ``limit``: a pickle that declares
    a 4 GiB string must not make us allocate 4 GiB first."""

    def __init__(self, file: BinaryIO, limit: int) -> None:
        super().__init__()
        self._file = file
        self._limit = limit

    @property
    def limit(self) -> int:
        """The position no read may pass."""
        return self._limit

    def fileno(self) -> int:
        return self._file.fileno()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._file.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def read(self, size: int | None = -1) -> bytes:
        remaining = self._limit - self._file.tell()
        if size is None or size < 0:
            size = remaining
        if size > remaining:
            raise EOFError(f"pickle wants {size} bytes but the file ends after {remaining}")
        return self._file.read(size)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readline(self, size: int | None = -1) -> bytes:
        return self._file.readline(min(65536, size if size and size > 0 else 65536))


# --------------------------------------------------------------------------- storages


def _storage_ref(pid: Any, *, legacy: bool) -> _StorageRef:
    width = 6 if legacy else 5
    if not isinstance(pid, tuple) or len(pid) != width or pid[0] not in ("storage", b"storage"):
        raise CheckpointFormatError(f"unexpected persistent id {pid!r:.120}, expected a storage")
    storage_type, key, location, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType) or storage_type.dtype is None:
        raise CheckpointFormatError(
            f"persistent id names {bounded_repr(storage_type)}, not a storage class"
        )
    if isinstance(location, bytes):
        location = location.decode("ascii", "replace")
    if not isinstance(key, str) or not isinstance(location, str):
        raise CheckpointFormatError(
            f"storage key {bounded_repr(key)} or location {bounded_repr(location)} is malformed"
        )
    if type(numel) is not int or numel < 0:
        raise CheckpointFormatError(f"storage {bounded_repr(key)} has size {bounded_repr(numel)}")
    untyped = storage_type.name == "torch.storage.UntypedStorage"
    ref = _StorageRef(key, storage_type.dtype, numel, location, untyped)
    view = pid[5] if legacy else None
    if view is not None:
        if not (
            isinstance(view, tuple) and len(view) == 3 and all(type(v) is int for v in view[1:])
        ):
            raise CheckpointFormatError(f"storage view {bounded_repr(view)} is malformed")
        _view_key, offset, view_size = view
        if offset < 0 or view_size < 0 or offset + view_size > numel:
            raise CheckpointFormatError(
                f"storage view {bounded_repr(view)} lies outside storage {bounded_repr(key)}"
            )
        ref = _StorageRef(key, ref.dtype, view_size, location, untyped, offset, numel)
    return ref


class _StorageTable:
    """Collects the storages a pickle references; a key must keep one dtype and size."""

    def __init__(self, *, legacy: bool, key_prefix: str = "") -> None:
        self.legacy = legacy
        self.key_prefix = key_prefix
        self.storages: dict[str, _StorageRef] = {}

    def load(self, pid: Any) -> _StorageRef:
        ref = _storage_ref(pid, legacy=self.legacy)
        charge_decode(len(ref.key) + len(ref.location) + 256)  # a memoised key, one copy each
        ref = replace(ref, key=self.key_prefix + ref.key)
        known = self.storages.setdefault(ref.key, ref)
        if known.untyped or ref.untyped:
            return ref
        if known.dtype != ref.dtype or known.stored_numel != ref.stored_numel:
            raise CheckpointFormatError(
                f"storage {bounded_repr(ref.key)} is referenced both as {known.stored_numel} x "
                f"{known.dtype} and as {ref.stored_numel} x {ref.dtype}"
            )
        return ref


# --------------------------------------------------------------------------- zip files


@dataclass(frozen=True)
class ZipRecordInfo:
    """Where one member of a torch zip archive lies, so it can be copied byte for byte."""

    name: str
    header_offset: int  # of the local file header
    data_offset: int  # of the member's (possibly compressed) bytes
    size: int  # uncompressed
    compressed_size: int
    crc: int
    compress_type: int


def _check_member_name(name: str, path: object) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise CheckpointFormatError(
            f"zip member {name!r} names a path outside the archive; torch never writes such "
            "names, so the file was altered",
            path=path,
        )


#: General-purpose flag bits of an encrypted zip member (traditional, strong): zipfile's
#: reader raises a bare RuntimeError on one, and torch.save never writes one.
_ENCRYPTED_FLAGS = 0x0001 | 0x0040


def _zip_infos(zf: zipfile.ZipFile, path: object) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    names: set[str] = set()
    for info in infos:
        _check_member_name(info.filename, path)
        if info.flag_bits & _ENCRYPTED_FLAGS:
            raise CheckpointFormatError(
                f"zip member {info.filename!r} is marked encrypted (flags {info.flag_bits:#x}); "
                "torch.save never encrypts, so this is not a file torch wrote",
                path=path,
            )
        if info.filename in names:
            raise CheckpointFormatError(f"zip member {info.filename!r} appears twice", path=path)
        names.add(info.filename)
    return infos


def read_zip_records(path: str | os.PathLike[str]) -> dict[str, ZipRecordInfo]:
    """List the members of a torch zip checkpoint with their byte offsets, in archive order.

    >>> read_zip_records("model.pth")["archive/data/0"].size  # doctest: +SKIP
    4096
    """
    try:
        with open_regular_file(path) as f:
            with zipfile.ZipFile(f) as zf:
                infos = _zip_infos(zf, path)
            records: dict[str, ZipRecordInfo] = {}
            for info in infos:
                f.seek(info.header_offset)
                header = f.read(30)
                if len(header) != 30 or header[:4] != b"PK\x03\x04":
                    raise CheckpointFormatError(f"zip member {info.filename!r} has no local header")
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                records[info.filename] = ZipRecordInfo(
                    name=info.filename,
                    header_offset=info.header_offset,
                    data_offset=info.header_offset + 30 + name_len + extra_len,
                    size=info.file_size,
                    compressed_size=info.compress_size,
                    crc=info.CRC,
                    compress_type=info.compress_type,
                )
            return records
    except CheckpointFormatError as exc:
        raise _with_path(exc, path) from exc.__cause__
    except _FORMAT_ERRORS + (OSError,) as exc:
        raise CheckpointFormatError(f"corrupt zip archive ({exc})", path=path) from exc


def _find_data_pkl(infos: list[zipfile.ZipInfo], path: object) -> zipfile.ZipInfo:
    candidates = [
        i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1
    ]
    if not candidates:
        raise CheckpointFormatError(
            "zip archive has no <name>/data.pkl member: not a torch.save checkpoint", path=path
        )
    if len(candidates) > 1:
        names = ", ".join(i.filename for i in candidates)
        raise CheckpointFormatError(f"zip archive has several data.pkl members: {names}", path=path)
    return candidates[0]


@dataclass
class _ZipDecoded:
    """A torch zip checkpoint's decoded graph (stubs) with what was found on the way."""

    obj: Any
    infos: list[zipfile.ZipInfo]
    prefix: str  # the archive folder with its slash, e.g. "archive/"
    scan: _ScanResult


def _zip_pickle(
    file: BinaryIO, path: object
) -> tuple[list[zipfile.ZipInfo], zipfile.ZipInfo, bytes]:
    """The members of the torch zip ``file``, its ``data.pkl`` member and that member's bytes."""
    with zipfile.ZipFile(file) as zf:
        infos = _zip_infos(zf, path)
        data_pkl = _find_data_pkl(infos, path)
        if data_pkl.compress_type != zipfile.ZIP_STORED or data_pkl.flag_bits & 1:
            # torch.save stores every record; a compressed data.pkl only inflates (a 63 KB
            # DEFLATE member unpacks to gigabytes before any size check could see it)
            raise CheckpointFormatError(
                f"{data_pkl.filename} is compressed or encrypted (zip method "
                f"{data_pkl.compress_type}, flags {data_pkl.flag_bits:#x}); torch.save "
                "stores it uncompressed, so this is not a file torch wrote",
                path=path,
            )
        if data_pkl.file_size > MAX_PICKLE_BYTES:
            raise CheckpointFormatError(
                f"data.pkl is {data_pkl.file_size} bytes, over the {MAX_PICKLE_BYTES}-byte "
                "limit for a checkpoint's object graph",
                path=path,
            )
        with zf.open(data_pkl) as member:
            return infos, data_pkl, member.read(MAX_PICKLE_BYTES + 1)


def check_torch_bytes(file: BinaryIO, *, what: str, path: object = None) -> None:
    """Refuse ``torch.save`` bytes held in memory (a DCP value stored as bytes) whose pickle
    would take more memory or hashing to decode than the pickle budget allows, before torch's
    own loader decodes it; globals are left to that loader (weights-only). ``file`` is read
    from its start and left there.

    >>> check_torch_bytes(io.BytesIO(value), what="value 'epoch'")  # doctest: +SKIP
    """
    try:
        file.seek(0)
        _, _, pkl = _zip_pickle(file, path)
        file.seek(0)
        scan = _scan_pickle(pkl, 0, len(pkl), None, path)
    except _ScanCorrupt as exc:
        raise CheckpointFormatError(f"{what} is a corrupt pickle ({exc})", path=path) from None
    except _FORMAT_ERRORS as exc:
        raise CheckpointFormatError(f"{what} is not a torch.save zip ({exc})", path=path) from None
    stored = len(pkl)
    budget = DecodeBudget(stored, 2 * stored + scan.estimate, what, path, scan.hashed)
    budget.charge(0)
    budget.check_hashing()


def _read_zip(path: str | os.PathLike[str], allowed: dict[str, Any]) -> Any:
    return _decode_zip(path, allowed).obj


def _decode_zip(
    path: str | os.PathLike[str],
    allowed: dict[str, Any],
    on_storage: Callable[[_StorageRef], None] | None = None,
) -> _ZipDecoded:
    """Decode ``data.pkl`` to stubs and check every storage it names against the archive.

    ``on_storage`` sees each storage reference as the pickle loads it, in order.
    """
    with open_regular_file(path) as f:
        infos, data_pkl, data = _zip_pickle(f, path)
    prefix = data_pkl.filename[: -len("data.pkl")]
    table = _StorageTable(legacy=False, key_prefix=prefix + "data/")

    def load_storage(pid: Any) -> _StorageRef:
        ref = table.load(pid)
        if on_storage is not None:
            on_storage(ref)
        return ref

    obj, scan = _load_pickle_scanned(io.BytesIO(data), allowed, load_storage, path)
    sizes = {info.filename: info.file_size for info in infos}
    for key, ref in table.storages.items():
        if key not in sizes:
            raise CheckpointFormatError(f"storage record {key!r} is missing from the archive")
        needed = ref.stored_numel * DTYPE_SIZES[ref.dtype]
        if sizes[key] < needed:
            raise CheckpointFormatError(
                f"storage shorter than its tensor claims: record {key!r} holds {sizes[key]} "
                f"bytes, the pickle declares {needed}"
            )
    return _ZipDecoded(obj, infos, prefix, scan)


# --------------------------------------------------------------------------- legacy files


def _read_legacy(path: str | os.PathLike[str], allowed: dict[str, Any]) -> Any:
    header_only: dict[str, Any] = {}  # the three header pickles name no globals at all
    with open_regular_file(path) as raw:
        file_size = os.fstat(raw.fileno()).st_size
        f = _BoundedReader(raw, file_size)
        magic = _load_pickle(f, header_only)
        if magic != TORCH_LEGACY_MAGIC:
            raise CheckpointFormatError("not a legacy torch.save file (bad magic number)")
        protocol = _load_pickle(f, header_only)
        if protocol != _LEGACY_PROTOCOL_VERSION:
            raise CheckpointFormatError(
                f"legacy torch.save protocol {bounded_repr(protocol)}, expected "
                f"{_LEGACY_PROTOCOL_VERSION}"
            )
        sys_info = _load_pickle(f, header_only)
        if not isinstance(sys_info, dict):
            raise CheckpointFormatError("legacy torch.save file has a malformed sys_info record")
        start = f.tell()
        table = _StorageTable(legacy=True)
        # Bound the main pickle so a lying length cannot pull in the tensor data after it.
        f = _BoundedReader(raw, min(file_size, start + MAX_PICKLE_BYTES))
        obj = _load_pickle(f, allowed, table.load, path)
        f = _BoundedReader(raw, file_size)
        keys = _load_pickle(f, header_only)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise CheckpointFormatError("legacy torch.save file has a malformed storage key list")
        missing = sorted(set(table.storages) - set(keys))
        if missing:
            raise CheckpointFormatError(f"storages {missing[:5]} are referenced but not stored")
        _check_legacy_storages(raw, f.tell(), file_size, keys, table)
    return obj


def _check_legacy_storages(
    raw: BinaryIO, position: int, file_size: int, keys: list[str], table: _StorageTable
) -> None:
    """Each stored storage is an 8-byte element count and its bytes; peek at the counts only."""
    for key in keys:
        ref = table.storages.get(key)
        if ref is None:
            raise CheckpointFormatError(f"storage {key!r} is stored but never referenced")
        raw.seek(position)
        count = raw.read(8)
        if len(count) != 8:
            raise CheckpointFormatError(f"file ends before storage {key!r}: truncated")
        (stored,) = struct.unpack("<q", count)
        needed = ref.stored_numel * DTYPE_SIZES[ref.dtype]
        stored_bytes = stored * DTYPE_SIZES[ref.dtype]
        if stored < 0 or stored_bytes < needed:
            raise CheckpointFormatError(
                f"storage shorter than its tensor claims: storage {key!r} holds {stored} "
                f"elements, the pickle declares {ref.stored_numel}"
            )
        position += 8 + stored_bytes
        if position > file_size:
            raise CheckpointFormatError(f"file ends inside storage {key!r}: truncated")


# --------------------------------------------------------------------------- public API


def _with_path(exc: CheckpointFormatError | UnsafeCheckpointError, path: object) -> Exception:
    if exc.path is not None or isinstance(exc, UnsafeCheckpointError):
        return exc  # unsafe errors are raised with their path already
    return CheckpointFormatError(str(exc), path=path)


def read_torch_metadata(
    path: str | os.PathLike[str], *, allowed_globals: Iterable[str] = ()
) -> Any:
    """Decode a ``torch.save`` file (zip or legacy) with every tensor as a TensorStub.

    No tensor data is read and nothing from the file is imported or run. Globals outside
    torch's weights-only allow-list raise :class:`~ckptmigrate.errors.UnsafeCheckpointError`
    unless named in ``allowed_globals`` (``"module.Name"``), which decode to
    :class:`OpaqueObject`. A truncated or corrupt file raises
    :class:`~ckptmigrate.errors.CheckpointFormatError`.

    >>> sd = read_torch_metadata("model.pth")  # doctest: +SKIP
    >>> {k: (v.shape, v.dtype) for k, v in sd.items()}  # doctest: +SKIP
    {'fc.weight': ((10, 20), 'float32'), 'fc.bias': ((10,), 'float32')}
    """
    allowed = _allowed_map(allowed_globals)
    kind = detect_format(path)
    if kind == "torch-zip":
        return _reading(path, lambda: _read_zip(path, allowed))
    if kind == "torch-legacy":
        return _reading(path, lambda: _read_legacy(path, allowed))
    raise CheckpointFormatError(f"is a {kind} checkpoint, not a torch.save file", path=path)


_T = TypeVar("_T")


def _reading(path: str | os.PathLike[str], read: Callable[[], _T]) -> _T:
    """``read()``, its errors as :func:`read_torch_metadata` raises them (with the path)."""
    try:
        return read()
    except (CheckpointFormatError, UnsafeCheckpointError) as exc:
        raise _with_path(exc, path) from exc.__cause__
    except _FORMAT_ERRORS + (OSError,) as exc:  # OSError: zipfile seeks to offsets a lie gave
        raise CheckpointFormatError(f"corrupt checkpoint ({exc})", path=path) from exc


def scan_pickle_globals(path: str | os.PathLike[str]) -> list[str]:
    """List the globals a ``torch.save`` file's main pickle names, without decoding it.

    Useful to tell a user which names to allow; nothing is refused here.
    """
    kind = detect_format(path)
    try:
        if kind == "torch-zip":
            with open_regular_file(path) as f, zipfile.ZipFile(f) as zf:
                data_pkl = _find_data_pkl(_zip_infos(zf, path), path)
                if data_pkl.file_size > MAX_PICKLE_BYTES:
                    raise CheckpointFormatError("data.pkl is too large", path=path)
                with zf.open(data_pkl) as member:
                    return _scan(io.BytesIO(member.read()), None)
        if kind == "torch-legacy":
            with open_regular_file(path) as raw:
                f = _BoundedReader(raw, os.fstat(raw.fileno()).st_size)
                for _ in range(3):
                    _load_pickle(f, {})
                return _scan(f, None)
    except CheckpointFormatError as exc:
        raise _with_path(exc, path) from exc.__cause__
    except _FORMAT_ERRORS as exc:
        raise CheckpointFormatError(f"corrupt checkpoint ({exc})", path=path) from exc
    raise CheckpointFormatError(f"is a {kind} checkpoint, not a torch.save file", path=path)
