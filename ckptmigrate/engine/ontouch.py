"""A DCP folder's tensors, each read from its rank files when a step first uses it.

A function step on a DCP folder gets the folder as loading it would give it (the same
structure and key order, every value DCP stored as bytes read), except that each tensor is
:class:`OnTouch`: it knows its shape and dtype, and the first torch call on it reads it (behind
the read-only guard while a step runs: :mod:`.guard`) and runs on the values. The step runs
on real tensors, so it answers as it would on the loaded folder: its control flow, errors,
randomness and refusals are its own. What it never touched costs nothing. Afterwards
:func:`touch_dcp`'s ``settle`` keeps each input the result holds as it was (its chunks stay
in the linked rank files, ``.metadata`` names it anew) and makes each computed tensor a
:class:`~.formats.dcp_tensors.NewTensor`, written one at a time.

>>> ckpt, settle = touch_dcp(source.path, source.stubs)  # doctest: +SKIP
>>> new = settle(plan.run(ckpt))  # kept: the folder's stubs; new: NewTensor(..., value)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map

from ..errors import NotReplayableError
from ..formats.dcp_tensors import NewTensor
from ..values.checkpoint import Checkpoint
from ..values.tensorinfo import TensorStub

__all__ = ["OnTouch", "ReadFailed", "touch_dcp"]

_T = torch.Tensor
#: What a tensor's shape and dtype answer: asked without reading it.
_METADATA = frozenset(
    {
        _T.shape.__get__,
        _T.dtype.__get__,
        _T.ndim.__get__,
        _T.layout.__get__,
        _T.requires_grad.__get__,
        _T.itemsize.__get__,
        _T.nbytes.__get__,
        _T.size,
        _T.dim,
        _T.numel,
        _T.nelement,
        _T.element_size,
        _T.is_floating_point,
        _T.is_complex,
        _T.__len__,
    }
)
_ON_CPU = frozenset({_T.device.__get__, _T.is_cuda.__get__, _T.is_meta.__get__})


class ReadFailed(BaseException):
    """Reading a touched tensor failed: the folder's error (:attr:`error`), raised past the
    step's own ``except Exception`` (loading the folder would have failed before the step)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class OnTouch(torch.Tensor):
    """A tensor of a DCP folder, read on the first torch call that needs its values."""

    _ckptmigrate_on_touch = True
    _read: Callable[[], torch.Tensor]
    _value: torch.Tensor | None
    _guarded: Any
    _guard: Callable[[torch.Tensor], Any] | None
    _failures: list[BaseException]

    @staticmethod
    def __new__(
        cls, meta: torch.Tensor, read: Callable[[], torch.Tensor], failures: list[BaseException]
    ) -> OnTouch:
        out = torch.Tensor._make_subclass(cls, meta)
        out._read, out._value, out._guarded, out._guard = read, None, None, None
        out._failures = failures
        return out

    def guard_with(self, guard: Callable[[torch.Tensor], Any] | None) -> None:
        """While a step runs, its values are given through ``guard`` (the step's read-only
        view, which also records them); ``None`` when it returns."""
        self._guard, self._guarded = guard, None

    def touch(self) -> Any:
        """The values (read once), as the running step may see them."""
        if self._value is None:
            try:
                self._value = self._read()
            except Exception as exc:
                self._failures.append(exc)
                raise ReadFailed(exc) from exc
        if self._guard is None:
            return self._value
        if self._guarded is None:
            self._guarded = self._guard(self._value)
        return self._guarded

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        import copy

        return copy.deepcopy(self.touch(), memo)

    def __hash__(self) -> int:
        return id(self)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not kwargs and len(args) <= 2 and isinstance(args[0], OnTouch):
            if func in _METADATA and all(not isinstance(a, torch.Tensor) for a in args[1:]):
                with torch._C.DisableTorchFunctionSubclass():
                    return func(*args)
            if func in _ON_CPU:
                return torch.device("cpu") if func is _T.device.__get__ else False
        if func is _T.__deepcopy__:
            return args[0].__deepcopy__(*args[1:])
        return func(*tree_map(_touched, args), **tree_map(_touched, kwargs))


def _touched(value: Any) -> Any:
    return value.touch() if isinstance(value, OnTouch) else value


def _leaves(node: Any, out: dict[str, TensorStub]) -> dict[str, TensorStub]:
    if isinstance(node, dict):
        for value in node.values():
            _leaves(value, out)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _leaves(value, out)
    elif isinstance(node, TensorStub) and node.info.storage_key is not None:
        out[node.info.storage_key] = node
    return out


def _settled(node: Any, leaf: Callable[[Any], Any]) -> Any:
    """DCP's flattening (:func:`.formats.dcp_rewrite._flatten`): dicts and lists holding
    containers or tensors are walked; anything else (a tuple, a list of numbers) is one
    value, stored as bytes."""
    if isinstance(node, dict):
        return type(node)((k, _settled(v, leaf)) for k, v in node.items())
    if isinstance(node, list) and any(isinstance(v, (dict, list, torch.Tensor)) for v in node):
        return [_settled(v, leaf) for v in node]
    return leaf(node)


def touch_dcp(
    folder: str | os.PathLike[str], stubs: Checkpoint
) -> tuple[Checkpoint, Callable[[Checkpoint], Checkpoint]]:
    """The DCP folder as loading it gives it, its values stored as bytes read and each
    tensor :class:`OnTouch`; and the function that turns a plan's result into the folder's
    stubs (inputs kept) and :class:`~.formats.dcp_tensors.NewTensor` (computed tensors).

    Raises :class:`~ckptmigrate.errors.NotReplayableError` where a tensor's declared size
    is one torch cannot hold (loading the folder says what is wrong with it).
    """
    from ..formats.dcp import load_dcp_state, read_dcp_metadata, state_checkpoint
    from ..formats.dcp_tensors import read_dcp_tensor

    folder = Path(folder)
    md = read_dcp_metadata(folder, torch_classes=True)
    kept = _leaves([stubs.state_dict, stubs.optimizer, stubs.extra], {})
    failures: list[BaseException] = []
    inputs: dict[int, TensorStub] = {}

    def tensor(fqn: str) -> OnTouch:
        stub = kept.get(fqn)
        entry = md.state_dict_metadata[fqn]
        try:
            meta = torch.empty(tuple(entry.size), dtype=entry.properties.dtype, device="meta")
        except (RuntimeError, ValueError, OverflowError, TypeError) as exc:
            raise NotReplayableError(f"{fqn!r}: {exc}") from None
        out = OnTouch(meta, lambda: read_dcp_tensor(folder, md, fqn), failures)
        if stub is not None:
            inputs[id(out)] = stub
        return out

    ckpt = state_checkpoint(load_dcp_state(folder, tensor), folder)

    def leaf(value: Any) -> Any:
        if isinstance(value, OnTouch) and id(value) in inputs:
            return inputs[id(value)]
        if isinstance(value, torch.Tensor):
            plain = value.touch() if isinstance(value, OnTouch) else value
            if id(plain) not in made:
                dtype = str(plain.dtype).removeprefix("torch.")
                made[id(plain)] = NewTensor(tuple(plain.shape), dtype, lambda: plain)
            return made[id(plain)]
        return value

    made: dict[int, NewTensor] = {}

    def settle(result: Checkpoint) -> Checkpoint:
        if failures:  # a read the step caught and went past: the folder's error stands
            raise failures[0]
        out = result.copy()
        out.state_dict = _settled(result.state_dict, leaf)
        out.optimizer = _settled(result.optimizer, leaf)
        out.extra = _settled(result.extra, leaf)
        return out

    return ckpt, settle
