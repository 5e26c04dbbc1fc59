"""Ops on tensor values: split and merge along a dim, reshape, transpose, cast."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...errors import OpError
from ...values.checkpoint import Checkpoint
from ...values.pieces import concatenate as concatenate_stubs
from ...values.pieces import cut as cut_stub
from ...values.tensorinfo import TensorStub
from .base import (
    KEYS,
    TENSORS,
    Op,
    check_templates,
    fill_template,
    refuse_new_layout,
    replace_keys_at,
    template_matches,
    template_where,
)

if TYPE_CHECKING:
    import torch

__all__ = ["Cast", "Merge", "Reshape", "Split", "TensorOp", "Transpose"]


@dataclass
class Split(Op):
    """Split each key matching ``source`` into ``targets`` along ``dim`` (fused q/k/v)."""

    acts_on = frozenset({KEYS, TENSORS})
    source: str
    targets: Sequence[str]
    dim: int = 0
    sizes: Sequence[int] | None = None
    missing_ok: bool = field(default=False, kw_only=True)
    transforms_state = True
    follows_adapter = True

    def __post_init__(self) -> None:
        check_templates(type(self).__name__, self.source, self.targets)

    def adapter_dim(self) -> int:
        return self.dim

    def trace(self, keys: Sequence[str]) -> dict[str, list[str]]:
        split = {k: g for k, g in template_matches(self.source, keys)}
        out: dict[str, list[str]] = {}
        for key in keys:
            if key in split:
                out.update({fill_template(t, split[key]): [key] for t in self.targets})
            else:
                out[key] = [key]
        return out

    def apply(self, ckpt: Checkpoint) -> None:
        found = template_matches(self.source, list(ckpt.state_dict))
        if not found:
            refuse_new_layout(self, self.targets[0], ckpt)
            self.found_nothing(list(ckpt.state_dict), **template_where(self.source))
        for key, groups in found:
            parts = self.cut(key, ckpt.state_dict[key])
            new = {
                fill_template(t, groups): p if isinstance(p, TensorStub) else p.contiguous()
                for t, p in zip(self.targets, parts)
            }
            clash = [k for k in new if k in ckpt.state_dict]
            if clash:
                raise OpError(f"{self.describe()}: splitting {key!r}, but {clash} already exist")
            ckpt.state_dict = replace_keys_at(ckpt.state_dict, [key], new)

    def cut(self, key: str, tensor: torch.Tensor) -> Sequence[torch.Tensor]:
        """The parts of ``tensor``, one a target: equal chunks, or ``sizes`` long (of a stub:
        runs of its bytes, :func:`~ckptmigrate.values.pieces.cut`)."""
        size = tensor.shape[self.dim]
        if self.sizes is None:
            if size % len(self.targets):
                raise OpError(
                    f"{self.describe()}: {key!r} has size {size} along dim "
                    f"{self.dim}, not divisible into {len(self.targets)} parts"
                )
            if isinstance(tensor, TensorStub):
                return cut_stub(tensor, [size // len(self.targets)] * len(self.targets), self.dim)
            import torch

            return torch.chunk(tensor, len(self.targets), dim=self.dim)
        if len(self.sizes) != len(self.targets) or sum(self.sizes) != size:
            raise OpError(
                f"{self.describe()}: sizes {list(self.sizes)} for {len(self.targets)} targets, "
                f"but {key!r} has size {size} along dim {self.dim}: give one size a target, "
                "summing to the fused size"
            )
        if isinstance(tensor, TensorStub):
            return cut_stub(tensor, list(self.sizes), self.dim)
        import torch

        return torch.split(tensor, list(self.sizes), dim=self.dim)

    @property
    def runs_on_stubs(self) -> bool:
        return type(self) is Split and self.dim == 0

    def inverse(self) -> Op:
        undo = self.merged_by()
        return undo(
            list(self.targets), self.source, self.dim, self.sizes, missing_ok=self.missing_ok
        )

    def merged_by(self) -> type[Merge]:
        """The op that undoes this split, given the same targets, source, dim and sizes."""
        return Merge

    def describe(self) -> str:
        return f"split {self.source!r} -> {list(self.targets)!r} ({self.how()})"

    def how(self) -> str:
        """How the rows are cut, as :meth:`describe` says it."""
        return f"dim {self.dim}"


@dataclass
class Merge(Op):
    """Concatenate the keys matching ``sources`` (all present) into ``target`` along ``dim``."""

    acts_on = frozenset({KEYS, TENSORS})
    sources: Sequence[str]
    target: str
    dim: int = 0
    sizes: Sequence[int] | None = None
    missing_ok: bool = field(default=False, kw_only=True)
    transforms_state = True
    follows_adapter = True

    def __post_init__(self) -> None:
        check_templates(type(self).__name__, self.sources, self.target)

    def adapter_dim(self) -> int:
        return self.dim

    def partners(self, keys: Sequence[str]) -> list[str]:
        present = set(keys)
        out: dict[str, None] = {}
        for template in self.sources:
            for _, groups in template_matches(template, keys):
                for t in self.sources:
                    key = fill_template(t, groups)
                    if key not in present:
                        out[key] = None
        return list(out)

    def part_size(self, index: int, known: dict[int, int]) -> int | None:
        if self.sizes is not None:
            return self.sizes[index]  # the sizes the inverse split cuts
        sizes = set(known.values())
        return sizes.pop() if len(sizes) == 1 else None  # equal chunks, as the inverse cuts

    def trace(self, keys: Sequence[str]) -> dict[str, list[str]]:
        present = set(keys)
        merged: dict[str, list[str]] = {}
        for first, groups in template_matches(self.sources[0], keys):
            group = [first] + [fill_template(t, groups) for t in self.sources[1:]]
            if all(k in present for k in group):
                merged[first] = group
        members = {k for group in merged.values() for k in group}
        out: dict[str, list[str]] = {}
        for key in keys:
            if key in merged:
                out[
                    fill_template(self.target, dict(template_matches(self.sources[0], [key]))[key])
                ] = merged[key]
            elif key not in members:
                out[key] = [key]
        return out

    def apply(self, ckpt: Checkpoint) -> None:
        found = template_matches(self.sources[0], list(ckpt.state_dict))
        if not found:
            refuse_new_layout(self, self.target, ckpt)
            self.found_nothing(list(ckpt.state_dict), **template_where(self.sources[0]))
        for first, groups in found:
            keys = [first] + [fill_template(t, groups) for t in self.sources[1:]]
            missing = [k for k in keys if k not in ckpt.state_dict]
            if missing:
                raise OpError(f"{self.describe()}: merging {first!r}, but {missing} are missing")
            new_key = fill_template(self.target, groups)
            if new_key in ckpt.state_dict and new_key not in keys:
                raise OpError(f"{self.describe()}: {new_key!r} already exists")
            merged = self.join(new_key, [ckpt.state_dict[k] for k in keys])
            ckpt.state_dict = replace_keys_at(ckpt.state_dict, keys, {new_key: merged})

    def join(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The parts as one tensor: concatenated along ``dim``. Parts of unequal size need
        ``sizes=`` (the inverse cuts equal chunks otherwise: other shapes, rows moved). Stubs
        join as runs of their bytes (:func:`~ckptmigrate.values.pieces.concatenate`)."""
        if any(not hasattr(t, "shape") for t in tensors):
            raise OpError(f"{self.describe()}: merging into {key!r}, but a part is not a tensor")
        try:
            found = [t.shape[self.dim] for t in tensors]
        except IndexError:
            shapes = [tuple(t.shape) for t in tensors]
            raise OpError(f"{self.describe()}: the parts {shapes} have no dim {self.dim}") from None
        if self.sizes is None and len(set(found)) > 1:
            raise OpError(
                f"{self.describe()}: merging parts of sizes {found} along dim {self.dim} into "
                f"{key!r}; its inverse would cut equal chunks: give sizes={found}"
            )
        if self.sizes is not None and list(self.sizes) != found:
            raise OpError(
                f"{self.describe()}: sizes={list(self.sizes)}, but the parts merged into "
                f"{key!r} have sizes {found} along dim {self.dim}"
            )
        if all(isinstance(t, TensorStub) for t in tensors):
            return concatenate_stubs(tensors, self.dim)  # type: ignore[return-value]
        import torch

        return torch.cat(tensors, dim=self.dim)

    @property
    def runs_on_stubs(self) -> bool:
        return type(self) is Merge and self.dim == 0

    def inverse(self) -> Op:
        return Split(
            self.target, list(self.sources), self.dim, self.sizes, missing_ok=self.missing_ok
        )

    def describe(self) -> str:
        return f"merge {list(self.sources)!r} -> {self.target!r} (dim {self.dim})"


@dataclass
class TensorOp(Op):
    acts_on = frozenset({TENSORS})
    template: str
    missing_ok: bool = field(default=False, kw_only=True)
    transforms_state = True

    def __post_init__(self) -> None:
        check_templates(type(self).__name__, self.template)

    def touches(self, keys: Sequence[str]) -> bool:
        return bool(template_matches(self.template, keys))

    def transform(self, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, ckpt: Checkpoint) -> None:
        found = template_matches(self.template, list(ckpt.state_dict))
        if not found:
            self.found_nothing(list(ckpt.state_dict), **template_where(self.template))
        for key, _ in found:
            ckpt.state_dict[key] = self.transform(ckpt.state_dict[key])


@dataclass
class Reshape(TensorOp):
    """Reshape matching tensors to ``shape``; invertible when ``from_shape`` is given."""

    shape: Sequence[int] = ()
    from_shape: Sequence[int] | None = None

    adapter_refusal = "a reshaped weight has no rows or columns for the adapter's factors to follow"

    def transform(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            return tensor.reshape(tuple(self.shape)).clone()
        except RuntimeError as exc:
            raise OpError(f"{self.describe()}: {exc}") from None

    def inverse(self) -> Op | None:
        if self.from_shape is None:
            return None
        return Reshape(
            self.template, tuple(self.from_shape), tuple(self.shape), missing_ok=self.missing_ok
        )

    def describe(self) -> str:
        return f"reshape {self.template!r} to {tuple(self.shape)}"


@dataclass
class Transpose(TensorOp):
    """Swap two dims of matching tensors (its own inverse)."""

    dim0: int = 0
    dim1: int = 1
    adapter_refusal = (
        "PEFT keeps lora_A and lora_B in one orientation and marks a transposed (Conv1D) "
        "weight with fan_in_fan_out, one flag for the whole adapter"
    )

    def transform(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.transpose(self.dim0, self.dim1).contiguous()

    def inverse(self) -> Op:
        return Transpose(self.template, self.dim0, self.dim1, missing_ok=self.missing_ok)

    def describe(self) -> str:
        return f"transpose {self.template!r} dims {self.dim0},{self.dim1}"


#: the names of torch's dtypes (as of torch 2.13): a dtype given by name is looked up here and
#: in torch's own namespace, never with ``getattr(torch, name)``, whose module ``__getattr__``
#: imports a submodule of that name (``"onnx"`` from a file would import ``torch.onnx``)
DTYPE_NAMES = frozenset(
    """bfloat16 bit bits16 bits1x8 bits2x4 bits4x2 bits8 bool cdouble cfloat chalf complex128
    complex32 complex64 double float float16 float32 float4_e2m1fn_x2 float64 float8_e4m3fn
    float8_e4m3fnuz float8_e5m2 float8_e5m2fnuz float8_e8m0fnu half int int1 int16 int2 int3
    int32 int4 int5 int6 int64 int7 int8 long qint32 qint8 quint2x4 quint4x2 quint8 short uint1
    uint16 uint2 uint3 uint32 uint4 uint5 uint6 uint64 uint7 uint8""".split()
)


def _dtype_name(value: Any) -> str:
    """The name of a dtype given as a ``torch.dtype`` or by name (``"float16"``,
    ``"torch.float16"``), checked against :data:`DTYPE_NAMES`; else an :class:`OpError`.
    Imports nothing."""
    name = str(value).removeprefix("torch.") if isinstance(value, str) or _is_dtype(value) else ""
    if name not in DTYPE_NAMES:
        raise OpError(
            f"{str(value)[:80]!r} is not a torch dtype (one of {', '.join(sorted(DTYPE_NAMES))})"
        )
    return name


def _is_dtype(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.dtype)


def _dtype(value: Any) -> torch.dtype:
    import torch

    if isinstance(value, torch.dtype):
        return value
    found = vars(torch).get(_dtype_name(value))  # the namespace itself: no lazy import
    if not isinstance(found, torch.dtype):
        raise OpError(f"{value!r} is not a dtype of this torch ({torch.__version__})")
    return found


@dataclass
class Cast(TensorOp):
    """Cast matching tensors to ``dtype``; invertible when ``from_dtype`` is given."""

    dtype: Any = None
    from_dtype: Any = None
    transforms_state = False  # optimizer state stays in its own (usually fp32) dtype
    follows_adapter = True  # an adapter keeps its own dtype, as optimizer state does

    def __post_init__(self) -> None:
        super().__post_init__()
        _dtype_name(self.dtype)
        if self.from_dtype is not None:
            _dtype_name(self.from_dtype)

    def touches(self, keys: Sequence[str]) -> bool:
        return False

    def transform(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(_dtype(self.dtype), copy=True)

    def inverse(self) -> Op | None:
        if self.from_dtype is None:
            return None
        return Cast(self.template, self.from_dtype, self.dtype, missing_ok=self.missing_ok)

    def describe(self) -> str:
        return f"cast {self.template!r} to {str(self.dtype).removeprefix('torch.')}"
