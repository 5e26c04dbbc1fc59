"""Checkpoint files: pick the format, read or write it, and map it to a :class:`Checkpoint`."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .errors import CheckpointFormatError, CheckpointWriteError
from .formats.detect import detect_format
from .formats.model_folder import resolve
from .layout import assemble, split
from .stamp import parse_stamp, stamp_of

SAFETENSORS_SUFFIX = ".safetensors"


def _from_safetensors(tensors: dict[str, Any], metadata: dict[str, str], path: Path) -> Checkpoint:
    from .formats import safetensors_file as st

    raw_stamp = st.decode_json_entry(metadata, st.STAMP, path=path)
    stamp = parse_stamp(raw_stamp, path=path) if raw_stamp is not None else None
    parts = {}
    for slot, key in (("hparams", st.HPARAMS), ("meta", st.META)):
        value = st.decode_json_entry(metadata, key, path=path) or {}
        if not isinstance(value, dict):
            raise CheckpointFormatError(f"header entry {key!r} must be a JSON object", path=path)
        parts[slot] = value
    module_metadata = st.module_metadata(metadata, path=path)
    foreign = {k: v for k, v in metadata.items() if not k.startswith("ckptmigrate.")}
    return Checkpoint(
        state_dict=tensors,
        hparams=parts["hparams"],
        meta=parts["meta"],
        schema=stamp.schema if stamp else None,
        version=stamp.version if stamp else None,
        history=stamp.history if stamp else [],
        mounts=stamp.mounts if stamp else [],
        extra={"safetensors_metadata": foreign} if foreign else {},
        module_metadata=module_metadata,
        layout="safetensors",
    )


def read_checkpoint(
    path: str | os.PathLike[str],
    *,
    map_location: Any = "cpu",
    mmap: bool = False,
    safe_globals: Iterable[Any] = (),
) -> Checkpoint:
    """Load every tensor of a checkpoint file (no migration); a model folder of one weights
    file is read as that file."""
    path = resolve(path)
    fmt = detect_format(path)
    if fmt == "sharded":
        from .formats.sharded import read_sharded

        return read_sharded(path, map_location=map_location, mmap=mmap)
    if fmt == "dcp":
        from .formats.dcp import read_dcp

        return read_dcp(path)
    if fmt == "safetensors":
        from .formats.safetensors_file import read_safetensors

        tensors, metadata = read_safetensors(path, map_location=map_location)
        return _from_safetensors(tensors, metadata, path)
    if fmt in ("torch-zip", "torch-legacy"):
        from .formats.torch import read_torch

        obj = read_torch(path, map_location=map_location, mmap=mmap, safe_globals=safe_globals)
        return split(obj, path=path)
    raise CheckpointFormatError(f"reading a {fmt} checkpoint is not supported yet", path=path)


def read_metadata(
    path: str | os.PathLike[str], *, allowed_globals: Iterable[str] = ()
) -> Checkpoint:
    """The checkpoint with metadata stubs for tensors: no tensor data read, torch not imported."""
    from .formats.tensorinfo import TensorStub

    path = resolve(path)
    fmt = detect_format(path)
    if fmt == "sharded":
        from .formats.sharded import read_sharded_metadata

        return read_sharded_metadata(path, allowed_globals=list(allowed_globals))[0]
    if fmt == "dcp":
        from .formats.dcp import read_dcp_metadata_checkpoint

        return read_dcp_metadata_checkpoint(path)
    if fmt == "safetensors":
        from .formats.safetensors_file import tensor_order, tied_aliases
        from .formats.safetensors_header import read_safetensors_header

        infos, metadata = read_safetensors_header(path)
        tensors: dict[str, Any] = {k: TensorStub(info) for k, info in infos.items()}
        tensor_order(metadata, path=path)  # checked as the full reader checks it
        for alias, source in tied_aliases(metadata, infos, path=path).items():
            tensors[alias] = tensors[source]
        return _from_safetensors(tensors, metadata, path)
    if fmt in ("torch-zip", "torch-legacy"):
        from .formats.torch import read_torch_metadata

        obj = read_torch_metadata(path, allowed_globals=list(allowed_globals))
        return split(obj, path=path)
    raise CheckpointFormatError(f"reading a {fmt} checkpoint is not supported yet", path=path)


def checkpoint_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes the checkpoint at ``path`` takes on disk: a file's size; a sharded set's index
    and shards (given by its folder or index); every file under a DCP folder; a model folder's
    weights file."""
    path = resolve(path)
    fmt = detect_format(path)
    if fmt == "sharded":
        from .formats.sharded import read_index

        sset = read_index(path)
        files = [sset.index_path, *(sset.folder / s for s in sset.shards)]
    elif fmt == "dcp":
        files = [p for p in path.rglob("*") if p.is_file()]
    else:
        files = [path]
    return sum(p.stat().st_size for p in files)


def write_checkpoint(path: str | os.PathLike[str], ckpt: Checkpoint) -> None:
    """Write ``ckpt`` atomically: safetensors by suffix, else torch.save in its layout; to an
    existing model folder, over its weights file."""
    path = resolve(path) if Path(path).is_dir() else Path(path)
    stamp = stamp_of(ckpt)
    if path.suffix == SAFETENSORS_SUFFIX:
        from .formats import safetensors_file as st

        extra = dict(ckpt.extra)
        passthrough = extra.pop("safetensors_metadata", None)
        if ckpt.optimizer is not None or extra:
            raise CheckpointWriteError(
                "a .safetensors file holds tensors only, but this checkpoint has optimizer "
                f"state or extra entries ({', '.join(extra) or 'optimizer'}): save it as .pth"
            )
        st.write_safetensors(
            path,
            ckpt.state_dict,
            {
                st.STAMP: stamp,
                st.HPARAMS: ckpt.hparams if stamp or ckpt.hparams else None,
                st.META: ckpt.meta if stamp or ckpt.meta else None,
                st.MODULE_METADATA: ckpt.module_metadata,
            },
            passthrough=passthrough if isinstance(passthrough, dict) else None,
        )
        return
    from .formats.torch import write_torch

    if ckpt.layout == "safetensors":
        ckpt = _as_layout(ckpt, "ckptmigrate")
    write_torch(path, assemble(ckpt, stamp))


def _as_layout(ckpt: Checkpoint, layout: str) -> Checkpoint:
    from dataclasses import replace

    extra = dict(ckpt.extra)
    extra.pop("safetensors_metadata", None)
    return replace(ckpt, layout=layout, extra=extra)
