"""The stack model: a second pass over opcodes the walk has checked, on a model of the
unpickler's stack, that counts the memory and hashing work the decode would do beyond its
opcode bytes (BUILD copies, keys of one hash, tuples hashed as trees); see the comment below.

>>> StackModel(walk, scan.end).run()  # doctest: +SKIP
Effects(estimate=..., hashed=...)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

from ..bounds import DECODE_ALLOWANCE, DECODE_FACTOR, HASH_ALLOWANCE, HASH_FACTOR
from .opcodes import COST, COUNTED, FIXED, LINES, OP, PER_BYTE, UNPACK, Effects, ScanCorrupt

if TYPE_CHECKING:
    from .walk import PickleWalk


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
    if op in COUNTED:
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
        return UNPACK[4](buf, arg)[0]
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
        _SIM[OP[_name]] = _kind
del _names, _kind, _name
_TUPLE_N = {OP["EMPTY_TUPLE"]: 0, OP["TUPLE1"]: 1, OP["TUPLE2"]: 2, OP["TUPLE3"]: 3}


class StackModel:
    """Runs the opcodes of ``buf[pos:stop]`` (already checked by :class:`PickleWalk`) on a
    model of the unpickler's stack; see the comment above."""

    def __init__(self, walk: PickleWalk, stop: int) -> None:
        self.walk = walk
        self.stop = stop
        self.effects = Effects()

    def corrupt(self, message: str, at: int) -> NoReturn:
        raise ScanCorrupt(f"{message} at byte {at}", at, self.effects)

    def run(self) -> Effects:
        walk, buf, stop, effects = self.walk, self.walk.buf, self.stop, self.effects
        sim, fixed, costs, per_byte = _SIM, FIXED, COST, PER_BYTE
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
                elif op in COUNTED:
                    width, signed = COUNTED[op]
                    count = int.from_bytes(buf[pos + 1 : pos + 1 + width], "little", signed=signed)
                    if count < 0:  # the walk refuses it first; never step backwards
                        self.corrupt("negative byte count", pos)
                    arg, after = pos + 1 + width, pos + 1 + width + count
                    cost += costs[op] + per_byte[op] * count
                else:
                    arg = pos + 1
                    after = buf.find(b"\n", arg, stop) + 1
                    if LINES[op] == 2:
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
