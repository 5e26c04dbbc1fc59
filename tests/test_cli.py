"""The ``ckptmigrate`` command line, run as a real process on real files (and in-process where
only the flags differ, to keep the suite fast)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from processes import one_error_line, run
from toy import toy_sd, write_toy_fixture

import ckptmigrate as cm
from ckptmigrate import cli

# -- diff ----------------------------------------------------------------------------------------


def test_diff_exits_0_without_drift_1_with_drift_2_on_trouble(files: Path) -> None:
    same = run(files, "diff", "a.pth", "a.pth")
    assert same.returncode == 0 and "no drift" in same.stdout
    drift = run(files, "diff", "a.pth", "b.pth")
    assert drift.returncode == 1
    assert "blocks.0.weight -> layers.0.weight" in drift.stdout
    assert "\x1b[" not in drift.stdout  # piped: plain text, no colour codes
    assert "hparam" in drift.stdout and "width" in drift.stdout

    (files / "junk.pth").write_bytes(b"this is not a checkpoint at all")
    (files / "folder").mkdir()
    assert "no such file" in one_error_line(run(files, "diff", "a.pth", "missing.pth"))
    assert "unknown format" in one_error_line(run(files, "diff", "junk.pth", "a.pth"))
    assert "directory" in one_error_line(run(files, "diff", "a.pth", "folder"))
    assert "unrecognized arguments" in one_error_line(run(files, "diff", "a.pth", "b", "c"))


def test_diff_json_has_the_documented_fields(files: Path) -> None:
    proc = run(files, "diff", "--json", "a.pth", "b.pth")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    for key in ("added", "removed", "renamed", "shape_changed", "dtype_changed", "hparams"):
        assert isinstance(out[key], list)
    assert out["has_drift"] is True and out["values"] is None and out["upgrade"] is None
    assert {(r["from"], r["to"]) for r in out["renamed"]} == {
        (k, k.replace("blocks", "layers")) for k in toy_sd()
    }
    assert all({"confidence", "reason", "shape", "dtype"} <= set(r) for r in out["renamed"])
    assert out["added"] == [] and out["removed"] == []
    assert out["hparams"] == [{"path": "width", "a": None, "b": 4, "change": "added"}]
    assert out["stamps"] == {
        "a": {"schema": "toy", "version": "1.0.0"},
        "b": {"schema": "toy", "version": "3.0.0"},
    }


def test_diff_values_and_upgrade_show_what_the_migrations_still_miss(files: Path) -> None:
    nudged = toy_sd("layers")
    nudged["layers.1.bias"] = nudged["layers.1.bias"] + 0.5
    nudged["layers.2.weight"] = torch.zeros(4, 4)
    cm.save(files / "c.safetensors", nudged, schema="toy", version="3.0.0", hparams={"width": 4})
    proc = run(
        files, "diff", "--upgrade", "--values", "--json", "a.pth", "c.safetensors",
        "--migrations", "mig",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert out["upgrade"]["from"] == "1.0.0" and out["upgrade"]["to"] == "3.0.0"
    assert [s["breaking"] for s in out["upgrade"]["steps"]] == [False, True]
    assert out["renamed"] == [] and out["removed"] == []
    assert out["added"] == [{"key": "layers.2.weight", "shape": [4, 4], "dtype": "float32"}]
    bad = [v for v in out["values"] if not v["equal"]]
    assert [v["key"] for v in bad] == ["layers.1.bias"]
    assert bad[0]["max_abs_diff"] == pytest.approx(0.5)
    assert out["hparams"] == [{"path": "layers", "a": 2, "b": None, "change": "removed"}]


def test_diff_upgrade_flags_in_process(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mig = ["--migrations", str(files / "mig")]
    a, b, raw = (str(files / name) for name in ("a.pth", "b.pth", "raw.pth"))
    assert cli.main(["diff", "--upgrade", a, b, *mig]) == 0
    assert "upgraded first" in capsys.readouterr().out
    assert cli.main(["diff", "--upgrade", raw, b, *mig]) == 2
    assert "carries no ckptmigrate stamp" in capsys.readouterr().err
    # the unstamped file upgrades cleanly; only the hparam it never had is left
    assert cli.main(["diff", "--upgrade", raw, b, "--from-version", "1.0.0", *mig]) == 1
    assert "drift: 1 hparams changed" in capsys.readouterr().out


def test_rich_rendering_groups_keys_by_module_with_counts(files: Path) -> None:
    from rich.console import Console

    console = Console(record=True, width=120, force_terminal=True)
    cli.render_diff_rich(cm.diff(files / "a.pth", files / "b.pth"), console)
    text = console.export_text()
    assert "blocks" in text and "4 changes" in text and "→" in text  # module group, count
    assert "(hparams)" in text


MALICIOUS = b"cos\nsystem\n(S'touch canary'\ntR."


def evil_checkpoint(path: Path) -> None:
    """A torch zip file whose data.pkl would run ``touch canary`` if unpickled."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(1)}, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):
                data = MALICIOUS
            dst.writestr(item, data)


def test_a_malicious_pickle_is_refused_and_nothing_from_it_runs(files: Path) -> None:
    evil_checkpoint(files / "evil.pth")
    for args in (("diff", "evil.pth", "a.pth"), ("info", "evil.pth")):
        line = one_error_line(run(files, *args))
        assert "refusing to load" in line and "--allow-global" in line
    assert not (files / "canary").exists()


def test_upgrade_and_stamp_refuse_a_malicious_pickle_too(
    files: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(files)  # where ``touch canary`` would land
    evil_checkpoint(files / "evil.pth")
    assert cli.main(["upgrade", "evil.pth", "-o", "out.pth", "--migrations", "mig"]) == 2
    assert cli.main(["stamp", "evil.pth", "--schema", "toy", "--version", "1", "-o", "o"]) == 2
    assert cli.main(["diff", "--values", "evil.pth", "a.pth"]) == 2
    assert capsys.readouterr().err.count("refusing to load") == 3
    assert not (files / "canary").exists() and not (files / "out.pth").exists()


def test_debug_shows_a_traceback_and_errors_otherwise_stay_one_line(files: Path) -> None:
    proc = run(files, "info", "missing.pth", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "CheckpointFormatError" in proc.stderr


# -- info ----------------------------------------------------------------------------------------


def test_info_reports_stamp_tensors_bytes_dtypes_and_the_plan_when_behind(files: Path) -> None:
    proc = run(files, "info", "--json", "a.pth", "--migrations", "mig")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["format"] == "torch-zip" and info["layout"] == "ckptmigrate"
    assert (info["schema"], info["version"]) == ("toy", "1.0.0")
    assert info["tensors"] == 4 and info["tensor_bytes"] == 2 * (16 + 4) * 4
    assert info["dtypes"] == {"float32": 4} and info["hparams"] == {"layers": 2}
    status = info["status"]
    assert status["registered"] and status["behind"] and status["current"] == "3.0.0"
    assert [(s["from"], s["to"], s["breaking"]) for s in status["plan"]] == [
        ("1.0.0", "2.0.0", False),
        ("2.0.0", "3.0.0", True),
    ]


def test_info_plain_says_up_to_date(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", str(files / "b.pth"), "--migrations", str(files / "mig")]) == 0
    out = capsys.readouterr().out
    assert "up to date" in out and "toy 3.0.0" in out


def test_info_and_help_of_a_file_needing_no_migrations_never_import_torch(files: Path) -> None:
    for args in (("info", "raw.pth"), ("--help",), ("diff", "a.pth", "b.pth")):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "ckptmigrate", *args],
            capture_output=True,
            text=True,
            cwd=files,
        )
        assert proc.returncode in (0, 1), proc.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()}
        assert "torch" not in imported, args
    assert "unstamped" in run(files, "info", "raw.pth").stdout


#: What a metadata diff of two torch files must not import: torch, the writers and loaders,
#: the engine, and the standard modules only other paths need (each costs the start time).
NOT_ON_THE_DIFF_PATH = {
    "torch",
    "ckptmigrate.engine",
    "ckptmigrate.formats.atomic",
    "ckptmigrate.formats.torch.load",
    "ckptmigrate.formats.torch.mapped",
    "ckptmigrate.io.report",
    "datetime",
    "fnmatch",
    "json",
    "pickletools",
    "tempfile",
    "logging",  # the CLI's log handler joins only when something imports it
    "difflib",  # rename matching scores names with base.matching
}


def _imports(args: list[str], cwd: Path) -> tuple[int, set[str]]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *args], capture_output=True, text=True, cwd=cwd
    )
    return proc.returncode, {line.split("|")[-1].strip() for line in proc.stderr.splitlines()}


def test_a_metadata_diff_imports_only_what_it_reads_with(files: Path) -> None:
    code, found = _imports(["-m", "ckptmigrate", "diff", "a.pth", "b.pth"], files)
    assert code == 1, found  # drift: the command ran to its end
    imported = found - _imports(["-c", "pass"], files)[1]  # what the interpreter's start makes
    assert "ckptmigrate.formats.torch.archive" in imported  # the reader ran
    assert not imported & NOT_ON_THE_DIFF_PATH, sorted(imported & NOT_ON_THE_DIFF_PATH)


# -- upgrade -------------------------------------------------------------------------------------


def test_upgrade_to_a_new_file_prints_the_plan_and_writes_a_loadable_file(files: Path) -> None:
    proc = run(files, "upgrade", "a.pth", "-o", "up.pth", "--to", "2.0.0", "--migrations", "mig")
    assert proc.returncode == 0, proc.stderr
    assert "1.0.0 -> 2.0.0" in proc.stdout and "rename prefix" in proc.stdout
    up = cm.load(files / "up.pth", upgrade=False)
    assert str(up.version) == "2.0.0" and set(up.state_dict) == set(toy_sd("layers"))
    assert up.history[-1]["from"] == "1.0.0"


def test_upgrade_flags_in_process(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (files / "a.pth").read_bytes()
    mig = ["--migrations", str(files / "mig")]
    assert cli.main(["upgrade", str(files / "a.pth"), "--in-place", "--dry-run", *mig]) == 0
    out = capsys.readouterr().out
    assert "[breaking]" in out and "dry run: nothing written" in out
    assert (files / "a.pth").read_bytes() == before and not list(files.glob("*.bak"))

    assert cli.main(["upgrade", str(files / "a.pth"), "--in-place", *mig]) == 0
    backup = files / "a.pth.1.0.0.bak"
    assert backup.read_bytes() == before
    assert str(cm.load(files / "a.pth", upgrade=False).version) == "3.0.0"
    assert cli.main(["upgrade", str(files / "a.pth"), "--in-place", *mig]) == 0
    assert "no steps to run" in capsys.readouterr().out

    assert cli.main(["upgrade", str(files / "raw.pth"), "--in-place", "--no-backup", *mig]) == 2
    assert "no ckptmigrate stamp" in capsys.readouterr().err
    args = ["upgrade", str(files / "raw.pth"), "--in-place", "--no-backup", "--from-version"]
    assert cli.main([*args, "1.0.0", *mig]) == 0
    assert not list(files.glob("raw.pth.*.bak"))
    raw = torch.load(files / "raw.pth", weights_only=True)
    assert set(raw) == set(toy_sd("layers"))  # a flat file stays flat, now stamped
    assert str(cm.load(files / "raw.pth", upgrade=False).version) == "3.0.0"

    assert cli.main(["upgrade", str(files / "b.pth"), *mig]) == 2
    assert "exactly one of -o DST or --in-place" in capsys.readouterr().err
    assert cli.main(["upgrade", str(files / "b.pth"), "-o", "x.pth", "--to", "9.0", *mig]) == 2
    assert "newer than" in capsys.readouterr().err


# -- history, stamp, check -----------------------------------------------------------------------


def test_history_lists_steps_oldest_first_with_marks(files: Path) -> None:
    proc = run(files, "history", "toy", "--migrations", "mig")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "current 3.0.0" in lines[0]
    assert "1.0.0 -> 2.0.0" in lines[1] and "reversible" in lines[1]
    assert "2.0.0 -> 3.0.0" in lines[2] and "breaking" in lines[2]


def test_history_json_in_process(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["history", "toy", "--json", "--migrations", str(files / "mig")]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["versions"] == ["1.0.0", "2.0.0", "3.0.0"]
    assert cli.main(["history", "nope", "--migrations", str(files / "mig")]) == 2
    assert "no schema named 'nope'" in capsys.readouterr().err
    assert [s["reversible"] for s in record["steps"]] == [True, False]


def test_stamp_keeps_the_layout_and_refuses_a_stamped_file(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proc = run(files, "stamp", "raw.pth", "--schema", "toy", "--version", "1.0.0", "-o", "s.pth")
    assert proc.returncode == 0, proc.stderr
    flat = torch.load(files / "s.pth", weights_only=True)
    assert set(flat) == set(toy_sd())  # still a flat state_dict
    assert flat._metadata[""]["__ckptmigrate__"]["version"] == "1.0.0"

    args = ["stamp", str(files / "raw.pth"), "--schema", "toy"]
    assert cli.main([*args, "--version", "1.0.0", "--in-place"]) == 0
    assert str(cm.load(files / "raw.pth", upgrade=False).version) == "1.0.0"
    assert cli.main([*args, "--version", "1.0.0", "--in-place"]) == 2
    assert "already stamped" in capsys.readouterr().err
    assert cli.main([*args, "--version", "not a version", "-o", "x.pth"]) == 2
    assert cli.main([*args, "--version", "1.0.0", "--guess", "-o", "x.pth"]) == 2
    assert "exactly one of --version V or --guess" in capsys.readouterr().err


def test_check_exits_0_when_fixtures_reproduce_and_1_with_the_reason(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_toy_fixture(files)
    proc = run(files, "check", "fixtures", "--migrations", "mig")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "toy  1.0.0  -  steps=2" in proc.stdout and "1 of 1 fixtures ok" in proc.stdout

    write_toy_fixture(files, nudge=0.1)
    args = ["check", str(files / "fixtures"), "--migrations", str(files / "mig")]
    assert cli.main([*args, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["failed"] == 1 and out["fixtures"][0]["ok"] is False
    assert out["fixtures"][0]["max_abs_error"] == pytest.approx(0.1, rel=1e-3)
    assert out["fixtures"][0]["reason"]
    assert cli.main(["check", str(files / "nowhere"), "--migrations", str(files / "mig")]) == 2


@pytest.mark.parametrize("how", ["same path", "another name for it"])
def test_upgrade_onto_its_own_source_is_refused_and_names_in_place(tmp_path, how):
    src = tmp_path / "a.pth"
    cm.save(src, {"blocks.0.w": torch.ones(2)}, schema="tinylm", version="1.0.0")
    before = src.read_bytes()
    dst = src
    if how == "another name for it":
        dst = tmp_path / "link.pth"
        dst.symlink_to(src)
    done = subprocess.run(
        [sys.executable, "-m", "ckptmigrate", "upgrade", str(src), "-o", str(dst)]
        + ["--migrations", str(Path(__file__).resolve().parent.parent / "migrations")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "--in-place" in done.stderr, done
    assert src.read_bytes() == before
