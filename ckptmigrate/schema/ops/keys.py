"""Ops on key names: renames by prefix or regex, drops, and keys added with a default."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

try:  # the parsed form of a regex, to judge a pattern read from a file before it runs
    from re import _parser as sre_parse  # Python 3.11+
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse  # type: ignore[no-redef]

from ...errors import OpError
from ...values.checkpoint import Checkpoint
from ..compose import literal_prefix_rename
from .base import KEYS, TENSORS, Op, regex_where

__all__ = [
    "AddKey",
    "DropKeys",
    "MAX_RECORDED_KEY",
    "MAX_RECORDED_MATCH_SECONDS",
    "MAX_RECORDED_REPEATS",
    "RenameKeys",
    "RenamePrefix",
    "STRIP_COMPILE",
    "STRIP_DATAPARALLEL",
    "StripPrefix",
    "check_recorded_pattern",
    "module_renames",
    "prefix_mover",
    "strip_wrappers",
]


def _rename_trace(mapping: dict[str, str], keys: Sequence[str]) -> dict[str, list[str]]:
    return {mapping.get(k, k): [k] for k in keys}


def _rename_all(
    ckpt: Checkpoint,
    mapping: dict[str, str],
    what: str,
    move_module: Callable[[str], str] | None = None,
) -> None:
    if not mapping:
        return
    new_keys = [mapping.get(k, k) for k in ckpt.state_dict]
    if len(set(new_keys)) != len(new_keys):  # a collision: find it for the message
        _raise_collision(ckpt.state_dict, mapping, what)
    ckpt.state_dict = dict(zip(new_keys, ckpt.state_dict.values()))
    if ckpt.module_metadata:
        if move_module is None:
            modules = module_renames(mapping)
            move_module = lambda prefix: modules.get(prefix, prefix)  # noqa: E731
        _rename_modules(ckpt, move_module)


def prefix_mover(old: str, new: str) -> Callable[[str], str]:
    """How a module prefix follows a prefix rename: ``blocks.0`` under ``blocks.`` -> ``layers.0``."""
    cut = len(old)

    def move(prefix: str) -> str:
        dotted = prefix + "."
        return (new + dotted[cut:])[:-1] if prefix and dotted.startswith(old) else prefix

    return move


def _rename_modules(ckpt: Checkpoint, rename: Callable[[str], str]) -> None:
    assert ckpt.module_metadata is not None
    ckpt.module_metadata = type(ckpt.module_metadata)(
        (rename(prefix), value) for prefix, value in ckpt.module_metadata.items()
    )


def _raise_collision(sd: dict[str, Any], mapping: dict[str, str], what: str) -> None:
    targets: dict[str, str] = {}
    for old in sd:
        new = mapping.get(old, old)
        if new in targets:
            first, second = sorted((old, targets[new]), key=lambda k: k in mapping)
            if first not in mapping:  # an untouched key already holds the new name
                raise OpError(f"{what}: renaming {second!r} to {new!r}, but {new!r} already exists")
            raise OpError(f"{what}: {old!r} and {targets[new]!r} would both become {new!r}")
        targets[new] = old


def module_renames(mapping: dict[str, str]) -> dict[str, str]:
    """A module prefix follows its parameters: ``blocks.0`` -> ``layers.0``.

    Each prefix takes the rename of the first parameter under it whose tail is unchanged.
    Walking up from each key's parent stops at a prefix already settled with its ancestors,
    so a 100k-key rename costs about one dict lookup per key.
    """
    out: dict[str, str] = {}
    settled: set[str] = set()  # prefixes whose every ancestor is in ``out`` too
    for old, new in mapping.items():
        prefix = old.rpartition(".")[0]
        if not prefix or prefix in settled:
            continue
        walked = []
        while prefix and prefix not in settled:
            if prefix not in out:
                suffix = old[len(prefix) :]
                if new.endswith(suffix):
                    out[prefix] = new[: -len(suffix)]
            walked.append(prefix)
            prefix = prefix.rpartition(".")[0]
        if all(p in out for p in walked):
            settled.update(walked)
    return out


#: a regex rebuilt from a file's data holds at most this many repeats that match more than once
#: (``*``, ``+``, ``{2,}``): with none nested, matching costs at most the key's length to this power
MAX_RECORDED_REPEATS = 3
#: ... and runs on keys of at most this many characters (at 3 repeats, under 0.2 s a key)
MAX_RECORDED_KEY = 512
#: ... and spends at most this long matching one checkpoint's keys (thousands of worst-case
#: keys at 0.2 s each would otherwise take minutes)
MAX_RECORDED_MATCH_SECONDS = 10.0

#: regex constructs a pattern read from a file may not hold: backreferences, lookarounds,
#: conditionals (each can make matching cost more than a power of the key's length)
_REFUSED_NODES = {
    "GROUPREF": "a backreference",
    "GROUPREF_EXISTS": "a conditional group",
    "GROUPREF_IGNORE": "a backreference",
    "GROUPREF_LOC_IGNORE": "a backreference",
    "GROUPREF_UNI_IGNORE": "a backreference",
    "ASSERT": "a lookaround",
    "ASSERT_NOT": "a lookaround",
}
_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}


def check_recorded_pattern(pattern: str) -> None:
    """Raise :class:`OpError` unless ``pattern``, read from a file, matches in time bounded by
    a power of the key's length: no backreference, lookaround or conditional, no repeat inside a
    repeat and no alternation inside a repeat (``(a+)+``, ``(a|a)*``: exponential), at most
    :data:`MAX_RECORDED_REPEATS` repeats in all. The op then runs on keys of at most
    :data:`MAX_RECORDED_KEY` characters."""
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise OpError(f"the pattern {pattern[:80]!r} is not a regex ({exc})") from None
    repeats = 0
    # (node list, inside a repeat that matches more than once)
    stack: list[tuple[Any, bool]] = [(parsed, False)]
    while stack:
        nodes, repeated = stack.pop()
        for op, av in nodes:
            name = getattr(op, "name", str(op))
            if name in _REFUSED_NODES:
                raise OpError(
                    f"the pattern {pattern[:80]!r} holds {_REFUSED_NODES[name]}, which a pattern "
                    "read from a file may not (its matching time has no bound)"
                )
            if name in _REPEATS:
                low, high, body = av
                many = high is sre_parse.MAXREPEAT or high > 1
                if many and repeated:
                    raise OpError(
                        f"the pattern {pattern[:80]!r} repeats a repeat (as in (a+)+), which a "
                        "pattern read from a file may not: it can backtrack for days"
                    )
                repeats += many
                stack.append((body, repeated or many))
            elif name == "BRANCH":
                if repeated:
                    raise OpError(
                        f"the pattern {pattern[:80]!r} repeats an alternation (as in (a|ab)*), "
                        "which a pattern read from a file may not: it can backtrack for days"
                    )
                stack.extend((branch, repeated) for branch in av[1])
            elif name == "SUBPATTERN":
                stack.append((av[-1], repeated))
            elif name == "ATOMIC_GROUP":
                stack.append((av, repeated))
    if repeats > MAX_RECORDED_REPEATS:
        raise OpError(
            f"the pattern {pattern[:80]!r} holds {repeats} repeats; a pattern read from a file "
            f"holds at most {MAX_RECORDED_REPEATS} (each multiplies its matching time)"
        )


def _fullmatch(op: Op, pattern: str) -> Callable[[str], re.Match[str] | None]:
    """``re.compile(pattern).fullmatch``; for a pattern read from a file (``op.key_limit``
    set), one that refuses to go on past :data:`MAX_RECORDED_MATCH_SECONDS` of matching."""
    match = re.compile(pattern).fullmatch
    if getattr(op, "key_limit", None) is None:
        return match
    budget = MAX_RECORDED_MATCH_SECONDS
    deadline = time.monotonic() + budget

    def bounded(key: str) -> re.Match[str] | None:
        if time.monotonic() > deadline:
            raise OpError(
                f"{op.describe()}: a pattern read from the file matched keys for more than "
                f"{budget:g} s; patterns from a file get that long for a checkpoint's keys"
            )
        return match(key)

    return bounded


def _refuse_long_keys(op: Op, keys: Sequence[str], limit: int | None) -> None:
    if limit is None:
        return
    long = next((k for k in keys if len(k) > limit), None)
    if long is not None:
        raise OpError(
            f"{op.describe()}: a pattern read from the file runs on keys of at most {limit} "
            f"characters, and {long[:40]!r}... has {len(long)}"
        )


@dataclass
class RenamePrefix(Op):
    """Rename every key that starts with ``old`` to start with ``new`` instead."""

    acts_on = frozenset({KEYS})
    follows_adapter = True  # the adapter keys of a module move with its weight
    old: str
    new: str
    missing_ok: bool = field(default=False, kw_only=True)

    def renamed_keys(self, keys: Sequence[str]) -> dict[str, str]:
        return {k: self.new + k[len(self.old) :] for k in keys if k.startswith(self.old)}

    def trace(self, keys: Sequence[str]) -> dict[str, list[str]]:
        return _rename_trace(self.renamed_keys(keys), keys)

    def wraps(self, keys: Sequence[str], model_keys: Sequence[str]) -> bool:
        """Whether every key has ``old`` in front and none of ``model_keys`` does (a wrapper)."""
        return (
            bool(self.old)
            and bool(keys)
            and all(k.startswith(self.old) for k in keys)
            and not any(k.startswith(self.old) for k in model_keys)
        )

    def apply(self, ckpt: Checkpoint) -> None:
        # one pass building the new key list: no mapping dict on the (common) all-match path
        old, new, cut = self.old, self.new, len(self.old)
        keys = list(ckpt.state_dict)
        new_keys = [new + k[cut:] if k.startswith(old) else k for k in keys]
        if new_keys == keys:
            if old and new and any(k.startswith(new) for k in keys):
                raise OpError(
                    f"{self.describe()}: no key starts with {old!r} but some start with "
                    f"{new!r}: the checkpoint already has the new layout"
                )
            if old != new:
                self.found_nothing(keys, head=old)
            return
        if len(set(new_keys)) != len(new_keys):
            _raise_collision(ckpt.state_dict, self.renamed_keys(keys), self.describe())
        ckpt.state_dict = dict(zip(new_keys, ckpt.state_dict.values()))
        if ckpt.module_metadata:
            _rename_modules(ckpt, prefix_mover(old, new))

    def prefix_rename(self) -> tuple[str, str] | None:
        return (self.old, self.new) if self.old != self.new else None

    def inverse(self) -> Op:
        return RenamePrefix(self.new, self.old, missing_ok=self.missing_ok)

    def describe(self) -> str:
        return f"rename prefix {self.old!r} -> {self.new!r}"


def StripPrefix(prefix: str, *, missing_ok: bool = False) -> RenamePrefix:  # noqa: N802 - an op
    """Drop a wrapper's prefix, e.g. ``module.`` (DataParallel) or ``_orig_mod.`` (compile).

    Keys without the prefix are left alone; a file with no such key is an error unless
    ``missing_ok=True`` (the step then is a no-op on an unwrapped file).
    """
    return RenamePrefix(prefix, "", missing_ok=missing_ok)


#: ``module.``: what ``nn.DataParallel``/``DistributedDataParallel`` put in front of every key
#: (optional: an unwrapped file passes unchanged).
STRIP_DATAPARALLEL = StripPrefix("module.", missing_ok=True)
#: ``_orig_mod.``: what a ``torch.compile``d module puts in front of every key (optional too).
STRIP_COMPILE = StripPrefix("_orig_mod.", missing_ok=True)


def strip_wrappers() -> list[RenamePrefix]:
    """The ops that unwrap DataParallel and torch.compile keys, for ``add_migration``.

    >>> schema.add_migration("1.0.0", "1.0.1", cm.ops.strip_wrappers())
    """
    return [STRIP_COMPILE, STRIP_DATAPARALLEL]


@dataclass
class RenameKeys(Op):
    """Rename keys that fully match ``pattern`` to ``match.expand(repl)``.

    Pass ``reverse=(pattern, repl)`` to make the rename invertible.
    """

    acts_on = frozenset({KEYS})
    follows_adapter = True  # the adapter keys of a module move with its weight
    pattern: str
    repl: str
    reverse: tuple[str, str] | None = None
    missing_ok: bool = field(default=False, kw_only=True)
    #: the longest key the pattern runs on (set for a pattern read from a file)
    key_limit: int | None = field(default=None, init=False, repr=False, compare=False)

    def as_recorded(self) -> RenameKeys:
        for pattern in [self.pattern] + ([self.reverse[0]] if self.reverse else []):
            check_recorded_pattern(pattern)
        self.key_limit = MAX_RECORDED_KEY
        return self

    def renamed_keys(self, keys: Sequence[str]) -> dict[str, str]:
        _refuse_long_keys(self, keys, self.key_limit)
        rx = re.compile(self.pattern)
        fmt = _format_repl(self.repl, rx)
        fullmatch = _fullmatch(self, self.pattern)
        out = {}
        for key in keys:
            m = fullmatch(key)
            if m is None:
                continue
            new = fmt.format(key, *m.groups("")) if fmt is not None else m.expand(self.repl)
            if new != key:
                out[key] = new
        return out

    def trace(self, keys: Sequence[str]) -> dict[str, list[str]]:
        return _rename_trace(self.renamed_keys(keys), keys)

    def apply(self, ckpt: Checkpoint) -> None:
        keys = list(ckpt.state_dict)
        mapping = self.renamed_keys(keys)
        if not mapping and self.reverse is not None:
            undo = RenameKeys(*self.reverse)
            undo.key_limit = self.key_limit
            done = undo.renamed_keys(keys)
            if done:
                raise OpError(
                    f"{self.describe()}: no key matches, but {next(iter(done))!r} already has "
                    "the new name: the checkpoint already has the new layout"
                )
        if not mapping and not any(map(_fullmatch(self, self.pattern), keys)):
            self.found_nothing(keys, **regex_where(self.pattern))
        pair = self.prefix_rename()
        move = prefix_mover(*pair) if pair else None  # modules move as with RenamePrefix
        _rename_all(ckpt, mapping, self.describe(), move)

    def prefix_rename(self) -> tuple[str, str] | None:
        pair = literal_prefix_rename(self.pattern, self.repl)
        return pair if pair is not None and pair[0] != pair[1] else None

    def inverse(self) -> Op | None:
        return (
            RenameKeys(*self.reverse, reverse=(self.pattern, self.repl), missing_ok=self.missing_ok)
            if self.reverse
            else None
        )

    def describe(self) -> str:
        return f"rename keys {self.pattern!r} -> {self.repl!r}"


_GROUP_REF = re.compile(r"\\(\d+)|\\g<(\w+)>")


def _format_repl(repl: str, rx: re.Pattern[str]) -> str | None:
    """``r"\\1layers.\\g<rest>"`` -> ``"{1}layers.{2}"``, for ``fmt.format(key, *groups)``.

    ``str.format`` costs a fraction of ``match.expand`` per key. None when the template has
    other escapes (then ``match.expand`` does it).
    """
    out = []
    pos = 0
    for m in _GROUP_REF.finditer(repl):
        literal = repl[pos : m.start()]
        if "\\" in literal:
            return None
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        ref = m.group(1) or m.group(2)
        index = int(ref) if ref.isdigit() else rx.groupindex.get(ref)
        if index is None or index > rx.groups:
            return None  # let match.expand raise its own error
        out.append(f"{{{index}}}")
        pos = m.end()
    tail = repl[pos:]
    if "\\" in tail:
        return None
    out.append(tail.replace("{", "{{").replace("}", "}}"))
    return "".join(out)


@dataclass
class DropKeys(Op):
    """Drop every key that fully matches ``pattern`` (none matching: an error unless ``missing_ok``)."""

    acts_on = frozenset({KEYS})
    follows_adapter = True  # unless it drops a weight the adapter adapts (then refused)
    pattern: str
    missing_ok: bool = field(default=False, kw_only=True)
    #: the longest key the pattern runs on (set for a pattern read from a file)
    key_limit: int | None = field(default=None, init=False, repr=False, compare=False)

    def as_recorded(self) -> DropKeys:
        check_recorded_pattern(self.pattern)
        self.key_limit = MAX_RECORDED_KEY
        return self

    def trace(self, keys: Sequence[str]) -> dict[str, list[str]]:
        _refuse_long_keys(self, keys, self.key_limit)
        fullmatch = _fullmatch(self, self.pattern)
        return {k: [k] for k in keys if not fullmatch(k)}

    def apply(self, ckpt: Checkpoint) -> None:
        _refuse_long_keys(self, list(ckpt.state_dict), self.key_limit)
        fullmatch = _fullmatch(self, self.pattern)
        kept = {k: v for k, v in ckpt.state_dict.items() if not fullmatch(k)}
        if len(kept) == len(ckpt.state_dict):
            self.found_nothing(list(ckpt.state_dict), **regex_where(self.pattern))
        ckpt.state_dict = kept

    def describe(self) -> str:
        return f"drop keys {self.pattern!r}"


@dataclass
class AddKey(Op):
    """Add ``key`` with a default tensor (or ``default(ckpt)``); refuses to overwrite."""

    acts_on = frozenset({KEYS, TENSORS})
    follows_adapter = True  # a new key has no adapter
    key: str
    default: Any = field(repr=False)
    #: a trainable parameter (it joins the optimizer's first group, with fresh state)
    parameter: bool = False

    @property
    def runs_user_code(self) -> bool:  # type: ignore[override]
        return callable(self.default)

    def trace(self, keys: Sequence[str]) -> dict[str, list[str]]:
        return {**{k: [k] for k in keys}, self.key: []}

    def new_parameters(self, keys: Sequence[str]) -> set[str]:
        return {self.key} if self.parameter else set()

    def apply(self, ckpt: Checkpoint) -> None:
        if self.key in ckpt.state_dict:
            raise OpError(f"{self.describe()}: {self.key!r} already exists")
        value = self.default(ckpt) if callable(self.default) else self.default
        if not hasattr(value, "clone"):
            raise OpError(f"{self.describe()}: the default is a {type(value).__name__}")
        # a fresh tensor per checkpoint, so that no two files share one default
        ckpt.state_dict[self.key] = value.clone()

    def inverse(self) -> Op:
        return DropKeys(re.escape(self.key))

    def describe(self) -> str:
        return f"add key {self.key!r}"
