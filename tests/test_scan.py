"""scan: a tree of checkpoints, each with its schema, version and the steps it is behind."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

import ckptmigrate as cm
from ckptmigrate.inspection.scan import scan


def _schema() -> cm.Schema:
    schema = cm.Schema("net", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("a.", "b.")])
    return schema


def test_scan_reports_version_behind_and_planned_steps_per_file(tmp_path):
    (tmp_path / "runs" / "old").mkdir(parents=True)
    cm.save(tmp_path / "runs/old/m.pth", {"a.w": torch.zeros(2)}, schema="net", version="1.0.0")
    cm.save(tmp_path / "runs/new.safetensors", {"b.w": torch.zeros(2)}, schema=_schema())
    torch.save({"w": torch.zeros(1)}, tmp_path / "runs/raw.pt")
    (tmp_path / "runs/notes.txt").write_text("not a checkpoint")
    (tmp_path / "runs/broken.pth").write_bytes(b"garbage")
    rows = {r.path.split("runs/")[1]: r for r in scan(tmp_path, [_schema()], workers=4)}
    assert sorted(rows) == ["broken.pth", "new.safetensors", "old/m.pth", "raw.pt"]
    old = rows["old/m.pth"]
    assert (old.schema, old.version, old.current, old.behind) == ("net", "1.0.0", "2.0.0", True)
    assert old.steps == ["rename prefix 'a.' -> 'b.'"] and old.tensors == 1 and old.nbytes == 8
    assert rows["new.safetensors"].behind is False
    assert rows["raw.pt"].behind is None and "stamp" in rows["raw.pt"].error
    assert rows["broken.pth"].error and rows["broken.pth"].format is None


def test_worker_processes_give_the_rows_threads_give(tmp_path):
    for i in range(12):
        version = "1.0.0" if i % 3 else "2.0.0"
        path = tmp_path / f"t{i % 2}" / f"{i}.pth"
        path.parent.mkdir(exist_ok=True)
        cm.save(path, {"a.w": torch.zeros(i + 1)}, schema="net", version=version)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    torch.save({"w": torch.zeros(1)}, tmp_path / "raw.pt")
    seen = []
    by_processes = scan(
        tmp_path, [_schema()], workers=2, processes=True, progress=lambda *a: seen.append(a)
    )
    by_threads = scan(tmp_path, [_schema()], workers=2)
    assert [r.to_dict() for r in by_processes] == [r.to_dict() for r in by_threads]
    assert len(by_processes) == 14 and seen[-1] == (14, 14)
    assert sum(1 for r in by_processes if r.behind) == 8


def test_sharded_set_counts_as_one_checkpoint(tmp_path):
    save_file({"a.w": torch.zeros(3)}, str(tmp_path / "model-1.safetensors"))
    save_file({"a.v": torch.zeros(3)}, str(tmp_path / "model-2.safetensors"))
    stamp = {"schema": "net", "version": "1.0.0"}
    index = {
        "metadata": {"ckptmigrate.stamp": stamp},
        "weight_map": {"a.w": "model-1.safetensors", "a.v": "model-2.safetensors"},
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    rows = scan(tmp_path, {"net": _schema()})
    assert len(rows) == 1 and rows[0].format == "sharded" and rows[0].behind is True
    assert rows[0].tensors == 2


def test_progress_is_reported_for_every_file(tmp_path):
    for i in range(5):
        cm.save(tmp_path / f"{i}.pth", {"a.w": torch.zeros(1)}, schema="net", version="1.0.0")
    seen = []
    scan(tmp_path, [_schema()], progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (5, 5) and len(seen) == 5


def test_cli_scan_json_and_fail_behind_exit_codes(tmp_path):
    import subprocess
    import sys

    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "net.py").write_text(
        "import ckptmigrate as cm\n"
        "schema = cm.Schema('net', current='2.0.0')\n"
        "schema.add_migration('1.0.0', '2.0.0', [cm.ops.RenamePrefix('a.', 'b.')])\n"
    )
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    cm.save(ckpts / "old.pth", {"a.w": torch.zeros(1)}, schema="net", version="1.0.0")
    base = [
        sys.executable,
        "-m",
        "ckptmigrate",
        "scan",
        str(ckpts),
        "--migrations",
        str(migrations),
    ]
    out = subprocess.run([*base, "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert row["behind"] is True and row["current"] == "2.0.0"
    assert subprocess.run([*base, "--fail-behind"], capture_output=True).returncode == 1


def test_cli_scan_of_many_files_reads_them_in_processes_or_threads_alike(tmp_path, capsys):
    from ckptmigrate import cli

    for i in range(64):
        cm.save(tmp_path / f"{i:02d}.pth", {"a.w": torch.zeros(1)}, schema="net", version="1.0.0")
    outputs = []
    for extra in ([], ["--threads"]):
        assert cli.main(["scan", str(tmp_path), "--json", *extra]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] and len(outputs[0]) == 64
    assert outputs[0][0]["version"] == "1.0.0"
