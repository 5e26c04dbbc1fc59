"""Every command works per mount: ``diff --upgrade``, ``diff --model``, ``scan`` and ``check``
(and the pytest plugin) upgrade or judge each mount of a file with its own schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mount_files import HEAD_V1, backbone_and_head, two_mounts
from processes import run

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
    backbone, _ = backbone_and_head()
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
    backbone, head = backbone_and_head()
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
    assert "A upgraded first: backbone at 'backbone.' 1.0.0 -> 2.0.0 (1 step)" in proc.stdout
    assert "A upgraded first: head at 'head.' 1.0.0 -> 1.1.0 (1 step)" in proc.stdout
    assert torch.equal(both.state_dict["head.w"], HEAD_V1["w"].T)


def _registry(two: Path) -> Path:
    """``reg/``: the two-mount file behind on both mounts, a copy with only the backbone
    current, and a root-stamped file that is current."""
    backbone, _ = backbone_and_head()
    reg = two / "reg"
    reg.mkdir()
    (two / "two.pth").rename(reg / "a_two.pth")
    cm.save(reg / "b_half.pth", cm.load(reg / "a_two.pth", schema=backbone))
    cm.save(reg / "c_root.pth", {"w": torch.ones(2)}, schema="head", version="1.1.0")
    return reg


def test_scan_gives_one_row_per_mount_and_fail_behind_counts_any_mount(two: Path) -> None:
    reg = _registry(two)
    proc = run(two, "scan", "reg", "--json", "--fail-behind", "--migrations", "mig")
    assert proc.returncode == 1, proc.stderr
    rows = [
        (Path(r["path"]).name, r["prefix"], r["schema"], r["version"], r["behind"])
        for r in json.loads(proc.stdout)
    ]
    assert rows == [
        ("a_two.pth", "backbone.", "backbone", "1.0.0", True),
        ("a_two.pth", "head.", "head", "1.0.0", True),
        ("b_half.pth", "backbone.", "backbone", "2.0.0", False),
        ("b_half.pth", "head.", "head", "1.0.0", True),
        ("c_root.pth", "", "head", "1.1.0", False),
    ]
    by_mount = {(Path(r["path"]).name, r["prefix"]): r for r in json.loads(proc.stdout)}
    assert by_mount[("a_two.pth", "backbone.")]["tensors"] == 1
    assert by_mount[("a_two.pth", "head.")]["nbytes"] == 6 * 4

    plain = run(two, "scan", "reg", "--migrations", "mig")
    assert plain.returncode == 0, plain.stderr
    assert "a_two.pth [head.]  head 1.0.0 -> 1.1.0: behind, 1 step(s)" in plain.stdout
    assert "b_half.pth [backbone.]  backbone 2.0.0: current" in plain.stdout
    assert "3 checkpoint(s), 5 mount(s), 3 behind" in plain.stdout

    # only the half-current file's head is behind: still a failing gate
    for name in ("a_two.pth", "c_root.pth"):
        (reg / name).unlink()
    gate = run(two, "scan", "reg", "--fail-behind", "--migrations", "mig")
    assert gate.returncode == 1 and "1 behind" in gate.stdout


def test_scan_rows_per_mount_are_coloured_on_a_terminal(two: Path) -> None:
    from processes import run_on_terminal

    _registry(two)
    code, text = run_on_terminal(two, "scan", "reg", "--migrations", "mig")
    assert code == 0
    assert "a_two.pth [head.]  head 1.0.0 -> 1.1.0: \x1b[33mbehind\x1b[0m" in text


def test_scan_worker_processes_give_the_same_rows_per_mount(two: Path) -> None:
    from ckptmigrate.inspection.scan import scan

    reg = _registry(two)
    by_threads = scan(reg, backbone_and_head(), workers=2)
    by_processes = scan(reg, backbone_and_head(), workers=2, processes=True)
    assert [r.to_dict() for r in by_processes] == [r.to_dict() for r in by_threads]
    assert [r.prefix for r in by_processes] == ["backbone.", "head.", "backbone.", "head.", ""]


# -- check and the pytest plugin -----------------------------------------------------------------

NET_MIGRATIONS = """
import torch
from torch import nn

import ckptmigrate as cm


class Net(nn.Module):  # today: encoder renamed enc
    def __init__(self, width):
        super().__init__()
        self.enc = nn.Linear(3, width)
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.enc(x)))


net = cm.Schema("net", current="2.0.0", build=lambda hp: Net(hp["width"]))
net.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("encoder.", "enc.")])
"""


class OldNet(torch.nn.Module):
    """The user's module as it was at net 1.0.0, held by a LightningModule as ``self.net``."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(3, width)
        self.head = torch.nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.encoder(x)))


@pytest.fixture()
def lit_project(tmp_path: Path) -> Path:
    """A Lightning-style fixture (the model at ``net.``, a loss module beside it) stamped with
    the mount ``net`` 1.0.0, its golden record, migrations and a pyproject."""
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "net.py").write_text(NET_MIGRATIONS)
    (tmp_path / "pyproject.toml").write_text(
        '[tool.ckptmigrate]\nmigrations = ["migrations"]\nfixtures = ["fixtures"]\n'
    )
    folder = tmp_path / "fixtures" / "net"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    old = OldNet().eval()
    sd = {f"net.{k}": v for k, v in old.state_dict().items()}
    sd["criterion.pos_weight"] = torch.tensor([2.0])  # the LightningModule's own, not the net's
    raw = {"state_dict": sd, "hyper_parameters": {"width": 4}, "epoch": 3, "global_step": 12}
    torch.save(raw, folder / "1.0.0-lit.ckpt")
    stamp = ["stamp", "fixtures/net/1.0.0-lit.ckpt", "--schema", "net", "--version", "1.0.0"]
    done = run(tmp_path, *stamp, "--prefix", "net.", "--in-place")
    assert done.returncode == 0, done.stderr
    x = torch.randn(5, 3)
    with torch.no_grad():
        golden = {"fixture": "1.0.0-lit.ckpt", "schema": "net", "version": "1.0.0"}
        torch.save(
            {**golden, "variant": "lit", "input": x, "output": old(x)},
            folder / "1.0.0-lit.golden.pt",
        )
    return tmp_path


def test_check_upgrades_each_mount_and_loads_the_models_mount_strictly(lit_project: Path) -> None:
    done = run(lit_project, "check", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = json.loads(done.stdout)["fixtures"]
    assert row["ok"] and row["steps_applied"] == 1 and row["max_abs_error"] == 0.0


def test_check_fails_a_mounted_fixture_whose_output_drifts(lit_project: Path) -> None:
    path = lit_project / "fixtures" / "net" / "1.0.0-lit.ckpt"
    raw = torch.load(path, weights_only=True)
    raw["state_dict"]["net.head.bias"] += 1e-3
    torch.save(raw, path)
    done = run(lit_project, "check")
    assert done.returncode == 1 and "differs from the golden output" in done.stdout


def test_check_upgrades_every_mount_so_an_undiscovered_one_fails(lit_project: Path) -> None:
    path = lit_project / "fixtures" / "net" / "1.0.0-lit.ckpt"
    cm.save(path, cm.load(path), schema="lossmod", version="1.0.0", prefix="criterion.")
    done = run(lit_project, "check")
    assert done.returncode == 1 and "upgrading:" in done.stdout and "'lossmod'" in done.stdout


def test_a_golden_record_names_the_mount_by_prefix(lit_project: Path) -> None:
    golden = lit_project / "fixtures" / "net" / "1.0.0-lit.golden.pt"
    record = torch.load(golden, weights_only=True)
    torch.save({**record, "prefix": "net."}, golden)
    assert run(lit_project, "check").returncode == 0
    torch.save({**record, "prefix": "model."}, golden)
    done = run(lit_project, "check")
    assert done.returncode == 1 and "no mount of 'net' at 'model.'" in done.stdout


def test_the_pytest_plugin_checks_a_mounted_fixture(lit_project: Path) -> None:
    from processes import run_pytest, summary

    (lit_project / "tests").mkdir()
    (lit_project / "tests" / "test_load.py").write_text(
        "def test_loads(ckpt_fixture):\n"
        "    ckpt = ckpt_fixture('fixtures/net/1.0.0-lit.ckpt')\n"
        "    assert [str(m.version) for m in ckpt.mounts] == ['2.0.0']\n"
        "    assert 'net.enc.weight' in ckpt.state_dict and 'criterion.pos_weight' in ckpt.state_dict\n"
    )
    done = run_pytest(lit_project, "fixtures", "tests")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "net-1.0.0-lit PASSED" in done.stdout and "2 passed" in summary(done)
