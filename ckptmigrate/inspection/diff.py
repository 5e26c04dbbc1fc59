"""Drift between two checkpoints: keys added, removed, renamed, reshaped or recast; hparams.

Without ``values`` or ``upgrade`` both sides are read from file metadata only (no tensor data,
no torch import), so diffing two multi-gigabyte files takes as long as reading their headers.

>>> d = cm.diff("old.pth", "new.safetensors")
>>> d.has_drift, [r["to"] for r in d.renamed]
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from ..base.matching import matching_ratio
from ..base.readable import bounded_repr, int_text, key_text, path_text
from ..errors import (
    CheckpointFormatError,
    SchemaMismatchError,
    UnversionedCheckpointError,
    UsageError,
)
from ..formats.layout import is_tensor_like, split
from ..values.checkpoint import Checkpoint
from ..values.tensorinfo import signature

if TYPE_CHECKING:
    from ..schema.schema import Schema

__all__ = ["Diff", "MIN_RENAME_CONFIDENCE", "ModelDiff", "diff", "diff_model", "name_similarity"]

#: Name similarity a same-shape removed/added pair needs to be reported as a rename.
MIN_RENAME_CONFIDENCE = 0.6
#: Above this many leftover pairs in one (shape, dtype) group, pairs that differ in layer
#: indices or leaf name are not scored (they rarely pass the threshold, and cost quadratic time).
_MAX_CROSS_PAIRS = 20_000
#: Elements compared per chunk with ``values=True``, so float64 copies stay small.
_VALUE_CHUNK = 1 << 22

Progress = Callable[[int, int], None]


@dataclass
class Diff:
    """The drift from checkpoint A to checkpoint B, as plain JSON-able records.

    ``added``/``removed``: ``{key, shape, dtype}``; ``renamed``: ``{from, to, shape, dtype,
    confidence, reason}``; ``shape_changed``/``dtype_changed``: ``{key, a, b}``; ``hparams`` and
    ``meta``: ``{path, a, b, change}`` with change one of added/removed/changed; ``values`` (only
    with ``values=True``): ``{key, max_abs_diff, equal}`` (and ``from`` for a renamed key).
    Stamps and meta are shown but are not drift.
    """

    a: str = "A"
    b: str = "B"
    added: list[dict[str, Any]] = field(default_factory=list)
    removed: list[dict[str, Any]] = field(default_factory=list)
    renamed: list[dict[str, Any]] = field(default_factory=list)
    shape_changed: list[dict[str, Any]] = field(default_factory=list)
    dtype_changed: list[dict[str, Any]] = field(default_factory=list)
    hparams: list[dict[str, Any]] = field(default_factory=list)
    values: list[dict[str, Any]] | None = None
    stamps: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    meta: list[dict[str, Any]] = field(default_factory=list)
    upgrade: dict[str, Any] | None = None

    @property
    def value_changes(self) -> list[dict[str, Any]]:
        """The ``values`` entries whose tensors differ."""
        return [v for v in self.values or [] if not v["equal"]]

    @property
    def has_drift(self) -> bool:
        """Whether anything but stamps and meta differs (what ``ckptmigrate diff`` exits 1 on)."""
        return bool(
            self.added
            or self.removed
            or self.renamed
            or self.shape_changed
            or self.dtype_changed
            or self.hparams
            or self.value_changes
        )

    def to_dict(self) -> dict[str, Any]:
        """The documented JSON object (see the README, "diff --json"), built from plain values only."""
        return {
            "a": self.a,
            "b": self.b,
            "has_drift": self.has_drift,
            "added": self.added,
            "removed": self.removed,
            "renamed": self.renamed,
            "shape_changed": self.shape_changed,
            "dtype_changed": self.dtype_changed,
            "hparams": self.hparams,
            "values": self.values,
            "stamps": self.stamps,
            "meta": self.meta,
            "upgrade": self.upgrade,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """``to_dict()`` as JSON text (non-finite floats written as strings, so it is valid)."""
        import json

        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def diff(
    a: Any,
    b: Any,
    *,
    values: bool = False,
    upgrade: bool = False,
    schemas: Mapping[str, Schema] | Sequence[Schema] | Schema | None = None,
    schema: str | Schema | None = None,
    from_version: str | Version | None = None,
    allowed_globals: Iterable[Any] = (),
    progress: Progress | None = None,
    param_names: Sequence[str] | None = None,
) -> Diff:
    """Compare checkpoint ``a`` with ``b``: paths, :class:`Checkpoint` objects or state_dicts.

    ``values=True`` also compares tensor contents (max abs diff per common key) and lets equal
    tensors reveal renames. ``upgrade=True`` first migrates ``a`` to ``b``'s version (the
    schema's current one when ``b`` has no stamp) with the schema of ``a``'s stamp, found in
    ``schemas`` (default: discovered); ``schema``/``from_version`` name them for an unstamped
    ``a``; a checkpoint with mounts has each mount upgraded (to ``b``'s mount at the same
    prefix, else to its schema's current version). ``param_names`` names position-keyed
    optimizer state for steps that need it. ``allowed_globals`` (``"module.Name"``) lets
    trusted pickled classes through.

    >>> d = cm.diff("v1.pth", "v2.pth", upgrade=True)   # what the migrations still miss
    >>> d.has_drift
    False
    """
    allowed = list(allowed_globals)
    if upgrade and schemas is not None:  # the schemas' redirects, refused before reading
        from ..formats.torch import with_redirects
        from ..schema.schema import redirects_of

        allowed = with_redirects(allowed, redirects_of(schemas))
    need_tensors = values or upgrade
    ckpt_a, label_a = _as_checkpoint(a, "A", tensors=need_tensors, allowed=allowed)
    ckpt_b, label_b = _as_checkpoint(b, "B", tensors=values, allowed=allowed)
    result = Diff(a=label_a, b=label_b)
    if upgrade:
        ckpt_a, result.upgrade = _upgrade_to_b(
            ckpt_a, ckpt_b, schemas, schema, from_version, label_a, label_b, param_names
        )
    result.stamps = {"a": _stamp_of(ckpt_a), "b": _stamp_of(ckpt_b)}

    sd_a, sd_b = ckpt_a.state_dict, ckpt_b.state_dict
    sig_a = {k: _signature(v) for k, v in sd_a.items()}
    sig_b = {k: _signature(v) for k, v in sd_b.items()}
    removed = {k: s for k, s in sig_a.items() if k not in sig_b}
    added = {k: s for k, s in sig_b.items() if k not in sig_a}

    same_values = None
    if values:
        fingerprints_a = {k: _fingerprint(sd_a[k]) for k in removed}
        fingerprints_b = {k: _fingerprint(sd_b[k]) for k in added}

        def same_values(old: str, new: str) -> bool:
            fa, fb = fingerprints_a[old], fingerprints_b[new]
            return fa is not None and fa == fb

    result.renamed = match_renames(removed, added, same_values)
    gone = {r["from"] for r in result.renamed}
    came = {r["to"] for r in result.renamed}
    result.removed = [_key_record(k, s) for k, s in removed.items() if k not in gone]
    result.added = [_key_record(k, s) for k, s in added.items() if k not in came]
    for key, (shape_a, dtype_a) in sig_a.items():
        if key not in sig_b:
            continue
        shape_b, dtype_b = sig_b[key]
        if shape_a != shape_b:
            result.shape_changed.append({"key": key, "a": _shape(shape_a), "b": _shape(shape_b)})
        if dtype_a != dtype_b:
            result.dtype_changed.append({"key": key, "a": dtype_a, "b": dtype_b})

    result.hparams = compare_mappings(ckpt_a.hparams, ckpt_b.hparams)
    result.meta = compare_mappings(ckpt_a.meta, ckpt_b.meta)
    if values:
        result.values = _compare_values(sd_a, sd_b, sig_a, sig_b, result.renamed, progress)
    return result


@dataclass
class ModelDiff:
    """What a strict load of checkpoint ``a`` (upgraded) into ``schema.build(hparams)`` would say.

    ``report`` is the :class:`~ckptmigrate.report.LoadReport` (missing, unexpected and
    shape-mismatched keys, silent dtype casts, non-persistent buffers the file carries);
    ``upgrade`` the steps applied first.
    """

    a: str
    schema: str
    report: Any
    upgrade: dict[str, Any] | None = None
    hparams: dict[str, Any] = field(default_factory=dict)

    @property
    def has_drift(self) -> bool:
        """Anything a load would complain about or do silently (what exits 1)."""
        r = self.report
        return bool(r.missing or r.unexpected or r.shape_mismatched or r.dtype_casts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "model": self.schema,
            "has_drift": self.has_drift,
            **plain(self.report.to_dict()),
            "hparams": plain(self.hparams),
            "upgrade": self.upgrade,
        }

    def to_json(self, indent: int | None = 2) -> str:
        import json

        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def diff_model(
    a: Any,
    schema: str | Schema,
    *,
    schemas: Mapping[str, Schema] | Sequence[Schema] | Schema | None = None,
    from_version: str | Version | None = None,
    allowed_globals: Iterable[Any] = (),
    param_names: Sequence[str] | None = None,
) -> ModelDiff:
    """Compare checkpoint ``a``, upgraded to the schema's current version, with the state_dict
    of the model ``schema.build`` makes from the migrated hparams: a strict load, before it.

    >>> from ckptmigrate.diff import diff_model
    >>> d = diff_model("old.pth", "tinylm")   # ckptmigrate diff old.pth --model tinylm
    >>> d.report.missing, d.report.unexpected, d.has_drift
    """
    from ..engine.mounts import model_view
    from ..formats.torch import with_redirects
    from ..io.report import load_report
    from ..schema.registry import get_schema

    found = get_schema(schema, schemas)
    allowed = with_redirects(allowed_globals, found.redirects)
    ckpt_a, label = _as_checkpoint(a, "A", tensors=True, allowed=allowed)
    target = Checkpoint({}, schema=found.name, version=found.current)
    upgraded, record = _upgrade_to_b(
        ckpt_a, target, {found.name: found}, found, from_version, label, "", param_names
    )
    view = model_view(upgraded, found.name)  # a file with mounts: the mount of the model
    model = found.build(view.hparams)
    return ModelDiff(
        label,
        found.name,
        load_report(model, view.state_dict, view.module_metadata),
        record,
        view.hparams,
    )


# -- reading -----------------------------------------------------------------------------------


def _as_checkpoint(
    obj: Any, side: str, *, tensors: bool, allowed: list[str]
) -> tuple[Checkpoint, str]:
    if isinstance(obj, Checkpoint):
        ckpt, label = obj, f"<{side}: Checkpoint>"
    elif isinstance(obj, Mapping):
        # a dict loaded with torch.load may be any layout, not only a flat state_dict
        ckpt, label = split(dict(obj) if not isinstance(obj, dict) else obj), f"<{side}: dict>"
    elif isinstance(obj, (str, os.PathLike)):
        from ..io import files

        if tensors:
            ckpt = files.read_checkpoint(obj, mmap=True, safe_globals=allowed)
        else:
            ckpt = files.read_metadata(obj, allowed_globals=allowed)
        return ckpt, path_text(os.fspath(obj))
    else:
        raise UsageError(
            f"diff compares paths, Checkpoints or state_dicts; {side} is a {type(obj).__name__}"
        )
    if tensors and any(type(v).__name__ == "TensorStub" for v in ckpt.state_dict.values()):
        raise UsageError(
            f"{side} holds metadata stubs, not tensors: values=/upgrade= need tensors, so pass "
            "a path or a checkpoint loaded with cm.load"
        )
    return ckpt, label


def _upgrade_to_b(
    ckpt_a: Checkpoint,
    ckpt_b: Checkpoint,
    schemas: Any,
    schema: str | Schema | None,
    from_version: str | Version | None,
    label_a: str,
    label_b: str,
    param_names: Sequence[str] | None = None,
) -> tuple[Checkpoint, dict[str, Any]]:
    from ..engine.guess import apply_from_version
    from ..engine.upgrade import upgrade as upgrade_checkpoint
    from ..schema.registry import pick_schema, schema_table
    from ..schema.schema import Schema

    table = schema_table(schema if isinstance(schema, Schema) else schemas)
    name = schema.name if isinstance(schema, Schema) else schema
    if ckpt_a.mounts:
        return _upgrade_mounts_to_b(ckpt_a, ckpt_b, table, name, label_a, label_b, param_names)
    found = pick_schema(ckpt_a, table, name, path=label_a, fallback=ckpt_b.schema)
    if ckpt_b.schema is not None and ckpt_b.schema != found.name:
        raise SchemaMismatchError(found.name, ckpt_b.schema, path=label_b)
    if ckpt_a.version is None and from_version is None:
        raise UnversionedCheckpointError(path=label_a, schema=found.name)
    ckpt_a = apply_from_version(ckpt_a, found, from_version, what="--from-version", path=label_a)
    target = ckpt_b.version if ckpt_b.version is not None else found.current
    plan = found.plan(ckpt_a.version, target, history=ckpt_a.history)  # type: ignore[arg-type]
    upgraded = upgrade_checkpoint(ckpt_a, found, to=target, param_names=param_names, origin=label_a)
    record = _upgrade_record(found.name, ckpt_a.version, target, plan)
    return upgraded, {**record, "mounts": []}


def _upgrade_mounts_to_b(
    ckpt_a: Checkpoint,
    ckpt_b: Checkpoint,
    table: dict[str, Schema],
    name: str | None,
    label_a: str,
    label_b: str,
    param_names: Sequence[str] | None,
) -> tuple[Checkpoint, dict[str, Any]]:
    """Each mount of A (of schema ``name`` when given) to B's mount at the same prefix, else to
    its schema's current version; every plan is checked before any mount runs."""
    from ..engine.mounts import all_mounts, chosen_mounts, mount_plan, upgrade_mount
    from ..schema.registry import get_schema

    chosen = chosen_mounts(ckpt_a, table, name, path=label_a)
    in_b = {m.prefix: m for m in all_mounts(ckpt_b)}
    plans = []
    for m in chosen:
        found = get_schema(m.schema, table)
        other = in_b.get(m.prefix)
        if other is not None and other.schema != found.name:
            raise SchemaMismatchError(found.name, other.schema, path=label_b)
        target = other.version if other is not None else found.current
        plans.append(
            (m, found, target, mount_plan(ckpt_a, found, m.prefix, target, origin=label_a))
        )
    upgraded = ckpt_a
    mounts = []
    for m, found, target, plan in plans:
        upgraded = upgrade_mount(
            upgraded, found, prefix=m.prefix, plan=plan, param_names=param_names
        )
        mounts.append({"prefix": m.prefix, **_upgrade_record(found.name, m.version, target, plan)})
    record = {
        "schema": "+".join(r["schema"] for r in mounts),
        "from": "+".join(r["from"] for r in mounts),
        "to": "+".join(r["to"] for r in mounts),
        "steps": [step for r in mounts for step in r["steps"]],
        "mounts": mounts,
    }
    return upgraded, record


def _upgrade_record(name: str, source: Any, target: Any, plan: Sequence[Any]) -> dict[str, Any]:
    steps = [p.record() for p in plan]  # the one planned-step record (upgrade, info, history)
    return {"schema": name, "from": str(source), "to": str(target), "steps": steps}


# -- keys ----------------------------------------------------------------------------------------


def _signature(value: Any) -> tuple[tuple[int, ...] | None, str]:
    if is_tensor_like(value):
        return signature(value)
    return None, f"object:{type(value).__name__}"  # a non-tensor ``_extra_state`` entry


def _shape(shape: tuple[int, ...] | None) -> list[int] | None:
    return None if shape is None else list(shape)


def _key_record(key: str, sig: tuple[tuple[int, ...] | None, str]) -> dict[str, Any]:
    return {"key": key, "shape": _shape(sig[0]), "dtype": sig[1]}


def _stamp_of(ckpt: Checkpoint) -> dict[str, Any] | None:
    if ckpt.schema is None and ckpt.version is None and not ckpt.mounts:
        return None
    version = None if ckpt.version is None else str(ckpt.version)
    stamp: dict[str, Any] = {"schema": ckpt.schema, "version": version}
    if ckpt.mounts:
        from ..engine.mounts import all_mounts

        stamp["mounts"] = [
            {"prefix": m.prefix, "schema": m.schema, "version": str(m.version)}
            for m in all_mounts(ckpt)
        ]
    return stamp


_TOKEN_SPLIT = re.compile(r"[._]")


def _skeleton(key: str) -> tuple[tuple[str, ...], str]:
    """The layer indices and leaf name of a key: renames keep both."""
    parts = key.split(".")
    return tuple(p for p in parts if p.isdigit()), parts[-1]


def name_similarity(old: str, new: str) -> float:
    """How alike two key names are, 0..1: characters and ``._`` tokens, penalised when the
    layer indices or the leaf name (``weight``/``bias``) differ.

    >>> name_similarity("blocks.0.attn.weight", "layers.0.attn.weight")
    0.775
    """
    names = _Names()
    return _similarity(old, new, names(old), names(new))


class _Name:
    """What scoring needs of one key name: its tokens as a string of one character per
    distinct token (``coded``; None past the characters there are), its layer indices and
    leaf name, and how many times it holds each character and each token."""

    __slots__ = ("coded", "skeleton", "chars", "tokens", "length", "token_count")

    def __init__(self, key: str, codes: dict[str, str]) -> None:
        tokens = _TOKEN_SPLIT.split(key)
        self.coded: str | None = None
        if len(codes) + len(tokens) <= sys.maxunicode:
            self.coded = "".join([codes.setdefault(t, chr(len(codes))) for t in tokens])
        self.skeleton = _skeleton(key)
        self.chars = Counter(key)
        self.tokens = Counter(tokens)
        self.length = len(key)
        self.token_count = len(tokens)


class _Names:
    """Key names prepared once each for scoring, their tokens coded by one shared table."""

    def __init__(self) -> None:
        self._codes: dict[str, str] = {}
        self._prepared: dict[str, _Name] = {}

    def __call__(self, key: str) -> _Name:
        found = self._prepared.get(key)
        if found is None:
            found = self._prepared[key] = _Name(key, self._codes)
        return found


def _similarity(old: str, new: str, name_a: _Name, name_b: _Name) -> float:
    """:func:`name_similarity` of two prepared names."""
    # difflib's SequenceMatcher(None, x, y, autojunk=False).ratio(), the same float, faster
    chars = matching_ratio(old, new)
    if name_a.coded is None or name_b.coded is None:
        tokens = matching_ratio(_TOKEN_SPLIT.split(old), _TOKEN_SPLIT.split(new))
    else:
        tokens = matching_ratio(name_a.coded, name_b.coded)
    return _combined(chars, tokens, name_a, name_b)


def _similarity_bound(old: str, new: str, name_a: _Name, name_b: _Name) -> float:
    """At least :func:`_similarity`, cheaply: the characters (tokens) matched in difflib's
    blocks are at most those both names hold, counted with repeats (its ``quick_ratio``)."""
    chars = _shared_ratio(name_a.chars, name_b.chars, name_a.length + name_b.length)
    tokens = _shared_ratio(name_a.tokens, name_b.tokens, name_a.token_count + name_b.token_count)
    return _combined(chars, tokens, name_a, name_b)


def _shared_ratio(counts_a: Counter[str], counts_b: Counter[str], length: int) -> float:
    """``2 * shared / length`` as difflib computes its ratio, ``shared`` the elements both
    sequences hold, counted with repeats."""
    if len(counts_a) > len(counts_b):
        counts_a, counts_b = counts_b, counts_a
    shared = 0
    for element, count in counts_a.items():
        other = counts_b.get(element)
        if other:
            shared += count if count < other else other
    return 2.0 * shared / length if length else 1.0


def _combined(chars: float, tokens: float, name_a: _Name, name_b: _Name) -> float:
    """The similarity from the characters' and the tokens' ratios, penalised for other layer
    indices or another leaf name (never smaller for larger ratios)."""
    (digits_a, leaf_a), (digits_b, leaf_b) = name_a.skeleton, name_b.skeleton
    score = (chars + tokens) / 2
    if digits_a != digits_b:
        score *= 0.75  # another layer index: most likely another module, not a rename
    if leaf_a != leaf_b:
        score *= 0.8  # weight vs bias of one module often share a shape
    return round(score, 3)


def match_renames(
    removed: Mapping[str, tuple[Any, str]],
    added: Mapping[str, tuple[Any, str]],
    same_values: Callable[[str, str], bool] | None = None,
) -> list[dict[str, Any]]:
    """Pair removed with added keys of the same shape and dtype, one to one, best first.

    A pair is a rename when its names are close (``name_similarity`` at least
    :data:`MIN_RENAME_CONFIDENCE`) or, when ``same_values`` is given, its tensors are equal.
    Renames are then found per module: a rename of ``a.0.weight`` to ``b.0.weight`` carries
    ``a.0.bias`` to a free ``b.0.bias`` of its shape and dtype, at the weight's confidence.
    """
    groups: dict[Any, tuple[list[str], list[str]]] = {}
    for key, sig in removed.items():
        groups.setdefault(sig, ([], []))[0].append(key)
    for key, sig in added.items():
        if sig in groups:
            groups[sig][1].append(key)

    names = _Names()
    order_a = {k: i for i, k in enumerate(removed)}
    order_b = {k: i for i, k in enumerate(added)}
    taken_old: set[str] = set()
    taken_new: set[str] = set()
    renamed: list[dict[str, Any]] = []
    # first pairs that keep layer indices and leaf name (cheap: small buckets), then the rest
    for same_skeleton in (True, False):
        pairs: list[tuple[str, str]] = []
        for old_keys, new_keys in groups.values():
            olds = [k for k in old_keys if k not in taken_old]
            news = [k for k in new_keys if k not in taken_new]
            if not same_skeleton and len(olds) * len(news) > _MAX_CROSS_PAIRS:
                continue
            by_skeleton: dict[Any, list[str]] = {}
            for new in news:
                by_skeleton.setdefault(names(new).skeleton, []).append(new)
            for old in olds:
                skeleton = names(old).skeleton
                if same_skeleton:
                    pool = by_skeleton.get(skeleton, [])
                else:
                    pool = [n for n in news if names(n).skeleton != skeleton]
                pairs += [(old, new) for new in pool]
        chosen = _best_first(pairs, same_values, names, order_a, order_b, taken_old, taken_new)
        for confidence, old, new, reason in chosen:
            taken_old.add(old)
            taken_new.add(new)
            shape, dtype = removed[old]
            renamed.append(
                {
                    "from": old,
                    "to": new,
                    "shape": _shape(shape),
                    "dtype": dtype,
                    "confidence": confidence,
                    "reason": reason,
                }
            )
    renamed += _sibling_renames(removed, added, renamed, taken_old, taken_new, names)
    renamed.sort(key=lambda r: order_a[r["from"]])
    return renamed


def _best_first(
    pairs: list[tuple[str, str]],
    same_values: Callable[[str, str], bool] | None,
    names: _Names,
    order_a: Mapping[str, int],
    order_b: Mapping[str, int],
    taken_old: set[str],
    taken_new: set[str],
) -> Iterator[tuple[float, str, str, str]]:
    """``(confidence, old, new, reason)`` of the pairs that qualify as renames, greedily: the
    best confidence first, ties in file order, each while both its keys are free (the caller
    takes them). Without ``same_values``, a pair is scored only once its upper bound
    (:func:`_similarity_bound`) is the best left: the same renames, from far fewer scores."""
    if same_values is not None:
        candidates = []
        for old, new in pairs:
            scored = _score(old, new, same_values, names)
            if scored is not None:
                candidates.append((scored[0], order_a[old], order_b[new], old, new, scored[1]))
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        for confidence, _, _, old, new, reason in candidates:
            if old not in taken_old and new not in taken_new:
                yield confidence, old, new, reason
        return
    import heapq

    # (-score or -bound, file order of old and new, scored?, old, new): a bound is never below
    # the score, so an entry scored and on top is above every pair not yet scored
    heap = []
    for old, new in pairs:
        bound = _similarity_bound(old, new, names(old), names(new))
        if bound >= MIN_RENAME_CONFIDENCE:
            heap.append((-bound, order_a[old], order_b[new], False, old, new))
    heapq.heapify(heap)
    while heap:
        negated, at_a, at_b, scored, old, new = heapq.heappop(heap)
        if old in taken_old or new in taken_new:
            continue
        if scored:
            yield -negated, old, new, f"same shape and dtype; name similarity {-negated:.2f}"
            continue
        similarity = _similarity(old, new, names(old), names(new))
        if similarity >= MIN_RENAME_CONFIDENCE:
            heapq.heappush(heap, (-similarity, at_a, at_b, True, old, new))


def _sibling_renames(
    removed: Mapping[str, tuple[Any, str]],
    added: Mapping[str, tuple[Any, str]],
    renamed: list[dict[str, Any]],
    taken_old: set[str],
    taken_new: set[str],
    names: _Names,
) -> list[dict[str, Any]]:
    """Renames found per module: once ``a.0.weight -> b.0.weight`` is a rename, ``a.0.bias``
    goes to ``b.0.bias`` when that is free with its shape and dtype, whatever its own score.
    """
    modules: dict[str, set[str]] = {}
    best: dict[str, dict[str, Any]] = {}
    for r in renamed:
        module_a, _, leaf_a = r["from"].rpartition(".")
        module_b, _, leaf_b = r["to"].rpartition(".")
        if module_a and module_b and leaf_a == leaf_b:
            modules.setdefault(module_a, set()).add(module_b)
            if r["confidence"] > best.get(module_a, {"confidence": -1.0})["confidence"]:
                best[module_a] = r
    out: list[dict[str, Any]] = []
    for old, sig in removed.items():
        module_a, _, leaf = old.rpartition(".")
        targets = modules.get(module_a, set())
        if old in taken_old or len(targets) != 1:
            continue  # not in a renamed module, or that module went two ways
        new = f"{next(iter(targets))}.{leaf}"
        if new in taken_new or added.get(new) != sig:
            continue
        sibling = best[module_a]
        similarity = _similarity(old, new, names(old), names(new))
        taken_old.add(old)
        taken_new.add(new)
        out.append(
            {
                "from": old,
                "to": new,
                "shape": _shape(sig[0]),
                "dtype": sig[1],
                "confidence": max(similarity, sibling["confidence"]),
                "reason": (
                    f"same shape and dtype; its module's {sibling['from']} -> "
                    f"{sibling['to']} is a rename; name similarity {similarity:.2f}"
                ),
            }
        )
    return out


def _score(
    old: str, new: str, same_values: Callable[[str, str], bool] | None, names: _Names
) -> tuple[float, str] | None:
    """(confidence, reason) when ``old -> new`` qualifies as a rename, else None."""
    similarity = _similarity(old, new, names(old), names(new))
    if same_values is not None and same_values(old, new):
        return round(0.75 + 0.25 * similarity, 3), f"equal values; name similarity {similarity:.2f}"
    if similarity >= MIN_RENAME_CONFIDENCE:
        return similarity, f"same shape and dtype; name similarity {similarity:.2f}"
    return None


# -- hparams and meta ---------------------------------------------------------------------------


_ADDED = ("dictionary_item_added", "iterable_item_added", "attribute_added", "set_item_added")
_REMOVED = (
    "dictionary_item_removed",
    "iterable_item_removed",
    "attribute_removed",
    "set_item_removed",
)
_CHANGED = ("values_changed", "type_changes")


def _same(x: Any, y: Any) -> bool:
    if type(x) is not type(y) and not (_is_number(x) and _is_number(y)):
        return False
    try:
        return bool(x == y)
    except Exception:  # an object whose == is not a bool (an array...) is compared by repr
        return repr(x) == repr(y)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def compare_mappings(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Changes from ``a`` to ``b`` as ``{path, a, b, change}`` records (nested via deepdiff).

    >>> compare_mappings({"eps": 1e-5}, {"eps": 1e-6, "act": "gelu"})
    [{'path': 'eps', 'a': 1e-05, 'b': 1e-06, 'change': 'changed'}, {'path': 'act', ...}]
    """
    out: list[dict[str, Any]] = []
    for key in list(a) + [k for k in b if k not in a]:
        if key not in b:
            out.append(_change(key_text(key), a[key], None, "removed"))
        elif key not in a:
            out.append(_change(key_text(key), None, b[key], "added"))
        elif not _same(a[key], b[key]):
            nested = isinstance(a[key], (dict, list, tuple)) and type(a[key]) is type(b[key])
            if nested:
                out.extend(_nested_changes(key_text(key), a[key], b[key]))
            else:
                out.append(_change(key_text(key), a[key], b[key], "changed"))
    return out


def _nested_changes(root: str, a: Any, b: Any) -> list[dict[str, Any]]:
    from deepdiff import DeepDiff  # costs ~0.25 s (numpy); only nested changes pay it
    from deepdiff.operator import BaseOperator

    pairs = _PairWalk()
    pairs.check(root, a, b)

    class SkipEqual(BaseOperator):  # deepdiff walks a tree: equal shared parts once, here
        def match(self, level: Any) -> bool:
            return type(level.t1) in _NESTED

        def give_up_diffing(self, level: Any, diff_instance: Any) -> bool:
            return pairs.compare(level.t1, level.t2)[0]

    tree = DeepDiff(
        a, b, view="tree", ignore_numeric_type_changes=True, custom_operators=[SkipEqual()]
    ).tree
    out = []
    for kinds, change in ((_REMOVED, "removed"), (_ADDED, "added"), (_CHANGED, "changed")):
        for kind in kinds:
            for level in tree.get(kind, []):
                path = _render_path(root, level.path(output_format="list"))
                old = None if change == "added" else level.t1
                new = None if change == "removed" else level.t2
                out.append(_change(path, old, new, change))
    return out or [_change(root, a, b, "changed")]


_NESTED = (dict, list, tuple)


class _PairWalk:
    """Which containers of two values are equal, each pair of shared containers compared once,
    and how many pairs a tree walk of their differences (deepdiff's) visits."""

    def __init__(self) -> None:
        self.memo: dict[tuple[int, int], tuple[bool, int]] = {}
        self.edges = 0

    def compare(self, a: Any, b: Any) -> tuple[bool, int]:
        """``(equal, pairs a tree walk of the differences visits)``."""
        kind = type(a)
        if kind not in _NESTED or type(b) is not kind:
            return _same(a, b), 1
        key = (id(a), id(b))
        known = self.memo.get(key)
        if known is None:
            if kind is dict:
                children = [(a[k], b[k]) for k in a if k in b]
                equal = len(children) == len(a) == len(b)
            else:
                children = list(zip(a, b))
                equal = len(a) == len(b)
            self.edges += len(children)
            visits = 1
            for x, y in children:
                child_equal, child_visits = self.compare(x, y)
                equal = equal and child_equal
                visits += child_visits
            known = self.memo[key] = (equal, 1 if equal else visits)
        return known

    def check(self, root: str, a: Any, b: Any) -> None:
        """Refuse values whose differences a tree walk would visit far more often than their
        graph holds pairs (``x = [x, x]`` changed at a leaf): as :func:`bounds.check_graph`."""
        from ..formats.bounds import EXPANSION_ALLOWANCE, MAX_EXPANSION

        visits = self.compare(a, b)[1]
        graph = len(self.memo) + self.edges
        if visits > MAX_EXPANSION * graph + EXPANSION_ALLOWANCE:
            raise CheckpointFormatError(
                f"hparam {root!r} shares containers so that comparing it visits {visits} "
                f"pairs of values where its graph has {graph} (limit: {MAX_EXPANSION} times "
                f"as many, plus {EXPANSION_ALLOWANCE})"
            )


def _render_path(root: str, parts: list[Any]) -> str:
    path = root
    for part in parts:
        path += f"[{key_text(part)}]" if isinstance(part, int) else f".{key_text(part)}"
    return path


def _change(path: str, a: Any, b: Any, change: str) -> dict[str, Any]:
    return {"path": path, "a": plain(a), "b": plain(b), "change": change}


def plain(value: Any, _memo: dict[int, Any] | None = None) -> Any:
    """``value`` as JSON-able data: containers rebuilt, versions as strings, the rest repr'd
    (an int past Python's int->str limit, which json cannot write, as ``<int of N digits>``).

    A container shared in ``value`` is rebuilt once, and shared in the result too.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        shown = int_text(value)
        return value if not shown.startswith("<") else shown
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (Mapping, list, tuple, set, frozenset)):
        memo = {} if _memo is None else _memo
        done = memo.get(id(value))
        if done is None:
            if isinstance(value, Mapping):
                done = {
                    k if isinstance(k, str) else key_text(k): plain(v, memo)
                    for k, v in value.items()
                }
            else:
                items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
                done = [plain(v, memo) for v in items]
            memo[id(value)] = done  # value is alive in the caller: its id stays its own
        return done
    if isinstance(value, Version):
        return str(value)
    try:
        return repr(value)
    except Exception:  # a subclass holding a huge int, a decoded stand-in whose repr fails
        return bounded_repr(value)


# -- values --------------------------------------------------------------------------------------


def _fingerprint(value: Any) -> str | None:
    """A hash of a tensor's dtype, shape and bytes, to find equal tensors without pairwise work."""
    if not is_tensor_like(value) or getattr(value, "is_quantized", False):
        return None
    import hashlib

    tensor = value.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.blake2b(f"{tensor.dtype}{tuple(value.shape)}".encode(), digest_size=16)
    if tensor.numel():
        digest.update(memoryview(tensor.view(_byte_dtype()).numpy()))
    return digest.hexdigest()


def _byte_dtype() -> Any:
    import torch

    return torch.uint8


def _compare_values(
    sd_a: Mapping[str, Any],
    sd_b: Mapping[str, Any],
    sig_a: Mapping[str, Any],
    sig_b: Mapping[str, Any],
    renamed: list[dict[str, Any]],
    progress: Progress | None,
) -> list[dict[str, Any]]:
    pairs = [(k, k) for k in sig_a if k in sig_b and sig_a[k][0] == sig_b[k][0]]
    pairs += [(r["from"], r["to"]) for r in renamed]
    out = []
    for done, (old, new) in enumerate(pairs, 1):
        max_abs, equal = value_difference(sd_a[old], sd_b[new])
        record: dict[str, Any] = {"key": new, "max_abs_diff": plain(max_abs), "equal": equal}
        if old != new:
            record["from"] = old
        out.append(record)
        if progress is not None:
            progress(done, len(pairs))
    return out


#: A comparison may visit at most this many elements more than the two tensors store.
VALUE_BUDGET = 1 << 24


def _stored_extent(x: Any, y: Any) -> tuple[Any, Any]:
    """``x`` and ``y`` cut to the dims along which either one's values change.

    An expanded tensor (stride 0: ``torch.zeros(1).expand(2**31, 2**31)``, 1.4 KB on disk)
    repeats its stored values along such a dim; comparing one slice there is comparing them
    all, where the full views would take years. Views that still span far more elements than
    both store are refused.
    """
    cut_x, cut_y = x, y
    for dim in range(x.dim()):
        if x.shape[dim] > 1 and x.stride(dim) == 0 and y.stride(dim) == 0:
            cut_x, cut_y = cut_x.narrow(dim, 0, 1), cut_y.narrow(dim, 0, 1)
    stored = x.untyped_storage().nbytes() // max(x.element_size(), 1)
    stored += y.untyped_storage().nbytes() // max(y.element_size(), 1)
    if cut_x.numel() > stored + VALUE_BUDGET:
        raise CheckpointFormatError(
            f"tensors of shape {tuple(x.shape)} expand their {stored} stored elements to "
            f"{cut_x.numel()} in different directions: their values are not compared"
        )
    return cut_x, cut_y


def value_difference(x: Any, y: Any) -> tuple[float | None, bool]:
    """(max abs difference, equal) of two same-shape tensors; NaNs in the same place are equal.

    >>> value_difference(torch.zeros(3), torch.tensor([0.0, 0.5, 0.0]))
    (0.5, False)
    """
    import torch

    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        equal = _same(x, y)
        return (0.0 if equal else None), equal
    x, y = _stored_extent(x, y)
    if x.dtype == y.dtype and torch.equal(x, y):
        return 0.0, True
    wide = torch.complex128 if (x.is_complex() or y.is_complex()) else torch.float64
    flat_x, flat_y = x.detach().reshape(-1), y.detach().reshape(-1)
    worst = 0.0
    for start in range(0, flat_x.numel(), _VALUE_CHUNK):
        cx = flat_x[start : start + _VALUE_CHUNK].to(wide)
        cy = flat_y[start : start + _VALUE_CHUNK].to(wide)
        same = (cx == cy) | (cx.isnan() & cy.isnan())
        if bool(same.all()):
            continue
        gap = (cx - cy).abs()[~same]
        worst = max(worst, float(gap.nan_to_num(nan=math.inf).max()))
    return worst, worst == 0.0
