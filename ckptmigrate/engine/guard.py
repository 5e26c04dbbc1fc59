"""The read-only guard a function step runs behind.

A step gets the input's tensors as :class:`ReadOnlyTensor` views: an in-place write into one
(``t.add_(1)``, ``t[0] = 1``, ``out=t``) raises before it writes, views of an input stay
guarded, fresh results come back plain, and torch's version counters catch what slips past.
The set of guarded storages belongs to the call, not the process.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from ..errors import InPlaceWriteError
from ..values.checkpoint import Checkpoint

if TYPE_CHECKING:
    import torch

__all__ = ["guard_class", "run_guarded"]

_INPLACE_DUNDERS = frozenset(
    f"__i{op}__"
    for op in ("add sub mul matmul truediv floordiv mod pow lshift rshift and or xor".split())
) | {"__setitem__", "__set__"}
_HARMLESS_INPLACE = frozenset({"requires_grad_", "retain_grad", "share_memory_"})


def _writes_in_place(func: Any, args: tuple, kwargs: dict) -> bool:
    name = getattr(func, "__name__", "")
    target_guarded = bool(args) and isinstance(args[0], guard_class())
    if target_guarded and name in _INPLACE_DUNDERS:
        return True
    if target_guarded and name.endswith("_") and not name.startswith("_"):
        return name not in _HARMLESS_INPLACE
    out = kwargs.get("out")
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return any(isinstance(o, guard_class()) for o in outs)


_GUARD: Any = None
#: The storages of the call running in this thread (or task): views of them stay guarded. Per
#: call, so two threads' upgrades never see, or clear, each other's.
_GUARDED: ContextVar[frozenset[int] | set[int]] = ContextVar(
    "ckptmigrate_guarded", default=frozenset()
)


def guard_class() -> Any:
    """The read-only tensor subclass, built on first use so that importing stays torch-free."""
    global _GUARD
    if _GUARD is None:
        import torch

        class ReadOnlyTensor(torch.Tensor):
            """A tensor of the input that a migration may read but not write."""

            @classmethod
            def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore
                if any(getattr(t, "_ckptmigrate_on_touch", False) for t in types):
                    return NotImplemented  # a DCP tensor not read yet: it reads, then calls us
                kwargs = kwargs or {}
                if _writes_in_place(func, args, kwargs):
                    name = getattr(func, "__name__", repr(func))
                    raise InPlaceWriteError(
                        f"it writes into an input tensor in place ({name}); build a new tensor "
                        "instead (e.g. t.clone(), torch.cat, t * 2), so that the input stays as it was"
                    )
                with torch._C.DisableTorchFunctionSubclass():
                    out = func(*args, **kwargs)
                return _rewrap(out)

            def __deepcopy__(self, memo: dict[int, Any]) -> torch.Tensor:
                # a deep copy is the step's own: plain, writable (torch's default deep copy
                # of a subclass needs new_empty to return the subclass, and failed)
                if id(self) not in memo:
                    plain = self.as_subclass(torch.Tensor)
                    # kept alive with the memo (as copy's own keep-alive list does): torch
                    # memoises the copy under plain's id, which a later temporary would reuse
                    memo.setdefault(id(memo), []).append(plain)  # type: ignore[attr-defined]
                    with torch._C.DisableTorchFunctionSubclass():
                        memo[id(self)] = torch.Tensor.__deepcopy__(plain, memo)
                return memo[id(self)]

            # printed, formatted and pickled as the plain tensor it is a view of
            def __repr__(self, *args: Any, **kwargs: Any) -> str:
                return repr(self.as_subclass(torch.Tensor))

            def __format__(self, spec: str) -> str:
                return format(self.as_subclass(torch.Tensor), spec)

            def __reduce_ex__(self, protocol: Any) -> Any:
                return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)

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
        if sid and sid in _GUARDED.get():
            return out.as_subclass(_GUARD)
        return out
    if isinstance(out, (tuple, list)):
        return type(out)(_rewrap(o) for o in out)
    if type(out).__module__ == "numpy" and hasattr(out, "flags"):
        out.flags.writeable = False  # t.numpy() shares memory and bypasses the version counter
    return out


def run_guarded(fn: Any, ckpt: Checkpoint) -> Any:
    """Call ``fn(ckpt)`` with the checkpoint's tensors behind the read-only guard."""
    import torch

    guard = guard_class()
    originals: dict[int, torch.Tensor] = {}
    wrapped: dict[int, Any] = {}
    versions: list[tuple[str, torch.Tensor, int]] = []
    storages: set[int] = set()

    touched: list[Any] = []  # a DCP folder's tensors, read when the step first uses them

    def wrap(value: torch.Tensor, label: str, source: Any = None) -> Any:
        if isinstance(value, guard):
            return value
        if getattr(value, "_ckptmigrate_on_touch", False):  # guarded once read (.ontouch)
            value.guard_with(lambda read, on=value: wrap(read, label, on))  # type: ignore[attr-defined]
            touched.append(value)
            return value
        if id(value) not in wrapped:
            w = value.as_subclass(guard)
            wrapped[id(value)] = w
            originals[id(w)] = value if source is None else source  # the input, as it came
            versions.append((label, value, value._version))
            sid = _storage_id(value)
            if sid:
                storages.add(sid)
        return wrapped[id(value)]

    ckpt.state_dict = {
        key: wrap(value, key) if isinstance(value, torch.Tensor) else value
        for key, value in ckpt.state_dict.items()
    }
    # optimizer state, extra entries and hparams share their tensors with the input too
    for slot in _OTHER_SLOTS:
        setattr(ckpt, slot, _map_tensors(getattr(ckpt, slot), lambda t, s=slot: wrap(t, s)))
    token = _GUARDED.set(storages)
    try:
        result = fn(ckpt)
    finally:
        _GUARDED.reset(token)
        for value in touched:
            value.guard_with(None)
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
        raise InPlaceWriteError(f"it wrote into input tensor {changed[0]!r} in place")
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
    if isinstance(value, tuple):
        items = [_map_tensors(v, fn) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


def _unwrap(value: Any, originals: dict[int, Any], guard: Any) -> Any:
    import torch

    if isinstance(value, guard):
        original = originals.get(id(value))
        return original if original is not None else value.as_subclass(torch.Tensor)
    return value
