"""The torch-free metadata layer: format sniffing, the restricted unpickler, safetensors headers.

Every golden value comes from torch itself: files are written with torch.save / save_file and the
stubs are compared with what torch.load(weights_only=True) returns.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import struct
import subprocess
import sys
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hostile import data_pkl, replace_member, save_torch
from safetensors import safe_open
from safetensors.torch import save_file

from ckptmigrate.errors import CheckpointFormatError, UnsafeCheckpointError
from ckptmigrate.formats.detect import detect_format
from ckptmigrate.formats.safetensors_header import read_safetensors_header
from ckptmigrate.formats.torch import (
    WEIGHTS_ONLY_GLOBALS,
    OpaqueObject,
    read_torch_metadata,
    read_zip_records,
    scan_pickle_globals,
)
from ckptmigrate.values.tensorinfo import (
    DTYPE_SIZES,
    SAFETENSORS_DTYPES,
    TensorInfo,
    TensorStub,
)

LEGACY = {"_use_new_zipfile_serialization": False}


# --------------------------------------------------------------------------- helpers


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _assert_matches(stub: object, real: object, where: str = "root") -> None:
    """Walk both graphs: containers alike, every tensor a stub with the real shape and dtype."""
    if isinstance(real, torch.Tensor):
        assert isinstance(stub, TensorStub), where
        assert stub.shape == tuple(real.shape), where
        assert stub.dtype == _dtype_name(real.dtype), where
        assert stub.is_parameter == isinstance(real, torch.nn.Parameter), where
        assert stub.requires_grad == real.requires_grad, where
        assert stub.info.nbytes == real.numel() * real.element_size(), where
        assert stub.info.storage_offset == real.storage_offset(), where
        assert stub.info.device == str(real.device), where
    elif isinstance(real, dict):
        assert type(stub) is type(real), where
        assert list(stub) == list(real), where
        for key in real:
            _assert_matches(stub[key], real[key], f"{where}[{key!r}]")
        assert getattr(stub, "_metadata", None) == getattr(real, "_metadata", None), where
    elif isinstance(real, (list, tuple)):
        assert type(stub) is type(real) and len(stub) == len(real), where
        for i, (s, r) in enumerate(zip(stub, real)):
            _assert_matches(s, r, f"{where}[{i}]")
    else:
        assert type(stub) is type(real) and stub == real, where


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 11, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.bn = torch.nn.BatchNorm1d(4)  # int64 num_batches_tracked buffer


def _rich_checkpoint(*, new_dtypes: bool) -> dict:
    torch.manual_seed(0)
    base = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    obj = {
        "state_dict": _Net().state_dict(),
        "param": torch.nn.Parameter(torch.ones(3, 2, dtype=torch.bfloat16)),
        "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False),
        "ids": torch.arange(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "half": torch.zeros(2, 2, dtype=torch.float16),
        "row_view": base[2],
        "col_view": base[:, 1],
        "step_view": base.flatten()[3::4],
        "transposed": base.t(),
        "expanded": torch.ones(3, 1).expand(3, 4),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
        "tied_a": base,
        "tied_b": base,
        "nested": {"list": [1, "two", None, 3.5, (4, 5), [torch.ones(1, dtype=torch.int8)]]},
        "epoch": 3,
        "name": "run-1",
        "nothing": None,
        "raw": b"\x00\xffbytes",
        "flags": {1, 2},
        "z": 1 + 2j,
        "size": torch.Size([2, 3]),
    }
    if new_dtypes:  # torch's own legacy loader cannot read these back, so zip only
        obj["fp8"] = torch.ones(4, dtype=torch.float8_e4m3fn)
        obj["u16"] = torch.ones(3, dtype=torch.uint16)
        obj["on_meta"] = torch.empty(2, 3, device="meta")
    return obj


@pytest.fixture
def small_zip(tmp_path: Path) -> Path:
    return save_torch({"w": torch.ones(2, 3), "b": torch.zeros(3)}, tmp_path / "small.pth")


# --------------------------------------------------------------------------- faithful decoding


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_every_stub_matches_the_weights_only_load(tmp_path: Path, legacy: bool) -> None:
    path = save_torch(_rich_checkpoint(new_dtypes=not legacy), tmp_path / "rich.pth", legacy=legacy)
    real = torch.load(path, weights_only=True)
    stub = read_torch_metadata(path)
    real["size"] = tuple(real["size"])  # torch.Size decodes to a plain tuple
    _assert_matches(stub, real)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_state_dict_metadata_survives_as_an_ordered_dict_attribute(
    tmp_path: Path, legacy: bool
) -> None:
    path = save_torch(_Net().state_dict(), tmp_path / "sd.pth", legacy=legacy)
    stub = read_torch_metadata(path)
    assert isinstance(stub, OrderedDict)
    assert stub._metadata == torch.load(path, weights_only=True)._metadata
    assert stub._metadata[""]["version"] == 1


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_tied_tensors_share_one_storage_and_views_keep_their_offset(
    tmp_path: Path, legacy: bool
) -> None:
    base = torch.arange(12, dtype=torch.float32)
    path = save_torch(
        {"a": base, "b": base, "view": base[5:9]}, tmp_path / "tied.pth", legacy=legacy
    )
    stub = read_torch_metadata(path)
    assert stub["a"] is stub["b"]
    assert stub["view"].info.storage_key == stub["a"].info.storage_key
    assert stub["view"].info.storage_offset == 5
    assert stub["view"].shape == (4,)


def test_zip_stubs_name_records_that_exist_and_hold_their_bytes(tmp_path: Path) -> None:
    path = save_torch(_rich_checkpoint(new_dtypes=True), tmp_path / "rich.pth")
    records = read_zip_records(path)
    with zipfile.ZipFile(path) as zf:
        assert list(records) == zf.namelist()
        for name, record in records.items():
            with open(path, "rb") as f:
                f.seek(record.data_offset)
                assert f.read(record.size) == zf.read(name)
    stub = read_torch_metadata(path)
    for key in ("ids", "row_view", "fp8", "param"):
        info = stub[key].info
        assert info.storage_key in records
        assert records[info.storage_key].size >= (info.storage_offset + info.numel) * info.itemsize


def test_legacy_stubs_carry_the_storage_keys_of_the_file(tmp_path: Path) -> None:
    path = save_torch(
        {"x": torch.ones(3), "y": torch.zeros(2, dtype=torch.int64)}, tmp_path / "l", legacy=True
    )
    stub = read_torch_metadata(path)
    assert stub["x"].info.storage_key != stub["y"].info.storage_key
    assert all(stub[k].info.storage_key.isdigit() for k in ("x", "y"))


def test_stub_repr_shape_dtype_and_deepcopy() -> None:
    stub = TensorStub(TensorInfo((2, 3), "bfloat16", 12), requires_grad=True, is_parameter=True)
    assert (stub.shape, stub.dtype) == ((2, 3), "bfloat16")
    assert repr(stub) == "TensorStub(Parameter, shape=(2, 3), dtype=bfloat16)"
    clone = copy.deepcopy(stub)
    assert (clone.info, clone.requires_grad, clone.is_parameter) == (stub.info, True, True)
    with pytest.raises(AttributeError):
        stub.info = stub.info  # type: ignore[misc]


def test_allow_list_is_exactly_torchs_weights_only_allow_list() -> None:
    from torch._weights_only_unpickler import _get_allowed_globals

    assert WEIGHTS_ONLY_GLOBALS == set(_get_allowed_globals())


def test_dtype_sizes_match_torch_itemsizes() -> None:
    torch_dtypes = {
        _dtype_name(v): v.itemsize for v in vars(torch).values() if isinstance(v, torch.dtype)
    }
    assert DTYPE_SIZES == torch_dtypes


def test_safetensors_dtype_codes_match_the_safetensors_library() -> None:
    from safetensors.torch import _TYPES

    assert {code: SAFETENSORS_DTYPES[code] for code in _TYPES} == {
        code: _dtype_name(dtype) for code, dtype in _TYPES.items()
    }
    assert all(name in DTYPE_SIZES for name in SAFETENSORS_DTYPES.values())


class _Config:
    def __init__(self) -> None:
        self.lr = 0.1
        self.name = "adam"


_Config.__module__ = "myproject.config"
_Config.__qualname__ = "Config"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_caller_allowed_global_decodes_to_an_opaque_placeholder(
    tmp_path: Path, legacy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_module = type(sys)("myproject.config")
    config_module.Config = _Config  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "myproject", type(sys)("myproject"))
    monkeypatch.setitem(sys.modules, "myproject.config", config_module)
    path = save_torch({"cfg": _Config(), "w": torch.ones(2)}, tmp_path / "cfg.pth", legacy=legacy)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_torch_metadata(path)
    assert info.value.global_name == "myproject.config.Config"
    assert info.value.path == str(path)
    obj = read_torch_metadata(path, allowed_globals=["myproject.config.Config"])
    assert isinstance(obj["cfg"], OpaqueObject)
    assert obj["cfg"].name == "myproject.config.Config"
    assert obj["cfg"].state == {"lr": 0.1, "name": "adam"}
    assert obj["w"].shape == (2,)
    assert "myproject.config.Config" in scan_pickle_globals(path)


# --------------------------------------------------------------------------- malicious pickles


class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


def _canary_command(tmp_path: Path) -> tuple[Path, str]:
    canary = tmp_path / "CANARY"
    return canary, f"touch {canary}"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reduce_to_os_system_is_refused_and_never_runs(tmp_path: Path, legacy: bool) -> None:
    canary, command = _canary_command(tmp_path)
    path = save_torch(
        {"w": torch.ones(2), "evil": _Evil(command)}, tmp_path / "evil.pth", legacy=legacy
    )
    with pytest.raises(UnsafeCheckpointError) as info:
        read_torch_metadata(path)
    assert info.value.global_name in ("posix.system", "os.system", "nt.system")
    with pytest.raises(UnsafeCheckpointError):  # allowing it by name does not help
        read_torch_metadata(path, allowed_globals=[info.value.global_name])
    assert not canary.exists()


def _proto2(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def _unicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _reduce_call(module: str, name: str, arg: str) -> bytes:
    return f"c{module}\n{name}\n".encode() + _unicode(arg) + b"\x85R"


@pytest.mark.parametrize(
    ("payload", "global_name"),
    [
        pytest.param(
            lambda cmd: _proto2(
                _reduce_call("builtins", "eval", f"__import__('os').system({cmd!r})")
            ),
            "builtins.eval",
            id="builtins-eval-reduce",
        ),
        pytest.param(
            lambda cmd: _proto2(_reduce_call("torch._utils", "_import_dotted_name", "os.system")),
            "torch._utils._import_dotted_name",
            id="non-rebuild-torch-utils",
        ),
        pytest.param(
            lambda cmd: f"(S'{cmd}'\nios\nsystem\n.".encode(),
            "os.system",
            id="inst-opcode",
        ),
        pytest.param(
            lambda cmd: b"(icollections\nOrderedDict\n.",
            "collections.OrderedDict",
            id="inst-opcode-even-for-an-allowed-class",
        ),
        pytest.param(
            lambda cmd: pickle.dumps(_Evil(cmd), protocol=4),
            "posix.system",
            id="stack-global-protocol-4",
        ),
        pytest.param(
            lambda cmd: _proto2(
                _reduce_call("builtins", "eval", "1") + b"\x85" + b"X\xff\xff\xff\x7f"
            ),
            "builtins.eval",
            id="unsafe-then-truncated",
        ),
    ],
)
def test_hand_built_malicious_data_pkl_is_refused(
    tmp_path: Path, small_zip: Path, payload, global_name: str
) -> None:
    canary, command = _canary_command(tmp_path)
    patched = tmp_path / "patched.pth"
    replace_member(small_zip, patched, "/data.pkl", payload(command))
    with pytest.raises(UnsafeCheckpointError) as info:
        read_torch_metadata(patched)
    if sys.platform != "win32" or "posix" not in global_name:
        assert info.value.global_name == global_name
    assert not canary.exists()


def test_unsafe_global_wins_over_missing_storage_records(tmp_path: Path) -> None:
    good = save_torch({"w": torch.ones(2)}, tmp_path / "good.pth")
    body = data_pkl(good)[2:-1]  # the dict, without PROTO and STOP
    evil = _proto2(body + b"0" + _reduce_call("builtins", "exec", "pass") + b"0")
    patched = tmp_path / "patched.pth"
    replace_member(good, tmp_path / "nodata.pth", "/data/0", None)
    replace_member(tmp_path / "nodata.pth", patched, "/data.pkl", evil)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_torch_metadata(patched)
    assert info.value.global_name == "builtins.exec"


def test_unsafe_global_wins_over_an_earlier_malformed_rebuild(
    tmp_path: Path, small_zip: Path
) -> None:
    bad_rebuild = b"ctorch._utils\n_rebuild_tensor_v2\n(NK\x00))\x89NtR0"
    patched = tmp_path / "patched.pth"
    evil = _proto2(bad_rebuild + _reduce_call("builtins", "exec", "pass"))
    replace_member(small_zip, patched, "/data.pkl", evil)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_torch_metadata(patched)
    assert info.value.global_name == "builtins.exec"
    harmless = _proto2(bad_rebuild + b"N")
    replace_member(small_zip, patched, "/data.pkl", harmless)
    with pytest.raises(CheckpointFormatError, match="not a storage"):
        read_torch_metadata(patched)


def test_persistent_id_that_is_not_a_storage_is_a_format_error(
    tmp_path: Path, small_zip: Path
) -> None:
    patched = tmp_path / "patched.pth"
    replace_member(small_zip, patched, "/data.pkl", _proto2(_unicode("module") + b"\x85Q"))
    with pytest.raises(CheckpointFormatError, match="persistent id"):
        read_torch_metadata(patched)


def test_build_on_a_tensor_stub_is_a_format_error(tmp_path: Path) -> None:
    good = save_torch(torch.ones(2), tmp_path / "t.pth")
    body = data_pkl(good)[2:-1]
    patched = tmp_path / "patched.pth"
    replace_member(good, patched, "/data.pkl", _proto2(body + b"}b"))
    with pytest.raises(CheckpointFormatError):
        read_torch_metadata(patched)


# --------------------------------------------------------------------------- corrupt files


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("fraction", [0.0005, 0.01, 0.1, 0.3, 0.6, 0.9, 0.999])
def test_truncated_file_is_a_format_error(tmp_path: Path, legacy: bool, fraction: float) -> None:
    path = save_torch(_rich_checkpoint(new_dtypes=False), tmp_path / "rich.pth", legacy=legacy)
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: max(1, int(len(data) * fraction))])
    with pytest.raises(CheckpointFormatError) as info:
        read_torch_metadata(cut)
    assert info.value.path == str(cut)


@pytest.mark.parametrize(
    "content",
    [b"", os.urandom(4096), b"PK\x03\x04" + os.urandom(200), b"\x80\x02" + os.urandom(100)],
    ids=["empty", "random", "zip-magic-then-noise", "pickle-magic-then-noise"],
)
def test_bytes_that_are_no_checkpoint_are_a_format_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointFormatError):
        read_torch_metadata(path)


def test_zip_without_data_pkl_is_a_format_error(tmp_path: Path, small_zip: Path) -> None:
    patched = tmp_path / "nopkl.pth"
    replace_member(small_zip, patched, "/data.pkl", None)
    with pytest.raises(CheckpointFormatError, match="data.pkl"):
        read_torch_metadata(patched)


def test_zip_storage_record_shorter_than_its_tensor_is_a_format_error(
    tmp_path: Path, small_zip: Path
) -> None:
    patched = tmp_path / "short.pth"
    replace_member(small_zip, patched, "/data/0", b"\x00" * 8)
    with pytest.raises(CheckpointFormatError, match="storage shorter than its tensor claims"):
        read_torch_metadata(patched)


def test_zip_missing_storage_record_is_a_format_error(tmp_path: Path, small_zip: Path) -> None:
    patched = tmp_path / "missing.pth"
    replace_member(small_zip, patched, "/data/1", None)
    with pytest.raises(CheckpointFormatError, match="missing"):
        read_torch_metadata(patched)


def test_tensor_reaching_past_its_storage_is_a_format_error(tmp_path: Path) -> None:
    good = save_torch(torch.ones(6), tmp_path / "t.pth")
    pkl = data_pkl(good)
    # Same pickle, but the size tuple claims 7 elements of a 6-element storage.
    assert pkl.count(b"K\x00K\x06\x85") == 1  # offset 0, size (6,)
    lying = pkl.replace(b"K\x00K\x06\x85", b"K\x00K\x07\x85")
    patched = tmp_path / "lying.pth"
    replace_member(good, patched, "/data.pkl", lying)
    with pytest.raises(CheckpointFormatError, match="storage shorter than its tensor claims"):
        read_torch_metadata(patched)


def test_legacy_storage_count_smaller_than_declared_is_a_format_error(tmp_path: Path) -> None:
    path = save_torch({"w": torch.ones(5)}, tmp_path / "l.pth", legacy=True)
    data = bytearray(path.read_bytes())
    count_at = len(data) - 5 * 4 - 8  # the only storage: 8-byte count, then 5 floats
    assert struct.unpack("<q", data[count_at : count_at + 8]) == (5,)
    data[count_at : count_at + 8] = struct.pack("<q", 2)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="storage shorter than its tensor claims"):
        read_torch_metadata(path)


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "archive/../../x"])
def test_zip_member_outside_the_archive_is_refused(
    tmp_path: Path, small_zip: Path, name: str
) -> None:
    patched = tmp_path / "slip.pth"
    replace_member(small_zip, patched, "/version", None)
    with zipfile.ZipFile(patched, "a") as zf:
        zf.writestr(zipfile.ZipInfo(name), b"x")
    with pytest.raises(CheckpointFormatError, match="outside the archive"):
        read_torch_metadata(patched)
    with pytest.raises(CheckpointFormatError, match="outside the archive"):
        read_zip_records(patched)


# --------------------------------------------------------------------------- reading little


def _bytes_read_by_this_process() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors"])
def test_metadata_of_a_40mb_tensor_reads_far_fewer_bytes_than_the_file(
    tmp_path: Path, kind: str
) -> None:
    tensors = {"big": torch.ones(10_000_000), "small": torch.arange(3)}
    path = tmp_path / f"big.{kind}"
    if kind == "safetensors":
        save_file(tensors, path)
    else:
        save_torch(tensors, path, legacy=kind == "legacy")
    size = path.stat().st_size
    assert size > 40_000_000
    before = _bytes_read_by_this_process()
    if kind == "safetensors":
        shapes = {k: v.shape for k, v in read_safetensors_header(path)[0].items()}
    else:
        shapes = {k: v.shape for k, v in read_torch_metadata(path).items()}
    read = _bytes_read_by_this_process() - before
    assert shapes == {"big": (10_000_000,), "small": (3,)}
    assert read < 1_000_000, f"read {read} of {size} bytes"


def test_reading_metadata_never_imports_torch(tmp_path: Path) -> None:
    zip_path = save_torch(_rich_checkpoint(new_dtypes=True), tmp_path / "z.pth")
    legacy_path = save_torch(_rich_checkpoint(new_dtypes=False), tmp_path / "l.pth", legacy=True)
    st_path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(2)}, st_path)
    script = (
        "import sys\n"
        "from ckptmigrate.formats import safetensors_header, detect\n"
        "from ckptmigrate.formats.torch import read_torch_metadata\n"
        f"read_torch_metadata({str(zip_path)!r})\n"
        f"read_torch_metadata({str(legacy_path)!r})\n"
        f"safetensors_header.read_safetensors_header({str(st_path)!r})\n"
        f"detect.detect_format({str(st_path)!r})\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------- format sniffing


def test_detect_format_tells_each_file_kind_by_its_bytes(tmp_path: Path) -> None:
    zip_path = save_torch({"a": torch.ones(1)}, tmp_path / "a.safetensors")  # names lie
    legacy_path = save_torch({"a": torch.ones(1)}, tmp_path / "b.zip", legacy=True)
    st_path = tmp_path / "c.pth"
    save_file({"a": torch.ones(1)}, st_path)
    assert detect_format(zip_path) == "torch-zip"
    assert detect_format(legacy_path) == "torch-legacy"
    assert detect_format(st_path) == "safetensors"
    empty_zip = tmp_path / "empty.zip"
    zipfile.ZipFile(empty_zip, "w").close()
    assert detect_format(empty_zip) == "torch-zip"


def test_detect_format_of_protocol_4_legacy_file(tmp_path: Path) -> None:
    path = tmp_path / "p4.pth"
    torch.save({"a": torch.ones(2)}, path, pickle_protocol=4, **LEGACY)
    assert detect_format(path) == "torch-legacy"


def test_detect_format_tells_directories_by_their_index(tmp_path: Path) -> None:
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(b"x")
    (tmp_path / "sharded").mkdir()
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text("{}")
    (tmp_path / "plain").mkdir()
    assert detect_format(tmp_path / "dcp") == "dcp"
    assert detect_format(tmp_path / "sharded") == "sharded"
    with pytest.raises(CheckpointFormatError, match="neither"):
        detect_format(tmp_path / "plain")


def test_pickle_first_byte_does_not_make_safetensors_look_legacy(tmp_path: Path) -> None:
    header = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'.ljust(0x80, b" ")
    path = tmp_path / "x"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x07")
    assert path.read_bytes()[0] == 0x80
    assert detect_format(path) == "safetensors"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"hello world, not a checkpoint"), "unknown format"),
        (lambda p: p.symlink_to(p), "loop"),
    ],
    ids=["missing", "empty", "text", "symlink-loop"],
)
def test_detect_format_refuses_what_is_no_checkpoint(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "thing"
    make(path)
    with pytest.raises(CheckpointFormatError, match=message) as info:
        detect_format(path)
    assert info.value.path == str(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize(
    "reader", [detect_format, read_torch_metadata, read_safetensors_header, read_zip_records]
)
def test_a_fifo_is_refused_without_blocking(tmp_path: Path, reader) -> None:
    fifo = tmp_path / "pipe.pth"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def attempt() -> None:
        try:
            reader(fifo)
        except BaseException as exc:  # noqa: B036 - handed to the main thread
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():  # unblock the reader before failing
        with open(fifo, "wb"):
            pass
        pytest.fail(f"{reader.__name__} blocked on a FIFO")
    assert len(outcome) == 1 and isinstance(outcome[0], CheckpointFormatError)
    assert "not a regular file" in str(outcome[0])


def test_reading_a_safetensors_file_as_torch_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(2)}, path)
    with pytest.raises(CheckpointFormatError, match="not a torch.save file"):
        read_torch_metadata(path)


# --------------------------------------------------------------------------- safetensors


def test_safetensors_header_matches_the_library(tmp_path: Path) -> None:
    tensors = {
        "z.weight": torch.randn(3, 4),
        "a.bias": torch.zeros(5, dtype=torch.bfloat16),
        "ids": torch.arange(6, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "fp8": torch.ones(2, 2, dtype=torch.float8_e5m2),
        "empty": torch.zeros(0, 2),
        "scalar": torch.tensor(1.5, dtype=torch.float64),
    }
    metadata = {"ckptmigrate.stamp": json.dumps({"schema": "tinylm"}), "format": "pt"}
    path = tmp_path / "w.safetensors"
    save_file(tensors, path, metadata=metadata)
    infos, meta = read_safetensors_header(path)
    assert meta == metadata
    assert set(infos) == set(tensors)
    raw = path.read_bytes()
    data_start = 8 + struct.unpack("<Q", raw[:8])[0]
    offsets = [info.data_offsets for info in infos.values()]
    assert offsets == sorted(offsets)  # file order
    with safe_open(path, "pt") as f:
        for name, info in infos.items():
            real = f.get_tensor(name)
            assert info.shape == tuple(real.shape)
            assert info.dtype == _dtype_name(real.dtype)
            assert info.nbytes == real.numel() * real.element_size()
            assert info.storage_key is None
            begin, end = info.data_offsets
            expected = bytes(real.contiguous().flatten().view(torch.uint8).tolist())
            assert raw[data_start + begin : data_start + end] == expected


def test_safetensors_without_metadata_gives_an_empty_dict(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(2)}, path)
    assert read_safetensors_header(path)[1] == {}


def _write_safetensors(
    path: Path, header: object, data: bytes = b"", *, declared: int | None = None
) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if declared is None else declared
    path.write_bytes(struct.pack("<Q", length) + raw + data)


def _entry(dtype: str = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    ("header", "data", "declared", "message"),
    [
        (None, b"", None, "too short"),
        ({"a": _entry()}, b"\x00" * 8, 10_000, "claims"),
        (b"\xff\xfe{}", b"", None, "not UTF-8"),
        (b"{not json", b"", None, "not JSON"),
        (b"[1, 2]", b"", None, "expected an object"),
        (b'{"a": 1, "a": 2}', b"", None, "repeats the key"),
        (b'{"a": NaN}', b"", None, "NaN"),
        ({"a": _entry(dtype="F128")}, b"\x00" * 8, None, "unknown dtype"),
        ({"a": _entry(shape=[-2])}, b"\x00" * 8, None, "shape"),
        ({"a": _entry(shape=["2"])}, b"\x00" * 8, None, "shape"),
        ({"a": _entry(shape=[True, True])}, b"\x00" * 8, None, "shape"),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\x00" * 8, None, "data_offsets"),
        ({"a": _entry(offsets=[0])}, b"\x00" * 8, None, "data_offsets"),
        ({"a": _entry(offsets=[-8, 0])}, b"\x00" * 8, None, "data_offsets"),
        ({"a": _entry(offsets=[8, 0])}, b"\x00" * 8, None, "begin > end"),
        ({"a": _entry(offsets=[0, 16])}, b"\x00" * 8, None, "truncated"),
        ({"a": _entry(offsets=[0, 4])}, b"\x00" * 8, None, "needs 8 bytes"),
        ({"a": _entry(), "b": _entry(offsets=[4, 12])}, b"\x00" * 12, None, "overlap"),
        ({"a": _entry(offsets=[4, 12])}, b"\x00" * 12, None, "gap"),
        ({"a": _entry()}, b"\x00" * 9, None, "cover only"),
        ({"a": []}, b"", None, "expected an object"),
        ({"__metadata__": {"k": 1}}, b"", None, "strings to strings"),
        ({"__metadata__": ["k"]}, b"", None, "strings to strings"),
    ],
    ids=lambda v: None,
)
def test_safetensors_header_lies_are_format_errors(
    tmp_path: Path, header: object, data: bytes, declared: int | None, message: str
) -> None:
    path = tmp_path / "bad.safetensors"
    if header is None:
        path.write_bytes(b"\x05\x00\x00")  # shorter than the 8-byte length itself
    else:
        _write_safetensors(path, header, data, declared=declared)
    with pytest.raises(CheckpointFormatError, match=message) as info:
        read_safetensors_header(path)
    assert info.value.path == str(path)


def test_safetensors_huge_declared_header_is_refused_before_allocating(tmp_path: Path) -> None:
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 150 * 1024 * 1024) + b"{")
        f.truncate(200 * 1024 * 1024)  # sparse: no disk, but the header length fits
    before = _bytes_read_by_this_process() if Path("/proc/self/io").exists() else 0
    with pytest.raises(CheckpointFormatError, match="limit"):
        read_safetensors_header(path)
    if Path("/proc/self/io").exists():
        assert _bytes_read_by_this_process() - before < 1_000_000


def test_empty_safetensors_file_with_only_a_header_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "none.safetensors"
    _write_safetensors(path, {"__metadata__": {"a": "b"}})
    assert read_safetensors_header(path) == ({}, {"a": "b"})


def test_torch_file_given_to_the_safetensors_reader_is_a_format_error(small_zip: Path) -> None:
    with pytest.raises(CheckpointFormatError):
        read_safetensors_header(small_zip)
