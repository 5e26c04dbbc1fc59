"""A corpus of broken checkpoints: every reader, and every command, refuses each one with our
typed error, writes nothing, and leaves the input byte for byte as it was.

Each case is built by code from a real torch.save / safetensors file. The Python API runs
``cm.load`` (upgrading and as stored), the metadata-only reader, ``cm.diff`` (both sides, with
and without values) and the in-place upgrade and stamp; the CLI runs ``info``, ``diff``,
``upgrade -o``, ``upgrade --in-place``, ``stamp -o`` and ``stamp --in-place`` in-process (plus
a few real processes): exit 2, one ``ckptmigrate: error:`` line, and with ``--debug`` the
exception is a CkptMigrateError.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hostile import (
    data_pkl,
    folder_state,
    good_safetensors_header,
    legacy_with_main_pickle,
    no_hang,
    our_layout,
    replace_member,
    safetensors_bytes,
    save_torch,
    stamp,
    write_zip,
    zip_members,
)
from processes import one_error_line, run
from toy import TOY_MIGRATIONS, toy_schema, toy_sd

import ckptmigrate as cm
from ckptmigrate import cli
from ckptmigrate.engine.inplace import stamp_in_place, upgrade_in_place
from ckptmigrate.errors import (
    CheckpointFormatError,
    CkptMigrateError,
    FutureVersionError,
    SchemaMismatchError,
    UnversionedCheckpointError,
)
from ckptmigrate.io.files import read_metadata

Maker = Callable[[Path, Path], Path]  # (case folder, reference folder) -> the bad path
CASES: dict[str, Maker] = {}


def case(name: str) -> Callable[[Maker], Maker]:
    def register(make: Maker) -> Maker:
        assert name not in CASES
        CASES[name] = make
        return make

    return register


def _bytes_case(name: str, content: bytes, filename: str = "bad.pth") -> None:
    def make(folder: Path, ref: Path) -> Path:
        (folder / filename).write_bytes(content)
        return folder / filename

    CASES[name] = make


# ----------------------------------------------------------------------------- any bytes

_bytes_case("empty-file", b"")
_bytes_case("one-byte", b"\x80")
_bytes_case("random-bytes", random.Random(0).randbytes(4096))
_bytes_case("random-after-zip-magic", b"PK\x03\x04" + random.Random(1).randbytes(4096))
_bytes_case("text-file", b"this is not a checkpoint\n" * 20, "notes.pth")
_bytes_case("plain-pickle-not-torch", pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
_bytes_case("empty-zip-archive", b"PK\x05\x06" + bytes(18))
_bytes_case("legacy-magic-only", pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))


# ----------------------------------------------------------------------------- torch zip


def _good_zip(ref: Path) -> Path:
    return ref / "good.pth"


for _label, _cut in [
    ("10-bytes", lambda n: 10),
    ("100-bytes", lambda n: 100),
    ("quarter", lambda n: n // 4),
    ("half", lambda n: n // 2),
    ("three-quarters", lambda n: 3 * n // 4),
    ("last-byte", lambda n: n - 1),
]:

    def _truncated(folder: Path, ref: Path, cut=_cut) -> Path:
        data = _good_zip(ref).read_bytes()
        (folder / "cut.pth").write_bytes(data[: cut(len(data))])
        return folder / "cut.pth"

    CASES[f"zip-truncated-{_label}"] = _truncated


@case("zip-missing-data-pkl")
def _(folder: Path, ref: Path) -> Path:
    return replace_member(_good_zip(ref), folder / "nopkl.pth", "/data.pkl", None)


@case("zip-empty-data-pkl")
def _(folder: Path, ref: Path) -> Path:
    return replace_member(_good_zip(ref), folder / "x.pth", "/data.pkl", b"")


def _compressed_data_pkl(method: int) -> Maker:
    # torch.save never compresses a record: a compressed data.pkl is a decompression bomb in
    # waiting (8 MiB of padding after STOP packs into kilobytes here; 63 KB reached 4.4 GiB)
    def make(folder: Path, ref: Path) -> Path:
        import zipfile

        members = zip_members(_good_zip(ref))
        out = folder / "bomb.pth"
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
            for name, data in members.items():
                if name.endswith("/data.pkl"):
                    zf.writestr(name, data + bytes(8 << 20), compress_type=method)
                else:
                    zf.writestr(name, data)
        return out

    return make


CASES["zip-deflate-data-pkl"] = _compressed_data_pkl(8)
CASES["zip-bzip2-data-pkl"] = _compressed_data_pkl(12)
CASES["zip-lzma-data-pkl"] = _compressed_data_pkl(14)


@case("zip-garbage-data-pkl")
def _(folder: Path, ref: Path) -> Path:
    junk = random.Random(2).randbytes(300)
    return replace_member(_good_zip(ref), folder / "x.pth", "/data.pkl", junk)


@case("zip-data-pkl-crc-mismatch")
def _(folder: Path, ref: Path) -> Path:
    raw = bytearray(_good_zip(ref).read_bytes())
    pkl = data_pkl(_good_zip(ref))
    at = raw.find(pkl) + len(pkl) // 2
    raw[at] ^= 0x01  # the stored CRC no longer matches
    (folder / "crc.pth").write_bytes(bytes(raw))
    return folder / "crc.pth"


@case("zip-storage-shorter-than-tensor")
def _(folder: Path, ref: Path) -> Path:
    return replace_member(_good_zip(ref), folder / "short.pth", "/data/0", b"\x00" * 8)


@case("zip-storage-record-missing")
def _(folder: Path, ref: Path) -> Path:
    return replace_member(_good_zip(ref), folder / "nostorage.pth", "/data/0", None)


@case("zip-two-data-pkl")
def _(folder: Path, ref: Path) -> Path:
    members = zip_members(_good_zip(ref))
    members["other/data.pkl"] = data_pkl(_good_zip(ref))
    return write_zip(folder / "two.pth", members)


@case("zip-data-pkl-declared-4gib")
def _(folder: Path, ref: Path) -> Path:
    raw = bytearray(_good_zip(ref).read_bytes())
    central = raw.rfind(b"PK\x01\x02", 0, raw.find(b"PK\x05\x06"))
    while central >= 0:  # patch the central directory entry of data.pkl: 0xF0000000 bytes
        name_len = struct.unpack_from("<H", raw, central + 28)[0]
        if raw[central + 46 : central + 46 + name_len].endswith(b"/data.pkl"):
            struct.pack_into("<I", raw, central + 24, 0xF0000000)
            break
        central = raw.rfind(b"PK\x01\x02", 0, central)
    (folder / "huge.pth").write_bytes(bytes(raw))
    return folder / "huge.pth"


@case("zip-pickle-declares-1tib-bytes")
def _(folder: Path, ref: Path) -> Path:
    body = b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"abc"  # BINBYTES8
    return replace_member(_good_zip(ref), folder / "x.pth", "/data.pkl", body)


@case("zip-pickle-memo-index-2-pow-31")
def _(folder: Path, ref: Path) -> Path:
    body = b"\x80\x02]r" + struct.pack("<I", 2**31 - 1) + b"."  # LONG_BINPUT: a 32 GiB memo
    return replace_member(_good_zip(ref), folder / "x.pth", "/data.pkl", body)


@case("legacy-pickle-memo-index-2-pow-31")
def _(folder: Path, ref: Path) -> Path:
    body = b"\x80\x02}r" + struct.pack("<I", 2**31 - 1) + b"."
    (folder / "x.pth").write_bytes(legacy_with_main_pickle(_good_legacy(ref), body))
    return folder / "x.pth"


@case("zip-pickle-declares-huge-storage")
def _(folder: Path, ref: Path) -> Path:
    pkl = data_pkl(_good_zip(ref))
    # the first storage's numel (after its location in the persistent id) claims 2**60
    at = pkl.index(b"X\x03\x00\x00\x00cpu") + 8
    at += 2 if pkl[at] == ord("q") else 0  # skip BINPUT
    assert pkl[at] == ord("K")
    patched = pkl[:at] + b"\x8a\x08" + (1 << 60).to_bytes(8, "little") + pkl[at + 2 :]
    return replace_member(_good_zip(ref), folder / "x.pth", "/data.pkl", patched)


@case("zip-deeply-nested-lists")
def _(folder: Path, ref: Path) -> Path:
    body = b"\x80\x02" + b"]" * 20_000 + b"a" * 19_999 + b"."
    return replace_member(_good_zip(ref), folder / "deep.pth", "/data.pkl", body)


def _tuple_key_nested(depth: int) -> bytes:
    # {((...(),),): 1}: EMPTY_DICT MARK EMPTY_TUPLE TUPLE1*depth BININT1 SETITEMS STOP; hashing
    # the key recurses in C with no check (a million deep segfaulted every command)
    return b"\x80\x02}()" + b"\x85" * depth + b"K\x01u."


def _shared_lists(levels: int) -> bytes:
    # hparams x = [x, x] `levels` deep: a small DAG, 2**levels nodes walked as a tree
    x: list = []
    for _ in range(levels):
        x = [x, x]
    return pickle.dumps({"state_dict": {}, "hparams": {"x": x}}, protocol=2)


@case("zip-tuple-key-300k-deep")
def _(folder: Path, ref: Path) -> Path:
    body = _tuple_key_nested(300_000)  # CPython 3.11 overflows an 8 MiB stack at about 140k
    return replace_member(_good_zip(ref), folder / "deep.pth", "/data.pkl", body)


@case("zip-hparams-shared-forty-levels")
def _(folder: Path, ref: Path) -> Path:
    return replace_member(_good_zip(ref), folder / "dag.pth", "/data.pkl", _shared_lists(40))


@case("zip-dict-contains-itself")
def _(folder: Path, ref: Path) -> Path:
    body = b"\x80\x02}q\x00X\x01\x00\x00\x00ah\x00s."  # d = {}; d["a"] = d
    return replace_member(_good_zip(ref), folder / "cycle.pth", "/data.pkl", body)


def test_a_tuple_key_a_million_deep_is_refused_by_a_real_process(tmp_path: Path) -> None:
    # the file: 1 MB, and every command died of SIGSEGV inside the C unpickler
    torch.save({"w": torch.zeros(2)}, tmp_path / "good.pth")
    bad = replace_member(
        tmp_path / "good.pth", tmp_path / "deep.pth", "/data.pkl", _tuple_key_nested(1_000_000)
    )
    done = subprocess.run(
        [sys.executable, "-m", "ckptmigrate", "info", str(bad)], capture_output=True, text=True
    )
    assert done.returncode == 2, done
    # refused before the unpickler runs: by the decode budget (it is that dense) or the nesting
    assert done.stderr.startswith("ckptmigrate: error:") and done.stderr.count("\n") == 1
    assert "nests containers" in done.stderr or "budget" in done.stderr, done.stderr


@pytest.mark.parametrize("body", ["tuple-key", "shared-lists"])
def test_dcp_metadata_that_nests_or_shares_too_much_is_refused_by_every_command(
    tmp_path: Path, body: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "dcp"
    folder.mkdir()
    pkl = _tuple_key_nested(300_000) if body == "tuple-key" else _shared_lists(40)
    (folder / ".metadata").write_bytes(pkl)
    for argv in (["info", str(folder)], ["diff", str(folder), str(folder)]):
        code, _, err = _cli(argv, capsys)
        assert code == 2 and err.startswith("ckptmigrate: error:"), (argv, err)
        assert "nests containers" in err or "expands" in err, err


# ----------------------------------------------------------------------------- legacy files


def _good_legacy(ref: Path) -> Path:
    return ref / "legacy.pth"


for _label, _cut in [("half", lambda n: n // 2), ("minus-10", lambda n: n - 10)]:

    def _legacy_truncated(folder: Path, ref: Path, cut=_cut) -> Path:
        data = _good_legacy(ref).read_bytes()
        (folder / "cut.pth").write_bytes(data[: cut(len(data))])
        return folder / "cut.pth"

    CASES[f"legacy-truncated-{_label}"] = _legacy_truncated


@case("legacy-storage-shorter-than-tensor")
def _(folder: Path, ref: Path) -> Path:
    raw = bytearray(_good_legacy(ref).read_bytes())
    count = struct.pack("<q", 16)  # the first stored storage: 16 float32 elements
    at = raw.find(count, len(raw) - 2 * 16 * 4 - 200)
    raw[at : at + 8] = struct.pack("<q", 3)
    (folder / "short.pth").write_bytes(bytes(raw))
    return folder / "short.pth"


@case("legacy-pickle-declares-1tib-string")
def _(folder: Path, ref: Path) -> Path:
    body = b"\x80\x04\x8d" + struct.pack("<Q", 1 << 40) + b"abc"  # BINUNICODE8
    (folder / "x.pth").write_bytes(legacy_with_main_pickle(_good_legacy(ref), body))
    return folder / "x.pth"


@case("legacy-tuple-key-300k-deep")
def _(folder: Path, ref: Path) -> Path:
    body = _tuple_key_nested(300_000)
    (folder / "x.pth").write_bytes(legacy_with_main_pickle(_good_legacy(ref), body))
    return folder / "x.pth"


@case("legacy-wrong-protocol-record")
def _(folder: Path, ref: Path) -> Path:
    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    (folder / "x.pth").write_bytes(magic + pickle.dumps(999, protocol=2))
    return folder / "x.pth"


# ----------------------------------------------------------------------------- safetensors


def _st_case(name: str, header: object = None, data: bytes | None = None, **kw: object) -> None:
    good_header, good_data = good_safetensors_header()

    def make(folder: Path, ref: Path) -> Path:
        content = safetensors_bytes(
            good_header if header is None else header,
            good_data if data is None else data,
            **kw,  # type: ignore[arg-type]
        )
        (folder / "bad.safetensors").write_bytes(content)
        return folder / "bad.safetensors"

    CASES[f"safetensors-{name}"] = make


def _with_metadata(**entries: str) -> dict:
    header, _ = good_safetensors_header()
    stamp_json = json.dumps(stamp())
    return {**header, "__metadata__": {"ckptmigrate.stamp": stamp_json, **entries}}


# our hparams JSON nested past the bound: json's own RecursionError at ~1000 levels escaped
# untyped, and 900 levels broke the readers after it
for _depth in (900, 100_000):
    _st_case(
        f"hparams-json-nested-{_depth}",
        _with_metadata(**{"ckptmigrate.hparams": "[" * _depth + "]" * _depth}),
    )
_st_case(
    "header-nested-900", {**good_safetensors_header()[0], "x": json.loads("[" * 900 + "]" * 900)}
)


def _entry(offsets: object = (0, 8), shape: object = (2,), dtype: object = "F32") -> dict:
    return {
        "dtype": dtype,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets,
    }


_st_case("offsets-past-the-data", {"a": _entry((0, 800), (200,))}, bytes(8))
_st_case("offsets-overlap", {"a": _entry((0, 8)), "b": _entry((4, 12))}, bytes(12))
_st_case("offsets-negative", {"a": _entry((-8, 0))}, bytes(8))
_st_case("offsets-begin-after-end", {"a": _entry((8, 0))}, bytes(8))
_st_case("offsets-huge", {"a": _entry((0, 2**64 + 8))}, bytes(8))
_st_case("offsets-float", {"a": _entry((0.0, 8.0))}, bytes(8))
_st_case("offsets-gap", {"a": _entry((4, 12))}, bytes(12))
_st_case("offsets-one-number", {"a": _entry([8])}, bytes(8))
_st_case("dtype-unknown", {"a": _entry(dtype="F33")}, bytes(8))
_st_case("dtype-not-a-string", {"a": _entry(dtype=7)}, bytes(8))
_st_case("shape-negative", {"a": _entry(shape=(-2,))}, bytes(8))
_st_case("shape-huge", {"a": _entry(shape=(2**40, 2**40))}, bytes(8))
_st_case("shape-not-a-list", {"a": _entry(shape="2")}, bytes(8))
_st_case("shape-of-booleans", {"a": _entry(shape=[True, True])}, bytes(8))
_st_case("shape-disagrees-with-span", {"a": _entry(shape=(3,))}, bytes(8))
_st_case("entry-not-an-object", {"a": [0, 8]}, bytes(8))
_st_case("entry-missing-offsets", {"a": {"dtype": "F32", "shape": [2]}}, bytes(8))
_st_case("top-level-list", [1, 2, 3], bytes(8))
_st_case("metadata-values-not-strings", {"__metadata__": {"x": 1}, "a": _entry()}, bytes(8))
_st_case("not-json", raw_header=b"{this is not json}", data=bytes(8))
_st_case("not-utf8", raw_header=b'{"\xff\xfe": 1}', data=bytes(8))
_st_case("duplicate-keys", raw_header=b'{"a": 1, "a": 2}', data=bytes(8))
_st_case("nan-constant", raw_header=b'{"a": NaN}', data=bytes(8))
_st_case(
    "deeply-nested",
    raw_header=b"{" + b'"a":' * 0 + b'"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
)
_st_case(
    "stamp-not-json",
    {"__metadata__": {"ckptmigrate.stamp": "{not json"}, "a": _entry()},
    bytes(8),
)
_st_case(
    "stamp-bad-version",
    {"__metadata__": {"ckptmigrate.stamp": json.dumps(stamp("one.two"))}, "a": _entry()},
    bytes(8),
)
_st_case(
    "hparams-not-an-object",
    {
        "__metadata__": {"ckptmigrate.stamp": json.dumps(stamp()), "ckptmigrate.hparams": "[1]"},
        "a": _entry(),
    },
    bytes(8),
)


@case("safetensors-length-beyond-the-file")
def _(folder: Path, ref: Path) -> Path:
    header, data = good_safetensors_header()
    raw = bytearray(safetensors_bytes(header, data))
    struct.pack_into("<Q", raw, 0, len(raw) + 100)
    (folder / "bad.safetensors").write_bytes(bytes(raw))
    return folder / "bad.safetensors"


@case("safetensors-length-2-pow-63")
def _(folder: Path, ref: Path) -> Path:
    header, data = good_safetensors_header()
    raw = bytearray(safetensors_bytes(header, data))
    struct.pack_into("<Q", raw, 0, 2**63 - 1)
    (folder / "bad.safetensors").write_bytes(bytes(raw))
    return folder / "bad.safetensors"


@case("safetensors-truncated-data")
def _(folder: Path, ref: Path) -> Path:
    raw = (ref / "good.safetensors").read_bytes()
    (folder / "bad.safetensors").write_bytes(raw[:-5])
    return folder / "bad.safetensors"


# ----------------------------------------------------------------------------- not a file


@case("directory-instead-of-file")
def _(folder: Path, ref: Path) -> Path:
    (folder / "model.pth").mkdir()
    return folder / "model.pth"


@case("fifo-instead-of-file")
def _(folder: Path, ref: Path) -> Path:
    os.mkfifo(folder / "model.pth")
    return folder / "model.pth"


@case("symlink-loop")
def _(folder: Path, ref: Path) -> Path:
    os.symlink("b.pth", folder / "a.pth")
    os.symlink("a.pth", folder / "b.pth")
    return folder / "a.pth"


@case("dangling-symlink")
def _(folder: Path, ref: Path) -> Path:
    os.symlink("nowhere.pth", folder / "a.pth")
    return folder / "a.pth"


@case("missing-file")
def _(folder: Path, ref: Path) -> Path:
    return folder / "missing.pth"


# ----------------------------------------------------------------------------- bad objects


def _torch_case(name: str, build: Callable[[], object], *, legacy: bool = False) -> None:
    def make(folder: Path, ref: Path) -> Path:
        return save_torch(build(), folder / "bad.pth", legacy=legacy)

    CASES[name] = make


def _flat_with_stamp(raw: object) -> object:
    sd = torch.nn.Linear(2, 2).state_dict()
    sd._metadata[""]["__ckptmigrate__"] = raw
    return sd


_torch_case("top-level-list", lambda: [torch.ones(2)])
_torch_case("top-level-tensor", lambda: torch.ones(2))
_torch_case("top-level-int", lambda: 7)
_torch_case("top-level-none-legacy", lambda: None, legacy=True)
_torch_case("non-string-keys", lambda: {1: torch.ones(2), 2: torch.ones(2)})
_torch_case(
    "non-string-keys-in-state-dict", lambda: our_layout(stamp(), state_dict={0: torch.ones(1)})
)
_torch_case("state-dict-entry-not-a-tensor", lambda: {"w": torch.ones(2), "b": "text"})
_torch_case("state-dict-not-a-dict", lambda: our_layout(stamp(), state_dict=[torch.ones(1)]))
_torch_case("stamp-bad-version-string", lambda: our_layout(stamp("not a version")))
_torch_case("stamp-version-not-a-string", lambda: our_layout(stamp(1.0)))
_torch_case("stamp-schema-of-wrong-type", lambda: our_layout(stamp(schema=42)))
_torch_case("stamp-schema-empty", lambda: our_layout(stamp(schema="")))
_torch_case("stamp-future-format", lambda: our_layout(stamp(format=99)))
_torch_case("stamp-format-not-an-int", lambda: our_layout(stamp(format="1")))
_torch_case("stamp-not-a-dict", lambda: our_layout(["toy", "1.0.0"]))
_torch_case("stamp-history-not-a-list", lambda: our_layout(stamp(history="1.0.0->2.0.0")))
_torch_case("stamp-bad-version-legacy", lambda: our_layout(stamp("1.0.0-")), legacy=True)
_torch_case("flat-stamp-bad-version", lambda: _flat_with_stamp(stamp("v1..0")))
_torch_case("hparams-not-a-dict", lambda: our_layout(stamp(), hparams=[1, 2]))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """good.pth (toy 3.0.0), legacy.pth, good.safetensors and the toy migrations in mig/."""
    root = tmp_path_factory.mktemp("ref")
    cm.save(root / "good.pth", toy_sd("layers"), schema="toy", version="3.0.0")
    save_torch({"w": torch.arange(16.0), "v": torch.arange(32.0)}, root / "legacy.pth", legacy=True)
    cm.save(root / "good.safetensors", toy_sd("layers"), schema="toy", version="3.0.0")
    (root / "mig").mkdir()
    (root / "mig" / "toy_migrations.py").write_text(TOY_MIGRATIONS)
    return root


def _make(name: str, tmp_path: Path, ref: Path) -> tuple[Path, Path]:
    folder = tmp_path / "case"
    folder.mkdir()
    return folder, CASES[name](folder, ref)


# ----------------------------------------------------------------------------- the API


def test_the_corpus_is_large_and_varied() -> None:
    assert len(CASES) >= 40
    assert len(CASES) == len(set(CASES))


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_reader_of_the_api_refuses_it_with_our_error(
    name: str, tmp_path: Path, ref: Path
) -> None:
    folder, bad = _make(name, tmp_path, ref)
    before, ref_before = folder_state(folder), folder_state(ref)
    schema = toy_schema()
    calls: dict[str, Callable[[], object]] = {
        "cm.load": lambda: cm.load(bad, schema=schema),
        "cm.load upgrade=False": lambda: cm.load(bad, upgrade=False),
        "cm.load from_version": lambda: cm.load(bad, schema=schema, from_version="1.0.0"),
        "read_metadata": lambda: read_metadata(bad),
        "cm.diff a": lambda: cm.diff(bad, ref / "good.pth"),
        "cm.diff b": lambda: cm.diff(ref / "good.pth", bad),
        "cm.diff values": lambda: cm.diff(bad, ref / "good.pth", values=True),
        "upgrade_in_place": lambda: upgrade_in_place(bad, schema),
        "stamp_in_place": lambda: stamp_in_place(bad, "toy", "1.0.0"),
    }
    with no_hang():
        for what, call in calls.items():
            with pytest.raises(CkptMigrateError) as info:
                call()
            assert isinstance(info.value, CheckpointFormatError), (what, info.value)
            assert str(info.value), what
    assert folder_state(folder) == before
    assert folder_state(ref) == ref_before


# ----------------------------------------------------------------------------- the CLI


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_command_refuses_it_with_one_error_line_and_exit_2(
    name: str, tmp_path: Path, ref: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, bad = _make(name, tmp_path, ref)
    before, ref_before = folder_state(folder), folder_state(ref)
    good, mig = str(ref / "good.pth"), ["--migrations", str(ref / "mig")]
    out = str(folder / "out.pth")
    commands = [
        ["info", str(bad)],
        ["info", str(bad), "--json"],
        ["diff", str(bad), good],
        ["diff", good, str(bad), "--json"],
        ["diff", str(bad), good, "--values"],
        ["upgrade", str(bad), "-o", out, *mig],
        ["upgrade", str(bad), "--in-place", *mig],
        ["upgrade", str(bad), "--in-place", "--no-backup", "--from-version", "1.0.0", *mig],
        ["stamp", str(bad), "--schema", "toy", "--version", "1.0.0", "-o", out],
        ["stamp", str(bad), "--schema", "toy", "--version", "1.0.0", "--in-place"],
    ]
    with no_hang():
        for args in commands:
            code, stdout, stderr = _cli(args, capsys)
            lines = stderr.strip().splitlines()
            assert code == 2, (args, stdout, stderr)
            assert len(lines) == 1 and lines[0].startswith("ckptmigrate: error: "), (args, stderr)
            assert "Traceback" not in stderr
            if args[0] == "info" or "--in-place" in args:
                with pytest.raises(CkptMigrateError):  # --debug shows what the line came from
                    cli.main([*args, "--debug"])
                capsys.readouterr()
    assert folder_state(folder) == before
    assert folder_state(ref) == ref_before


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("fifo-instead-of-file", ["upgrade", "{bad}", "--in-place", "--migrations", "{mig}"]),
        ("empty-file", ["info", "{bad}"]),
        ("safetensors-offsets-overlap", ["diff", "{bad}", "{good}"]),
        (
            "zip-truncated-half",
            ["stamp", "{bad}", "--schema", "toy", "--version", "1", "--in-place"],
        ),
    ],
)
def test_a_real_process_exits_2_with_one_line_and_never_hangs(
    name: str, command: list[str], tmp_path: Path, ref: Path
) -> None:
    folder, bad = _make(name, tmp_path, ref)
    before = folder_state(folder)
    fields = {"bad": str(bad), "good": str(ref / "good.pth"), "mig": str(ref / "mig")}
    proc = run(folder, *[part.format(**fields) for part in command], timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("ckptmigrate: error: "), proc.stderr
    assert folder_state(folder) == before


# ----------------------------------------------------------------------------- huge claims

HUGE = [
    "zip-data-pkl-declared-4gib",
    "zip-pickle-declares-1tib-bytes",
    "zip-pickle-declares-huge-storage",
    "zip-pickle-memo-index-2-pow-31",
    "legacy-pickle-memo-index-2-pow-31",
    "legacy-pickle-declares-1tib-string",
    "safetensors-length-2-pow-63",
    "safetensors-offsets-huge",
    "safetensors-shape-huge",
]

_PROBE = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from ckptmigrate.errors import CheckpointFormatError
from ckptmigrate.io.files import read_metadata
start = time.perf_counter()
for path in sys.argv[1:]:
    try:
        read_metadata(path)
    except CheckpointFormatError:
        pass
    else:
        raise SystemExit(f"{path} was accepted")
# VmHWM is this image's own peak; ru_maxrss would include the forking parent's (pytest + torch)
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(time.perf_counter() - start, rss)
"""


def test_huge_declared_lengths_allocate_nothing_large(tmp_path: Path, ref: Path) -> None:
    paths = []
    for i, name in enumerate(HUGE):
        folder = tmp_path / str(i)
        folder.mkdir()
        paths.append(str(CASES[name](folder, ref)))
    # torch-free reader, under a 1 GiB address-space limit: a giant allocation would fail
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *paths], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    seconds, max_rss_kib = map(float, proc.stdout.split())
    assert seconds < 5 and max_rss_kib < 300 * 1024
    # and the full loader (torch) refuses them fast as well
    start = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for path in paths:
        with pytest.raises(CheckpointFormatError):
            cm.load(path, upgrade=False)
    assert time.perf_counter() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 300 * 1024


# ----------------------------------------------------------------------------- semantics

SEMANTIC = {
    "stamp-newer-than-the-code": (lambda: our_layout(stamp("9.0.0")), FutureVersionError),
    "stamp-of-another-schema": (lambda: our_layout(stamp(schema="other")), SchemaMismatchError),
    "unstamped-state-dict": (lambda: toy_sd(), UnversionedCheckpointError),
}


@pytest.mark.parametrize("name", sorted(SEMANTIC))
def test_readable_files_that_cannot_be_upgraded_raise_before_writing(
    name: str, tmp_path: Path, ref: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build, error = SEMANTIC[name]
    bad = save_torch(build(), tmp_path / "m.pth")
    before = folder_state(tmp_path)
    ckpt = cm.load(bad, upgrade=False)  # readable as stored
    with pytest.raises(error):
        cm.upgrade(ckpt, toy_schema())
    with pytest.raises(error):
        cm.load(bad, schema=toy_schema())
    with pytest.raises(error):
        upgrade_in_place(bad, toy_schema())
    mig = ["--migrations", str(ref / "mig")]
    for args in (["-o", str(tmp_path / "o.pth")], ["--in-place"]):
        code, _, stderr = _cli(["upgrade", str(bad), *args, *mig], capsys)
        assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert folder_state(tmp_path) == before


def _shared_config_file(path: Path, changed: bool = False) -> Path:
    # one config dict of 50 entries that 20k layers share, as Python code reusing it writes
    config = {f"opt{i}": float(i) for i in range(50)}
    layers = [config] * 20_000
    if changed:
        layers[-1] = {**config, "opt3": 99.0}
    return save_torch({"state_dict": {"w": torch.zeros(2)}, "hparams": {"layers": layers}}, path)


def test_a_config_dict_shared_by_20k_layers_is_read_diffed_and_stamped(
    tmp_path: Path, ref: Path
) -> None:
    # 20k x 50 as a tree, 20k objects as a graph: info, diff and stamp walk the shared dict once
    shared = _shared_config_file(tmp_path / "shared.pth")
    changed = _shared_config_file(tmp_path / "changed.pth", changed=True)
    assert cm.load(shared, upgrade=False).hparams["layers"][-1]["opt3"] == 3.0
    started = time.perf_counter()
    info = run(tmp_path, "info", "--json", str(shared), timeout=120)
    assert info.returncode == 0, info.stderr
    assert len(json.loads(info.stdout)["hparams"]["layers"]) == 20_000
    assert run(tmp_path, "diff", str(shared), str(shared), timeout=120).returncode == 0
    diff = run(tmp_path, "diff", "--json", str(shared), str(changed), timeout=120)
    assert diff.returncode == 1, diff.stderr
    assert "layers[19999].opt3" in diff.stdout
    args = ("stamp", "--schema", "toy", "--version", "1.0.0", "--migrations", str(ref / "mig"))
    args += ("-o", str(tmp_path / "s.pth"))
    stamp = run(tmp_path, *args, str(shared), timeout=120)
    assert stamp.returncode == 0, stamp.stderr
    assert time.perf_counter() - started < 90  # the diff alone took 100 s walked as a tree


def test_comparing_a_shared_tree_changed_at_its_leaves_is_refused(
    tmp_path: Path, ref: Path
) -> None:
    # x = [x, x] 19 levels loads (1M nodes as a tree); changed at the leaves, every path of
    # its tree is a change: the diff is refused before deepdiff walks a million of them
    good = _good_zip(ref)
    a = replace_member(good, tmp_path / "a.pth", "/data.pkl", _shared_lists(19))
    x: list = [1]
    for _ in range(19):
        x = [x, x]
    body = pickle.dumps({"state_dict": {}, "hparams": {"x": x}}, protocol=2)
    b = replace_member(good, tmp_path / "b.pth", "/data.pkl", body)
    assert "comparing it visits" in one_error_line(run(tmp_path, "diff", str(a), str(b)))
