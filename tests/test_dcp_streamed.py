"""DCP upgrades that do not load DCP: a rename rewrites ``.metadata`` over linked rank files.

A rename/drop/hparam plan on a DCP folder writes a new ``.metadata`` (entries under their new
FQNs), the stamp, and (optimizer state keyed by FQN) one small file with each group's new
``params`` list; every ``.distcp`` rank file of the source is a hard link in the output.
Two gloo ranks then load the result into the new model's names.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from crash_points import copied_afresh, killed_runs
from folder_schema import rename_drop_schema
from torch.distributed.checkpoint import FileSystemWriter

import ckptmigrate as cm
from ckptmigrate.formats.dcp import STAMP_FILE, SafeFileSystemReader
from ckptmigrate.formats.dcp_rewrite import VALUES_FILE
from ckptmigrate.formats.folder_swap import finish_interrupted_swap
from ckptmigrate.io.files import read_checkpoint, read_metadata

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("this torch build has no torch.distributed gloo backend", allow_module_level=True)

from gloo_ranks import init_ranks, run_ranks  # noqa: E402

RTOL, ATOL = 0.0, 0.0  # the bytes are the stored ones: loaded values equal exactly


def _model_sd() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "blocks.0.weight": torch.randn(256, 1024, generator=gen),  # 1 MiB
        "blocks.0.bias": torch.randn(256, generator=gen),
        "blocks.0.rotary": torch.randn(8, generator=gen),
        "head.weight": torch.randn(4, 256, generator=gen).double(),
    }


def _optimizer_sd(model: dict[str, torch.Tensor]) -> dict:
    """Adam's state as ``get_state_dict`` keys it: by FQN, each group listing FQNs."""
    return {
        "state": {k: {"step": torch.tensor(3.0), "exp_avg": v * 0.5} for k, v in model.items()},
        "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": list(model)}],
    }


def _save(folder: Path, *, optimizer: bool = False, zstd: bool = False) -> None:
    model = _model_sd()
    state: dict = {"model": model, "epoch": 7}
    if optimizer:
        state["optimizer"] = _optimizer_sd(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single process, no process group
        if zstd:  # every item through DCP's zstd stream transform
            from torch.distributed.checkpoint._extension import ZStandard

            dcp.save(state, storage_writer=FileSystemWriter(folder, _extensions=[ZStandard()]))
        else:
            dcp.save(state, checkpoint_id=folder)


def _renamed() -> dict[str, torch.Tensor]:
    return {k.replace("blocks.", "layers."): v for k, v in _model_sd().items() if "rotary" not in k}


def _rank_files(folder: Path) -> dict[str, os.stat_result]:
    return {p.name: p.stat() for p in folder.glob("*.distcp") if p.name != VALUES_FILE}


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    folder = tmp_path / "step-100"
    _save(folder)
    return folder


def _load_worker(rank: int, store: str, folder: str) -> None:
    init_ranks(rank, store)
    try:
        expected = _renamed()
        model = {k: torch.zeros_like(v) for k, v in expected.items()}
        dcp.load({"model": model}, storage_reader=SafeFileSystemReader(folder))
        for key, value in expected.items():
            torch.testing.assert_close(model[key], value, rtol=RTOL, atol=ATOL)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_renamed_folder_loads_on_two_gloo_ranks_with_the_old_values(saved, tmp_path):
    out = tmp_path / "v2"
    result = cm.upgrade_file(saved, out, rename_drop_schema(), from_version="1.0.0")
    assert result.streamed  # not loaded and saved again
    run_ranks(_load_worker, str(tmp_path / "store"), str(out))
    meta = read_metadata(out)
    assert (meta.schema, str(meta.version), meta.hparams) == ("lm", "2.0.0", {"eps": 1e-6})
    assert sorted(meta.state_dict) == sorted(_renamed())
    assert read_checkpoint(out).extra["epoch"] == 7


def test_the_rank_files_are_hard_links_and_only_metadata_is_written(saved, tmp_path):
    before = {name: (saved / name).read_bytes() for name in _rank_files(saved)}
    out = tmp_path / "v2"
    result = cm.upgrade_file(saved, out, rename_drop_schema(), from_version="1.0.0")
    old, new = _rank_files(saved), _rank_files(out)
    assert sorted(new) == sorted(old)
    for name, st in new.items():
        assert (st.st_ino, st.st_dev) == (old[name].st_ino, old[name].st_dev), name
        assert (saved / name).read_bytes() == before[name], name  # the source is untouched
    data = sum(st.st_size for st in old.values())
    assert result.bytes_copied == data
    written = sum(p.stat().st_size for p in out.iterdir() if p.name not in new)
    assert result.bytes_through_python == written
    assert written < 0.05 * data, (written, data)


def test_in_place_the_folder_is_swapped_and_keeps_the_data_inodes(saved):
    inodes = {name: st.st_ino for name, st in _rank_files(saved).items()}
    result = cm.upgrade_file(saved, saved, rename_drop_schema(), from_version="1.0.0")
    assert result.streamed
    assert {name: st.st_ino for name, st in _rank_files(saved).items()} == inodes
    loaded = read_checkpoint(saved)
    for key, value in _renamed().items():
        torch.testing.assert_close(loaded.state_dict[key], value, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("zstd", [False, True], ids=["plain", "zstd"])
def test_optimizer_params_are_renamed_in_a_small_new_file(tmp_path, zstd):
    if zstd:  # the groups' FQN lists are read through the transform, not loaded with the rest
        pytest.importorskip("zstandard")
    src = tmp_path / "step-100"
    _save(src, optimizer=True, zstd=zstd)
    out = tmp_path / "v2"
    result = cm.upgrade_file(src, out, rename_drop_schema(), from_version="1.0.0")
    assert result.streamed
    assert (out / VALUES_FILE).stat().st_size < 4096
    for name, st in _rank_files(out).items():
        assert st.st_ino == (src / name).stat().st_ino, name
    opt = read_checkpoint(out).optimizer  # through DCP's own loader
    assert opt["param_groups"][0]["params"] == ["layers.0.weight", "layers.0.bias", "head.weight"]
    assert opt["param_groups"][0]["lr"] == 0.01
    assert sorted(opt["state"]) == sorted(opt["param_groups"][0]["params"])
    model = _model_sd()
    torch.testing.assert_close(
        opt["state"]["layers.0.weight"]["exp_avg"],
        model["blocks.0.weight"] * 0.5,
        rtol=RTOL,
        atol=ATOL,
    )


def test_a_kill_during_the_rewrite_leaves_a_loadable_folder(tmp_path, monkeypatch):
    originals = tmp_path / "originals"
    _save(originals)
    target = tmp_path / "work" / "step-100"
    fresh = copied_afresh(originals, target)

    def action() -> None:
        result = cm.upgrade_file(target, target, rename_drop_schema(), from_version="1.0.0")
        assert result.streamed

    outcomes = {"old": 0, "new": 0}
    for spec in killed_runs(action, monkeypatch, fresh):
        finish_interrupted_swap(target)  # what the next command does first
        loaded = read_checkpoint(target)
        keys = sorted(loaded.state_dict)
        if keys == sorted(_model_sd()):
            outcomes["old"] += 1
            want = _model_sd()
        else:
            assert keys == sorted(_renamed()), spec
            outcomes["new"] += 1
            want = _renamed()
        for key, value in want.items():
            torch.testing.assert_close(loaded.state_dict[key], value, rtol=RTOL, atol=ATOL)
    assert outcomes["old"] and outcomes["new"], outcomes
    assert not (originals / STAMP_FILE).exists()


@pytest.mark.parametrize("edit", ["set", "scale", "add", "drop"])
def test_a_function_steps_edit_of_the_optimizer_groups_is_written(tmp_path, edit):
    # the optimizer state followed by name was written back over the step's own edit: a
    # step setting lr = 0.5 on a DCP folder wrote lr 0.01, and cm.load gave 0.01 too
    src = tmp_path / "step-100"
    _save(src, optimizer=True)
    schema = cm.Schema("lm", current="2.0.0")

    @schema.migration("1.0.0", "2.0.0")
    def tune(ckpt: cm.Checkpoint) -> None:
        group = ckpt.optimizer["param_groups"][0]
        if edit == "set":
            group["lr"] = 0.5
        elif edit == "scale":
            group["lr"] = group["lr"] * 0.1
        elif edit == "add":
            group["weight_decay"] = 0.1
        else:
            del group["betas"]
        ckpt.state_dict = {k.replace("blocks.", "layers."): v for k, v in ckpt.state_dict.items()}

    want = {"set": 0.5, "scale": 0.001, "add": 0.01, "drop": 0.01}[edit]
    out = tmp_path / "v2"
    cm.upgrade_file(src, out, schema, from_version="1.0.0")
    for got in (
        read_checkpoint(out).optimizer["param_groups"][0],
        cm.load(src, schema=schema, from_version="1.0.0").optimizer["param_groups"][0],
    ):
        assert got["lr"] == pytest.approx(want)
        assert ("weight_decay" in got) == (edit == "add") and ("betas" in got) == (edit != "drop")
        assert sorted(got["params"]) == sorted(k.replace("blocks.", "layers.") for k in _model_sd())
