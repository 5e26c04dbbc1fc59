"""Tensors whose values are read or computed only when a writer asks for them, one at a time.

A plan of our own tensor ops (``Split``, ``Merge``, ``Cast``...) runs on a checkpoint whose
tensors are :class:`Deferred`: each knows its shape and dtype (a ``meta`` tensor) and how to
produce its values (read it from the file, or apply a torch call to its inputs' values). A
torch call on them runs on the meta tensors only, to learn its result's shape and dtype, and
returns new :class:`Deferred` results that remember the call. Nothing is read while the plan
runs; afterwards :func:`settle` says which tensors are the file's own, untouched (their stored
bytes are kept) and which are new (computed by the writer when it writes them, one at a
time: the inputs of one result and the result in memory, nothing else).

Function steps and ops that run caller code run on them too, behind the read-only guard: a
write into an input is refused with the guard's :class:`~ckptmigrate.errors.InPlaceWriteError`;
a write into a tensor the step computed is replayed on its values when it is written; values
Python needs (``.item()``, ``if t.max() > 1:``) are computed on the spot when small; a call
draws its random numbers when made; plain tensors a call takes are copied when it takes them.
What cannot be replayed (an address, a large tensor's values) is refused and recorded
(:func:`replaying`), and the plan then takes the loaded path, even where the step caught it.

>>> ckpt, settle = defer_dcp(source.path, source.stubs)  # doctest: +SKIP
>>> new = settle(plan.run(ckpt))  # kept: the file's stubs; new: NewTensor(..., compute)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import CkptMigrateError, InPlaceWriteError, NotReplayableError
from ..formats.dcp_tensors import NewTensor
from ..values.checkpoint import Checkpoint
from ..values.tensorinfo import TensorStub
from .guard import guard_active, in_place_message, writes_into_guarded, written_tensors

__all__ = ["Deferred", "defer_dcp", "deferrable", "replaying"]


class Deferred(torch.Tensor):
    """A tensor of known shape and dtype whose values ``produce()`` returns when asked."""

    _produce: Callable[[], torch.Tensor]
    #: the file's own tensor, or a view of one: a write into it is a write into the input
    _of_input: bool
    #: a view of another deferred tensor, or viewed by one: a write into it would have to
    #: show in the other, which a replay does not do
    _shared: bool
    #: for the read-only guard: a deferred tensor refuses writes into it itself
    guards_itself = True

    @staticmethod
    def __new__(
        cls, meta: torch.Tensor, produce: Callable[[], torch.Tensor], of_input: bool = False
    ) -> Deferred:
        out = torch.Tensor._make_subclass(cls, meta)
        out._produce = produce
        out._of_input = of_input
        out._shared = False
        return out

    def produce(self) -> torch.Tensor:
        """The values: read, or computed from the inputs' values (a plain CPU tensor)."""
        return self._produce()

    def as_input(self) -> Deferred:
        """Mark it an input of the step about to run (it is in the checkpoint the step gets):
        a write into it, or into a view of it, is a write into an input."""
        self._of_input = True
        return self

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        written = written_tensors(func, args, kwargs)
        if written:
            return _write_in_place(func, name, args, kwargs, written)
        if name == "__get__":  # a property: where the values are is the CPU, as when loaded
            prop = getattr(getattr(func, "__self__", None), "__name__", "")
            if prop in _AS_LOADED:
                return _AS_LOADED[prop]
        if name in _MEMORY:
            _refuse(f"{name} asks where a deferred tensor's memory lies")
        if name in _SHOWN:  # ``print(t)`` in a step: the values, as loaded (one tensor read)
            with torch._C.DisableTorchFunctionSubclass():
                return func(*tree_map(_produced, args), **tree_map(_produced, kwargs))
        if _draws_random(name, args, kwargs):  # computed later, it would draw other numbers
            return _with_values(func, name, args, kwargs)
        if name == "cpu" and len(args) == 1 and not kwargs and isinstance(args[0], Deferred):
            return args[0]  # on the CPU already, as a loaded tensor is: the same tensor
        metas: dict[int, Deferred] = {}

        def as_meta(value: Any) -> Any:
            if isinstance(value, Deferred):
                meta = value.as_subclass(torch.Tensor)
                metas[id(meta)] = value
                return meta
            if isinstance(value, torch.Tensor):
                return value.to("meta")
            return value

        meta_args = tree_map(as_meta, args)
        meta_kwargs = tree_map(as_meta, kwargs)
        if "device" in meta_kwargs:
            meta_kwargs["device"] = _cpu_as_meta(meta_kwargs["device"])
        if name == "to":
            meta_args = (meta_args[0], *map(_cpu_as_meta, meta_args[1:]))
        try:
            with torch._C.DisableTorchFunctionSubclass():
                planned = func(*meta_args, **meta_kwargs)
        except CkptMigrateError:
            raise
        except Exception:  # it needs the values (``.item()``, ``nonzero``, ``.numpy()``)
            return _with_values(func, name, args, kwargs)
        flat, _ = tree_flatten(planned)
        if not any(isinstance(t, torch.Tensor) for t in flat):
            return planned  # a shape, a dtype, a dim: known without the values
        if isinstance(planned, torch.Tensor) and id(planned) in metas:
            return metas[id(planned)]  # ``t.contiguous()``, ``t.to(t.dtype)``: t itself
        viewed: dict[int | None, list[Deferred]] = {}
        for v in tree_flatten((args, kwargs))[0]:
            if isinstance(v, Deferred):
                viewed.setdefault(_storage_key(v), []).append(v)
        viewed.pop(None, None)
        # plain tensors the call takes are copied now, and deferred ones taken as they are
        # now: the step may write into them later
        args, kwargs = _captured(args), _captured(kwargs)

        def made(t: torch.Tensor, produce: Callable[[], torch.Tensor]) -> Deferred:
            out = Deferred(t, produce)
            for base in viewed.get(_storage_key(t), ()) if viewed else ():
                out._of_input |= base._of_input
                out._shared = base._shared = True
            return out

        def compute() -> Any:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*tree_map(_produced, args), **tree_map(_produced, kwargs))

        if func is torch.cat and isinstance(planned, torch.Tensor) and "out" not in kwargs:
            return Deferred(planned, _concatenate(planned, args, kwargs))
        if isinstance(planned, torch.Tensor):
            return made(planned, compute)
        if isinstance(planned, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in planned):
            parts = [made(t, _pick(compute, i)) for i, t in enumerate(planned)]
            return parts if isinstance(planned, list) else type(planned)(parts)
        _refuse(f"{getattr(func, '__name__', func)} returns {type(planned)}")


#: Properties whose meta answer differs from a loaded tensor's: answered as loaded.
_AS_LOADED: dict[str, Any] = {"device": torch.device("cpu"), "is_meta": False, "is_cpu": True}
#: Calls about the memory behind a tensor (tied weights found by ``data_ptr()``): a deferred
#: tensor has none, so the plan takes the loaded path.
_MEMORY = frozenset(
    {"data_ptr", "untyped_storage", "storage", "_typed_storage", "is_shared", "is_set_to"}
    | {"__dlpack__", "__dlpack_device__", "_cdata"}
)

#: Calls that show a tensor's values as text: a string, however large the tensor.
_SHOWN = frozenset({"__repr__", "__str__", "__format__"})
#: Calls that draw from a random generator: run when called (on the values), as loaded.
_RANDOM = frozenset(
    {"bernoulli", "multinomial", "normal", "poisson", "binomial", "rrelu", "gumbel_softmax"}
    | {"dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d"}
    | {"dropout3d", "native_dropout", "_standard_gamma", "_sample_dirichlet"}
)


def _draws_random(name: str, args: Any, kwargs: Any) -> bool:
    if name in _RANDOM or name.startswith("rand"):
        return True
    return any(isinstance(v, torch.Generator) for v in tree_flatten((args, kwargs))[0])


#: What the deferral refused while a plan ran (:func:`replaying`): the plan then takes the
#: loaded path, even where the step caught the error itself.
_REFUSED: ContextVar[list[str] | None] = ContextVar("ckptmigrate_refused", default=None)


def _refuse(why: str) -> NoReturn:
    refused = _REFUSED.get()
    if refused is not None:
        refused.append(why)
    raise NotReplayableError(why)


@contextmanager
def replaying() -> Iterator[list[str]]:
    """Collect what the deferral refuses while a plan runs on deferred tensors (each reason):
    non-empty, the plan's result is not to be used."""
    refused: list[str] = []
    token = _REFUSED.set(refused)
    try:
        yield refused
    finally:
        _REFUSED.reset(token)


def _write_in_place(func: Any, name: str, args: Any, kwargs: Any, written: list[Any]) -> Any:
    """An in-place call that involves a deferred tensor. Into an input: the guard's error.
    Into a tensor the step computed (``w = v * 2; w[0] = 0``): replayed, once it is written,
    on its values (:func:`_replay_into`). Into a plain tensor the step made
    (``new[:n] = old``): run now, on the values."""
    if writes_into_guarded(func, args, kwargs):  # a mapped input's, behind the guard
        raise InPlaceWriteError(in_place_message(func))
    for target in written:
        if isinstance(target, Deferred):
            if target._of_input and guard_active():
                raise InPlaceWriteError(in_place_message(func))
            if target._of_input or len(written) > 1 or target is not args[0]:
                _refuse(f"{name or func} writes into a deferred tensor")
            return _replay_into(target, func, name, args, kwargs)
    with torch._C.DisableTorchFunctionSubclass():
        return func(*tree_map(_produced, args), **tree_map(_produced, kwargs))


#: In-place calls that change a tensor's shape, storage or autograd state, and random draws
#: (made later, they would draw other numbers): never replayed on a computed tensor.
_NOT_REPLAYED = frozenset(
    {"__set__", "set_", "resize_", "resize_as_", "as_strided_", "squeeze_", "unsqueeze_"}
    | {"t_", "transpose_", "swapdims_", "swapaxes_", "detach_", "share_memory_"}
)
_DRAWN = ("normal", "uniform", "bernoulli", "random", "exponential", "geometric", "cauchy")
_DRAWN += ("orthogonal", "sparse", "dropout", "rrelu")


def _replay_into(target: Deferred, func: Any, name: str, args: Any, kwargs: Any) -> Any:
    """``func`` writes into ``target``, a tensor the step computed: its values become the
    old ones with the write replayed on them. Deferred tensors that took ``target`` before
    took its old values (:func:`_captured`); one sharing its memory (a view) is refused."""
    if (
        target._shared
        or name in _NOT_REPLAYED
        or any(word in name for word in _DRAWN)
        or _draws_random(name, args, kwargs)
    ):
        _refuse(f"{name or func} writes into a deferred tensor that cannot take it later")
    with torch._C.DisableTorchFunctionSubclass():
        meta = torch.empty_like(target)
        rest, kw = tree_map(_meta_of, args[1:]), tree_map(_meta_of, kwargs)
        try:
            func(meta, *rest, **kw)  # checked on a copy's shape: its own stays as it is
        except Exception:
            _refuse(f"{name or func} into a deferred tensor cannot be planned")
        if meta.shape != target.shape or meta.dtype != target.dtype:
            _refuse(f"{name or func} changes a deferred tensor's shape or dtype")
    old = target._produce
    rest, kw = _captured(tuple(args[1:])), _captured(kwargs)

    def produce() -> torch.Tensor:
        values = old()
        with torch._C.DisableTorchFunctionSubclass():
            func(values, *tree_map(_produced, rest), **tree_map(_produced, kw))
        return values

    target._produce = produce
    return None if name == "__setitem__" else target


def _meta_of(value: Any) -> Any:
    if isinstance(value, Deferred):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    return value


class _Taken:
    """A deferred tensor as a call took it: how its values were to be made then."""

    __slots__ = ("produce",)

    def __init__(self, produce: Callable[[], torch.Tensor]) -> None:
        self.produce = produce


def _captured(tree: Any) -> Any:
    """A call's arguments as it took them: plain tensors copied (:func:`_snapshot`),
    deferred ones by how their values are made now (:class:`_Taken`)."""

    def take(value: Any) -> Any:
        if isinstance(value, Deferred):
            return _Taken(value._produce)
        return _snapshot(value)

    return tree_map(take, tree)


def _cpu_as_meta(value: Any) -> Any:
    if isinstance(value, (str, torch.device)):
        try:
            device = torch.device(value)
        except (RuntimeError, TypeError, ValueError):
            return value
        return torch.device("meta") if device.type == "cpu" else value
    return value


def _is_input(value: Any) -> bool:
    return isinstance(value, Deferred) and value._of_input


def _storage_key(tensor: Any) -> int | None:
    """Which storage ``tensor`` views (a meta tensor's too): views of one tensor share it."""
    if not isinstance(tensor, torch.Tensor):
        return None
    try:
        with torch._C.DisableTorchFunctionSubclass():
            return int(torch.Tensor.untyped_storage(tensor)._cdata)
    except (RuntimeError, NotImplementedError):
        return None


def _snapshot(value: Any) -> Any:
    """A plain tensor a deferred call takes, copied: computed later, the call must see the
    values it saw, not what the step wrote into the tensor since."""
    if isinstance(value, torch.Tensor) and not isinstance(value, Deferred):
        with torch._C.DisableTorchFunctionSubclass():
            if value.is_meta:
                _refuse("a deferred call takes a tensor on the meta device")
            return value.detach().clone()
    return value


#: A call that needs a deferred tensor's values (``step.item()`` of an optimizer's state) reads
#: them when the tensors it touches hold at most this many elements; a larger one makes the
#: plan take the loaded path.
VALUES_READ_NOW = 1 << 16


def _with_values(func: Any, name: str, args: Any, kwargs: Any) -> Any:
    deferred = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Deferred)]
    if sum(t.numel() for t in deferred) > VALUES_READ_NOW:
        _refuse(f"{name or func} needs the values of a large deferred tensor")
    with torch._C.DisableTorchFunctionSubclass():
        out = func(*tree_map(_produced, args), **tree_map(_produced, kwargs))
    if type(out).__module__ == "numpy" and hasattr(out, "flags") and any(map(_is_input, deferred)):
        out.flags.writeable = False  # as an input's ``.numpy()`` is behind the guard
    return out


def _concatenate(planned: torch.Tensor, args: Any, kwargs: Any) -> Callable[[], torch.Tensor]:
    """``torch.cat`` one input at a time into the result: the result and one input in
    memory, not every input and the result (a merge of q, k and v: 4/3 of it, not 2x)."""
    parts = list(args[0])
    dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
    dim = dim % planned.dim() if planned.dim() else 0

    def compute() -> torch.Tensor:
        out = torch.empty(planned.shape, dtype=planned.dtype)
        start = 0
        for part in parts:
            values = _produced(part)
            if values.dim() == 1 and values.numel() == 0 and planned.dim() != 1:
                continue  # torch.cat skips a legacy empty 1-D input
            size = values.shape[dim]
            out.narrow(dim, start, size).copy_(values)
            start += size
            del values
        return out

    return compute


def _pick(compute: Callable[[], Any], i: int) -> Callable[[], torch.Tensor]:
    return lambda: compute()[i]


def _produced(value: Any) -> Any:
    return value.produce() if isinstance(value, (Deferred, _Taken)) else value


def deferrable(steps: Any) -> bool:
    """Whether the steps run on deferred tensors: every plan does (function steps and ops
    that run caller code too); what a step does that the deferral cannot replay is refused
    while it runs (:func:`replaying`), and the plan then takes the loaded path."""
    return True


def _walk(node: Any, leaf: Callable[[Any], Any]) -> Any:
    if isinstance(node, dict):
        return type(node)((k, _walk(v, leaf)) for k, v in node.items())
    if isinstance(node, list):
        return [_walk(v, leaf) for v in node]
    if isinstance(node, tuple):
        return tuple(_walk(v, leaf) for v in node)
    return leaf(node)


def defer_dcp(
    folder: str | os.PathLike[str], stubs: Checkpoint
) -> tuple[Checkpoint, Callable[[Checkpoint], Checkpoint]]:
    """``stubs`` (read from the DCP folder) with each tensor :class:`Deferred`, read from
    the rank files when asked; and the function that turns a plan's result back into stubs
    (tensors kept as stored) and :class:`~.formats.dcp_tensors.NewTensor` (computed ones)."""
    from ..formats.dcp import read_dcp_metadata
    from ..formats.dcp_tensors import read_dcp_tensor

    folder = Path(folder)
    md = read_dcp_metadata(folder, torch_classes=True)
    originals: dict[int, TensorStub] = {}

    def defer(value: Any) -> Any:
        if not isinstance(value, TensorStub) or value.info.storage_key not in (
            md.state_dict_metadata
        ):
            return value
        try:
            meta = torch.empty(value.shape, dtype=getattr(torch, value.dtype), device="meta")
        except (RuntimeError, ValueError, OverflowError) as exc:  # a size torch cannot hold
            raise NotReplayableError(f"{value.info.storage_key!r}: {exc}") from None
        key = value.info.storage_key
        out = Deferred(meta, lambda: read_dcp_tensor(folder, md, key), of_input=True)
        originals[id(out)] = value
        return out

    def settle_leaf(value: Any) -> Any:
        if isinstance(value, Deferred):
            if id(value) in originals:
                return originals[id(value)]
            return NewTensor(tuple(value.shape), _dtype_name(value.dtype), value.produce)
        if isinstance(value, torch.Tensor):  # made by an op from nothing it read
            if value.is_meta:
                raise NotReplayableError("the plan made a tensor on the meta device")
            return NewTensor(tuple(value.shape), _dtype_name(value.dtype), lambda: value)
        return value

    def settle(result: Checkpoint) -> Checkpoint:
        """``result`` as stubs and new tensors; raises :class:`NotReplayableError` for what
        only the loaded path can write."""
        if _holds_deferred(result.hparams) or _holds_deferred(result.meta):
            raise NotReplayableError("the plan put a deferred tensor in hparams or meta")
        out = result.copy()
        out.state_dict = _walk(result.state_dict, settle_leaf)
        out.optimizer = _walk(result.optimizer, settle_leaf)
        out.extra = _walk(result.extra, settle_leaf)
        return out

    deferred = stubs.copy()
    deferred.state_dict = _walk(stubs.state_dict, defer)
    deferred.optimizer = _walk(stubs.optimizer, defer)
    deferred.extra = _walk(stubs.extra, defer)
    return deferred, settle


def _holds_deferred(node: Any) -> bool:
    """Whether a deferred tensor lies anywhere in ``node`` (dicts, lists, tuples)."""
    if isinstance(node, Deferred):
        return True
    if isinstance(node, dict):
        return any(_holds_deferred(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return any(_holds_deferred(v) for v in node)
    return False


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
