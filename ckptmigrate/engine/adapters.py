"""PEFT LoRA adapters that follow their base model's migrations.

An adapter folder (``adapter_model.safetensors`` beside ``adapter_config.json``) holds, for each
adapted module ``<m>`` of the base, ``base_model.model.<m>.lora_A.weight`` (``A``: rank x in)
and ``.lora_B.weight`` (``B``: out x rank): the module computes ``W x + s B A x``, with ``s =
lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``). The adapter is the low-rank change ``s B
A`` of the weight ``<m>.weight``, so it follows every base op that is linear in that weight:

- an op on key names moves both keys of a module to where its weight goes;
- an op along dim ``d`` of the weight acts on the factor holding that dim (rows live in ``B``,
  the other dims in ``A``): a split gives each part its slice of that factor and a copy of the
  other; a merge builds the block-diagonal equivalent, the rank growing to the sum (for rows
  ``A = cat(A_i)``, ``B = block_diag(B_i)``); a permutation, pad or slice moves that factor's
  rows, and rows a pad adds are zero (the adapter changes nothing there).

Embeddings (``lora_embedding_A``/``_B``) and ``fan_in_fan_out`` layers store the change
transposed; they follow alike with the factors' roles swapped. Each op says whether an adapter
can follow it (:attr:`~ckptmigrate.ops.Op.follows_adapter`); a function step, a Transpose or a
Stack is refused with :class:`~ckptmigrate.errors.AdapterFollowError`, before anything is
written. Tensors that are not LoRA factors (``modules_to_save`` copies of base modules) go
through the op itself.

Scale: the parts of a merge may have had different scales. The merged module keeps the first
part's ``s``: its rank and alpha (``s * rank``) go into ``rank_pattern`` and ``alpha_pattern``
of ``adapter_config.json``, and each other part's ``s_i / s`` is folded into its block of
``B``. ``target_modules`` (and ``modules_to_save``) name the modules as they are after.

>>> cm.upgrade_adapter("lora-v1/", schema, from_version="1.0.0", out="lora-v2/")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from ..errors import (
    AdapterFollowError,
    CheckpointFormatError,
    NothingMatched,
    OpError,
    OutputOccupiedError,
    SchemaMismatchError,
    UnversionedCheckpointError,
    UsageError,
    VersionConflictError,
)
from ..formats.atomic import atomic_path
from ..formats.bounds import read_json_file
from ..formats.model_folder import copy_side_files
from ..schema.graph import PlannedStep
from ..schema.ops.base import HPARAMS, Op
from ..schema.registry import get_schema, pick_schema
from ..schema.schema import Schema
from ..values.checkpoint import Checkpoint
from ..values.stamp import history_entry
from .rewrite import Rewrite

if TYPE_CHECKING:
    import torch

__all__ = [
    "ADAPTER_CONFIG",
    "Adapter",
    "follow_base",
    "is_adapter_folder",
    "adapter_schema",
    "read_adapter",
    "upgrade_adapter",
    "write_adapter",
]

#: PEFT's names: the config beside the weights, the weights files, every key's prefix
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
#: the two factors' key suffixes: a Linear or Conv layer's, an Embedding's
LINEAR = (".lora_A.weight", ".lora_B.weight")
EMBEDDING = (".lora_embedding_A", ".lora_embedding_B")
WEIGHT = ".weight"
#: module names in rank_pattern / alpha_pattern read as names, not regexes
_NAME = re.compile(r"[\w.\-]+")


@dataclass
class Adapter:
    """A PEFT LoRA adapter: its tensors by file key, its ``adapter_config.json``, and the base
    schema version it fits (``schema``/``version``/``history``: a stamp in the weights file's
    header, written by :func:`write_adapter`; PEFT ignores it).

    >>> adapter = cm.read_adapter("lora/")  # doctest: +SKIP
    """

    state_dict: dict[str, Any]
    config: dict[str, Any]
    schema: str | None = None
    version: Version | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    #: other tools' safetensors header entries (``format: pt``), written back as they were
    header: dict[str, str] = field(default_factory=dict)
    weights_name: str = ADAPTER_WEIGHTS[0]


@dataclass
class _Settings:
    """What ``adapter_config.json`` says about ranks and scales, checked."""

    r: int
    alpha: float
    rslora: bool
    transposed: bool  # fan_in_fan_out: a Linear's change is stored as (B A)^T
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    def scale(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def alpha_for(self, rank: int, scale: float) -> float:
        return scale * math.sqrt(rank) if self.rslora else scale * rank


@dataclass
class _Factors:
    """One adapted module's change of its weight, ``scale * left @ right``: ``left`` has the
    weight's rows and ``rank`` columns, ``right`` has ``rank`` rows and the weight's other
    dims, so an op along dim 0 of the weight acts on ``left`` and along the others on ``right``.
    """

    left: torch.Tensor
    right: torch.Tensor
    scale: float
    suffixes: tuple[str, str]
    transposed: bool  # stored as A = left^T, B = right^T (an embedding, fan_in_fan_out)
    b_tail: tuple[int, ...] = ()  # a Conv's lora_B: (out, rank, 1, 1)

    @property
    def rank(self) -> int:
        return int(self.right.shape[0])

    def holds(self, dim: int) -> bool:
        """Whether ``left`` holds dim ``dim`` of the weight (its rows)."""
        return dim % self.right.dim() == 0

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` as PEFT stores them."""
        if self.transposed:
            return self.left.T.contiguous(), self.right.T.contiguous()
        b = self.left.reshape(self.left.shape[0], self.rank, *self.b_tail)
        return self.right.contiguous(), b.contiguous()


# -- reading ----------------------------------------------------------------------------------


def _adapter_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The config and the weights file of the adapter folder ``path`` (or of its weights)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config = folder / ADAPTER_CONFIG
    weights = [folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file()]
    if not path.is_dir():
        weights = [path] if path.is_file() else []
    if not config.is_file() or not weights:
        raise CheckpointFormatError(
            f"is not a PEFT adapter: expected {ADAPTER_CONFIG} and one of "
            f"{', '.join(ADAPTER_WEIGHTS)} in one folder",
            path=path,
        )
    if len(weights) > 1:
        raise CheckpointFormatError(
            f"holds {len(weights)} adapter weights files ({', '.join(w.name for w in weights)}): "
            "pass the one you mean",
            path=folder,
        )
    return config, weights[0]


def is_adapter_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding a PEFT adapter (its config and weights file)."""
    path = Path(path)
    return (
        path.is_dir()
        and (path / ADAPTER_CONFIG).is_file()
        and any((path / n).is_file() for n in ADAPTER_WEIGHTS)
    )


def read_adapter(path: str | os.PathLike[str]) -> Adapter:
    """Read the adapter folder ``path`` (or its weights file): the tensors with the safe
    readers, the config as checked JSON. A malformed config, a key outside ``base_model.model.``
    or a factor of the wrong shape is a :class:`~ckptmigrate.errors.CheckpointFormatError`.

    >>> cm.read_adapter("lora/").config["r"]  # doctest: +SKIP
    8
    """
    from ..io.files import read_checkpoint

    config_path, weights = _adapter_paths(path)
    config = read_json_file(config_path, what=ADAPTER_CONFIG)
    if not isinstance(config, dict):
        raise CheckpointFormatError(
            f"must be a JSON object, found a JSON {type(config).__name__}", path=config_path
        )
    ckpt = read_checkpoint(weights)
    header = ckpt.extra.get("safetensors_metadata") or {}
    adapter = Adapter(
        ckpt.state_dict,
        config,
        ckpt.schema,
        ckpt.version,
        list(ckpt.history),
        dict(header),
        weights.name,
    )
    _modules(adapter, _settings(config, config_path), path=weights)  # checked on the way in
    return adapter


def _settings(config: dict[str, Any], path: object) -> _Settings:
    def bad(what: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{ADAPTER_CONFIG}: {what}", path=path)

    if config.get("peft_type") != "LORA":
        raise bad(
            f"peft_type is {config.get('peft_type')!r}; ckptmigrate follows LoRA adapters only"
        )
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise bad(
                f"{flag} is set; ckptmigrate follows plain LoRA factors only (not yet {flag})"
            )
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not _positive(r, int):
        raise bad(f"r must be a positive integer, found {r!r}")
    if not _positive(alpha, float):
        raise bad(f"lora_alpha must be a positive number, found {alpha!r}")
    patterns = []
    for name, kind in (("rank_pattern", int), ("alpha_pattern", float)):
        value = config.get(name) or {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and _positive(v, kind) for k, v in value.items()
        ):
            raise bad(f"{name} must map module names to positive numbers, found {value!r}")
        odd = [k for k in value if not _NAME.fullmatch(k)]
        if odd:
            raise bad(
                f"{name} key {odd[0]!r} is a regex; ckptmigrate reads module names only "
                "(letters, digits, '_', '-', '.'): write the names it stands for"
            )
        patterns.append(value)
    for name in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(name, False), bool):
            raise bad(f"{name} must be true or false, found {config.get(name)!r}")
    return _Settings(
        int(r),
        float(alpha),
        bool(config.get("use_rslora", False)),
        bool(config.get("fan_in_fan_out", False)),
        *patterns,
    )


def _positive(value: Any, kind: type) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        return False
    return math.isfinite(value) and value > 0


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's lookup: the first key that is ``module`` or a dotted tail of it."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def _modules(
    adapter: Adapter, settings: _Settings, *, path: object = None
) -> tuple[dict[str, _Factors], dict[str, Any]]:
    """The adapter's modules (by base module name) as factors, and its other tensors (by base
    key): the copies of ``modules_to_save``."""
    import torch

    def bad(what: str) -> CheckpointFormatError:
        return CheckpointFormatError(what, path=path)

    found: dict[str, dict[int, Any]] = {}
    kinds: dict[str, tuple[str, str]] = {}
    others: dict[str, Any] = {}
    for key, value in adapter.state_dict.items():
        if not key.startswith(PREFIX):
            raise bad(f"key {key!r} does not start with {PREFIX!r}: not a PEFT adapter's key")
        name = key[len(PREFIX) :]
        if not isinstance(value, torch.Tensor):
            raise bad(f"{key!r} is a {type(value).__name__}, not a tensor")
        for suffixes in (LINEAR, EMBEDDING):
            hit = [i for i, s in enumerate(suffixes) if name.endswith(s)]
            if hit:
                module = name[: -len(suffixes[hit[0]])]
                found.setdefault(module, {})[hit[0]] = value
                kinds[module] = suffixes
                break
        else:
            if ".lora_" in name:
                raise bad(
                    f"{key!r} is a LoRA tensor ckptmigrate does not follow (it follows "
                    "lora_A/lora_B and lora_embedding_A/_B)"
                )
            others[name] = value
    modules = {}
    for module, pair in found.items():
        suffixes = kinds[module]
        if len(pair) != 2:
            raise bad(f"module {module!r} has {suffixes[0 if 0 in pair else 1]!r} only")
        a, b = pair[0], pair[1]
        if not (a.is_floating_point() and b.is_floating_point()):
            raise bad(f"module {module!r}: LoRA factors must be floats, found {a.dtype}, {b.dtype}")
        rank = _pattern_value(settings.rank_pattern, module, settings.r)
        transposed = suffixes == EMBEDDING or settings.transposed
        tail = tuple(b.shape[2:])
        fits = a.dim() >= 2 and b.dim() >= 2 and a.shape[0] == rank == b.shape[1]
        if transposed:
            fits = fits and a.dim() == 2 and b.dim() == 2
        elif any(n != 1 for n in tail):
            fits = False
        if not fits:
            raise bad(
                f"module {module!r}: lora A {tuple(a.shape)} and B {tuple(b.shape)} do not "
                f"make a rank-{rank} pair (A: rank x in, B: out x rank, as {ADAPTER_CONFIG} "
                "says the rank)"
            )
        alpha = _pattern_value(settings.alpha_pattern, module, settings.alpha)
        scale = settings.scale(rank, alpha)
        if transposed:
            modules[module] = _Factors(a.T, b.T, scale, suffixes, True)
        else:
            modules[module] = _Factors(b.reshape(b.shape[0], rank), a, scale, suffixes, False, tail)
    return modules, others


# -- following a plan --------------------------------------------------------------------------


def follow_base(
    adapter: Adapter,
    schema: Schema,
    to: str | Version | None = None,
    *,
    from_version: str | Version | None = None,
) -> Adapter:
    """The adapter of the base ``schema`` upgraded to ``to`` (default: current), from its
    stamp's version or ``from_version``: pure, the input untouched.

    Raises :class:`~ckptmigrate.errors.AdapterFollowError` for a step it cannot follow.

    >>> new = cm.follow_base(cm.read_adapter("lora/"), schema, from_version="1.0.0")  # doctest: +SKIP
    """
    version = _version_of(adapter, schema, from_version)
    return _follow_plan(adapter, schema, version, schema.plan(version, to))


def _follow_plan(
    adapter: Adapter, schema: Schema, version: Version, plan: Sequence[PlannedStep]
) -> Adapter:
    settings = _settings(adapter.config, ADAPTER_CONFIG)
    modules, others = _modules(adapter, settings)
    before = dict(modules)
    old_others = list(others)
    for planned in plan:
        modules, others = _follow_step(planned, schema, modules, others)
    state: dict[str, Any] = {}
    for module, factors in modules.items():
        a, b = factors.tensors()
        state[PREFIX + module + factors.suffixes[0]] = a
        state[PREFIX + module + factors.suffixes[1]] = b
    state.update({PREFIX + k: v for k, v in others.items()})
    config = _new_config(adapter.config, settings, before, modules, old_others, list(others))
    history = list(adapter.history) + [history_entry(p) for p in plan]
    target = plan[-1].target if plan else version
    return replace(
        adapter,
        state_dict=state,
        config=config,
        schema=schema.name,
        version=target,
        history=history,
    )


def _version_of(adapter: Adapter, schema: Schema, from_version: str | Version | None) -> Version:
    from ..base.version import parse_version

    if adapter.schema is not None and adapter.schema != schema.name:
        raise SchemaMismatchError(schema.name, adapter.schema)
    given = None if from_version is None else parse_version(from_version, what="from_version")
    if adapter.version is not None:
        if given is not None and given != adapter.version:
            raise VersionConflictError(adapter.version, given)
        return adapter.version
    if given is None:
        raise UnversionedCheckpointError(schema=schema.name)
    return given


def _follow_step(
    planned: PlannedStep, schema: Schema, modules: dict[str, _Factors], others: dict[str, Any]
) -> tuple[dict[str, _Factors], dict[str, Any]]:
    where = f"{schema.name} {planned.source} -> {planned.target} ({planned.name})"
    ops = planned.ops
    if ops is None:
        raise AdapterFollowError(
            where,
            f"the function {planned.step.name}",
            "a function step is code: what it does to the weights, and so to an adapter's "
            "factors, is unknown",
        )
    for op in ops:
        if not op.follows_adapter:
            raise AdapterFollowError(where, op.describe(), op.adapter_refusal)
    for op in ops:
        try:
            modules, others = _follow_op(op, modules, others)
        except OpError as exc:
            raise AdapterFollowError(where, op.describe(), str(exc)) from exc
    return modules, others


def _follow_op(
    op: Op, modules: dict[str, _Factors], others: dict[str, Any]
) -> tuple[dict[str, _Factors], dict[str, Any]]:
    if op.acts_on <= {HPARAMS}:
        return modules, others
    others = _others_through(op, others)
    weights = {m + WEIGHT: f for m, f in modules.items()}
    dim = op.adapter_dim()
    moved = _moved(op, weights) if dim is None else _along(op, dim, weights)
    out = {}
    for key, factors in moved.items():
        if not key.endswith(WEIGHT):
            raise OpError(f"it moves a weight the adapter adapts to {key!r}, not a '.weight' key")
        out[key[: -len(WEIGHT)]] = factors
    return out, others


def _dropped(trace: dict[str, list[str]], keys: Sequence[str]) -> None:
    kept = {s for sources in trace.values() for s in sources}
    gone = [k for k in keys if k not in kept]
    if gone:
        raise OpError(f"it drops {gone[:3]}, which the adapter holds")


def _others_through(op: Op, others: dict[str, Any]) -> dict[str, Any]:
    """The adapter's copies of base tensors, through the op itself."""
    if not others:
        return others
    trace = op.trace(list(others))
    if trace is not None:
        _dropped(trace, list(others))
    work = Checkpoint(dict(others))
    try:
        op.apply(work)
    except NothingMatched:
        return others
    if trace is None:
        return work.state_dict
    return {k: v for k, v in work.state_dict.items() if trace.get(k)}  # not keys the op adds


def _moved(op: Op, weights: dict[str, _Factors]) -> dict[str, _Factors]:
    """Through an op on key names: each module's factors go where its weight goes."""
    trace = op.trace(list(weights))
    if trace is None:
        return weights
    _dropped(trace, list(weights))
    return {new: weights[sources[0]] for new, sources in trace.items() if sources}


def _along(op: Op, dim: int, weights: dict[str, _Factors]) -> dict[str, _Factors]:
    """Through an op along ``dim`` of the weights: the factor holding ``dim`` goes through
    :meth:`~ckptmigrate.ops.Op.for_adapter`; the other is copied (a split), concatenated along
    the rank (a merge, the holding factors padded into a block diagonal) or kept."""
    import torch

    keys = list(weights)
    missing = op.partners(keys)
    trace = op.trace(keys + missing) or {k: [k] for k in keys + missing}
    holding: dict[str, torch.Tensor] = {}
    others: dict[str, torch.Tensor] = {}  # a merged module's other factor, rank-concatenated
    for new, sources in trace.items():
        present = [s for s in sources if s in weights]
        if not present:
            continue
        if len(sources) == 1:
            f = weights[sources[0]]
            holding[sources[0]] = f.left if f.holds(dim) else f.right
            continue
        rows = weights[present[0]].holds(dim)
        parts = _merge_parts(op, dim, sources, weights)
        total = sum(int(right.shape[0]) for _, right in parts)
        offset = 0
        for source, (left, right) in zip(sources, parts):
            rank = int(right.shape[0])
            if rows:  # B = block_diag(B_i): each B_i in its own rank columns
                block = left.new_zeros(left.shape[0], total)
                block[:, offset : offset + rank] = left
            else:  # A = block_diag(A_i)
                block = right.new_zeros(total, *right.shape[1:])
                block[offset : offset + rank] = right
            holding[source] = block
            offset += rank
        if rows:
            others[new] = torch.cat([right for _, right in parts], dim=0)
        else:
            others[new] = torch.cat([left for left, _ in parts], dim=1)
    splits: dict[str, int] = {}
    for sources in trace.values():
        if len(sources) == 1:
            splits[sources[0]] = splits.get(sources[0], 0) + 1
    work = Checkpoint(dict(holding))
    try:
        op.for_adapter().apply(work)
    except NothingMatched:
        return weights
    joined = work.state_dict
    out: dict[str, _Factors] = {}
    handed: set[str] = set()
    for new, sources in trace.items():
        present = [s for s in sources if s in weights]
        if not present:
            continue
        f = weights[present[0]]
        if new in others:
            other = others[new]
        else:  # a split's parts each get their own copy of the other factor
            other = f.right if f.holds(dim) else f.left
            other = other.clone() if sources[0] in handed else other
            handed.add(sources[0])
        if f.holds(dim):
            part = replace(f, left=joined[new], right=other)
        else:
            part = replace(f, left=other, right=joined[new])
        if splits.get(sources[0], 0) > 1:
            part = _without_other_blocks(part, holding[sources[0]], dim)
        if part is not None:
            out[new] = part
    return out


def _without_other_blocks(part: _Factors, whole: torch.Tensor, dim: int) -> _Factors | None:
    """A split part without the rank components that are zero in its rows and not in the
    whole's: other parts' blocks of a merge, which add nothing here (None: nothing is left).
    Exact zeros only, so the change is the same; an untrained adapter (B = 0) keeps its rank.
    """
    rows = part.holds(dim)
    mine = part.left if rows else part.right

    def used(t: torch.Tensor) -> torch.Tensor:
        t = t.ne(0)
        return t.any(dim=0) if rows else t.flatten(1).any(dim=1)

    keep = used(mine) | ~used(whole)
    if bool(keep.all()):
        return part
    if not bool(keep.any()):
        return None
    return replace(part, left=part.left[:, keep], right=part.right[keep])


def _merge_parts(
    op: Op, dim: int, sources: list[str], weights: dict[str, _Factors]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(left, right)`` of each source of a merge, the scale folded into ``left`` as the
    first present part's; a source the adapter does not adapt is a rank-0 part of the size
    the op says (:meth:`~ckptmigrate.ops.Op.part_size`)."""
    present = [s for s in sources if s in weights]
    first = weights[present[0]]
    kinds = {(weights[s].transposed, weights[s].suffixes, weights[s].b_tail) for s in present}
    if len(kinds) > 1:
        raise OpError(f"it merges {present}, adapted as different kinds of layer")

    def size(f: _Factors) -> int:
        return int(f.left.shape[0] if f.holds(dim) else f.right.shape[dim % f.right.dim()])

    known = {i: size(weights[s]) for i, s in enumerate(sources) if s in weights}
    parts = []
    for i, source in enumerate(sources):
        if source in weights:
            f = weights[source]
            parts.append((f.left * (f.scale / first.scale), f.right))
            continue
        n = op.part_size(i, known)
        if n is None:
            raise OpError(
                f"the adapter adapts {present} but not {source!r}, which it joins with them, "
                "and the op does not say that part's size: give it sizes="
            )
        if first.holds(dim):
            parts.append(
                (first.left.new_zeros(n, 0), first.right.new_zeros(0, *first.right.shape[1:]))
            )
        else:
            rest = list(first.right.shape[1:])
            rest[dim % first.right.dim() - 1] = n
            parts.append(
                (first.left.new_zeros(first.left.shape[0], 0), first.right.new_zeros(0, *rest))
            )
    return parts


# -- the config after ------------------------------------------------------------------------


def _new_config(
    config: dict[str, Any],
    settings: _Settings,
    before: dict[str, _Factors],
    after: dict[str, _Factors],
    old_others: list[str],
    new_others: list[str],
) -> dict[str, Any]:
    """``config`` for the modules as they are ``after``: ``target_modules`` and
    ``modules_to_save`` by their new names, and explicit ``rank_pattern`` / ``alpha_pattern``
    entries where a module's rank or scale is not the config's ``r`` and ``lora_alpha``."""
    out = dict(config)
    if set(before) != set(after):
        out["target_modules"] = _names_like(config.get("target_modules"), list(after))
    if old_others != new_others:
        modules = list(dict.fromkeys(k.rpartition(".")[0] for k in new_others))
        out["modules_to_save"] = _names_like(config.get("modules_to_save"), modules)
    same = set(before) == set(after) and all(
        before[m].rank == f.rank and math.isclose(before[m].scale, f.scale, rel_tol=1e-9)
        for m, f in after.items()
    )
    if same:  # every module as it was: the patterns still say what they said
        return out
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for module, f in after.items():
        alpha = settings.alpha_for(f.rank, f.scale)
        if f.rank != settings.r:
            ranks[module] = f.rank
        if not math.isclose(alpha, settings.alpha, rel_tol=1e-9):
            alphas[module] = alpha
    # a module left to the defaults whose name ends with an entry's would take that entry
    for pattern, value_of in (
        (ranks, lambda f: f.rank),
        (alphas, lambda f: settings.alpha_for(f.rank, f.scale)),
    ):
        for module, f in after.items():
            if module not in pattern and any(module.endswith("." + k) for k in pattern):
                pattern[module] = value_of(f)
    out["rank_pattern"] = _longest_first(ranks)
    out["alpha_pattern"] = {k: _plain(v) for k, v in _longest_first(alphas).items()}
    return out


def _plain(value: float) -> float | int:
    return int(round(value)) if math.isclose(value, round(value), rel_tol=1e-12) else value


def _longest_first(pattern: dict[str, Any]) -> dict[str, Any]:
    """PEFT takes the first entry that is a module's name or a dotted tail of it."""
    return dict(sorted(pattern.items(), key=lambda kv: -len(kv[0])))


def _names_like(old: Any, modules: list[str]) -> Any:
    """``modules`` named as ``old`` named them: bare names (``["q_proj", "v_proj"]``) stay
    bare, ``"all-linear"`` stays; full names otherwise (a regex cannot be followed)."""
    if old == "all-linear":
        return old
    if isinstance(old, list) and all(isinstance(n, str) and "." not in n for n in old):
        return sorted({m.rpartition(".")[2] for m in modules})
    return list(modules)


# -- writing ---------------------------------------------------------------------------------


def write_adapter(adapter: Adapter, folder: str | os.PathLike[str]) -> Path:
    """Write ``adapter`` into ``folder`` (created; it must be new or empty): its weights file,
    stamped, and its config, each atomically. Returns the weights file.

    >>> cm.write_adapter(new, "lora-v2/")  # doctest: +SKIP
    """
    folder = Path(folder)
    if os.path.lexists(folder) and (not folder.is_dir() or any(folder.iterdir())):
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise OutputOccupiedError(folder, found, "an adapter folder")
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return _write_into(adapter, folder)
    except BaseException:  # a write refused or interrupted leaves no half adapter behind
        for name in (adapter.weights_name, ADAPTER_CONFIG):
            with contextlib.suppress(OSError):
                (folder / name).unlink()
        if made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _write_into(adapter: Adapter, folder: Path) -> Path:
    from ..io.files import write_checkpoint

    weights = folder / adapter.weights_name
    extra = {"safetensors_metadata": dict(adapter.header)} if adapter.header else {}
    ckpt = Checkpoint(
        dict(adapter.state_dict),
        schema=adapter.schema,
        version=adapter.version,
        history=list(adapter.history),
        extra=extra if weights.suffix == ".safetensors" else {},
        layout="safetensors" if weights.suffix == ".safetensors" else "flat",
    )
    write_checkpoint(weights, ckpt)
    with atomic_path(folder / ADAPTER_CONFIG) as tmp:
        tmp.write_text(json.dumps(adapter.config, indent=2, sort_keys=True) + "\n")
    return weights


def adapter_schema(
    src: str | os.PathLike[str], schemas: Mapping[str, Schema], name: str | None = None
) -> Schema:
    """The schema among ``schemas`` that upgrades the adapter ``src``: its stamp's, else
    ``name``, else the only one (as :func:`~ckptmigrate.schema.registry.pick_schema` picks)."""
    from ..io.files import read_metadata

    _, weights = _adapter_paths(src)
    return pick_schema(read_metadata(weights), schemas, name, path=src)


def upgrade_adapter(
    src: str | os.PathLike[str],
    schema: Schema | str | Mapping[str, Schema],
    *,
    out: str | os.PathLike[str] | None = None,
    to: str | Version | None = None,
    from_version: str | Version | None = None,
    dry_run: bool = False,
    on_plan: Callable[[Rewrite], Any] | None = None,
) -> Rewrite:
    """Upgrade the PEFT LoRA adapter folder ``src`` with its base ``schema``'s plan and write
    it into the new folder ``out`` (with the files beside it: PEFT's README.md...).
    ``schema`` is a Schema, a name, or a table of schemas to pick from by the adapter's stamp.

    The adapter's version is its stamp's, else ``from_version`` (the base version it was
    trained on); ``to`` defaults to the schema's current version. A step the adapter cannot
    follow raises :class:`~ckptmigrate.errors.AdapterFollowError` before anything is written.
    ``on_plan(result)`` is called with the plan before the write.

    >>> cm.upgrade_adapter("lora/", schema, from_version="1.0.0", out="lora-v2/")  # doctest: +SKIP
    """
    found = get_schema(schema) if isinstance(schema, (Schema, str)) else adapter_schema(src, schema)
    if out is None and not dry_run:
        raise UsageError("upgrade_adapter needs out= (a new folder), or dry_run=True")
    config_path, weights = _adapter_paths(src)
    adapter = read_adapter(src)
    version = _version_of(adapter, found, from_version)
    plan = found.plan(version, to)
    new = _follow_plan(adapter, found, version, plan)
    result = Rewrite(
        schema=found.name,
        source_version=str(version),
        target_version=str(new.version),
        plan=[p.record() for p in plan],
        src=weights,
        format="peft-lora",
    )
    if on_plan is not None:
        on_plan(result)
    if dry_run or out is None:
        return result
    if Path(out).resolve() == config_path.parent.resolve():
        raise UsageError(f"out={str(out)!r} is the adapter's own folder: pass a new folder")
    written = write_adapter(new, out)
    copy_side_files(config_path.parent, [weights.name, ADAPTER_CONFIG], Path(out))
    result.written = str(written.parent)
    result.dst = written.parent
    return result
