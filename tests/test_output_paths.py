"""What ``-o DST`` may replace: nothing ckptmigrate did not write is deleted or replaced.

A DCP folder is written beside DST and swapped in for what is there, so DST must be missing,
an empty folder, or a DCP folder (``.metadata``, ``*.distcp``, ``ckptmigrate.json``); a set or
a model folder only adds files under fresh names, so a file there of a name it copies (the
config, tokenizer files) must already be that file.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hostile import folder_state
from processes import one_error_line, run
from toy import TOY_MIGRATIONS, toy_schema, toy_sd

import ckptmigrate as cm
from ckptmigrate.files import read_checkpoint, read_metadata
from ckptmigrate.formats.dcp import STAMP_FILE
from ckptmigrate.version import parse_version

STAMP = ["--schema", "toy", "--version", "1.0.0"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DCP folder as ``torch.distributed.checkpoint.save`` writes it (one process), and the
    toy migrations."""
    root = tmp_path_factory.mktemp("dcp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single process, no process group
        dcp.save({"model": toy_sd(), "epoch": 3}, checkpoint_id=root / "step")
    (root / "mig.py").write_text(TOY_MIGRATIONS)
    return root


def _work(saved: Path, tmp_path: Path) -> Path:
    shutil.copytree(saved / "step", tmp_path / "step")
    shutil.copyfile(saved / "mig.py", tmp_path / "mig.py")
    return tmp_path / "step"


def _command(command: str, out: Path) -> list[str]:
    if command == "stamp":
        return ["stamp", "step", *STAMP, "-o", str(out)]
    return ["upgrade", "step", "-o", str(out), "--from-version", "1.0.0", "--schema", "toy"] + [
        "--migrations",
        "mig.py",
    ]


def _occupy(out: Path, held: str, saved: Path) -> None:
    if held == "a file":
        out.write_text("my notes\n")
        return
    if held == "notes beside DCP files":
        shutil.copytree(saved / "step", out)
    else:
        out.mkdir()
    if held == "a rank file, no .metadata":
        shutil.copyfile(next((saved / "step").glob("*.distcp")), out / "__0_0.distcp")
    elif held == "a subfolder":
        (out / "runs").mkdir()
        (out / "runs" / "log.txt").write_text("step 1\n")
    else:
        (out / "notes.txt").write_text("my notes\n")


@pytest.mark.parametrize("command", ["stamp", "upgrade"])
@pytest.mark.parametrize(
    "held",
    ["notes", "notes beside DCP files", "a rank file, no .metadata", "a subfolder", "a file"],
)
def test_dcp_output_over_a_folder_that_is_not_a_dcp_folder_is_refused_untouched(
    saved: Path, tmp_path: Path, command: str, held: str
) -> None:
    _work(saved, tmp_path)
    out = tmp_path / "out"
    _occupy(out, held, saved)
    before = folder_state(tmp_path)
    line = one_error_line(run(tmp_path, *_command(command, out)))
    assert "nothing was written" in line
    if held.startswith("notes"):
        assert "notes.txt" in line
    assert folder_state(tmp_path) == before  # nothing moved aside, nothing left beside


@pytest.mark.parametrize("how", ["upgrade_file", "write_stamped"])
def test_dcp_output_over_a_users_folder_is_refused_by_the_api_too(
    saved: Path, tmp_path: Path, how: str
) -> None:
    from ckptmigrate.inplace import read_for_stamp, with_stamp, write_stamped

    src = _work(saved, tmp_path)
    out = tmp_path / "out"
    _occupy(out, "notes", saved)
    before = folder_state(tmp_path)
    with pytest.raises(cm.OutputOccupiedError, match="notes.txt"):
        if how == "upgrade_file":
            cm.upgrade_file(src, out, toy_schema(), from_version="1.0.0")
        else:
            stamped = with_stamp(read_for_stamp(src), "toy", parse_version("1.0.0"))
            write_stamped(src, out, stamped)
    assert folder_state(tmp_path) == before


@pytest.mark.parametrize("command", ["stamp", "upgrade"])
@pytest.mark.parametrize("there", ["nothing", "an empty folder", "a DCP folder"])
def test_dcp_output_to_a_new_empty_or_dcp_folder_is_written(
    saved: Path, tmp_path: Path, command: str, there: str
) -> None:
    _work(saved, tmp_path)
    out = tmp_path / "out"
    if there == "an empty folder":
        out.mkdir()
    elif there == "a DCP folder":  # an earlier output, stamped: only DCP's files and ours
        assert run(tmp_path, "stamp", "step", *STAMP, "-o", str(out)).returncode == 0
        assert (out / STAMP_FILE).is_file()
    done = run(tmp_path, *_command(command, out))
    assert done.returncode == 0, done.stderr
    version = "1.0.0" if command == "stamp" else "3.0.0"
    assert str(read_metadata(out).version) == version
    prefix = "blocks" if command == "stamp" else "layers"
    loaded = read_checkpoint(out).state_dict
    assert all(torch.equal(loaded[k.replace("blocks", prefix)], v) for k, v in toy_sd().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mig.py", "out", "step"]
