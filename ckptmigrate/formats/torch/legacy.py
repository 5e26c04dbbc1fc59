"""The legacy torch.save format (before torch 1.6): a magic number, a protocol and a sys_info
pickle, the main pickle, the storage keys, then each storage as a count and its bytes.

>>> read_legacy("old.pt", allowed_map(()))  # doctest: +SKIP
{'fc.weight': TensorStub(...)}
"""

from __future__ import annotations

import os
import struct
from typing import Any, BinaryIO

from ...base.readable import bounded_repr
from ...errors import CheckpointFormatError
from ...values.tensorinfo import DTYPE_SIZES
from ..detect import TORCH_LEGACY_MAGIC, open_regular_file
from .storages import StorageTable
from .unpickler import MAX_PICKLE_BYTES, BoundedReader, load_pickle

_LEGACY_PROTOCOL_VERSION = 1001


def read_legacy(path: str | os.PathLike[str], allowed: dict[str, Any]) -> Any:
    """The decoded graph of the legacy torch.save file at ``path``, tensors as stubs; every
    storage it names is checked against the stored ones."""
    header_only: dict[str, Any] = {}  # the three header pickles name no globals at all
    with open_regular_file(path) as raw:
        file_size = os.fstat(raw.fileno()).st_size
        f = BoundedReader(raw, file_size)
        magic = load_pickle(f, header_only)
        if magic != TORCH_LEGACY_MAGIC:
            raise CheckpointFormatError("not a legacy torch.save file (bad magic number)")
        protocol = load_pickle(f, header_only)
        if protocol != _LEGACY_PROTOCOL_VERSION:
            raise CheckpointFormatError(
                f"legacy torch.save protocol {bounded_repr(protocol)}, expected "
                f"{_LEGACY_PROTOCOL_VERSION}"
            )
        sys_info = load_pickle(f, header_only)
        if not isinstance(sys_info, dict):
            raise CheckpointFormatError("legacy torch.save file has a malformed sys_info record")
        start = f.tell()
        table = StorageTable(legacy=True)
        # Bound the main pickle so a lying length cannot pull in the tensor data after it.
        f = BoundedReader(raw, min(file_size, start + MAX_PICKLE_BYTES))
        obj = load_pickle(f, allowed, table.load, path)
        f = BoundedReader(raw, file_size)
        keys = load_pickle(f, header_only)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise CheckpointFormatError("legacy torch.save file has a malformed storage key list")
        missing = sorted(set(table.storages) - set(keys))
        if missing:
            raise CheckpointFormatError(f"storages {missing[:5]} are referenced but not stored")
        _check_legacy_storages(raw, f.tell(), file_size, keys, table)
    return obj


def _check_legacy_storages(
    raw: BinaryIO, position: int, file_size: int, keys: list[str], table: StorageTable
) -> None:
    """Each stored storage is an 8-byte element count and its bytes; peek at the counts only."""
    for key in keys:
        ref = table.storages.get(key)
        if ref is None:
            raise CheckpointFormatError(f"storage {key!r} is stored but never referenced")
        raw.seek(position)
        count = raw.read(8)
        if len(count) != 8:
            raise CheckpointFormatError(f"file ends before storage {key!r}: truncated")
        (stored,) = struct.unpack("<q", count)
        needed = ref.stored_numel * DTYPE_SIZES[ref.dtype]
        stored_bytes = stored * DTYPE_SIZES[ref.dtype]
        if stored < 0 or stored_bytes < needed:
            raise CheckpointFormatError(
                f"storage shorter than its tensor claims: storage {key!r} holds {stored} "
                f"elements, the pickle declares {ref.stored_numel}"
            )
        position += 8 + stored_bytes
        if position > file_size:
            raise CheckpointFormatError(f"file ends inside storage {key!r}: truncated")
