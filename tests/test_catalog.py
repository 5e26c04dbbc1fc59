"""The catalog of the fleet (issue 17 item 3): ``scan ROOT --catalog DB`` records every
checkpoint in SQLite or a real PostgreSQL server on loopback, a rescan reads only what changed,
and ``ckptmigrate catalog`` answers which are behind and which is best by a metric."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
import torch
from toy import TOY_MIGRATIONS, toy_sd

import ckptmigrate as cm
from ckptmigrate.cli import main
from ckptmigrate.inspection import catalog as catalog_module
from ckptmigrate.inspection import scan as scan_module
from ckptmigrate.schema.registry import find_schemas


@pytest.fixture
def fleet(tmp_path) -> dict:
    """A registry: toy checkpoints at 1.0.0 and 3.0.0 with metrics, an unstamped file, and
    the migrations that say toy's current version is 3.0.0."""
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "toy.py").write_text(TOY_MIGRATIONS)
    root = tmp_path / "registry"
    (root / "runs" / "a").mkdir(parents=True)
    (root / "runs" / "b").mkdir(parents=True)
    files = {
        "old": root / "runs" / "a" / "epoch1.pth",
        "good": root / "runs" / "b" / "epoch5.pth",
        "best": root / "runs" / "b" / "epoch9.pth",
    }
    cm.save(files["old"], toy_sd(), schema="toy", version="1.0.0", meta={"val_loss": 0.9})
    for name, loss in (("good", 0.4), ("best", 0.2)):
        cm.save(
            files[name],
            toy_sd("layers"),
            schema="toy",
            version="3.0.0",
            hparams={"width": 4},
            meta={"val_loss": loss, "metrics": {"acc": 1 - loss}},
        )
    torch.save(toy_sd(), root / "raw.pt")
    return {"root": root, "migrations": str(migrations), **files}


def scan_to(db: str, fleet: dict, capsys) -> str:
    code = main(["scan", str(fleet["root"]), "--catalog", db, "--migrations", fleet["migrations"]])
    assert code == 0
    return capsys.readouterr().err


def catalog_json(db: str, fleet: dict, capsys, *flags: str) -> list[dict]:
    assert main(["catalog", db, "--json", "--migrations", fleet["migrations"], *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_scan_records_every_checkpoint_with_its_stamp_hparams_and_meta(db, fleet, capsys):
    assert "4 read, 0 unchanged (not read), 0 removed" in scan_to(db, fleet, capsys)
    rows = {Path(r["path"]).name: r for r in catalog_json(db, fleet, capsys)}
    assert sorted(rows) == ["epoch1.pth", "epoch5.pth", "epoch9.pth", "raw.pt"]
    old = rows["epoch1.pth"]
    assert (old["schema"], old["version"], old["current"], old["behind"]) == (
        "toy",
        "1.0.0",
        "3.0.0",
        True,
    )
    assert len(old["steps"]) == 2 and old["meta"] == {"val_loss": 0.9} and old["tensors"] == 4
    best = rows["epoch9.pth"]
    assert best["behind"] is False and best["hparams"] == {"width": 4}
    assert best["meta"]["metrics"]["acc"] == pytest.approx(0.8)
    assert rows["raw.pt"]["error"] == "no ckptmigrate stamp"


def test_a_rescan_with_nothing_changed_reads_no_file(db, fleet, capsys, monkeypatch):
    scan_to(db, fleet, capsys)
    opened: list[str] = []
    real = scan_module.read_rows
    monkeypatch.setattr(scan_module, "read_rows", lambda p, **kw: opened.append(p) or real(p, **kw))
    assert "0 read, 4 unchanged (not read), 0 removed" in scan_to(db, fleet, capsys)
    assert opened == []


def test_a_rescan_trusts_size_and_mtime_and_rereads_what_changed(db, fleet, capsys):
    scan_to(db, fleet, capsys)
    old = fleet["old"]
    st = old.stat()
    cm.save(old, toy_sd(), schema="toy", version="2.0.0", meta={"val_loss": 0.9})
    assert old.stat().st_size == st.st_size  # same size: only the stamp's version changed
    os.utime(old, ns=(st.st_atime_ns, st.st_mtime_ns))
    scan_to(db, fleet, capsys)  # same size and mtime: the recorded rows stand, unread
    assert [r["version"] for r in catalog_json(db, fleet, capsys, "--behind")] == ["1.0.0"]
    os.utime(old)  # touched: read again
    assert "1 read, 3 unchanged (not read), 0 removed" in scan_to(db, fleet, capsys)
    [row] = catalog_json(db, fleet, capsys, "--behind")
    assert row["version"] == "2.0.0" and len(row["steps"]) == 1


def test_new_and_vanished_checkpoints_are_added_and_removed(db, fleet, capsys):
    scan_to(db, fleet, capsys)
    fleet["good"].unlink()
    cm.save(fleet["root"] / "new.safetensors", toy_sd("layers"), schema="toy", version="3.0.0")
    assert "1 read, 3 unchanged (not read), 1 removed" in scan_to(db, fleet, capsys)
    names = sorted(Path(r["path"]).name for r in catalog_json(db, fleet, capsys))
    assert names == ["epoch1.pth", "epoch9.pth", "new.safetensors", "raw.pt"]


def test_queries_by_schema_version_state_and_best_metric(db, fleet, capsys):
    scan_to(db, fleet, capsys)
    name = lambda rows: [Path(r["path"]).name for r in rows]  # noqa: E731
    assert name(catalog_json(db, fleet, capsys, "--current")) == ["epoch5.pth", "epoch9.pth"]
    assert name(catalog_json(db, fleet, capsys, "--schema", "toy", "--version", "1.0")) == [
        "epoch1.pth"
    ]
    assert name(catalog_json(db, fleet, capsys, "--best", "val_loss")) == ["epoch9.pth"]
    assert name(catalog_json(db, fleet, capsys, "--best", "val_loss", "--max")) == ["epoch1.pth"]
    assert name(catalog_json(db, fleet, capsys, "--best", "metrics.acc", "--max")) == ["epoch9.pth"]
    assert catalog_json(db, fleet, capsys, "--best", "no_such_metric") == []
    assert main(["catalog", db, "--current", "--migrations", fleet["migrations"]]) == 0
    out = capsys.readouterr().out
    assert "epoch9.pth  toy 3.0.0: current" in out and "2 checkpoint(s)" in out


def test_a_query_judges_against_todays_migrations_without_a_rescan(db, fleet, capsys, tmp_path):
    scan_to(db, fleet, capsys)
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "toy.py").write_text(
        TOY_MIGRATIONS.replace('current="3.0.0"', 'current="4.0.0"')
        + '\nschema.add_migration("3.0.0", "4.0.0", [cm.ops.SetHparam("depth", 2)])\n'
    )
    assert main(["catalog", db, "--behind", "--json", "--migrations", str(newer)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["version"] for r in rows) == ["1.0.0", "3.0.0", "3.0.0"]
    assert {r["current"] for r in rows} == {"4.0.0"}


def test_a_scan_that_fails_part_way_leaves_the_catalog_as_it_was(db, fleet, capsys, monkeypatch):
    scan_to(db, fleet, capsys)
    before = catalog_json(db, fleet, capsys)
    fleet["good"].unlink()
    os.utime(fleet["old"])
    real, calls = catalog_module._mount_values, []

    def fail_late(raw, row):
        calls.append(raw.path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the rows are written
        return real(raw, row)

    monkeypatch.setattr(catalog_module, "_mount_values", fail_late)
    with pytest.raises(KeyboardInterrupt):
        with catalog_module.open_catalog(db) as catalog:
            catalog_module.scan_into(catalog, fleet["root"], find_schemas([fleet["migrations"]]))
    monkeypatch.undo()
    assert catalog_json(db, fleet, capsys) == before


def test_a_file_that_is_not_a_catalog_is_a_clear_error(tmp_path, fleet, capsys):
    bogus = tmp_path / "notes.sqlite"
    bogus.write_text("not a database, just notes\n" * 100)
    assert main(["catalog", str(bogus), "--migrations", fleet["migrations"]]) == 2
    err = capsys.readouterr().err
    assert f"catalog {bogus}:" in err and "Traceback" not in err and "internal" not in err
    assert bogus.read_text().startswith("not a database")  # left as it was
    assert main(["catalog", str(tmp_path), "--migrations", fleet["migrations"]]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_a_catalog_of_another_format_is_refused(tmp_path, fleet, capsys):
    db = tmp_path / "future.sqlite"
    with catalog_module.open_catalog(db):
        pass
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE ckptmigrate_catalog SET value = '99' WHERE key = 'format'")
    assert main(["catalog", str(db), "--migrations", fleet["migrations"]]) == 2
    assert "catalog format '99'" in capsys.readouterr().err


def test_a_postgres_url_s_password_never_reaches_a_message(postgres_url, fleet, capsys):
    host = postgres_url.removeprefix("postgresql://ckpt@").split("/")[0]
    url = f"postgresql://nobody:pw-s3cr3t@{host}/no_such_db"
    assert main(["catalog", url, "--migrations", fleet["migrations"]]) == 2
    err = capsys.readouterr().err
    assert "pw-s3cr3t" not in err and f"catalog postgresql://{host}/no_such_db" in err


def test_version_without_schema_and_min_without_best_are_usage_errors(tmp_path, fleet, capsys):
    db = str(tmp_path / "c.sqlite")
    assert main(["catalog", db, "--version", "1.0.0", "--migrations", fleet["migrations"]]) == 2
    assert "--version needs --schema" in capsys.readouterr().err
    assert main(["catalog", db, "--min", "--migrations", fleet["migrations"]]) == 2
    assert "pass --best too" in capsys.readouterr().err


def test_a_file_that_cannot_be_stat_ed_is_recorded_with_its_error_and_read_again(db, fleet, capsys):
    (fleet["root"] / "gone.pth").symlink_to(fleet["root"] / "no-such-target.pth")
    assert "5 read, 0 unchanged (not read), 0 removed" in scan_to(db, fleet, capsys)
    [row] = [r for r in catalog_json(db, fleet, capsys) if r["path"].endswith("gone.pth")]
    assert "no such file" in row["error"]
    assert "1 read, 4 unchanged (not read), 0 removed" in scan_to(db, fleet, capsys)
