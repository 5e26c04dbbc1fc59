"""Every command works per mount: ``diff --upgrade``, ``diff --model``, ``scan`` and ``check``
(and the pytest plugin) upgrade or judge each mount of a file with its own schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import run
from test_mounts import HEAD_V1, schemas, two_mounts

import ckptmigrate as cm

SCHEMAS = """
import ckptmigrate as cm
backbone = cm.Schema('backbone', current='2.0.0')
backbone.add_migration('1.0.0', '2.0.0', [cm.ops.RenamePrefix('encoder.', 'enc.')])
head = cm.Schema('head', current='1.1.0')
head.add_migration('1.0.0', '1.1.0', [cm.ops.Transpose('w')])
"""


@pytest.fixture()
def two(tmp_path: Path) -> Path:
    """``two.pth`` (backbone 1.0.0 at ``backbone.``, head 1.0.0 at ``head.``) and ``mig/``."""
    two_mounts(tmp_path / "two.pth")
    (tmp_path / "mig").mkdir()
    (tmp_path / "mig" / "s.py").write_text(SCHEMAS)
    return tmp_path


def _diff(folder: Path, *args: str) -> tuple[int, dict]:
    proc = run(folder, "diff", *args, "--json", "--migrations", "mig")
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_diff_upgrade_takes_each_mount_to_bs_mount_at_the_same_prefix(two: Path) -> None:
    backbone, _ = schemas()
    cm.save(two / "b.pth", cm.load(two / "two.pth", schema=backbone))  # head still 1.0.0
    code, d = _diff(two, "two.pth", "b.pth", "--upgrade", "--values")
    assert code == 0 and not d["has_drift"], d
    mounts = {
        m["prefix"]: (m["schema"], m["from"], m["to"], len(m["steps"]))
        for m in d["upgrade"]["mounts"]
    }
    assert mounts == {
        "backbone.": ("backbone", "1.0.0", "2.0.0", 1),
        "head.": ("head", "1.0.0", "1.0.0", 0),
    }
    assert [s["step"] for s in d["upgrade"]["steps"]] == [
        d["upgrade"]["mounts"][0]["steps"][0]["step"]
    ]
    assert d["stamps"]["a"]["mounts"] == d["stamps"]["b"]["mounts"]


def test_diff_upgrade_takes_each_mount_to_its_current_when_b_has_no_stamp(two: Path) -> None:
    backbone, head = schemas()
    both = cm.upgrade(cm.load(two / "two.pth", schema=backbone), head)
    torch.save({"state_dict": both.state_dict, "hyper_parameters": both.hparams}, two / "plain.pth")
    code, d = _diff(two, "two.pth", "plain.pth", "--upgrade", "--values")
    assert code == 0 and not d["has_drift"], d
    assert [(m["prefix"], m["to"]) for m in d["upgrade"]["mounts"]] == [
        ("backbone.", "2.0.0"),
        ("head.", "1.1.0"),
    ]
    # the head's transpose ran: without the upgrade its values differ
    code, d = _diff(two, "two.pth", "plain.pth", "--values")
    assert code == 1 and d["renamed"] and d["shape_changed"][0]["key"] == "head.w"
    proc = run(two, "diff", "two.pth", "plain.pth", "--upgrade", "--migrations", "mig")
    assert proc.returncode == 0, proc.stderr
    assert "A upgraded first: backbone at 'backbone.' 1.0.0 -> 2.0.0 (1 steps)" in proc.stdout
    assert "A upgraded first: head at 'head.' 1.0.0 -> 1.1.0 (1 steps)" in proc.stdout
    assert torch.equal(both.state_dict["head.w"], HEAD_V1["w"].T)
