"""The CLI speaks CLI: every remedy in an error is a flag a person can type, and the flags the
messages suggest work. Run as real processes on real files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from processes import one_error_line, run
from toy import TOY_MIGRATIONS_WITH_MODEL, toy_sd, write_toy_fixture

import ckptmigrate as cm
from ckptmigrate import cli

#: how the Python API spells remedies; none may reach a person at the command line
PYTHON_SPELLINGS = (
    "from_version=",
    "safe_globals=",
    "param_names=",
    "Schema object",
    "backup=False",
)

SIGNATURES = """
schema.add_signature("1.0.0", {f"blocks.{i}.{p}": torch.zeros(4, 4) if p == "weight"
                               else torch.zeros(4) for i in range(2) for p in ("weight", "bias")})
schema.add_signature("3.0.0", {f"layers.{i}.{p}": torch.zeros(4, 4) if p == "weight"
                               else torch.zeros(4) for i in range(2) for p in ("weight", "bias")})
"""


def cli_error(proc) -> str:
    line = one_error_line(proc)
    for spelling in PYTHON_SPELLINGS:
        assert spelling not in line, line
    return line


def with_namespace(src: Path, dst: Path) -> Path:
    """``src`` with an ``argparse.Namespace`` beside its tensors: refused unless allowed."""
    obj = torch.load(src, weights_only=True)
    obj["args"] = argparse.Namespace(width=4)
    torch.save(obj, dst)
    return dst


# -- remedies name flags -------------------------------------------------------------------------


def test_an_unstamped_file_is_told_to_pass_from_version(files: Path) -> None:
    line = cli_error(run(files, "upgrade", "raw.pth", "-o", "out.pth", "--migrations", "mig"))
    assert "--from-version X.Y.Z" in line and "--from-version auto" in line
    with pytest.raises(cm.UnversionedCheckpointError, match="from_version='X.Y.Z'"):
        cm.load(files / "raw.pth", schema=cm.Schema("toy", current="3.0.0"))  # Python: kwargs


def test_a_version_conflict_names_the_flag_given(files: Path) -> None:
    args = ("upgrade", "a.pth", "-o", "out.pth", "--from-version", "2.0.0", "--migrations", "mig")
    line = cli_error(run(files, *args))
    assert "--from-version 2.0.0 was given" in line and "drop --from-version" in line


def test_an_unknown_schema_is_told_to_pass_migrations(files: Path) -> None:
    args = ("upgrade", "raw.pth", "-o", "o.pth", "--schema", "nope", "--from-version", "1.0.0")
    line = cli_error(run(files, *args, "--migrations", "mig"))
    assert "no schema named 'nope'" in line and "--migrations PATH" in line
    line = cli_error(run(files, "diff", "raw.pth", "--model", "nope", "--migrations", "mig"))
    assert "--migrations PATH" in line


def test_an_unsafe_global_is_told_to_pass_allow_global(files: Path) -> None:
    with_namespace(files / "a.pth", files / "ns.pth")
    line = cli_error(run(files, "info", "ns.pth"))
    assert "--allow-global argparse.Namespace" in line


def test_a_differing_backup_is_told_to_pass_no_backup(files: Path) -> None:
    (files / "a.pth.1.0.0.bak").write_bytes(b"another file")
    line = cli_error(run(files, "upgrade", "a.pth", "--in-place", "--migrations", "mig"))
    assert "--no-backup" in line


def test_to_past_the_current_version_says_so(files: Path) -> None:
    args = ("upgrade", "a.pth", "-o", "out.pth", "--to", "9.0.0", "--migrations", "mig")
    line = cli_error(run(files, *args))
    assert "--to 9.0.0 is newer than 3.0.0, the current version of schema 'toy'" in line
    assert "drop --to" in line and not (files / "out.pth").exists()
    schema = cm.Schema("toy", current="3.0.0")
    with pytest.raises(cm.TargetPastCurrentError, match="to='9.0.0'") as info:
        schema.plan("1.0.0", "9.0.0")
    assert isinstance(info.value, cm.FutureVersionError) and info.value.target.major == 9


@pytest.mark.parametrize(
    ("error", "python", "cli_flag"),
    [
        (cm.errors.UnversionedCheckpointError(path="a.pth"), "from_version=", "--from-version"),
        (cm.errors.UnknownSchemaError("x", []), "Schema object", "--migrations PATH"),
        (cm.UnsafeCheckpointError("os.system"), "safe_globals=", "--allow-global os.system"),
        (cm.VersionConflictError("1.0", "2.0"), "from_version=", "--from-version 2.0"),
        (cm.errors.BackupExistsError("a.bak"), "backup=False", "--no-backup"),
        (cm.errors.AmbiguousVersionError("toy", []), "from_version=", "--from-version"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None,
)
def test_each_error_says_its_remedy_for_python_and_for_the_command_line(
    error: cm.CkptMigrateError, python: str, cli_flag: str
) -> None:
    assert python in str(error) and python not in error.render(cli=True)
    assert cli_flag in error.render(cli=True)


# -- the flags the messages suggest work ----------------------------------------------------------


def test_from_version_auto_upgrades_and_diffs_an_unstamped_file(files: Path) -> None:
    (files / "mig" / "toy.py").write_text(TOY_MIGRATIONS_WITH_MODEL + SIGNATURES)
    proc = run(
        files,
        "upgrade",
        "raw.pth",
        "-o",
        "out.pth",
        "--from-version",
        "auto",
        "--migrations",
        "mig",
    )
    assert proc.returncode == 0, proc.stderr
    out = cm.load(files / "out.pth", upgrade=False)
    assert str(out.version) == "3.0.0" and [h["from"] for h in out.history] == ["1.0.0", "2.0.0"]
    assert torch.equal(out.state_dict["layers.1.weight"], toy_sd()["blocks.1.weight"])
    proc = run(
        files,
        "diff",
        "--upgrade",
        "raw.pth",
        "b.pth",
        "--from-version",
        "auto",
        "--migrations",
        "mig",
    )
    assert proc.returncode == 1, proc.stderr  # only the hparam the old file never had is left
    assert "upgraded first: toy 1.0.0 -> 3.0.0" in proc.stdout and "renamed" not in proc.stdout


def test_from_version_auto_that_cannot_tell_names_the_file_and_the_flag(files: Path) -> None:
    args = ("upgrade", "raw.pth", "-o", "out.pth", "--from-version", "auto", "--migrations", "mig")
    line = cli_error(run(files, *args))
    assert "raw.pth carries no stamp" in line and "--from-version X.Y.Z" in line


def test_scan_and_check_accept_allow_global(files: Path) -> None:
    with_namespace(files / "a.pth", files / "ns.pth")
    (files / "scan").mkdir()
    with_namespace(files / "a.pth", files / "scan" / "ns.pth")
    refused = json.loads(run(files, "scan", "scan", "--json", "--migrations", "mig").stdout)
    assert "refusing to load" in refused[0]["error"] and refused[0]["schema"] is None
    proc = run(
        files,
        "scan",
        "scan",
        "--json",
        "--allow-global",
        "argparse.Namespace",
        "--migrations",
        "mig",
    )
    allowed = json.loads(proc.stdout)
    assert allowed[0]["error"] is None and allowed[0]["behind"] is True

    write_toy_fixture(files)
    fixture = files / "fixtures" / "toy" / "toy_1.0.0.pth"
    with_namespace(fixture, fixture)
    proc = run(files, "check", "fixtures", "--migrations", "mig")
    assert proc.returncode == 1 and "--allow-global argparse.Namespace" in proc.stdout
    proc = run(
        files, "check", "fixtures", "--allow-global", "argparse.Namespace", "--migrations", "mig"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scan_of_a_missing_folder_is_an_error_so_fail_behind_cannot_pass_a_typo(
    files: Path,
) -> None:
    line = cli_error(run(files, "scan", "registyr", "--fail-behind", "--migrations", "mig"))
    assert "no checkpoint folder at registyr" in line
    from ckptmigrate.inspection.scan import scan

    with pytest.raises(cm.PathNotFoundError, match="registyr"):
        scan(files / "registyr")


def test_one_bad_golden_record_fails_its_fixture_and_the_others_still_run(files: Path) -> None:
    write_toy_fixture(files)
    (files / "fixtures" / "toy" / "broken.golden.pt").write_bytes(b"not a pickle")
    proc = run(files, "check", "fixtures", "--json", "--migrations", "mig")
    assert proc.returncode == 1, proc.stderr
    rows = {Path(r["path"]).name: r for r in json.loads(proc.stdout)["fixtures"]}
    assert rows["toy_1.0.0.pth"]["ok"] is True
    assert rows["broken.golden.pt"]["ok"] is False
    assert "unreadable golden record" in rows["broken.golden.pt"]["reason"]
    plain = run(files, "check", "fixtures", "--migrations", "mig").stdout
    assert "broken.golden.pt" in plain and "1 of 2 fixtures ok" in plain


def test_history_without_a_schema_lists_the_discovered_schemas(files: Path) -> None:
    (files / "mig" / "other.py").write_text(
        'import ckptmigrate as cm\nschema = cm.Schema("other", current="1.0.0")\n'
    )
    proc = run(files, "history", "--migrations", "mig")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["other", "toy"]
    assert "current 3.0.0" in lines[1] and "2 step(s)" in lines[1]
    listed = json.loads(run(files, "history", "--json", "--migrations", "mig").stdout)
    assert [(s["schema"], s["current"], s["steps"]) for s in listed] == [
        ("other", "1.0.0", 0),
        ("toy", "3.0.0", 2),
    ]


def test_every_option_of_every_command_has_help_text() -> None:
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if not (action.help and action.help.strip())
    ]
    assert missing == []
    assert {"diff", "info", "upgrade", "scan", "history", "check", "stamp", "new"} <= set(
        commands.choices
    )
