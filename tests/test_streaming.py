"""Streaming upgrades: rename-only plans rewrite the metadata and copy tensor bytes as stored."""

from __future__ import annotations

import zipfile

import pytest
import torch
from net_files import net_schema, net_state_dict, torch_io_forbidden

import ckptmigrate as cm
from ckptmigrate.engine.rewrite import upgrade_file
from ckptmigrate.io.files import read_metadata


@pytest.fixture()
def old_file(tmp_path):
    src = tmp_path / "old.pth"
    cm.save(src, net_state_dict(), schema="net", version="1.0.0", hparams={"d": 4})
    return src


def test_rename_only_upgrade_streams_and_torch_reads_the_result(old_file, tmp_path):
    sd = net_state_dict()
    dst = tmp_path / "new.pth"
    with torch_io_forbidden():
        result = upgrade_file(old_file, dst, net_schema())
    assert result.streamed and result.bytes_through_python == 0
    assert result.steps and str(result.target_version) == "2.0.0"
    for mmap in (False, True):
        obj = torch.load(dst, weights_only=True, mmap=mmap)
        new = obj["state_dict"]
        assert list(new) == [
            "layers.0.weight",
            "layers.0.bias",
            "head.weight",
            "head.t",
            "tied.weight",
        ]
        assert torch.equal(new["layers.0.weight"], sd["blocks.0.weight"])
        assert new["head.weight"].dtype == torch.float16
        assert new["head.t"].stride() == sd["head.t"].stride()
        assert torch.equal(new["head.t"], sd["head.t"])
        assert new["tied.weight"].data_ptr() == new["layers.0.weight"].data_ptr()
        assert obj["hparams"] == {"d": 4, "eps": 1e-5}
        assert obj["__ckptmigrate__"]["version"] == "2.0.0"


def test_dropped_storage_is_not_copied_and_data_stays_64_byte_aligned(old_file, tmp_path):
    dst = tmp_path / "new.pth"
    with torch_io_forbidden():
        result = upgrade_file(old_file, dst, net_schema())
    assert result.bytes_copied < old_file.stat().st_size - 4000  # the 1000-float 'unused' is gone
    raw = dst.read_bytes()
    with zipfile.ZipFile(dst) as zf:
        assert zf.testzip() is None  # every CRC matches
        for info in zf.infolist():
            name_len, extra_len = int.from_bytes(
                raw[info.header_offset + 26 : info.header_offset + 28], "little"
            ), int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0


def test_streamed_upgrade_equals_the_loaded_upgrade(old_file, tmp_path):
    dst = tmp_path / "new.pth"
    with torch_io_forbidden():
        upgrade_file(old_file, dst, net_schema())
    streamed = cm.load(dst, schema=net_schema())
    loaded = cm.load(old_file, schema=net_schema())
    assert list(streamed.state_dict) == list(loaded.state_dict)
    for key, value in loaded.state_dict.items():
        assert torch.equal(streamed.state_dict[key], value)
    assert streamed.hparams == loaded.hparams
    assert [h["step"] for h in streamed.history] == [h["step"] for h in loaded.history]


def test_flat_state_dict_stays_flat_and_carries_the_stamp(tmp_path):
    src = tmp_path / "flat.pth"
    torch.save(net_state_dict(), src)
    dst = tmp_path / "flat2.pth"
    with torch_io_forbidden():
        result = upgrade_file(src, dst, net_schema(), from_version="1.0.0")
    assert result.streamed
    sd = torch.load(dst, weights_only=True)
    assert "layers.0.weight" in sd and sd._metadata[""]["__ckptmigrate__"]["version"] == "2.0.0"


def test_function_step_falls_back_to_the_loaded_path(old_file, tmp_path):
    schema = cm.Schema("net", current="2.0.0")

    @schema.migration("1.0.0", "2.0.0")
    def double(ckpt: cm.Checkpoint) -> None:
        ckpt.state_dict = {k: v * 2 for k, v in ckpt.state_dict.items()}

    dst = tmp_path / "new.pth"
    result = upgrade_file(old_file, dst, schema)
    assert not result.streamed
    new = torch.load(dst, weights_only=True)["state_dict"]
    assert torch.equal(new["blocks.0.bias"], net_state_dict()["blocks.0.bias"] * 2)


def test_in_place_upgrade_replaces_the_file_atomically(old_file):
    with torch_io_forbidden():
        result = upgrade_file(old_file, old_file, net_schema())
    assert result.streamed
    assert [p.name for p in old_file.parent.iterdir()] == ["old.pth"]
    assert read_metadata(old_file).version == cm.Schema("x", "2.0.0").current


def test_safetensors_rename_streams_header_and_bytes(tmp_path):
    src = tmp_path / "m.safetensors"
    sd = {k: v.contiguous() for k, v in net_state_dict().items()}
    cm.save(src, sd, schema="net", version="1.0.0")
    dst = tmp_path / "m2.safetensors"
    with torch_io_forbidden():
        result = upgrade_file(src, dst, net_schema())
    assert result.streamed and result.bytes_through_python == 0
    new = cm.load(dst, upgrade=False)
    assert torch.equal(new.state_dict["layers.0.weight"], sd["blocks.0.weight"])
    assert new.state_dict["tied.weight"] is new.state_dict["layers.0.weight"]
    assert "layers.0.unused" not in new.state_dict and str(new.version) == "2.0.0"


# ---------------------------------------------------------------- durable writing at disk speed


def test_the_temporary_is_never_truncated_and_fsynced_before_the_rename(
    old_file, tmp_path, monkeypatch
):
    """O_TRUNC would make ext4 flush the file synchronously at close (auto_da_alloc); the fsync
    before the rename is what keeps a power loss from leaving a torn file under the new name."""
    import builtins
    import os

    calls: list[tuple[str, object]] = []
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace
    real_builtin_open = builtins.open

    def spy_open(path, flags, *args, **kwargs):
        if "ckptmigrate-tmp" in str(path):
            calls.append(("open", flags))
        return real_open(path, flags, *args, **kwargs)

    def spy_builtin_open(file, mode="r", *args, **kwargs):
        if "ckptmigrate-tmp" in str(file) and "w" in mode:
            calls.append(("open", os.O_TRUNC))
        return real_builtin_open(file, mode, *args, **kwargs)

    def spy_fsync(fd):
        calls.append(("fsync", fd))
        return real_fsync(fd)

    def spy_replace(src, dst):
        calls.append(("replace", dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(builtins, "open", spy_builtin_open)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    dst = tmp_path / "new.pth"
    assert upgrade_file(old_file, dst, net_schema()).streamed
    monkeypatch.undo()
    assert not any(kind == "open" and flags & os.O_TRUNC for kind, flags in calls)
    kinds = [kind for kind, _ in calls]
    assert kinds.count("replace") == 1
    assert "fsync" in kinds[: kinds.index("replace")]  # the temporary, before the rename
    assert "fsync" in kinds[kinds.index("replace") :]  # the folder, after it
    assert torch.load(dst, weights_only=True)["state_dict"].keys()


def _recorded_writeback(monkeypatch, result: int = 0) -> list[tuple[int, int, int]]:
    from ckptmigrate.formats import atomic

    seen: list[tuple[int, int, int]] = []

    def fake(fd: int, offset: int, nbytes: int, flags: int) -> int:
        seen.append((offset, nbytes, flags))
        return result

    monkeypatch.setattr(atomic, "_SYNC_FILE_RANGE", [fake])
    return seen


def test_writeback_hands_each_window_to_the_disk_front_to_back(monkeypatch):
    from ckptmigrate.formats.atomic import Writeback

    seen = _recorded_writeback(monkeypatch)
    wb = Writeback(3, window=10)
    for end in [*range(1, 101), 135]:
        wb.wrote(end)
    # start writeback (flag 2 = SYNC_FILE_RANGE_WRITE), wait for nothing, skip nothing
    assert seen == [(o, 10, 2) for o in range(0, 100, 10)] + [(100, 35, 2)]


def test_writeback_gives_up_quietly_where_refused(monkeypatch):
    from ckptmigrate.formats.atomic import Writeback

    seen = _recorded_writeback(monkeypatch, result=-1)
    wb = Writeback(3, window=10)
    for end in range(10, 101, 10):
        wb.wrote(end)
    assert len(seen) == 1  # one refusal, then the closing fsync does all the work


def test_copy_range_with_writeback_copies_every_byte_in_steps(tmp_path, monkeypatch):
    import os

    from ckptmigrate.formats import byte_copy
    from ckptmigrate.formats.atomic import Writeback, atomic_fd

    monkeypatch.setattr(byte_copy, "WRITEBACK_STEP", 1000)
    src = tmp_path / "src.bin"
    payload = os.urandom(10_500)
    src.write_bytes(b"x" * 7 + payload)
    dst = tmp_path / "dst.bin"
    seen = _recorded_writeback(monkeypatch)
    with open(src, "rb") as f, atomic_fd(dst) as fd:
        assert byte_copy.copy_range(f.fileno(), 7, fd, 3, len(payload), Writeback(fd, 2000)) == 0
    assert dst.read_bytes() == b"\0" * 3 + payload
    # one copy_file_range per 1000-byte step; the disk hears of every 2000 bytes written
    assert seen == [(0, 2003, 2)] + [(2003 + 2000 * i, 2000, 2) for i in range(4)]


def test_real_sync_file_range_is_accepted(tmp_path):
    import os
    import sys

    from ckptmigrate.formats.atomic import Writeback, atomic_fd

    dst = tmp_path / "f.bin"
    with atomic_fd(dst) as fd:
        wb = Writeback(fd, window=4096)
        for i in range(8):
            os.pwrite(fd, b"a" * 4096, i * 4096)
            wb.wrote((i + 1) * 4096)
        if sys.platform.startswith("linux"):
            assert wb._fn is not None  # not refused on an ordinary file system
    assert dst.read_bytes() == b"a" * 8 * 4096


def test_atomic_fd_leaves_nothing_behind_on_error(tmp_path):
    import os

    from ckptmigrate.formats.atomic import atomic_fd

    dst = tmp_path / "f.bin"
    dst.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_fd(dst) as fd:
            os.pwrite(fd, b"new, half written", 0)
            raise RuntimeError("disk full")
    assert dst.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
