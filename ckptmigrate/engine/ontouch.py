"""A DCP folder's tensors, each read from its rank files when a step first uses it.

A function step on a DCP folder gets the folder as loading it would give it (the same
structure and key order, every value DCP stored as bytes read), except that each tensor is
:class:`OnTouch`: it knows its shape and dtype, and the first torch call that needs its
values reads it (behind the read-only guard: :mod:`.guard`) and runs on them. The step runs
on real tensors, so it answers as it would on the loaded folder: its control flow, errors,
randomness and refusals are its own. What it never touched costs nothing. Afterwards
:meth:`TouchedFolder.settle` keeps each input the result holds as it was (its chunks stay in
the linked rank files, ``.metadata`` names it anew) and makes each computed tensor a
:class:`~.formats.dcp_tensors.NewTensor`, written one at a time. An input whose values
changed after all (written past the guard: through its storage, numpy or dlpack) is written
as it now is, as the loaded folder's would be: each read is checksummed.

>>> folder = TouchedFolder(source.path, source.stubs)  # doctest: +SKIP
>>> new = folder.settle(plan.run(folder.ckpt))  # kept: the folder's stubs; new: NewTensor
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import NotReplayableError
from ..formats.dcp import check_dcp_storable
from ..formats.dcp_rewrite import walks_list
from ..formats.dcp_tensors import NewTensor
from ..values.checkpoint import Checkpoint
from ..values.tensorinfo import TensorStub
from .guard import guard_class

__all__ = ["OnTouch", "ReadFailed", "TouchedFolder"]

_READING = threading.RLock()  # a detach() alias reads its source inside its own read

_T = torch.Tensor
#: What a tensor's shape and dtype answer, asked before it is read. A tensor read from DCP
#: is contiguous from offset 0 on the CPU (:meth:`OnTouch.touch` makes it so), as DCP's
#: own loader gives it.
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
        _T.is_contiguous,
        _T.stride,
        _T.storage_offset,
        _T.__len__,
        torch.is_floating_point,
        torch.is_complex,
        torch.numel,
    }
)
_DEVICE = {
    _T.device.__get__: torch.device("cpu"),
    _T.is_cpu.__get__: True,
    _T.is_cuda.__get__: False,
    _T.is_meta.__get__: False,
}
#: Calls that make a new tensor from another's shape and dtype only: run on an unread CPU
#: tensor of that shape (``torch.empty``: no page of it touched), not on the values.
_LIKE = frozenset(
    {
        _T.new_zeros,
        _T.new_ones,
        _T.new_empty,
        _T.new_full,
        torch.zeros_like,
        torch.ones_like,
        torch.empty_like,
        torch.full_like,
        torch.rand_like,
        torch.randn_like,
        torch.randint_like,
    }
)


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
    _crc: int | None
    _guarded: Any
    _guard: Callable[[torch.Tensor], Any] | None
    _failures: list[BaseException]
    _source: OnTouch | None = None  # the tensor this one is an alias of (:meth:`_alias`)

    @staticmethod
    def __new__(
        cls, meta: torch.Tensor, read: Callable[[], torch.Tensor], failures: list[BaseException]
    ) -> OnTouch:
        out = torch.Tensor._make_subclass(cls, meta)
        out._read, out._value, out._crc = read, None, None
        out._guarded, out._guard = None, None
        out._failures = failures
        return out

    def guard_with(self, guard: Callable[[torch.Tensor], Any] | None) -> None:
        """While a step runs, its values are given through ``guard`` (the step's read-only
        view, which records them); ``None`` when it returns (a read-only view still)."""
        self._guard, self._guarded = guard, None

    def values(self) -> torch.Tensor:
        """The values, read once (two threads of a step touching it at once: once): a plain
        tensor."""
        if self._value is not None:
            return self._value
        with _READING:
            if self._value is not None:
                return self._value
            try:
                value = self._read()
                if not value.is_contiguous() or value.storage_offset():
                    value = value.clone(memory_format=torch.contiguous_format)  # as DCP's loader
            except Exception as exc:
                self._failures.append(exc)
                raise ReadFailed(exc) from exc
            self._crc, self._value = _checksum(value), value
            return value

    def changed(self) -> bool:
        """Whether values read were written since (past the guard, which refuses writes)."""
        return self._value is not None and _checksum(self._value) != self._crc

    def touch(self) -> Any:
        """The values, as the running step may see them: behind the read-only guard."""
        value = self.values()
        if self._guarded is None:
            guarded = self._guard(value) if self._guard is not None else None
            self._guarded = guarded if guarded is not None else value.as_subclass(guard_class())
        return self._guarded

    # not torch-function calls: on the unread tensor they would run on its meta data
    def as_subclass(self, cls: Any) -> Any:
        return self.touch().as_subclass(cls)

    def set_(self, *args: Any, **kwargs: Any) -> Any:  # the guard's version check refuses it
        return self.touch().set_(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        import copy

        return copy.deepcopy(self.touch(), memo)

    # printed, formatted and pickled as the values (the guard's own do the same)
    def __repr__(self, *args: Any, **kwargs: Any) -> str:
        return repr(self.touch())

    def __format__(self, spec: str) -> str:
        return format(self.touch(), spec)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.touch().__reduce_ex__(protocol)

    def __hash__(self) -> int:
        return id(self)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        first = args[0] if args else None
        if isinstance(first, OnTouch) and first._value is None:
            if func in _DEVICE:
                return _DEVICE[func]
            if func in _METADATA and not _holds_tensor((args[1:], kwargs)):
                with torch._C.DisableTorchFunctionSubclass():
                    return func(*args, **kwargs)
        if func in _LIKE:
            return func(*tree_map(_unread, args), **tree_map(_unread, kwargs))
        if func is _T.__deepcopy__:
            return first.__deepcopy__(*args[1:])
        if isinstance(first, OnTouch):
            if func is _T.detach or (func is _T.view_as and _same_shape(first, args, kwargs)):
                return first._alias()
            if first._value is None and _returns_itself(first, func, args[1:], kwargs):
                return first  # .cpu(), .float() of a float, .contiguous(): nothing to read
        out = func(*tree_map(_touched, args), **tree_map(_touched, kwargs))
        if isinstance(first, OnTouch) and out is first._guarded:
            return first  # it returned itself (requires_grad_(), .float() of a float)
        return out

    def _alias(self) -> OnTouch:
        """``detach()``, ``view_as()`` of the same shape: another tensor of the same values
        (``nn.Parameter`` needs one of this class), read through this one's guard (a write
        into it is a write into the input), kept as stored where this one is."""
        out = OnTouch(self.as_meta(), lambda: self.touch().detach(), self._failures)
        out._source = self
        return out

    def as_meta(self) -> torch.Tensor:
        with torch._C.DisableTorchFunctionSubclass():
            return torch.Tensor._make_subclass(torch.Tensor, self)


_CASTS = {
    _T.float: torch.float32,
    _T.double: torch.float64,
    _T.half: torch.float16,
    _T.bfloat16: torch.bfloat16,
    _T.int: torch.int32,
    _T.long: torch.int64,
    _T.short: torch.int16,
    _T.char: torch.int8,
    _T.byte: torch.uint8,
    _T.bool: torch.bool,
}
_CPU = ("cpu", torch.device("cpu"))


def _returns_itself(first: OnTouch, func: Any, rest: tuple, kwargs: dict) -> bool:
    """Whether ``func(first, *rest, **kwargs)`` gives ``first`` back as it is, as torch does
    for a call that changes nothing: known from its dtype and device, without its values."""
    if func is _T.cpu or func is _T.contiguous:
        return (
            not rest
            and set(kwargs) <= {"memory_format"}
            and kwargs.get("memory_format", torch.contiguous_format)
            in (torch.contiguous_format, torch.preserve_format)
        )
    if func in _CASTS:
        return not rest and not kwargs and _CASTS[func] == first.dtype
    if func is _T.to and not kwargs and len(rest) == 1:
        target = rest[0]
        return target == first.dtype if isinstance(target, torch.dtype) else target in _CPU
    return False


def _same_shape(first: OnTouch, args: tuple, kwargs: dict) -> bool:
    other = args[1] if len(args) > 1 else kwargs.get("other")
    return isinstance(other, torch.Tensor) and tuple(other.shape) == tuple(first.shape)


def _checksum(value: torch.Tensor) -> int:
    if not value.numel():
        return 0
    return zlib.crc32(value.detach().reshape(-1).view(torch.uint8).numpy())


def _holds_tensor(node: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in tree_flatten(node)[0])


def _touched(value: Any) -> Any:
    return value.touch() if isinstance(value, OnTouch) else value


def _unread(value: Any) -> Any:
    if isinstance(value, OnTouch) and value._value is None:
        return torch.empty(tuple(value.shape), dtype=value.dtype)
    return _touched(value)


def _plain(node: Any) -> Any:
    """``node`` with every tensor in it a plain tensor of its values (a tuple DCP stores
    whole, pickled; a tensor in the hparams the JSON check refuses as any tensor)."""
    if isinstance(node, torch.Tensor):
        if isinstance(node, OnTouch):
            return node.values()
        if type(node) is not torch.Tensor:
            with torch._C.DisableTorchFunctionSubclass():
                return torch.Tensor._make_subclass(torch.Tensor, node)
        return node
    if isinstance(node, dict):
        return _dict_like(node, _plain)
    if isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
        return type(node)(_plain(v) for v in node)
    return node


def _dict_like(node: dict[Any, Any], fn: Callable[[Any], Any]) -> dict[Any, Any]:
    """A copy of ``node`` of its own kind (an OrderedDict, a defaultdict with its factory),
    each value ``fn(value)``."""
    out = node.copy()
    for key, value in node.items():
        out[key] = fn(value)
    return out


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
        return _dict_like(node, lambda v: _settled(v, leaf))
    if walks_list(node):
        return [_settled(v, leaf) for v in node]
    return leaf(node)


class TouchedFolder:
    """A DCP folder as loading it gives it, its values stored as bytes read and each tensor
    :class:`OnTouch` (:attr:`ckpt`); :meth:`settle` turns a plan's result into the folder's
    stubs (inputs kept) and :class:`~.formats.dcp_tensors.NewTensor` (computed tensors).

    Raises :class:`~ckptmigrate.errors.NotReplayableError` where a tensor's declared size
    is one torch cannot hold (loading the folder says what is wrong with it).
    """

    def __init__(self, folder: str | os.PathLike[str], stubs: Checkpoint) -> None:
        from ..formats.dcp import load_dcp_state, read_dcp_metadata, state_checkpoint
        from ..formats.dcp_tensors import read_dcp_tensor

        path = Path(folder)
        md = read_dcp_metadata(path, torch_classes=True)
        kept = _leaves([stubs.state_dict, stubs.optimizer, stubs.extra], {})
        #: reads that failed, the first one the folder's error (even where a step caught it)
        self.failures: list[BaseException] = []
        self._inputs: dict[int, tuple[OnTouch, TensorStub]] = {}

        def tensor(fqn: str) -> OnTouch:
            entry = md.state_dict_metadata[fqn]
            try:
                meta = torch.empty(tuple(entry.size), dtype=entry.properties.dtype, device="meta")
            except (RuntimeError, ValueError, OverflowError, TypeError) as exc:
                raise NotReplayableError(f"{fqn!r}: {exc}") from None
            out = OnTouch(meta, lambda: read_dcp_tensor(path, md, fqn), self.failures)
            if fqn in kept:
                self._inputs[id(out)] = (out, kept[fqn])
            return out

        self.ckpt = state_checkpoint(load_dcp_state(path, tensor), path)

    def settle(self, result: Checkpoint) -> Checkpoint:
        """``result`` for the DCP writers: each input it holds unchanged the folder's stub,
        each other tensor a :class:`NewTensor` (one per tensor, ties kept). Raises
        :class:`NotReplayableError` for a tensor that ran on a meta tensor (torch functions
        turned off around a call on an unread input): the folder is then loaded."""
        made: dict[int, NewTensor] = {}

        def leaf(value: Any) -> Any:
            root = value
            while isinstance(root, OnTouch) and root._source is not None:
                root = root._source  # detach() of an input: the input's values, as stored
            kept = self._inputs.get(id(root))
            if kept is not None and kept[0] is root and not root.changed():
                return kept[1]
            if not isinstance(value, torch.Tensor):
                return _plain(value)
            plain = _plain(value)
            if plain.is_meta:
                raise NotReplayableError("a tensor of the result ran on a meta tensor")
            check_dcp_storable(plain)
            if id(plain) not in made:
                dtype = str(plain.dtype).removeprefix("torch.")
                made[id(plain)] = NewTensor(tuple(plain.shape), dtype, lambda: plain)
            return made[id(plain)]

        self.check()
        out = result.copy()
        out.state_dict = _settled(result.state_dict, leaf)
        out.optimizer = _settled(result.optimizer, leaf)
        out.extra = _settled(result.extra, leaf)
        out.hparams, out.meta = _plain(result.hparams), _plain(result.meta)
        self.check()
        return out

    def check(self) -> None:
        """Raise the folder's error where a read failed (a step may have caught it)."""
        if self.failures:
            raise self.failures[0]
