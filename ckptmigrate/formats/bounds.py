"""Bounds on what a decoded pickle or JSON text may build: nesting depth and shared references.

Two ways a small pickle kills or stalls its reader without running any code:

- **Deep tuples.** CPython hashes a tuple by hashing its items, recursively in C, with no
  recursion check: a 1 MB pickle whose dict key is a tuple nested a million deep overflows the
  C stack (a segfault) inside the C unpickler, before any Python code could look at it. The
  nesting is bounded by the number of tuple-building opcodes, so a pickle with few of them
  cannot get there; one with many (a real file with 100k tensors has about 300k) is decoded on
  a thread whose stack is sized for that bound.
- **Deep or shared containers.** ``x = [x, x]`` forty levels deep is 2 KB on disk and 2**40
  nodes to any code that walks it as a tree (``repr``, copies, diffs). After decoding,
  :func:`check_graph` walks the graph once, each shared container once, and refuses one nested
  deeper than :data:`MAX_NESTING`, one that refers back to itself, or one whose tree expands past
  :data:`MAX_EXPANSION` times its distinct nodes plus :data:`TREE_ALLOWANCE` (the readers that
  expand it write each shared container once: only their text is tree-sized).
"""

from __future__ import annotations

import contextvars
import itertools
import os
from _thread import allocate_lock
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import BudgetExceededError, CheckpointFormatError, HashingBudgetExceededError
from ..values.tensorinfo import TensorStub
from .detect import read_bounded

T = TypeVar("T")

#: Containers nest at most this deep (real checkpoints: under 20; Python's recursion limit,
#: which every recursive reader of the result meets, is 1000).
MAX_NESTING = 200
#: A tree walk of the result may visit at most this many times the objects and references of
#: its graph, plus TREE_ALLOWANCE: readers that print or JSON a value (``info``, ``diff``,
#: ``stamp``) write each shared container once and reuse its text, so only the text is
#: tree-sized (one config dict of 50 entries shared by 20k layers: 2M nodes, 23 MB of JSON).
MAX_EXPANSION = 4
TREE_ALLOWANCE = 2_500_000
#: A walk of two values' differences (deepdiff's, a tree walk in Python) may visit at most
#: MAX_EXPANSION times their graph of pairs plus this many (``diff._PairWalk``).
EXPANSION_ALLOWANCE = 100_000

#: Opcode bytes that build a tuple: TUPLE, TUPLE1, TUPLE2, TUPLE3. Counting these bytes over
#: the pickle (argument bytes too) bounds how deep its tuples can nest.
_TUPLE_OPCODES = (b"t", b"\x85", b"\x86", b"\x87")
#: Up to this many, hashing the deepest possible tuple fits in any thread's C stack (CPython
#: 3.11 overflows 8 MiB at about 140k levels: 60 bytes a level).
SAFE_TUPLE_CHAIN = 20_000
_STACK_PER_LEVEL = 128
_STACK_BASE = 16 << 20
MAX_DECODE_STACK = 1 << 30

_stack_lock = allocate_lock()  # threading.Lock itself: threading is imported where used

#: A decode may take at most this many times the pickle's bytes, plus DECODE_ALLOWANCE
#: (measured: a torch.save state_dict of 100k tensors peaks at 7-12 times its data.pkl, and the walk estimates 40-50).
DECODE_FACTOR = 80
DECODE_ALLOWANCE = 64 << 20
#: Hashing during a decode may visit at most this many items per pickle byte, plus
#: HASH_ALLOWANCE (a real state_dict hashes each key once: about one item per 50 bytes).
HASH_FACTOR = 8
HASH_ALLOWANCE = 1_000_000


class DecodeBudget:
    """What one decode may allocate: ``used`` starts at the opcode walk's estimate; the
    decoder's stand-ins that copy their arguments charge the copy before making it."""

    __slots__ = ("stored", "used", "what", "path", "hashed")

    def __init__(
        self,
        stored: int,  # the pickle's bytes
        used: int = 0,
        what: str = "the pickle",
        path: object = None,
        hashed: int = 0,  # items the decode's hashing visits (the opcode walk's count)
    ) -> None:
        self.stored = stored
        self.used = used
        self.what = what
        self.path = path
        self.hashed = hashed

    def __repr__(self) -> str:
        return (
            f"DecodeBudget(stored={self.stored}, used={self.used}, what={self.what!r}, "
            f"path={self.path!r}, hashed={self.hashed})"
        )

    @property
    def limit(self) -> int:
        return DECODE_FACTOR * self.stored + DECODE_ALLOWANCE

    def rule(self) -> str:
        return f"{DECODE_FACTOR} times its {self.stored} bytes plus {DECODE_ALLOWANCE >> 20} MiB"

    def check_hashing(self) -> None:
        """Refuse a decode whose dict keys and set items take too long to hash: the C
        unpickler hashes a tuple as a tree, and nothing interrupts it once it has begun."""
        limit = HASH_FACTOR * self.stored + HASH_ALLOWANCE
        if self.hashed > limit:
            rule = f"{HASH_FACTOR} per byte of its {self.stored} plus {HASH_ALLOWANCE}"
            raise HashingBudgetExceededError(self.what, self.hashed, limit, rule, path=self.path)

    def charge(self, nbytes: int) -> None:
        """Count ``nbytes`` more; past the limit, refuse before they are allocated."""
        self.used += nbytes
        if self.used > self.limit:
            raise BudgetExceededError(self.what, self.used, self.limit, self.rule(), path=self.path)


_budget: contextvars.ContextVar[DecodeBudget | None] = contextvars.ContextVar(
    "ckptmigrate_decode_budget", default=None
)


def charge_decode(nbytes: int) -> None:
    """Charge ``nbytes`` to the running decode's budget (no-op outside a bounded decode)."""
    budget = _budget.get()
    if budget is not None:
        budget.charge(nbytes)


def tuple_chain_bound(buf: Any, start: int, end: int) -> int:
    """An upper bound on how deep the tuples of the pickle at ``buf[start:end]`` can nest.

    ``buf`` is bytes or an mmap (which has no ``count`` before Python 3.13: read in chunks).
    """
    if isinstance(buf, bytes):
        return sum(buf.count(code, start, end) for code in _TUPLE_OPCODES)
    total = 0
    for at in range(start, end, _CHUNK):
        chunk = buf[at : min(at + _CHUNK, end)]
        total += sum(chunk.count(code) for code in _TUPLE_OPCODES)
    return total


_CHUNK = 16 << 20


def decode_bounded(
    load: Callable[[], T], bound: int, path: object, budget: DecodeBudget | None = None
) -> T:
    """Run ``load`` (a C unpickler's ``load``) where tuples nested up to ``bound`` deep (see
    :func:`tuple_chain_bound`) cannot overflow the C stack; then :func:`check_graph`.

    With ``budget``, its estimate is checked first and the decoder's copies are charged to it.
    """
    if budget is not None:
        budget.charge(0)
        budget.check_hashing()
    context = contextvars.copy_context()
    context.run(_budget.set, budget)
    obj = _decode(lambda: context.run(load), bound, path)
    check_graph(obj, path)
    return obj


def _decode(load: Callable[[], T], bound: int, path: object) -> T:
    if bound <= SAFE_TUPLE_CHAIN:
        return load()
    stack = _STACK_BASE + bound * _STACK_PER_LEVEL
    if stack > MAX_DECODE_STACK:
        raise CheckpointFormatError(
            f"the pickle has {bound} tuple-building opcode bytes: its tuples could nest deeper "
            f"than a {MAX_DECODE_STACK >> 20} MiB stack can hash",
            path=path,
        )
    return _on_thread(load, stack, path)


def _on_thread(load: Callable[[], T], stack: int, path: object) -> T:
    import threading  # only a pickle whose tuples could nest deep runs on a thread of its own

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = load()
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc

    with _stack_lock:  # threading.stack_size is process-wide: set, start, restore
        previous = threading.stack_size()
        try:
            threading.stack_size(stack)
            thread = threading.Thread(target=run, name="ckptmigrate-decode", daemon=True)
            thread.start()
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise CheckpointFormatError(
                f"cannot reserve a {stack >> 20} MiB stack to decode a pickle this large "
                f"({exc})",
                path=path,
            ) from exc
        finally:
            threading.stack_size(previous)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


_BUILTIN_CONTAINERS = (dict, list, tuple, set, frozenset)
_container_types: dict[type, bool] = {}


def _holds_objects(kind: type) -> bool:
    """Whether values of this type hold other objects the walk must visit (cached by type)."""
    known = _container_types.get(kind)
    if known is None:
        known = (
            issubclass(kind, _BUILTIN_CONTAINERS)
            or hasattr(kind, "graph_children")  # a decoded placeholder: its args and state
            # a dataclass (DCP's records), as dataclasses.is_dataclass tells one
            or (hasattr(kind, "__dataclass_fields__") and not issubclass(kind, TensorStub))
        )
        if len(_container_types) > 4096:  # placeholder classes are made per global name
            _container_types.clear()
        _container_types[kind] = known
    return known


def _children(node: Any) -> Any:
    if isinstance(node, dict):
        return itertools.chain(node.keys(), node.values())
    if isinstance(node, _BUILTIN_CONTAINERS):
        return node
    if hasattr(node, "graph_children"):
        return node.graph_children()
    import dataclasses  # a dataclass instance is here: its module is imported already

    return [getattr(node, f.name, None) for f in dataclasses.fields(node)]  # DCP's records


def check_graph(root: Any, path: object = None, *, what: str = "the pickle") -> None:
    """Refuse a decoded object graph too deep, cyclic, or too large walked as a tree.

    Iterative, each container visited once: linear in the graph, whatever its shape. ``what``
    names the source in the message (``"the pickle"``, ``"header entry 'ckptmigrate.hparams'"``).
    """
    holds = _holds_objects
    if not holds(type(root)):
        return
    done: dict[int, tuple[int, int]] = {}  # id -> (depth, tree size)
    inside: dict[int, tuple[list[Any], int]] = {}  # on the walk's path: (containers, leaves)
    keep: list[Any] = []  # every visited container stays alive, so ids stay unique
    stack: list[tuple[Any, bool]] = [(root, False)]
    graph_size = 1  # nodes and references, each shared container counted once
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            containers, leaves = inside.pop(key)
            depth, size = 1, 1 + leaves
            for child in containers:
                child_depth, child_size = done[id(child)]
                if child_depth >= depth:
                    depth = child_depth + 1
                size += child_size
            done[key] = (depth, size)
            continue
        if key in done:
            continue
        if key in inside:
            raise CheckpointFormatError(
                f"{what} builds a container that contains itself", path=path
            )
        if len(inside) >= MAX_NESTING:
            raise CheckpointFormatError(
                f"{what} nests containers more than {MAX_NESTING} deep", path=path
            )
        containers = []
        count = 0
        for child in _children(node):
            count += 1
            if holds(type(child)):
                containers.append(child)
        graph_size += count
        inside[key] = (containers, count - len(containers))
        keep.append(node)
        stack.append((node, True))
        stack.extend((child, False) for child in containers if id(child) not in done)
    expanded = done[id(root)][1]
    if expanded > MAX_EXPANSION * graph_size + TREE_ALLOWANCE:
        raise CheckpointFormatError(
            f"{what} shares containers so that its graph of {graph_size} objects expands "
            f"to {expanded} when walked as a tree (limit: {MAX_EXPANSION} times as many, plus "
            f"{TREE_ALLOWANCE})",
            path=path,
        )


#: A JSON file read whole (a set's index, a DCP folder's ``ckptmigrate.json``, a set rewrite's
#: journal) may be at most this large: the index of a set of 100k tensors is under 10 MB.
MAX_JSON_FILE_BYTES = 64 << 20


def read_json_file(path: str | os.PathLike[str], *, what: str) -> Any:
    """:func:`loads_json` of the UTF-8 file at ``path``, read with
    :func:`~.detect.read_bounded` under :data:`MAX_JSON_FILE_BYTES`.

    >>> read_json_file("model.safetensors.index.json", what="the index JSON")  # doctest: +SKIP
    {'metadata': {...}, 'weight_map': {...}}
    """
    raw = read_bounded(path, MAX_JSON_FILE_BYTES, what, "a JSON file read whole")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointFormatError(f"{what} is not UTF-8 text ({exc})", path=path) from None
    return loads_json(text, what=what, path=path)


def loads_json(text: str | bytes, *, what: str, path: object = None, **options: Any) -> Any:
    """``json.loads`` for text from a file: malformed or nested past :data:`MAX_NESTING` is a
    :class:`CheckpointFormatError` naming ``what`` (json's own RecursionError, at about 1000
    levels, escaped as an untyped error; a few hundred levels broke later readers)."""
    import json

    try:
        value = json.loads(text, **options)
    except RecursionError:
        raise CheckpointFormatError(f"{what} is nested too deeply", path=path) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointFormatError(f"{what} is not valid JSON ({exc})", path=path) from None
    check_graph(value, path, what=what)
    return value
