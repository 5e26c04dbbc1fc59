"""Write a zip archive the way torch.save lays one out, copying members byte for byte.

torch reads members that are stored (not compressed) and whose data start on a 64-byte
boundary, which ``torch.load(mmap=True)`` relies on; like torch's own writer we pad the local
header with an ``FB`` extra field to get there. A member copied from another archive is laid
out at the same offset modulo :data:`~..byte_copy.BLOCK` as there (the padding grows to at
most a block), so that a file system that clones (XFS reflink, btrfs) shares its blocks instead
of copying them. A member copied from another archive keeps its
stored bytes and CRC and moves with ``os.copy_file_range``, inside the kernel, so its data never
passes through Python. :func:`write_zip_copy` writes a whole archive atomically, with the disk
writing behind the copy (:class:`~.atomic.Writeback`) so the closing fsync waits little.

>>> with open_copy("new.pth", [("old.pth", None)]) as job:  # doctest: +SKIP
...     zw = TorchZipWriter(job.sink)
...     zw.add_bytes("archive/data.pkl", pickled)
...     zw.copy_member("archive/data/0", job.source("old.pth"), records["archive/data/0"])
...     zw.close()
"""

from __future__ import annotations

import bisect
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ...errors import CheckpointFormatError
from ..byte_copy import BLOCK
from ..remote import RemotePath
from ..sink import CopySource, Sink, open_copy
from .archive import ZipRecordInfo

__all__ = ["ALIGNMENT", "JoinedRecord", "TorchZipWriter", "write_zip_copy"]

#: torch aligns every member's data to this many bytes (``torch.serialization`` storage alignment).
ALIGNMENT = 64
_LIMIT = 0xFFFFFFFF
_CHUNK = 16 << 20  # a new member is checksummed and written this much at a time


@dataclass(frozen=True)
class JoinedRecord:
    """A new member whose bytes are ranges of other files, in order (a merged tensor's
    storage: its parts' bytes), and the CRC-32 of them laid end to end."""

    runs: tuple[tuple[Path, int, int], ...]  # (file, offset, byte count)
    crc: int

    @property
    def size(self) -> int:
        return sum(n for _, _, n in self.runs)


@dataclass(frozen=True)
class _Entry:
    name: bytes
    offset: int
    size: int
    crc: int


class TorchZipWriter:
    """A stored-only zip64 archive writer with torch's 64-byte data alignment, writing into
    a :class:`~..sink.Sink` (whose ``position`` is where the next byte goes)."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        #: where each source record's extent ends (its data, and the data descriptor torch
        #: writes after them): the next record's local header (:meth:`know_extents`)
        self._extent_ends: dict[str, int] = {}
        self._entries: list[_Entry] = []
        self.bytes_copied = 0
        self.bytes_through_python = 0

    def _local_header(self, name: str, size: int, crc: int, like: int | None = None) -> bytes:
        """The local header of a member whose data follow it: at a multiple of
        :data:`ALIGNMENT`, and at ``like`` modulo a block where ``like`` (the member's offset
        in the archive it is copied from) is itself aligned."""
        raw = name.encode("utf-8")
        zip64 = size >= _LIMIT
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        # the FB field's own 4-byte header counts before its padding
        start = self._sink.position + 30 + len(raw) + len(extra) + 4
        if like is not None and like % ALIGNMENT == 0:
            pad = (like - start) % BLOCK
        else:
            pad = -start % ALIGNMENT
        extra += b"FB" + struct.pack("<H", pad) + b"Z" * pad
        stored = _LIMIT if zip64 else size
        self._entries.append(_Entry(raw, self._sink.position, size, crc))
        header = struct.pack(
            "<IHHHHHIIIHH",
            0x04034B50,
            45 if zip64 else 20,
            0,
            0,
            0,
            0,
            crc,
            stored,
            stored,
            len(raw),
            len(extra),
        )
        return header + raw + extra

    def add_bytes(self, name: str, data: bytes) -> None:
        """Add a member from bytes (a new data.pkl, a small record)."""
        self._sink.write(self._local_header(name, len(data), zlib.crc32(data)))
        self._sink.write(data)

    def add_buffer(self, name: str, data: memoryview) -> None:
        """Add a member from memory (a new tensor's storage) without copying it first: its CRC
        is computed over the buffer, then it is written in chunks."""
        data = data.cast("B")
        crc = 0
        for at in range(0, len(data), _CHUNK):
            crc = zlib.crc32(data[at : at + _CHUNK], crc)
        self._sink.write(self._local_header(name, len(data), crc))
        for at in range(0, len(data), _CHUNK):
            self._sink.write(data[at : at + _CHUNK])
        self.bytes_through_python += len(data)

    def know_extents(self, records: Iterable[ZipRecordInfo]) -> None:
        """The source archive's records, so that a member copied whole (its local header,
        data and data descriptor, see :meth:`copy_member`) ends where the next one starts."""
        starts = sorted(r.header_offset for r in records)
        for r in records:
            at = bisect.bisect_left(starts, r.data_offset + r.compressed_size)
            if at < len(starts):
                self._extent_ends[r.name] = starts[at]

    def copy_member(self, name: str, source: CopySource, record: ZipRecordInfo) -> None:
        """Copy a stored member of another archive as it is, CRC included, under ``name``."""
        if record.compress_type != 0 or record.compressed_size != record.size:
            raise CheckpointFormatError(
                f"zip member {record.name!r} is compressed; torch writes stored members only"
            )
        if self._copies_whole(name, source, record):
            return
        self._sink.write(self._local_header(name, record.size, record.crc, like=record.data_offset))
        self.bytes_through_python += self._sink.copy(source, record.data_offset, record.size)
        self.bytes_copied += record.size

    def _copies_whole(self, name: str, source: CopySource, record: ZipRecordInfo) -> bool:
        """Copy the member's whole extent in the source (local header, data, descriptor) as
        it is, where the sink copies long runs faster (server-side): members that lay back
        to back in the source stay back to back, one run, so none of their bytes is
        downloaded. The data keep their 64-byte alignment (zero bytes before the header,
        which readers that follow the central directory skip over, as torch's does)."""
        end = self._extent_ends.get(record.name)
        if (
            end is None
            or name != record.name
            or record.data_offset % ALIGNMENT
            or not self._sink.copies_runs(source)
        ):
            return False
        gap = (record.header_offset - self._sink.position) % ALIGNMENT
        if gap:
            self._sink.write(bytes(gap))
        self._entries.append(
            _Entry(name.encode("utf-8"), self._sink.position, record.size, record.crc)
        )
        self.bytes_through_python += self._sink.copy(
            source, record.header_offset, end - record.header_offset
        )
        self.bytes_copied += record.size
        return True

    def copy_runs(self, name: str, runs: list[tuple[CopySource, int, int]], crc: int) -> None:
        """Add a member whose bytes are ``runs`` (``(source, offset, count)``) of other
        files, in order, with their CRC-32 ``crc`` (a merged tensor's storage); laid out to
        clone the first run where it can. Each run goes through the sink:
        ``copy_file_range`` into a local file, a server-side part copy (or a read and
        upload) into an object."""
        size = sum(n for _, _, n in runs)
        like = runs[0][1] if runs else None
        self._sink.write(self._local_header(name, size, crc, like=like))
        for source, offset, count in runs:
            self.bytes_through_python += self._sink.copy(source, offset, count)
            self.bytes_copied += count

    def close(self) -> None:
        """Write the central directory and the (zip64) end records, as torch does."""
        start = self._sink.position
        central = bytearray()
        for e in self._entries:
            fields = []
            if e.size >= _LIMIT:
                fields += [e.size, e.size]
            if e.offset >= _LIMIT:
                fields.append(e.offset)
            extra = (
                struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
            )
            version = 45 if fields else 20
            central += struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                version,
                version,
                0,
                0,
                0,
                0,
                e.crc,
                min(e.size, _LIMIT),
                min(e.size, _LIMIT),
                len(e.name),
                len(extra),
                0,
                0,
                0,
                0,
                min(e.offset, _LIMIT),
            )
            central += e.name + extra
        self._sink.write(bytes(central))
        count, size, eocd64 = len(self._entries), len(central), self._sink.position
        self._sink.write(
            struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, size, start)
        )
        self._sink.write(struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1))
        self._sink.write(
            struct.pack(
                "<IHHHHIIH",
                0x06054B50,
                0,
                0,
                min(count, 0xFFFF),
                min(count, 0xFFFF),
                min(size, _LIMIT),
                min(start, _LIMIT),
                0,
            )
        )


def write_zip_copy(
    dst: str | os.PathLike[str] | RemotePath,
    src: str | os.PathLike[str] | RemotePath,
    members: Iterable[tuple[str, bytes | memoryview | ZipRecordInfo | JoinedRecord]],
    *,
    origin: RemotePath | None = None,
    records: Iterable[ZipRecordInfo] | None = None,
) -> TorchZipWriter:
    """Write an archive of ``members`` to ``dst`` atomically, in that order: bytes (or a
    buffer: a new tensor's storage) as given, records copied as stored from the archive
    ``src``, joined records copied from the files they name. Returns the closed writer (its
    ``bytes_copied`` / ``bytes_through_python`` tell what moved).

    Either may be an object (:mod:`..sink`): records of an object are read by range, or
    copied by the server when ``dst`` is on its store; ``origin`` names the object a local
    ``src`` is a private copy of, so that its records are copied server-side too.
    ``records`` (every record of ``src``) lets an upload copy each kept record's whole
    extent, so that records lying back to back go as one server-side run.

    >>> write_zip_copy("new.pth", "old.pth", [("archive/data.pkl", pickled),
    ...                                       ("archive/data/0", records["archive/data/0"])])
    """
    with open_copy(dst, [(src, origin)]) as job:
        source = job.source(src)
        writer = TorchZipWriter(job.sink)
        if records is not None:
            writer.know_extents(records)
        for name, member in members:
            if isinstance(member, bytes):
                writer.add_bytes(name, member)
            elif isinstance(member, memoryview):
                writer.add_buffer(name, member)
            elif isinstance(member, JoinedRecord):
                runs = [(job.source(path), at, n) for path, at, n in member.runs]
                writer.copy_runs(name, runs, member.crc)
            else:
                writer.copy_member(name, source, member)
        writer.close()
    writer.bytes_through_python += job.sink.bytes_read_through
    return writer
