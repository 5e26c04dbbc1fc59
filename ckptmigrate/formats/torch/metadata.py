"""Decode a ``torch.save`` file's object graph without torch and without reading tensor data:
one sniff, then the zip (:mod:`.archive`) or the legacy (:mod:`.legacy`) reader.

Tensors come back as :class:`~ckptmigrate.values.tensorinfo.TensorStub` records (shape, dtype,
storage key, offset, device). The pickle is decoded by a restricted unpickler that accepts
exactly the globals ``torch.load(weights_only=True)`` accepts, plus the ones a caller allows by
name (which decode to :class:`~.placeholders.OpaqueObject` placeholders); nothing from the file
is ever imported or called.

>>> obj = read_torch_metadata("model.pth")  # doctest: +SKIP
>>> obj["state_dict"]["fc.weight"]
TensorStub(Parameter, shape=(10, 20), dtype=float32)
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from typing import Any

from ...errors import CheckpointFormatError
from ..detect import detect_format, open_regular_file
from ..remote import RemotePath, downloaded
from .allowlist import allowed_map
from .archive import read_data_pkl, read_zip
from .read_errors import FORMAT_ERRORS, reading, with_path
from .unpickler import BoundedReader, load_pickle, scan_globals


def read_torch_metadata(
    path: str | os.PathLike[str], *, allowed_globals: Iterable[str] = (), kind: str | None = None
) -> Any:
    """Decode a ``torch.save`` file (zip or legacy) with every tensor as a TensorStub.

    No tensor data is read and nothing from the file is imported or run. Globals outside
    torch's weights-only allow-list raise :class:`~ckptmigrate.errors.UnsafeCheckpointError`
    unless named in ``allowed_globals`` (``"module.Name"``), which decode to
    :class:`~.placeholders.OpaqueObject`. A truncated or corrupt file raises
    :class:`~ckptmigrate.errors.CheckpointFormatError`. ``kind`` is the format
    :func:`~ckptmigrate.formats.registry.detect` found, where the caller sniffed the file
    already.

    >>> sd = read_torch_metadata("model.pth")  # doctest: +SKIP
    >>> {k: (v.shape, v.dtype) for k, v in sd.items()}  # doctest: +SKIP
    {'fc.weight': ((10, 20), 'float32'), 'fc.bias': ((10,), 'float32')}
    """
    allowed = allowed_map(allowed_globals)
    kind = kind if kind is not None else detect_format(path)
    if kind == "torch-zip":
        return reading(path, lambda: read_zip(path, allowed))
    if kind == "torch-legacy":
        from .legacy import read_legacy  # a pre-zip file: torch < 1.6

        if isinstance(path, RemotePath):  # its pickles are read in a stream: read a copy
            with downloaded(path, [path]) as local:
                return reading(path, lambda: read_legacy(local, allowed))
        return reading(path, lambda: read_legacy(path, allowed))
    raise CheckpointFormatError(f"is a {kind} checkpoint, not a torch.save file", path=path)


def scan_pickle_globals(path: str | os.PathLike[str]) -> list[str]:
    """List the globals a ``torch.save`` file's main pickle names, without decoding it.

    Useful to tell a user which names to allow; nothing is refused here.
    """
    kind = detect_format(path)
    try:
        if kind == "torch-zip":
            _, data = read_data_pkl(path)
            return scan_globals(io.BytesIO(data), None)
        if kind == "torch-legacy":
            with open_regular_file(path) as raw:
                f = BoundedReader(raw, os.fstat(raw.fileno()).st_size)
                for _ in range(3):
                    load_pickle(f, {})
                return scan_globals(f, None)
    except CheckpointFormatError as exc:
        raise with_path(exc, path) from exc.__cause__
    except FORMAT_ERRORS as exc:
        raise CheckpointFormatError(f"corrupt checkpoint ({exc})", path=path) from exc
    raise CheckpointFormatError(f"is a {kind} checkpoint, not a torch.save file", path=path)
