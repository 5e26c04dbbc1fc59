"""Fused and split tensors between two checkpoints: ``gate`` + ``up`` -> ``gate_up``, and back.

A fusion is found by shapes (the parts agree on every dim but one, and their sizes there add
up to the whole's) and names (each part's own name appears in the whole's, in the order of
concatenation: ``gate``, ``up`` in ``gate_up``; ``q``, ``k``, ``v`` in ``qkv``). Given the
tensors, values decide: ``torch.cat(parts, dim)`` must equal the whole, and a candidate they
refute is dropped.

>>> infer_fusions({"mlp.gate.weight": ((32, 32), "float32"), "mlp.up.weight": ((32, 32), "float32")},
...               {"mlp.gate_up.weight": ((64, 32), "float32")})
[Fusion(kind='merge', parts=['mlp.gate.weight', 'mlp.up.weight'], whole='mlp.gate_up.weight', ...)]
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Fusion", "infer_fusions"]

Signature = tuple[Any, str]  # (shape or None, dtype), as diff records them

_MAX_PARTS = 4  # q, k, v and one more
_MAX_GROUP = 12  # candidate parts per whole; beyond that names are too ambiguous to search


@dataclass
class Fusion:
    """``parts`` concatenated along ``dim`` (in that order) make ``whole``.

    ``kind`` is ``"merge"`` when the old file holds the parts and the new one the whole,
    ``"split"`` the other way round. ``confirmed`` is True when the tensors were compared and
    agree, None when only names and shapes were seen.
    """

    kind: Literal["merge", "split"]
    parts: list[str]
    whole: str
    dim: int
    sizes: list[int]
    confirmed: bool | None = None

    @property
    def old_keys(self) -> list[str]:
        return list(self.parts) if self.kind == "merge" else [self.whole]

    @property
    def new_keys(self) -> list[str]:
        return [self.whole] if self.kind == "merge" else list(self.parts)


def infer_fusions(
    removed: Mapping[str, Signature],
    added: Mapping[str, Signature],
    *,
    tensors: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None,
) -> list[Fusion]:
    """Merges (parts removed, whole added) and splits (whole removed, parts added).

    ``removed``/``added`` map keys to ``(shape, dtype)``. ``tensors`` (old state_dict, new
    state_dict) confirms each candidate by values and finds fusions whose names say nothing.
    """
    found: list[Fusion] = []
    taken: set[tuple[str, str]] = set()  # (side, key) already in a fusion
    for kind, wholes, pieces in (("merge", added, removed), ("split", removed, added)):
        whole_side, part_side = ("new", "old") if kind == "merge" else ("old", "new")
        for whole, (shape, dtype) in wholes.items():
            if (whole_side, whole) in taken or not _usable(whole, shape):
                continue
            pool = {
                k: sig[0]
                for k, sig in pieces.items()
                if (part_side, k) not in taken and sig[1] == dtype and _usable(k, sig[0])
            }
            fusion = _best(kind, whole, tuple(shape), pool, tensors)  # type: ignore[arg-type]
            if fusion is not None:
                found.append(fusion)
                taken.add((whole_side, whole))
                taken.update((part_side, k) for k in fusion.parts)
    return found


def _usable(key: str, shape: Any) -> bool:
    # op templates use {field}; a key with braces cannot be written as one
    return shape is not None and len(shape) > 0 and "{" not in key and "}" not in key


def _module(key: str) -> tuple[str, str, str]:
    """``a.b.mlp.gate.weight`` -> (``a.b.mlp``, ``gate``, ``weight``)."""
    parts = key.split(".")
    if len(parts) < 2:
        return "", "", key
    return ".".join(parts[:-2]), parts[-2], parts[-1]


def _best(
    kind: Literal["merge", "split"],
    whole: str,
    shape: tuple[int, ...],
    pool: Mapping[str, Any],
    tensors: tuple[Mapping[str, Any], Mapping[str, Any]] | None,
) -> Fusion | None:
    parent, name, leaf = _module(whole)
    siblings = {
        k: tuple(s)
        for k, s in pool.items()
        if _module(k)[0] == parent and _module(k)[2] == leaf and _module(k)[1] != name
    }
    by_names = _named_candidate(kind, whole, shape, siblings)
    if tensors is None:
        return by_names
    if by_names is not None and _values_agree(by_names, tensors):
        by_names.confirmed = True
        return by_names
    for candidate in _shape_candidates(kind, whole, shape, siblings):
        for order in itertools.permutations(candidate.parts):
            parts = list(order)
            trial = Fusion(
                kind, parts, whole, candidate.dim, _sizes(parts, siblings, candidate.dim)
            )
            if _values_agree(trial, tensors):
                trial.confirmed = True
                return trial
    return None


def _shape_candidates(
    kind: Literal["merge", "split"],
    whole: str,
    shape: tuple[int, ...],
    siblings: Mapping[str, tuple[int, ...]],
) -> Iterator[Fusion]:
    """Every set of siblings (in file order) whose shapes concatenate to ``shape``."""
    if len(siblings) > _MAX_GROUP:
        return
    for dim in range(len(shape)):
        fits = [
            k
            for k, s in siblings.items()
            if len(s) == len(shape)
            and s[dim] < shape[dim]
            and all(s[i] == shape[i] for i in range(len(shape)) if i != dim)
        ]
        for n in range(2, min(_MAX_PARTS, len(fits)) + 1):
            for combo in itertools.combinations(fits, n):
                sizes = _sizes(combo, siblings, dim)
                if sum(sizes) == shape[dim]:
                    yield Fusion(kind, list(combo), whole, dim, sizes)


def _sizes(keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]], dim: int) -> list[int]:
    return [shapes[k][dim] for k in keys]


def _named_candidate(
    kind: Literal["merge", "split"],
    whole: str,
    shape: tuple[int, ...],
    siblings: Mapping[str, tuple[int, ...]],
) -> Fusion | None:
    """The shape candidate whose part names spell the whole's name best, in order; ties: none."""
    whole_name = _module(whole)[1]
    scored: list[tuple[float, Fusion]] = []
    for candidate in _shape_candidates(kind, whole, shape, siblings):
        spelled = _spelling_order([_module(k)[1] for k in candidate.parts], whole_name)
        if spelled is None:
            continue
        order, coverage = spelled
        parts = [candidate.parts[i] for i in order]
        fusion = Fusion(kind, parts, whole, candidate.dim, _sizes(parts, siblings, candidate.dim))
        scored.append((coverage, fusion))
    if not scored:
        return None
    scored.sort(key=lambda s: -s[0])
    if len(scored) > 1 and scored[1][0] == scored[0][0]:
        return None  # two readings of the names fit equally: leave it to a person
    return scored[0][1]


def _spelling_order(names: list[str], whole_name: str) -> tuple[list[int], float] | None:
    """Indices of ``names`` in the order their distinct cores appear in ``whole_name``.

    The cores are the names less their common prefix and suffix (``q_proj``, ``k_proj`` ->
    ``q``, ``k``); each must occur in ``whole_name`` without overlapping the others. The
    second value is how much of ``whole_name`` the cores cover (0..1).
    """
    prefix = _common_prefix(names)
    suffix = _common_prefix([n[len(prefix) :][::-1] for n in names])[::-1]
    cores = [n[len(prefix) : len(n) - len(suffix)] for n in names]
    if any(not c for c in cores) or len(set(cores)) != len(cores):
        return None
    positions = []
    for core in cores:
        at = whole_name.find(core)
        if at < 0:
            return None
        positions.append(at)
    order = sorted(range(len(cores)), key=lambda i: positions[i])
    for a, b in zip(order, order[1:]):
        if positions[a] + len(cores[a]) > positions[b]:
            return None
    return order, sum(len(c) for c in cores) / len(whole_name)


def _common_prefix(names: list[str]) -> str:
    first = min(names)
    last = max(names)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


def _values_agree(fusion: Fusion, tensors: tuple[Mapping[str, Any], Mapping[str, Any]]) -> bool:
    import torch

    old, new = tensors
    parts_sd, whole_sd = (old, new) if fusion.kind == "merge" else (new, old)
    try:
        parts = [parts_sd[k] for k in fusion.parts]
        whole = whole_sd[fusion.whole]
    except KeyError:
        return False
    if not all(isinstance(t, torch.Tensor) for t in [*parts, whole]):
        return False
    return bool(torch.equal(torch.cat(parts, dim=fusion.dim), whole))
