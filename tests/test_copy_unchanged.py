"""Every plan copies what it left unchanged: a function step, a Merge, run over the mapped
tensors, write only their new tensors; copied records keep their offset modulo a block, so a
file system that clones (XFS reflink) shares them instead of copying (issue 15, items 1, 2, 4)."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from copy_cases import rename_schema, write_source
from safetensors.torch import load_file, save_file
from set_files import make_set, save_big_endian

import ckptmigrate as cm
from ckptmigrate.formats.torch import read_zip_graph, read_zip_records, save_copying

BLOCK = 4096


def source_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = {f"layers.{i}.attn.weight": torch.randn(64, 33) for i in range(4)}
    sd["head.bias"] = torch.randn(7)
    return sd


def merge_schema(dim: int = 0) -> cm.Schema:
    schema = cm.Schema("net", current="2.0.0")
    schema.add_migration(
        "1.0.0",
        "2.0.0",
        [
            cm.ops.Merge(
                ["layers.0.attn.weight", "layers.1.attn.weight"], "layers.01.weight", dim=dim
            )
        ],
    )
    return schema


def read_back(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    assert zipfile.ZipFile(path).testzip() is None  # every CRC valid
    obj = torch.load(path, weights_only=True, mmap=True)
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}  # a flat state_dict


def record_residues(path: Path) -> dict[int, int]:
    """size -> data offset modulo a block, of each storage record of a torch zip."""
    return {
        r.size: r.data_offset % BLOCK for n, r in read_zip_records(path).items() if "/data/" in n
    }


def upgraded(tmp_path: Path, suffix: str, schema: cm.Schema) -> tuple[dict, Path, cm.Rewrite]:
    """The source state written as ``old{suffix}``, upgraded to ``new{suffix}``."""
    sd = source_state()
    src, dst = tmp_path / f"old{suffix}", tmp_path / f"new{suffix}"
    write_source(src, sd)
    return sd, dst, cm.upgrade_file(src, dst, schema, from_version="1.0.0")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_function_step_rename_copies_every_tensor_as_stored(tmp_path, suffix):
    sd, dst, result = upgraded(tmp_path, suffix, rename_schema())
    assert result.bytes_through_python == 0
    assert result.bytes_copied >= sum(t.numel() * 4 for t in sd.values())
    got = read_back(dst)
    assert sorted(got) == sorted(k.replace(".attn.", ".self_attn.") for k in sd)
    for key, value in sd.items():
        torch.testing.assert_close(got[key.replace(".attn.", ".self_attn.")], value, atol=0, rtol=0)
    assert str(cm.load(dst, schema=rename_schema()).version) == "2.0.0"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("dim", [0, 1])
def test_a_merge_writes_only_the_merged_tensor(tmp_path, suffix, dim):
    """Along dim 0 even the merged tensor is its parts' bytes, copied (test_merge_bytes.py);
    along dim 1 it is computed on the mapped tensors and only it is written."""
    sd, dst, result = upgraded(tmp_path, suffix, merge_schema(dim))
    merged = torch.cat([sd["layers.0.attn.weight"], sd["layers.1.attn.weight"]], dim=dim)
    assert result.streamed is (dim == 0)
    assert result.bytes_through_python == (0 if dim == 0 else merged.numel() * 4)
    got = read_back(dst)
    torch.testing.assert_close(got["layers.01.weight"], merged, atol=0, rtol=0)
    for key in ("layers.2.attn.weight", "layers.3.attn.weight", "head.bias"):
        torch.testing.assert_close(got[key], sd[key], atol=0, rtol=0)
    assert "layers.0.attn.weight" not in got


def test_copied_records_keep_their_offset_within_a_block(tmp_path):
    sd = {f"w{i}": torch.randn(3000 + i) for i in range(5)}  # records of odd sizes
    src, dst = tmp_path / "old.pth", tmp_path / "new.pth"
    torch.save(sd, src)
    cm.upgrade_file(src, dst, rename_schema(), from_version="1.0.0")
    assert record_residues(dst) == record_residues(src)
    for name, record in read_zip_records(dst).items():
        assert record.data_offset % 64 == 0, name  # torch's alignment, for mmap loads


def test_safetensors_data_keep_their_offset_within_a_block(tmp_path):
    sd = source_state()
    src, dst = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    save_file(sd, str(src))
    cm.upgrade_file(src, dst, rename_schema(), from_version="1.0.0")

    def start(path: Path) -> int:
        return 8 + int.from_bytes(path.read_bytes()[:8], "little")

    assert start(dst) % BLOCK == start(src) % BLOCK and start(dst) % 8 == 0


def test_safetensors_copies_keep_their_offset_within_a_block_when_keys_reorder(tmp_path):
    """safetensors lays data out by dtype, then name; a rename that moves a key in that order
    still keeps every copied tensor at its source's offset within a block."""
    sd = {"a.w": torch.randn(1001).half(), "b.w": torch.randn(777), "c.w": torch.randn(513)}
    src, dst = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    save_file(sd, str(src))
    schema = cm.Schema("net", current="2.0.0")

    @schema.migration("1.0.0", "2.0.0")
    def rename(ckpt: cm.Checkpoint) -> None:  # "c.w" sorts first now
        ckpt.state_dict = {("0" + k if k == "c.w" else k): v for k, v in ckpt.state_dict.items()}

    result = cm.upgrade_file(src, dst, schema, from_version="1.0.0")
    assert result.bytes_through_python == 0

    def residues(path: Path, rename: dict[str, str]) -> dict[str, int]:
        head = json.loads(
            path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")]
        )
        start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
        return {
            rename.get(k, k): (start + v["data_offsets"][0]) % BLOCK
            for k, v in head.items()
            if k != "__metadata__"
        }

    assert residues(dst, {}) == residues(src, {"c.w": "0c.w"})
    got = load_file(str(dst))
    for key, value in sd.items():
        torch.testing.assert_close(got["0c.w" if key == "c.w" else key], value, atol=0, rtol=0)


def test_a_step_writing_into_a_mapped_input_is_refused_and_nothing_written(tmp_path):
    sd = source_state()
    src, dst = tmp_path / "old.pth", tmp_path / "new.pth"
    torch.save(sd, src)
    before = src.read_bytes()
    schema = cm.Schema("net", current="2.0.0")

    @schema.migration("1.0.0", "2.0.0")
    def scale(ckpt: cm.Checkpoint) -> None:
        ckpt.state_dict["head.bias"].mul_(2)

    with pytest.raises(cm.errors.MigrationError, match="in place"):
        cm.upgrade_file(src, dst, schema, from_version="1.0.0")
    assert not dst.exists() and src.read_bytes() == before


@pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="Linux's pagemap")
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_write_past_the_guard_into_mapped_memory_is_refused_not_lost(tmp_path, suffix):
    """A step that writes through a storage (the guard sees no tensor op) changes the mapped
    memory, not the file: the copier would drop that write, so it refuses to write at all."""
    sd = source_state()
    src, dst = tmp_path / f"old{suffix}", tmp_path / f"new{suffix}"
    write_source(src, sd)
    before = src.read_bytes()
    schema = cm.Schema("net", current="2.0.0")

    @schema.migration("1.0.0", "2.0.0")
    def poke(ckpt: cm.Checkpoint) -> None:
        ckpt.state_dict["head.bias"].untyped_storage()[0] = 7
        ckpt.state_dict = {
            k.replace(".attn.", ".self_attn."): v for k, v in ckpt.state_dict.items()
        }

    with pytest.raises(cm.errors.InPlaceWriteError, match="in place"):
        cm.upgrade_file(src, dst, schema, from_version="1.0.0")
    assert not dst.exists() and src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]  # no temporary left


# ---------------------------------------------------------------- clones on an XFS loop mount


@pytest.fixture
def xfs(tmp_path):
    """A fresh XFS (reflink=1) loop mount; skipped where the machine cannot make one."""
    if os.geteuid() != 0 or shutil.which("mkfs.xfs") is None:
        pytest.skip("needs root and mkfs.xfs for an XFS loop mount")
    image, mount = tmp_path / "xfs.img", tmp_path / "xfs"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(512 << 20)
    made = subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], capture_output=True)
    mounted = made.returncode == 0 and (
        subprocess.run(
            ["mount", "-o", "loop", str(image), str(mount)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        pytest.skip("the machine refused an XFS loop mount")
    try:
        yield mount
    finally:
        gc.collect()  # a failed test's traceback may still hold a mapped file open
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)  # detached when released


def used_bytes(path: Path) -> int:
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def op_rename_schema() -> cm.Schema:  # metadata-only: run on the stubs, streamed
    schema = cm.Schema("net", current="2.0.0")
    schema.add_migration(
        "1.0.0", "2.0.0", [cm.ops.RenameKeys(r"(.*)\.attn\.(.*)", r"\1.self_attn.\2")]
    )
    return schema


@pytest.mark.parametrize("schema_of", [rename_schema, op_rename_schema], ids=["function", "op"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_rename_on_xfs_shares_the_records_instead_of_copying(xfs, suffix, schema_of):
    torch.manual_seed(0)
    sd = {f"layers.{i}.attn.weight": torch.randn(1000, 1003) for i in range(16)}  # 64 MB
    src, dst = xfs / f"old{suffix}", xfs / f"new{suffix}"
    write_source(src, sd)
    size = src.stat().st_size
    before = used_bytes(xfs)
    result = cm.upgrade_file(src, dst, schema_of(), from_version="1.0.0")
    grown = used_bytes(xfs) - before
    assert result.bytes_through_python == 0
    assert grown < size // 100, f"used space grew by {grown} bytes of a {size}-byte file"
    got = read_back(dst)
    for key, value in sd.items():
        torch.testing.assert_close(got[key.replace(".attn.", ".self_attn.")], value, atol=0, rtol=0)


# ---------------------------------------------------------------- a sharded set, read once


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_an_in_place_rename_of_a_set_reads_headers_not_shards(tmp_path, kind):
    """The bytes read (``rchar``, which counts copy_file_range too, not the pages a direct
    copy maps on ext4) are at most the copy's, plus headers and the index: no shard is read
    whole before the copy starts."""
    folder = tmp_path / "set"
    folder.mkdir()
    index = (
        "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    )
    torch.manual_seed(0)
    tensors = {f"blocks.{i}.weight": torch.randn(1000, 1000) for i in range(8)}  # 32 MB
    script = f"""
import json, sys
from pathlib import Path
from safetensors.torch import save_file
import torch
import ckptmigrate as cm
import ckptmigrate.engine.inplace, ckptmigrate.formats.safetensors_copy, ckptmigrate.formats.set_swap
folder = Path({str(folder)!r})
tensors = torch.load({str(tmp_path / 'sd.pt')!r})
wm = {{}}
for n, keys in enumerate([list(tensors)[:4], list(tensors)[4:]], 1):
    part = {{k: tensors[k] for k in keys}}
    if {kind!r} == "safetensors":
        name = f"model-0000{{n}}-of-00002.safetensors"
        save_file(part, str(folder / name))
    else:
        name = f"pytorch_model-0000{{n}}-of-00002.bin"
        torch.save(part, folder / name)
    wm.update({{k: name for k in keys}})
(folder / {index!r}).write_text(json.dumps({{"metadata": {{}}, "weight_map": wm}}))
schema = cm.Schema("net", current="2.0.0")
schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("blocks.", "layers.")])
cm.upgrade_file(folder, folder, schema, from_version="1.0.0")  # warm every lazy import
cm.upgrade_file(folder, folder, cm.Schema("net", current="2.0.0"))  # nothing to do
def rchar():
    return int(dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())["rchar"])
schema2 = cm.Schema("net", current="3.0.0")
schema2.add_migration("2.0.0", "3.0.0", [cm.ops.RenamePrefix("layers.", "blocks.")])
schema2.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("blocks.", "layers.")])
import ckptmigrate.formats.sink as sink
first = []
for module in (sink,):  # every byte-copying writer copies through its sink
    def copying(*args, _copy=module.copy_range, **kwargs):
        first.append(first[0] if first else rchar())  # bytes read when the first copy starts
        return _copy(*args, **kwargs)
    module.copy_range = copying
start = rchar()
result = cm.upgrade_in_place(folder, schema2, lock_timeout=5)
print(rchar() - start - result.bytes_copied, result.bytes_copied, first[0] - start)
"""
    torch.save(tensors, tmp_path / "sd.pt")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    extra, copied, before_copy = map(int, done.stdout.split())
    assert copied >= 32_000_000
    assert extra < copied // 20, f"read {extra} bytes besides the {copied} copied"
    assert before_copy < copied // 100, f"read {before_copy} bytes before the first copy"


@pytest.mark.parametrize("step", ["function", "merge", "merge-dim1"])
def test_a_set_run_on_its_tensors_copies_what_it_left_unchanged(tmp_path, step):
    """A safetensors set under a step that is not metadata-only: every shard written copies the
    tensors the step kept and writes only the new one; every shard loads in safetensors. A
    Merge along dim 0 copies even the merged tensor (its parts' bytes, from two shards)."""
    folder, out = tmp_path / "set", tmp_path / "out"
    tensors = make_set(folder, "safetensors")
    schema = cm.Schema("net", current="2.0.0")
    new_key = "embed_head.weight"
    if step == "function":

        @schema.migration("1.0.0", "2.0.0")
        def rename(ckpt: cm.Checkpoint) -> None:
            ckpt.state_dict = {
                k.replace("blocks.", "layers."): v for k, v in ckpt.state_dict.items()
            }

        expected = {k.replace("blocks.", "layers."): v for k, v in tensors.items()}
        written = 0
    elif step == "merge":
        schema.add_migration(
            "1.0.0",
            "2.0.0",
            [cm.ops.Merge(["embed.weight", "head.weight"], new_key, sizes=[16, 4])],
        )
        expected = {k: v for k, v in tensors.items() if k not in ("embed.weight", "head.weight")}
        expected[new_key] = torch.cat([tensors["embed.weight"], tensors["head.weight"]])
        written = 0
    else:  # along dim 1, a float32 and a float16 part: computed on the tensors
        parts = ["blocks.0.weight", "blocks.1.weight"]
        new_key = "blocks.01.weight"
        schema.add_migration("1.0.0", "2.0.0", [cm.ops.Merge(parts, new_key, dim=1)])
        expected = {k: v for k, v in tensors.items() if k not in parts}
        expected[new_key] = torch.cat([tensors[k] for k in parts], dim=1)
        written = expected[new_key].numel() * 4
    result = cm.upgrade_file(folder, out, schema, from_version="1.0.0")
    kept = sum(v.numel() * v.element_size() for k, v in expected.items()) - written
    assert result.streamed is (step == "merge")
    assert result.bytes_through_python == written
    assert result.bytes_copied == kept
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        got.update(load_file(str(out / shard)))
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=0, rtol=0)
    assert str(cm.load(out, schema=schema).version) == "2.0.0"


@pytest.mark.parametrize("schema_of", [rename_schema, merge_schema], ids=["function", "merge"])
def test_a_big_endian_file_keeps_its_values_through_either_path(tmp_path, schema_of):
    sd = source_state()
    src, dst = tmp_path / "old.pth", tmp_path / "new.pth"
    save_big_endian(sd, src)
    schema = schema_of()
    cm.upgrade_file(src, dst, schema, from_version="1.0.0")
    want = cm.load(src, schema=schema, from_version="1.0.0").state_dict
    got = read_back(dst)
    assert list(got) == list(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_records_stored_in_the_other_byte_order_are_written_from_memory(tmp_path):
    """Offered a big-endian archive's own records, the copying writer writes the tensors
    from memory (torch.load swapped them) into an archive that says this machine's order,
    the order of its new tensors' bytes."""
    sd = source_state()
    src, dst = tmp_path / "big.pth", tmp_path / "new.pth"
    save_big_endian(sd, src)
    graph = read_zip_graph(src)
    loaded = torch.load(src, weights_only=True)
    records = {
        loaded[k].untyped_storage().data_ptr(): graph.records[stub.info.storage_key]
        for k, stub in graph.obj.items()
    }
    loaded["new"] = sd["new"] = torch.arange(5.0)
    writer = save_copying(dst, loaded, graph, lambda s: records.get(s.data_ptr()))
    assert writer.bytes_through_python == sum(t.numel() * 4 for t in sd.values())
    with zipfile.ZipFile(dst) as z:
        assert z.read(z.namelist()[0].split("/")[0] + "/byteorder") == sys.byteorder.encode()
    got = read_back(dst)
    for key, value in sd.items():
        assert torch.equal(got[key], value), key


def test_the_pagemap_check_tells_anonymous_pages_by_their_flag_bits():
    """Each 8-byte ``/proc/self/pagemap`` entry: bit 63 present, 62 swapped, 61 file-backed;
    a page that is swapped, or present and not the file's, is written memory."""
    import struct

    from ckptmigrate.engine import unchanged

    present, swapped, file_backed = 1 << 63, 1 << 62, 1 << 61
    for top in range(256):
        entry = top << 56 | 0x12345  # a frame number in the low bits
        anonymous = bool(entry & swapped or (entry & present and not entry & file_backed))
        data = struct.pack("=QQ", present | file_backed, entry)
        found = 1 in data[unchanged._FLAG_BYTE :: 8].translate(unchanged._ANONYMOUS)
        assert found == anonymous, hex(top)
