"""safetensors files: tensors plus our stamp, hparams and meta as JSON strings in the header.

safetensors refuses tensors that share memory, so tied weights are written once and the other
names recorded as aliases (``ckptmigrate.aliases``); reading restores them as one tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointFormatError, CheckpointWriteError
from .atomic import atomic_path
from .bounds import loads_json
from .safetensors_header import read_safetensors_header

if TYPE_CHECKING:
    from ..values.checkpoint import Checkpoint

STAMP = "ckptmigrate.stamp"
HPARAMS = "ckptmigrate.hparams"
META = "ckptmigrate.meta"
ALIASES = "ckptmigrate.aliases"
MODULE_METADATA = "ckptmigrate.module_metadata"
ORDER = "ckptmigrate.order"


def decode_json_entry(metadata: dict[str, str], key: str, *, path: object) -> Any:
    """One of our JSON header entries, or None when absent."""
    if key not in metadata:
        return None
    return loads_json(metadata[key], what=f"header entry {key!r}", path=path)


def tied_aliases(metadata: dict[str, str], names: Any, *, path: object) -> dict[str, str]:
    """The header's tied-weight aliases (alias -> the stored tensor it shares), checked: each
    alias is a new name for a tensor the same file stores."""
    aliases = decode_json_entry(metadata, ALIASES, path=path)
    if aliases is None:
        return {}
    if not isinstance(aliases, dict):
        raise CheckpointFormatError(
            f"header entry {ALIASES!r} must map names to names, found a JSON "
            f"{type(aliases).__name__}",
            path=path,
        )
    for alias, source in aliases.items():
        if not isinstance(source, str) or source not in names or alias in names:
            raise CheckpointFormatError(
                f"bad tied-weight alias {alias!r} -> {source!r}: an alias names a tensor the "
                "file stores under another name",
                path=path,
            )
    return aliases


def tensor_order(metadata: dict[str, str], *, path: object) -> list[str] | None:
    """The order the tensors were saved in (``ckptmigrate.order``), or None when absent."""
    order = decode_json_entry(metadata, ORDER, path=path)
    if order is not None and (
        not isinstance(order, list) or not all(isinstance(k, str) for k in order)
    ):
        raise CheckpointFormatError(
            f"header entry {ORDER!r} must be a list of tensor names", path=path
        )
    return order


def module_metadata(metadata: dict[str, str], *, path: object) -> dict[str, Any] | None:
    """``state_dict._metadata`` as saved (``ckptmigrate.module_metadata``): an object of
    objects (module prefix -> its version record), or None when absent."""
    value = decode_json_entry(metadata, MODULE_METADATA, path=path)
    if value is not None and (
        not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values())
    ):
        raise CheckpointFormatError(
            f"header entry {MODULE_METADATA!r} must map module prefixes to objects", path=path
        )
    return value


def to_checkpoint(tensors: dict[str, Any], metadata: dict[str, str], path: Path) -> Checkpoint:
    """The checkpoint a safetensors file holds: its tensors (or stubs), and our stamp, hparams
    and meta from its header; other tools' header entries are kept as ``extra``."""
    from .layout import from_parts

    def parts() -> dict[str, Any]:
        found = {}
        for slot, key in (("hparams", HPARAMS), ("meta", META)):
            value = decode_json_entry(metadata, key, path=path) or {}
            if not isinstance(value, dict):
                raise CheckpointFormatError(
                    f"header entry {key!r} must be a JSON object", path=path
                )
            found[slot] = value
        found["module_metadata"] = module_metadata(metadata, path=path)
        foreign = {k: v for k, v in metadata.items() if not k.startswith("ckptmigrate.")}
        found["extra"] = {"safetensors_metadata": foreign} if foreign else {}
        return found

    stamp = decode_json_entry(metadata, STAMP, path=path)
    return from_parts(tensors, layout="safetensors", stamp=stamp, parts=parts, path=path)


def read_safetensors_metadata(
    path: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, str]]:
    """Stubs of the tensors (tied aliases restored) and the header's ``__metadata__``, from the
    header alone: no tensor data read, torch not imported."""
    from ..values.tensorinfo import TensorStub

    infos, metadata = read_safetensors_header(path)
    tensors: dict[str, Any] = {k: TensorStub(info) for k, info in infos.items()}
    tensor_order(metadata, path=path)  # checked as the full reader checks it
    for alias, source in tied_aliases(metadata, infos, path=path).items():
        tensors[alias] = tensors[source]
    return tensors, metadata


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
    order = tensor_order(metadata, path=path)
    for alias, source in tied_aliases(metadata, tensors, path=path).items():
        tensors[alias] = tensors[source]
    if order is not None and sorted(order) == sorted(tensors):
        tensors = {k: tensors[k] for k in order}
    return tensors, metadata


def write_checkpoint(path: str | os.PathLike[str], ckpt: Checkpoint) -> None:
    """Write ``ckpt`` as a safetensors file: tensors only, our parts in the header."""
    write_safetensors(path, ckpt.state_dict, {}, passthrough=checkpoint_header(ckpt))


def checkpoint_header(ckpt: Checkpoint) -> dict[str, str]:
    """The header strings of ``ckpt`` as a safetensors file: its stamp, hparams, meta and
    module metadata as JSON, another tool's strings kept; refused (:class:`CheckpointWriteError`)
    when it holds what a safetensors file cannot (optimizer state, extra entries)."""
    from ..values.stamp import stamp_of

    stamp = stamp_of(ckpt)
    extra = dict(ckpt.extra)
    passthrough = extra.pop("safetensors_metadata", None)
    if ckpt.optimizer is not None or extra:
        raise CheckpointWriteError(
            "a .safetensors file holds tensors only, but this checkpoint has optimizer "
            f"state or extra entries ({', '.join(extra) or 'optimizer'}): save it as .pth"
        )
    header: dict[str, str] = dict(passthrough) if isinstance(passthrough, dict) else {}
    ours = {
        STAMP: stamp,
        HPARAMS: ckpt.hparams if stamp or ckpt.hparams else None,
        META: ckpt.meta if stamp or ckpt.meta else None,
        MODULE_METADATA: ckpt.module_metadata,
    }
    return {**header, **_json_strings(ours)}


def _json_strings(metadata: dict[str, Any]) -> dict[str, str]:
    """Each value (None: left out) as the JSON string a safetensors header holds."""
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if value is None:
            continue
        try:
            out[key] = json.dumps(value, sort_keys=False)
        except (TypeError, ValueError) as exc:
            raise CheckpointWriteError(
                f"{key.split('.')[-1]} must be JSON-serialisable for a .safetensors file ({exc}); "
                "keep plain numbers, strings, lists and dicts there, or save as .pth"
            ) from None
    return out


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
            raise CheckpointWriteError(
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
    header = {**(passthrough or {}), **_json_strings(metadata)}
    if aliases:
        header[ALIASES] = json.dumps(aliases)
    header[ORDER] = json.dumps(list(tensors))
    with atomic_path(path) as tmp:
        save_file(unique, str(tmp), metadata=header)


def _identity(t: Any) -> tuple:
    if t.numel() == 0:
        return (id(t),)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
