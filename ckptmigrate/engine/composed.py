"""The composed fast path: a run of prefix-rename and hparam steps in one pass over the keys.

Each op says whether it composes (:attr:`~ckptmigrate.ops.Op.composable`); a run of such steps
is applied at once with :class:`~ckptmigrate.compose.PrefixMap`, with the result, history and
optimizer state of applying them one by one, or not at all (the caller then runs them singly).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ..schema.compose import PrefixMap
from ..schema.graph import PlannedStep
from ..schema.ops import HPARAMS, Op
from ..schema.schema import Schema
from ..values.checkpoint import Checkpoint, copy_containers
from ..values.stamp import history_entry
from .followers import OptimizerFollowers
from .optimizer import follow_trace

__all__ = ["apply_composed", "composable_runs"]


def _step_ops(planned: PlannedStep) -> list[Op] | None:
    """The ops a step runs, when every one composes (prefix renames, hparam ops); else None."""
    ops = planned.ops
    return ops if ops is not None and all(op.composable for op in ops) else None


def composable_runs(
    plan: Sequence[PlannedStep],
) -> list[tuple[list[PlannedStep], list[list[Op]] | None]]:
    """The plan cut into runs of composable steps (with each step's ops), and other steps."""
    runs: list[tuple[list[PlannedStep], list[list[Op]] | None]] = []
    for planned in plan:
        ops = _step_ops(planned)
        if ops is not None and runs and runs[-1][1] is not None:
            runs[-1][0].append(planned)
            runs[-1][1].append(ops)
        else:
            runs.append(([planned], None if ops is None else [ops]))
    return runs


def apply_composed(
    ckpt: Checkpoint,
    run: list[PlannedStep],
    step_ops: list[list[Op]],
    schema: Schema,
    followers: OptimizerFollowers,
) -> Checkpoint | None:
    """Apply a run of prefix-rename/hparam steps with one pass over the keys, or return None.

    The result, history and optimizer state are those of applying the steps one by one.
    None (nothing changed) when the composite cannot vouch for that: a rename that renames no
    key (it may have a check to make), two keys or two modules that collide, a key with a
    newline, a module that would pass through the root; the step-by-step path then gives the
    exact result or error.
    """
    rules = PrefixMap()
    pairs = [pair for ops in step_ops for op in ops if (pair := op.prefix_rename()) is not None]
    for n, pair in enumerate(pairs):  # each rename on its own: every one must rename a key
        rules.then(*pair, step=n)
    keys = list(ckpt.state_dict)
    if rules.too_big or not all(isinstance(k, str) for k in keys) or "\n" in "".join(keys):
        return None
    if ckpt.module_metadata and not all(len(new) > 1 and new.endswith(".") for _, new in pairs):
        return None  # a module renamed to the root ("") merges into it one by one
    new_keys, fired = rules.apply(keys)
    if len(fired) != len(pairs) or len(set(new_keys)) != len(new_keys):
        return None
    trace = {new: [old] for old, new in zip(keys, new_keys)}
    if followers.needs_names(keys, trace):
        return None  # step by step, each step's own renames decide, and an error names it
    modules = ckpt.module_metadata
    if modules:
        move = rules.module_renamer()
        modules = type(modules)((move(prefix), value) for prefix, value in modules.items())
        if len(modules) != len(ckpt.module_metadata):
            return None  # two modules became one: which value wins depends on the order
    # new containers for what the run changes; the rest is shared with ``ckpt``, left as it was
    result = replace(
        ckpt,
        state_dict=dict(zip(new_keys, ckpt.state_dict.values())),
        hparams=copy_containers(ckpt.hparams),
        history=[dict(h) for h in ckpt.history],
        module_metadata=modules,
    )
    try:
        for ops in step_ops:
            for op in ops:
                if op.acts_on == {HPARAMS}:
                    op.apply(result)  # independent of the keys
    except Exception:
        return None
    if pairs:
        for named in followers.follow(keys, trace):
            follow_trace(named, trace, {}, set())
    result.schema = schema.name
    result.version = run[-1].target
    result.history.extend(history_entry(planned) for planned in run)
    return result
