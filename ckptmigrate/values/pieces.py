"""Tensors made of stored tensors' bytes: a Merge or a Split along dim 0, known from metadata.

A C-contiguous tensor's rows along dim 0 lie one after another in its bytes, so concatenating
tensors of one dtype and one trailing shape along dim 0 gives a tensor whose bytes are theirs,
in order, and a part of a split along dim 0 is a run of its source's bytes. A
:class:`DerivedStub` records that as :class:`Piece` runs of stubs read from the file; a writer
copies those runs (``copy_file_range``) instead of computing anything, so torch is not
imported. Whatever cannot be said this way (another dim, mixed dtypes, a parameter) is a
:class:`~ckptmigrate.errors.NotReplayableError`: the plan then runs on the tensors.

Whether a stub's bytes are C-contiguous is the writer's to check (a torch zip's rebuild recipe
says it; safetensors data always are).

>>> merged = concatenate([q, k], dim=0)  # doctest: +SKIP
>>> [(p.stub is q, p.start, p.nbytes) for p in merged.pieces]  # doctest: +SKIP
[(True, 0, 4096), (False, 0, 4096)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

from ..errors import NotReplayableError
from .tensorinfo import DTYPE_SIZES, TensorInfo, TensorStub

__all__ = ["DerivedStub", "Piece", "concatenate", "cut", "pieces_of"]

#: dtypes whose elements are whole bytes with no side data (no quantizer, no packing)
_PLAIN = frozenset(
    """float64 float32 float16 bfloat16 complex128 complex64 int64 int32 int16 int8 uint64
    uint32 uint16 uint8 bool float8_e4m3fn float8_e4m3fnuz float8_e5m2 float8_e5m2fnuz
    float8_e8m0fnu""".split()
)


@dataclass(frozen=True, eq=False)
class Piece:
    """``nbytes`` bytes of a stub read from the file, from byte ``start`` of its C-order data."""

    stub: TensorStub
    start: int
    nbytes: int


class DerivedStub(TensorStub):
    """A tensor stub whose bytes are ``pieces``, in order (a merge's parts, a split's part)."""

    __slots__ = ("pieces",)

    pieces: tuple[Piece, ...]

    def __init__(self, info: TensorInfo, pieces: Sequence[Piece]) -> None:
        super().__init__(info)
        object.__setattr__(self, "pieces", tuple(pieces))

    def __reduce__(self) -> Any:
        return (DerivedStub, (self.info, self.pieces))


def pieces_of(stub: TensorStub) -> tuple[Piece, ...]:
    """The runs of stored stubs' bytes that ``stub``'s bytes are."""
    if isinstance(stub, DerivedStub):
        return stub.pieces
    return (Piece(stub, 0, stub.info.nbytes),) if stub.info.nbytes else ()


def _check_plain(stub: TensorStub, what: str) -> None:
    info = stub.info
    if stub.is_parameter or stub.requires_grad:
        raise NotReplayableError(f"{what}: a parameter (or a tensor requiring grad)")
    if info.device != "cpu" or info.dtype not in _PLAIN or not info.shape:
        raise NotReplayableError(f"{what}: a {info.dtype} tensor of shape {info.shape}")


def concatenate(stubs: Sequence[TensorStub], dim: int) -> DerivedStub:
    """``torch.cat(stubs, dim)`` as runs of their bytes; :class:`NotReplayableError` unless
    ``dim`` is 0 and the parts share dtype and trailing shape."""
    if not stubs:
        raise NotReplayableError("nothing to concatenate")
    for stub in stubs:
        _check_plain(stub, "concatenated by bytes")
    first = stubs[0].info
    if dim % len(first.shape) != 0:
        raise NotReplayableError(f"concatenating along dim {dim}, not 0")
    for stub in stubs:
        if stub.info.dtype != first.dtype or stub.info.shape[1:] != first.shape[1:]:
            raise NotReplayableError("parts of other dtypes or trailing shapes")
    pieces: list[Piece] = []
    for stub in stubs:
        for piece in pieces_of(stub):
            last = pieces[-1] if pieces else None
            if (
                last is not None
                and last.stub is piece.stub
                and last.start + last.nbytes == piece.start
            ):
                pieces[-1] = Piece(last.stub, last.start, last.nbytes + piece.nbytes)
            else:
                pieces.append(piece)
    rows = sum(stub.info.shape[0] for stub in stubs)
    shape = (rows, *first.shape[1:])
    nbytes = sum(stub.info.nbytes for stub in stubs)
    return DerivedStub(TensorInfo(shape, first.dtype, nbytes), pieces)


def cut(stub: TensorStub, sizes: Sequence[int], dim: int) -> list[DerivedStub]:
    """``torch.split(stub, sizes, dim)`` as runs of its bytes; :class:`NotReplayableError`
    unless ``dim`` is 0."""
    _check_plain(stub, "split by bytes")
    info = stub.info
    if dim % len(info.shape) != 0:
        raise NotReplayableError(f"splitting along dim {dim}, not 0")
    row = prod(info.shape[1:]) * DTYPE_SIZES[info.dtype]
    out = []
    at = 0
    for size in sizes:
        nbytes = size * row
        shape = (size, *info.shape[1:])
        out.append(DerivedStub(TensorInfo(shape, info.dtype, nbytes), _slice(stub, at, nbytes)))
        at += nbytes
    return out


def _slice(stub: TensorStub, start: int, nbytes: int) -> list[Piece]:
    """The runs of ``nbytes`` of ``stub``'s bytes from byte ``start``."""
    out = []
    at = 0
    for piece in pieces_of(stub):
        lo, hi = max(start, at), min(start + nbytes, at + piece.nbytes)
        if lo < hi:
            out.append(Piece(piece.stub, piece.start + lo - at, hi - lo))
        at += piece.nbytes
    return out
