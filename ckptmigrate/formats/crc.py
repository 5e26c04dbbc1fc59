"""The CRC-32 of bytes laid end to end, from the CRCs of the parts: no byte read again.

A zip member copied from ranges of other members (a merged tensor's record, whose bytes are
its parts' records) needs the CRC of their concatenation before its data are written. CRC-32
is linear over GF(2): appending ``n`` zero bytes to a message multiplies its CRC register by a
fixed 32x32 bit matrix raised to the power ``n``, so ``crc(a + b)`` is ``crc(a)`` advanced over
``len(b)`` zeros, xor ``crc(b)``. The power is built by repeated squaring (about 2 log2(n)
matrix squarings, each 32 matrix-vector products), as zlib's ``crc32_combine`` does.

>>> import zlib
>>> crc32_combine(zlib.crc32(b"head"), zlib.crc32(b"tail"), 4) == zlib.crc32(b"headtail")
True
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable

from ..errors import CheckpointFormatError

__all__ = ["crc32_combine", "crc32_of_parts", "crc32_of_reads"]

#: the reflected CRC-32 polynomial (zip, zlib, PNG)
_POLYNOMIAL = 0xEDB88320
_CHUNK = 8 << 20


def _times(matrix: list[int], vector: int) -> int:
    """``matrix`` (32 columns, each an int) times the bit vector ``vector``, over GF(2)."""
    out = 0
    column = 0
    while vector:
        if vector & 1:
            out ^= matrix[column]
        vector >>= 1
        column += 1
    return out


def _square(matrix: list[int]) -> list[int]:
    return [_times(matrix, column) for column in matrix]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of ``a + b`` from ``crc1 = crc32(a)``, ``crc2 = crc32(b)`` and ``len(b)``."""
    if len2 <= 0:
        return crc1  # nothing appended
    # the operator that feeds one zero bit through the register, squared to 4 bits; each pass
    # squares it again (8, 16, 32... zero bits) and applies it for one bit of len2
    operator = _square(_square([_POLYNOMIAL] + [1 << n for n in range(31)]))
    while len2:
        operator = _square(operator)
        if len2 & 1:
            crc1 = _times(operator, crc1)
        len2 >>= 1
    return crc1 ^ crc2


def crc32_of_parts(parts: Iterable[tuple[int, int]]) -> int:
    """The CRC-32 of parts laid end to end, each given as ``(crc32, length)``."""
    crc = 0
    for part_crc, length in parts:
        crc = crc32_combine(crc, part_crc, length)
    return crc


def crc32_of_reads(read: Callable[[int, int], bytes], offset: int, count: int) -> int:
    """The CRC-32 of ``count`` bytes from ``offset`` that ``read(offset, n)`` returns (a
    file's ``pread``, an object's ranged GET), read in 8 MiB chunks."""
    crc = 0
    while count > 0:
        data = read(offset, min(count, _CHUNK))
        if not data:
            raise CheckpointFormatError(f"the file ends {count} bytes before the range does")
        crc = zlib.crc32(data, crc)
        offset += len(data)
        count -= len(data)
    return crc
