"""The opcode walk: one pass over a pickle's bytes, without running it, that lists its globals
and refuses unsafe globals and opcodes and memo indices far out of range; where a pickle may
share values it runs the stack model (:mod:`.stack_model`) for the decode's costs.

>>> scan_pickle(data, 0, len(data), None).globals  # doctest: +SKIP
['collections.OrderedDict', 'torch._utils._rebuild_tensor_v2', 'torch.FloatStorage']
"""

from __future__ import annotations

import struct
from typing import Any, NoReturn

from ...errors import CheckpointFormatError, UnsafeCheckpointError
from .allowlist import check_global, python3_name
from .opcodes import (
    COST,
    COUNTED,
    FIXED,
    INT_FORMATS,
    LINES,
    OP,
    OPCODE_NAMES,
    PER_BYTE,
    STACK_AFTER,
    TORCH_OPCODES,
    UNPACK,
    ScanCorrupt,
)

# A hand-written walk over a pickle's bytes, checked against pickletools in the tests. It only
# parses each opcode's argument length (the C unpickler checks the contents), names globals,
# refuses opcodes that build objects outside the allow-list and memo indices the C unpickler
# would allocate gigabytes for. It never slices a string or bytes argument it does not need.


_FORBIDDEN = frozenset(OP[n] for n in ("INST", "OBJ", "EXT1", "EXT2", "EXT4"))
_STRINGS = frozenset(OP[n] for n in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"))
_PUTS = frozenset(OP[n] for n in ("PUT", "BINPUT", "LONG_BINPUT"))
_GETS = frozenset(OP[n] for n in ("GET", "BINGET", "LONG_BINGET"))
_STOP, _GLOBAL, _INST = OP["STOP"], OP["GLOBAL"], OP["INST"]
_STACK_GLOBAL, _MEMOIZE, _UNICODE = OP["STACK_GLOBAL"], OP["MEMOIZE"], OP["UNICODE"]
_NO_PUSH = frozenset(OP[n] for n in ("FRAME", "PROTO"))  # framing only
_PROTO, _FRAME = OP["PROTO"], OP["FRAME"]


# Opcodes the walk must look at beyond their length: when STACK_GLOBAL operands are tracked,
# every opcode that pushes a string or touches the memo; always globals, forbidden ones, STOP,
# PROTO, LONG_BINPUT / PUT (the memo indices that can be large) and those torch lacks.
_ALWAYS = (
    frozenset({_STOP, _GLOBAL, _INST, _PROTO, OP["LONG_BINPUT"], OP["PUT"]})
    | _FORBIDDEN
    | (frozenset(range(256)) - TORCH_OPCODES)
)
_TRACKED = _ALWAYS | _STRINGS | _PUTS | _GETS | _NO_PUSH | {_STACK_GLOBAL, _MEMOIZE}
_SPECIAL_TRACKED = bytes(1 if code in _TRACKED else 0 for code in range(256))


_LONG1 = OP["LONG1"]
_LONGS = frozenset(OP[name] for name in ("INT", "LONG", "LONG1", "LONG4"))
#: Long ints (see PickleWalk.long_ints) a pickle may hold before the stack model runs.
_LONG_INTS = 1024


# The plain walk's dispatch: what to do with each opcode byte, and how far _K_SKIP skips
# (the whole opcode) or how wide _K_COUNTED's unsigned byte count is.
_K_SKIP, _K_COUNTED, _K_LONG_BINPUT, _K_STOP, _K_STACK_GLOBAL, _K_OTHER = range(6)
_KIND = bytearray([_K_OTHER] * 256)
_SKIP = bytearray(256)
for _code in range(256):
    if FIXED[_code] >= 0 and _code not in _ALWAYS | {_STACK_GLOBAL}:
        _KIND[_code], _SKIP[_code] = _K_SKIP, 1 + FIXED[_code]
    elif _code in COUNTED and not COUNTED[_code][1] and _code not in _ALWAYS:
        _KIND[_code], _SKIP[_code] = _K_COUNTED, COUNTED[_code][0]
_KIND[OP["LONG_BINPUT"]] = _K_LONG_BINPUT
_KIND[_STOP] = _K_STOP
_KIND[_STACK_GLOBAL] = _K_STACK_GLOBAL
# The plain walk also notes which memo slots may hold a container, tuple or object (not a
# string, number or global): only a pickle that fetches one of those again (GET, DUP) can
# make the unpickler copy or hash more than its opcodes build, and needs the stack model.
_K_BINPUT, _K_BINGET, _K_LONG_BINGET, _K_MEMO = range(6, 10)
_KIND[OP["BINPUT"]], _KIND[OP["BINGET"]] = _K_BINPUT, _K_BINGET
_KIND[OP["LONG_BINGET"]] = _K_LONG_BINGET
for _name in ("PUT", "GET", "MEMOIZE", "DUP"):
    _KIND[OP[_name]] = _K_MEMO
_LEAF, _HOLDER = 1, 2  # what the top of the stack is after an opcode
_TOP = bytearray([_HOLDER] * 256)
for _code, _after in STACK_AFTER.items():
    if (
        _after
        and all(t not in ("any", "list", "dict", "set", "frozenset", "tuple") for t in _after)
        and _code != OP["BUILD"]
    ):
        _TOP[_code] = _LEAF
_TOP[OP["MARK"]] = _HOLDER
for _name in ("GLOBAL", "STACK_GLOBAL", "EMPTY_TUPLE", "BINPERSID", "PERSID"):
    _TOP[OP[_name]] = _LEAF
del _code, _name, _after


class ScanResult:
    """What the walk found: globals in order, the end of the pickle, the opcodes it used.

    A plain class, not a dataclass: every metadata read makes one, and the dataclass machinery
    (``inspect``, generated code) costs the diff path milliseconds.
    """

    __slots__ = ("globals", "end", "protocol", "outside_torch", "estimate", "hashed")

    def __init__(
        self,
        globals: list[str],
        end: int,  # just past STOP
        protocol: int | None = None,  # the last PROTO's argument
        outside_torch: set[str] | None = None,  # opcodes outside TORCH_OPCODES
        estimate: int = 0,  # bytes the decode allocates at most, before any copies (see COST)
        hashed: int = 0,  # items the decode's hashing visits at most (see StackModel)
    ) -> None:
        self.globals = globals
        self.end = end
        self.protocol = protocol
        self.outside_torch = set() if outside_torch is None else outside_torch
        self.estimate = estimate
        self.hashed = hashed

    def __repr__(self) -> str:
        return (
            f"ScanResult(globals={self.globals!r}, end={self.end}, protocol={self.protocol}, "
            f"outside_torch={self.outside_torch!r}, estimate={self.estimate}, "
            f"hashed={self.hashed})"
        )


class PickleWalk:
    """One walk over ``buf[pos:end]``; see :func:`scan_pickle`."""

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
        raise ScanCorrupt(message, at)

    def need(self, opcode_at: int, at: int, size: int) -> int:
        """Position after ``size`` argument bytes at ``at``; corrupt when the pickle ends first."""
        stop = at + size
        if stop > self.limit:
            self.corrupt(f"pickle ends inside the opcode at byte {opcode_at}", opcode_at)
        return stop

    def uint(self, opcode_at: int, at: int, size: int, signed: bool = False) -> int:
        self.need(opcode_at, at, size)
        fmt = INT_FORMATS[size]
        return struct.unpack_from(fmt.lower() if signed else fmt, self.buf, at)[0]

    def line(self, at: int, opcode_at: int) -> int:
        """Position of the newline ending the line that starts at ``at``."""
        newline = self.buf.find(b"\n", at, self.limit)
        if newline < 0:
            self.corrupt(f"no newline after the opcode at byte {opcode_at}", opcode_at)
        return newline

    def text(self, start: int, stop: int, encoding: str = "utf-8") -> str:
        return str(self.buf[start:stop], encoding, "surrogatepass")

    def run(self) -> ScanResult:
        try:
            result = self.walk_plain()
            if result is None:  # a STACK_GLOBAL: walk again, tracking the strings it may name
                self.seen, self.track, self.outside_torch = [], True, set()
                self.recent, self.memo, self.limit = [None, None], {}, self.end
                self.protocol, self.cost = None, 0
                result = self.walk_tracked()
            self.shares = self.shares or self.track or self.long_ints > _LONG_INTS
        except ScanCorrupt as exc:
            if self.allowed is not None:  # the opcodes before the bad one still run
                from .stack_model import StackModel

                exc.effects = StackModel(self, exc.pos).run()
            raise
        if self.allowed is not None and self.shares:
            from .stack_model import StackModel  # only a pickle that shares objects needs it

            effects = StackModel(self, result.end).run()
            result.estimate, result.hashed = effects.estimate, effects.hashed
        return result

    def frame_done(self, pos: int) -> bool:
        """At the end of the current frame: the walk goes on to the pickle's end."""
        if pos == self.limit < self.end:
            self.limit = self.end
            return True
        return False

    def walk_plain(self) -> ScanResult | None:
        """The common case, no STACK_GLOBAL: skip every argument but globals' and memo indices.

        Returns None at the first STACK_GLOBAL.
        """
        self.shares = False
        buf, kinds, skips, costs = self.buf, _KIND, _SKIP, COST
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
                count = UNPACK[width](buf, pos + 1)[0]
                if op == _LONG1 and count >= 8:
                    self.long_ints += 1
                pos += 1 + width + count
                cost += costs[op] + PER_BYTE[op] * count
                top = _LEAF
            elif kind == _K_BINGET or kind == _K_LONG_BINGET:
                width = 1 if kind == _K_BINGET else 4
                if pos + 1 + width > end:
                    self.corrupt(f"pickle ends inside the opcode at byte {pos}", pos)
                index = buf[pos + 1] if width == 1 else UNPACK[4](buf, pos + 1)[0]
                top = slots[index] if index < len(slots) else 0
                if top != _LEAF:
                    self.shares = True
                pos += 1 + width
                cost += costs[op]
            elif kind == _K_BINPUT or kind == _K_LONG_BINPUT:
                width = 1 if kind == _K_BINPUT else 4
                if pos + 1 + width > end:
                    self.corrupt(f"pickle ends inside the opcode at byte {pos}", pos)
                index = buf[pos + 1] if width == 1 else UNPACK[4](buf, pos + 1)[0]
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
        if op == OP["DUP"]:
            self.shares = self.shares or top != _LEAF
        elif op == OP["MEMOIZE"]:
            self.note_slot(self.filled, top)
        elif op == OP["PUT"]:
            self.note_slot(self.memo_index(op, at + 1, after, at), top)
        else:
            index = self.memo_index(op, at + 1, after, at)
            top = self.slots[index] if index < len(self.slots) else 0
            self.shares = self.shares or top != _LEAF
        return top

    def walk_tracked(self) -> ScanResult:
        buf = self.buf
        fixed, special, costs = FIXED, _SPECIAL_TRACKED, COST
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

    def result(self, end: int) -> ScanResult:
        names = {OPCODE_NAMES[op] for op in self.outside_torch}
        return ScanResult(self.seen, end, self.protocol, names, self.cost)

    def ran_out(self, pos: int) -> NoReturn:
        if pos > self.limit:
            where = "frame" if self.limit < self.end else "pickle"
            self.corrupt(f"the {where} ends inside an opcode before byte {self.limit}", self.limit)
        self.corrupt("pickle exhausted before seeing STOP", self.end)

    def special(self, op: int, at: int) -> int:
        """Handle one opcode that needs more than skipping; returns the next position."""
        arg = at + 1
        size = FIXED[op]
        if size == -1:
            self.corrupt(f"at position {at}, opcode {bytes([op])!r} unknown", at)
        if size >= 0:
            after = self.need(at, arg, size)
        elif op in COUNTED:
            width, signed = COUNTED[op]
            count = self.uint(at, arg, width, signed)
            if count < 0:
                self.corrupt(f"negative byte count at byte {at}", at)
            after = self.need(at, arg + width, count)
        else:
            after = self.line(arg, at)
            if LINES[op] == 2:
                after = self.line(after + 1, at)
            after += 1
        self.cost += COST[op] + PER_BYTE[op] * (after - arg)
        if op in _LONGS:  # as StackModel weighs it: 8+ bytes (LONG1, LONG4), or 8+ with "\n"
            if after - arg - (COUNTED[op][0] if op in COUNTED else 0) >= 8:
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
                check_global(found, self.allowed, self.path)
        if self.allowed is not None and op in _FORBIDDEN:
            name = OPCODE_NAMES[op]
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
            pushed = (arg + COUNTED[op][0], after, op)
        self.recent[0], self.recent[1] = self.recent[1], pushed
        return after

    def memo_index(self, op: int, arg: int, after: int, at: int) -> int:
        size = FIXED[op]
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
        return python3_name(module, name)

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
        return python3_name(names[0], names[1])


def scan_pickle(
    buf: Any, pos: int, end: int, allowed: dict[str, Any] | None, path: object = None
) -> ScanResult:
    """Walk the pickle at ``buf[pos:end]`` (bytes or mmap) without running it.

    Lists its globals; with ``allowed`` given, the first unsafe global or opcode raises
    :class:`UnsafeCheckpointError` at once, so a file both malicious and corrupt is reported as
    malicious. A memo index far past the pickle's length raises :class:`CheckpointFormatError`; a malformed
    pickle :class:`ScanCorrupt`, whose ``pos`` is where the walk stopped.
    """
    return PickleWalk(buf, pos, end, allowed, path).run()
