"""Running a plan: each step on a private copy, checked, recorded in the history.

``upgrade`` is pure: containers are copied, tensors are shared, and a function step sees its
tensors through a read-only guard, so a step that tries to write into one fails before it
writes (and torch's version counters catch what slips past the guard).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from packaging.version import Version

from .checkpoint import Checkpoint
from .errors import MigrationError, SchemaMismatchError, UnversionedCheckpointError
from .graph import PlannedStep
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


def upgrade(ckpt: Checkpoint, schema: Schema, to: str | Version | None = None) -> Checkpoint:
    """Return ``ckpt`` migrated to ``to`` (default: ``schema.current``); the input is untouched.

    An older ``to`` downgrades through reversible steps. The plan is checked before any step
    runs; a failing step raises :class:`MigrationError` naming it, with the cause chained.

    >>> new = cm.upgrade(ckpt, schema)            # to schema.current
    >>> old = cm.upgrade(new, schema, to="1.0.0")  # back, through inverse ops
    """
    version = check_belongs(ckpt, schema)
    plan = schema.plan(version, to)
    work = ckpt.copy()
    for planned in plan:
        work = apply_step(work, planned, schema)
    return work


def apply_step(ckpt: Checkpoint, planned: PlannedStep, schema: Schema) -> Checkpoint:
    """Apply one planned step to a copy of ``ckpt`` and return the checked, stamped result."""
    action, inverse_fn = planned.step.action

    def fail(problem: str) -> MigrationError:
        return MigrationError(schema.name, planned.source, planned.target, planned.name, problem)

    candidate = ckpt.copy()
    try:
        if isinstance(action, list):
            ops = [op.inverse() for op in reversed(action)] if planned.downgrade else action
            # guarded too: a Call op runs user code that could write into an input tensor
            result = _run_guarded(lambda c: _apply_ops(ops, c), candidate)
        else:
            fn = inverse_fn if planned.downgrade else action
            result = _run_guarded(fn, candidate)
    except MigrationError:
        raise
    except _InPlaceWrite as exc:
        raise fail(str(exc)) from None
    except Exception as exc:
        raise fail(f"{type(exc).__name__}: {exc}") from exc

    problem = _check_result(result, ckpt)
    if problem:
        raise fail(problem)
    result.schema = schema.name
    result.version = planned.target
    result.history.append(
        {
            "from": str(planned.source),
            "to": str(planned.target),
            "step": planned.name,
            "breaking": planned.step.breaking,
            "downgrade": planned.downgrade,
            "applied_at": utc_now(),
            "by": f"ckptmigrate {library_version()}",
        }
    )
    return result


def _apply_ops(ops: list[Any], ckpt: Checkpoint) -> None:
    for op in ops:
        op.apply(ckpt)


def _check_result(result: Any, before: Checkpoint) -> str | None:
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
