"""A zip archive's central directory, and one stored member's bytes, read without zipfile.

Reading a torch zip's metadata needs the members' names, flags, methods, CRCs, sizes and local
header offsets, and the bytes of one stored member (``data.pkl``). :mod:`zipfile` does that
and more, and its import (with shutil, bz2 and lzma behind it) costs every ``ckptmigrate
diff`` about 3 ms. This reader follows zipfile's reading of the same structures (the end
record searched for past a comment, zip64 records, bytes prepended to the archive, names
decoded as UTF-8 when flagged, else cp437, and cut at a NUL) and checks what zipfile checks
when it opens a member (the local header's magic and name, the CRC of the bytes read). Any
structure that does not hold is a :class:`~ckptmigrate.errors.CheckpointFormatError`.

>>> members = read_directory(f, path)  # doctest: +SKIP
>>> read_stored(f, members[0], path)[:2]  # doctest: +SKIP
b'\\x80\\x02'
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, BinaryIO

from ...errors import CheckpointFormatError

__all__ = ["ZIP_STORED", "ZipMember", "local_header_end", "read_directory", "read_stored"]

ZIP_STORED = 0
_END = struct.Struct("<4s4H2LH")  # the end of central directory record
_END_MAGIC = b"PK\x05\x06"
_LOCATOR = struct.Struct("<4sLQL")  # the zip64 end of central directory locator
_LOCATOR_MAGIC = b"PK\x06\x07"
_END64 = struct.Struct("<4sQ2H2L4Q")  # the zip64 end of central directory record
_END64_MAGIC = b"PK\x06\x06"
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")  # one central directory entry
_CENTRAL_MAGIC = b"PK\x01\x02"
_LOCAL = struct.Struct("<4s2B4HL2L2H")  # a member's local header
_LOCAL_MAGIC = b"PK\x03\x04"
_MAX_COMMENT = (1 << 16) - 1
_MAX_EXTRACT_VERSION = 63  # zipfile refuses members that need a newer reader
_UTF8_FLAG = 0x800
_ZIP64_TAG = 0x0001
_U32_MAX = 0xFFFFFFFF


class ZipMember:
    """One member as the central directory describes it (zipfile's ``ZipInfo`` names)."""

    __slots__ = (
        "filename",
        "orig_filename",
        "flag_bits",
        "compress_type",
        "CRC",
        "compress_size",
        "file_size",
        "header_offset",
    )

    def __init__(
        self,
        filename: str,
        flag_bits: int,
        compress_type: int,
        crc: int,
        compress_size: int,
        file_size: int,
        header_offset: int,
    ) -> None:
        self.orig_filename = filename
        self.filename = filename.split("\x00", 1)[0]  # as zipfile: a NUL ends the name
        self.flag_bits = flag_bits
        self.compress_type = compress_type
        self.CRC = crc
        self.compress_size = compress_size
        self.file_size = file_size
        self.header_offset = header_offset

    def __repr__(self) -> str:
        return f"<ZipMember {self.filename!r} size={self.file_size}>"


def _corrupt(reason: str, path: object) -> CheckpointFormatError:
    return CheckpointFormatError(f"corrupt zip archive ({reason})", path=path)


def _read_at(f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


def _end_record(f: BinaryIO, path: object) -> tuple[tuple[Any, ...], int, int]:
    """The end record's fields, where it starts, and the file's size."""
    f.seek(0, 2)
    size = f.tell()
    if size >= _END.size:
        tail = _read_at(f, size - _END.size, _END.size)
        if tail[:4] == _END_MAGIC and tail[-2:] == b"\x00\x00":  # no comment: the usual case
            return _END.unpack(tail), size - _END.size, size
    start = max(size - _MAX_COMMENT - _END.size, 0)
    tail = _read_at(f, start, size - start)
    at = tail.rfind(_END_MAGIC)
    if at < 0 or len(tail) - at < _END.size:
        raise _corrupt("File is not a zip file", path)
    return _END.unpack_from(tail, at), start + at, size


def read_directory(f: BinaryIO, path: object = None) -> list[ZipMember]:
    """The members of the zip archive ``f``, in central directory order (duplicates kept)."""
    end, end_at, size = _end_record(f, path)
    cd_size, cd_offset = end[5], end[6]
    prepended = end_at - cd_size - cd_offset  # bytes before the archive (zipfile's "concat")
    if end_at >= _LOCATOR.size:
        locator = _read_at(f, end_at - _LOCATOR.size, _LOCATOR.size)
        if len(locator) == _LOCATOR.size and locator[:4] == _LOCATOR_MAGIC:
            _, locator_disk, _, disks = _LOCATOR.unpack(locator)
            if locator_disk != 0 or disks > 1:
                raise _corrupt("zipfiles that span multiple disks are not supported", path)
            record_at = end_at - _LOCATOR.size - _END64.size
            record = _read_at(f, record_at, _END64.size) if record_at >= 0 else b""
            if len(record) == _END64.size and record[:4] == _END64_MAGIC:
                cd_size, cd_offset = _END64.unpack(record)[8:10]
                prepended = end_at - cd_size - cd_offset - _END64.size - _LOCATOR.size
    if prepended < 0 or cd_offset + prepended + cd_size > size:
        raise _corrupt("Bad offset for central directory", path)
    data = _read_at(f, cd_offset + prepended, cd_size)
    if len(data) != cd_size:
        raise _corrupt("Truncated central directory", path)
    members: list[ZipMember] = []
    pos = 0
    while pos < cd_size:
        if cd_size - pos < _CENTRAL.size or data[pos : pos + 4] != _CENTRAL_MAGIC:
            raise _corrupt("Bad magic number for central directory", path)
        entry = _CENTRAL.unpack_from(data, pos)
        extract_version, flags, method, crc = entry[3], entry[5], entry[6], entry[9]
        compressed, plain, name_len, extra_len, comment_len = entry[10:15]
        offset = entry[18]
        pos += _CENTRAL.size
        raw_name = data[pos : pos + name_len]
        extra = data[pos + name_len : pos + name_len + extra_len]
        pos += name_len + extra_len + comment_len
        if pos > cd_size:
            raise _corrupt("Truncated central directory entry", path)
        if extract_version > _MAX_EXTRACT_VERSION:
            raise _corrupt(f"zip file version {extract_version / 10:.1f}", path)
        name = raw_name.decode("utf-8" if flags & _UTF8_FLAG else "cp437")
        plain, compressed, offset = _zip64_sizes(extra, plain, compressed, offset, path)
        members.append(ZipMember(name, flags, method, crc, compressed, plain, offset + prepended))
    return members  # as zipfile: the entries read, whatever count the end record gives


def _zip64_sizes(
    extra: bytes, plain: int, compressed: int, offset: int, path: object
) -> tuple[int, int, int]:
    """The sizes and offset a zip64 extra field gives for those the entry marks as too big."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if pos + 4 + length > len(extra):
            raise _corrupt(f"Corrupt extra field {tag:04x} (size={length})", path)
        if tag == _ZIP64_TAG:
            body, at = extra[pos + 4 : pos + 4 + length], 0
            wanted = []
            for value in (plain, compressed, offset):
                if value == _U32_MAX:  # (zipfile also takes 2**64-1 for the size: never in 32 bits)
                    if at + 8 > len(body):
                        raise _corrupt("Corrupt zip64 extra field", path)
                    value = struct.unpack_from("<Q", body, at)[0]
                    at += 8
                wanted.append(value)
            plain, compressed, offset = wanted
        pos += 4 + length
    return plain, compressed, offset


def local_header_end(f: BinaryIO, member: ZipMember) -> int | None:
    """Where ``member``'s bytes start, past its local header; None when no local header lies
    where the central directory says."""
    header = _read_at(f, member.header_offset, _LOCAL.size)
    if len(header) != _LOCAL.size or header[:4] != _LOCAL_MAGIC:
        return None
    name_len, extra_len = _LOCAL.unpack(header)[10:12]
    return member.header_offset + _LOCAL.size + name_len + extra_len


def read_stored(f: BinaryIO, member: ZipMember, path: object = None) -> bytes:
    """The bytes of the stored (uncompressed) ``member``, checked as zipfile checks a member
    it opens: the local header's magic and name, the flags it cannot read, the CRC."""
    header = _read_at(f, member.header_offset, _LOCAL.size)
    if len(header) != _LOCAL.size:
        raise _corrupt("Truncated file header", path)
    if header[:4] != _LOCAL_MAGIC:
        raise _corrupt("Bad magic number for file header", path)
    fields = _LOCAL.unpack(header)
    name_len, extra_len = fields[10], fields[11]
    raw_name = f.read(name_len)
    if member.flag_bits & 0x20:
        raise _corrupt("compressed patched data (flag bit 5)", path)
    if member.flag_bits & 0x40:
        raise _corrupt("strong encryption (flag bit 6)", path)
    name = raw_name.decode("utf-8" if fields[3] & _UTF8_FLAG else "cp437")
    if name != member.orig_filename:
        raise _corrupt(
            f"File name in directory {member.orig_filename!r} and header {raw_name!r} differ.",
            path,
        )
    if member.compress_type != ZIP_STORED or member.compress_size != member.file_size:
        raise _corrupt(f"{member.filename} is not stored uncompressed", path)
    data = _read_at(f, member.header_offset + _LOCAL.size + name_len + extra_len, member.file_size)
    if len(data) != member.file_size:
        raise _corrupt(f"{member.filename} is truncated", path)
    if zlib.crc32(data) != member.CRC:
        raise _corrupt(f"Bad CRC-32 for file {member.filename!r}", path)
    return data
