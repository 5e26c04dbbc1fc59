"""The zip container of a torch.save file (torch >= 1.6): its members, their byte offsets, its
``data.pkl`` decoded to stubs and checked against the storage records.

Zip members named with ``..`` or an absolute path are a
:class:`~ckptmigrate.errors.CheckpointFormatError` (torch never writes them, so the archive
was tampered with), not an :class:`~ckptmigrate.errors.UnsafeCheckpointError`: no global is
involved, and allowing one by name could not make the file loadable.

>>> read_zip_records("model.pth")["archive/data/0"].size  # doctest: +SKIP
4096
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any, BinaryIO

from ...base.frozen import FrozenRecord, set_fields
from ...errors import CheckpointFormatError
from ...values.tensorinfo import DTYPE_SIZES
from ..bounds import DecodeBudget
from ..detect import open_regular_file
from .opcodes import ScanCorrupt
from .read_errors import FORMAT_ERRORS, with_path
from .storages import StorageRef, StorageTable
from .unpickler import MAX_PICKLE_BYTES, load_pickle_scanned
from .walk import ScanResult, scan_pickle
from .zip_directory import ZIP_STORED, ZipMember, local_header_end, read_directory, read_stored


class ZipRecordInfo(FrozenRecord):
    """Where one member of a torch zip archive lies, so it can be copied byte for byte."""

    __slots__ = (
        "name",
        "header_offset",
        "data_offset",
        "size",
        "compressed_size",
        "crc",
        "compress_type",
    )
    name: str
    header_offset: int  # of the local file header
    data_offset: int  # of the member's (possibly compressed) bytes
    size: int  # uncompressed
    compressed_size: int
    crc: int
    compress_type: int

    def __init__(
        self,
        name: str,
        header_offset: int,
        data_offset: int,
        size: int,
        compressed_size: int,
        crc: int,
        compress_type: int,
    ) -> None:
        set_fields(
            self,
            name=name,
            header_offset=header_offset,
            data_offset=data_offset,
            size=size,
            compressed_size=compressed_size,
            crc=crc,
            compress_type=compress_type,
        )


def _check_member_name(name: str, path: object) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise CheckpointFormatError(
            f"zip member {name!r} names a path outside the archive; torch never writes such "
            "names, so the file was altered",
            path=path,
        )


#: General-purpose flag bits of an encrypted zip member (traditional, strong): zipfile's
#: reader raises a bare RuntimeError on one, and torch.save never writes one.
_ENCRYPTED_FLAGS = 0x0001 | 0x0040


def zip_infos(f: BinaryIO, path: object) -> list[ZipMember]:
    """The members of the zip archive ``f``, refused when one is named outside the archive, is
    encrypted or appears twice."""
    infos = read_directory(f, path)
    names: set[str] = set()
    for info in infos:
        _check_member_name(info.filename, path)
        if info.flag_bits & _ENCRYPTED_FLAGS:
            raise CheckpointFormatError(
                f"zip member {info.filename!r} is marked encrypted (flags {info.flag_bits:#x}); "
                "torch.save never encrypts, so this is not a file torch wrote",
                path=path,
            )
        if info.filename in names:
            raise CheckpointFormatError(f"zip member {info.filename!r} appears twice", path=path)
        names.add(info.filename)
    return infos


def read_zip_records(path: str | os.PathLike[str]) -> dict[str, ZipRecordInfo]:
    """List the members of a torch zip checkpoint with their byte offsets, in archive order.

    >>> read_zip_records("model.pth")["archive/data/0"].size  # doctest: +SKIP
    4096
    """
    try:
        with open_regular_file(path) as f:
            infos = zip_infos(f, path)
            records: dict[str, ZipRecordInfo] = {}
            for info in infos:
                data_offset = local_header_end(f, info)
                if data_offset is None:
                    raise CheckpointFormatError(f"zip member {info.filename!r} has no local header")
                records[info.filename] = ZipRecordInfo(
                    name=info.filename,
                    header_offset=info.header_offset,
                    data_offset=data_offset,
                    size=info.file_size,
                    compressed_size=info.compress_size,
                    crc=info.CRC,
                    compress_type=info.compress_type,
                )
            return records
    except CheckpointFormatError as exc:
        raise with_path(exc, path) from exc.__cause__
    except FORMAT_ERRORS + (OSError,) as exc:
        raise CheckpointFormatError(f"corrupt zip archive ({exc})", path=path) from exc


def find_data_pkl(infos: list[ZipMember], path: object) -> ZipMember:
    """The one ``<name>/data.pkl`` member among ``infos``."""
    candidates = [
        i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1
    ]
    if not candidates:
        raise CheckpointFormatError(
            "zip archive has no <name>/data.pkl member: not a torch.save checkpoint", path=path
        )
    if len(candidates) > 1:
        names = ", ".join(i.filename for i in candidates)
        raise CheckpointFormatError(f"zip archive has several data.pkl members: {names}", path=path)
    return candidates[0]


def read_data_pkl(path: str | os.PathLike[str]) -> tuple[ZipMember, bytes]:
    """The ``data.pkl`` member of the torch zip at ``path`` and its bytes (at most
    :data:`~.unpickler.MAX_PICKLE_BYTES`)."""
    with open_regular_file(path) as f:
        _, data_pkl, data = _zip_pickle(f, path)
    return data_pkl, data


class ZipDecoded:
    """A torch zip checkpoint's decoded graph (stubs) with what was found on the way."""

    __slots__ = ("obj", "infos", "prefix", "scan")

    def __init__(
        self,
        obj: Any,
        infos: list[ZipMember],
        prefix: str,  # the archive folder with its slash, e.g. "archive/"
        scan: ScanResult,
    ) -> None:
        self.obj = obj
        self.infos = infos
        self.prefix = prefix
        self.scan = scan


def _zip_pickle(file: BinaryIO, path: object) -> tuple[list[ZipMember], ZipMember, bytes]:
    """The members of the torch zip ``file``, its ``data.pkl`` member and that member's bytes."""
    infos = zip_infos(file, path)
    data_pkl = find_data_pkl(infos, path)
    if data_pkl.compress_type != ZIP_STORED or data_pkl.flag_bits & 1:
        # torch.save stores every record; a compressed data.pkl only inflates (a 63 KB
        # DEFLATE member unpacks to gigabytes before any size check could see it)
        raise CheckpointFormatError(
            f"{data_pkl.filename} is compressed or encrypted (zip method "
            f"{data_pkl.compress_type}, flags {data_pkl.flag_bits:#x}); torch.save "
            "stores it uncompressed, so this is not a file torch wrote",
            path=path,
        )
    if data_pkl.file_size > MAX_PICKLE_BYTES:
        raise CheckpointFormatError(
            f"data.pkl is {data_pkl.file_size} bytes, over the {MAX_PICKLE_BYTES}-byte "
            "limit for a checkpoint's object graph",
            path=path,
        )
    return infos, data_pkl, read_stored(file, data_pkl, path)


def check_torch_bytes(file: BinaryIO, *, what: str, path: object = None) -> None:
    """Refuse ``torch.save`` bytes held in memory (a DCP value stored as bytes) whose pickle
    would take more memory or hashing to decode than the pickle budget allows, before torch's
    own loader decodes it; globals are left to that loader (weights-only). ``file`` is read
    from its start and left there.

    >>> check_torch_bytes(io.BytesIO(value), what="value 'epoch'")  # doctest: +SKIP
    """
    try:
        file.seek(0)
        _, _, pkl = _zip_pickle(file, path)
        file.seek(0)
        scan = scan_pickle(pkl, 0, len(pkl), None, path)
    except ScanCorrupt as exc:
        raise CheckpointFormatError(f"{what} is a corrupt pickle ({exc})", path=path) from None
    except FORMAT_ERRORS as exc:
        raise CheckpointFormatError(f"{what} is not a torch.save zip ({exc})", path=path) from None
    stored = len(pkl)
    budget = DecodeBudget(stored, 2 * stored + scan.estimate, what, path, scan.hashed)
    budget.charge(0)
    budget.check_hashing()


def read_zip(path: str | os.PathLike[str], allowed: dict[str, Any]) -> Any:
    """The decoded graph of the torch zip at ``path``, tensors as stubs."""
    return decode_zip(path, allowed).obj


def decode_zip(
    path: str | os.PathLike[str],
    allowed: dict[str, Any],
    on_storage: Callable[[StorageRef, Any], None] | None = None,
) -> ZipDecoded:
    """Decode ``data.pkl`` to stubs and check every storage it names against the archive:
    the one decode of a torch zip, for the metadata reader, the mapped load and the byte
    copier alike (a compressed ``data.pkl`` or a storage shorter than its tensor is refused
    whichever reads it).

    ``on_storage(ref, pid)`` sees each storage reference and its persistent id as the pickle
    loads it, in order.
    """
    with open_regular_file(path) as f:
        infos, data_pkl, data = _zip_pickle(f, path)
    prefix = data_pkl.filename[: -len("data.pkl")]
    table = StorageTable(legacy=False, key_prefix=prefix + "data/")

    def load_storage(pid: Any) -> StorageRef:
        ref = table.load(pid)
        if on_storage is not None:
            on_storage(ref, pid)
        return ref

    obj, scan = load_pickle_scanned(io.BytesIO(data), allowed, load_storage, path)
    sizes = {info.filename: info.file_size for info in infos}
    for key, ref in table.storages.items():
        if key not in sizes:
            raise CheckpointFormatError(f"storage record {key!r} is missing from the archive")
        needed = ref.stored_numel * DTYPE_SIZES[ref.dtype]
        if sizes[key] < needed:
            raise CheckpointFormatError(
                f"storage shorter than its tensor claims: record {key!r} holds {sizes[key]} "
                f"bytes, the pickle declares {needed}"
            )
    return ZipDecoded(obj, infos, prefix, scan)
