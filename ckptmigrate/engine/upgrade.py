"""Running a plan: each step on a private copy, checked, recorded in the history.

``upgrade`` is pure: containers are copied, tensors are shared, and a function step sees its
tensors through a read-only guard (:mod:`.guard`), so a step that tries to write into one fails
before it writes. Runs of composable steps take one pass (:mod:`.composed`); optimizer state
follows its parameters through every step (:mod:`.followers`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from packaging.version import Version

from ..errors import (
    HistoryEditedWarning,
    InPlaceWriteError,
    MigrationError,
    NothingMatched,
    OpMatchedNothingError,
    OptimizerStateMergedWarning,
    ParamNamesUnknownError,
    SchemaMismatchError,
    UnversionedCheckpointError,
)
from ..schema.graph import OpsStep, PlannedStep
from ..schema.history import edited_steps
from ..schema.schema import Schema
from ..values.checkpoint import Checkpoint
from ..values.stamp import history_entry
from .composed import apply_composed, composable_runs
from .followers import OptimizerFollowers
from .guard import run_guarded


def check_belongs(ckpt: Checkpoint, schema: Schema, *, path: object = None) -> Version:
    """The checkpoint's version, once its stamp is known to belong to ``schema``."""
    if ckpt.schema is not None and ckpt.schema != schema.name:
        raise SchemaMismatchError(schema.name, ckpt.schema, path=path)
    if ckpt.version is None:
        raise UnversionedCheckpointError(path=path, schema=schema.name)
    return ckpt.version


def plan_upgrade(
    ckpt: Checkpoint,
    schema: Schema,
    to: str | Version | None = None,
    *,
    origin: object = None,
    path: object = None,
) -> list[PlannedStep]:
    """The checked plan that takes ``ckpt`` (no mounts) to ``to`` (default: current), its
    history's recorded inverses included (:meth:`Schema.plan`); warns
    (:class:`~ckptmigrate.HistoryEditedWarning`) when a step its history says ran has been
    edited since. ``origin`` names the file in the warning, ``path`` in errors."""
    version = check_belongs(ckpt, schema, path=path)
    plan = schema.plan(version, to, history=ckpt.history)
    warn_if_edited(ckpt.history, schema, origin=origin if origin is not None else path)
    return plan


def warn_if_edited(
    history: Sequence[Any], schema: Schema, *, origin: object = None, prefix: str = ""
) -> None:
    """Warn when steps ``history`` says were applied have changed since (their recorded
    digest differs from today's step's); entries without a digest are not judged."""
    edits = edited_steps(schema.graph, history)
    if edits:
        steps = [e.record() for e in edits]
        warnings.warn(
            HistoryEditedWarning(schema.name, steps, path=origin, prefix=prefix), stacklevel=3
        )


def upgrade(
    ckpt: Checkpoint,
    schema: Schema,
    to: str | Version | None = None,
    *,
    param_names: Sequence[str] | None = None,
    origin: object = None,
) -> Checkpoint:
    """Return ``ckpt`` migrated to ``to`` (default: ``schema.current``); the input is untouched.

    An older ``to`` downgrades through reversible steps. The plan is checked before any step
    runs; a failing step raises :class:`MigrationError` naming it, with the cause chained.
    Optimizer state in the checkpoint follows its parameters. Position-keyed state passes
    through steps that only rename; other steps need its names: ``param_names`` (the old
    names in the optimizer's order), else the file's own parameter order once verified.

    >>> new = cm.upgrade(ckpt, schema)            # to schema.current
    >>> old = cm.upgrade(new, schema, to="1.0.0")  # back, through inverse ops

    A checkpoint with mounts has each mount that holds ``schema`` upgraded on its own keys.

    A checkpoint newer than ``schema`` knows goes down to an older ``to`` through the inverses
    its history records (a file upgraded by newer code, written back by older code). A step
    its history says ran that has been edited since is a
    :class:`~ckptmigrate.HistoryEditedWarning` (``origin``: the file, to name it there).
    """
    if ckpt.mounts:
        from .mounts import upgrade_mounts_of

        return upgrade_mounts_of(ckpt, schema, to, param_names=param_names, origin=origin)
    plan = plan_upgrade(ckpt, schema, to, origin=origin)
    return run_plan(ckpt, plan, schema, param_names=param_names)


def run_plan(
    ckpt: Checkpoint,
    plan: Sequence[PlannedStep],
    schema: Schema,
    *,
    param_names: Sequence[str] | None = None,
    progress: Callable[[int, int], Any] | None = None,
    followers: OptimizerFollowers | None = None,
) -> Checkpoint:
    """Apply a checked ``plan`` to a copy of ``ckpt``: what :func:`upgrade` does once planned.

    ``progress(done, total)`` is called as steps finish (a composed run finishes at once).
    ``followers`` carries optimizer state that is not ``ckpt.optimizer`` (a mount's part of
    the file's state, see :mod:`ckptmigrate.engine.mounts`); the caller then writes it back.
    """
    work = ckpt.copy()
    if not plan:
        return work
    own_followers = followers is None
    if followers is None:
        followers = OptimizerFollowers.from_checkpoint(
            work, param_names, buffers=lambda: buffer_keys(work, plan, schema)
        )
    done = 0
    for run, step_ops in composable_runs(plan):
        composed = None
        if step_ops is not None and len(run) > 1:
            composed = apply_composed(work, run, step_ops, schema, followers)
        if composed is not None:
            work, done = composed, done + len(run)
            if progress is not None:
                progress(done, len(plan))
            continue
        for planned in run:
            work = apply_step(work, planned, schema, followers)
            done += 1
            if progress is not None:
                progress(done, len(plan))
    if own_followers:
        followers.write_back(work)
    return work


def apply_step(
    ckpt: Checkpoint,
    planned: PlannedStep,
    schema: Schema,
    followers: OptimizerFollowers | None = None,
) -> Checkpoint:
    """Apply one planned step to a copy of ``ckpt`` and return the checked, stamped result.

    Optimizer state follows the parameters; ``followers`` carries it by name across several
    steps (``upgrade`` passes one), without it the step names and numbers it on its own.
    """
    action = planned.step.action
    own_followers = followers is None
    if followers is None:
        followers = OptimizerFollowers.from_checkpoint(ckpt, None)
    reset: list[str] = []
    followers.step = f"{schema.name} {planned.source} -> {planned.target} ({planned.name})"

    def fail(problem: str) -> MigrationError:
        return MigrationError(schema.name, planned.source, planned.target, planned.name, problem)

    candidate = ckpt.copy()
    trusted = False  # only our own ops ran: their values need no re-check
    try:
        if isinstance(action, OpsStep):
            ops = action.run(planned.downgrade)

            def run_ops(c: Checkpoint) -> None:
                for op in ops:
                    reset.extend(followers.through_op(op, c))

            if any(op.runs_user_code for op in ops):
                result = run_guarded(run_ops, candidate)
            else:  # our own ops write no input tensor: skip the guard's per-tensor cost
                run_ops(candidate)
                result = candidate
                trusted = True
        else:
            result = run_guarded(action.function(planned.downgrade), candidate)
            if isinstance(result, Checkpoint) and isinstance(result.state_dict, dict):
                hook = None if planned.downgrade else action.optimizer_state
                reset.extend(followers.through_function(ckpt, result, hook))
                _follow_module_metadata(ckpt, result)
    except (MigrationError, ParamNamesUnknownError):
        raise
    except InPlaceWriteError as exc:
        raise fail(str(exc)) from None
    except NothingMatched as exc:
        where = (schema.name, planned.source, planned.target, planned.name)
        raise OpMatchedNothingError(*where, **exc.details()) from exc
    except (Exception, SystemExit) as exc:  # a step calling sys.exit() failed, it did not end us
        raise fail(f"{type(exc).__name__}: {exc}") from exc

    problem = None if trusted else _check_result(result)
    if problem:
        raise fail(problem)
    result.schema = schema.name
    result.version = planned.target
    entry = history_entry(planned)
    if reset:
        entry["optimizer_state_reset"] = sorted(set(reset))
        warnings.warn(
            f"migration {schema.name} {planned.source} -> {planned.target} ({planned.name}) "
            f"replaced the tensors of {len(set(reset))} parameter(s) with optimizer state "
            f"({', '.join(sorted(set(reset))[:3])}...): their state starts fresh. Register "
            "optimizer_state= on the migration to carry it over.",
            stacklevel=3,
        )
    merged = followers.take_merged()
    if merged:
        entry["optimizer_state_merged"] = merged
        where = (schema.name, str(planned.source), str(planned.target), planned.name)
        warnings.warn(OptimizerStateMergedWarning(*where, merged), stacklevel=3)
    result.history.append(entry)
    if own_followers:
        followers.write_back(result)
    return result


def _follow_module_metadata(before: Checkpoint, after: Checkpoint) -> None:
    """Per-module versions (``_metadata``) follow the tensors a function moved to a new name."""
    from ..schema.ops import module_renames

    if not after.module_metadata or after.module_metadata != before.module_metadata:
        return  # none, or the step wrote its own
    where = {id(v): k for k, v in before.state_dict.items()}
    moved = {
        where[id(v)]: k
        for k, v in after.state_dict.items()
        if id(v) in where and where[id(v)] != k and where[id(v)] not in after.state_dict
    }
    if moved:
        modules = module_renames(moved)
        after.module_metadata = type(after.module_metadata)(
            (modules.get(prefix, prefix), value) for prefix, value in after.module_metadata.items()
        )


def buffer_keys(ckpt: Checkpoint, plan: Sequence[PlannedStep], schema: Schema) -> set[str] | None:
    """The keys of ``ckpt`` that are buffers of the model ``schema.build`` makes once migrated.

    Runs the plan on a copy without optimizer state and follows each tensor by identity to
    today's model; None when the schema cannot build one.
    """
    if not schema.can_build:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            migrated = run_plan(replace(ckpt, optimizer=None), plan, schema)
            parameters = {name for name, _ in schema.build(migrated.hparams).named_parameters()}
    except Exception:  # the real run reports a failing step; here it only means "unknown"
        return None
    now = {id(v): k for k, v in migrated.state_dict.items()}
    return {k for k, v in ckpt.state_dict.items() if id(v) in now and now[id(v)] not in parameters}


def _check_result(result: Any) -> str | None:
    import torch

    if not isinstance(result, Checkpoint):
        return f"a migration must mutate its Checkpoint or return one, it returned {type(result).__name__}"
    if not isinstance(result.state_dict, dict):
        return f"state_dict became a {type(result.state_dict).__name__}, not a dict"
    for part in ("hparams", "extra", "meta"):
        if not isinstance(getattr(result, part), dict):
            return f"{part} became a {type(getattr(result, part)).__name__}, not a dict"
    for key, value in result.state_dict.items():
        if not isinstance(key, str):
            return f"state_dict key {key!r} is not a string"
        if not isinstance(value, torch.Tensor) and not key.endswith("_extra_state"):
            return f"state_dict[{key!r}] is a {type(value).__name__}, not a tensor"
    return None
