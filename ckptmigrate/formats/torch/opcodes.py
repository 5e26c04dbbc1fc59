"""The pickle opcodes as both passes over a pickle read them: each opcode's argument layout,
what its decode costs in memory (:data:`COST`, :data:`PER_BYTE`), the ones torch's weights-only
unpickler implements, and what a pass reports (:class:`Effects`, :class:`ScanCorrupt`).

>>> COST[OP["EMPTY_SET"]]  # bytes the C unpickler and the graph check allocate for one
424
"""

from __future__ import annotations

import struct

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

#: ``pickletools.opcodes`` as data: (name, code, argument kind, the stack_after types' names).
#: Written out so that reading a file does not import pickletools (about 2 ms); the tests
#: check it against pickletools (tests/test_pickle_scan.py).
PICKLE_OPCODES: tuple[tuple[str, int, str | None, str], ...] = (
    ("INT", 0x49, "decimalnl_short", "int_or_bool"),
    ("BININT", 0x4A, "int4", "int"),
    ("BININT1", 0x4B, "uint1", "int"),
    ("BININT2", 0x4D, "uint2", "int"),
    ("LONG", 0x4C, "decimalnl_long", "int"),
    ("LONG1", 0x8A, "long1", "int"),
    ("LONG4", 0x8B, "long4", "int"),
    ("STRING", 0x53, "stringnl", "bytes_or_str"),
    ("BINSTRING", 0x54, "string4", "bytes_or_str"),
    ("SHORT_BINSTRING", 0x55, "string1", "bytes_or_str"),
    ("BINBYTES", 0x42, "bytes4", "bytes"),
    ("SHORT_BINBYTES", 0x43, "bytes1", "bytes"),
    ("BINBYTES8", 0x8E, "bytes8", "bytes"),
    ("BYTEARRAY8", 0x96, "bytearray8", "bytearray"),
    ("NEXT_BUFFER", 0x97, None, "buffer"),
    ("READONLY_BUFFER", 0x98, None, "buffer"),
    ("NONE", 0x4E, None, "None"),
    ("NEWTRUE", 0x88, None, "bool"),
    ("NEWFALSE", 0x89, None, "bool"),
    ("UNICODE", 0x56, "unicodestringnl", "str"),
    ("SHORT_BINUNICODE", 0x8C, "unicodestring1", "str"),
    ("BINUNICODE", 0x58, "unicodestring4", "str"),
    ("BINUNICODE8", 0x8D, "unicodestring8", "str"),
    ("FLOAT", 0x46, "floatnl", "float"),
    ("BINFLOAT", 0x47, "float8", "float"),
    ("EMPTY_LIST", 0x5D, None, "list"),
    ("APPEND", 0x61, None, "list"),
    ("APPENDS", 0x65, None, "list"),
    ("LIST", 0x6C, None, "list"),
    ("EMPTY_TUPLE", 0x29, None, "tuple"),
    ("TUPLE", 0x74, None, "tuple"),
    ("TUPLE1", 0x85, None, "tuple"),
    ("TUPLE2", 0x86, None, "tuple"),
    ("TUPLE3", 0x87, None, "tuple"),
    ("EMPTY_DICT", 0x7D, None, "dict"),
    ("DICT", 0x64, None, "dict"),
    ("SETITEM", 0x73, None, "dict"),
    ("SETITEMS", 0x75, None, "dict"),
    ("EMPTY_SET", 0x8F, None, "set"),
    ("ADDITEMS", 0x90, None, "set"),
    ("FROZENSET", 0x91, None, "frozenset"),
    ("POP", 0x30, None, ""),
    ("DUP", 0x32, None, "any any"),
    ("MARK", 0x28, None, "mark"),
    ("POP_MARK", 0x31, None, ""),
    ("GET", 0x67, "decimalnl_short", "any"),
    ("BINGET", 0x68, "uint1", "any"),
    ("LONG_BINGET", 0x6A, "uint4", "any"),
    ("PUT", 0x70, "decimalnl_short", ""),
    ("BINPUT", 0x71, "uint1", ""),
    ("LONG_BINPUT", 0x72, "uint4", ""),
    ("MEMOIZE", 0x94, None, "any"),
    ("EXT1", 0x82, "uint1", "any"),
    ("EXT2", 0x83, "uint2", "any"),
    ("EXT4", 0x84, "int4", "any"),
    ("GLOBAL", 0x63, "stringnl_noescape_pair", "any"),
    ("STACK_GLOBAL", 0x93, None, "any"),
    ("REDUCE", 0x52, None, "any"),
    ("BUILD", 0x62, None, "any"),
    ("INST", 0x69, "stringnl_noescape_pair", "any"),
    ("OBJ", 0x6F, None, "any"),
    ("NEWOBJ", 0x81, None, "any"),
    ("NEWOBJ_EX", 0x92, None, "any"),
    ("PROTO", 0x80, "uint1", ""),
    ("STOP", 0x2E, None, ""),
    ("FRAME", 0x95, "uint8", ""),
    ("PERSID", 0x50, "stringnl_noescape", "any"),
    ("BINPERSID", 0x51, None, "any"),
)

# Per opcode byte: FIXED[op] = argument bytes when fixed (-1 unknown opcode, -2 variable).
FIXED = [-1] * 256
COUNTED: dict[int, tuple[int, bool]] = {}
LINES: dict[int, int] = {}
OPCODE_NAMES: dict[int, str] = {}
#: The names of the types each opcode leaves on the stack (pickletools' ``stack_after``).
STACK_AFTER: dict[int, tuple[str, ...]] = {}
for _name, _code, _arg, _after in PICKLE_OPCODES:
    OPCODE_NAMES[_code] = _name
    STACK_AFTER[_code] = tuple(_after.split())
    if _arg is None:
        FIXED[_code] = 0
    elif _arg in _ARG_FIXED:
        FIXED[_code] = _ARG_FIXED[_arg]
    elif _arg in _ARG_COUNTED:
        FIXED[_code], COUNTED[_code] = -2, _ARG_COUNTED[_arg]
    else:
        FIXED[_code], LINES[_code] = -2, _ARG_LINES[_arg]  # KeyError: a new argument kind
del _name, _code, _arg, _after

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
for _code, _after in STACK_AFTER.items():
    if _after:
        COST[_code] = _REF
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
del _code, _after, _names, _bytes, _name, _factor


class Effects:
    """What the stack model found: bytes the decode allocates, items it hashes."""

    __slots__ = ("estimate", "hashed")

    def __init__(self, estimate: int = 0, hashed: int = 0) -> None:
        self.estimate = estimate
        self.hashed = hashed

    def __repr__(self) -> str:
        return f"Effects(estimate={self.estimate}, hashed={self.hashed})"
