"""Schemas mounted at key prefixes: a Lightning checkpoint's ``net.``, a backbone and a head,
each with its own schema, version and history; today's stamp is the mount at ``""``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mount_files import HEAD_V1, backbone_and_head, two_mounts
from processes import run

import ckptmigrate as cm
from ckptmigrate.values.stamp import parse_stamp

NET_MIGRATIONS = """
import ckptmigrate as cm

schema = cm.Schema("net", current="2.0.0")
schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("encoder.", "enc.")])
"""

LIT_MODULE = """
import lightning as L
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, old=False):
        super().__init__()
        layer = nn.Linear(3, 4)
        if old:
            self.encoder = layer
        else:
            self.enc = layer
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head((self.encoder if hasattr(self, "encoder") else self.enc)(x))


class Lit(L.LightningModule):
    def __init__(self, old=False):
        super().__init__()
        self.save_hyperparameters()
        self.net = Net(old)

    def training_step(self, batch, i):
        return self.net(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        torch.manual_seed(0)
        return torch.utils.data.DataLoader(torch.randn(8, 3), batch_size=4)


def trainer(root, steps):
    return L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
    )
"""


@pytest.fixture()
def lit_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pytest.importorskip("lightning")
    (tmp_path / "mig").mkdir()
    (tmp_path / "mig" / "net.py").write_text(NET_MIGRATIONS)
    (tmp_path / "litmod.py").write_text(LIT_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_lightning_checkpoint_stamped_at_net_upgrades_and_lightning_loads_it(
    lit_dir: Path,
) -> None:
    import litmod

    old = litmod.Lit(old=True)
    trainer = litmod.trainer(lit_dir, 2)
    trainer.fit(old)
    trainer.save_checkpoint(lit_dir / "old.ckpt")

    # before the mount: the module's migration matches nothing under net., an error
    stamped_at_root = run(
        lit_dir, "stamp", "old.ckpt", "--schema", "net", "--version", "1.0.0", "-o", "root.ckpt"
    )
    assert stamped_at_root.returncode == 0, stamped_at_root.stderr
    refused = run(lit_dir, "upgrade", "root.ckpt", "-o", "x.ckpt", "--migrations", "mig")
    assert refused.returncode == 2 and "keys start with 'net.'" in refused.stderr
    assert "--prefix net." in refused.stderr and not (lit_dir / "x.ckpt").exists()

    stamp = run(
        lit_dir,
        "stamp",
        "old.ckpt",
        "--schema",
        "net",
        "--version",
        "1.0.0",
        "--prefix",
        "net.",
        "--in-place",
    )
    assert stamp.returncode == 0, stamp.stderr
    assert "at prefix 'net.'" in stamp.stdout
    info = run(lit_dir, "info", "old.ckpt", "--migrations", "mig")
    assert "mount: 'net.' net 1.0.0" in info.stdout and "behind" in info.stdout

    up = run(lit_dir, "upgrade", "old.ckpt", "-o", "new.ckpt", "--migrations", "mig")
    assert up.returncode == 0, up.stderr
    assert "old.ckpt: net at 'net.' 1.0.0 -> 2.0.0, 1 step(s):" in up.stdout

    raw = torch.load(lit_dir / "new.ckpt", weights_only=True)
    assert "pytorch-lightning_version" in raw and "optimizer_states" in raw  # still Lightning
    stamp_raw = parse_stamp(raw["__ckptmigrate__"])
    assert stamp_raw.schema is None and [m.prefix for m in stamp_raw.mounts] == ["net."]
    assert str(stamp_raw.mounts[0].version) == "2.0.0"
    assert stamp_raw.mounts[0].history[0]["to"] == "2.0.0"

    new = litmod.Lit.load_from_checkpoint(lit_dir / "new.ckpt", old=False)  # strict, today
    for name, value in old.net.encoder.state_dict().items():
        assert torch.equal(new.net.enc.state_dict()[name], value)
    # and training resumes from it (optimizer state, loops) with today's module
    litmod.trainer(lit_dir, 4).fit(litmod.Lit(), ckpt_path=lit_dir / "new.ckpt")


def test_two_mounts_upgrade_independently_each_with_its_own_history(tmp_path: Path) -> None:
    path = tmp_path / "two.pth"
    two_mounts(path)
    backbone, head = backbone_and_head()
    one = cm.load(path, schema=backbone)
    assert list(one.state_dict) == ["backbone.enc.weight", "head.w"]
    assert torch.equal(one.state_dict["head.w"], HEAD_V1["w"])  # the head is untouched
    versions = {m.prefix: str(m.version) for m in one.mounts}
    assert versions == {"backbone.": "2.0.0", "head.": "1.0.0"}
    both = cm.upgrade(one, head)
    assert torch.equal(both.state_dict["head.w"], HEAD_V1["w"].T)
    assert {m.prefix: len(m.history) for m in both.mounts} == {"backbone.": 1, "head.": 1}
    assert both.hparams == {"d": 3}
    cm.save(tmp_path / "both.pth", both)
    again = cm.load(tmp_path / "both.pth")
    assert [(m.schema, str(m.version)) for m in again.mounts] == [
        ("backbone", "2.0.0"),
        ("head", "1.1.0"),
    ]
    with pytest.raises(cm.SchemaMismatchError, match="backbone at 'backbone.'"):
        cm.load(path, schema=cm.Schema("other", current="1.0"))


def test_the_cli_upgrades_every_mount_and_prints_a_plan_per_mount(tmp_path: Path) -> None:
    two_mounts(tmp_path / "two.pth")
    (tmp_path / "mig").mkdir()
    (tmp_path / "mig" / "s.py").write_text(
        "import ckptmigrate as cm\n"
        "backbone = cm.Schema('backbone', current='2.0.0')\n"
        "backbone.add_migration('1.0.0', '2.0.0', [cm.ops.RenamePrefix('encoder.', 'enc.')])\n"
        "head = cm.Schema('head', current='1.1.0')\n"
        "head.add_migration('1.0.0', '1.1.0', [cm.ops.Transpose('w')])\n"
    )
    proc = run(tmp_path, "upgrade", "two.pth", "--in-place", "--migrations", "mig")
    assert proc.returncode == 0, proc.stderr
    assert "two.pth: backbone at 'backbone.' 1.0.0 -> 2.0.0, 1 step(s):" in proc.stdout
    assert "two.pth: head at 'head.' 1.0.0 -> 1.1.0, 1 step(s):" in proc.stdout
    out = cm.load(tmp_path / "two.pth")
    assert list(out.state_dict) == ["backbone.enc.weight", "head.w"]
    assert torch.equal(out.state_dict["head.w"], HEAD_V1["w"].T)
    assert any(p.name.endswith(".bak") for p in tmp_path.iterdir())
    again = run(tmp_path, "upgrade", "two.pth", "--in-place", "--migrations", "mig")
    assert again.returncode == 0 and "already at 2.0.0" in again.stdout


BAD_MOUNTS = {
    "no-trailing-dot": [{"prefix": "net", "schema": "n", "version": "1.0"}],
    "overlap": [
        {"prefix": "net.", "schema": "n", "version": "1.0"},
        {"prefix": "net.enc.", "schema": "m", "version": "1.0"},
    ],
    "same-prefix-twice": [
        {"prefix": "a.", "schema": "n", "version": "1.0"},
        {"prefix": "a.", "schema": "m", "version": "1.0"},
    ],
    "bad-version": [{"prefix": "a.", "schema": "n", "version": "one"}],
    "schema-not-a-string": [{"prefix": "a.", "schema": 3, "version": "1.0"}],
    "not-a-list": {"prefix": "a."},
}


@pytest.mark.parametrize("mounts", BAD_MOUNTS.values(), ids=BAD_MOUNTS.keys())
def test_a_malformed_mount_is_a_format_error_on_load(tmp_path: Path, mounts: object) -> None:
    path = tmp_path / "bad.pth"
    stamp = {"format": 2, "mounts": mounts, "written_by": {}}
    torch.save({"state_dict": {"a.w": torch.ones(1)}, "__ckptmigrate__": stamp}, path)
    with pytest.raises(cm.CheckpointFormatError):
        cm.load(path)


def test_a_stamp_with_mounts_has_format_2_so_old_readers_refuse_it(tmp_path: Path) -> None:
    two_mounts(tmp_path / "two.pth")
    raw = torch.load(tmp_path / "two.pth", weights_only=True)["__ckptmigrate__"]
    assert raw["format"] == 2 and "schema" not in raw
    plain = cm.save(tmp_path / "plain.pth", {"w": torch.ones(1)}, schema="s", version="1.0")
    raw_plain = torch.load(tmp_path / "plain.pth", weights_only=True)["__ckptmigrate__"]
    assert raw_plain["format"] == 1 and "mounts" not in raw_plain and plain.mounts == []
    downgraded = dict(raw, format=1)  # mounts under format 1 would fool an old reader
    with pytest.raises(cm.CheckpointFormatError, match="format 2"):
        parse_stamp(downgraded)


def test_mounting_checks_the_prefix_against_the_keys(tmp_path: Path) -> None:
    sd = {"net.w": torch.ones(1)}
    with pytest.raises(cm.MountError, match="keys start with 'net.'"):
        cm.save(tmp_path / "x.pth", sd, schema="s", version="1.0", prefix="model.")
    with pytest.raises(cm.MountError, match="ending with '.'"):
        cm.save(tmp_path / "x.pth", sd, schema="s", version="1.0", prefix="net")
    assert not (tmp_path / "x.pth").exists()
