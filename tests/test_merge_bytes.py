"""A Merge (or Split) along dim 0 runs on metadata alone: the merged tensor's bytes are its
parts' bytes, copied from the file as stored; torch is not imported (issue 15 item 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from copy_cases import write_source
from safetensors import safe_open
from safetensors.torch import load_file
from set_files import make_bin_shards, make_set
from test_copy_unchanged import used_bytes, xfs  # noqa: F401 (the XFS loop mount fixture)

import ckptmigrate as cm
from ckptmigrate.formats.crc import crc32_combine, crc32_of_parts

Q, K, V = (f"layers.0.attn.{p}.weight" for p in "qkv")


def source_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = {key: torch.randn(24, 17) for key in (Q, K, V)}
    sd["layers.0.mlp.weight"] = torch.randn(40, 17)
    sd["head.bias"] = torch.randn(7)
    return sd


def schema_of(*ops: cm.ops.Op) -> cm.Schema:
    schema = cm.Schema("net", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", list(ops))
    return schema


PLANS = {
    "merge": lambda: [cm.ops.Merge([Q, K, V], "layers.0.attn.qkv.weight")],
    "split": lambda: [
        cm.ops.Split("layers.0.mlp.weight", ["mlp.a", "mlp.b", "mlp.c"], sizes=[8, 30, 2])
    ],
    # a split's parts merged again in another order: runs of parts of records
    "split-then-merge": lambda: [
        cm.ops.Split("layers.0.mlp.weight", ["mlp.a", "mlp.b"], sizes=[15, 25]),
        cm.ops.Merge(["mlp.b", Q, "mlp.a"], "mixed", sizes=[25, 24, 15]),
        cm.ops.RenameKeys(r"layers\.0\.(.*)", r"l0.\1"),
    ],
}


def read_back(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:  # safetensors' own reader takes the file
            return {k: f.get_tensor(k) for k in f.keys()}
    assert zipfile.ZipFile(path).testzip() is None  # every CRC valid
    obj = torch.load(path, weights_only=True)
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_dim0_plan_copies_bytes_and_equals_the_tensor_path(tmp_path, suffix, plan):
    """The same plan run by bytes (upgrade_file) and on the loaded tensors (load, save): the
    same keys in the same order, the same values bit for bit, every byte copied."""
    sd = source_state()
    src = tmp_path / f"old{suffix}"
    write_source(src, sd)
    schema = schema_of(*PLANS[plan]())
    by_bytes, by_tensors = tmp_path / f"bytes{suffix}", tmp_path / f"tensors{suffix}"
    result = cm.upgrade_file(src, by_bytes, schema, from_version="1.0.0")
    cm.save(by_tensors, cm.load(src, schema=schema, from_version="1.0.0"))

    assert result.streamed and result.bytes_through_python == 0
    assert result.bytes_copied >= sum(t.numel() * 4 for t in sd.values())
    got, want = read_back(by_bytes), read_back(by_tensors)
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert torch.equal(got[key], want[key]), key
    upgraded = cm.load(by_bytes, schema=schema)
    assert str(upgraded.version) == "2.0.0"
    assert upgraded.history[-1]["step"] == cm.load(by_tensors, schema=schema).history[-1]["step"]


def test_a_merged_record_keeps_torch_layout_and_a_split_part_is_a_view(tmp_path):
    sd = source_state()
    src = tmp_path / "old.pth"
    torch.save(sd, src)
    merged, split = tmp_path / "merged.pth", tmp_path / "split.pth"
    cm.upgrade_file(src, merged, schema_of(*PLANS["merge"]()), from_version="1.0.0")
    cm.upgrade_file(src, split, schema_of(*PLANS["split"]()), from_version="1.0.0")
    with zipfile.ZipFile(merged) as z:
        sizes = sorted(i.file_size for i in z.infolist() if "/data/" in i.filename)
    assert 3 * 24 * 17 * 4 in sizes  # one new record, the three parts laid end to end
    for path in (merged, split):
        loaded = torch.load(path, weights_only=True, mmap=True)  # 64-byte aligned records
        assert all(isinstance(v, torch.Tensor) for v in loaded.values())
    parts = torch.load(split, weights_only=True)
    # as torch.split gives them: views of the one stored record, offsets along dim 0
    assert (
        parts["mlp.a"].untyped_storage().data_ptr() == parts["mlp.c"].untyped_storage().data_ptr()
    )
    assert [parts[k].storage_offset() for k in ("mlp.a", "mlp.b", "mlp.c")] == [0, 8 * 17, 38 * 17]


NO_TORCH = """
import sys
import ckptmigrate as cm
schema = cm.Schema("net", current="2.0.0")
schema.add_migration("1.0.0", "2.0.0", {ops})
result = cm.upgrade_file({src!r}, {dst!r}, schema, from_version="1.0.0")
assert "torch" not in sys.modules, sorted(m for m in sys.modules if "torch" in m)[:5]
print(result.streamed, result.bytes_through_python)
"""


def run_without_torch(src: Path, dst: Path, ops: str) -> None:
    code = NO_TORCH.format(ops=ops, src=str(src), dst=str(dst))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "0"]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_the_byte_merge_does_not_import_torch(tmp_path, suffix):
    src, dst = tmp_path / f"old{suffix}", tmp_path / f"new{suffix}"
    write_source(src, source_state())
    ops = f'[cm.ops.Merge({[Q, K, V]!r}, "qkv"), cm.ops.Split("layers.0.mlp.weight", ["a", "b"])]'
    run_without_torch(src, dst, ops)
    got = read_back(dst)
    sd = source_state()
    assert torch.equal(got["qkv"], torch.cat([sd[Q], sd[K], sd[V]]))
    assert torch.equal(got["b"], sd["layers.0.mlp.weight"][20:])


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_the_byte_merge_of_a_set_does_not_import_torch(tmp_path, kind):
    folder, out = tmp_path / "set", tmp_path / "out"
    tensors = make_set(folder, kind)
    run_without_torch(
        folder, out, '[cm.ops.Merge(["embed.weight", "head.weight"], "eh", sizes=[16, 4])]'
    )
    merge = cm.ops.Merge(["embed.weight", "head.weight"], "eh", sizes=[16, 4])
    loaded = cm.load(out, schema=schema_of(merge))
    assert torch.equal(
        loaded.state_dict["eh"], torch.cat([tensors["embed.weight"], tensors["head.weight"]])
    )


def non_contiguous(path: Path) -> None:
    sd = source_state()
    sd[K] = torch.randn(17, 24).t()  # stored transposed: its bytes are not C order
    torch.save(sd, path)


def parameters(path: Path) -> None:
    torch.save({k: torch.nn.Parameter(v) for k, v in source_state().items()}, path)


@pytest.mark.parametrize(
    "case, make, ops",
    [
        (
            "dim 1",
            lambda p: torch.save(source_state(), p),
            lambda: [cm.ops.Merge([Q, K], "qk", dim=1)],
        ),
        (
            "dtypes differ",
            lambda p: torch.save({**source_state(), K: source_state()[K].half()}, p),
            lambda: [cm.ops.Merge([Q, K], "qk")],
        ),
        ("not C-contiguous", non_contiguous, lambda: [cm.ops.Merge([Q, K], "qk")]),
        ("parameters", parameters, lambda: [cm.ops.Merge([Q, K], "qk")]),
        (
            "a function step",
            lambda p: torch.save(source_state(), p),
            lambda: [cm.ops.Merge([Q, K], "qk"), cm.ops.Call(lambda c: None)],
        ),
    ],
)
def test_what_bytes_cannot_say_runs_on_the_tensors(tmp_path, case, make, ops):
    src, dst = tmp_path / "old.pth", tmp_path / "new.pth"
    make(src)
    schema = schema_of(*ops())
    result = cm.upgrade_file(src, dst, schema, from_version="1.0.0")
    assert not result.streamed, case
    expected = cm.load(src, schema=schema, from_version="1.0.0").state_dict
    got = read_back(dst)
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value.detach()), key


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_a_merge_across_shards_of_a_set_copies_the_parts(tmp_path, kind):
    folder, out = tmp_path / "set", tmp_path / "out"
    tensors = make_set(folder, kind)  # embed.weight in shard 1, head.weight in shard 2
    schema = schema_of(cm.ops.Merge(["embed.weight", "head.weight"], "eh.weight", sizes=[16, 4]))
    result = cm.upgrade_file(folder, out, schema, from_version="1.0.0")
    assert result.streamed and result.bytes_through_python == 0
    loaded = cm.load(out, schema=schema)
    assert str(loaded.version) == "2.0.0"
    assert torch.equal(
        loaded.state_dict["eh.weight"], torch.cat([tensors["embed.weight"], tensors["head.weight"]])
    )
    for key in ("blocks.0.weight", "blocks.0.rotary", "blocks.1.weight"):
        assert torch.equal(loaded.state_dict[key], tensors[key]), key
    for shard in out.iterdir():
        if shard.suffix == ".bin":
            assert zipfile.ZipFile(shard).testzip() is None
        elif shard.suffix == ".safetensors":
            load_file(str(shard))


def test_crc32_combine_equals_the_crc_of_the_concatenation():
    for a, b in [(b"", b""), (b"", b"x"), (b"x", b""), (os.urandom(4097), os.urandom(12345))]:
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    parts = [os.urandom(n) for n in (1, 64, 1000, 0, 77777)]
    assert crc32_of_parts((zlib.crc32(p), len(p)) for p in parts) == zlib.crc32(b"".join(parts))


def test_parts_that_are_views_of_one_record_merge_by_bytes(tmp_path):
    """Two tensors saved as views of one storage: each part is a run inside that record (its
    CRC read from the file, as the record's own does not cover it)."""
    torch.manual_seed(0)
    whole = torch.randn(10, 6)
    src, dst = tmp_path / "old.pth", tmp_path / "new.pth"
    torch.save({"a": whole[1:4], "b": whole[6:9], "c": whole[4:6]}, src)
    schema = schema_of(cm.ops.Merge(["b", "a"], "ba"))
    result = cm.upgrade_file(src, dst, schema, from_version="1.0.0")
    assert result.streamed and result.bytes_through_python == 0
    got = read_back(dst)
    assert torch.equal(got["ba"], torch.cat([whole[6:9], whole[1:4]]))
    assert torch.equal(got["c"], whole[4:6])


def test_an_in_place_upgrade_by_bytes_keeps_its_backup(tmp_path):
    path = tmp_path / "model.pth"
    sd = source_state()
    cm.save(path, sd, schema="net", version="1.0.0")
    before = path.read_bytes()
    schema = schema_of(*PLANS["merge"]())
    result = cm.upgrade_in_place(path, schema)
    assert result.streamed and result.bytes_through_python == 0
    assert Path(result.backup).read_bytes() == before
    assert zipfile.ZipFile(path).testzip() is None
    upgraded = cm.load(path, schema=schema)
    assert torch.equal(
        upgraded.state_dict["layers.0.attn.qkv.weight"], torch.cat([sd[Q], sd[K], sd[V]])
    )


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_byte_merge_on_xfs_shares_the_kept_records(xfs, suffix):  # noqa: F811
    """On a file system that clones, the kept records are shared: used space grows by at most
    the merged tensor (its first part lies at its source's residue and clones too)."""
    torch.manual_seed(0)
    sd = {f"layers.{i}.attn.weight": torch.randn(1000, 1003) for i in range(16)}  # 64 MB
    src, dst = xfs / f"old{suffix}", xfs / f"new{suffix}"
    write_source(src, sd)
    before = used_bytes(xfs)
    parts = ["layers.0.attn.weight", "layers.1.attn.weight"]
    result = cm.upgrade_file(src, dst, schema_of(cm.ops.Merge(parts, "l01")), from_version="1.0.0")
    grown = used_bytes(xfs) - before
    assert result.streamed and result.bytes_through_python == 0
    assert grown <= 2 * 1000 * 1003 * 4 + src.stat().st_size // 100, grown
    assert torch.equal(read_back(dst)["l01"], torch.cat([sd[k] for k in parts]))


@pytest.mark.parametrize("big_endian", [(1,), (2,), (1, 2)])
def test_a_byte_merge_across_bin_shards_keeps_the_values_whatever_their_byteorder(
    tmp_path, big_endian
):
    """Parts from a big-endian and a little-endian .bin shard cannot be laid end to end in
    one record of either archive: the merge runs on the tensors. Parts of one byte order
    are still merged by bytes, into a shard of that order."""
    torch.manual_seed(0)
    a, b = torch.randn(3, 4), torch.randn(2, 4)
    folder, out = tmp_path / "set", tmp_path / "out"
    make_bin_shards(folder, [{"a": a}, {"b": b}], big_endian=big_endian)
    assert torch.equal(torch.load(folder / "pytorch_model-00001-of-00002.bin")["a"], a)
    schema = schema_of(cm.ops.Merge(["a", "b"], "m", sizes=[3, 2]))
    result = cm.upgrade_file(folder, out, schema, from_version="1.0.0")
    assert result.streamed is (len(big_endian) == 2)
    written = json.loads((out / "pytorch_model.bin.index.json").read_text())["weight_map"]["m"]
    merged = torch.load(out / written, weights_only=True)["m"]
    assert torch.equal(merged, torch.cat([a, b]))
    assert torch.equal(cm.load(out, schema=schema).state_dict["m"], torch.cat([a, b]))
