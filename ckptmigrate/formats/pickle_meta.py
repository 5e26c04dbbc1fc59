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
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from math import prod
from types import FunctionType
from typing import Any, BinaryIO, NoReturn

from ..errors import CheckpointFormatError, UnsafeCheckpointError
from .detect import TORCH_LEGACY_MAGIC, detect_format, open_regular_file
from .tensorinfo import DTYPE_SIZES, TensorInfo, TensorStub

__all__ = [
    "MAX_PICKLE_BYTES",
    "WEIGHTS_ONLY_GLOBALS",
    "OpaqueObject",
    "TorchConstant",
    "ZipRecordInfo",
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

    ``state`` holds what the pickle's BUILD opcode would have passed to ``__setstate__``.
    """

    name: str
    args: tuple[Any, ...] = ()
    state: Any = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __setstate__(self, state: Any) -> None:
        self.state = state


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
            raise CheckpointFormatError(f"torch.device({kind!r}, {index!r}) is malformed")
        return kind if index is None or ":" in kind else f"{kind}:{index}"


class _CounterType(metaclass=_GuardedType):
    """``collections.Counter``: builds a real Counter, but BUILD cannot patch the class."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
        return Counter(*args, **kwargs)


class _SafeBytearray(metaclass=_GuardedType):
    """``builtins.bytearray`` from data only: an int argument would allocate that many bytes."""

    def __new__(cls, *args: Any) -> Any:  # type: ignore[misc]
        if not args:
            return bytearray()
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray, list)):
            return bytearray(args[0])
        if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
            return bytearray(args[0], "latin-1")
        raise CheckpointFormatError("bytearray(...) with unexpected arguments in the pickle")


def _codecs_encode(value: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    # Protocol-2 pickles spell bytes as encode(str, "latin1"); no other codec is ever looked up.
    if not isinstance(value, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise CheckpointFormatError("_codecs.encode(...) with an unexpected codec in the pickle")
    return value.encode("latin-1")


def _get_layout(name: Any) -> TorchConstant:
    if not isinstance(name, str) or not name.startswith("torch."):
        raise CheckpointFormatError(f"unknown tensor layout {name!r}")
    return TorchConstant(name)


# ---- tensor rebuild functions: same names and arguments as torch._utils, building stubs


def _expect_dims(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(d) is int and d >= 0 for d in value):
        raise CheckpointFormatError(f"{what} is {value!r}, expected a tuple of sizes")
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
    raise CheckpointFormatError(f"{value!r} is not a torch dtype")


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
        raise CheckpointFormatError(f"tensor stride {stride!r} does not match size {shape}")
    if not all(type(s) is int for s in stride) or type(offset) is not int or offset < 0:
        raise CheckpointFormatError(f"tensor stride {stride!r} or offset {offset!r} is malformed")
    dtype = dtype or storage.dtype
    itemsize = DTYPE_SIZES[dtype]
    numel = prod(shape)
    # Highest element the tensor can touch: strides may skip (x[::2]) or repeat (expand).
    extent = 0 if numel == 0 else 1 + sum((n - 1) * abs(s) for n, s in zip(shape, stride))
    available = storage.numel * DTYPE_SIZES[storage.dtype]
    if (offset + extent) * itemsize > available:
        raise CheckpointFormatError(
            f"storage shorter than its tensor claims: storage {storage.key!r} holds "
            f"{available} bytes, a {dtype} tensor of shape {shape} at offset {offset} needs "
            f"{(offset + extent) * itemsize}"
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
        "collections.OrderedDict": OrderedDict,
        "collections.Counter": _CounterType,
        "torch.nn.parameter.Parameter": _ParameterType,
        "torch.serialization._get_layout": _get_layout,
        "torch.Size": _SizeType,
        "torch.Tensor": _TensorType,
        "torch.device": _DeviceType,
        "_codecs.encode": _codecs_encode,
        "builtins.bytearray": _SafeBytearray,
        "builtins.set": set,
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
            raise TypeError(f"allowed_globals holds {name!r}, expected 'module.Name' strings")
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


class _MemoBomb(CheckpointFormatError):
    """A pickle whose memo indices would make the unpickler allocate far more than its size."""


def _scan(file: BinaryIO, allowed: dict[str, Any] | None, path: object = None) -> list[str]:
    """Walk a pickle's opcodes without running it; list its globals, refusing unsafe ones.

    With ``allowed`` given, the first unsafe global or opcode raises at once, so that a file
    which is both malicious and corrupt is reported as malicious.
    """
    seen: list[str] = []
    recent: list[Any] = []  # last values pushed, enough to name STACK_GLOBAL's operands
    memo: dict[int, Any] = {}
    for opcode, arg, _pos in pickletools.genops(file):
        name = opcode.name
        found: str | None = None
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            found = _python3_name(module, attr)
        elif name == "STACK_GLOBAL" and len(recent) >= 2:
            module, attr = recent[-2], recent[-1]
            if isinstance(module, str) and isinstance(attr, str):
                found = _python3_name(module, attr)
        if found is not None:
            seen.append(found)
            if allowed is not None:
                _check_global(found, allowed, path)
        if allowed is not None and name in ("INST", "OBJ", "EXT1", "EXT2", "EXT4"):
            raise UnsafeCheckpointError(
                found or f"{name} opcode",
                path=path,
                detail=f"the {name} opcode builds objects outside the allow-list",
            )
        if name in ("FRAME", "PROTO"):
            continue  # framing only; may fall between STACK_GLOBAL's two strings
        if name in ("PUT", "BINPUT", "LONG_BINPUT"):
            if int(arg) > _pos + 1024:
                # The C unpickler sizes its memo to the index: LONG_BINPUT 2**31 asks for
                # gigabytes. A real pickle numbers its memo from 0, never past its own length.
                raise _MemoBomb(f"memo index {int(arg)} at byte {_pos} is out of range")
            memo[int(arg)] = recent[-1] if recent else None
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            recent.append(memo.get(int(arg)))
        elif name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            recent.append(arg)
        else:
            recent.append(None)
        del recent[:-2]
    return seen


def _load_pickle(
    file: BinaryIO,
    allowed: dict[str, Any],
    persistent_load: Callable[[Any], Any] | None = None,
    path: object = None,
) -> Any:
    """Scan, then decode one pickle from ``file``'s current position; unsafe beats corrupt."""
    start = file.tell()
    scan_error: Exception | None = None
    try:
        _scan(file, allowed, path)
    except (UnsafeCheckpointError, _MemoBomb):
        raise
    except CheckpointFormatError as exc:
        scan_error = exc
    except _FORMAT_ERRORS as exc:
        scan_error = exc
    file.seek(start)
    try:
        unpickler = _MetadataUnpickler(
            file, allowed=allowed, persistent_load=persistent_load, path=path
        )
        return unpickler.load()
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    except _FORMAT_ERRORS as exc:
        problem = scan_error or exc
        raise CheckpointFormatError(
            f"corrupt pickle ({type(problem).__name__}: {problem})"
        ) from exc


class _BoundedReader(io.RawIOBase):
    """Reads from ``file`` but refuses any single read past ``limit``: a pickle that declares
    a 4 GiB string must not make us allocate 4 GiB first."""

    def __init__(self, file: BinaryIO, limit: int) -> None:
        super().__init__()
        self._file = file
        self._limit = limit

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
        raise CheckpointFormatError(f"persistent id names {storage_type!r}, not a storage class")
    if isinstance(location, bytes):
        location = location.decode("ascii", "replace")
    if not isinstance(key, str) or not isinstance(location, str):
        raise CheckpointFormatError(f"storage key {key!r} or location {location!r} is malformed")
    if type(numel) is not int or numel < 0:
        raise CheckpointFormatError(f"storage {key!r} has size {numel!r}")
    untyped = storage_type.name == "torch.storage.UntypedStorage"
    ref = _StorageRef(key, storage_type.dtype, numel, location, untyped)
    view = pid[5] if legacy else None
    if view is not None:
        if not (
            isinstance(view, tuple) and len(view) == 3 and all(type(v) is int for v in view[1:])
        ):
            raise CheckpointFormatError(f"storage view {view!r} is malformed")
        _view_key, offset, view_size = view
        if offset < 0 or view_size < 0 or offset + view_size > numel:
            raise CheckpointFormatError(f"storage view {view!r} lies outside storage {key!r}")
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
        ref = replace(ref, key=self.key_prefix + ref.key)
        known = self.storages.setdefault(ref.key, ref)
        if known.untyped or ref.untyped:
            return ref
        if known.dtype != ref.dtype or known.stored_numel != ref.stored_numel:
            raise CheckpointFormatError(
                f"storage {ref.key!r} is referenced both as {known.stored_numel} x "
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


def _zip_infos(zf: zipfile.ZipFile, path: object) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    names: set[str] = set()
    for info in infos:
        _check_member_name(info.filename, path)
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


def _read_zip(path: str | os.PathLike[str], allowed: dict[str, Any]) -> Any:
    with open_regular_file(path) as f:
        with zipfile.ZipFile(f) as zf:
            infos = _zip_infos(zf, path)
            data_pkl = _find_data_pkl(infos, path)
            if data_pkl.file_size > MAX_PICKLE_BYTES:
                raise CheckpointFormatError(
                    f"data.pkl is {data_pkl.file_size} bytes, over the {MAX_PICKLE_BYTES}-byte "
                    "limit for a checkpoint's object graph",
                    path=path,
                )
            with zf.open(data_pkl) as member:
                data = member.read(MAX_PICKLE_BYTES + 1)
    prefix = data_pkl.filename[: -len("data.pkl")] + "data/"
    table = _StorageTable(legacy=False, key_prefix=prefix)
    obj = _load_pickle(io.BytesIO(data), allowed, table.load, path)
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
    return obj


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
                f"legacy torch.save protocol {protocol!r}, expected {_LEGACY_PROTOCOL_VERSION}"
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
    try:
        if kind == "torch-zip":
            return _read_zip(path, allowed)
        if kind == "torch-legacy":
            return _read_legacy(path, allowed)
    except (CheckpointFormatError, UnsafeCheckpointError) as exc:
        raise _with_path(exc, path) from exc.__cause__
    except _FORMAT_ERRORS + (OSError,) as exc:  # OSError: zipfile seeks to offsets a lie gave
        raise CheckpointFormatError(f"corrupt checkpoint ({exc})", path=path) from exc
    raise CheckpointFormatError(f"is a {kind} checkpoint, not a torch.save file", path=path)


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
