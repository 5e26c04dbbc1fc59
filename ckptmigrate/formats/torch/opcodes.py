"""The pickle opcodes as both passes over a pickle read them: each opcode's argument layout,
what its decode costs in memory (:data:`COST`, :data:`PER_BYTE`), the ones torch's weights-only
unpickler implements, and what a pass reports (:class:`Effects`, :class:`ScanCorrupt`).

>>> COST[OP["EMPTY_SET"]]  # bytes the C unpickler and the graph check allocate for one
424
"""

from __future__ import annotations

import pickletools
import struct
from dataclasses import dataclass

from ...errors import CheckpointFormatError


class ScanCorrupt(CheckpointFormatError):
    """The opcode walk found a malformed pickle; ``pos`` is where the bad opcode starts and
    ``effects`` what the opcodes before it do (the unpickler still runs them)."""

    def __init__(self, message: str, pos: int, effects: Effects | None = None) -> None:
        super().__init__(message)
        self.pos = pos
        self.effects = effects if effects is not None else Effects()


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
FIXED = [-1] * 256
COUNTED: dict[int, tuple[int, bool]] = {}
LINES: dict[int, int] = {}
OPCODE_NAMES: dict[int, str] = {}
for _op in pickletools.opcodes:
    _code = ord(_op.code)
    OPCODE_NAMES[_code] = _op.name
    _arg = _op.arg.name if _op.arg is not None else None
    if _arg is None:
        FIXED[_code] = 0
    elif _arg in _ARG_FIXED:
        FIXED[_code] = _ARG_FIXED[_arg]
    elif _arg in _ARG_COUNTED:
        FIXED[_code], COUNTED[_code] = -2, _ARG_COUNTED[_arg]
    else:
        FIXED[_code], LINES[_code] = -2, _ARG_LINES[_arg]  # KeyError: a new argument kind
del _op, _code, _arg

OP = {name: code for code, name in OPCODE_NAMES.items()}


#: The opcodes torch's weights-only unpickler implements (torch/_weights_only_unpickler.py).
TORCH_OPCODES = frozenset(
    OP[n]
    for n in (
        "APPEND APPENDS BINFLOAT BINGET LONG_BINGET BININT BININT1 BININT2 BINPERSID BINPUT "
        "LONG_BINPUT BINUNICODE BUILD EMPTY_DICT EMPTY_LIST EMPTY_SET EMPTY_TUPLE GLOBAL LONG1 "
        "MARK NEWFALSE NEWOBJ NEWTRUE NONE PROTO REDUCE SETITEM SETITEMS SHORT_BINSTRING STOP "
        "TUPLE TUPLE1 TUPLE2 TUPLE3"
    ).split()
)


INT_FORMATS = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


UNPACK = {size: struct.Struct(fmt).unpack_from for size, fmt in INT_FORMATS.items()}


# The decode's memory estimate (bounds.DecodeBudget): bytes each opcode makes the C unpickler
# and the graph check allocate (CPython 3.11, 64-bit), and bytes per argument byte. Counting
# objects, not bytes, is what matters: MARK and two million EMPTY_SETs are 2 MB on disk and
# 800 MB decoded.
_REF = 32  # a reference on the stack and in its container; a dict entry takes two
_WALKED = 160  # what check_graph keeps for each container it walks
COST = [0] * 256
PER_BYTE = bytearray(256)
for _op in pickletools.opcodes:
    if _op.stack_after:
        COST[ord(_op.code)] = _REF
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
        COST[OP[_name]] = _bytes
for _names, _factor, _bytes in (
    ("SHORT_BINUNICODE BINUNICODE BINUNICODE8 UNICODE", 4, 80 + _REF),  # UCS-4 at worst
    ("SHORT_BINSTRING BINSTRING STRING", 1, 80 + _REF),  # decoded as ASCII
    ("SHORT_BINBYTES BINBYTES BINBYTES8 BYTEARRAY8", 1, 48 + _REF),
    ("INT LONG LONG1 LONG4 FLOAT", 1, 32 + _REF),
):
    for _name in _names.split():
        COST[OP[_name]], PER_BYTE[OP[_name]] = _bytes, _factor
del _op, _names, _bytes, _name, _factor


@dataclass
class Effects:
    """What the stack model found: bytes the decode allocates, items it hashes."""

    estimate: int = 0
    hashed: int = 0
