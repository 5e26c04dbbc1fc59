"""safetensors files: tensors plus our stamp, hparams and meta as JSON strings in the header.

safetensors refuses tensors that share memory, so tied weights are written once and the other
names recorded as aliases (``ckptmigrate.aliases``); reading restores them as one tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointFormatError
from .atomic import atomic_path
from .bounds import loads_json
from .safetensors_header import read_safetensors_header

STAMP = "ckptmigrate.stamp"
HPARAMS = "ckptmigrate.hparams"
META = "ckptmigrate.meta"
ALIASES = "ckptmigrate.aliases"
MODULE_METADATA = "ckptmigrate.module_metadata"


def decode_json_entry(metadata: dict[str, str], key: str, *, path: object) -> Any:
    """One of our JSON header entries, or None when absent."""
    if key not in metadata:
        return None
    return loads_json(metadata[key], what=f"header entry {key!r}", path=path)


def read_safetensors(
    path: str | os.PathLike[str], *, map_location: Any = "cpu"
) -> tuple[dict[str, Any], dict[str, str]]:
    """All tensors (tied aliases restored) and the header's ``__metadata__``."""
    from safetensors import safe_open

    path = Path(path)
    _, metadata = read_safetensors_header(path)  # validates before the library maps it
    device = str(map_location) if map_location is not None else "cpu"
    # safetensors cannot open onto "meta": read on the CPU, then move, as torch.load would
    moved_to = device if device.startswith("meta") else None
    try:
        tensors: dict[str, Any] = {}
        with safe_open(str(path), framework="pt", device="cpu" if moved_to else device) as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
                if moved_to:
                    tensors[key] = tensors[key].to(moved_to)
    except Exception as exc:
        raise CheckpointFormatError(
            f"safetensors could not read it ({type(exc).__name__}: {exc})", path=path
        ) from exc
    aliases = decode_json_entry(metadata, ALIASES, path=path) or {}
    if not isinstance(aliases, dict):
        raise CheckpointFormatError("header entry 'ckptmigrate.aliases' must be a dict", path=path)
    order = decode_json_entry(metadata, "ckptmigrate.order", path=path)
    for alias, source in aliases.items():
        if source not in tensors or alias in tensors:
            raise CheckpointFormatError(f"bad tied-weight alias {alias!r} -> {source!r}", path=path)
        tensors[alias] = tensors[source]
    if isinstance(order, list) and sorted(order) == sorted(tensors):
        tensors = {k: tensors[k] for k in order}
    return tensors, metadata


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: dict[str, Any],
    metadata: dict[str, Any],
    passthrough: dict[str, str] | None = None,
) -> None:
    """Write ``tensors`` atomically; ``metadata`` values are JSON-encoded into the header.

    ``passthrough`` entries (another tool's header strings) are written back as they were.
    """
    import torch
    from safetensors.torch import save_file

    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"safetensors holds tensors only, but {key!r} is a {type(value).__name__}: "
                "save this checkpoint as .pth instead"
            )
        ident = _identity(value)
        if ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        unique[key] = value
    # views of one storage that are not the same tensor must be written apart
    storages: dict[int, str] = {}
    for key, value in list(unique.items()):
        ptr = value.untyped_storage().data_ptr() if value.numel() else 0
        if ptr and ptr in storages:
            unique[key] = value.clone()
        elif ptr:
            storages[ptr] = key
        unique[key] = unique[key].contiguous()
    header: dict[str, str] = dict(passthrough or {})
    for key, value in metadata.items():
        if value is None:
            continue
        try:
            header[key] = json.dumps(value, sort_keys=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"{key.split('.')[-1]} must be JSON-serialisable for a .safetensors file ({exc}); "
                "keep plain numbers, strings, lists and dicts there, or save as .pth"
            ) from None
    if aliases:
        header[ALIASES] = json.dumps(aliases)
    header["ckptmigrate.order"] = json.dumps(list(tensors))
    with atomic_path(path) as tmp:
        save_file(unique, str(tmp), metadata=header)


def _identity(t: Any) -> tuple:
    if t.numel() == 0:
        return (id(t),)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
