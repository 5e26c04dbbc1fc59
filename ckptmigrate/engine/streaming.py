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

A plan of metadata-only ops and Merges and Splits along dim 0 (:func:`runs_on_stubs`) runs on
the stubs too: a merged or split tensor is runs of its inputs' stored bytes
(:class:`~ckptmigrate.values.pieces.DerivedStub`), which these writers copy (a torch zip: a
split part a view of its record, a merged tensor a new record whose CRC is combined from its
parts', :mod:`~.formats.crc`); where that cannot be said the writer raises
:class:`~ckptmigrate.errors.NotReplayableError` and the plan runs on the tensors. A .bin
shard left holding what it held is copied whole (or kept, in place).

Any other plan runs on the tensors mapped from the file; its result is
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

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.version import Version

from ..errors import CheckpointWriteError, NotReplayableError
from ..formats.byte_copy import copy_file
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
    "runs_on_stubs",
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


def runs_on_stubs(plan: Sequence[PlannedStep]) -> bool:
    """Whether every step of ``plan`` is ops that run on tensor stubs: metadata-only ones, and
    Merge and Split along dim 0, whose results are runs of their inputs' stored bytes
    (:mod:`ckptmigrate.values.pieces`: the writers copy those runs)."""
    return all(
        planned.ops is not None and all(op.runs_on_stubs for op in planned.ops) for planned in plan
    )


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
    # which old shard each kept stub came from, in the new key order (a merged or split
    # tensor: its first piece's)
    home: dict[int, str] = {}
    for key, value in old.state_dict.items():
        home.setdefault(id(value), sset.weight_map[key])
    by_shard: dict[str, list[tuple[str, Any]]] = {s: [] for s in sset.shards}
    for key, value in new.state_dict.items():
        by_shard[_home_of(value, home)].append((key, value))

    replaced = _replaced(sset, folder, index_name)
    swap = SetSwap.replacing(folder, index_name, replaced)
    kept = [(shard, entries) for shard, entries in by_shard.items() if entries]
    jobs = []
    for i, (shard, entries) in enumerate(kept, 1):
        # a .bin shard holding what it held (the stamp lives in the index) is copied whole,
        # or, in place, left as it is: the new index names it again
        whole = sset.kind == "bin" and sharded.unchanged_shard(
            sset, shard, dict(entries), old.state_dict
        )
        if whole and replaced is not None and out.stem is None:
            jobs.append((shard, shard, entries, whole))
            continue
        name = swap.fresh_name(
            out.shard(i, len(kept), sset.kind, like=shard),
            [str(new.version), shard, [(k, list(v.shape)) for k, v in entries]],
        )
        jobs.append((shard, name, entries, whole))
    weight_map: dict[str, str] = {}
    total = 0
    done = Copied()
    try:
        swap.start()
        for shard, name, entries, whole in jobs:
            target = folder / name
            if whole:
                if name != shard:
                    done.bytes_through_python += copy_file(sset.folder / shard, target)
                    done.bytes_copied += target.stat().st_size
                    swap.wrote(name)
            elif sset.kind == "safetensors":
                from ..formats.safetensors_copy import write_safetensors_copy

                meta = _safetensors_metadata(_header_stamp(new))
                meta = {**sset.headers.get(shard, {}), **meta}
                copied, through = write_safetensors_copy(target, entries, sset.sources, meta)
                swap.wrote(name)
                done.bytes_copied += copied
                done.bytes_through_python += through
            else:
                if shard not in sset.graphs:
                    raise NotReplayableError("a legacy .bin shard has no zip records to copy")
                others = [g for s, g in sset.graphs.items() if s != shard]
                copied, through = _rewrite_bin_shard(sset.graphs[shard], target, entries, others)
                swap.wrote(name)
                done.bytes_copied += copied
                done.bytes_through_python += through
            weight_map.update((key, name) for key, _ in entries)
            total += _stub_bytes(entries, sset, shard)
        sharded.copy_companions(sset, folder)
        swap.commit(sset.index, weight_map, total, sharded.index_metadata(new, _stamp_of(new)))
    except BaseException:
        swap.abort()  # the new shards no index names go; after the commit, the old ones
        raise
    done.removed = swap.finish()
    return done


def _stub_bytes(entries: list[tuple[str, Any]], sset: Any, shard: str) -> int:
    """The tensor bytes a shard written from the stubs ``entries`` (homed in the old
    ``shard``) holds, each counted once: a safetensors shard's tensors (one stub under several
    keys stored once), a .bin shard's storages (the record a stub or a split's part, a view,
    lies in; a merged tensor's new record), as :func:`_held_bytes` counts tensors."""
    from ..values.pieces import DerivedStub

    if sset.kind != "bin":
        return sum(v.info.nbytes for v in {id(v): v for _, v in entries}.values())
    graph = sset.graphs.get(shard)
    held: dict[Any, int] = {}
    for _, value in entries:
        if isinstance(value, DerivedStub) and len(value.pieces) == 1:
            value = value.pieces[0].stub  # a split's part: a view of its record
        info = value.info
        if isinstance(value, DerivedStub) or info.storage_key is None:
            held[id(value)] = info.nbytes  # a merged tensor: a record of its own
            continue
        record = graph.records.get(info.storage_key) if graph is not None else None
        extent = info.storage_offset * info.itemsize + info.nbytes  # a legacy shard's
        size = record.size if record is not None else extent
        held[info.storage_key] = max(held.get(info.storage_key, 0), size)
    return sum(held.values())


def _replaced(sset: Any, folder: Path, index_name: str) -> dict[str, list[int]] | None:
    """The shards the index written at ``folder / index_name`` replaces, as read: the set's
    own when it is rewritten in place; else None (those of whatever index is there)."""
    if (folder / index_name).resolve() == sset.index_path.resolve():
        return dict(sset.identities)
    return None


def _home_of(value: Any, home: dict[int, str]) -> str:
    """The old shard a stub of the result is written into: its own, or (a merged or split
    tensor) its first piece's."""
    from ..values.pieces import DerivedStub

    if isinstance(value, DerivedStub):
        if not value.pieces:
            raise NotReplayableError("an empty merged tensor has no shard")
        value = value.pieces[0].stub
    return home[id(value)]


def _rewrite_bin_shard(
    graph: Any, dst: Path, entries: list[tuple[str, Any]], others: Sequence[Any] = ()
) -> tuple[int, int]:
    """A .bin shard holds a flat state_dict: re-pickle the kept keys, copy their storages (a
    merged tensor's pieces from wherever they lie: ``others``, the set's other shards)."""
    from collections import OrderedDict

    obj: OrderedDict[str, Any] = OrderedDict(entries)
    metadata = getattr(graph.obj, "_metadata", None)
    if metadata is not None:
        obj._metadata = metadata  # type: ignore[attr-defined]
    from ..formats.torch import write_zip_graph

    writer = write_zip_graph(dst, graph, obj, others)
    return writer.bytes_copied, writer.bytes_through_python


def write_set(
    sset: Any,
    new: Checkpoint,
    dst: Path,
    inputs: InputBytes | None = None,
    loaded: Checkpoint | None = None,
) -> Copied:
    """Write a set's loaded tensors (``new``), re-sharded by the old largest shard size.

    Safetensors shards copy each tensor whose bytes are an input's, unchanged (``inputs``: the
    set mapped, as the plan ran on it), as stored and write only the others. A .bin shard
    that would hold what it holds (its keys, in order, each the very tensor ``loaded`` had
    there, bytes unchanged: the stamp lives in the index) is copied whole, or left as it is
    in place; only the other tensors are re-sharded and written."""
    from ..formats import sharded
    from ..formats.safetensors_copy import write_safetensors_parts
    from ..formats.safetensors_file import write_safetensors
    from ..formats.set_swap import SetSwap
    from ..formats.torch import write_torch

    out = set_output(sset, dst)
    # what a shard stores each key's tensor as, and its bytes: asked once per key
    held = {key: _held_once(value, sset.kind) for key, value in new.state_dict.items()}
    whole = _unchanged_shards(sset, new, inputs, loaded, held)
    in_whole = {k for shard in whole for k in sset.contents[shard]}
    rest = [(k, v) for k, v in new.state_dict.items() if k not in in_whole]
    limit = max((sset.folder / s).stat().st_size for s in sset.shards) if sset.shards else 1 << 30
    groups = []
    if rest or not whole:
        # keys that share what a shard stores once (a tied weight) stay in one shard
        groups = [
            dict(group)
            for group in sharded.group_by_size(
                rest, lambda kv: held[kv[0]][1], limit, held_as=lambda kv: held[kv[0]][0]
            )
        ]
    folder, index_name = out.folder, out.index_name
    replaced = _replaced(sset, folder, index_name)
    swap = SetSwap.replacing(folder, index_name, replaced)
    count = len(whole) + len(groups)
    copies: list[tuple[str, str]] = []  # (old shard, new name) copied whole
    name_of: dict[str, str] = {}
    for i, shard in enumerate(whole, 1):
        if replaced is not None and out.stem is None:
            name = shard  # in place: the new index names it again
        else:
            name = swap.fresh_name(
                out.shard(i, count, sset.kind, like=shard), [str(new.version), shard, "whole"]
            )
            copies.append((shard, name))
        name_of.update((k, name) for k in sset.contents[shard])
    names = [
        swap.fresh_name(
            out.shard(len(whole) + i, count, sset.kind),
            [str(new.version), [(k, list(v.shape)) for k, v in group.items()]],
        )
        for i, group in enumerate(groups, 1)
    ]
    total = copied = through = 0
    try:
        swap.start()
        for shard, name in copies:
            through += copy_file(sset.folder / shard, folder / name)
            copied += (folder / name).stat().st_size
            swap.wrote(name)
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
            elif sset.graphs and inputs is not None and len(inputs):
                done = _save_bin_group(folder / name, group, sset, inputs)
                copied, through = copied + done[0], through + done[1]
            else:
                write_torch(folder / name, dict(group))
            swap.wrote(name)
            name_of.update((k, name) for k in group)
        total = _held_bytes(held.values())
        weight_map = {k: name_of[k] for k in new.state_dict}
        sharded.copy_companions(sset, folder)
        swap.commit(sset.index, weight_map, total, sharded.index_metadata(new, _stamp_of(new)))
    except BaseException:
        swap.abort()
        raise
    return Copied(copied, through, removed=swap.finish())


def _held_once(value: Any, kind: str) -> tuple[Any, int]:
    """What a shard of ``kind`` stores ``value`` as, once whichever keys name it, and its bytes:
    a .bin shard (torch.save) its whole storage, a safetensors shard the tensor (the same
    memory, shape and stride: one entry, the other keys aliases)."""
    import torch

    if not isinstance(value, torch.Tensor):
        return ("object", id(value)), 0
    if kind == "bin":
        storage = value.untyped_storage()
        return ("storage", storage._cdata), storage.nbytes()
    nbytes = value.numel() * value.element_size()
    if not nbytes:
        return ("empty", id(value)), 0
    view = (value.data_ptr(), value.storage_offset(), tuple(value.shape), value.stride())
    return ("tensor", *view, value.dtype), nbytes


def _held_bytes(held: Iterable[tuple[Any, int]]) -> int:
    """The tensor bytes shards hold for what they store (:func:`_held_once` of each key),
    each storage (.bin) or tensor (safetensors) counted once: a set index's ``total_size``,
    as transformers and huggingface_hub count it."""
    return sum(dict(held).values())


def _save_bin_group(
    target: Path, group: dict[str, Any], sset: Any, inputs: InputBytes
) -> tuple[int, int]:
    """A re-grouped .bin shard saved as torch.save would, each storage that is a record of one
    of the set's shards, unchanged, copied as stored (from whichever shard holds it); the
    others written from memory. Returns ``(bytes copied, bytes that went through Python)``."""
    from ..formats.torch import save_copying
    from ..formats.torch.zip_writer import JoinedRecord

    # the shard says this machine's byte order (its new tensors' bytes are memory's), so
    # only records stored in that order are copied: laid out like a shard of that order
    native = {g.path for g in sset.graphs.values() if g.byteorder() == sys.byteorder}
    graphs = list(sset.graphs.values())
    layout = next((g for g in graphs if g.path in native), graphs[0])

    def stored(storage: Any) -> Any:
        found = inputs.stored_storage(storage)
        if found is None or found.record is None or found.path not in native:
            return None
        if found.path == layout.path:
            return found.record
        record = found.record
        return JoinedRecord(((found.path, record.data_offset, record.size),), record.crc)

    writer = save_copying(target, dict(group), layout, stored)
    return writer.bytes_copied, writer.bytes_through_python


def _unchanged_shards(
    sset: Any,
    new: Checkpoint,
    inputs: InputBytes | None,
    loaded: Checkpoint | None,
    held: dict[str, tuple[Any, int]],
) -> list[str]:
    """The .bin shards of ``sset`` that ``new`` holds as they were: each of their keys, in
    order, with the very tensor ``loaded`` had there, whose stored record is unchanged.
    ``held``: :func:`_held_once` of each key's tensor."""
    from ..formats import sharded

    if sset.kind != "bin" or loaded is None or inputs is None:
        return []
    originals = loaded.state_dict
    entries: dict[str, dict[str, Any]] = {}
    for key, value in new.state_dict.items():
        shard = sset.weight_map.get(key)
        if shard is not None and originals.get(key) is value:
            entries.setdefault(shard, {})[key] = value
    # where each storage is named from: a shard copied whole must hold every key naming its
    # storages (a step that tied a new key to one of them re-groups the shard with it)
    homes: dict[Any, set[str | None]] = {}
    for key in new.state_dict:
        shard = sset.weight_map.get(key)
        home = shard if key in entries.get(shard or "", {}) else None
        homes.setdefault(held[key][0], set()).add(home)
    out = []
    for shard, kept in entries.items():
        if not sharded.unchanged_shard(sset, shard, kept, originals):
            continue
        if any(homes[held[key][0]] != {shard} for key in kept):
            continue
        # the bytes as read: a record whose pages were written after the load is refused
        if all(inputs.storage_record(t.untyped_storage()) is not None for t in kept.values()):
            out.append(shard)
    return out
