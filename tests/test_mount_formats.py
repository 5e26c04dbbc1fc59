"""A file with mounts is stamped and upgraded by the writer of its format, as a root-stamped
one is: a DCP folder stays a DCP folder, a sharded set a set, rename plans copy bytes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from processes import run
from safetensors.torch import save_file
from set_files import make_set, set_tensors

import ckptmigrate as cm
from ckptmigrate.engine.inplace import migrate_file
from ckptmigrate.formats.detect import detect_format
from ckptmigrate.formats.safetensors_header import read_safetensors_header

MIGRATION = (
    "import ckptmigrate as cm\n"
    "schema = cm.Schema('blk', current='2.0.0')\n"
    "schema.add_migration('1.0.0', '2.0.0', [cm.ops.RenamePrefix('0.', 'first.')])\n"
)


def blk() -> cm.Schema:
    schema = cm.Schema("blk", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("0.", "first.")])
    return schema


def make(tmp_path: Path, kind: str) -> Path:
    """An unstamped checkpoint of ``kind`` holding set_tensors() (``blocks.0.weight``, ...)."""
    tensors = set_tensors()
    if kind == "pth":
        torch.save(tensors, tmp_path / "ckpt.pth")
        return tmp_path / "ckpt.pth"
    if kind == "safetensors":
        save_file(tensors, str(tmp_path / "ckpt.safetensors"))
        return tmp_path / "ckpt.safetensors"
    if kind == "dcp":
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # single process, no process group
            dcp.save({"model": tensors}, checkpoint_id=tmp_path / "ckpt")
        return tmp_path / "ckpt"
    make_set(tmp_path / "ckpt", kind.removeprefix("sharded-"))
    return tmp_path / "ckpt"


KINDS = ["pth", "safetensors", "sharded-safetensors", "sharded-bin", "dcp"]


@pytest.mark.parametrize("kind", KINDS)
def test_stamp_prefix_then_upgrade_keeps_the_format_out_and_in_place(
    tmp_path: Path, kind: str
) -> None:
    src = make(tmp_path, kind)
    fmt = detect_format(src)
    (tmp_path / "mig").mkdir()
    (tmp_path / "mig" / "blk.py").write_text(MIGRATION)
    stamp = ("stamp", src.name, "--schema", "blk", "--version", "1.0.0", "--prefix", "blocks.")
    proc = run(tmp_path, *stamp, "--in-place")
    assert proc.returncode == 0, proc.stderr
    assert detect_format(src) == fmt
    info = run(tmp_path, "info", src.name, "--migrations", "mig")
    assert "mount: 'blocks.' blk 1.0.0" in info.stdout, info.stdout

    out = tmp_path / ("new" + src.suffix)
    proc = run(tmp_path, "upgrade", src.name, "-o", out.name, "--migrations", "mig")
    assert proc.returncode == 0, proc.stderr
    assert detect_format(out) == fmt
    proc = run(tmp_path, "upgrade", src.name, "--in-place", "--migrations", "mig")
    assert proc.returncode == 0, proc.stderr
    assert detect_format(src) == fmt
    assert detect_format(tmp_path / f"{src.name}.blk-1.0.0.bak") == fmt
    before = set_tensors()
    for path in (out, src):
        ckpt = cm.load(path, upgrade=False)
        assert [(m.prefix, str(m.version)) for m in ckpt.mounts] == [("blocks.", "2.0.0")]
        assert ckpt.schema is None
        renamed = {k.replace("blocks.0.", "blocks.first."): v for k, v in before.items()}
        assert sorted(ckpt.state_dict) == sorted(renamed)
        for key, value in renamed.items():
            assert torch.equal(ckpt.state_dict[key], value)
    if kind == "sharded-safetensors":  # each shard's header says the set's stamp, mounts too
        for shard in src.glob("*.safetensors"):
            _, header = read_safetensors_header(shard)
            assert json.loads(header["ckptmigrate.stamp"])["mounts"][0]["version"] == "2.0.0"


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_a_rename_plan_on_a_mounted_file_copies_bytes(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make(tmp_path, kind)
    cm.save(src, cm.load(src, upgrade=False), schema="blk", version="1.0.0", prefix="blocks.")

    def no_save(*args: object, **kwargs: object) -> None:
        raise AssertionError("the mounted file was loaded and re-saved, not streamed")

    monkeypatch.setattr("ckptmigrate.engine.api.save", no_save)
    outcome = migrate_file(src, None, schemas=blk())
    assert outcome.written == str(src)
    assert "blocks.first.weight" in cm.load(src, upgrade=False).state_dict
