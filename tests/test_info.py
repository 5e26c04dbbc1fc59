"""The records ``info`` and ``history`` print are library values: Python gets what the CLI shows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckptmigrate import cli
from ckptmigrate.inspection.info import history_record, info_record, schema_list_record
from ckptmigrate.schema.discovery import find_schemas


def _cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> object:
    assert cli.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_record_from_python_is_what_info_json_prints(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mig = str(files / "mig")
    shown = _cli_json(capsys, "info", str(files / "a.pth"), "--keys", "--migrations", mig)
    record = info_record(files / "a.pth", schemas=find_schemas([mig]), keys=True)
    assert record == {**shown, "path": str(files / "a.pth")}
    assert record["status"]["behind"] and len(record["keys"]) == record["tensors"] == 4


def test_info_record_finds_the_schemas_only_when_a_stamp_needs_them(files: Path) -> None:
    def never() -> dict:
        raise AssertionError("an unstamped file needs no migrations")

    record = info_record(files / "raw.pth", schemas=never)
    assert record["schema"] is None and record["status"] is None


def test_migrations_that_fail_to_load_are_one_warning_and_a_status_without_a_verdict(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (files / "broken").mkdir()
    (files / "broken" / "bad.py").write_text("raise RuntimeError('no such model code')\n")
    argv = ["info", str(files / "a.pth"), "--migrations", str(files / "broken")]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith(
        "ckptmigrate: warning: migrations not loaded: "
    ), err
    assert "no such model code" in warnings[0]
    assert "status: schema status unknown: " in out
    status = _cli_json(capsys, *argv)["status"]  # type: ignore[index]
    assert status["registered"] is None and "no such model code" in status["error"]


def test_history_and_schema_list_records_are_what_history_json_prints(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mig = str(files / "mig")
    schemas = find_schemas([mig])
    assert _cli_json(capsys, "history", "toy", "--migrations", mig) == history_record(
        schemas["toy"]
    )
    assert _cli_json(capsys, "history", "--migrations", mig) == schema_list_record(schemas)
    steps = history_record(schemas["toy"])["steps"]
    assert [(s["from"], s["to"]) for s in steps] == [("1.0.0", "2.0.0"), ("2.0.0", "3.0.0")]
