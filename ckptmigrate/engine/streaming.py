"""The writers that copy stored bytes: tensors a plan kept as they were are never loaded.

When every planned step is a list of ops that change key names and hparams only
(:attr:`~ckptmigrate.ops.Op.metadata_only`: renames, drops, hparam changes), the rewrite
pipeline (:mod:`ckptmigrate.engine.rewrite`) runs the plan on a checkpoint of metadata stubs, and
these writers produce the output by copying each kept tensor's stored bytes with
``os.copy_file_range``: memory stays a small multiple of the pickle or header size.

- torch.save zip files: a new ``data.pkl`` (torch's own pickle layout) plus every storage record
  it references, byte for byte (CRC and 64-byte alignment kept); dropped storages are left out.
- safetensors files: a new header plus the kept tensors' bytes.
- sharded sets: each shard rewritten under a fresh name, the index replaced last, atomically
  (:mod:`~.formats.set_swap`); :func:`write_set` regroups a set whose tensors were loaded.

Every file is written atomically and durably (temporary, fsync, rename, fsync of the folder);
the disk starts writing while the copy runs (:class:`~.formats.atomic.Writeback`), so on a
1.26 GB file the wait for the disk is most of the time left, and the fsync is what it buys.

A plan that is not metadata-only runs on the tensors mapped from the file; its result is
written by :func:`save_torch_zip` and :func:`save_safetensors`, which copy every tensor the
plan left as it was (:class:`~.unchanged.InputBytes`) as stored, and write only the new ones
from memory.

Every copied record lies at the same offset modulo a block as in its source, so on a file
system that clones (XFS reflink, btrfs) its aligned middle is shared, not copied
(:mod:`~.formats.byte_copy`).

A writer that cannot reproduce its input (a pickle the byte copier cannot replay, a legacy
.bin shard) raises :class:`~ckptmigrate.errors.NotReplayableError`, having left nothing
behind; the pipeline then writes the loaded tensors instead.

>>> new = upgrade_stubs(read_metadata("model.pth"), schema)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.version import Version

from ..errors import CheckpointWriteError, NotReplayableError
from ..formats.layout import assemble
from ..schema.graph import PlannedStep
from ..schema.ops import Op
from ..schema.schema import Schema
from ..values.checkpoint import Checkpoint
from ..values.stamp import stamp_of as _stamp_of
from .unchanged import InputBytes
from .upgrade import check_belongs, upgrade

__all__ = [
    "Copied",
    "copy_safetensors",
    "copy_set",
    "copy_torch_zip",
    "metadata_only",
    "save_safetensors",
    "save_torch_zip",
    "upgrade_stubs",
    "write_set",
]


@dataclass
class Copied:
    """What a copying writer moved: bytes copied as stored, bytes that went through Python,
    and (a set rewritten) the old shards deleted after the swap."""

    bytes_copied: int = 0
    bytes_through_python: int = 0
    removed: list[str] | None = None


def metadata_only(plan: Sequence[PlannedStep]) -> bool:
    """Whether every step of ``plan`` is ops that change key names and hparams only."""
    return all(_key_ops(planned) is not None for planned in plan)


def _key_ops(planned: PlannedStep) -> list[Op] | None:
    """The ops a step runs, when every one changes key names and hparams only; else None."""
    ops = planned.ops
    return ops if ops is not None and all(op.metadata_only for op in ops) else None


def upgrade_stubs(
    ckpt: Checkpoint, schema: Schema, to: str | Version | None = None
) -> Checkpoint | None:
    """Run the plan on a checkpoint of tensor stubs, or return None if a step needs data.

    Same result, history and errors as :func:`ckptmigrate.upgrade` for plans made of
    metadata-only ops (:attr:`~ckptmigrate.ops.Op.metadata_only`); torch is not imported.

    >>> new = upgrade_stubs(read_metadata("model.pth"), schema)
    """
    if not metadata_only(schema.plan(check_belongs(ckpt, schema), to, history=ckpt.history)):
        return None
    # key-only ops run by the ordinary upgrade touch no tensor and import no torch
    return upgrade(ckpt, schema, to)


def copy_torch_zip(graph: Any, new: Checkpoint, dst: Path) -> Copied:
    """Write ``new`` (stubs of ``graph``'s file) as a torch.save zip, storages copied."""
    from ..formats.torch import write_zip_graph

    writer = write_zip_graph(dst, graph, assemble(new, _stamp_of(new)))
    return Copied(writer.bytes_copied, writer.bytes_through_python)


def copy_safetensors(src: Path, old: Checkpoint, new: Checkpoint, dst: Path) -> Copied:
    """Write ``new`` (stubs of ``old``, read from the safetensors file ``src``), bytes copied."""
    from ..formats.safetensors_copy import data_start, write_safetensors_copy

    start = data_start(src)
    sources = {
        id(stub): (src, start + stub.info.data_offsets[0])
        for stub in old.state_dict.values()
        if getattr(stub, "info", None) is not None and stub.info.data_offsets
    }
    copied, through = write_safetensors_copy(
        dst, list(new.state_dict.items()), sources, _safetensors_metadata(new)
    )
    return Copied(copied, through)


def save_torch_zip(graph: Any, inputs: InputBytes, new: Checkpoint, dst: Path) -> Copied:
    """Write ``new`` (tensors, mostly ``graph``'s file's own, mapped) as a torch.save zip: each
    storage that is an input record unchanged is copied as stored, the rest written."""
    from ..formats.torch import save_copying

    writer = save_copying(dst, assemble(new, _stamp_of(new)), graph, inputs.storage_record)
    return Copied(writer.bytes_copied, writer.bytes_through_python)


def save_safetensors(
    inputs: InputBytes, new: Checkpoint, dst: Path, *, origins: dict[Any, Any] | None = None
) -> Copied:
    """Write ``new``'s tensors as a safetensors file: each one whose bytes are an input's,
    unchanged, copied as stored; the others written from memory; tied names stored once.
    ``origins``: the objects local inputs are private copies of (:mod:`~.formats.sink`)."""
    from ..formats.safetensors_copy import write_safetensors_parts

    metadata = _safetensors_metadata(new)
    parts = tensor_parts(new.state_dict, inputs)
    copied, through = write_safetensors_parts(dst, parts, metadata, origins=origins)
    return Copied(copied, through)


def tensor_parts(tensors: dict[str, Any], inputs: InputBytes) -> list[tuple[str, Any]]:
    """The safetensors parts of ``tensors``: the same tensor (same memory and view) under
    several keys is one part; a part is copied where its bytes are an input's."""
    import torch

    from ..formats.safetensors_copy import Part
    from ..formats.torch import storage_buffer

    parts: dict[tuple, Any] = {}
    out: list[tuple[str, Any]] = []
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointWriteError(
                f"safetensors holds tensors only, but {key!r} is a {type(value).__name__}: "
                "save this checkpoint as .pth instead"
            )
        value = value.detach()
        ident = (
            (
                value.data_ptr(),
                value.storage_offset(),
                tuple(value.shape),
                value.stride(),
                value.dtype,
            )
            if value.numel()
            else (id(value),)
        )
        if ident not in parts:
            dtype = str(value.dtype).removeprefix("torch.")
            nbytes = value.numel() * value.element_size()
            at = inputs.tensor_bytes(value)
            if at is not None:
                parts[ident] = Part(dtype, tuple(value.shape), nbytes, source=at)
            else:
                dense = value.contiguous()
                data = storage_buffer(dense.untyped_storage())
                start = dense.storage_offset() * dense.element_size()
                parts[ident] = Part(
                    dtype, tuple(value.shape), nbytes, data=data[start : start + nbytes], keep=dense
                )
        out.append((key, parts[ident]))
    return out


def _header_stamp(new: Checkpoint) -> Checkpoint:
    """What a shard's header says of the set: its stamp, mounts included, hparams and meta."""
    return Checkpoint(
        {}, new.hparams, new.meta, new.schema, new.version, new.history, mounts=new.mounts
    )


def _safetensors_metadata(ckpt: Checkpoint) -> dict[str, str]:
    """The header strings ``files.write_checkpoint`` writes for a checkpoint."""
    import json

    from ..formats import safetensors_file as st

    extra = dict(ckpt.extra)
    passthrough = extra.pop("safetensors_metadata", None) or {}
    if ckpt.optimizer is not None or extra:
        raise CheckpointWriteError(
            "a .safetensors file holds tensors only; save this checkpoint as .pth"
        )
    stamp = _stamp_of(ckpt)
    out = dict(passthrough)
    for key, value in (
        (st.STAMP, stamp),
        (st.HPARAMS, ckpt.hparams if stamp or ckpt.hparams else None),
        (st.META, ckpt.meta if stamp or ckpt.meta else None),
        (st.MODULE_METADATA, ckpt.module_metadata),
    ):
        if value is not None:
            try:
                out[key] = json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise CheckpointWriteError(
                    f"{key.split('.')[-1]} must be JSON-serialisable for safetensors ({exc})"
                ) from None
    return out


def set_output(sset: Any, dst: Path) -> Any:
    """Where a set rewritten to ``dst`` goes (checked: nothing ckptmigrate did not write is
    replaced), its folder made."""
    from ..formats import sharded

    out = sharded.output_for(sset, dst)
    sharded.check_output(sset, out)
    out.folder.mkdir(parents=True, exist_ok=True)
    return out


def copy_set(sset: Any, old: Checkpoint, new: Checkpoint, dst: Path) -> Copied:
    """Rewrite a sharded set shard by shard (``new``: stubs of ``old``), bytes copied; the new
    index replaces the old one last. Raises :class:`NotReplayableError` (nothing left) when a
    .bin shard cannot be replayed."""
    from ..formats import sharded
    from ..formats.set_swap import SetSwap

    out = set_output(sset, dst)
    folder, index_name = out.folder, out.index_name
    # which old shard each kept stub came from, in the new key order
    home: dict[int, str] = {}
    for key, value in old.state_dict.items():
        home.setdefault(id(value), sset.weight_map[key])
    by_shard: dict[str, list[tuple[str, Any]]] = {s: [] for s in sset.shards}
    for key, value in new.state_dict.items():
        by_shard[home[id(value)]].append((key, value))

    swap = SetSwap.replacing(folder, index_name, _replaced(sset, folder, index_name))
    kept = [(shard, entries) for shard, entries in by_shard.items() if entries]
    jobs = [
        (
            shard,
            swap.fresh_name(
                out.shard(i, len(kept), sset.kind, like=shard),
                [str(new.version), shard, [(k, list(v.shape)) for k, v in entries]],
            ),
            entries,
        )
        for i, (shard, entries) in enumerate(kept, 1)
    ]
    weight_map: dict[str, str] = {}
    total = 0
    done = Copied()
    try:
        swap.start()
        for shard, name, entries in jobs:
            target = folder / name
            if sset.kind == "safetensors":
                from ..formats.safetensors_copy import write_safetensors_copy

                meta = _safetensors_metadata(_header_stamp(new))
                meta = {**sset.headers.get(shard, {}), **meta}
                copied, through = write_safetensors_copy(target, entries, sset.sources, meta)
            else:
                if shard not in sset.graphs:
                    raise NotReplayableError("a legacy .bin shard has no zip records to copy")
                copied, through = _rewrite_bin_shard(sset.graphs[shard], target, entries)
            swap.wrote(name)
            done.bytes_copied += copied
            done.bytes_through_python += through
            weight_map.update((key, name) for key, _ in entries)
            total += sum(v.info.nbytes for v in {id(v): v for _, v in entries}.values())
        sharded.copy_companions(sset, folder)
        swap.commit(sset.index, weight_map, total, sharded.index_metadata(new, _stamp_of(new)))
    except BaseException:
        swap.abort()  # the new shards no index names go; after the commit, the old ones
        raise
    done.removed = swap.finish()
    return done


def _replaced(sset: Any, folder: Path, index_name: str) -> dict[str, list[int]] | None:
    """The shards the index written at ``folder / index_name`` replaces, as read: the set's
    own when it is rewritten in place; else None (those of whatever index is there)."""
    if (folder / index_name).resolve() == sset.index_path.resolve():
        return dict(sset.identities)
    return None


def _rewrite_bin_shard(graph: Any, dst: Path, entries: list[tuple[str, Any]]) -> tuple[int, int]:
    """A .bin shard holds a flat state_dict: re-pickle the kept keys, copy their storages."""
    from collections import OrderedDict

    obj: OrderedDict[str, Any] = OrderedDict(entries)
    metadata = getattr(graph.obj, "_metadata", None)
    if metadata is not None:
        obj._metadata = metadata  # type: ignore[attr-defined]
    from ..formats.torch import write_zip_graph

    writer = write_zip_graph(dst, graph, obj)
    return writer.bytes_copied, writer.bytes_through_python


def write_set(sset: Any, new: Checkpoint, dst: Path, inputs: InputBytes | None = None) -> Copied:
    """Write a set's loaded tensors (``new``), re-sharded by the old largest shard size.

    Safetensors shards copy each tensor whose bytes are an input's, unchanged (``inputs``: the
    set mapped, as the plan ran on it), as stored and write only the others."""
    from ..formats import sharded
    from ..formats.safetensors_copy import write_safetensors_parts
    from ..formats.safetensors_file import write_safetensors
    from ..formats.set_swap import SetSwap
    from ..formats.torch import write_torch

    out = set_output(sset, dst)
    limit = max((sset.folder / s).stat().st_size for s in sset.shards) if sset.shards else 1 << 30
    groups = [
        dict(group)
        for group in sharded.group_by_size(
            new.state_dict.items(), lambda kv: kv[1].numel() * kv[1].element_size(), limit
        )
    ]
    folder, index_name = out.folder, out.index_name
    swap = SetSwap.replacing(folder, index_name, _replaced(sset, folder, index_name))
    names = [
        swap.fresh_name(
            out.shard(i, len(groups), sset.kind),
            [str(new.version), [(k, list(v.shape)) for k, v in group.items()]],
        )
        for i, group in enumerate(groups, 1)
    ]
    weight_map: dict[str, str] = {}
    total = copied = through = 0
    try:
        swap.start()
        for name, group in zip(names, groups):
            if sset.kind == "safetensors":
                meta = _safetensors_metadata(_header_stamp(new))
                # the set's own header entries (HF's format: pt) on every re-grouped shard
                meta = {**sset.shared_header, **meta}
                if inputs is not None and len(inputs):
                    done = write_safetensors_parts(folder / name, tensor_parts(group, inputs), meta)
                    copied, through = copied + done[0], through + done[1]
                else:
                    write_safetensors(folder / name, group, {}, passthrough=meta)
            else:
                write_torch(folder / name, dict(group))
            swap.wrote(name)
            weight_map.update((k, name) for k in group)
            total += sum(t.numel() * t.element_size() for t in group.values())
        sharded.copy_companions(sset, folder)
        swap.commit(sset.index, weight_map, total, sharded.index_metadata(new, _stamp_of(new)))
    except BaseException:
        swap.abort()
        raise
    return Copied(copied, through, removed=swap.finish())
