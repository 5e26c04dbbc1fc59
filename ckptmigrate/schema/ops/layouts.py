"""The layout changes real models go through, as reversible ops.

- :class:`Stack` / :class:`Unstack`: per-expert tensors ``experts.{i}.w1.weight`` <-> one
  ``experts.w1.weight`` of shape ``(count, ...)`` (transformers v5's ``MergeModulelist``);
- :class:`PermuteForRope`: q/k rows between Meta's interleaved rotary pairs and HF's half split;
- :class:`SplitInterleaved` / :class:`MergeInterleaved`: a fused qkv whose rows are grouped per
  head (GPT-NeoX: ``[h0_q, h0_k, h0_v, h1_q, ...]``), where a flat split has the right shapes and
  the wrong values;
- :class:`Pad` / :class:`Slice`: a dim resized (a vocabulary padded to a multiple of 64), the fill
  stated.

Optimizer state follows each one (``transforms_state``): the state tensors shaped like their
parameter go through the same op (:meth:`Op.for_state`), so Adam's moments stack, permute and
split with their rows; rows a :class:`Pad` adds start with zero (fresh) state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ...errors import OpError
from ...values.checkpoint import Checkpoint
from .base import (
    KEYS,
    TENSORS,
    Op,
    check_templates,
    fill_template,
    refuse_new_layout,
    replace_keys_at,
    template_matches,
    template_regex,
    template_where,
)
from .tensors import Merge, Split, TensorOp

if TYPE_CHECKING:
    import torch

__all__ = [
    "MergeInterleaved",
    "Pad",
    "PermuteForRope",
    "Slice",
    "SplitInterleaved",
    "Stack",
    "Unstack",
]


@dataclass
class _Stacking(Op):
    """What :class:`Stack` and :class:`Unstack` are given: the per-index key (``{index}``), the
    stacked key, how many indices (None: as many as the file holds) and the dim they stack
    along."""

    acts_on = frozenset({KEYS, TENSORS})
    source: str
    target: str
    count: int | None
    dim: int = 0
    index: str = "i"
    missing_ok: bool = field(default=False, kw_only=True)
    transforms_state = True
    adapter_refusal = (
        "PEFT adapts a stacked expert parameter through target_parameters, whose factors are "
        "laid out otherwise than the per-expert modules' lora_A and lora_B"
    )

    def __post_init__(self) -> None:
        check_templates(type(self).__name__, self.source, self.target)

    def how_many(self) -> str:
        """``count`` as :meth:`describe` says it."""
        return "all" if self.count is None else str(self.count)


@dataclass
class Stack(_Stacking):
    """Stack ``source`` for index ``{i}`` = 0 .. ``count`` - 1 into one ``target`` along ``dim``.

    ``Stack("layers.{l}.experts.{i}.w1.weight", "layers.{l}.experts.w1.weight", count=8)``; the
    ``{i}`` field (``index=``) matches an index only; every other field must appear in both. A
    gap, a missing expert or one beyond ``count`` is an :class:`OpError` naming the keys.
    ``count=None`` stacks as many as each target has (one pack for models of any expert count,
    as transformers' ``MergeModulelist``); they must still run 0 .. n - 1 without a gap.
    """

    def groups(self, keys: Sequence[str]) -> dict[str, dict[int, str]]:
        """Each target key -> its source keys by index, in the order the keys come."""
        if "{" + self.index + "}" not in self.source or "{" + self.index + "}" in self.target:
            raise OpError(
                f"{self.describe()}: the source must have the index field {{{self.index}}} "
                "and the target must not"
            )
        rx = template_regex(self.source, numbered=self.index)
        out: dict[str, dict[int, str]] = {}
        for key in keys:
            m = rx.fullmatch(key)
            if m is not None:
                fields = {k: v for k, v in m.groupdict().items() if k != self.index}
                out.setdefault(fill_template(self.target, fields), {})[int(m[self.index])] = key
        return out

    def trace(self, keys: Sequence[str]) -> dict[str, list[str]]:
        groups = self.groups(keys)
        stacked = {k for members in groups.values() for k in members.values()}
        first = {min(members.items())[1]: target for target, members in groups.items()}
        out: dict[str, list[str]] = {}
        for key in keys:
            if key in first:
                members = groups[first[key]]
                out[first[key]] = [members[i] for i in sorted(members)]
            elif key not in stacked:
                out[key] = [key]
        return out

    def apply(self, ckpt: Checkpoint) -> None:
        import torch

        groups = self.groups(list(ckpt.state_dict))
        if not groups:
            refuse_new_layout(self, self.target, ckpt)
            self.found_nothing(list(ckpt.state_dict), **template_where(self.source))
        for target, members in groups.items():
            count = self.check_complete(target, members)
            keys = [members[i] for i in range(count)]
            strange = [k for k in keys if not isinstance(ckpt.state_dict[k], torch.Tensor)]
            if strange:
                kind = type(ckpt.state_dict[strange[0]]).__name__
                raise OpError(f"{self.describe()}: {strange[0]!r} is a {kind}, not a tensor")
            shapes = {tuple(ckpt.state_dict[k].shape) for k in keys}
            if len(shapes) > 1:
                found = {k: tuple(ckpt.state_dict[k].shape) for k in keys}
                raise OpError(f"{self.describe()}: the parts differ in shape: {found}")
            if target in ckpt.state_dict:
                raise OpError(f"{self.describe()}: {target!r} already exists")
            stacked = torch.stack([ckpt.state_dict[k] for k in keys], dim=self.dim)
            ckpt.state_dict = replace_keys_at(ckpt.state_dict, keys, {target: stacked})

    def check_complete(self, target: str, members: dict[int, str]) -> int:
        """How many tensors stack into ``target``: ``count``, each index once, or refuse."""
        count = self.count if self.count is not None else max(members) + 1
        missing = [i for i in range(count) if i not in members]
        beyond = sorted(i for i in members if i >= count)
        if missing or beyond:
            sample = members[min(members)]
            named = [self.key_for(sample, i) for i in missing]
            raise OpError(
                f"{self.describe()}: stacking {count} tensors into {target!r}, but "
                + (f"{named} are missing" if missing else "")
                + (" and " if missing and beyond else "")
                + (
                    f"{[members[i] for i in beyond]} lie beyond count={self.count}"
                    if beyond
                    else ""
                )
                + ": give the right count=, or fix the file's experts"
            )
        return count

    def key_for(self, sample: str, i: int) -> str:
        """The source key of index ``i`` in the group of ``sample``."""
        m = template_regex(self.source, numbered=self.index).fullmatch(sample)
        assert m is not None
        return fill_template(self.source, {**m.groupdict(), self.index: str(i)})

    def inverse(self) -> Op:
        return Unstack(
            self.target, self.source, self.count, self.dim, self.index, missing_ok=self.missing_ok
        )

    def describe(self) -> str:
        return f"stack {self.source!r} -> {self.target!r} ({self.how_many()} along dim {self.dim})"


@dataclass
class Unstack(_Stacking):
    """Unbind ``source`` (size ``count`` along ``dim``) into ``target`` for ``{i}`` = 0 ..
    ``count`` - 1, the inverse of :class:`Stack`: ``Unstack("experts.w1.weight",
    "experts.{i}.w1.weight", count=8)``. ``count=None`` unbinds as many as each tensor holds;
    the keys alone then cannot say which keys come out, so optimizer state cannot follow it
    (give ``count=`` for that)."""

    def parts(
        self, keys: Sequence[str], sizes: dict[str, int] | None = None
    ) -> dict[str, list[str]]:
        """Each source key -> its target keys, index order (``sizes``: each source's count,
        when ``count`` is None)."""
        out = {}
        for key, g in template_matches(self.source, keys):
            count = self.count
            if count is None:
                if sizes is None:
                    raise OpError(
                        f"{self.describe()}: with count=None the keys alone do not say how many "
                        f"tensors {key!r} holds: give count= so that optimizer state can follow"
                    )
                count = sizes.get(key, 0)
            out[key] = [fill_template(self.target, {**g, self.index: str(i)}) for i in range(count)]
        return out

    def trace(self, keys: Sequence[str]) -> dict[str, list[str]]:
        parts = self.parts(keys)
        out: dict[str, list[str]] = {}
        for key in keys:
            out.update({t: [key] for t in parts[key]} if key in parts else {key: [key]})
        return out

    def apply(self, ckpt: Checkpoint) -> None:
        sd = ckpt.state_dict
        sizes = {  # a non-tensor or one without that dim: refused below, naming its shape
            k: sd[k].shape[self.dim]
            for k, _ in template_matches(self.source, list(sd))
            if hasattr(sd[k], "dim") and sd[k].dim() > self.dim
        }
        parts = self.parts(list(sd), sizes)
        if not parts:
            refuse_new_layout(self, self.target.replace("{" + self.index + "}", "0"), ckpt)
            self.found_nothing(list(ckpt.state_dict), **template_where(self.source))
        for key, targets in parts.items():
            tensor = ckpt.state_dict[key]
            if not targets or tensor.dim() <= self.dim or tensor.shape[self.dim] != len(targets):
                raise OpError(
                    f"{self.describe()}: {key!r} has shape {tuple(tensor.shape)}, not "
                    f"{len(targets)} along dim {self.dim}"
                )
            clash = [t for t in targets if t in ckpt.state_dict]
            if clash:
                raise OpError(f"{self.describe()}: unstacking {key!r}, but {clash} already exist")
            new = {t: p.contiguous() for t, p in zip(targets, tensor.unbind(self.dim))}
            ckpt.state_dict = replace_keys_at(ckpt.state_dict, [key], new)

    def inverse(self) -> Op:
        return Stack(
            self.target, self.source, self.count, self.dim, self.index, missing_ok=self.missing_ok
        )

    def describe(self) -> str:
        return (
            f"unstack {self.source!r} -> {self.target!r} ({self.how_many()} along dim {self.dim})"
        )


#: the rotary layouts of :class:`PermuteForRope`
ROPE_LAYOUTS = ("interleaved", "half")


@dataclass
class PermuteForRope(TensorOp):
    """Permute q/k projection rows (weights or biases) between rotary layouts, per head.

    ``to="half"`` (the default) goes from Meta's layout, where rotary pairs are adjacent
    dims ``(0, 1), (2, 3), ...`` of each head, to HF's, where dim ``j`` pairs with ``j +
    head_dim/2`` (``rotate_half``); this is ``permute`` in HF's ``convert_llama_weights_to_hf``.
    ``to="interleaved"`` goes back. ``n_heads`` is the heads of *this* projection: the
    key/value heads for ``k_proj`` under grouped-query attention.
    """

    n_heads: int = 1
    to: str = "half"
    follows_adapter = True

    def adapter_dim(self) -> int:
        return 0  # rows, per head

    def transform(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.to not in ROPE_LAYOUTS:
            raise OpError(f"{self.describe()}: to={self.to!r}, expected one of {ROPE_LAYOUTS}")
        if not isinstance(self.n_heads, int) or self.n_heads < 1:
            raise OpError(f"{self.describe()}: n_heads={self.n_heads!r}, expected a count >= 1")
        rows = tensor.shape[0] if tensor.dim() else 0
        if tensor.dim() not in (1, 2) or rows % (2 * self.n_heads):
            raise OpError(
                f"{self.describe()}: a tensor of shape {tuple(tensor.shape)} does not hold "
                f"{self.n_heads} heads of an even head dim along its rows"
            )
        half = rows // self.n_heads // 2
        pairs = (half, 2) if self.to == "half" else (2, half)
        rest = tuple(tensor.shape[1:])
        return tensor.reshape(self.n_heads, *pairs, *rest).transpose(1, 2).reshape(rows, *rest)

    def inverse(self) -> Op:
        back = "interleaved" if self.to == "half" else "half"
        return PermuteForRope(self.template, self.n_heads, back, missing_ok=self.missing_ok)

    def describe(self) -> str:
        return f"permute {self.template!r} for rope ({self.n_heads} heads, to {self.to})"


def _group_count(op: Op, key: str, size: int, block: Sequence[int]) -> int:
    if any(not isinstance(b, int) or b < 1 for b in block):
        raise OpError(f"{op.describe()}: sizes={list(block)}, expected rows per group >= 1 each")
    if size % sum(block):
        raise OpError(
            f"{op.describe()}: {key!r} has size {size}, not a whole number of groups of "
            f"{list(block)} ({sum(block)})"
        )
    return size // sum(block)


def _dim_of(op: Op, key: str, tensor: torch.Tensor, dim: int) -> int:
    """``dim`` counted from the front (``-1``: the last), or an :class:`OpError` when ``tensor``
    (of ``key``) has no such dim."""
    if not hasattr(tensor, "dim"):
        raise OpError(f"{op.describe()}: {key!r} is a {type(tensor).__name__}, not a tensor")
    if not -tensor.dim() <= dim < tensor.dim():
        raise OpError(f"{op.describe()}: {key!r} of shape {tuple(tensor.shape)} has no dim {dim}")
    return dim % tensor.dim()


@dataclass
class SplitInterleaved(Split):
    """Split a fused tensor whose rows are grouped per head: ``sizes`` are the rows each target
    takes in every group (GPT-NeoX's ``query_key_value``: ``[head_dim] * 3``, rows
    ``[h0_q, h0_k, h0_v, h1_q, ...]``; a grouped-query layout that keeps each kv head's queries
    with it: ``[q_per_kv * head_dim, head_dim, head_dim]``; gate/up interleaved by row: ``[1, 1]``).

    A flat :class:`Split` of such a tensor has the right shapes and the wrong values.
    """

    def cut(self, key: str, tensor: torch.Tensor) -> Sequence[torch.Tensor]:
        block = list(self.sizes or [])
        if len(block) != len(self.targets):
            raise OpError(f"{self.describe()}: give sizes=, one a target, the rows per group")
        shape = list(tensor.shape)
        dim = _dim_of(self, key, tensor, self.dim)
        groups = _group_count(self, key, shape[dim], block)
        grouped = tensor.reshape(*shape[:dim], groups, sum(block), *shape[dim + 1 :])
        parts = grouped.split(block, dim=dim + 1)
        return [p.flatten(dim, dim + 1) for p in parts]

    def merged_by(self) -> type[Merge]:
        return MergeInterleaved

    def how(self) -> str:
        return f"interleaved, {self.sizes} a group"


@dataclass
class MergeInterleaved(Merge):
    """Fuse ``sources`` into ``target`` with rows grouped per head, each source giving
    ``sizes[i]`` rows to every group: the inverse of :class:`SplitInterleaved`."""

    def part_size(self, index: int, known: dict[int, int]) -> int | None:
        block = list(self.sizes or [])
        if len(block) != len(self.sources) or not known:
            return None
        groups = {size // block[i] for i, size in known.items()}
        return groups.pop() * block[index] if len(groups) == 1 else None

    def join(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        import torch

        block = list(self.sizes or [])
        if len(block) != len(tensors):
            raise OpError(f"{self.describe()}: give sizes=, one a source, the rows per group")
        dim = _dim_of(self, key, tensors[0], self.dim)
        counts = {_group_count(self, key, t.shape[dim], [b]) for t, b in zip(tensors, block)}
        if len(counts) != 1:
            raise OpError(f"{self.describe()}: the sources hold different numbers of groups")
        groups = counts.pop()
        grouped = [t.unflatten(dim, (groups, b)) for t, b in zip(tensors, block)]
        return torch.cat(grouped, dim=dim + 1).flatten(dim, dim + 1)

    def inverse(self) -> Op:
        return SplitInterleaved(
            self.target, list(self.sources), self.dim, self.sizes, missing_ok=self.missing_ok
        )

    def describe(self) -> str:
        return f"merge interleaved {list(self.sources)!r} -> {self.target!r} ({self.sizes} a group)"


#: :attr:`Pad.fill` that fills new rows with the mean of the existing ones
MEAN = "mean"
#: a :class:`Pad` read from a file adds at most this many values to one tensor (1 GiB of fp32)
MAX_RECORDED_GROWTH = 2**28


@dataclass
class Pad(TensorOp):
    """Grow ``dim`` of matching tensors to ``size`` (or the next multiple of ``multiple``),
    filling the new rows with ``fill``: a number, or ``"mean"`` (the mean of the existing rows,
    the usual start for new vocabulary embeddings).

    ``Pad("{p}embed.weight", multiple=64, from_size=50257)``: with ``from_size`` (the size
    before, checked on every tensor) the inverse is :class:`Slice` back to it. Optimizer state
    of the new rows starts at zero, as a fresh parameter's does.
    """

    size: int | None = None
    dim: int = 0
    multiple: int | None = None
    from_size: int | None = None
    fill: float | str = 0.0
    #: the most elements one padding may add (set for a pad read from a file)
    growth_limit: int | None = field(default=None, init=False, repr=False, compare=False)
    follows_adapter = True

    def adapter_dim(self) -> int:
        return self.dim

    def new_size(self, old: int) -> int:
        if (self.size is None) == (self.multiple is None):
            raise OpError(f"{self.describe()}: give size= or multiple=, one of them")
        if self.size is not None:
            if self.size < 0:
                raise OpError(f"{self.describe()}: size={self.size}, expected a size >= 0")
            return self.size
        assert self.multiple is not None
        if self.multiple < 1:
            raise OpError(f"{self.describe()}: multiple={self.multiple}, expected a multiple >= 1")
        return -(-old // self.multiple) * self.multiple

    def as_recorded(self) -> Pad:
        self.growth_limit = MAX_RECORDED_GROWTH
        return self

    def transform(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch

        dim = _dim_of(self, self.template, tensor, self.dim)
        old = tensor.shape[dim]
        new = self.new_size(old)
        if self.from_size is not None and old != self.from_size:
            raise OpError(f"{self.describe()}: a tensor has size {old}, not {self.from_size}")
        if new < old:
            raise OpError(f"{self.describe()}: size {old} is already above {new}; Slice cuts")
        shape = list(tensor.shape)
        shape[dim] = new - old
        added = math.prod(shape)
        if self.growth_limit is not None and added > self.growth_limit:
            raise OpError(
                f"{self.describe()}: a pad read from the file adds at most {self.growth_limit} "
                f"values to a tensor, and this one would add {added}"
            )
        if self.fill == MEAN:
            if not tensor.is_floating_point():
                raise OpError(f"{self.describe()}: fill='mean' needs floats, not {tensor.dtype}")
            extra = tensor.mean(dim=dim, keepdim=True).expand(shape)
        elif isinstance(self.fill, (int, float)) and not isinstance(self.fill, bool):
            exact = tensor.is_floating_point() or tensor.is_complex()
            if not exact and (not math.isfinite(self.fill) or self.fill != int(self.fill)):
                raise OpError(
                    f"{self.describe()}: fill={self.fill!r} on a {tensor.dtype} tensor would "
                    "be written as another number: give a whole-number fill"
                )
            try:
                extra = torch.full(shape, self.fill, dtype=tensor.dtype)
            except RuntimeError as exc:  # a fill out of the dtype's range
                raise OpError(f"{self.describe()}: fill={self.fill!r}: {exc}") from None
            if not exact and added and int(extra.reshape(-1)[0]) != self.fill:
                raise OpError(
                    f"{self.describe()}: fill={self.fill!r} does not fit a {tensor.dtype} tensor"
                )
        else:
            raise OpError(f"{self.describe()}: fill={self.fill!r}, expected a number or 'mean'")
        return torch.cat([tensor, extra], dim=dim)

    def for_state(self) -> Op:
        return replace(self, fill=0.0)

    def inverse(self) -> Op | None:
        if self.from_size is None:
            return None
        return Slice(
            self.template,
            self.from_size,
            self.dim,
            from_size=self.new_size(self.from_size),
            fill=self.fill,
            missing_ok=self.missing_ok,
        )

    def describe(self) -> str:
        to = self.size if self.size is not None else f"a multiple of {self.multiple}"
        return f"pad {self.template!r} dim {self.dim} to {to} (fill {self.fill!r})"


@dataclass
class Slice(TensorOp):
    """Keep the first ``size`` entries along ``dim`` of matching tensors (a vocabulary unpadded).

    With ``from_size`` (the size before, checked) the inverse is :class:`Pad` back to it with
    ``fill``: the rows cut are gone, and come back as the fill.
    """

    size: int = 0
    dim: int = 0
    from_size: int | None = None
    fill: float | str = 0.0
    follows_adapter = True

    def adapter_dim(self) -> int:
        return self.dim

    def transform(self, tensor: torch.Tensor) -> torch.Tensor:
        dim = _dim_of(self, self.template, tensor, self.dim)
        old = tensor.shape[dim]
        if self.from_size is not None and old != self.from_size:
            raise OpError(f"{self.describe()}: a tensor has size {old}, not {self.from_size}")
        if not 0 <= self.size <= old:
            raise OpError(f"{self.describe()}: size {old} is below {self.size}; Pad grows")
        return tensor.narrow(dim, 0, self.size).clone()

    def inverse(self) -> Op | None:
        if self.from_size is None:
            return None
        return Pad(
            self.template,
            self.from_size,
            self.dim,
            from_size=self.size,
            fill=self.fill,
            missing_ok=self.missing_ok,
        )

    def describe(self) -> str:
        return f"slice {self.template!r} dim {self.dim} to {self.size}"
