"""Sharded sets (index JSON + shards) read, diff and upgrade as one logical checkpoint."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from folder_schema import rename_drop_schema
from safetensors.torch import save_file
from set_files import make_bin_shards, make_set

import ckptmigrate as cm
from ckptmigrate.engine.rewrite import upgrade_file
from ckptmigrate.formats import sharded
from ckptmigrate.formats.safetensors_header import read_safetensors_header
from ckptmigrate.io.files import read_checkpoint, read_metadata


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_metadata_read_sees_every_shard_as_one_checkpoint(tmp_path, kind):
    tensors = make_set(tmp_path / "set", kind)
    ckpt = read_metadata(tmp_path / "set")
    assert list(ckpt.state_dict) == list(tensors)
    assert ckpt.state_dict["blocks.1.weight"].dtype == "float16"
    assert ckpt.version is None and ckpt.layout == "sharded"


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_in_place_upgrade_rewrites_shards_then_swaps_the_index(tmp_path, kind):
    tensors = make_set(tmp_path / "set", kind)
    old_shards = sorted(p.name for p in (tmp_path / "set").iterdir() if "index" not in p.name)
    result = upgrade_file(
        tmp_path / "set", tmp_path / "set", rename_drop_schema(), from_version="1.0.0"
    )
    assert result.streamed and result.bytes_through_python == 0
    assert sorted(result.removed) == old_shards
    index_path = sharded.find_index(tmp_path / "set")
    index = json.loads(index_path.read_text())
    assert index["metadata"]["ckptmigrate.stamp"]["version"] == "2.0.0"
    assert index["metadata"]["ckptmigrate.hparams"] == {"eps": 1e-6}
    on_disk = sorted(p.name for p in (tmp_path / "set").iterdir() if p != index_path)
    assert on_disk == sorted(set(index["weight_map"].values()))
    loaded = read_checkpoint(tmp_path / "set")
    assert str(loaded.version) == "2.0.0" and "layers.0.rotary" not in loaded.state_dict
    assert torch.equal(loaded.state_dict["layers.1.weight"], tensors["blocks.1.weight"])
    assert torch.equal(loaded.state_dict["embed.weight"], tensors["embed.weight"])
    if kind == "safetensors":
        for shard in set(index["weight_map"].values()):
            _, header = read_safetensors_header(tmp_path / "set" / shard)
            assert json.loads(header["ckptmigrate.stamp"])["version"] == "2.0.0"
            assert header["format"] == "pt"  # other tools' header entries survive


def test_upgrade_to_another_folder_leaves_the_source_set_untouched(tmp_path):
    make_set(tmp_path / "set", "safetensors")
    before = {p.name: p.read_bytes() for p in (tmp_path / "set").iterdir()}
    upgrade_file(tmp_path / "set", tmp_path / "out", rename_drop_schema(), from_version="1.0.0")
    assert {p.name: p.read_bytes() for p in (tmp_path / "set").iterdir()} == before
    assert str(read_metadata(tmp_path / "out").version) == "2.0.0"


def test_a_failure_before_the_index_swap_leaves_the_old_set_loadable(tmp_path, monkeypatch):
    tensors = make_set(tmp_path / "set", "safetensors")
    before = {p.name: p.read_bytes() for p in (tmp_path / "set").iterdir()}

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed before the index was written")

    monkeypatch.setattr(sharded, "write_index", crash)
    with pytest.raises(KeyboardInterrupt):
        upgrade_file(tmp_path / "set", tmp_path / "set", rename_drop_schema(), from_version="1.0.0")
    assert {p.name: p.read_bytes() for p in (tmp_path / "set").iterdir()} == before
    loaded = read_checkpoint(tmp_path / "set")
    assert torch.equal(loaded.state_dict["blocks.0.weight"], tensors["blocks.0.weight"])


def test_tensor_op_takes_the_loaded_path_and_reshards(tmp_path):
    tensors = make_set(tmp_path / "set", "safetensors")
    schema = cm.Schema("lm", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.Cast("blocks.1.weight", dtype="float32")])
    result = upgrade_file(tmp_path / "set", tmp_path / "set", schema, from_version="1.0.0")
    assert not result.streamed
    loaded = read_checkpoint(tmp_path / "set")
    assert loaded.state_dict["blocks.1.weight"].dtype == torch.float32
    assert torch.equal(loaded.state_dict["blocks.1.weight"], tensors["blocks.1.weight"].float())
    assert str(loaded.version) == "2.0.0"


def test_unversioned_set_without_from_version_is_refused_before_writing(tmp_path):
    make_set(tmp_path / "set", "bin")
    before = sorted(p.name for p in (tmp_path / "set").iterdir())
    with pytest.raises(cm.UnversionedCheckpointError):
        upgrade_file(tmp_path / "set", tmp_path / "set", rename_drop_schema())
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == before


def test_cli_upgrade_path_writes_sharded_sets_through_the_streaming_writer(tmp_path):
    from ckptmigrate.engine.inplace import migrate_file as cli_upgrade_file

    tensors = make_set(tmp_path / "set", "safetensors")
    outcome = cli_upgrade_file(
        tmp_path / "set", tmp_path / "out", schemas=rename_drop_schema(), from_version="1.0.0"
    )
    assert outcome.written
    loaded = read_checkpoint(tmp_path / "out")
    assert str(loaded.version) == "2.0.0"
    assert torch.equal(loaded.state_dict["layers.0.weight"], tensors["blocks.0.weight"])


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_cli_in_place_upgrade_of_a_set_keeps_a_folder_backup(tmp_path, kind, capsys):
    from ckptmigrate import cli

    make_set(tmp_path / "set", kind)
    before = {p.name: p.read_bytes() for p in (tmp_path / "set").iterdir()}
    mig = tmp_path / "mig.py"
    mig.write_text(
        "import ckptmigrate as cm\n"
        "schema = cm.Schema('lm', current='2.0.0')\n"
        "schema.add_migration('1.0.0', '2.0.0', [cm.ops.RenamePrefix('blocks.', 'layers.')])\n"
    )
    args = ["upgrade", str(tmp_path / "set"), "--in-place", "--migrations", str(mig)]
    assert cli.main([*args, "--from-version", "1.0.0", "--schema", "lm"]) == 0, capsys.readouterr()
    backup = tmp_path / "set.1.0.0.bak"
    assert {p.name: p.read_bytes() for p in backup.iterdir()} == before
    assert str(read_checkpoint(tmp_path / "set").version) == "2.0.0"
    assert not list(tmp_path.glob("*ckptmigrate-tmp*"))


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
@pytest.mark.parametrize("how", ["in-place", "output"])
def test_stamp_writes_a_set_with_the_stamp_in_its_index(tmp_path, kind, how, capsys):
    from ckptmigrate import cli

    tensors = make_set(tmp_path / "set", kind)
    args = ["stamp", str(tmp_path / "set"), "--schema", "lm", "--version", "1.0.0"]
    args += ["--in-place"] if how == "in-place" else ["-o", str(tmp_path / "stamped")]
    assert cli.main(args) == 0, capsys.readouterr()
    out = tmp_path / ("set" if how == "in-place" else "stamped")
    assert out.is_dir()
    meta = read_metadata(out)
    assert (meta.schema, str(meta.version), meta.layout) == ("lm", "1.0.0", "sharded")
    index = next(out.glob("*.index.json"))
    assert json.loads(index.read_text())["metadata"]["ckptmigrate.stamp"]["version"] == "1.0.0"
    loaded = read_checkpoint(out)
    assert list(loaded.state_dict) == list(tensors)
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in tensors.items())
    if how == "output":  # the source set is left unstamped
        assert read_metadata(tmp_path / "set").version is None


def test_in_place_upgrade_through_the_index_path_backs_up_the_whole_set(tmp_path):
    tensors = make_set(tmp_path / "set", "safetensors")
    index = tmp_path / "set" / "model.safetensors.index.json"
    out = cm.upgrade_in_place(index, rename_drop_schema(), from_version="1.0.0")
    backup = Path(out.backup)
    assert backup.is_dir()  # the shards are rewritten too: an index alone would name nothing
    old = read_checkpoint(backup)
    assert old.version is None and list(old.state_dict) == list(tensors)
    assert all(torch.equal(old.state_dict[k], v) for k, v in tensors.items())
    assert str(read_metadata(tmp_path / "set").version) == "2.0.0"


def test_an_interrupt_after_the_new_index_landed_keeps_the_shards_it_names(tmp_path, monkeypatch):
    from ckptmigrate.formats import atomic

    make_set(tmp_path / "set", "safetensors")
    index = tmp_path / "set" / "model.safetensors.index.json"
    real = atomic.fsync_path

    def fsync_path(path):
        if path.is_dir() and "ckptmigrate.stamp" in index.read_text():
            raise KeyboardInterrupt  # Ctrl-C while the folder is fsynced, after the rename
        return real(path)

    monkeypatch.setattr(atomic, "fsync_path", fsync_path)
    with pytest.raises(KeyboardInterrupt):
        upgrade_file(tmp_path / "set", tmp_path / "set", rename_drop_schema(), from_version="1.0.0")
    monkeypatch.undo()
    named = set(json.loads(index.read_text())["weight_map"].values())
    assert all((tmp_path / "set" / name).is_file() for name in named)
    assert str(read_checkpoint(tmp_path / "set").version) == "2.0.0"


# ---------------------------------------------------------------- .bin shards left unchanged


def make_bin_set(folder: Path) -> dict[str, torch.Tensor]:
    """Two .bin shards: ``a``, ``b`` in the first, ``c``, ``d`` in the second."""
    folder.mkdir()
    torch.manual_seed(0)
    tensors = {f"{k}.weight": torch.randn(4 if k == "d" else 8, 8) for k in "abcd"}
    weight_map = {}
    for i, keys in enumerate([["a.weight", "b.weight"], ["c.weight", "d.weight"]], 1):
        name = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({k: tensors[k] for k in keys}, folder / name)
        weight_map.update((k, name) for k in keys)
    index = {"metadata": {"total_size": 1}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return tensors


def second_shard_schema(step: str) -> cm.Schema:
    schema = cm.Schema("lm", current="2.0.0")
    if step == "function":

        @schema.migration("1.0.0", "2.0.0")
        def scale(ckpt: cm.Checkpoint) -> None:
            ckpt.state_dict["c.weight"] = ckpt.state_dict["c.weight"] * 2

    else:
        schema.add_migration(
            "1.0.0", "2.0.0", [cm.ops.Merge(["c.weight", "d.weight"], "cd.weight", sizes=[8, 4])]
        )
    return schema


@pytest.mark.parametrize("step", ["function", "merge"])
@pytest.mark.parametrize("how", ["output", "in-place"])
def test_a_bin_set_copies_the_shards_a_step_leaves_unchanged(tmp_path, step, how):
    """Only the second shard changes: the first is copied whole (byte for byte) into another
    folder, or left as the very file it was in place; the index names it and loads."""
    folder = tmp_path / "set"
    tensors = make_bin_set(folder)
    first = folder / "pytorch_model-00001-of-00002.bin"
    first_bytes, first_inode = first.read_bytes(), first.stat().st_ino
    out = folder if how == "in-place" else tmp_path / "out"
    result = upgrade_file(folder, out, second_shard_schema(step), from_version="1.0.0")
    assert result.streamed is (step == "merge")
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    holding_a = out / index["weight_map"]["a.weight"]
    assert index["weight_map"]["b.weight"] == holding_a.name
    assert holding_a.read_bytes() == first_bytes  # copied whole, not re-pickled
    if how == "in-place":
        assert holding_a == first and first.stat().st_ino == first_inode
        assert "pytorch_model-00002-of-00002.bin" in result.removed
        assert first.name not in result.removed
    on_disk = sorted(p.name for p in out.iterdir() if p.suffix == ".bin")
    assert on_disk == sorted(set(index["weight_map"].values()))
    loaded = read_checkpoint(out)
    assert str(loaded.version) == "2.0.0"
    assert list(loaded.state_dict) == list(index["weight_map"])
    for key in ("a.weight", "b.weight"):
        assert torch.equal(loaded.state_dict[key], tensors[key])
    # of the changed shard only the new tensor goes through Python: d.weight is copied
    assert result.bytes_through_python == (8 * 8 * 4 if step == "function" else 0)
    if how == "output":
        assert result.bytes_copied >= len(first_bytes) + 4 * 8 * 4
    for shard in set(index["weight_map"].values()):
        assert zipfile.ZipFile(out / shard).testzip() is None
    if step == "function":
        assert torch.equal(loaded.state_dict["c.weight"], tensors["c.weight"] * 2)
        assert torch.equal(loaded.state_dict["d.weight"], tensors["d.weight"])
    else:
        merged = torch.cat([tensors["c.weight"], tensors["d.weight"]])
        assert torch.equal(loaded.state_dict["cd.weight"], merged)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in loaded.state_dict.values())


def test_a_bin_set_whose_every_shard_changes_writes_them_all(tmp_path):
    """The control: a rename touching both shards copies no shard whole."""
    folder = tmp_path / "set"
    make_bin_set(folder)
    first = (folder / "pytorch_model-00001-of-00002.bin").read_bytes()
    schema = cm.Schema("lm", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenameKeys(r"(.)\.weight", r"\1.w")])
    upgrade_file(folder, tmp_path / "out", schema, from_version="1.0.0")
    index = json.loads((tmp_path / "out" / "pytorch_model.bin.index.json").read_text())
    assert (tmp_path / "out" / index["weight_map"]["a.w"]).read_bytes() != first
    assert sorted(read_checkpoint(tmp_path / "out").state_dict) == ["a.w", "b.w", "c.w", "d.w"]


def test_a_bin_set_index_counts_a_tied_storage_once_whichever_path_wrote_it(tmp_path):
    """``total_size`` is the bytes of the distinct storages (as transformers and
    huggingface_hub count them): a tie pickled as one tensor or as two views of one storage
    counts once, on the byte path and on the tensor path alike."""
    torch.manual_seed(0)
    a, c = torch.randn(3, 4), torch.randn(5, 4)
    function = cm.Schema("net", current="2.0.0")

    @function.migration("1.0.0", "2.0.0")
    def scale(ckpt: cm.Checkpoint) -> None:
        ckpt.state_dict["c"] = ckpt.state_dict["c"] * 2

    by_bytes = cm.Schema("net", current="2.0.0")
    by_bytes.add_migration("1.0.0", "2.0.0", [cm.ops.Merge(["c"], "c2", sizes=[5])])
    totals = {}
    for tie, tied in (("object", a), ("view", a.view(3, 4))):
        make_bin_shards(tmp_path / tie, [{"a": a, "tied": tied}, {"c": c}])
        for name, schema in (("bytes", by_bytes), ("tensors", function)):
            out = tmp_path / f"{tie}-{name}"
            result = cm.upgrade_file(tmp_path / tie, out, schema, from_version="1.0.0")
            assert result.streamed is (name == "bytes")
            index = json.loads((out / "pytorch_model.bin.index.json").read_text())
            totals[tie, name] = index["metadata"]["total_size"]
    assert totals == dict.fromkeys(totals, 48 + 80)


def tie_schema() -> cm.Schema:
    """A step that ties ``tied`` to ``a`` (the same tensor under a second key, last)."""
    schema = cm.Schema("net", current="2.0.0")

    @schema.migration("1.0.0", "2.0.0")
    def tie(ckpt: cm.Checkpoint) -> None:
        ckpt.state_dict["tied"] = ckpt.state_dict["a"]

    return schema


def test_a_safetensors_set_counts_a_tie_once_as_a_bin_set_does(tmp_path):
    """A tie in a safetensors set is one entry and an alias (safetensors refuses shared
    tensors; our writer stores them once): counted once by either path, as in a .bin set."""
    torch.manual_seed(0)
    tensors = {"a": torch.randn(3, 4), "c": torch.randn(5, 4)}
    totals = {}
    for kind in ("safetensors", "bin"):
        folder = tmp_path / kind
        if kind == "safetensors":
            folder.mkdir()
            for i, key in enumerate(tensors, 1):
                save_file({key: tensors[key]}, str(folder / f"model-{i:05d}-of-00002.safetensors"))
            weight_map = {
                k: f"model-{i:05d}-of-00002.safetensors" for i, k in enumerate(tensors, 1)
            }
            index = {"metadata": {"total_size": 128}, "weight_map": weight_map}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        else:
            make_bin_shards(folder, [{"a": tensors["a"]}, {"c": tensors["c"]}])
        tied, renamed = tmp_path / f"{kind}-tied", tmp_path / f"{kind}-renamed"
        cm.upgrade_file(folder, tied, tie_schema(), from_version="1.0.0")
        rename = cm.Schema("net", current="3.0.0")
        rename.add_migration("2.0.0", "3.0.0", [cm.ops.RenameKeys(r"^c$", "d")])
        assert cm.upgrade_file(tied, renamed, rename).streamed
        for out in (tied, renamed):
            index = json.loads(sharded.find_index(out).read_text())
            totals[kind, out.name] = index["metadata"]["total_size"]
            assert index["weight_map"]["tied"] == index["weight_map"]["a"]  # one shard
        loaded = cm.load(renamed, schema=rename).state_dict
        assert loaded["tied"].data_ptr() == loaded["a"].data_ptr()
        assert torch.equal(loaded["tied"], tensors["a"])
    assert totals == dict.fromkeys(totals, 48 + 80)


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_re_sharding_keeps_a_tied_weight_in_one_shard(tmp_path, kind):
    """A tie whose second key comes a shard's worth of bytes after the first is written into
    the first one's shard: stored once, and still one tensor when the set is loaded."""
    tensors = make_set(tmp_path / "set", kind)
    out = tmp_path / "out"
    schema = cm.Schema("net", current="2.0.0")

    @schema.migration("1.0.0", "2.0.0")
    def tie(ckpt: cm.Checkpoint) -> None:
        ckpt.state_dict["blocks.0.weight"] = ckpt.state_dict["blocks.0.weight"] * 2
        ckpt.state_dict["tied"] = ckpt.state_dict["embed.weight"]

    cm.upgrade_file(tmp_path / "set", out, schema, from_version="1.0.0")
    index = json.loads(sharded.find_index(out).read_text())
    assert list(index["weight_map"])[-1] == "tied"
    assert index["weight_map"]["tied"] == index["weight_map"]["embed.weight"]
    loaded = cm.load(out, schema=schema).state_dict
    assert loaded["tied"].data_ptr() == loaded["embed.weight"].data_ptr()
    assert torch.equal(loaded["tied"], tensors["embed.weight"])
    held = sum(t.numel() * t.element_size() for k, t in loaded.items() if k != "tied")
    assert index["metadata"]["total_size"] == held


@pytest.mark.parametrize("big_endian", [(1,), (2,), (1, 2)])
def test_a_function_step_on_a_bin_set_with_big_endian_shards_keeps_the_values(tmp_path, big_endian):
    """Re-grouped .bin shards say the byte order of the bytes they hold (this machine's):
    records stored in it are copied, the others written from the tensors as loaded."""
    torch.manual_seed(0)
    a, b, c = torch.randn(3, 4), torch.randn(2, 4), torch.randn(5, 4)
    folder, out = tmp_path / "set", tmp_path / "out"
    make_bin_shards(folder, [{"a": a}, {"b": b, "c": c}], big_endian=big_endian)
    schema = cm.Schema("net", current="2.0.0")

    @schema.migration("1.0.0", "2.0.0")
    def scale(ckpt: cm.Checkpoint) -> None:
        ckpt.state_dict["c"] = ckpt.state_dict["c"] * 2

    result = cm.upgrade_file(folder, out, schema, from_version="1.0.0")
    weight_map = json.loads((out / "pytorch_model.bin.index.json").read_text())["weight_map"]
    got: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        got.update(torch.load(out / shard, weights_only=True))
        with zipfile.ZipFile(out / shard) as z:
            assert z.read(z.namelist()[0].split("/")[0] + "/byteorder") == b"little"
    assert torch.equal(got["a"], a)
    assert torch.equal(got["b"], b)
    assert torch.equal(got["c"], c * 2)
    if 2 not in big_endian:  # b's record, stored little-endian, is copied as it was
        assert result.bytes_copied >= b.numel() * 4


@pytest.mark.parametrize(
    "sizes, held, limit, groups",
    [
        ([3, 3, 5], None, 6, [[0, 1], [2]]),
        ([9], None, 6, [[0]]),  # larger than the limit: alone
        ([], None, 6, [[]]),
        # item 3 is stored as item 0: it joins item 0's group and adds no bytes
        ([3, 3, 5, 3], [0, 1, 2, 0], 6, [[0, 1, 3], [2]]),
        ([4, 2, 2], [0, 1, 1], 6, [[0, 1, 2]]),
    ],
)
def test_group_by_size_cuts_by_bytes_and_never_cuts_a_tie(sizes, held, limit, groups):
    held_as = None if held is None else held.__getitem__
    got = sharded.group_by_size(range(len(sizes)), sizes.__getitem__, limit, held_as)
    assert got == groups
