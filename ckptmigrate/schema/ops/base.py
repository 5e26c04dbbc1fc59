"""Declarative migration ops: key mapping as data, each with its inverse where one exists.

A list of ops registered with ``schema.add_migration`` is one step; the step is reversible
(usable for downgrades) when every op in it has an inverse. Keys are matched either by a regex
(``re.fullmatch``) or by a template whose ``{name}`` fields match any run of characters::

    cm.ops.Split("{p}.c_attn.{kind}", ["{p}.q.{kind}", "{p}.k.{kind}", "{p}.v.{kind}"], dim=0)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..base.nearest import literal_head, longest_literal
from ..errors import NothingMatched, OpError
from ..values.checkpoint import Checkpoint
from .compose import literal_prefix_rename

if TYPE_CHECKING:
    import torch

__all__ = [
    "ABSENT",
    "AddKey",
    "Cast",
    "DropHparam",
    "DropKeys",
    "Merge",
    "NothingMatched",
    "Op",
    "RenameHparam",
    "RenameKeys",
    "RenamePrefix",
    "Reshape",
    "STRIP_COMPILE",
    "STRIP_DATAPARALLEL",
    "SetHparam",
    "Split",
    "StripPrefix",
    "Transpose",
    "strip_wrappers",
]


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: ``previous=ABSENT``: the hparam did not exist before the op (the inverse drops it).
ABSENT: Any = _Marker("ABSENT")
#: The previous value is unknown, so the op cannot be inverted.
UNKNOWN: Any = _Marker("UNKNOWN")


#: What an op may change (:attr:`Op.acts_on`): key names, hparams, tensor values, or anything,
#: because it runs caller code.
KEYS, HPARAMS, TENSORS, CODE = "keys", "hparams", "tensors", "code"


class Op:
    """Base class: ``apply`` rewrites a checkpoint in place; ``inverse`` undoes it, or is None.

    ``trace`` says, by key names only, where each key after the op came from, so optimizer
    state can follow; ``transforms_state`` ops (split, transpose...) also reshape the state
    tensors shaped like their parameter, by applying themselves to them. ``acts_on`` says what
    the op may change; every caller that must know (the composed fast path, the metadata-only
    streamer, the read-only guard) asks it, never the op's type.
    """

    #: what the op may change, from KEYS, HPARAMS, TENSORS and CODE; an op defined outside this
    #: module that overrides ``apply`` or ``transform`` without declaring it acts on CODE
    acts_on: ClassVar[frozenset[str]] = frozenset({CODE})
    #: whether the op reshapes tensors, so per-parameter optimizer state must be pushed through it
    transforms_state: bool = False
    #: whether finding nothing to act on is fine (else :class:`NothingMatched`)
    missing_ok: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        rewrites = "apply" in cls.__dict__ or "transform" in cls.__dict__
        if cls.__module__ != __name__ and rewrites and "acts_on" not in cls.__dict__:
            cls.acts_on = frozenset({CODE})  # it may do anything: treat it as caller code

    @property
    def runs_user_code(self) -> bool:
        """Whether applying it runs caller code (then the step runs behind the read-only guard)."""
        return CODE in self.acts_on

    @property
    def metadata_only(self) -> bool:
        """Whether it changes key names and hparams only, so it runs on tensor stubs."""
        return self.acts_on <= {KEYS, HPARAMS}

    @property
    def composable(self) -> bool:
        """Whether it folds into one pass over the keys with its neighbours: a prefix rename
        (:meth:`prefix_rename`) that touches nothing else, or an op on hparams alone."""
        if self.acts_on == {HPARAMS}:
            return True
        return self.acts_on == {KEYS} and self.prefix_rename() is not None

    def apply(self, ckpt: Checkpoint) -> None:
        raise NotImplementedError

    def inverse(self) -> Op | None:
        return None

    @property
    def reversible(self) -> bool:
        return self.inverse() is not None

    def describe(self) -> str:
        return repr(self)

    def label(self) -> str:
        """The op by its defining arguments, as a migration writes it: ``DropKeys('x\\..*')``."""
        if not is_dataclass(self):
            return type(self).__name__
        args = [
            repr(getattr(self, f.name))
            for f in fields(self)
            if f.repr and not f.kw_only and f.default is MISSING and f.default_factory is MISSING
        ]
        return f"{type(self).__name__}({', '.join(args)})"

    def found_nothing(self, names: Sequence[str], **where: str) -> None:
        """Raise :class:`NothingMatched` unless the op was given ``missing_ok=True``."""
        if not self.missing_ok:
            raise NothingMatched(self, names, **where)

    def trace(self, keys: Sequence[str]) -> dict[str, list[str]] | None:
        """Each key after the op -> the keys it came from; None when no key changes."""
        return None

    def touches(self, keys: Sequence[str]) -> bool:
        """Whether the op changes any of ``keys`` (their names or their tensors)."""
        trace = self.trace(keys)
        return trace is not None and (
            len(trace) != len(keys) or any(src != [k] for k, src in trace.items())
        )

    def new_parameters(self, keys: Sequence[str]) -> set[str]:
        """Keys the op adds that are trainable parameters (they join the optimizer, stateless)."""
        return set()

    def prefix_rename(self) -> tuple[str, str] | None:
        """``(old, new)`` when the op only swaps the key prefix ``old`` for ``new``.

        Such ops compose into one pass over the keys (see :mod:`ckptmigrate.schema.compose`).
        """
        return None


def _rename_trace(mapping: dict[str, str], keys: Sequence[str]) -> dict[str, list[str]]:
    return {mapping.get(k, k): [k] for k in keys}


def template_regex(template: str) -> re.Pattern[str]:
    """``"{p}.c_attn.{kind}"`` -> a regex with named groups ``p`` and ``kind``."""
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for i, part in enumerate(parts):
        out.append(f"(?P<{part}>.+?)" if i % 2 else re.escape(part))
    return re.compile("".join(out))


def _fill(template: str, groups: dict[str, str]) -> str:
    try:
        return template.format(**groups)
    except KeyError as exc:
        raise OpError(f"template {template!r} uses field {exc} that the source does not") from None


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


@dataclass
class RenamePrefix(Op):
    """Rename every key that starts with ``old`` to start with ``new`` instead."""

    acts_on = frozenset({KEYS})
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
    pattern: str
    repl: str
    reverse: tuple[str, str] | None = None
    missing_ok: bool = field(default=False, kw_only=True)

    def renamed_keys(self, keys: Sequence[str]) -> dict[str, str]:
        rx = re.compile(self.pattern)
        fmt = _format_repl(self.repl, rx)
        fullmatch = rx.fullmatch
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
            done = RenameKeys(*self.reverse).renamed_keys(keys)
            if done:
                raise OpError(
                    f"{self.describe()}: no key matches, but {next(iter(done))!r} already has "
                    "the new name: the checkpoint already has the new layout"
                )
        if not mapping and not any(map(re.compile(self.pattern).fullmatch, keys)):
            self.found_nothing(keys, **_regex_where(self.pattern))
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


def _regex_where(pattern: str) -> dict[str, str]:
    """Where a regex op looked, for :class:`NothingMatched`."""
    return {"head": literal_head(pattern), "needle": longest_literal(pattern)}


def _template_where(template: str) -> dict[str, str]:
    """Where a template op looked: its text before the first field, its longest literal part."""
    parts = re.split(r"\{\w+\}", template)
    return {"head": parts[0], "needle": max(parts, key=len)}


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
    pattern: str
    missing_ok: bool = field(default=False, kw_only=True)

    def trace(self, keys: Sequence[str]) -> dict[str, list[str]]:
        rx = re.compile(self.pattern)
        return {k: [k] for k in keys if not rx.fullmatch(k)}

    def apply(self, ckpt: Checkpoint) -> None:
        rx = re.compile(self.pattern)
        kept = {k: v for k, v in ckpt.state_dict.items() if not rx.fullmatch(k)}
        if len(kept) == len(ckpt.state_dict):
            self.found_nothing(list(ckpt.state_dict), **_regex_where(self.pattern))
        ckpt.state_dict = kept

    def describe(self) -> str:
        return f"drop keys {self.pattern!r}"


@dataclass
class AddKey(Op):
    """Add ``key`` with a default tensor (or ``default(ckpt)``); refuses to overwrite."""

    acts_on = frozenset({KEYS, TENSORS})
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


def _matches(template: str, keys: Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    rx = template_regex(template)
    return [(k, m.groupdict()) for k in keys if (m := rx.fullmatch(k))]


@dataclass
class Split(Op):
    """Split each key matching ``source`` into ``targets`` along ``dim`` (fused q/k/v)."""

    acts_on = frozenset({KEYS, TENSORS})
    source: str
    targets: Sequence[str]
    dim: int = 0
    sizes: Sequence[int] | None = None
    missing_ok: bool = field(default=False, kw_only=True)
    transforms_state = True

    def trace(self, keys: Sequence[str]) -> dict[str, list[str]]:
        split = {k: g for k, g in _matches(self.source, keys)}
        out: dict[str, list[str]] = {}
        for key in keys:
            if key in split:
                out.update({_fill(t, split[key]): [key] for t in self.targets})
            else:
                out[key] = [key]
        return out

    def apply(self, ckpt: Checkpoint) -> None:
        import torch

        found = _matches(self.source, list(ckpt.state_dict))
        if not found:
            _refuse_new_layout(self, self.targets[0], ckpt)
            self.found_nothing(list(ckpt.state_dict), **_template_where(self.source))
        for key, groups in found:
            tensor = ckpt.state_dict[key]
            if self.sizes is None:
                if tensor.shape[self.dim] % len(self.targets):
                    raise OpError(
                        f"{self.describe()}: {key!r} has size {tensor.shape[self.dim]} along dim "
                        f"{self.dim}, not divisible into {len(self.targets)} parts"
                    )
                parts = torch.chunk(tensor, len(self.targets), dim=self.dim)
            else:
                parts = torch.split(tensor, list(self.sizes), dim=self.dim)
            new = {_fill(t, groups): p.contiguous() for t, p in zip(self.targets, parts)}
            clash = [k for k in new if k in ckpt.state_dict]
            if clash:
                raise OpError(f"{self.describe()}: splitting {key!r}, but {clash} already exist")
            ckpt.state_dict = _replace_at(ckpt.state_dict, [key], new)

    def inverse(self) -> Op:
        return Merge(
            list(self.targets), self.source, self.dim, self.sizes, missing_ok=self.missing_ok
        )

    def describe(self) -> str:
        return f"split {self.source!r} -> {list(self.targets)!r} (dim {self.dim})"


@dataclass
class Merge(Op):
    """Concatenate the keys matching ``sources`` (all present) into ``target`` along ``dim``."""

    acts_on = frozenset({KEYS, TENSORS})
    sources: Sequence[str]
    target: str
    dim: int = 0
    sizes: Sequence[int] | None = None
    missing_ok: bool = field(default=False, kw_only=True)
    transforms_state = True

    def trace(self, keys: Sequence[str]) -> dict[str, list[str]]:
        present = set(keys)
        merged: dict[str, list[str]] = {}
        for first, groups in _matches(self.sources[0], keys):
            group = [first] + [_fill(t, groups) for t in self.sources[1:]]
            if all(k in present for k in group):
                merged[first] = group
        members = {k for group in merged.values() for k in group}
        out: dict[str, list[str]] = {}
        for key in keys:
            if key in merged:
                out[_fill(self.target, dict(_matches(self.sources[0], [key]))[key])] = merged[key]
            elif key not in members:
                out[key] = [key]
        return out

    def apply(self, ckpt: Checkpoint) -> None:
        import torch

        found = _matches(self.sources[0], list(ckpt.state_dict))
        if not found:
            _refuse_new_layout(self, self.target, ckpt)
            self.found_nothing(list(ckpt.state_dict), **_template_where(self.sources[0]))
        for first, groups in found:
            keys = [first] + [_fill(t, groups) for t in self.sources[1:]]
            missing = [k for k in keys if k not in ckpt.state_dict]
            if missing:
                raise OpError(f"{self.describe()}: merging {first!r}, but {missing} are missing")
            new_key = _fill(self.target, groups)
            if new_key in ckpt.state_dict and new_key not in keys:
                raise OpError(f"{self.describe()}: {new_key!r} already exists")
            merged = torch.cat([ckpt.state_dict[k] for k in keys], dim=self.dim)
            ckpt.state_dict = _replace_at(ckpt.state_dict, keys, {new_key: merged})

    def inverse(self) -> Op:
        return Split(
            self.target, list(self.sources), self.dim, self.sizes, missing_ok=self.missing_ok
        )

    def describe(self) -> str:
        return f"merge {list(self.sources)!r} -> {self.target!r} (dim {self.dim})"


def _refuse_new_layout(op: Op, new_template: str, ckpt: Checkpoint) -> None:
    """An op with nothing to do whose results already exist was applied before: say so."""
    done = _matches(new_template, list(ckpt.state_dict))
    if done:
        raise OpError(
            f"{op.describe()}: no key matches its source, but {done[0][0]!r} matches its result: "
            "the checkpoint already has the new layout (was this step applied already?)"
        )


def _replace_at(sd: dict[str, Any], old: list[str], new: dict[str, Any]) -> dict[str, Any]:
    """Replace ``old`` keys by ``new`` ones at the position of the first old key."""
    out: dict[str, Any] = {}
    for key, value in sd.items():
        if key == old[0]:
            out.update(new)
        elif key not in old:
            out[key] = value
    return out


@dataclass
class _TensorOp(Op):
    acts_on = frozenset({TENSORS})
    template: str
    missing_ok: bool = field(default=False, kw_only=True)
    transforms_state = True

    def touches(self, keys: Sequence[str]) -> bool:
        return bool(_matches(self.template, keys))

    def transform(self, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, ckpt: Checkpoint) -> None:
        found = _matches(self.template, list(ckpt.state_dict))
        if not found:
            self.found_nothing(list(ckpt.state_dict), **_template_where(self.template))
        for key, _ in found:
            ckpt.state_dict[key] = self.transform(ckpt.state_dict[key])


@dataclass
class Reshape(_TensorOp):
    """Reshape matching tensors to ``shape``; invertible when ``from_shape`` is given."""

    shape: Sequence[int] = ()
    from_shape: Sequence[int] | None = None

    def transform(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            return tensor.reshape(tuple(self.shape)).clone()
        except RuntimeError as exc:
            raise OpError(f"{self.describe()}: {exc}") from None

    def inverse(self) -> Op | None:
        if self.from_shape is None:
            return None
        return Reshape(
            self.template, tuple(self.from_shape), tuple(self.shape), missing_ok=self.missing_ok
        )

    def describe(self) -> str:
        return f"reshape {self.template!r} to {tuple(self.shape)}"


@dataclass
class Transpose(_TensorOp):
    """Swap two dims of matching tensors (its own inverse)."""

    dim0: int = 0
    dim1: int = 1

    def transform(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.transpose(self.dim0, self.dim1).contiguous()

    def inverse(self) -> Op:
        return Transpose(self.template, self.dim0, self.dim1, missing_ok=self.missing_ok)

    def describe(self) -> str:
        return f"transpose {self.template!r} dims {self.dim0},{self.dim1}"


def _dtype(name: Any) -> Any:
    import torch

    if isinstance(name, torch.dtype):
        return name
    value = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise OpError(f"{name!r} is not a torch dtype")
    return value


@dataclass
class Cast(_TensorOp):
    """Cast matching tensors to ``dtype``; invertible when ``from_dtype`` is given."""

    dtype: Any = None
    from_dtype: Any = None
    transforms_state = False  # optimizer state stays in its own (usually fp32) dtype

    def touches(self, keys: Sequence[str]) -> bool:
        return False

    def transform(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(_dtype(self.dtype), copy=True)

    def inverse(self) -> Op | None:
        if self.from_dtype is None:
            return None
        return Cast(self.template, self.from_dtype, self.dtype, missing_ok=self.missing_ok)

    def describe(self) -> str:
        return f"cast {self.template!r} to {str(self.dtype).removeprefix('torch.')}"


@dataclass
class SetHparam(Op):
    """Set hparam ``name``; ``previous`` (a value, or ``ABSENT``) makes it invertible.

    With ``overwrite=False`` it only fills a missing value, the usual way to pin an old
    default: ``SetHparam("norm_eps", 1e-5, overwrite=False, previous=ABSENT)``.
    """

    acts_on = frozenset({HPARAMS})
    name: str
    value: Any
    previous: Any = UNKNOWN
    overwrite: bool = True

    def apply(self, ckpt: Checkpoint) -> None:
        if self.overwrite or self.name not in ckpt.hparams:
            ckpt.hparams[self.name] = self.value

    def inverse(self) -> Op | None:
        if self.previous is UNKNOWN:
            return None
        if self.previous is ABSENT:
            return DropHparam(self.name, default=self.value)
        return SetHparam(self.name, self.previous, previous=self.value)

    def describe(self) -> str:
        return f"set hparam {self.name}={self.value!r}"


@dataclass
class RenameHparam(Op):
    """Rename hparam ``old`` to ``new`` (missing: an error unless ``missing_ok``; both: an error)."""

    acts_on = frozenset({HPARAMS})
    old: str
    new: str
    missing_ok: bool = field(default=False, kw_only=True)

    def apply(self, ckpt: Checkpoint) -> None:
        if self.old not in ckpt.hparams:
            self.found_nothing(list(ckpt.hparams), noun="hparam", needle=self.old)
            return
        if self.new in ckpt.hparams:
            raise OpError(f"{self.describe()}: hparam {self.new!r} already exists")
        ckpt.hparams = {(self.new if k == self.old else k): v for k, v in ckpt.hparams.items()}

    def inverse(self) -> Op:
        return RenameHparam(self.new, self.old, missing_ok=self.missing_ok)

    def describe(self) -> str:
        return f"rename hparam {self.old} -> {self.new}"


@dataclass
class DropHparam(Op):
    """Drop hparam ``name`` (missing: an error unless ``missing_ok``); ``default`` (what to
    restore) makes it invertible."""

    acts_on = frozenset({HPARAMS})
    name: str
    default: Any = UNKNOWN
    missing_ok: bool = field(default=False, kw_only=True)

    def apply(self, ckpt: Checkpoint) -> None:
        if self.name not in ckpt.hparams:
            self.found_nothing(list(ckpt.hparams), noun="hparam", needle=self.name)
        ckpt.hparams.pop(self.name, None)

    def inverse(self) -> Op | None:
        if self.default is UNKNOWN:
            return None
        return SetHparam(self.name, self.default, previous=ABSENT)

    def describe(self) -> str:
        return f"drop hparam {self.name}"


@dataclass
class Call(Op):
    """Run a plain function as an op (not invertible unless ``inverse_fn`` is given)."""

    acts_on = frozenset({CODE})
    fn: Callable[[Checkpoint], Any]
    inverse_fn: Callable[[Checkpoint], Any] | None = None

    def apply(self, ckpt: Checkpoint) -> None:
        self.fn(ckpt)

    def inverse(self) -> Op | None:
        return Call(self.inverse_fn, self.fn) if self.inverse_fn else None

    def describe(self) -> str:
        return f"call {getattr(self.fn, '__qualname__', self.fn)!r}"
