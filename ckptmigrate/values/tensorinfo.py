"""What a tensor is, without its data: shape, dtype, size and where its bytes live.

Readers that list keys, shapes and dtypes (``ckptmigrate info``, ``diff``) build these records
from a file's metadata alone, so this module imports nothing but the standard library (and
the package's own record base).
"""

from __future__ import annotations

from math import prod
from typing import Any

from ..base.frozen import FrozenRecord, set_fields

__all__ = [
    "DTYPE_SIZES",
    "MAX_DIM",
    "SAFETENSORS_DTYPES",
    "TensorInfo",
    "TensorStub",
    "signature",
]

#: torch keeps sizes, strides and offsets as int64: a dimension past this is no tensor torch
#: wrote (and one of thousands of digits cannot even be printed)
MAX_DIM = 2**63 - 1

#: Bytes per element for every torch dtype, by its name without ``torch.``.
DTYPE_SIZES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "complex128": 16,
    "complex64": 8,
    "complex32": 4,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "bool": 1,
    "qint32": 4,
    "qint8": 1,
    "quint8": 1,
    "quint4x2": 1,
    "quint2x4": 1,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
    "bits16": 2,
    "bits8": 1,
    "bits1x8": 1,
    "bits2x4": 1,
    "bits4x2": 1,
    **{f"int{n}": 1 for n in range(1, 8)},
    **{f"uint{n}": 1 for n in range(1, 8)},
}


def signature(value: Any) -> tuple[tuple[int, ...], str]:
    """(shape, dtype name) of a tensor or a metadata stub."""
    return tuple(int(d) for d in value.shape), str(value.dtype).removeprefix("torch.")


#: safetensors dtype codes and the torch dtype each one stands for.
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "C64": "complex64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2": "float8_e5m2",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}


class TensorInfo(FrozenRecord):
    """Shape, dtype and byte location of one stored tensor (immutable, compared by fields).

    >>> TensorInfo(shape=(2, 3), dtype="float32", nbytes=24).numel
    6
    """

    __slots__ = (
        "shape",
        "dtype",
        "nbytes",
        "storage_key",
        "storage_offset",
        "device",
        "data_offsets",
    )
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    storage_key: str | None
    storage_offset: int
    device: str
    data_offsets: tuple[int, int] | None

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: str,
        nbytes: int,
        storage_key: str | None = None,
        storage_offset: int = 0,
        device: str = "cpu",
        data_offsets: tuple[int, int] | None = None,
    ) -> None:
        set_fields(
            self,
            shape=shape,
            dtype=dtype,
            nbytes=nbytes,
            storage_key=storage_key,
            storage_offset=storage_offset,
            device=device,
            data_offsets=data_offsets,
        )

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        return prod(self.shape)

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return DTYPE_SIZES[self.dtype]


class TensorStub:
    """Stands in for a tensor in an object graph decoded from metadata; never holds data."""

    __slots__ = ("info", "requires_grad", "is_parameter")

    info: TensorInfo
    requires_grad: bool
    is_parameter: bool

    def __init__(
        self, info: TensorInfo, *, requires_grad: bool = False, is_parameter: bool = False
    ) -> None:
        object.__setattr__(self, "info", info)
        object.__setattr__(self, "requires_grad", bool(requires_grad))
        object.__setattr__(self, "is_parameter", bool(is_parameter))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"TensorStub is immutable (tried to set {name!r})")

    def __reduce__(self) -> Any:
        # Stubs are immutable slots objects; copy/deepcopy rebuild them through __init__.
        return (_make_stub, (self.info, self.requires_grad, self.is_parameter))

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's shape."""
        return self.info.shape

    @property
    def dtype(self) -> str:
        """The torch dtype name without ``torch.``, e.g. ``"bfloat16"``."""
        return self.info.dtype

    def __repr__(self) -> str:
        kind = "Parameter" if self.is_parameter else "Tensor"
        device = "" if self.info.device == "cpu" else f", device={self.info.device!r}"
        return f"TensorStub({kind}, shape={self.info.shape}, dtype={self.info.dtype}{device})"


def _make_stub(info: TensorInfo, requires_grad: bool, is_parameter: bool) -> TensorStub:
    return TensorStub(info, requires_grad=requires_grad, is_parameter=is_parameter)
