"""Checkpoint files: read or write one through its format (:mod:`.formats.registry`).

Each path is sniffed once (:func:`~ckptmigrate.formats.registry.detect`) and read by the format
found; a model folder of one weights file is read as that file.

>>> ckpt = read_metadata("model.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..formats.registry import Format, ReadOptions, output_format, reader_for
from ..formats.remote import RemotePath, downloaded, location
from ..values.checkpoint import Checkpoint


def read_checkpoint(
    path: str | os.PathLike[str],
    *,
    map_location: Any = "cpu",
    mmap: bool = False,
    safe_globals: Iterable[Any] = (),
) -> Checkpoint:
    """Load every tensor of a checkpoint file (no migration); a model folder of one weights
    file is read as that file."""
    target, fmt = reader_for(path)
    options = ReadOptions(map_location, mmap, tuple(safe_globals))
    if isinstance(target, RemotePath):  # every byte is needed: read a private copy
        with downloaded(target, fmt.files(target)) as local:  # type: ignore[arg-type]
            return fmt.read(local, options)
    return fmt.read(target, options)


def read_metadata(
    path: str | os.PathLike[str],
    *,
    allowed_globals: Iterable[str] = (),
    fmt: Format | None = None,
) -> Checkpoint:
    """The checkpoint with metadata stubs for tensors: no tensor data read, torch not imported.
    ``fmt`` is the format :func:`reader_for` found for ``path``, when the caller asked already.
    """
    target, fmt = reader_for(path) if fmt is None else (location(path), fmt)
    return fmt.read_metadata(target, allowed_globals=allowed_globals)


def checkpoint_bytes(path: str | os.PathLike[str], fmt: Format | None = None) -> int:
    """Bytes the checkpoint at ``path`` takes on disk: a file's size; a sharded set's index
    and shards (given by its folder or index); every file under a DCP folder; a model folder's
    weights file. ``fmt`` is the format :func:`reader_for` found for ``path``, when known."""
    target, fmt = reader_for(path) if fmt is None else (location(path), fmt)
    return sum(p.stat().st_size for p in fmt.files(target))


def write_checkpoint(path: str | os.PathLike[str], ckpt: Checkpoint) -> None:
    """Write ``ckpt`` atomically: safetensors by suffix, else torch.save in its layout; to an
    existing model folder, over its weights file."""
    from ..formats.model_folder import resolve  # a model folder is written through its file

    path = resolve(path) if Path(path).is_dir() else Path(path)
    output_format(path).write(path, ckpt)
