"""Rewrite a DCP folder without loading it: a new ``.metadata``, the rank files linked.

A plan that only renames, drops and changes hparams (metadata-only) changes nothing in the
``.distcp`` rank files: DCP finds each tensor chunk through ``.metadata``'s ``storage_data``
(file, offset, length), keyed by the entry's FQN. :func:`rewrite_dcp_metadata` writes a new
folder whose ``.metadata`` names the entries by their new FQNs (``state_dict_metadata``,
``storage_data``, ``planner_data``), whose rank files are hard links of the old ones (copies
where linking fails, e.g. across devices), and whose few new values (an optimizer's
``param_groups[i]["params"]``, which lists FQNs) are ``torch.save``'d into one small new rank
file that ``storage_data`` points to. The folder is swapped in (:func:`.dcp.write_swapped`):
a crash leaves the old folder or the new one; the old data files are never written to.

:func:`read_dcp_stubs` is the metadata read the rewrite plans on: stubs, with each
optimizer group's parameter list read (a few hundred bytes each) so that optimizer state
follows its renamed parameters.

>>> done = rewrite_dcp_metadata("ckpt/step-1000", new, "ckpt/step-1000-v2")  # doctest: +SKIP
>>> done.bytes_linked, done.bytes_written
(4294967296, 5120)
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointFormatError, NotReplayableError
from ..values.checkpoint import Checkpoint
from ..values.tensorinfo import TensorStub
from .atomic import atomic_file, fsync_path
from .dcp import (
    METADATA_FILE,
    STAMP_FILE,
    DcpValue,
    read_dcp_metadata,
    read_dcp_metadata_checkpoint,
    write_swapped,
)
from .dcp_tensors import NewTensor, read_item_bytes, save_dcp_chunk
from .detect import open_regular_file
from .layout import assemble
from .torch import MAX_PICKLE_BYTES, check_torch_bytes

__all__ = [
    "VALUES_FILE",
    "DcpRewritten",
    "read_dcp_stubs",
    "rewrite_dcp_metadata",
    "stubs_complete",
    "walks_list",
]

#: The rank file of the values a rewrite changed (optimizer groups' parameter lists).
VALUES_FILE = "__ckptmigrate_values.distcp"
#: A value that names parameters: what a rename must rewrite inside the rank files.
_NAMES_VALUE = re.compile(r"(?:^|\.)param_groups\.\d+\.(?:params|param_names)$")


@dataclass
class DcpRewritten:
    """What :func:`rewrite_dcp_metadata` moved: data bytes hard-linked, data bytes copied
    (where linking failed), and new bytes written (``.metadata``, values, stamp)."""

    bytes_linked: int = 0
    bytes_copied: int = 0
    bytes_written: int = 0


def _read_value(folder: Path, md: Any, fqn: str) -> Any:
    """A value DCP stored as bytes (through its transforms, zstd, where it has any), loaded
    weights-only; :class:`DcpValue` when it is larger than a pickle may be."""
    import torch

    found = [info for index, info in md.storage_data.items() if index.fqn == fqn]
    if len(found) != 1:
        return DcpValue(fqn)
    info = found[0]
    if info.length > MAX_PICKLE_BYTES:
        return DcpValue(fqn)
    what = f"value {fqn!r}"
    with open_regular_file(folder / info.relative_path) as f:
        stored = read_item_bytes(
            f, info, MAX_PICKLE_BYTES, what, f"the {MAX_PICKLE_BYTES >> 20} MiB cap", folder
        )
        data = io.BytesIO(stored.read())
    check_torch_bytes(data, what=what, path=folder)
    return torch.load(data, weights_only=True)


def _as_list(groups: Any) -> Any:
    """The stub reader builds ``param_groups`` as ``{0: ..., 1: ...}``: DCP's loader a list."""
    if isinstance(groups, dict) and sorted(groups) == list(range(len(groups))):
        return [groups[i] for i in range(len(groups))]
    return groups


def _load_names(node: Any, folder: Path, md: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _load_names(v, folder, md) for k, v in node.items()}
        if "param_groups" in out:
            out["param_groups"] = _as_list(out["param_groups"])
        return out
    if isinstance(node, list):
        return [_load_names(v, folder, md) for v in node]
    if isinstance(node, DcpValue) and _NAMES_VALUE.search(node.fqn):
        return _read_value(folder, md, node.fqn)
    return node


def read_dcp_stubs(path: str | os.PathLike[str]) -> Checkpoint:
    """The DCP folder as stubs (:func:`.dcp.read_dcp_metadata_checkpoint`), each optimizer
    group's ``params`` (and ``param_names``) read: the FQNs a rename must carry along.

    >>> read_dcp_stubs("ckpt").optimizer["param_groups"][0]["params"]  # doctest: +SKIP
    ['fc.weight', 'fc.bias']
    """
    folder = Path(path)
    ckpt = read_dcp_metadata_checkpoint(folder)
    if not _has_names(ckpt.optimizer) and not _has_names(ckpt.extra):
        return ckpt  # nothing to read: stays torch-free
    md = read_dcp_metadata(folder)
    out = ckpt.copy()
    out.optimizer = _load_names(ckpt.optimizer, folder, md)
    out.extra = _load_names(ckpt.extra, folder, md)
    return out


def _has_names(node: Any) -> bool:
    if isinstance(node, dict):
        return any(_has_names(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_names(v) for v in node)
    return isinstance(node, DcpValue) and bool(_NAMES_VALUE.search(node.fqn))


def stubs_complete(stubs: Checkpoint) -> bool:
    """Whether every parameter list a rename may rewrite was read (none zstd-transformed or
    oversized): else the rewrite loads the folder instead."""
    return not _has_names(stubs.optimizer) and not _has_names(stubs.extra)


def walks_list(node: Any) -> bool:
    """Whether DCP's flattening walks into ``node``: a list holding a container or a tensor
    (a stub, a new one, a torch tensor); any other list (``params``) is one stored value."""
    return isinstance(node, list) and any(
        isinstance(v, (dict, list, TensorStub, NewTensor)) or hasattr(type(v), "__torch_function__")
        for v in node
    )


def _flatten(node: Any, route: tuple[Any, ...], out: list[tuple[tuple[Any, ...], Any]]) -> None:
    """DCP's flattening: dicts and lists holding containers are walked, anything else is an
    entry (a list of plain values, as ``params``, is one value)."""
    if isinstance(node, dict):
        for key, value in node.items():  # a key of a dict is a string in DCP's routes
            _flatten(value, (*route, key if isinstance(key, str) else str(key)), out)
        return
    if walks_list(node):
        for i, value in enumerate(node):
            _flatten(value, (*route, i), out)
        return
    out.append((route, node))


def _loaded_order(md: Any) -> list[str]:
    """The FQNs in the order DCP's loader nests them: its state dict's key order (entries
    grouped under their containers, list items by index), not ``.metadata``'s own order."""
    routes = md.planner_data if isinstance(md.planner_data, dict) else {}
    tree: dict[Any, Any] = {}
    for fqn in md.state_dict_metadata:
        route = tuple(routes.get(fqn) or (fqn,))
        node = tree
        for part in route[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                return []  # not a nesting the loader builds: the rewrite says so
        node[route[-1]] = fqn
    out: list[str] = []

    def walk(node: dict[Any, Any]) -> None:
        keys = list(node)
        if keys and all(type(k) is int for k in keys):
            keys.sort()  # a list: by index
        for key in keys:
            value = node[key]
            walk(value) if isinstance(value, dict) else out.append(value)

    walk(tree)
    return out


def _link_or_copy(src: Path, dst: Path, done: DcpRewritten) -> None:
    size = src.stat().st_size
    try:
        os.link(src, dst)
    except OSError:  # another device, a file system without hard links
        shutil.copyfile(src, dst)
        fsync_path(dst)
        done.bytes_copied += size
    else:
        done.bytes_linked += size


def rewrite_dcp_metadata(
    src: str | os.PathLike[str], new: Checkpoint, dst: str | os.PathLike[str]
) -> DcpRewritten:
    """Write ``new`` (the stubs of the DCP folder ``src``, renamed, dropped, re-stamped) as a
    DCP folder at ``dst`` (``src`` itself: in place), the rank files linked, not rewritten.

    Raises :class:`~ckptmigrate.errors.NotReplayableError` (nothing written) when ``new``
    holds a tensor that is not one of ``src``'s: the caller saves the loaded checkpoint.
    """
    import torch
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    src, dst = Path(src), Path(dst)
    md = read_dcp_metadata(src, torch_classes=True)
    layout = new.layout.removeprefix("dcp-")
    plain = Checkpoint(**{**new.__dict__, "layout": layout, "module_metadata": None})
    leaves: list[tuple[tuple[Any, ...], Any]] = []
    _flatten(assemble(plain, None), (), leaves)  # the stamp goes to the JSON file

    stored = md.storage_data if md.storage_data is not None else {}
    if not isinstance(stored, dict) or not all(isinstance(i, MetadataIndex) for i in stored):
        raise CheckpointFormatError(
            "DCP metadata's storage_data is not a dict of MetadataIndex keys", path=src
        )
    md = dataclasses.replace(md, storage_data=stored) if stored is not md.storage_data else md
    chunks: dict[str, list[tuple[Any, Any]]] = {}
    for index, info in md.storage_data.items():
        chunks.setdefault(index.fqn, []).append((index, info))
    entries: dict[str, Any] = {}
    planner: dict[str, tuple[Any, ...]] = {}
    storage: dict[Any, Any] = {}
    values = io.BytesIO()
    fresh: list[tuple[str, NewTensor]] = []
    carried: dict[Any, Any] = {}
    like = next(iter(md.storage_data.values()), None)
    for route, leaf in leaves:
        fqn = ".".join(map(str, route))
        if isinstance(leaf, TensorStub) and leaf.info.storage_key in md.state_dict_metadata:
            old = leaf.info.storage_key
        elif isinstance(leaf, DcpValue) and leaf.fqn in md.state_dict_metadata:
            old = leaf.fqn
        elif isinstance(leaf, NewTensor):  # computed and written when the folder is filled
            fresh.append((fqn, leaf))
            entries[fqn] = None  # its place kept: filled once written
            planner[fqn] = route
            continue
        elif hasattr(leaf, "__torch_function__") or isinstance(leaf, (TensorStub, DcpValue)):
            raise NotReplayableError(f"{fqn!r} is a tensor the DCP folder does not hold")
        else:  # a value the plan changed: torch.save'd, as DCP stores values
            offset = values.tell()
            torch.save(leaf, values)
            entries[fqn] = BytesStorageMetadata()
            index = MetadataIndex(fqn)
            storage[index] = _storage_info(like, VALUES_FILE, offset, values.tell() - offset)
            planner[fqn] = route
            continue
        entries[fqn] = md.state_dict_metadata[old]
        planner[fqn] = route
        for index, info in chunks.get(old, []):
            storage[dataclasses.replace(index, fqn=fqn)] = info
            if info.relative_path == VALUES_FILE:  # an earlier rewrite's: carried over
                carried[dataclasses.replace(index, fqn=fqn)] = info
    out = dataclasses.replace(
        md, state_dict_metadata=entries, planner_data=planner, storage_data=storage
    )
    unchanged = (
        not values.tell()
        and not fresh
        and (entries, planner, storage) == (md.state_dict_metadata, md.planner_data, stored)
        and list(entries) == _loaded_order(md)  # a step may reorder the keys: that is kept
    )
    # every rank file of the source is kept (linked): the folder keeps its number of rank files
    data_files = sorted(
        (
            {info.relative_path for info in storage.values()}
            | {p.name for p in src.glob("*.distcp") if p.is_file() and not p.is_symlink()}
        )
        - {VALUES_FILE}
    )
    done = DcpRewritten()

    def fill(tmp: Path) -> None:
        nonlocal out
        tmp.mkdir()
        for name in data_files:
            _link_or_copy(src / name, tmp / name, done)
        if values.tell() or fresh or carried:
            with atomic_file(tmp / VALUES_FILE) as f:
                f.write(values.getbuffer())
                _carry_values(src / VALUES_FILE, f, carried, storage, like)
                for fqn, pending in fresh:
                    entries[fqn], index, info = _write_new(f, fqn, pending, like)
                    storage[index] = info
            out = dataclasses.replace(out, state_dict_metadata=entries, storage_data=storage)
        if unchanged:  # a stamp: DCP's own .metadata kept byte for byte
            _link_or_copy(src / METADATA_FILE, tmp / METADATA_FILE, DcpRewritten())
            return
        with atomic_file(tmp / METADATA_FILE) as f:
            pickle.dump(out, f)  # as DCP's FileSystemWriter.finish writes it
        done.bytes_written += sum(
            (tmp / name).stat().st_size
            for name in (VALUES_FILE, METADATA_FILE)
            if (tmp / name).exists()
        )

    write_swapped(dst, fill, new)
    done.bytes_written += (dst / STAMP_FILE).stat().st_size
    return done


def _storage_info(like: Any, name: str, offset: int, length: int) -> Any:
    """DCP's per-entry storage record, of the class the folder's own records are."""
    if like is None:
        raise NotReplayableError("the DCP folder has no storage record to model a new one on")
    return dataclasses.replace(
        like, relative_path=name, offset=offset, length=length, transform_descriptors=None
    )


def _carry_values(
    old_file: Path, f: Any, carried: dict[Any, Any], storage: dict[Any, Any], like: Any
) -> None:
    """Entries kept from the source's own values file (tensors an earlier rewrite wrote
    there): their bytes copied into the new one, which replaces it."""
    if not carried:
        return
    with open(old_file, "rb") as old:
        for index, info in carried.items():
            old.seek(info.offset)
            offset = f.tell()
            f.write(old.read(info.length))
            storage[index] = _storage_info(like, VALUES_FILE, offset, info.length)


def _write_new(f: Any, fqn: str, pending: NewTensor, like: Any) -> tuple[Any, Any, Any]:
    """Compute ``pending`` and append it to the values file as one chunk: its entry, its
    storage index and record."""
    import torch
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    tensor = pending.compute()
    if tuple(tensor.shape) != tuple(pending.shape) or str(tensor.dtype) != f"torch.{pending.dtype}":
        raise CheckpointFormatError(
            f"{fqn!r} came out {tensor.dtype} of shape {tuple(tensor.shape)}, but was planned "
            f"as {pending.dtype} of shape {tuple(pending.shape)}"
        )
    offset, length = save_dcp_chunk(f, tensor)
    zeros = torch.Size([0] * tensor.dim())
    entry = TensorStorageMetadata(
        properties=TensorProperties(dtype=tensor.dtype),
        size=torch.Size(tensor.shape),
        chunks=[ChunkStorageMetadata(offsets=zeros, sizes=torch.Size(tensor.shape))],
    )
    del tensor
    return entry, MetadataIndex(fqn, zeros, 0), _storage_info(like, VALUES_FILE, offset, length)
