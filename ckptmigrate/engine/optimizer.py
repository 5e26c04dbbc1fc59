"""Optimizer state that follows its parameters through a migration.

torch keys optimizer state by position (``state[3]``, ``param_groups[i]["params"]``); a
migration renames, splits, drops and adds parameters by name. State that says its names (the
``param_names`` recent torch writes into each group, or DCP's FQN keys) is keyed by name from
the start; position-keyed state gets names only when a step needs them (see
:mod:`ckptmigrate.engine.positions`). Each step carries the per-parameter state along (a rename moves
it, a split splits it along the same dim, a dropped parameter drops it, a new one gets none),
and at the end it goes back to the file's layout, each group in the optimizer's order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ParamNamesUnknownError
from ..values.checkpoint import Checkpoint

#: A step's hook for function migrations: (states by name, before, after) -> states by name.
OptimizerHook = Callable[[dict[str, dict[str, Any]], Checkpoint, Checkpoint], dict[str, dict]]


__all__ = [
    "NamedOptimizer",
    "ParamNamesUnknownError",
    "from_named",
    "to_named",
    "follow_trace",
    "fill_fresh_parts",
]


def is_optimizer_state(value: Any) -> bool:
    """A torch optimizer state_dict: ``state`` by position, ``param_groups`` with ``params``."""
    if not (isinstance(value, Mapping) and isinstance(value.get("state"), Mapping)):
        return False
    groups = value.get("param_groups")
    if not isinstance(groups, list) or not all(
        isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups
    ):
        return False
    positions = {p for g in groups for p in g["params"]}
    return all(pos in positions for pos in value["state"])


def keyed_by_name(opt_sd: Mapping[str, Any]) -> bool:
    """State keyed by parameter name, as DCP's ``get_state_dict`` writes it: ``state`` by
    FQN, each group's ``params`` listing FQNs."""
    params = [p for g in opt_sd["param_groups"] for p in g["params"]]
    return bool(params) and all(isinstance(p, str) for p in params)


def carries_names(opt_sd: Mapping[str, Any]) -> bool:
    """Whether the state says each parameter's name (keyed by name, or ``param_names``)."""
    return keyed_by_name(opt_sd) or all("param_names" in g for g in opt_sd["param_groups"])


@dataclass
class NamedOptimizer:
    """One optimizer's state keyed by parameter name."""

    states: dict[str, dict[str, Any]]
    groups: list[dict[str, Any]]  # options + "names": [...], in the optimizer's order
    wrote_param_names: bool
    extra: dict[str, Any] = field(default_factory=dict)
    #: the file keys it by name (DCP): it is written back keyed by name
    keyed_by_name: bool = False


def to_named(opt_sd: Mapping[str, Any], param_names: Sequence[str] | None) -> NamedOptimizer:
    """Key one optimizer state_dict by parameter name.

    Names come from the state itself (FQN keys, or each group's ``param_names``), else from
    ``param_names``, the names of every group's positions in order.
    """
    by_name = keyed_by_name(opt_sd)
    groups = []
    position_name: dict[Any, str] = {}
    wrote = not by_name and all("param_names" in g for g in opt_sd["param_groups"])
    flat_names = list(param_names) if param_names is not None and not by_name else None
    total = sum(len(g["params"]) for g in opt_sd["param_groups"])
    if flat_names is not None and not wrote and len(flat_names) != total:
        raise ParamNamesUnknownError(
            f"{len(flat_names)} parameter names were given, but the optimizer holds {total} "
            "parameters"
        )
    cursor = 0
    for group in opt_sd["param_groups"]:
        positions = list(group["params"])
        if by_name:
            names = [str(p) for p in positions]
        elif "param_names" in group:
            names = list(group["param_names"])
        elif flat_names is not None:
            names = flat_names[cursor : cursor + len(positions)]
        else:
            raise ParamNamesUnknownError("nothing in the file names them")
        cursor += len(positions)
        position_name.update(zip(positions, names))
        groups.append({**group, "names": names})  # keeps torch's key order for write-back
    states = {position_name[pos]: dict(st) for pos, st in opt_sd["state"].items()}
    extra = {k: v for k, v in opt_sd.items() if k not in ("state", "param_groups")}
    return NamedOptimizer(states, groups, wrote, extra, by_name)


def _index_order(items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """``items`` with the numbered ones (``layers.0``, ``layers.1``) in index order, in place."""
    numbered = iter(sorted((kv for kv in items if kv[0].isdigit()), key=lambda kv: int(kv[0])))
    return [next(numbered) if k.isdigit() else (k, v) for k, v in items]


def module_order(keys: Sequence[str]) -> list[str]:
    """``keys`` in the order ``nn.Module`` would list them: a module's own entries, then its
    children's, each child where it first appears, numbered children (a ``ModuleList``'s) in
    index order.

    A state_dict written by a module is already in this order (so this changes nothing for
    it); a migrated one may not be: splitting ``c_attn.weight`` and ``c_attn.bias`` in place
    gives ``q.weight, k.weight, v.weight, q.bias, ...``, while today's model lists ``q.weight,
    q.bias, k.weight, ...``, the order its optimizer numbers its parameters in.
    """
    tree: dict[str, Any] = {}
    for key in keys:
        node = tree
        *path, leaf = key.split(".")
        for part in path:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):  # a name both a leaf and a module: keep file order
                return list(keys)
            node = child
        if isinstance(node.get(leaf), dict):
            return list(keys)
        node[leaf] = key

    out: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        out.extend(
            v for _, v in _index_order([kv for kv in node.items() if isinstance(kv[1], str)])
        )
        for _, child in _index_order([kv for kv in node.items() if isinstance(kv[1], dict)]):
            walk(child)

    walk(tree)
    return out


def from_named(named: NamedOptimizer) -> dict[str, Any]:
    """Back to the file's layout: keyed by name when the file was, else numbered by position.

    Each group lists its parameters in module order (see :func:`module_order`) of its own
    names, which followed the optimizer's order through every step: state is placed by
    name, never by the order of the file's keys.
    """
    state: dict[Any, dict[str, Any]] = {}
    groups = []
    position = 0
    for group in named.groups:
        names = module_order(group["names"])
        keys: list[Any] = (
            list(names) if named.keyed_by_name else list(range(position, position + len(names)))
        )
        position += len(names)
        for key, name in zip(keys, names):
            if name in named.states:
                state[key] = named.states[name]
        out = {k: v for k, v in group.items() if k != "names"}
        if named.wrote_param_names or "param_names" in out:
            out["param_names"] = names
        out["params"] = keys
        groups.append(out)
    return {"state": state, "param_groups": groups, **named.extra}


def follow_trace(
    named: NamedOptimizer,
    trace: Mapping[str, Sequence[str]],
    transformed: Mapping[str, Mapping[str, Any]],
    new_params: set[str],
) -> list[dict[str, Any]]:
    """Carry state through one op or step; return what merging several parameters' state
    into one could not keep as it was (see :func:`merged_state`).

    ``trace`` maps each key after the step to its source keys; ``transformed[field][key]`` is a
    state tensor already pushed through the op (split, transposed, ...). A key no longer
    present loses its state; a key with no source gets none, and joins the first group only
    when it is in ``new_params`` (a new trainable parameter, not a buffer). Each group keeps
    the optimizer's order: a key takes the place of its (first) source.
    """
    new_states: dict[str, dict[str, Any]] = {}
    membership = {name for g in named.groups for name in g["names"]}
    derived: dict[str, list[str]] = {}
    handed_out: set[str] = set()
    merges: list[dict[str, Any]] = []
    for new_key, sources in trace.items():
        sources = [s for s in sources if s in membership]
        if not sources:
            continue
        derived.setdefault(sources[0], []).append(new_key)
        present = [s for s in sources if s in named.states]
        if not present:
            continue
        if len(sources) > 1:
            state, merge = merged_state(named.states, new_key, sources, transformed)
            if merge is not None:
                merges.append(merge)
            if state is not None:
                new_states[new_key] = state
            continue
        first = named.states[present[0]]
        state = {}
        for name, value in first.items():
            moved = transformed.get(name, {})
            if new_key in moved:
                state[name] = moved[new_key]
            elif present[0] in handed_out and hasattr(value, "clone"):
                # a split's parts each get their own ``step``: torch's Adam increments it in place
                state[name] = value.clone()
            else:
                state[name] = value
        handed_out.add(present[0])
        new_states[new_key] = state
    for group in named.groups:
        group["names"] = [new for old in group["names"] for new in derived.get(old, [])]
    # parameters the step added (no source) join the first group, with fresh (no) state
    grouped = {n for g in named.groups for n in g["names"]}
    for key in trace:
        if key in new_params and key not in grouped and not trace[key] and named.groups:
            named.groups[0]["names"].append(key)
    named.states = new_states
    return merges


def scalar(value: Any) -> float | None:
    """``value`` as a number when it is one (``step``: a 0-d tensor or an int), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:
        return float(value.item())
    return None


def merged_state(
    states: Mapping[str, dict[str, Any]],
    new_key: str,
    sources: Sequence[str],
    transformed: Mapping[str, Mapping[str, Any]],
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The state of ``new_key`` made of several parameters' (a stack, a merge), and the record
    of what it could not keep as it was (None when nothing).

    Tensors shaped like the parameter come merged in ``transformed`` (a part that had no state,
    an expert the router never picked, has zero rows there: fresh state, as a padded row's).
    A number such as Adam's ``step`` can be only one: the largest is kept, since an optimizer
    steps a merged tensor whenever any of its parts trains, so the largest is the count the
    merged parameter would have. The parts whose number differs (or that had none) then see
    another bias correction: the record lists them. A field that is neither is kept only when
    every part had state (the first part's, as for one source); else the state starts fresh
    (record ``"kept": None``).
    """
    present = [s for s in sources if s in states]
    fresh = [s for s in sources if s not in states]
    fields = list(dict.fromkeys(f for s in present for f in states[s]))
    state: dict[str, Any] = {}
    differing: dict[str, dict[str, float]] = {}
    kept: dict[str, float] = {}
    for name in fields:
        moved = transformed.get(name, {})
        if new_key in moved:
            state[name] = moved[new_key]
            continue
        values = {s: states[s][name] for s in present if name in states[s]}
        numbers = {s: scalar(v) for s, v in values.items()}
        if all(n is not None for n in numbers.values()):
            top = max(values, key=lambda s: numbers[s])
            state[name] = values[top].clone() if hasattr(values[top], "clone") else values[top]
            if fresh or len(set(numbers.values())) > 1:
                differing[name] = {s: n for s, n in numbers.items() if n is not None}
                kept[name] = numbers[top]  # type: ignore[assignment]
        elif fresh:  # e.g. a factored moment no op merged: no honest value for the fresh parts
            return None, {"key": new_key, "fresh": fresh, "differing": {}, "kept": None}
        else:
            state[name] = values[present[0]]
    if not fresh and not differing:
        return state, None
    return state, {"key": new_key, "fresh": fresh, "differing": differing, "kept": kept}


def fill_fresh_parts(
    named: NamedOptimizer,
    trace: Mapping[str, Sequence[str]],
    fields: dict[str, dict[str, Any]],
    shapes: Mapping[str, tuple[int, ...]],
) -> None:
    """Give the parts of a merge that have no state (an expert never routed) zero tensors in
    each field of ``fields`` (:func:`shaped_state_fields`) their siblings have, so that the
    op merges the others' state instead of failing on the gap."""
    membership = {name for g in named.groups for name in g["names"]}
    for sources in trace.values():
        parts = [s for s in sources if s in membership]
        missing = [s for s in parts if s not in named.states and s in shapes]
        if len(parts) < 2 or not missing or len(missing) == len(parts):
            continue
        for tensors in fields.values():
            like = next((tensors[s] for s in parts if s in tensors), None)
            if like is None:
                continue
            for part in missing:
                tensors[part] = like.new_zeros(shapes[part])


def shaped_state_fields(
    named: NamedOptimizer, param_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, dict[str, Any]]:
    """Per state field, the tensors shaped like their parameter (``exp_avg``; not ``step``)."""
    out: dict[str, dict[str, Any]] = {}
    for name, state in named.states.items():
        shape = param_shapes.get(name)
        for fld, value in state.items():
            if shape is not None and hasattr(value, "shape") and tuple(value.shape) == shape:
                out.setdefault(fld, {})[name] = value
    return out
