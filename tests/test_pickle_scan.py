"""The hand-written opcode walk (formats.torch.walk.scan_pickle) and the mapped load built on it.

The walk is checked against a reference walk over ``pickletools.genops`` on many real pickles
(torch.save output and plain pickles of every protocol), then on hostile and broken ones. The
mapped load (``cm.load(..., mmap=True)`` without torch's unpickler), and the plain load built
the same way (``mmap=False``), must return what ``torch.load(mmap=..., weights_only=True)``
returns, and hand anything unusual to torch.load.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptmigrate as cm
from ckptmigrate.errors import CheckpointFormatError, UnsafeCheckpointError
from ckptmigrate.formats.torch import python3_name, read_torch, scan_pickle
from ckptmigrate.formats.torch.allowlist import _ALLOWED
from ckptmigrate.formats.torch.opcodes import ScanCorrupt
from ckptmigrate.formats.torch.unpickler import BoundedReader, MetadataUnpickler, load_pickle
from ckptmigrate.formats.torch.walk import ScanResult
from ckptmigrate.io.files import read_metadata

# ----------------------------------------------------------------------------- reference walk


def reference_scan(data: bytes) -> list[str]:
    """Globals named by a pickle, found with pickletools (the walk's former implementation)."""
    seen: list[str] = []
    recent: list[Any] = []
    memo: dict[int, Any] = {}
    for opcode, arg, _pos in pickletools.genops(io.BytesIO(data)):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            seen.append(python3_name(module, attr))
        elif name == "STACK_GLOBAL" and len(recent) >= 2:
            if isinstance(recent[-2], str) and isinstance(recent[-1], str):
                seen.append(python3_name(recent[-2], recent[-1]))
        if name in ("FRAME", "PROTO"):
            continue
        if name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = recent[-1] if recent else None
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            recent.append(memo.get(int(arg)))
        elif name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            recent.append(arg)
        else:
            recent.append(None)
        del recent[:-2]
    return seen


def walk(data: bytes, allowed: dict[str, Any] | None = None) -> ScanResult:
    return scan_pickle(data, 0, len(data), allowed)


def torch_pickle(obj: object, tmp_path: Path, name: str = "x.pth") -> bytes:
    path = tmp_path / name
    torch.save(obj, path)
    with zipfile.ZipFile(path) as zf:
        (member,) = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        return zf.read(member)


def sample_objects() -> list[object]:
    gen = torch.Generator().manual_seed(0)
    big = {f"layer.{i}.weight": torch.randn(2, 2, generator=gen) for i in range(300)}
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    weird = "\x93\x94 \u2603 " * 50  # bytes that look like STACK_GLOBAL / MEMOIZE in strings
    return [
        big,  # > 256 memo entries: LONG_BINPUT / LONG_BINGET
        model.state_dict(),
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3},
        {
            "params": list(model.parameters()),
            "t": (torch.zeros(0), torch.ones(2, dtype=torch.bool)),
        },
        {weird: [1, 2.5, None, True, b"bytes" * 100, {"s": {1, 2}}], "big": 2**100, "neg": -7},
        [torch.arange(10)[2:7], torch.randn(3, 4).t(), torch.tensor(3.0, dtype=torch.bfloat16)],
    ]


# ----------------------------------------------------------------------------- agreement


def test_the_opcode_table_is_the_one_pickletools_documents() -> None:
    """The walk's table is written out (reading a file must not import pickletools): it is
    pickletools' own, opcode for opcode, argument kind and stack effect alike."""
    from ckptmigrate.formats.torch.opcodes import PICKLE_OPCODES

    documented = tuple(
        (
            op.name,
            ord(op.code),
            op.arg.name if op.arg is not None else None,
            " ".join(t.name for t in op.stack_after),
        )
        for op in pickletools.opcodes
    )
    assert PICKLE_OPCODES == documented


@pytest.mark.parametrize("index", range(6))
def test_the_walk_names_what_pickletools_names_in_torch_save_output(
    index: int, tmp_path: Path
) -> None:
    data = torch_pickle(sample_objects()[index], tmp_path)
    result = walk(data, _ALLOWED)
    assert result.globals == reference_scan(data)
    assert result.end == len(data)
    assert result.protocol == 2 and not result.outside_torch


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_the_walk_agrees_with_pickletools_for_every_protocol(protocol: int) -> None:
    weird = "\x93 \u2603 " * 20
    obj = {
        "od": OrderedDict(a=1, b=[1.5, -2, 2**70, (weird, b"\x93" * 300)]),
        "counter": __import__("collections").Counter("hello"),
        "set": {1, 2, 3},
        "fs": frozenset({"x"}),
        "bytes": bytearray(b"\x00\x93" * 10),
        "keys": [f"k{i}" for i in range(400)],
        "shared": [weird, weird],
    }
    for data in (pickle.dumps(obj, protocol=protocol), pickle.dumps([obj, obj], protocol)):
        data = pickletools.optimize(data) if protocol >= 2 else data
        assert walk(data).globals == reference_scan(data)
        assert walk(data).end == len(data)


def test_stack_global_names_come_from_strings_and_the_memo() -> None:
    data = pickle.dumps(OrderedDict(x=1), protocol=4)
    assert walk(data).globals == ["collections.OrderedDict"] == reference_scan(data)
    memoised = b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94h\x00h\x01\x93."
    assert walk(memoised).globals == ["os.system"] == reference_scan(memoised)


def test_the_walk_stops_at_stop_and_reports_the_protocol() -> None:
    data = pickle.dumps([1, 2], protocol=2) + b"trailing junk"
    result = walk(data)
    assert result.end == data.index(b".") + 1 and result.protocol == 2


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "body",
    [
        b"(ios\nsystem\n.",  # INST
        b"\x80\x02(ccollections\nOrderedDict\no.",  # OBJ
        b"\x80\x02\x82\x01)R.",  # EXT1
        b"\x80\x02\x83\x01\x00)R.",  # EXT2
        b"\x80\x02\x84\x01\x00\x00\x00)R.",  # EXT4
        b"\x80\x02cos\nsystem\n.",  # GLOBAL
        b"\x80\x04\x8c\x02os\x8c\x06system\x93.",  # STACK_GLOBAL
        b"\x80\x02cos\nsystem\n\xff\xff",  # unsafe, then corrupt: unsafe wins
    ],
)
def test_unsafe_globals_and_opcodes_are_refused(body: bytes) -> None:
    with pytest.raises(UnsafeCheckpointError):
        walk(body, _ALLOWED)
    walk_globals = []
    try:
        walk_globals = walk(body).globals  # without an allow-list: listed, not refused
    except ScanCorrupt:
        pass
    assert walk_globals == [] or "." in walk_globals[0]


@pytest.mark.parametrize(
    "body",
    [
        b"\x80\x02]r\x00\x00\x00\x80.",  # LONG_BINPUT 2**31
        b"\x80\x02]r\xff\xff\xff\xff.",
        b"\x80\x02]p2147483648\n.",  # text PUT
    ],
)
def test_memo_bombs_are_refused_before_the_c_unpickler(
    body: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(cm.CheckpointFormatError, match="memo index"):
        walk(body, _ALLOWED)
    src = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(2)}, src)
    bad = tmp_path / "bomb.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = body if info.filename.endswith("/data.pkl") else zin.read(info)
            zout.writestr(info, data)

    def never(self: Any) -> Any:
        raise AssertionError("the C unpickler saw a memo bomb")

    monkeypatch.setattr(MetadataUnpickler, "load", never)
    for read in (
        lambda: read_metadata(bad),
        lambda: cm.load(bad, upgrade=False),
        lambda: cm.load(bad, upgrade=False, mmap=True),
    ):
        with pytest.raises(CheckpointFormatError) as info:
            read()
        assert not isinstance(info.value, UnsafeCheckpointError)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x80\x02",  # no STOP
        b"\x80\x02X\x10\x00\x00\x00abc",  # string longer than the pickle
        b"\x80\x02J\x01\x00",  # truncated int
        b"\x80\x02\xff.",  # unknown opcode
        b"\x80\x02T\xff\xff\xff\xff.",  # negative BINSTRING length
        b"\x80\x02cos",  # GLOBAL without newline
    ],
)
def test_malformed_pickles_are_corrupt(body: bytes) -> None:
    with pytest.raises(ScanCorrupt) as info:
        walk(body, _ALLOWED)
    assert 0 <= info.value.pos <= len(body)
    with pytest.raises(CheckpointFormatError):
        load_pickle(io.BytesIO(body), _ALLOWED)


def test_the_c_unpickler_never_reads_past_a_malformed_opcode() -> None:
    # valid list, an unknown opcode, then a memo bomb: the decoder gets the pickle cut before
    # the unknown opcode, so the bomb is never read
    body = b"\x80\x02]\xff]r\x00\x00\x00\x80."
    with pytest.raises(CheckpointFormatError, match="unknown"):
        load_pickle(io.BytesIO(body), _ALLOWED)


def test_the_walk_reads_a_bounded_region_of_a_mapped_file(tmp_path: Path) -> None:
    data = pickle.dumps({"a": [1, 2]}, protocol=2)
    path = tmp_path / "p.bin"
    path.write_bytes(b"junk" + data + b"\x00" * 100)
    with open(path, "rb") as raw:
        raw.seek(4)
        reader = BoundedReader(raw, 4 + len(data))
        assert load_pickle(reader, _ALLOWED) == {"a": [1, 2]}
        assert raw.tell() == 4 + len(data)
        reader = BoundedReader(raw, 4 + len(data) - 1)
        raw.seek(4)
        with pytest.raises(CheckpointFormatError):
            load_pickle(reader, _ALLOWED)


# ----------------------------------------------------------------------------- mapped loads


def assert_same(a: Any, b: Any, pairs: dict[int, int]) -> None:
    """Same structure, types and tensors; storages shared between the same tensors."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.stride(), a.storage_offset()) == (
            b.dtype,
            b.shape,
            b.stride(),
            b.storage_offset(),
        )
        assert a.requires_grad == b.requires_grad and torch.equal(a, b)
        assert a._backward_hooks == b._backward_hooks
        pa, pb = a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()
        assert pairs.setdefault(pa, pb) == pb
        assert a.untyped_storage().nbytes() == b.untyped_storage().nbytes()
        assert a.untyped_storage().resizable() == b.untyped_storage().resizable()
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key], pairs)
        if type(a) is OrderedDict:  # what BUILD set, e.g. a state_dict's _metadata
            assert_same(dict(vars(a)), dict(vars(b)), pairs)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y, pairs)
    else:
        assert a == b


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("index", range(6))
def test_a_mapped_load_returns_what_torch_load_returns(
    index: int, mmap: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    obj = sample_objects()[index]
    shared = torch.arange(12.0)
    if isinstance(obj, dict):
        obj = {**obj, "tied_a": shared[:6], "tied_b": shared.view(3, 4)[1:]}
    path = tmp_path / "m.pth"
    torch.save(obj, path)
    expected = torch.load(path, mmap=mmap, weights_only=True)
    calls: list[Any] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    got = read_torch(path, mmap=mmap)
    assert_same(expected, got, {})
    if index != 4:  # sample 4 holds a set and bytes (builtins.set, _codecs.encode): torch's
        assert not calls


def test_a_mapped_load_hands_unusual_files_to_torch_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    cases = {
        "size": {"shape": torch.Size([2, 3]), "w": torch.zeros(2)},
        "dtype": {"dtype": torch.float16, "w": torch.zeros(2)},
        "set": {"s": {1, 2}},
    }
    for name, obj in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path)
        calls.clear()
        got = read_torch(path, mmap=True)
        assert calls, name
        assert_same(torch.load(path, mmap=True, weights_only=True), got, {})
    path = tmp_path / "plain.pth"
    torch.save({"w": torch.ones(3)}, path)
    for mmap in (True, False):
        calls.clear()
        read_torch(path, mmap=mmap, map_location="meta")
        assert calls, mmap
        calls.clear()
        read_torch(path, mmap=mmap, map_location=torch.device("cpu"))
        assert not calls, mmap


def test_a_plain_load_built_from_the_graph_holds_its_data_in_memory(tmp_path: Path) -> None:
    """``mmap=False`` without torch's unpickler still reads every byte: the tensors keep their
    values when the file is overwritten in place afterwards (a mapping would show the change)."""
    path = tmp_path / "m.pth"
    weights = {"w": torch.arange(4096.0), "b": torch.ones(3, dtype=torch.float64)}
    torch.save(weights, path)
    got = read_torch(path, mmap=False)
    with open(path, "r+b") as f:  # the same size, every byte changed
        f.write(bytes(b ^ 0xFF for b in f.read()))
    assert torch.equal(got["w"], weights["w"]) and torch.equal(got["b"], weights["b"])


def test_a_mapped_load_refuses_what_the_reader_refuses(tmp_path: Path) -> None:
    path = tmp_path / "short.pth"
    torch.save({"w": torch.ones(4)}, path)
    with zipfile.ZipFile(path) as zf:
        members = {info.filename: zf.read(info) for info in zf.infolist()}
    (key,) = [k for k in members if "/data/" in k]
    members[key] = members[key][:8]  # the storage record is shorter than its tensor claims
    bad = tmp_path / "bad.pth"
    with zipfile.ZipFile(bad, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(CheckpointFormatError, match="shorter"):
        cm.load(bad, upgrade=False, mmap=True)


def test_a_big_memo_file_maps_like_torch(tmp_path: Path) -> None:
    sd = {f"blocks.{i}.weight": torch.full((2,), float(i)) for i in range(400)}
    path = tmp_path / "many.pth"
    cm.save(path, sd, schema="bench", version="1.0.0")
    schema = cm.Schema("bench", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("blocks.", "layers.")])
    ckpt = cm.load(path, schema=schema, mmap=True)
    assert list(ckpt.state_dict) == [f"layers.{i}.weight" for i in range(400)]
    assert torch.equal(ckpt.state_dict["layers.399.weight"], torch.full((2,), 399.0))


# ---------------------------------------------------------------- frames (review findings)


def _framed(frame: bytes, after: bytes) -> bytes:
    return b"\x80\x04\x95" + struct.pack("<Q", len(frame)) + frame + after


def test_an_opcode_that_runs_past_its_frame_is_corrupt_before_the_c_unpickler_sees_it() -> None:
    # LONG1 says 10 bytes follow but the frame holds 2: the C unpickler drops the frame's tail
    # and reads the rest as new opcodes (here a LONG_BINPUT 2**27: 2 GiB of memo).
    frame = b"\x8a\x0aAB"
    after = b"01234567\x8c\x05r" + struct.pack("<I", 2**27) + b"."
    data = _framed(frame, after)
    with pytest.raises(ScanCorrupt, match="frame ends inside an opcode"):
        scan_pickle(data, 0, len(data), None)
    with pytest.raises(CheckpointFormatError):
        load_pickle(io.BytesIO(data), _ALLOWED)


@pytest.mark.parametrize(
    "data",
    [
        _framed(b"\x95" + struct.pack("<Q", 1) + b"N", b"."),  # a frame inside a frame
        b"\x80\x04\x95" + struct.pack("<Q", 100) + b"N.",  # a frame past the pickle's end
        _framed(b"Vab", b"c\n."),  # the newline lies outside the frame
    ],
)
def test_broken_frames_are_corrupt(data: bytes) -> None:
    with pytest.raises(ScanCorrupt):
        scan_pickle(data, 0, len(data), None)


@pytest.mark.parametrize("protocol", [4, 5])
def test_pickles_with_many_frames_walk_like_pickletools(protocol: int) -> None:
    obj = {f"k{i}": ("x" * 300, i, [float(i)] * 20) for i in range(2000)}  # ~100 frames
    data = pickle.dumps(obj, protocol=protocol)
    assert data.count(b"\x95") > 10
    assert scan_pickle(data, 0, len(data), None).end == len(data)
    assert load_pickle(io.BytesIO(data), _ALLOWED) == obj


# ---------------------------------------------------------------- mapped load edge cases


def test_a_mapped_load_reports_what_torch_refuses_as_the_plain_load_does(tmp_path: Path) -> None:
    src = tmp_path / "int.pth"
    torch.save({"t": torch.arange(4)}, src)
    bad = tmp_path / "int-requires-grad.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data.pkl"):
                assert data.count(b"\x89") == 1  # NEWFALSE: requires_grad
                data = data.replace(b"\x89", b"\x88")  # an int tensor that requires grad
            zout.writestr(info, data)
    for mmap in (False, True):
        with pytest.raises(CheckpointFormatError):
            cm.load(bad, mmap=mmap)


def test_a_file_without_byteorder_follows_the_default_load_endianness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "w.pth"
    torch.save({"w": torch.tensor([1.0, 2.0])}, src)
    old = tmp_path / "no-byteorder.pth"  # as torch < 2.1 wrote it
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if not info.filename.endswith("/byteorder"):
                zout.writestr(info, zin.read(info))
    ts = torch.serialization
    monkeypatch.setattr(ts, "get_default_load_endianness", lambda: ts.LoadEndianness.BIG)
    expected = torch.load(old, weights_only=True)["w"]
    assert not torch.equal(expected, torch.tensor([1.0, 2.0]))  # byte-swapped, as asked
    for mmap in (False, True):
        assert torch.equal(cm.load(old, mmap=mmap).state_dict["w"], expected)


def test_long_short_string_is_not_read_as_a_negative_count() -> None:
    """SHORT_BINUNICODE's one-byte length is unsigned: a 141-character key (0x8d) once read as
    -115 sent the stack model backwards in a loop that grew without bound (found by fuzzing a
    DCP ``.metadata``). A shared value makes the model run; a corrupt tail makes it run on the
    opcodes before the error too."""
    key = "relative_p" + "x" * 131
    shared = [1.0]
    data = pickle.dumps({key: shared, "b": shared, key[:-1]: (shared, shared)}, protocol=4)
    assert any(
        op.name == "SHORT_BINUNICODE" and len(arg) == 141 for op, arg, _ in pickletools.genops(data)
    )
    allowed = dict(_ALLOWED)
    scan_pickle(data, 0, len(data), allowed)  # reads at once
    corrupt = data[:-2] + b"h\x7f."  # a memo GET of a value never put, then STOP
    with pytest.raises(ScanCorrupt):
        scan_pickle(corrupt, 0, len(corrupt), allowed)
