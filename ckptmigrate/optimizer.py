"""Optimizer state that follows its parameters through a migration.

torch keys optimizer state by position (``state[3]``, ``param_groups[i]["params"]``); a
migration renames, splits, drops and adds parameters by name. We move to names at the start of
an upgrade (from the ``param_names`` recent torch writes into each group, or from the caller's
``param_names=``; never guessed), let each step carry the per-parameter state along (a rename
moves it, a split splits it along the same dim, a dropped parameter drops it, a new one gets
none), and go back to positions in the migrated state_dict's order at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import Checkpoint
from .errors import CkptMigrateError

#: A step's hook for function migrations: (states by name, before, after) -> states by name.
OptimizerHook = Callable[[dict[str, dict[str, Any]], Checkpoint, Checkpoint], dict[str, dict]]


class ParamNamesUnknown(CkptMigrateError, ValueError):
    """The optimizer state is keyed by position and nothing says which name each one is."""


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


@dataclass
class NamedOptimizer:
    """One optimizer's state keyed by parameter name."""

    states: dict[str, dict[str, Any]]
    groups: list[dict[str, Any]]  # options + "names": [...]
    wrote_param_names: bool
    extra: dict[str, Any] = field(default_factory=dict)


def to_named(opt_sd: Mapping[str, Any], param_names: Sequence[str] | None) -> NamedOptimizer:
    """Key one optimizer state_dict by parameter name."""
    groups = []
    position_name: dict[Any, str] = {}
    wrote = all("param_names" in g for g in opt_sd["param_groups"])
    flat_names = list(param_names) if param_names is not None else None
    cursor = 0
    for group in opt_sd["param_groups"]:
        positions = list(group["params"])
        if "param_names" in group:
            names = list(group["param_names"])
        elif flat_names is not None:
            names = flat_names[cursor : cursor + len(positions)]
        else:
            raise ParamNamesUnknown(
                "the optimizer state is keyed by position only, and the migration renames, splits "
                "or drops parameters, so each position's name must be known: pass "
                "param_names=[...] (the names of model.named_parameters() in the order the "
                "optimizer got them), or save the optimizer from torch.optim.X("
                "model.named_parameters()) so that its state_dict carries param_names"
            )
        if len(names) != len(positions):
            raise ParamNamesUnknown(
                f"param_names gives {len(names)} names for a group of {len(positions)} parameters"
            )
        cursor += len(positions)
        position_name.update(zip(positions, names))
        groups.append({**group, "names": names})  # keeps torch's key order for write-back
    states = {position_name[pos]: dict(st) for pos, st in opt_sd["state"].items()}
    extra = {k: v for k, v in opt_sd.items() if k not in ("state", "param_groups")}
    return NamedOptimizer(states, groups, wrote, extra)


def module_order(keys: Sequence[str]) -> list[str]:
    """``keys`` in the order ``nn.Module`` would list them: a module's own entries, then its
    children's, each child where it first appears.

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
        node[leaf] = key

    out: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        out.extend(v for v in node.values() if isinstance(v, str))
        for child in node.values():
            if isinstance(child, dict):
                walk(child)

    walk(tree)
    return out


def from_named(named: NamedOptimizer, order: Sequence[str]) -> dict[str, Any]:
    """Back to torch's positional layout, numbering each group's parameters in module order
    (see :func:`module_order`) of ``order``, the migrated state_dict's keys."""
    rank = {name: i for i, name in enumerate(module_order(order))}
    state: dict[int, dict[str, Any]] = {}
    groups = []
    position = 0
    for group in named.groups:
        names = sorted(group["names"], key=lambda n: rank.get(n, len(rank)))
        positions = list(range(position, position + len(names)))
        position += len(names)
        for pos, name in zip(positions, names):
            if name in named.states:
                state[pos] = named.states[name]
        out = {k: v for k, v in group.items() if k != "names"}
        if named.wrote_param_names:
            out["param_names"] = names
        out["params"] = positions
        groups.append(out)
    return {"state": state, "param_groups": groups, **named.extra}


def follow_trace(
    named: NamedOptimizer,
    trace: Mapping[str, Sequence[str]],
    transformed: Mapping[str, Mapping[str, Any]],
    new_params: set[str],
) -> None:
    """Carry state through one op or step.

    ``trace`` maps each key after the step to its source keys; ``transformed[field][key]`` is a
    state tensor already pushed through the op (split, transposed, ...). A key no longer
    present loses its state; a key with no source gets none, and joins the first group only
    when it is in ``new_params`` (a new trainable parameter, not a buffer).
    """
    new_states: dict[str, dict[str, Any]] = {}
    membership = {name: gi for gi, g in enumerate(named.groups) for name in g["names"]}
    new_members: dict[int, list[str]] = {gi: [] for gi in range(len(named.groups))}
    handed_out: set[str] = set()
    for new_key, sources in trace.items():
        sources = [s for s in sources if s in membership]
        if not sources:
            continue
        new_members[membership[sources[0]]].append(new_key)
        if not all(s in named.states for s in sources):
            continue
        first = named.states[sources[0]]
        state = {}
        for name, value in first.items():
            moved = transformed.get(name, {})
            if new_key in moved:
                state[name] = moved[new_key]
            elif sources[0] in handed_out and hasattr(value, "clone"):
                # a split's parts each get their own ``step``: torch's Adam increments it in place
                state[name] = value.clone()
            else:
                state[name] = value
        handed_out.add(sources[0])
        new_states[new_key] = state
    # parameters the step added (no source) join the first group, with fresh (no) state
    grouped = {n for names in new_members.values() for n in names}
    for key in trace:
        if key in new_params and key not in grouped and not trace[key] and named.groups:
            new_members[0].append(key)
    for gi, group in enumerate(named.groups):
        group["names"] = new_members[gi]
    named.states = new_states


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
