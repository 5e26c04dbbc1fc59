"""Upgrade checkpoint files at close to disk speed: rewrite the metadata, copy the tensor bytes.

When every planned step is a list of ops that change key names and hparams only
(:attr:`~ckptmigrate.ops.Op.metadata_only`: renames, drops, hparam changes), the plan runs on a checkpoint of metadata stubs and the output is written by
copying each kept tensor's stored bytes with ``os.copy_file_range``: no tensor is loaded, and
memory stays a small multiple of the pickle or header size.

- torch.save zip files: a new ``data.pkl`` (torch's own pickle layout) plus every storage record
  it references, byte for byte (CRC and 64-byte alignment kept); dropped storages are left out.
- safetensors files: a new header plus the kept tensors' bytes.
- sharded sets: each shard rewritten under a fresh name, the index replaced last, atomically
  (:mod:`~.formats.set_swap`).
- model folders of one weights file (``save_pretrained`` of a small model): that file, as above.
- DCP folders: see :mod:`ckptmigrate.formats.dcp`.

Every file is written atomically and durably (temporary, fsync, rename, fsync of the folder);
the disk starts writing while the copy runs (:class:`~.formats.atomic.Writeback`), so on a
1.26 GB file the wait for the disk is most of the time left, and the fsync is what it buys.

Anything else (a function step, a tensor op such as Split/Merge/Cast, a pickle the byte copier
cannot reproduce, optimizer state that must follow the renames, a legacy pre-zip file) takes
the full path: ``torch.load(mmap=True)`` (pages mapped, not read up front), ``cm.upgrade``, and an
atomic ``torch.save``. :attr:`FileUpgrade.streamed` says which path ran.

>>> result = cm.upgrade_file("big.pth", "big-v2.pth", schema)
>>> result.streamed, result.bytes_copied
(True, 1207959552)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.version import Version

from .checkpoint import Checkpoint
from .errors import CheckpointWriteError, NotReplayableError
from .formats.atomic import permissions_from
from .formats.detect import detect_format
from .graph import PlannedStep
from .layout import assemble, split
from .ops import Op
from .schema import Schema
from .stamp import stamp_of as _stamp_of
from .upgrade import check_belongs, upgrade

__all__ = [
    "FileUpgrade",
    "MountedUpgrade",
    "upgrade_file",
    "upgrade_stubs",
    "write_streamed",
]


class _NeedsLoad(Exception):
    """The byte copier cannot reproduce this shard: take the full path."""


@dataclass
class FileUpgrade:
    """What :func:`upgrade_file` did."""

    src: Path
    dst: Path
    format: str
    source_version: Version | None
    target_version: Version | None
    steps: list[str] = field(default_factory=list)
    streamed: bool = False  # True: tensor bytes copied as stored; False: loaded and re-saved
    bytes_copied: int = 0
    bytes_through_python: int = 0
    removed: list[str] = field(default_factory=list)  # old shards deleted after the swap


@dataclass
class MountedUpgrade:
    """What the writers run on a file with mounts, in place of one schema's plan: each
    mount's checked plan (its key prefix, schema and steps), by
    :func:`~ckptmigrate.mounts.upgrade_mount`. ``stamp``: a checkpoint whose stamp (root
    fields and mounts) the file gets as it is read (stamping a set: no plans)."""

    plans: list[tuple[str, Schema, list[PlannedStep]]] = field(default_factory=list)
    param_names: Sequence[str] | None = None
    stamp: Checkpoint | None = None

    def steps(self) -> list[PlannedStep]:
        return [planned for _, _, plan in self.plans for planned in plan]

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        from .mounts import upgrade_mount

        out = ckpt.copy()
        for prefix, schema, plan in self.plans:
            out = upgrade_mount(out, schema, prefix=prefix, plan=plan, param_names=self.param_names)
        return out

    def prepare(self, ckpt: Checkpoint) -> Checkpoint:
        if self.stamp is None:
            return ckpt
        out = ckpt.copy()
        given = self.stamp
        out.schema, out.version, out.history = given.schema, given.version, list(given.history)
        out.mounts = list(given.mounts)
        return out


#: One schema's upgrade (to ``to``), or the mounts' (see :class:`MountedUpgrade`).
Upgrade = Schema | MountedUpgrade


def _plan(ckpt: Checkpoint, how: Upgrade, to: Any, path: object = None) -> list[PlannedStep]:
    if isinstance(how, MountedUpgrade):
        return how.steps()
    return how.plan(check_belongs(ckpt, how, path=path), to)


def _run(ckpt: Checkpoint, how: Upgrade, to: Any, param_names: Any = None) -> Checkpoint:
    if isinstance(how, MountedUpgrade):
        return how.run(ckpt)
    return upgrade(ckpt, how, to, param_names=param_names)


def _header_stamp(new: Checkpoint) -> Checkpoint:
    """What a shard's header says of the set: its stamp, mounts included, hparams and meta."""
    return Checkpoint(
        {}, new.hparams, new.meta, new.schema, new.version, new.history, mounts=new.mounts
    )


def _key_ops(planned: PlannedStep) -> list[Op] | None:
    """The ops a step runs, when every one changes key names and hparams only; else None."""
    ops = planned.ops
    return ops if ops is not None and all(op.metadata_only for op in ops) else None


def upgrade_stubs(
    ckpt: Checkpoint, schema: Upgrade, to: str | Version | None = None
) -> Checkpoint | None:
    """Run the plan on a checkpoint of tensor stubs, or return None if a step needs data.

    Same result, history and errors as :func:`ckptmigrate.upgrade` for plans made of
    metadata-only ops (:attr:`~ckptmigrate.ops.Op.metadata_only`); torch is not imported.

    >>> new = upgrade_stubs(cm.files.read_metadata("model.pth"), schema)
    """
    plan = _plan(ckpt, schema, to)
    if any(_key_ops(planned) is None for planned in plan):
        return None
    # key-only ops run by the ordinary upgrade touch no tensor and import no torch
    return _run(ckpt, schema, to)


def upgrade_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    schema: Schema,
    *,
    to: str | Version | None = None,
    from_version: str | Version | None = None,
    safe_globals: Iterable[Any] = (),
    param_names: Sequence[str] | None = None,
) -> FileUpgrade:
    """Upgrade the checkpoint at ``src`` to ``to`` (default: current) and write it to ``dst``.

    ``src`` may be a torch.save file, a safetensors file, a sharded set (its folder or index
    JSON), a DCP folder or a model folder of one weights file (to a folder ``dst``: that file
    under its name, the config and tokenizer files beside it); ``dst`` gets the same format
    (``dst == src`` upgrades in place, atomically; for a set, ``X.index.json`` names the new
    index, anything else a folder: :func:`~.formats.sharded.output_for`). Nothing ckptmigrate
    did not write is replaced (:class:`~ckptmigrate.errors.OutputOccupiedError`). Rename/drop/hparam plans copy tensor bytes as stored (see the module doc);
    other plans load with ``mmap=True``, upgrade and save. ``from_version`` stamps an
    unversioned file on the way. Raises before writing anything if the plan is invalid.
    ``param_names`` names position-keyed optimizer state for steps that need its names (see
    :func:`ckptmigrate.upgrade`).

    >>> cm.upgrade_file("model.pth", "model-v3.pth", schema)
    >>> cm.upgrade_file("llama/", "llama/", schema)          # sharded set, in place
    """
    src, dst = Path(src), Path(dst)
    fmt = detect_format(src)
    with permissions_from(src):  # a private source gives a private copy
        if fmt == "dcp":
            return _upgrade_dcp(src, dst, schema, to, from_version, param_names)
        if fmt == "sharded":
            return _upgrade_sharded(src, dst, schema, to, from_version, safe_globals)
        if src.is_dir():  # a model folder: upgrade its weights file
            options: dict[str, Any] = dict(
                to=to, from_version=from_version, param_names=param_names
            )
            return _upgrade_model_folder(
                src,
                dst,
                lambda s, d: upgrade_file(s, d, schema, safe_globals=safe_globals, **options),
            )
        streamed = _try_stream(src, dst, fmt, schema, to, from_version, _names(safe_globals))
        if streamed is not None:
            return streamed
        return _upgrade_loaded(src, dst, fmt, schema, to, from_version, safe_globals, param_names)


def _with_version(ckpt: Checkpoint, schema: Upgrade, from_version: Any, path: Path) -> Checkpoint:
    if isinstance(schema, MountedUpgrade):
        return schema.prepare(ckpt)
    from .guess import apply_from_version

    return apply_from_version(ckpt, schema, from_version, path=path)


def _result(
    src: Path, dst: Path, fmt: str, old: Checkpoint, new: Checkpoint, schema: Upgrade, to: Any
) -> FileUpgrade:
    steps = [h.get("step", "") for h in new.history[len(old.history) :]]
    return FileUpgrade(src, dst, fmt, old.version, new.version, steps)


def _safetensors_metadata(ckpt: Checkpoint) -> dict[str, str]:
    """The header strings ``files.write_checkpoint`` writes for a checkpoint."""
    import json

    from .formats import safetensors_file as st

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


def _upgrade_loaded(
    src: Path,
    dst: Path,
    fmt: str,
    schema: Schema,
    to: Any,
    from_version: Any,
    safe_globals: Iterable[Any],
    param_names: Sequence[str] | None = None,
) -> FileUpgrade:
    """The full path: load (memory-mapped where torch can), upgrade, save atomically."""
    from .files import read_checkpoint, write_checkpoint
    from .upgrade import upgrade

    ckpt = read_checkpoint(src, mmap=fmt == "torch-zip", safe_globals=safe_globals)
    ckpt = _with_version(ckpt, schema, from_version, src)
    new = upgrade(ckpt, schema, to, param_names=param_names)
    write_checkpoint(dst, new)
    return _result(src, dst, fmt, ckpt, new, schema, to)


def _upgrade_sharded(
    src: Path,
    dst: Path,
    schema: Upgrade,
    to: Any,
    from_version: Any,
    safe_globals: Iterable[Any],
    work: Checkpoint | None = None,
) -> FileUpgrade:
    """Rewrite a sharded set shard by shard; the new index replaces the old one last.

    ``work``: the set already upgraded by the caller (loaded, its steps run once), written as
    it is when the plan cannot run on stubs, so no function step runs a second time.
    """
    from .formats import sharded
    from .formats.set_swap import SetSwap

    names = _names(safe_globals)
    ckpt, sset = sharded.read_sharded_metadata(src, allowed_globals=names)
    ckpt = _with_version(ckpt, schema, from_version, src)
    new = upgrade_stubs(ckpt, schema, to)
    out = sharded.output_for(sset, dst)
    sharded.check_output(sset, out)
    folder, index_name = out.folder, out.index_name
    folder.mkdir(parents=True, exist_ok=True)
    stamp = _stamp_of(new if new is not None else ckpt)
    result = _result(src, folder, "sharded", ckpt, new or ckpt, schema, to)
    loaded = dict(src=src, out=out, sset=sset, schema=schema)
    loaded.update(to=to, from_version=from_version, work=work, old=ckpt)
    if new is None:
        return _upgrade_sharded_loaded(**loaded)

    # which old shard each kept stub came from, in the new key order
    home: dict[int, str] = {}
    for key, value in ckpt.state_dict.items():
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
    try:
        swap.start()
        for shard, name, entries in jobs:
            target = folder / name
            if sset.kind == "safetensors":
                from .formats.safetensors_copy import write_safetensors_copy

                meta = _safetensors_metadata(_header_stamp(new))
                meta = {**sset.headers.get(shard, {}), **meta}
                copied, through = write_safetensors_copy(target, entries, sset.sources, meta)
            else:
                if shard not in sset.graphs:
                    raise _NeedsLoad
                copied, through = _rewrite_bin_shard(sset.graphs[shard], target, entries)
            swap.wrote(name)
            result.bytes_copied += copied
            result.bytes_through_python += through
            weight_map.update((key, name) for key, _ in entries)
            total += sum(v.info.nbytes for v in {id(v): v for _, v in entries}.values())
        sharded.copy_companions(sset, folder)
        swap.commit(sset.index, weight_map, total, sharded.index_metadata(new, stamp))
    except BaseException as exc:
        swap.abort()  # the new shards no index names go; after the commit, the old ones

        if isinstance(exc, (_NeedsLoad, NotReplayableError)):
            return _upgrade_sharded_loaded(**loaded)
        raise
    result.removed = swap.finish()
    result.streamed = True
    return result


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
    from .formats.torch import write_zip_graph

    writer = write_zip_graph(dst, graph, obj)
    return writer.bytes_copied, writer.bytes_through_python


def _upgrade_sharded_loaded(
    src: Path,
    out: Any,
    sset: Any,
    schema: Upgrade,
    to: Any,
    from_version: Any,
    work: Checkpoint | None = None,
    old: Checkpoint | None = None,
) -> FileUpgrade:
    """The full path for sets: load (mmap), upgrade, re-shard by the old largest shard size.

    ``work`` (with ``old``, the set as read): the caller's upgraded set, written as it is."""
    from .formats import sharded
    from .formats.safetensors_file import write_safetensors
    from .formats.set_swap import SetSwap
    from .formats.torch import write_torch

    if work is not None and old is not None:
        ckpt, new = old, work
    else:
        ckpt = _with_version(sharded.read_sharded(src, mmap=True), schema, from_version, src)
        new = _run(ckpt, schema, to)
    limit = max((sset.folder / s).stat().st_size for s in sset.shards) if sset.shards else 1 << 30
    groups: list[dict[str, Any]] = [{}]
    size = 0
    for key, tensor in new.state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append({})
            size = 0
        groups[-1][key] = tensor
        size += nbytes
    folder, index_name = out.folder, out.index_name
    stamp = _stamp_of(new)
    swap = SetSwap.replacing(folder, index_name, _replaced(sset, folder, index_name))
    names = [
        swap.fresh_name(
            out.shard(i, len(groups), sset.kind),
            [str(new.version), [(k, list(v.shape)) for k, v in group.items()]],
        )
        for i, group in enumerate(groups, 1)
    ]
    weight_map: dict[str, str] = {}
    total = 0
    try:
        swap.start()
        for name, group in zip(names, groups):
            if sset.kind == "safetensors":
                meta = _safetensors_metadata(_header_stamp(new))
                # the set's own header entries (HF's format: pt) on every re-grouped shard
                meta = {**sset.shared_header, **meta}
                write_safetensors(folder / name, group, {}, passthrough=meta)
            else:
                write_torch(folder / name, dict(group))
            swap.wrote(name)
            weight_map.update((k, name) for k in group)
            total += sum(t.numel() * t.element_size() for t in group.values())
        sharded.copy_companions(sset, folder)
        swap.commit(sset.index, weight_map, total, sharded.index_metadata(new, stamp))
    except BaseException:
        swap.abort()
        raise
    result = _result(src, folder, "sharded", ckpt, new, schema, to)
    result.removed = swap.finish()
    return result


def _upgrade_model_folder(
    src: Path, dst: Path, one: Callable[[Path, Path], FileUpgrade]
) -> FileUpgrade:
    """Upgrade a model folder's weights file with ``one(weights, target)``: in place, to a
    file ``dst`` names, or into the folder ``dst`` (a name without a suffix) under the same
    name, then the side files (config, tokenizer...) copied beside it as a sharded upgrade
    copies them. A plan refused leaves no new folder behind."""
    from .formats.model_folder import write_folder

    def into(weights: Path, target: Path) -> FileUpgrade:
        result = one(weights, target)
        if target not in (weights, dst):  # into the folder dst: the result names the folders
            result.src, result.dst = src, dst
        return result

    return write_folder(src, dst, into)


def _upgrade_dcp(
    src: Path,
    dst: Path,
    schema: Upgrade,
    to: Any,
    from_version: Any,
    param_names: Sequence[str] | None = None,
) -> FileUpgrade:
    """Load through DCP's own loader (restricted metadata), upgrade, save with DCP's writer."""
    from .formats import dcp

    # plan (and refuse) from the metadata alone, before any tensor is read
    stubs = _with_version(dcp.read_dcp_metadata_checkpoint(src), schema, from_version, src)
    if not _plan(stubs, schema, to, path=src):
        dcp.stamp_dcp(src, dst, stubs)  # nothing to run: only the stamp file is (re)written
        return _result(src, dst, "dcp", stubs, stubs, schema, to)
    ckpt = _with_version(dcp.read_dcp(src), schema, from_version, src)
    new = _run(ckpt, schema, to, param_names)
    dcp.write_dcp(dst, new)
    return _result(src, dst, "dcp", ckpt, new, schema, to)


def _names(safe_globals: Iterable[Any]) -> list[str]:
    from .formats.torch import global_name

    return [global_name(g) for g in safe_globals]


def _try_stream(
    src: Path, dst: Path, fmt: str, schema: Upgrade, to: Any, from_version: Any, names: list[str]
) -> FileUpgrade | None:
    """Upgrade a single file by copying tensor bytes, or return None (nothing written)."""
    if fmt == "torch-zip" and dst.suffix != ".safetensors":
        from .formats.torch import read_zip_graph, write_zip_graph

        graph = read_zip_graph(src, allowed_globals=names)
        ckpt = _with_version(split(graph.obj, path=src), schema, from_version, src)
        # optimizer state is rewritten, not copied: the loaded path follows it
        new = None if ckpt.optimizer is not None else upgrade_stubs(ckpt, schema, to)
        if new is not None:
            result = _result(src, dst, fmt, ckpt, new, schema, to)
            try:
                writer = write_zip_graph(dst, graph, assemble(new, _stamp_of(new)))
            except NotReplayableError:
                pass
            else:
                result.streamed = True
                result.bytes_copied = writer.bytes_copied
                result.bytes_through_python = writer.bytes_through_python
                return result
    if fmt == "safetensors" and dst.suffix == ".safetensors":
        from .files import read_metadata

        ckpt = _with_version(read_metadata(src), schema, from_version, src)
        new = upgrade_stubs(ckpt, schema, to)
        if new is not None:
            from .formats.safetensors_copy import data_start, write_safetensors_copy

            start = data_start(src)
            sources = {
                id(stub): (src, start + stub.info.data_offsets[0])
                for stub in ckpt.state_dict.values()
                if getattr(stub, "info", None) is not None and stub.info.data_offsets
            }
            result = _result(src, dst, fmt, ckpt, new, schema, to)
            copied, through = write_safetensors_copy(
                dst, list(new.state_dict.items()), sources, _safetensors_metadata(new)
            )
            result.streamed, result.bytes_copied, result.bytes_through_python = (
                True,
                copied,
                through,
            )
            return result
    return None


def write_streamed(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    schema: Upgrade,
    *,
    to: str | Version | None = None,
    from_version: str | Version | None = None,
    work: Checkpoint | None = None,
    allowed: Iterable[Any] = (),
) -> FileUpgrade | None:
    """Write the upgrade of ``src`` to ``dst`` the fast way; None when the caller must save.

    For the CLI's read-plan-write sequence (:mod:`ckptmigrate.inplace`), which has already
    planned and, for folders, upgraded ``work``: sharded sets and DCP folders are always written
    here (``torch.save`` cannot write them); single files only when the bytes can be copied.
    A file with mounts passes a :class:`MountedUpgrade` as ``schema``: the same writers, so a
    mounted DCP folder stays a DCP folder and a mounted set a set.
    """
    src, dst = Path(src), Path(dst)
    fmt = detect_format(src)
    if fmt == "dcp":
        if work is None:
            return _upgrade_dcp(src, dst, schema, to, from_version)
        from .formats import dcp

        dcp.write_dcp(dst, work)
        return FileUpgrade(src, dst, fmt, None, work.version)
    if fmt == "sharded":
        return _upgrade_sharded(src, dst, schema, to, from_version, allowed, work=work)
    if src.is_dir():  # a model folder: always written here, its weights file as a file is

        def one(weights: Path, target: Path) -> FileUpgrade:
            done = write_streamed(
                weights,
                target,
                schema,
                to=to,
                from_version=from_version,
                work=work,
                allowed=allowed,
            )
            if done is not None:
                return done
            if work is None:
                return _upgrade_loaded(weights, target, fmt, schema, to, from_version, allowed)
            from .api import save

            save(target, work)
            return FileUpgrade(weights, target, fmt, None, work.version)

        return _upgrade_model_folder(src, dst, one)
    return _try_stream(src, dst, fmt, schema, to, from_version, _names(allowed))
