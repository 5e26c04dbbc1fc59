"""The rewrite pipeline: a checkpoint is read once, planned once, run once, written by the
writer of its format, and every way in (upgrade to a file, in place, stamp) says what it did
with one result type."""

from __future__ import annotations

import importlib
import os
import stat
from pathlib import Path

import pytest
import torch
from net_files import net_schema, net_state_dict, torch_io_forbidden

import ckptmigrate as cm
from ckptmigrate import cli
from ckptmigrate.engine.inplace import migrate_file

upgrade_module = importlib.import_module("ckptmigrate.engine.upgrade")  # cm.upgrade is the function


@pytest.fixture()
def old_file(tmp_path: Path) -> Path:
    src = tmp_path / "old.pth"
    cm.save(src, net_state_dict(), schema="net", version="1.0.0", hparams={"d": 4})
    return src


def _raw_file(tmp_path: Path) -> Path:
    src = tmp_path / "raw.pth"
    torch.save(net_state_dict(), src)
    return src


def test_an_in_place_rename_upgrade_loads_no_tensor_and_copies_the_bytes(old_file):
    with torch_io_forbidden():
        done = migrate_file(old_file, None, schemas=net_schema())
    assert done.streamed and done.bytes_through_python == 0
    assert done.backup == str(old_file.with_name("old.pth.1.0.0.bak"))
    new = cm.load(old_file, upgrade=False)
    assert "layers.0.weight" in new.state_dict and str(new.version) == "2.0.0"


def test_a_step_runs_once_per_upgrade_to_a_file_and_in_place(old_file, tmp_path, monkeypatch):
    ran: list[str] = []
    real = upgrade_module.apply_step

    def counting(ckpt, planned, *args, **kwargs):
        ran.append(planned.name)
        return real(ckpt, planned, *args, **kwargs)

    monkeypatch.setattr(upgrade_module, "apply_step", counting)
    migrate_file(old_file, tmp_path / "out.pth", schemas=net_schema())
    assert len(ran) == 1
    migrate_file(old_file, None, schemas=net_schema())
    assert len(ran) == 2


def test_every_way_in_returns_the_one_result_type(old_file, tmp_path):
    to_file = cm.upgrade_file(old_file, tmp_path / "new.pth", net_schema())
    raw = _raw_file(tmp_path)
    stamped = cm.stamp_in_place(raw, "net", "1.0.0")
    in_place = cm.upgrade_in_place(raw, net_schema())
    assert all(isinstance(r, cm.Rewrite) for r in (to_file, stamped, in_place))
    assert cm.FileUpgrade is cm.Rewrite
    assert (to_file.source_version, to_file.target_version) == ("1.0.0", "2.0.0")
    assert to_file.steps == [p["step"] for p in to_file.plan] and len(to_file.plan) == 1
    assert (stamped.source_version, stamped.target_version, stamped.plan) == (None, "1.0.0", [])
    assert stamped.written == str(raw) and stamped.backup is None
    assert in_place.backup == str(raw.with_name("raw.pth.1.0.0.bak"))


def test_stamping_a_zip_file_copies_its_bytes_and_loads_no_tensor(tmp_path):
    raw = _raw_file(tmp_path)
    with torch_io_forbidden():
        done = cm.stamp_in_place(raw, "net", "1.0.0")
    assert done.streamed and done.bytes_through_python == 0
    got = cm.load(raw, upgrade=False)
    assert (got.schema, str(got.version)) == ("net", "1.0.0")
    assert torch.equal(got.state_dict["head.t"], net_state_dict()["head.t"])


def test_a_stamp_to_another_file_keeps_a_private_files_permissions(tmp_path):
    raw = _raw_file(tmp_path)
    raw.chmod(0o600)
    out = tmp_path / "stamped.pth"
    assert (
        cli.main(["stamp", str(raw), "--schema", "net", "--version", "1.0.0", "-o", str(out)]) == 0
    )
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_a_copied_backup_keeps_a_private_files_permissions(old_file, monkeypatch):
    old_file.chmod(0o600)

    def no_links(*args: object, **kwargs: object) -> None:
        raise OSError("no hard links on this file system")

    monkeypatch.setattr(os, "link", no_links)
    done = cm.upgrade_in_place(old_file, net_schema())
    assert stat.S_IMODE(Path(done.backup).stat().st_mode) == 0o600


def test_upgrade_file_upgrades_the_mounts_of_its_schema(tmp_path):
    src = tmp_path / "lit.ckpt"
    cm.save(
        src,
        {"net." + k: v for k, v in net_state_dict().items()},
        schema="net",
        version="1.0.0",
        prefix="net.",
    )
    done = cm.upgrade_file(src, tmp_path / "new.ckpt", net_schema())
    assert [(m.prefix, m.source_version, m.target_version) for m in done.mounts] == [
        ("net.", "1.0.0", "2.0.0")
    ]
    new = cm.load(tmp_path / "new.ckpt", upgrade=False)
    assert "net.layers.0.weight" in new.state_dict and str(new.mounts[0].version) == "2.0.0"
