"""The op base class and the key matching every op shares.

A list of ops registered with ``schema.add_migration`` is one step; the step is reversible
(usable for downgrades) when every op in it has an inverse. Keys are matched either by a regex
(``re.fullmatch``) or by a template whose ``{name}`` fields match any run of characters::

    cm.ops.Split("{p}.c_attn.{kind}", ["{p}.q.{kind}", "{p}.k.{kind}", "{p}.v.{kind}"], dim=0)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Any, ClassVar

from ...base.nearest import literal_head, longest_literal
from ...errors import NothingMatched, OpError
from ...values.checkpoint import Checkpoint

__all__ = [
    "ABSENT",
    "CODE",
    "Call",
    "HPARAMS",
    "KEYS",
    "NothingMatched",
    "Op",
    "OpError",
    "TENSORS",
    "UNKNOWN",
    "check_template",
    "check_templates",
    "fill_template",
    "refuse_new_layout",
    "regex_where",
    "replace_keys_at",
    "template_matches",
    "template_regex",
    "template_where",
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
    #: package that overrides ``apply`` or ``transform`` without declaring it acts on CODE
    acts_on: ClassVar[frozenset[str]] = frozenset({CODE})
    #: whether the op reshapes tensors, so per-parameter optimizer state must be pushed through it
    transforms_state: bool = False
    #: whether finding nothing to act on is fine (else :class:`NothingMatched`)
    missing_ok: bool = False
    #: whether a LoRA adapter of the checkpoint can follow the op (:meth:`adapter_dim` says
    #: how); else :attr:`adapter_refusal` says why not (see :mod:`ckptmigrate.engine.adapters`)
    follows_adapter: ClassVar[bool] = False
    #: why an adapter cannot follow the op, for the error
    adapter_refusal: ClassVar[str] = (
        "it runs code, so what it does to a weight, and to the low-rank factors of an adapter "
        "on that weight, is unknown"
    )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        rewrites = "apply" in cls.__dict__ or "transform" in cls.__dict__
        builtin = cls.__module__.rpartition(".")[0] == __package__  # one of ours, in ops/
        if not builtin and rewrites and "acts_on" not in cls.__dict__:
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
    def runs_on_stubs(self) -> bool:
        """Whether it runs on tensor stubs: metadata-only, or an op whose results' bytes are its
        inputs' bytes (a Merge or Split along dim 0: :mod:`ckptmigrate.values.pieces`)."""
        return self.metadata_only

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

    def as_recorded(self) -> Op:
        """The op as it may run when rebuilt from a file's data (a recorded inverse): checked
        for what the file's values could make it cost (a regex that backtracks, a pad to any
        size), raising :class:`OpError`, and bounded where its cost depends on the keys."""
        return self

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

    def for_state(self) -> Op:
        """The op that carries per-parameter optimizer state (``exp_avg``...) of a
        ``transforms_state`` op: itself, unless new values are not state (a padded row starts
        with fresh, zero state, whatever the weights were filled with)."""
        return self

    def adapter_dim(self) -> int | None:
        """The dim of a base weight the op cuts, joins, reorders or pads (a LoRA adapter's
        factor holding that dim goes through :meth:`for_adapter`); None when it only moves key
        names, or changes nothing an adapter holds (hparams, a cast)."""
        return None

    def for_adapter(self) -> Op:
        """The op that carries an adapter's factor: as :meth:`for_state`, new rows are zero."""
        return self.for_state()

    def partners(self, keys: Sequence[str]) -> list[str]:
        """Keys the op joins with some of ``keys`` that are not among them (a merge's other
        sources): an adapter on ``q`` alone still follows the merge of q, k and v."""
        return []

    def part_size(self, index: int, known: dict[int, int]) -> int | None:
        """Along :meth:`adapter_dim`, the size of part ``index`` of what the op joins, from the
        sizes of the parts ``known`` (index -> size); None when they do not tell."""
        return None

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


#: a template's field: ``{name}``, a Python identifier; no other brace syntax is a template
_FIELD = re.compile(r"\{([A-Za-z_]\w*)\}")


def check_template(template: str, what: str = "template") -> None:
    """Raise :class:`OpError` unless ``template`` is text with plain ``{name}`` fields, each at
    most once: no ``{0}``, ``{n!r}``, ``{n:>9}``, ``{n.attr}``, ``{n[0]}`` or stray brace (a
    template is filled by substitution, never by ``str.format``)."""
    if not isinstance(template, str):
        raise OpError(f"{what} {template!r} is a {type(template).__name__}, not a string")
    names = _FIELD.findall(template)
    if "{" in _FIELD.sub("", template) or "}" in _FIELD.sub("", template):
        raise OpError(
            f"{what} {template[:80]!r} holds brace syntax other than plain {{name}} fields "
            "(a field is a name: {p}, {kind}; no conversion, format spec, index or attribute)"
        )
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise OpError(f"{what} {template[:80]!r} has the field {{{twice[0]}}} more than once")


def check_templates(what: str, *templates: str | Sequence[str]) -> None:
    """:func:`check_template` on each template (or list of them), for an op's ``__post_init__``."""
    for value in templates:
        for template in [value] if isinstance(value, str) else list(value):
            check_template(template, what)


def template_regex(template: str, numbered: str | None = None) -> re.Pattern[str]:
    """``"{p}.c_attn.{kind}"`` -> a regex with named groups ``p`` and ``kind``; the field
    ``numbered`` matches an index only (``0``, ``7``, ``12``; not ``07``)."""
    check_template(template)
    parts = _FIELD.split(template)
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out.append(re.escape(part))
        else:
            out.append(f"(?P<{part}>{'0|[1-9][0-9]*' if part == numbered else '.+?'})")
    return re.compile("".join(out))


def fill_template(template: str, groups: dict[str, str]) -> str:
    """``template`` with each ``{name}`` field replaced by ``groups[name]``: plain substitution,
    so a field's text is never read as a format spec, an index or an attribute."""
    check_template(template)
    missing = sorted(set(_FIELD.findall(template)) - set(groups))
    if missing:
        raise OpError(f"template {template!r} uses field {missing[0]!r} that the source does not")
    return _FIELD.sub(lambda m: groups[m[1]], template)


def regex_where(pattern: str) -> dict[str, str]:
    """Where a regex op looked, for :class:`NothingMatched`."""
    return {"head": literal_head(pattern), "needle": longest_literal(pattern)}


def template_where(template: str) -> dict[str, str]:
    """Where a template op looked: its text before the first field, its longest literal part."""
    parts = _FIELD.split(template)[::2]
    return {"head": parts[0], "needle": max(parts, key=len)}


def template_matches(template: str, keys: Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    rx = template_regex(template)
    return [(k, m.groupdict()) for k in keys if (m := rx.fullmatch(k))]


def refuse_new_layout(op: Op, new_template: str, ckpt: Checkpoint) -> None:
    """An op with nothing to do whose results already exist was applied before: say so."""
    done = template_matches(new_template, list(ckpt.state_dict))
    if done:
        raise OpError(
            f"{op.describe()}: no key matches its source, but {done[0][0]!r} matches its result: "
            "the checkpoint already has the new layout (was this step applied already?)"
        )


def replace_keys_at(sd: dict[str, Any], old: list[str], new: dict[str, Any]) -> dict[str, Any]:
    """Replace ``old`` keys by ``new`` ones at the position of the first old key."""
    out: dict[str, Any] = {}
    for key, value in sd.items():
        if key == old[0]:
            out.update(new)
        elif key not in old:
            out[key] = value
    return out


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
