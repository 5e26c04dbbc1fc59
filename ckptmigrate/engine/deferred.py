"""Tensors whose values are read or computed only when a writer asks for them, one at a time.

A plan of our own tensor ops (``Split``, ``Merge``, ``Cast``...) runs on a checkpoint whose
tensors are :class:`Deferred`: each knows its shape and dtype (a ``meta`` tensor) and how to
produce its values (read it from the file, or apply a torch call to its inputs' values). A
torch call on them runs on the meta tensors only, to learn its result's shape and dtype, and
returns new :class:`Deferred` results that remember the call. Nothing is read while the plan
runs; afterwards :func:`settle` says which tensors are the file's own, untouched (their stored
bytes are kept) and which are new (computed by the writer when it writes them, one at a
time: the inputs of one result and the result in memory, nothing else).

>>> ckpt, settle = defer_dcp(source.path, source.stubs)  # doctest: +SKIP
>>> new = settle(plan.run(ckpt))  # kept: the file's stubs; new: NewTensor(..., compute)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import NotReplayableError
from ..formats.dcp_tensors import NewTensor
from ..values.checkpoint import Checkpoint
from ..values.tensorinfo import TensorStub

__all__ = ["Deferred", "defer_dcp", "deferrable"]


class Deferred(torch.Tensor):
    """A tensor of known shape and dtype whose values ``produce()`` returns when asked."""

    _produce: Callable[[], torch.Tensor]

    @staticmethod
    def __new__(cls, meta: torch.Tensor, produce: Callable[[], torch.Tensor]) -> Deferred:
        out = torch.Tensor._make_subclass(cls, meta)
        out._produce = produce
        return out

    def produce(self) -> torch.Tensor:
        """The values: read, or computed from the inputs' values (a plain CPU tensor)."""
        return self._produce()

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            # an in-place write would change values nothing is holding
            raise NotReplayableError(f"{func.__name__} writes into a deferred tensor")
        try:
            with torch._C.DisableTorchFunctionSubclass():
                planned = func(*tree_map(_as_meta, args), **tree_map(_as_meta, kwargs))
        except (RuntimeError, NotImplementedError):  # it needs the values (``.item()``)
            return _with_values(func, name, args, kwargs)
        flat, _ = tree_flatten(planned)
        if not any(isinstance(t, torch.Tensor) for t in flat):
            return planned  # a shape, a dtype, a dim: known without the values

        def compute() -> Any:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*tree_map(_produced, args), **tree_map(_produced, kwargs))

        if func is torch.cat and isinstance(planned, torch.Tensor) and "out" not in kwargs:
            return Deferred(planned, _concatenate(planned, args, kwargs))
        if isinstance(planned, torch.Tensor):
            return Deferred(planned, compute)
        if isinstance(planned, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in planned):
            return type(planned)(Deferred(t, _pick(compute, i)) for i, t in enumerate(planned))
        raise NotReplayableError(f"{getattr(func, '__name__', func)} returns {type(planned)}")


#: A call that needs a deferred tensor's values (``step.item()`` of an optimizer's state) reads
#: them when the tensors it touches hold at most this many elements; a larger one makes the
#: plan take the loaded path.
VALUES_READ_NOW = 1 << 16


def _with_values(func: Any, name: str, args: Any, kwargs: Any) -> Any:
    deferred = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Deferred)]
    if sum(t.numel() for t in deferred) > VALUES_READ_NOW:
        raise NotReplayableError(f"{name or func} needs the values of a large deferred tensor")
    with torch._C.DisableTorchFunctionSubclass():
        return func(*tree_map(_produced, args), **tree_map(_produced, kwargs))


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


def _as_meta(value: Any) -> Any:
    if isinstance(value, Deferred):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    return value


def _produced(value: Any) -> Any:
    return value.produce() if isinstance(value, Deferred) else value


def deferrable(steps: Any) -> bool:
    """Whether every step is ops of ours (no function step, no op that runs caller code):
    what runs on deferred tensors."""
    ops_module = "ckptmigrate.schema.ops"
    for planned in steps:
        ops = planned.ops
        if ops is None:
            return False
        for op in ops:
            if op.runs_user_code or not type(op).__module__.startswith(ops_module):
                return False
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
        out = Deferred(meta, lambda: read_dcp_tensor(folder, md, key))
        originals[id(out)] = value
        return out

    def settle_leaf(value: Any) -> Any:
        if isinstance(value, Deferred):
            if id(value) in originals:
                return originals[id(value)]
            return NewTensor(tuple(value.shape), _dtype_name(value.dtype), value.produce)
        if isinstance(value, torch.Tensor):  # made by an op from nothing it read
            return NewTensor(tuple(value.shape), _dtype_name(value.dtype), lambda: value)
        return value

    def settle(result: Checkpoint) -> Checkpoint:
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
