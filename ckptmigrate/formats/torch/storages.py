"""Storages: the storage classes a pickle names, the storage a persistent id describes, and the
table that keeps every storage one dtype and one size."""

from __future__ import annotations

from typing import Any

from ...base.frozen import FrozenRecord, set_fields
from ...base.readable import bounded_repr
from ...errors import CheckpointFormatError
from ..bounds import charge_decode
from .guards import refuse_build

#: The element dtype of each typed storage class a pickle may name (``torch.FloatStorage``...).
STORAGE_DTYPES: dict[str, str] = {
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


class StorageType(FrozenRecord):
    """A storage class named in a pickle: ``torch.FloatStorage``, ``torch.UntypedStorage``..."""

    __slots__ = ("name", "dtype")
    name: str
    dtype: str | None  # None for TypedStorage, whose dtype a pickle never names here

    def __init__(self, name: str, dtype: str | None) -> None:
        set_fields(self, name=name, dtype=dtype)

    def graph_children(self) -> tuple[Any, ...]:
        """Its fields, for :func:`bounds.check_graph`."""
        return self._fields()

    def __repr__(self) -> str:
        return self.name

    def __reduce__(self) -> Any:
        return (StorageType, (self.name, self.dtype))

    def __setstate__(self, state: Any) -> None:
        refuse_build(self.name)


class StorageRef(FrozenRecord):
    """A storage as its persistent id describes it; ``numel`` counts elements of ``dtype``."""

    __slots__ = ("key", "dtype", "numel", "location", "untyped", "view_offset", "root_numel")
    key: str
    dtype: str
    numel: int
    location: str
    untyped: bool
    view_offset: int  # legacy storage views: elements into the root storage
    root_numel: int  # elements in the whole stored storage; -1: same as numel

    def __init__(
        self,
        key: str,
        dtype: str,
        numel: int,
        location: str,
        untyped: bool,
        view_offset: int = 0,
        root_numel: int = -1,
    ) -> None:
        set_fields(
            self,
            key=key,
            dtype=dtype,
            numel=numel,
            location=location,
            untyped=untyped,
            view_offset=view_offset,
            root_numel=root_numel,
        )

    def with_key(self, key: str) -> StorageRef:
        """The same storage under another key."""
        return StorageRef(
            key,
            self.dtype,
            self.numel,
            self.location,
            self.untyped,
            self.view_offset,
            self.root_numel,
        )

    def graph_children(self) -> tuple[Any, ...]:
        """Its fields, for :func:`bounds.check_graph`."""
        return self._fields()

    @property
    def stored_numel(self) -> int:
        return self.numel if self.root_numel < 0 else self.root_numel

    def __setstate__(self, state: Any) -> None:
        refuse_build(f"storage {self.key!r}")  # it was checked; it must stay as checked


def _storage_ref(pid: Any, *, legacy: bool) -> StorageRef:
    width = 6 if legacy else 5
    if not isinstance(pid, tuple) or len(pid) != width or pid[0] not in ("storage", b"storage"):
        raise CheckpointFormatError(f"unexpected persistent id {pid!r:.120}, expected a storage")
    storage_type, key, location, numel = pid[1:5]
    if not isinstance(storage_type, StorageType) or storage_type.dtype is None:
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
    ref = StorageRef(key, storage_type.dtype, numel, location, untyped)
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
        ref = StorageRef(key, ref.dtype, view_size, location, untyped, offset, numel)
    return ref


class StorageTable:
    """Collects the storages a pickle references; a key must keep one dtype and size."""

    def __init__(self, *, legacy: bool, key_prefix: str = "") -> None:
        self.legacy = legacy
        self.key_prefix = key_prefix
        self.storages: dict[str, StorageRef] = {}

    def load(self, pid: Any) -> StorageRef:
        ref = _storage_ref(pid, legacy=self.legacy)
        charge_decode(len(ref.key) + len(ref.location) + 256)  # a memoised key, one copy each
        ref = ref.with_key(self.key_prefix + ref.key)
        known = self.storages.setdefault(ref.key, ref)
        if known.untyped or ref.untyped:
            return ref
        if known.dtype != ref.dtype or known.stored_numel != ref.stored_numel:
            raise CheckpointFormatError(
                f"storage {bounded_repr(ref.key)} is referenced both as {known.stored_numel} x "
                f"{known.dtype} and as {ref.stored_numel} x {ref.dtype}"
            )
        return ref
