"""Running a plan: each step on a private copy, checked, recorded in the history.

``upgrade`` is pure: containers are copied, tensors are shared, and a function step sees its
tensors through a read-only guard, so a step that tries to write into one fails before it
writes (and torch's version counters catch what slips past the guard).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from .checkpoint import Checkpoint, copy_containers
from .compose import PrefixMap
from .errors import (
    MigrationError,
    NothingMatched,
    OpError,
    OpMatchedNothingError,
    SchemaMismatchError,
    UnversionedCheckpointError,
)
from .graph import OpsStep, PlannedStep
from .ops import HPARAMS, Op
from .optimizer import (
    NamedOptimizer,
    ParamNamesUnknownError,
    carries_names,
    follow_trace,
    from_named,
    is_optimizer_state,
    shaped_state_fields,
    to_named,
)
from .positions import PositionalState, keeps_positions
from .schema import Schema
from .stamp import library_version, utc_now

if TYPE_CHECKING:
    import torch


def check_belongs(ckpt: Checkpoint, schema: Schema, *, path: object = None) -> Version:
    """The checkpoint's version, once its stamp is known to belong to ``schema``."""
    if ckpt.schema is not None and ckpt.schema != schema.name:
        raise SchemaMismatchError(schema.name, ckpt.schema, path=path)
    if ckpt.version is None:
        raise UnversionedCheckpointError(path=path, schema=schema.name)
    return ckpt.version


def upgrade(
    ckpt: Checkpoint,
    schema: Schema,
    to: str | Version | None = None,
    *,
    param_names: Sequence[str] | None = None,
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
    """
    if ckpt.mounts:
        from .mounts import upgrade_mounts_of

        return upgrade_mounts_of(ckpt, schema, to, param_names=param_names)
    version = check_belongs(ckpt, schema)
    return run_plan(ckpt, schema.plan(version, to), schema, param_names=param_names)


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
    the file's state, see :mod:`ckptmigrate.mounts`); the caller then writes it back.
    """
    work = ckpt.copy()
    if not plan:
        return work
    own_followers = followers is None
    if followers is None:
        followers = OptimizerFollowers.from_checkpoint(
            work, param_names, buffers=lambda: _buffer_keys(work, plan, schema)
        )
    done = 0
    for run, step_ops in _runs(plan):
        composed = None
        if step_ops is not None and len(run) > 1:
            composed = _apply_composed(work, run, step_ops, schema, followers)
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


def _step_ops(planned: PlannedStep) -> list[Op] | None:
    """The ops a step runs, when every one composes (prefix renames, hparam ops); else None."""
    ops = planned.ops
    return ops if ops is not None and all(op.composable for op in ops) else None


def _runs(plan: Sequence[PlannedStep]) -> list[tuple[list[PlannedStep], list[list[Op]] | None]]:
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


def _apply_composed(
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
    result.history.extend(_history_entry(planned) for planned in run)
    return result


def _history_entry(planned: PlannedStep) -> dict[str, Any]:
    return {**planned.record(), "applied_at": utc_now(), "by": f"ckptmigrate {library_version()}"}


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
                result = _run_guarded(run_ops, candidate)
            else:  # our own ops write no input tensor: skip the guard's per-tensor cost
                run_ops(candidate)
                result = candidate
                trusted = True
        else:
            result = _run_guarded(action.function(planned.downgrade), candidate)
            if isinstance(result, Checkpoint) and isinstance(result.state_dict, dict):
                hook = None if planned.downgrade else action.optimizer_state
                reset.extend(followers.through_function(ckpt, result, hook))
                _follow_module_metadata(ckpt, result)
    except (MigrationError, ParamNamesUnknownError):
        raise
    except _InPlaceWrite as exc:
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
    entry = _history_entry(planned)
    if reset:
        entry["optimizer_state_reset"] = sorted(set(reset))
        warnings.warn(
            f"migration {schema.name} {planned.source} -> {planned.target} ({planned.name}) "
            f"replaced the tensors of {len(set(reset))} parameter(s) with optimizer state "
            f"({', '.join(sorted(set(reset))[:3])}...): their state starts fresh. Register "
            "optimizer_state= on the migration to carry it over.",
            stacklevel=3,
        )
    result.history.append(entry)
    if own_followers:
        followers.write_back(result)
    return result


def _follow_module_metadata(before: Checkpoint, after: Checkpoint) -> None:
    """Per-module versions (``_metadata``) follow the tensors a function moved to a new name."""
    from .ops import _module_renames

    if not after.module_metadata or after.module_metadata != before.module_metadata:
        return  # none, or the step wrote its own
    where = {id(v): k for k, v in before.state_dict.items()}
    moved = {
        where[id(v)]: k
        for k, v in after.state_dict.items()
        if id(v) in where and where[id(v)] != k and where[id(v)] not in after.state_dict
    }
    if moved:
        modules = _module_renames(moved)
        after.module_metadata = type(after.module_metadata)(
            (modules.get(prefix, prefix), value) for prefix, value in after.module_metadata.items()
        )


def _buffer_keys(ckpt: Checkpoint, plan: Sequence[PlannedStep], schema: Schema) -> set[str] | None:
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


class OptimizerFollowers:
    """The optimizer states of one checkpoint while a plan runs: keyed by name, or kept by
    position (:class:`~ckptmigrate.positions.PositionalState`) until a step needs names."""

    def __init__(self, slots: list[tuple[Any, NamedOptimizer | PositionalState]]) -> None:
        self.slots = slots  # (where it lives in ckpt.optimizer, its state)
        self.step: str | None = None  # the step running, for the error that needs names

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: Checkpoint,
        param_names: Sequence[str] | None,
        buffers: Callable[[], set[str] | None] = lambda: None,
    ) -> OptimizerFollowers:
        slots: list[tuple[Any, NamedOptimizer | PositionalState]] = []
        for where, opt_sd in _optimizer_states(ckpt.optimizer):
            if carries_names(opt_sd):
                slots.append((where, to_named(opt_sd, None)))
            else:
                slots.append((where, PositionalState(opt_sd, ckpt, param_names, buffers)))
        return cls(slots)

    def needs_names(
        self, keys: Sequence[str], trace: dict[str, list[str]], reshapes: bool = False
    ) -> bool:
        """Whether a step mapping ``keys`` by ``trace`` needs position-keyed state's names."""
        if not any(isinstance(slot, PositionalState) for _, slot in self.slots):
            return False
        return reshapes or not keeps_positions(keys, trace)

    def follow(
        self, keys: Sequence[str], trace: dict[str, list[str]], reshapes: bool = False
    ) -> list[NamedOptimizer]:
        """The states keyed by name that must follow this step (naming positional ones first
        when it needs their names); positional state it keeps only notes the renames."""
        needs = self.needs_names(keys, trace, reshapes)
        out = []
        for i, (where, slot) in enumerate(self.slots):
            if isinstance(slot, PositionalState):
                if not needs:
                    slot.follow_renames(trace)
                    continue
                slot = slot.named(self.step)
                self.slots[i] = (where, slot)
            out.append(slot)
        return out

    def through_op(self, op: Op, ckpt: Checkpoint) -> list[str]:
        """Apply ``op`` to ``ckpt`` and carry the optimizer state along."""
        keys = list(ckpt.state_dict)
        if not self.slots or not op.touches(keys):
            if op.runs_user_code and self.slots:
                before = ckpt.copy()
                op.apply(ckpt)
                return self.through_function(before, ckpt, None)
            op.apply(ckpt)
            return []
        trace = op.trace(keys) or {k: [k] for k in keys}
        named_opts = self.follow(keys, trace, reshapes=op.transforms_state)
        shapes = {k: tuple(v.shape) for k, v in ckpt.state_dict.items() if hasattr(v, "shape")}
        op.apply(ckpt)
        new_params = op.new_parameters(keys)
        for named in named_opts:
            transformed: dict[str, dict[str, Any]] = {}
            if op.transforms_state:
                for fld, tensors in shaped_state_fields(named, shapes).items():
                    pseudo = Checkpoint(dict(tensors))
                    try:
                        op.apply(pseudo)
                    except NothingMatched:
                        pass  # no state of this field for the op's keys: it stays as it is
                    except OpError:
                        continue  # e.g. a merge whose parts lack this field: state starts fresh
                    transformed[fld] = pseudo.state_dict
            follow_trace(named, trace, transformed, new_params)
        return []

    def through_function(self, before: Checkpoint, after: Checkpoint, hook: Any) -> list[str]:
        """Follow tensors a function moved unchanged; report parameters whose tensor it replaced.

        For position-keyed state, the function only renamed when its output holds exactly the
        input's tensors (by identity), each once, under names that keep their module order.
        """
        if not self.slots:
            return []
        where = {}
        for key, value in before.state_dict.items():
            where.setdefault(id(value), key)
        trace: dict[str, list[str]] = {}
        replaced = []
        for key, value in after.state_dict.items():
            if id(value) in where:
                trace[key] = [where[id(value)]]
            elif key in before.state_dict:  # same name, new tensor: stays in its group
                trace[key] = [key]
                replaced.append(key)
            else:
                trace[key] = []
        unchanged = len(trace) == len(before.state_dict) and all(s == [k] for k, s in trace.items())
        if unchanged and not replaced:
            return []
        followed = {s for sources in trace.values() for s in sources}
        renamed_and_replaced = any(not sources for sources in trace.values())
        reset = []
        for named in self.follow(list(before.state_dict), trace, reshapes=bool(replaced)):
            mapped = dict(hook(dict(named.states), before, after)) if hook else {}
            # parameters whose tensor left under a new name: the state cannot follow by identity
            vanished = [
                name
                for group in named.groups
                for name in group["names"]
                if name not in followed and name in named.states
            ]
            follow_trace(named, trace, {}, set(mapped))
            for key in replaced:
                if key in named.states and key not in mapped:
                    del named.states[key]
                    reset.append(key)
            if renamed_and_replaced and not mapped:
                reset += vanished
            named.states.update(mapped)
        return reset

    def write_back(self, ckpt: Checkpoint) -> None:
        """Put each state keyed by name back in the file's layout; positional state stays."""
        for where, named in self.slots:
            if isinstance(named, NamedOptimizer):
                ckpt.optimizer = _put(ckpt.optimizer, where, from_named(named))


def _optimizer_states(optimizer: Any) -> list[tuple[Any, Any]]:
    """(where, state_dict) of each torch optimizer state found in ``ckpt.optimizer``."""
    if is_optimizer_state(optimizer):
        return [(None, optimizer)]
    if isinstance(optimizer, list):
        return [(i, o) for i, o in enumerate(optimizer) if is_optimizer_state(o)]
    if isinstance(optimizer, dict):
        return [(k, o) for k, o in optimizer.items() if is_optimizer_state(o)]
    return []


def _put(container: Any, where: Any, value: Any) -> Any:
    if where is None:
        return value
    container[where] = value
    return container


def _check_result(result: Any) -> str | None:
    import torch

    if not isinstance(result, Checkpoint):
        return f"a migration must mutate its Checkpoint or return one, it returned {type(result).__name__}"
    if not isinstance(result.state_dict, dict):
        return f"state_dict became a {type(result.state_dict).__name__}, not a dict"
    if not isinstance(result.hparams, dict):
        return f"hparams became a {type(result.hparams).__name__}, not a dict"
    for key, value in result.state_dict.items():
        if not isinstance(key, str):
            return f"state_dict key {key!r} is not a string"
        if not isinstance(value, torch.Tensor) and not key.endswith("_extra_state"):
            return f"state_dict[{key!r}] is a {type(value).__name__}, not a tensor"
    return None


class _InPlaceWrite(RuntimeError):
    pass


_INPLACE_DUNDERS = frozenset(
    f"__i{op}__"
    for op in ("add sub mul matmul truediv floordiv mod pow lshift rshift and or xor".split())
) | {"__setitem__", "__set__"}
_HARMLESS_INPLACE = frozenset({"requires_grad_", "retain_grad", "share_memory_"})


def _writes_in_place(func: Any, args: tuple, kwargs: dict) -> bool:
    name = getattr(func, "__name__", "")
    target_guarded = bool(args) and isinstance(args[0], _guard_class())
    if target_guarded and name in _INPLACE_DUNDERS:
        return True
    if target_guarded and name.endswith("_") and not name.startswith("_"):
        return name not in _HARMLESS_INPLACE
    out = kwargs.get("out")
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return any(isinstance(o, _guard_class()) for o in outs)


_GUARD: Any = None
_GUARDED_STORAGES: set[int] = set()


def _guard_class() -> Any:
    """The read-only tensor subclass, built on first use so that importing stays torch-free."""
    global _GUARD
    if _GUARD is None:
        import torch

        class ReadOnlyTensor(torch.Tensor):
            """A tensor of the input that a migration may read but not write."""

            @classmethod
            def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore
                kwargs = kwargs or {}
                if _writes_in_place(func, args, kwargs):
                    name = getattr(func, "__name__", repr(func))
                    raise _InPlaceWrite(
                        f"it writes into an input tensor in place ({name}); build a new tensor "
                        "instead (e.g. t.clone(), torch.cat, t * 2), so that the input stays as it was"
                    )
                with torch._C.DisableTorchFunctionSubclass():
                    out = func(*args, **kwargs)
                return _rewrap(out)

        _GUARD = ReadOnlyTensor
    return _GUARD


def _storage_id(tensor: torch.Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


def _rewrap(out: Any) -> Any:
    """Results that alias an input's memory stay guarded; fresh tensors come back plain."""
    import torch

    if isinstance(out, torch.Tensor) and not isinstance(out, _GUARD):
        sid = _storage_id(out)
        if sid and sid in _GUARDED_STORAGES:
            return out.as_subclass(_GUARD)
        return out
    if isinstance(out, (tuple, list)):
        return type(out)(_rewrap(o) for o in out)
    if type(out).__module__ == "numpy" and hasattr(out, "flags"):
        out.flags.writeable = False  # t.numpy() shares memory and bypasses the version counter
    return out


def _run_guarded(fn: Any, ckpt: Checkpoint) -> Any:
    """Call ``fn(ckpt)`` with the checkpoint's tensors behind the read-only guard."""
    import torch

    guard = _guard_class()
    originals: dict[int, torch.Tensor] = {}
    wrapped: dict[int, Any] = {}
    versions: list[tuple[str, torch.Tensor, int]] = []

    def wrap(value: torch.Tensor, label: str) -> Any:
        if isinstance(value, guard):
            return value
        if id(value) not in wrapped:
            w = value.as_subclass(guard)
            wrapped[id(value)] = w
            originals[id(w)] = value
            versions.append((label, value, value._version))
            sid = _storage_id(value)
            if sid:
                _GUARDED_STORAGES.add(sid)
        return wrapped[id(value)]

    ckpt.state_dict = {
        key: wrap(value, key) if isinstance(value, torch.Tensor) else value
        for key, value in ckpt.state_dict.items()
    }
    # optimizer state, extra entries and hparams share their tensors with the input too
    for slot in _OTHER_SLOTS:
        setattr(ckpt, slot, _map_tensors(getattr(ckpt, slot), lambda t, s=slot: wrap(t, s)))
    try:
        result = fn(ckpt)
    finally:
        _GUARDED_STORAGES.clear()
    result = ckpt if result is None else result
    if isinstance(result, Checkpoint):
        if isinstance(result.state_dict, dict):
            result.state_dict = {
                k: _unwrap(v, originals, guard) for k, v in result.state_dict.items()
            }
        for slot in _OTHER_SLOTS:
            value = getattr(result, slot)
            setattr(result, slot, _map_tensors(value, lambda t: _unwrap(t, originals, guard)))
    changed = [key for key, tensor, version in versions if tensor._version != version]
    if changed:
        raise _InPlaceWrite(f"it wrote into input tensor {changed[0]!r} in place")
    return result


_OTHER_SLOTS = ("optimizer", "extra", "hparams", "meta")


def _map_tensors(value: Any, fn: Any) -> Any:
    """Replace every tensor in (the step's private copies of) nested containers by fn(tensor)."""
    import torch

    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        for key in value:
            value[key] = _map_tensors(value[key], fn)
        return value
    if isinstance(value, list):
        value[:] = [_map_tensors(v, fn) for v in value]
        return value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_map_tensors(v, fn) for v in value)
    return value


def _unwrap(value: Any, originals: dict[int, Any], guard: Any) -> Any:
    import torch

    if isinstance(value, guard):
        original = originals.get(id(value))
        return original if original is not None else value.as_subclass(torch.Tensor)
    return value
