"""The zip reader of the metadata path (formats.torch.zip_directory) reads what zipfile reads.

It replaces zipfile on the way to a torch zip's ``data.pkl`` (zipfile's import costs every
diff milliseconds), so it is held to zipfile on real archives: torch.save output, an archive
with a comment, one behind prepended bytes, one in zip64 records; and it refuses, as
CheckpointFormatError, what zipfile refuses when it opens a member (a bad CRC, a local header
that names another file, truncation), and what is not a zip at all.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch

from ckptmigrate.errors import CheckpointFormatError
from ckptmigrate.formats.torch.zip_directory import read_directory, read_stored

FIELDS = ("filename", "flag_bits", "compress_type", "CRC", "compress_size", "file_size")


def torch_zip(tmp_path: Path) -> bytes:
    path = tmp_path / "m.pth"
    torch.save({"w": torch.arange(300.0), "b": torch.ones(2, 3), "step": 7}, path)
    return path.read_bytes()


def zip_of(members: dict[str, bytes], **options: object) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        if "comment" in options:
            zf.comment = options["comment"]  # type: ignore[assignment]
        for name, data in members.items():
            with zf.open(name, "w", force_zip64=bool(options.get("zip64"))) as member:
                member.write(data)
    return out.getvalue()


def archives(tmp_path: Path) -> dict[str, bytes]:
    members = {"a/data.pkl": b"\x80\x02}q\x00.", "a/data/0": bytes(range(256)) * 4, "a/v": b"3"}
    return {
        "torch.save": torch_zip(tmp_path),
        "comment": zip_of(members, comment=b"a comment, " * 30),
        "prepended": b"#!junk before the archive\n" * 10 + zip_of(members),
        "zip64": zip_of(members, zip64=True),
        "utf-8 name": zip_of({"a/data.pkl": b".", "a/d\u00e9j\u00e0": b"x"}),
    }


@pytest.mark.parametrize("kind", ["torch.save", "comment", "prepended", "zip64", "utf-8 name"])
def test_the_directory_and_the_members_read_as_zipfile_reads_them(
    kind: str, tmp_path: Path
) -> None:
    data = archives(tmp_path)[kind]
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        expected = [
            ({f: getattr(i, f) for f in FIELDS}, i.header_offset, zf.read(i)) for i in zf.infolist()
        ]
    f = io.BytesIO(data)
    found = read_directory(f)
    assert len(found) == len(expected)
    for member, (fields, offset, content) in zip(found, expected):
        assert {f: getattr(member, f) for f in FIELDS} == fields
        assert member.header_offset == offset
        assert read_stored(f, member) == content


def _patched(data: bytes, old: bytes, new: bytes, occurrence: int = 0) -> bytes:
    at = -1
    for _ in range(occurrence + 1):
        at = data.index(old, at + 1)
    return data[:at] + new + data[at + len(old) :]


def test_what_zipfile_refuses_when_it_opens_a_member_is_a_format_error(tmp_path: Path) -> None:
    payload = b"the pickle bytes"
    good = zip_of({"a/data.pkl": payload})
    flipped = _patched(good, payload, b"THE pickle bytes")  # the CRC no longer holds
    renamed = _patched(good, b"a/data.pkl", b"a/data.pkx", occurrence=0)  # the local header
    for bad, says in (
        (flipped, "Bad CRC-32"),
        (renamed, "File name in directory"),
    ):
        with pytest.raises(zipfile.BadZipFile, match=says):
            with zipfile.ZipFile(io.BytesIO(bad)) as zf:
                zf.read("a/data.pkl")
        f = io.BytesIO(bad)
        with pytest.raises(CheckpointFormatError, match=says):
            read_stored(f, read_directory(f)[0])


@pytest.mark.parametrize("cut", [1, 10, 23, 60])
def test_a_truncated_or_foreign_file_is_a_format_error(cut: int) -> None:
    data = zip_of({"a/data.pkl": b"x" * 100})
    for bad in (data[:-cut], data[: len(data) // 2], b"not a zip file at all" * 10, b""):
        with pytest.raises(CheckpointFormatError):
            f = io.BytesIO(bad)
            for member in read_directory(f):
                read_stored(f, member)
