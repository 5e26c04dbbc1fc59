"""Read a safetensors file's header (names, shapes, dtypes, metadata) without its data.

>>> tensors, metadata = read_safetensors_header("model.safetensors")  # doctest: +SKIP
>>> tensors["embed.weight"].shape
(32000, 4096)
"""

from __future__ import annotations

import json
import os
import struct
import sys
from math import prod
from typing import Any

from ..base.readable import bounded_repr
from ..errors import BudgetExceededError, CheckpointFormatError
from ..values.tensorinfo import DTYPE_SIZES, SAFETENSORS_DTYPES, TensorInfo
from .detect import file_size as size_of
from .detect import open_regular_file

__all__ = ["HEADER_ALLOWANCE", "HEADER_FACTOR", "MAX_HEADER_BYTES", "read_safetensors_header"]

#: The largest header we accept; the safetensors library itself refuses larger ones.
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Parsing a header may take at most this many times its bytes, plus HEADER_ALLOWANCE
#: (measured: a header of 200k tensors named ``layers.N.weight`` peaks at 13 times its bytes;
#: 40 MB of ``"aN": {}`` entries at 27 times, 1.08 GiB).
HEADER_FACTOR = 16
HEADER_ALLOWANCE = 64 << 20


def _parse_cost(raw: bytes) -> int:
    """Bytes ``json.loads`` allocates for ``raw`` at most, from its structural characters
    (counted inside strings too, which only overestimates): an object with its key and
    pair, a list, a key and its value, a list item (measured on CPython 3.11)."""
    return (
        2 * len(raw)
        + 250 * raw.count(b"{")
        + 80 * raw.count(b"[")
        + 150 * raw.count(b":")
        + 10 * raw.count(b",")
    )


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise CheckpointFormatError(f"safetensors header repeats the key {bounded_repr(key)}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise CheckpointFormatError(f"safetensors header holds {name}, which is not valid JSON")


def _is_count(value: Any) -> bool:
    # bool is an int subclass, but true/false are not sizes.
    return type(value) is int and value >= 0


def _parse_entry(name: str, entry: Any, data_size: int) -> TensorInfo:
    where = f"tensor {bounded_repr(name)} in the safetensors header"
    if not isinstance(entry, dict):
        raise CheckpointFormatError(f"{where} is {type(entry).__name__}, expected an object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise CheckpointFormatError(f"{where} has no {field!r}")
    code = entry["dtype"]
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        known = ", ".join(SAFETENSORS_DTYPES)
        raise CheckpointFormatError(
            f"{where} has unknown dtype {bounded_repr(code)} (known: {known})"
        )
    dtype = SAFETENSORS_DTYPES[code]
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointFormatError(
            f"{where} has shape {bounded_repr(shape)}, expected a list of non-negative integers"
        )
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise CheckpointFormatError(
            f"{where} has data_offsets {bounded_repr(offsets)}, expected [begin, end] as "
            "non-negative integers"
        )
    begin, end = offsets
    if begin > end:
        raise CheckpointFormatError(
            f"{where} has data_offsets {bounded_repr(offsets)} with begin > end"
        )
    if end > data_size:
        raise CheckpointFormatError(
            f"{where} ends at byte {end} of the data section, which holds only {data_size} "
            "bytes: the file is truncated or its header lies"
        )
    nbytes = prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != nbytes:
        raise CheckpointFormatError(
            f"{where} spans {end - begin} bytes, but shape {bounded_repr(tuple(shape))} of "
            f"{code} needs {bounded_repr(nbytes)} bytes"
        )
    return TensorInfo(shape=tuple(shape), dtype=dtype, nbytes=nbytes, data_offsets=(begin, end))


def _check_layout(tensors: dict[str, TensorInfo], data_size: int) -> None:
    """Tensors must tile the data section exactly, as the safetensors library requires."""
    position = 0
    previous = None
    for name, info in tensors.items():
        assert info.data_offsets is not None
        begin, end = info.data_offsets
        if begin < position:
            raise CheckpointFormatError(
                f"tensors {bounded_repr(previous)} and {bounded_repr(name)} overlap in the "
                "safetensors data section"
            )
        if begin > position:
            raise CheckpointFormatError(
                f"safetensors data section has a gap of {begin - position} bytes before "
                f"tensor {bounded_repr(name)}"
            )
        position = end
        previous = name
    if position != data_size:
        raise CheckpointFormatError(
            f"safetensors data section holds {data_size} bytes but its tensors cover only "
            f"{position}: the header does not describe the file"
        )


def _parse_metadata(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise CheckpointFormatError(
            "safetensors __metadata__ must map strings to strings, found "
            f"{json.dumps(value)[:120]}"
        )
    return dict(value)


def read_safetensors_header(
    path: str | os.PathLike[str],
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Return ``(tensors, metadata)`` from a safetensors file's header, reading no tensor data.

    ``tensors`` maps each name to its :class:`TensorInfo`, in the order its bytes lie in the
    file; ``metadata`` is the header's ``__metadata__`` (``{}`` when absent). Every lie the
    header could tell about the file is a :class:`~ckptmigrate.errors.CheckpointFormatError`.
    """
    try:
        return _read(path)
    except CheckpointFormatError as exc:
        if exc.path is None:
            raise CheckpointFormatError(str(exc), path=path) from exc.__cause__
        raise


def _read(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    with open_regular_file(path) as f:
        file_size = size_of(f)
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointFormatError(
                f"is {file_size} bytes long, too short for a safetensors file (8-byte header "
                "length first)"
            )
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > file_size - 8:
            raise CheckpointFormatError(
                f"safetensors header claims {header_len} bytes but the file has only "
                f"{file_size - 8} after the length: truncated or not safetensors"
            )
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointFormatError(
                f"safetensors header claims {header_len} bytes, more than the "
                f"{MAX_HEADER_BYTES}-byte limit"
            )
        raw = f.read(header_len)
    if len(raw) != header_len:
        raise CheckpointFormatError("file shrank while reading its safetensors header")
    cost, budget = _parse_cost(raw), HEADER_FACTOR * header_len + HEADER_ALLOWANCE
    if cost > budget:
        rule = f"{HEADER_FACTOR} times its {header_len} bytes plus {HEADER_ALLOWANCE >> 20} MiB"
        raise BudgetExceededError("the safetensors header", cost, budget, rule, path=path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointFormatError(f"safetensors header is not UTF-8: {exc}") from None
    try:
        header = json.loads(
            text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant
        )
    except CheckpointFormatError:  # a ValueError too: the hooks' refusals
        raise
    except json.JSONDecodeError as exc:
        raise CheckpointFormatError(f"safetensors header is not JSON: {exc}") from None
    except ValueError:  # json's int() of a number past Python's int->str limit
        raise CheckpointFormatError(
            f"safetensors header holds a number of more than {sys.get_int_max_str_digits()} "
            "digits: no size or offset is that long"
        ) from None
    except RecursionError:
        raise CheckpointFormatError("safetensors header is nested too deeply") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(
            f"safetensors header is a JSON {type(header).__name__}, expected an object"
        )
    data_size = file_size - 8 - header_len
    metadata = _parse_metadata(header.get("__metadata__", {}))
    entries = [
        (name, _parse_entry(name, entry, data_size))
        for name, entry in header.items()
        if name != "__metadata__"
    ]
    entries.sort(key=lambda item: item[1].data_offsets or (0, 0))
    tensors = dict(entries)
    _check_layout(tensors, data_size)
    return tensors, metadata
