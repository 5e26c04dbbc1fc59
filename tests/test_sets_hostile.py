"""Rewriting a sharded set touches the set's own files only: a hostile or careless index never
makes an upgrade delete or overwrite a file it did not write or that the old index did not
name, a set's backup holds the set and nothing else of its folder, and a step given as a
function runs once per upgrade, whichever path writes the set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hostile import write_set
from toy import toy_schema

import ckptmigrate as cm
from ckptmigrate import cli
from ckptmigrate.engine.inplace import migrate_file, stamp_in_place, upgrade_in_place
from ckptmigrate.engine.rewrite import upgrade_file
from ckptmigrate.errors import CheckpointFormatError, CkptMigrateError
from ckptmigrate.io.files import read_checkpoint, read_metadata

# 2.0.0: a rename only (tensor bytes copied as stored); 3.0.0: through a function step
# (the set is loaded, upgraded and re-sharded)
PATHS = ["2.0.0", "3.0.0"]


def shards(ext: str = ".safetensors") -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return {
        f"model-00001-of-00002{ext}": {"blocks.0.weight": torch.randn(4, 4, generator=gen)},
        f"model-00002-of-00002{ext}": {"blocks.1.weight": torch.randn(4, 4, generator=gen)},
    }


def upgraded(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace("blocks.", "layers.", 1): v for k, v in tensors.items()}


def assert_set(path: Path, version: str, tensors: dict[str, torch.Tensor]) -> None:
    ckpt = read_checkpoint(path)
    assert str(ckpt.version) == version
    assert ckpt.state_dict.keys() == tensors.keys()
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in tensors.items())


def named(index: Path) -> set[str]:
    return set(json.loads(index.read_text())["weight_map"].values())


# ----------------------------------------------------------------------------- deletion


@pytest.mark.parametrize("to", PATHS)
def test_an_upgrade_keeps_a_shard_that_another_index_in_the_folder_names(
    tmp_path: Path, to: str
) -> None:
    folder = tmp_path / "set"
    mine = {"blocks.9.weight": torch.full((3,), 7.0)}
    ours = next(iter(shards().items()))
    index = write_set(folder, dict([ours, ("my_finetune.safetensors", mine)]), version="1.0.0")
    other = write_set(folder, {"my_finetune.safetensors": mine}, "other.safetensors.index.json")
    before = (folder / "my_finetune.safetensors").read_bytes()
    upgrade_in_place(index, toy_schema(), to=to)
    assert (folder / "my_finetune.safetensors").read_bytes() == before
    assert read_checkpoint(other).state_dict.keys() == mine.keys()  # the other set is whole
    assert_set(index, to, upgraded({**ours[1], **mine}))
    assert not (folder / ours[0]).exists()  # its own old shard, named by no index, is gone


@pytest.mark.parametrize(
    "planted", ["config.json", "notes-0badc0de.txt", "model-0badc0de.safetensors"]
)
def test_a_planted_journal_deletes_no_file_the_run_did_not_write(
    tmp_path: Path, planted: str
) -> None:
    # a journal from a "dead writer" on this host, naming a user's files as its new shards
    import socket

    folder = tmp_path / "set"
    index = write_set(folder, shards(), version="1.0.0")
    (folder / planted).write_text("the user's own file")
    journal = folder / (index.name + ".ckptmigrate-pending")
    record = {"pid": 2**22 + 7, "host": socket.gethostname(), "index": index.name}
    record |= {"old": {}, "new": [planted]}
    journal.write_text(json.dumps(record))
    with pytest.raises(CkptMigrateError, match="already stamped"):
        stamp_in_place(index, "toy", "1.0.0")  # refused: already stamped
    upgrade_in_place(index, toy_schema(), to="2.0.0")
    assert (folder / planted).read_text() == "the user's own file"
    assert not journal.exists()  # settled: nothing of it left
    assert_set(index, "2.0.0", upgraded({k: v for p in shards().values() for k, v in p.items()}))


@pytest.mark.parametrize("to", PATHS)
def test_new_shards_never_overwrite_a_file_the_old_index_does_not_name(
    tmp_path: Path, to: str
) -> None:
    probe = tmp_path / "probe"
    upgrade_in_place(write_set(probe, shards(), version="1.0.0"), toy_schema(), to=to)
    picked = named(probe / "model.safetensors.index.json")  # the names an upgrade picks
    folder = tmp_path / "set"
    index = write_set(folder, shards(), version="1.0.0")
    for name in picked:  # the user's own files happen to have those names
        (folder / name).write_bytes(b"the user's own " + name.encode())
    upgrade_in_place(folder, toy_schema(), to=to)
    for name in picked:
        assert (folder / name).read_bytes() == b"the user's own " + name.encode()
    assert not named(index) & picked
    assert_set(folder, to, upgraded({k: v for s in shards().values() for k, v in s.items()}))


def test_a_stamp_never_writes_over_a_file_the_old_index_does_not_name(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    write_set(probe, shards())
    stamp_in_place(probe, "toy", "1.0.0")
    picked = named(probe / "model.safetensors.index.json")
    folder = tmp_path / "set"
    write_set(folder, shards())
    for name in picked:
        (folder / name).write_bytes(b"mine")
    stamp_in_place(folder, "toy", "1.0.0")
    assert all((folder / name).read_bytes() == b"mine" for name in picked)
    assert_set(folder, "1.0.0", {k: v for s in shards().values() for k, v in s.items()})


@pytest.mark.parametrize(
    "name",
    [
        "../outside.bin",
        "/etc/passwd",
        "sub/inner.bin",
        "back\\slash.bin",
        "nul\0.bin",
        "..",
        "pytorch_model.bin.index.json",
        # ckptmigrate's own files beside a set: a sweep would take them for debris
        "pytorch_model.bin.index.json.ckptmigrate-pending",
        f"model-00001-of-00002.bin{cm.formats.atomic.TEMP_MARKER}1-abcd",
        "set.ckptmigrate.lock",
    ],
)
def test_a_shard_name_must_be_a_plain_file_of_the_set(tmp_path: Path, name: str) -> None:
    folder = tmp_path / "set"
    index = write_set(folder, shards(".bin"), "pytorch_model.bin.index.json", version="1.0.0")
    raw = json.loads(index.read_text())
    raw["weight_map"]["blocks.0.weight"] = name
    index.write_text(json.dumps(raw))
    if "ckptmigrate" in name:  # a whole shard under that name
        shutil.copyfile(folder / "model-00001-of-00002.bin", folder / name)
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(CheckpointFormatError, match="shard"):
        read_metadata(folder)
    with pytest.raises(CheckpointFormatError):
        upgrade_in_place(folder, toy_schema())
    assert sorted(p.name for p in folder.iterdir()) == before
    assert cli.main(["info", str(folder)]) == 2


# ----------------------------------------------------------------------------- backups


def _litter(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".ckptmigrate" in p.name]


@pytest.mark.parametrize("named_by", ["index", "folder"])
def test_a_set_backup_holds_its_index_and_shards_only(tmp_path: Path, named_by: str) -> None:
    folder = tmp_path / "set"
    index = write_set(folder, shards(), version="1.0.0")
    (folder / "notes.txt").write_text("my notes")
    (folder / "config.json").write_text("{}")
    torch.save({"w": torch.ones(2)}, folder / "other_run.pth")
    inodes = {name: (folder / name).stat().st_ino for name in [index.name, *shards()]}
    out = upgrade_in_place(index if named_by == "index" else folder, toy_schema())
    backup = Path(out.backup)
    assert backup.parent == tmp_path
    assert sorted(p.name for p in backup.iterdir()) == sorted(inodes)
    assert {name: (backup / name).stat().st_ino for name in inodes} == inodes  # hard links
    assert_set(backup, "1.0.0", {k: v for s in shards().values() for k, v in s.items()})
    assert (folder / "notes.txt").read_text() == "my notes"
    assert _litter(folder) == [] and _litter(tmp_path) == []


def test_a_set_backup_links_the_shards_it_keeps(tmp_path: Path) -> None:
    from ckptmigrate.engine.inplace import _write_backup

    folder = tmp_path / "set"
    index = write_set(folder, shards(), version="1.0.0")
    (folder / "notes.txt").write_text("my notes")
    kept = _write_backup(index, "1.0.0")
    assert sorted(p.name for p in kept.iterdir()) == sorted([index.name, *shards()])
    for name in [index.name, *shards()]:
        assert (kept / name).stat().st_ino == (folder / name).stat().st_ino
    assert _write_backup(folder, "1.0.0") == kept  # the same set by its folder: the same one


def test_two_sets_in_one_folder_each_keep_their_own_backup(tmp_path: Path) -> None:
    folder = tmp_path / "sets"
    first = write_set(folder, shards(), version="1.0.0")
    second = write_set(folder, shards(".bin"), "pytorch_model.bin.index.json", version="1.0.0")
    one = Path(upgrade_in_place(first, toy_schema()).backup)
    two = Path(upgrade_in_place(second, toy_schema()).backup)
    assert one != two
    assert sorted(p.name for p in one.iterdir()) == sorted([first.name, *shards()])
    assert sorted(p.name for p in two.iterdir()) == sorted([second.name, *shards(".bin")])
    assert str(read_metadata(first).version) == str(read_metadata(second).version) == "3.0.0"


# ----------------------------------------------------------------------------- steps run once

COUNTING_MIGRATIONS = """
from pathlib import Path

import ckptmigrate as cm

schema = cm.Schema("toy", current="3.0.0")
schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("blocks.", "layers.")])


@schema.migration("2.0.0", "3.0.0", breaking=True)
def pin_width(ckpt):
    with open(Path(__file__).with_name("calls.log"), "a") as log:
        log.write("pin_width\\n")
    ckpt.hparams.setdefault("width", 4)
"""


def _counting_schema(log: list[str]) -> cm.Schema:
    schema = cm.Schema("toy", current="3.0.0")
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("blocks.", "layers.")])

    @schema.migration("2.0.0", "3.0.0", breaking=True)
    def pin_width(ckpt: cm.Checkpoint) -> None:
        log.append("pin_width")
        ckpt.hparams.setdefault("width", 4)

    return schema


@pytest.mark.parametrize("ext", [".safetensors", ".bin"])
@pytest.mark.parametrize(
    "how",
    ["cli --in-place", "cli -o", "migrate_file in place", "migrate_file -o"]
    + ["upgrade_file in place", "upgrade_file -o"],
)
def test_a_function_step_runs_once_per_upgrade_of_a_set(tmp_path: Path, ext: str, how: str) -> None:
    folder = tmp_path / "set"
    index_name = "model.safetensors.index.json" if ext == ".safetensors" else "x.bin.index.json"
    write_set(folder, shards(ext), index_name, version="1.0.0")
    out = tmp_path / "out" if how.endswith("-o") else folder
    log: list[str] = []
    if how.startswith("cli"):
        (tmp_path / "mig").mkdir()
        (tmp_path / "mig" / "counting.py").write_text(COUNTING_MIGRATIONS)
        where = ["--in-place"] if how.endswith("--in-place") else ["-o", str(out)]
        assert (
            cli.main(["upgrade", str(folder), *where, "--migrations", str(tmp_path / "mig")]) == 0
        )
        log = (tmp_path / "mig" / "calls.log").read_text().split()
    elif how.startswith("migrate_file"):
        migrate_file(folder, None if out == folder else out, schemas=_counting_schema(log))
    else:
        upgrade_file(folder, out, _counting_schema(log))
    assert log == ["pin_width"]
    ckpt = read_checkpoint(out)
    assert str(ckpt.version) == "3.0.0" and ckpt.hparams == {"width": 4}
    assert [h["to"] for h in ckpt.history] == ["2.0.0", "3.0.0"]
    assert_set(out, "3.0.0", upgraded({k: v for s in shards(ext).values() for k, v in s.items()}))


def test_a_function_step_of_a_mounted_set_runs_once(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    tensors = {"net.blocks.0.weight": torch.ones(2, 2), "net.blocks.1.weight": torch.zeros(2)}
    write_set(folder, {"model-00001-of-00001.safetensors": tensors})
    stamp_in_place(folder, "toy", "1.0.0", prefix="net.")
    log: list[str] = []
    migrate_file(folder, None, schemas=_counting_schema(log))
    assert log == ["pin_width"]
    assert set(read_checkpoint(folder).state_dict) == {"net.layers.0.weight", "net.layers.1.weight"}
