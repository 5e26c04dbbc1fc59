"""Copied bytes go to the disk straight from the source's pages (``O_DIRECT``) on a file system
whose copy_file_range copies through the page cache (ext4): every byte lands, the head and
tail off a block go through the kernel copy, memory stays at one mapped window, a refusal
falls back to the kernel copy, and a kill mid-copy leaves the old file or the new one
(issue 15 item 1)."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from copy_cases import rename_schema, write_source
from crash_points import killed_runs
from safetensors.torch import load_file

import ckptmigrate as cm
from ckptmigrate.errors import CheckpointFormatError
from ckptmigrate.formats import byte_copy
from ckptmigrate.formats.atomic import TEMP_MARKER, Writeback, atomic_fd

BLOCK = byte_copy.BLOCK


@pytest.fixture
def direct_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path``, its file system treated as one that copies through the page cache (it is
    on ext4); skipped where it refuses ``O_DIRECT`` (tmpfs before Linux 6.6)."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT here")
    probe = tmp_path / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        pytest.skip(f"{tmp_path} refuses O_DIRECT")
    probe.unlink()
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        kind = byte_copy.file_system_type(fd)
    finally:
        os.close(fd)
    if kind is None:
        pytest.skip("statfs cannot tell the file system")
    monkeypatch.setattr(byte_copy, "PAGE_COPYING_FILE_SYSTEMS", frozenset({kind}))
    return tmp_path


def direct_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record (offset, bytes) of each pwrite made while its descriptor had O_DIRECT set (the
    real pwrite runs)."""
    seen: list[tuple[int, int]] = []
    real = os.pwrite

    def pwrite(fd: int, data, offset: int) -> int:
        n = real(fd, data, offset)
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            seen.append((offset, n))
        return n

    monkeypatch.setattr(os, "pwrite", pwrite)
    return seen


def copy_into_new_file(src: Path, at: int, dst: Path, head: bytes, count: int) -> Writeback:
    """``head``, then ``count`` bytes of ``src`` from ``at``, then b"end", written as a new file
    the way the writers do (atomic_fd, a Writeback); returns the Writeback."""
    with open(src, "rb") as f, atomic_fd(dst) as fd:
        wb = Writeback(fd)
        os.pwrite(fd, head, 0)
        assert byte_copy.copy_range(f.fileno(), at, fd, len(head), count, wb) == 0
        os.pwrite(fd, b"end", len(head) + count)  # a plain write after: O_DIRECT is off again
    return wb


@pytest.mark.parametrize("head", [7, BLOCK + 7, 3 * BLOCK + 7])
def test_the_whole_blocks_go_direct_and_every_byte_lands(direct_dir, monkeypatch, head):
    monkeypatch.setattr(byte_copy, "DIRECT_STEP", 1 << 20)
    payload = os.urandom(3 * (1 << 20) + 12_345)
    src, dst = direct_dir / "src.bin", direct_dir / "dst.bin"
    src.write_bytes(b"s" * (BLOCK + 7) + payload)  # the payload sits at 7 within a block
    seen = direct_writes(monkeypatch)
    wb = copy_into_new_file(src, BLOCK + 7, dst, b"h" * head, len(payload))
    assert dst.read_bytes() == b"h" * head + payload + b"end"
    assert wb.direct is True
    # whole blocks only, one window at a time, from the first block boundary to the last
    assert all(o % BLOCK == 0 and n % BLOCK == 0 and n <= 1 << 20 for o, n in seen)
    first, last = head - head % BLOCK + BLOCK, (head + len(payload)) // BLOCK * BLOCK
    assert seen[0][0] == first and sum(n for _, n in seen) == last - first


def test_offsets_off_each_others_residue_take_the_kernel_copy(direct_dir, monkeypatch):
    payload = os.urandom(2 << 20)
    src, dst = direct_dir / "src.bin", direct_dir / "dst.bin"
    src.write_bytes(b"s" * 100 + payload)
    seen = direct_writes(monkeypatch)
    copy_into_new_file(src, 100, dst, b"h" * 7, len(payload))  # 100 and 7: no block lines up
    assert dst.read_bytes() == b"h" * 7 + payload + b"end"
    assert seen == []


def test_a_file_system_that_refuses_direct_writes_gets_the_kernel_copy(direct_dir, monkeypatch):
    """A refusal (EINVAL: an alignment the device does not take) mid-copy: the rest goes
    through the kernel copy, the later copies too, and every byte lands."""
    monkeypatch.setattr(byte_copy, "DIRECT_STEP", 1 << 20)
    payload = os.urandom(4 << 20)
    src, dst = direct_dir / "src.bin", direct_dir / "dst.bin"
    src.write_bytes(payload)
    real, calls = os.pwrite, []

    def pwrite(fd: int, data, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            calls.append(offset)
            if len(calls) == 2:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with open(src, "rb") as f, atomic_fd(dst) as fd:
        wb = Writeback(fd)
        byte_copy.copy_range(f.fileno(), 0, fd, 0, 2 << 20, wb)
        byte_copy.copy_range(f.fileno(), 2 << 20, fd, 2 << 20, 2 << 20, wb)
        assert wb.direct is False
    assert dst.read_bytes() == payload
    assert calls == [0, 1 << 20]  # one direct write, one refused, none after


def test_a_source_shorter_than_the_copy_is_a_format_error_and_nothing_appears(direct_dir):
    src, dst = direct_dir / "src.bin", direct_dir / "dst.bin"
    src.write_bytes(os.urandom(2 << 20))
    with pytest.raises(CheckpointFormatError, match="early"):
        copy_into_new_file(src, 0, dst, b"", 3 << 20)
    assert sorted(p.name for p in direct_dir.iterdir()) == ["src.bin"]


def test_a_direct_copy_holds_one_window_of_the_source_in_memory(direct_dir):
    """Peak RSS (VmHWM, which counts mapped file pages) grows by about one 16 MiB window
    while 96 MiB are copied, not by the bytes copied."""
    src, dst = direct_dir / "src.bin", direct_dir / "dst.bin"
    size = 96 << 20
    with open(src, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    script = f"""
import os
from ckptmigrate.formats import byte_copy
from ckptmigrate.formats.atomic import Writeback, atomic_fd
byte_copy.PAGE_COPYING_FILE_SYSTEMS = frozenset({{byte_copy.file_system_type(os.open({str(direct_dir)!r}, os.O_RDONLY))}})
def hwm():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) << 10
with open({str(src)!r}, "rb") as f, atomic_fd({str(dst)!r}) as fd:
    wb = Writeback(fd)
    before = hwm()
    byte_copy.copy_range(f.fileno(), 0, fd, 0, {size}, wb)
    print(hwm() - before, wb.direct)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    grown, direct = done.stdout.split()
    assert direct == "True"
    assert int(grown) <= 24 << 20, f"peak RSS grew {int(grown)} bytes copying {size}"
    assert dst.read_bytes() == src.read_bytes()


def big_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.attn.weight": torch.randn(700, 513, generator=gen) for i in range(4)}
    sd["head.bias"] = torch.randn(7, generator=gen)  # under DIRECT_LEAST: the kernel copy
    return sd


def read_back(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(path, weights_only=True)
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_function_step_rename_writes_the_copied_tensors_direct(direct_dir, monkeypatch, suffix):
    sd = big_state()
    src, dst = direct_dir / f"old{suffix}", direct_dir / f"new{suffix}"
    write_source(src, sd)
    seen = direct_writes(monkeypatch)
    result = cm.upgrade_file(src, dst, rename_schema(), from_version="1.0.0")
    monkeypatch.undo()
    assert result.bytes_through_python == 0
    big = sum(v.numel() * v.element_size() for v in sd.values() if v.numel() > 1000)
    assert sum(n for _, n in seen) > big - 4 * 2 * BLOCK  # all but each tensor's edge blocks
    got = read_back(dst)
    assert got.keys() == {k.replace(".attn.", ".self_attn.") for k in sd}
    for key, value in sd.items():
        torch.testing.assert_close(got[key.replace(".attn.", ".self_attn.")], value, atol=0, rtol=0)


def test_a_kill_during_a_direct_copy_leaves_the_old_file_or_the_new_one(direct_dir, monkeypatch):
    monkeypatch.setattr(byte_copy, "DIRECT_STEP", 256 << 10)  # several kill points per tensor
    sd = big_state()
    original, target = direct_dir / "original.safetensors", direct_dir / "model.safetensors"
    cm.save(original, sd, schema="net", version="1.0.0")
    old = original.read_bytes()
    expected = {k.replace(".attn.", ".self_attn."): v for k, v in sd.items()}
    schema = rename_schema()

    def reset() -> None:
        for child in direct_dir.iterdir():
            if child != original:
                child.unlink()
        target.write_bytes(old)

    outcomes = set()
    for spec in killed_runs(
        lambda: cm.upgrade_in_place(target, schema, backup=False), monkeypatch, reset, count=10
    ):
        if target.read_bytes() == old:
            outcomes.add("old")
        else:
            ckpt = cm.load(target, upgrade=False)
            assert str(ckpt.version) == "2.0.0", spec
            for key, value in expected.items():
                assert torch.equal(ckpt.state_dict[key], value), (spec, key)
            outcomes.add("new")
        litter = [p.name for p in direct_dir.iterdir() if TEMP_MARKER in p.name]
        assert len(litter) <= 1, spec  # at most the killed writer's temporary
    assert outcomes == {"old", "new"}, outcomes
