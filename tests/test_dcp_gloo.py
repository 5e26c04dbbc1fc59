"""A DCP checkpoint written by two gloo ranks (DTensor shards + per-rank keys), then migrated.

Two real processes form a gloo process group (rendezvous through a FileStore in ``tmp_path``,
no network) and call ``torch.distributed.checkpoint.save``: the ``.metadata`` then describes
data from both ranks (``__0_0.distcp``, ``__1_0.distcp``). The test process, with no process
group, reads, stamps, upgrades and diffs the folder with ckptmigrate, and two ranks load the
upgraded folder back through ``torch.distributed.checkpoint.load`` under the new key names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as dcp_fs
from folder_schema import rename_drop_schema
from gloo_ranks import WORLD, init_ranks, run_ranks

import ckptmigrate as cm
from ckptmigrate.engine.rewrite import upgrade_file
from ckptmigrate.formats.dcp import STAMP_FILE, SafeFileSystemReader, read_dcp_metadata
from ckptmigrate.io.files import read_checkpoint, read_metadata

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("this torch build has no torch.distributed gloo backend", allow_module_level=True)


def _full() -> dict[str, torch.Tensor]:
    """The logical (unsharded) tensors: what any rank sees after reassembly."""
    gen = torch.Generator().manual_seed(0)
    return {
        "blocks.0.weight": torch.randn(8, 4, generator=gen),  # rows sharded over the ranks
        "blocks.0.proj": torch.randn(3, 6, generator=gen).double(),  # columns sharded
        "blocks.0.rotary": torch.randn(3, generator=gen),  # replicated, dropped by the schema
        "head.bias": torch.arange(5),  # replicated, int64
    }


def _own_key(rank: int, prefix: str = "blocks") -> str:
    """A key only ``rank`` holds (blocks.1.bias on rank 0, blocks.2.bias on rank 1)."""
    return f"{prefix}.{rank + 1}.bias"


def _own_value(rank: int) -> torch.Tensor:
    return torch.full((3,), float(rank + 1)) + torch.arange(3) / 10


def _refuse_plain_pickle(*args: object, **kwargs: object) -> None:
    raise AssertionError("torch's unguarded pickle.load ran on .metadata")


def _save_worker(rank: int, store: str, folder: str) -> None:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_ranks(rank, store)
    try:
        full = _full()
        model = {
            "blocks.0.weight": distribute_tensor(full["blocks.0.weight"], mesh, [Shard(0)]),
            "blocks.0.proj": distribute_tensor(full["blocks.0.proj"], mesh, [Shard(1)]),
            "blocks.0.rotary": distribute_tensor(full["blocks.0.rotary"], mesh, [Replicate()]),
            "head.bias": full["head.bias"],  # a plain tensor every rank holds
            _own_key(rank): _own_value(rank),
        }
        dcp.save({"model": model, "epoch": 7}, checkpoint_id=folder)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _load_worker(rank: int, store: str, folder: str) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    dcp_fs.pickle.load = _refuse_plain_pickle  # this rank reads .metadata the safe way too
    mesh = init_ranks(rank, store)
    try:
        full = _full()
        weight = distribute_tensor(torch.zeros(8, 4), mesh, [Shard(0)])
        proj = distribute_tensor(torch.zeros(3, 6, dtype=torch.float64), mesh, [Shard(1)])
        model = {
            "layers.0.weight": weight,
            "layers.0.proj": proj,
            "head.bias": torch.zeros(5, dtype=torch.long),
            _own_key(rank, "layers"): torch.zeros(3),
        }
        dcp.load({"model": model}, storage_reader=SafeFileSystemReader(folder))
        rows = slice(4 * rank, 4 * rank + 4)
        cols = slice(3 * rank, 3 * rank + 3)
        assert torch.equal(model["layers.0.weight"].to_local(), full["blocks.0.weight"][rows])
        assert torch.equal(model["layers.0.proj"].to_local(), full["blocks.0.proj"][:, cols])
        assert torch.equal(model["head.bias"], full["head.bias"])
        assert torch.equal(model[_own_key(rank, "layers")], _own_value(rank))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("gloo")
    folder = base / "step-100"
    run_ranks(_save_worker, str(base / "save-store"), str(folder))
    return folder


@pytest.fixture()
def no_plain_pickle(monkeypatch):
    """torch's FileSystemReader reads .metadata with pickle.load: make that fail loudly.

    Not around the gloo runs: torch.multiprocessing reads a failed rank's traceback with
    pickle.load (each loading rank sets the refusal in its own process instead).
    """
    monkeypatch.setattr(dcp_fs.pickle, "load", _refuse_plain_pickle)


def _renamed(key: str, prefix: str = "layers") -> str:
    return prefix + key.removeprefix("blocks") if key.startswith("blocks.") else key


def _expected(prefix: str = "blocks", dropped: bool = False) -> dict[str, torch.Tensor]:
    full = _full()
    if dropped:
        del full["blocks.0.rotary"]
    out = {_renamed(k, prefix): v for k, v in full.items()}
    out.update((_own_key(rank, prefix), _own_value(rank)) for rank in range(WORLD))
    return out


def _assert_values(state_dict: dict, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(state_dict) == sorted(expected)
    for key, value in expected.items():
        got = state_dict[key]
        assert isinstance(got, torch.Tensor) and type(got) is torch.Tensor, key
        assert got.dtype == value.dtype and torch.equal(got, value), key


def test_both_ranks_wrote_into_one_checkpoint(gloo_dir):
    assert sorted(p.name for p in gloo_dir.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    entries = read_dcp_metadata(gloo_dir).state_dict_metadata
    # each rank wrote its own row block of the weight, and its column block of proj
    weight_chunks = [tuple(c.offsets) for c in entries["model.blocks.0.weight"].chunks]
    assert sorted(weight_chunks) == [(0, 0), (4, 0)]
    proj_chunks = [tuple(c.offsets) for c in entries["model.blocks.0.proj"].chunks]
    assert sorted(proj_chunks) == [(0, 0), (0, 3)]


def test_metadata_read_sees_the_full_shapes_and_every_ranks_keys(gloo_dir, no_plain_pickle):
    ckpt = read_metadata(gloo_dir)
    assert ckpt.version is None and ckpt.layout.startswith("dcp-")
    assert sorted(ckpt.state_dict) == sorted(_expected())
    stubs = ckpt.state_dict
    assert (stubs["blocks.0.weight"].shape, stubs["blocks.0.weight"].dtype) == ((8, 4), "float32")
    assert (stubs["blocks.0.proj"].shape, stubs["blocks.0.proj"].dtype) == ((3, 6), "float64")
    assert (stubs["head.bias"].shape, stubs["head.bias"].dtype) == ((5,), "int64")
    assert stubs["blocks.2.bias"].shape == (3,)
    assert "epoch" in ckpt.extra


def test_full_read_reassembles_the_shards_of_both_ranks(gloo_dir, no_plain_pickle):
    ckpt = read_checkpoint(gloo_dir)
    _assert_values(ckpt.state_dict, _expected())
    assert ckpt.extra["epoch"] == 7


@pytest.fixture()
def upgraded(gloo_dir, tmp_path) -> Path:
    out = tmp_path / "upgraded"
    result = upgrade_file(gloo_dir, out, rename_drop_schema(), from_version="1.0.0")
    assert (str(result.source_version), str(result.target_version)) == ("1.0.0", "2.0.0")
    assert result.format == "dcp"
    return out


def test_upgrade_renames_drops_sets_the_hparam_and_stamps(gloo_dir, no_plain_pickle, upgraded):
    assert (upgraded / STAMP_FILE).is_file()
    meta = read_metadata(upgraded)
    assert (meta.schema, str(meta.version)) == ("lm", "2.0.0")
    assert meta.hparams == {"eps": 1e-6}
    assert sorted(meta.state_dict) == sorted(_expected("layers", dropped=True))
    assert meta.state_dict["layers.0.weight"].shape == (8, 4)
    loaded = read_checkpoint(upgraded)
    _assert_values(loaded.state_dict, _expected("layers", dropped=True))
    assert loaded.extra["epoch"] == 7
    assert sorted(p.name for p in gloo_dir.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]  # the source folder is untouched


def test_diff_reports_the_renames_the_drop_and_the_hparam(gloo_dir, upgraded, capsys):
    from ckptmigrate import cli

    d = cm.diff(gloo_dir, upgraded, values=True)
    renamed = {r["from"]: r["to"] for r in d.renamed}
    assert renamed == {k: _renamed(k) for k in _expected(dropped=True) if k.startswith("blocks.")}
    assert [r["key"] for r in d.removed] == ["blocks.0.rotary"] and d.added == []
    assert [(h["path"], h["change"]) for h in d.hparams] == [("eps", "added")]
    assert d.value_changes == []  # every renamed tensor holds what the ranks wrote
    assert cli.main(["diff", str(gloo_dir), str(upgraded), "--json"]) == 1
    as_json = json.loads(capsys.readouterr().out)
    assert {r["from"]: r["to"] for r in as_json["renamed"]} == renamed
    assert as_json["stamps"]["b"]["version"] == "2.0.0"


def test_two_ranks_load_the_upgraded_folder_under_the_new_names(upgraded, tmp_path):
    run_ranks(_load_worker, str(tmp_path / "load-store"), str(upgraded))


def test_stamped_through_upgrade_then_upgraded_from_the_stamp(gloo_dir, tmp_path):
    stamped = tmp_path / "stamped"
    upgrade_file(gloo_dir, stamped, rename_drop_schema(), to="1.0.0", from_version="1.0.0")
    meta = read_metadata(stamped)
    assert (meta.schema, str(meta.version)) == ("lm", "1.0.0")
    for name in (".metadata", "__0_0.distcp", "__1_0.distcp"):  # nothing to run: copied as is
        assert (stamped / name).read_bytes() == (gloo_dir / name).read_bytes()
    _assert_values(read_checkpoint(stamped).state_dict, _expected())
    out = tmp_path / "upgraded"
    result = upgrade_file(stamped, out, rename_drop_schema())  # version from the stamp
    assert str(result.source_version) == "1.0.0"
    meta = read_metadata(out)
    assert str(meta.version) == "2.0.0" and [str(h["from"]) for h in meta.history] == ["1.0.0"]


def test_stamp_in_place_stamps_a_dcp_folder(gloo_dir, tmp_path):
    folder = tmp_path / "step-100"
    shutil.copytree(gloo_dir, folder)
    cm.stamp_in_place(folder, "lm", "1.0.0")
    assert str(read_metadata(folder).version) == "1.0.0"
    assert (folder / STAMP_FILE).is_file() and (folder / "__1_0.distcp").is_file()


def test_cli_stamp_output_of_a_dcp_folder_is_a_dcp_folder(gloo_dir, tmp_path, capsys):
    from ckptmigrate import cli

    out = tmp_path / "stamped"
    args = ["stamp", str(gloo_dir), "--schema", "lm", "--version", "1.0.0", "-o", str(out)]
    assert cli.main(args) == 0, capsys.readouterr()
    assert out.is_dir(), "wrote a single torch.save file, not a DCP folder"
    assert read_metadata(out).layout.startswith("dcp-")


def test_in_place_upgrade_with_nothing_to_run_only_stamps(gloo_dir, tmp_path):
    folder = tmp_path / "step-200"
    shutil.copytree(gloo_dir, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    cm.upgrade_in_place(folder, rename_drop_schema(), to="1.0.0", from_version="1.0.0")
    assert str(read_metadata(folder).version) == "1.0.0"
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != STAMP_FILE}
    assert after == before  # every rank's file as it was, no re-save through DCP
