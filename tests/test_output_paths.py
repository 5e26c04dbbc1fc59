"""What ``-o DST`` may replace: nothing ckptmigrate did not write is deleted or replaced.

A DCP folder is written beside DST and swapped in for what is there, so DST must be missing,
an empty folder, or a DCP folder (``.metadata``, ``*.distcp``, ``ckptmigrate.json``); a set or
a model folder only adds files under fresh names, so a file there of a name it copies (the
config, tokenizer files) must already be that file.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hostile import folder_state, write_set
from processes import one_error_line, run
from toy import TOY_MIGRATIONS, toy_schema, toy_sd

import ckptmigrate as cm
from ckptmigrate.base.version import parse_version
from ckptmigrate.formats.dcp import STAMP_FILE
from ckptmigrate.io.files import read_checkpoint, read_metadata

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


@pytest.mark.parametrize("how", ["upgrade_file", "stamp_file"])
def test_dcp_output_over_a_users_folder_is_refused_by_the_api_too(
    saved: Path, tmp_path: Path, how: str
) -> None:
    from ckptmigrate.engine.rewrite import stamp_file

    src = _work(saved, tmp_path)
    out = tmp_path / "out"
    _occupy(out, "notes", saved)
    before = folder_state(tmp_path)
    with pytest.raises(cm.OutputOccupiedError, match="notes.txt"):
        if how == "upgrade_file":
            cm.upgrade_file(src, out, toy_schema(), from_version="1.0.0")
        else:
            stamp_file(src, out, "toy", parse_version("1.0.0"))
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


# ------------------------------------------------------------------------- sets, model folders


def _set(folder: Path, ext: str = ".safetensors", version: str | None = "1.0.0") -> Path:
    """A toy set of two shards (stamped ``version``) beside a config.json; returns its index."""
    sd = toy_sd()
    parts = {f"model-0000{i}-of-00002{ext}": {} for i in (1, 2)}
    for n, (key, tensor) in enumerate(sd.items()):
        parts[f"model-0000{n % 2 + 1}-of-00002{ext}"][key] = tensor
    index = write_set(folder, parts, version=version)
    (folder / "config.json").write_text('{"model_type": "toy"}\n')
    return index


def _set_command(command: str, src: str, out: str) -> list[str]:
    if command == "stamp":
        return ["stamp", src, "--schema", "toy", "--version", "1.0.0", "-o", out]
    return ["upgrade", src, "-o", out, "--migrations", str(Path("..") / "mig.py")]


@pytest.mark.parametrize("command", ["stamp", "upgrade"])
def test_a_set_output_named_without_a_folder_is_a_folder_of_its_own(
    tmp_path: Path, command: str
) -> None:
    # `upgrade model.safetensors.index.json -o name.stamped` in the set's folder scattered
    # the new shards beside the old ones, under an index named name.stamped
    (tmp_path / "mig.py").write_text(TOY_MIGRATIONS)
    index = _set(tmp_path / "set", version=None if command == "stamp" else "1.0.0")
    before = folder_state(tmp_path / "set")
    done = run(tmp_path / "set", *_set_command(command, index.name, "name.stamped"))
    assert done.returncode == 0, done.stderr
    out = tmp_path / "set" / "name.stamped"
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == sorted([*before, out.name])
    after = folder_state(tmp_path / "set")
    assert {k: after[k] for k in before} == before  # the source set and config untouched
    shards = sorted(set(os.listdir(out)) - {"config.json", index.name})
    assert shards and all(
        re.fullmatch(r"model-\d{5}-of-\d{5}-[0-9a-f]{8}\.safetensors", n) for n in shards
    )
    version = "1.0.0" if command == "stamp" else "3.0.0"
    assert str(read_metadata(out).version) == version


@pytest.mark.parametrize("ext", [".safetensors", ".bin"])
@pytest.mark.parametrize("command", ["stamp", "upgrade"])
def test_a_set_output_named_by_its_index_gets_shards_named_after_it_beside_it(
    tmp_path: Path, command: str, ext: str
) -> None:
    (tmp_path / "mig.py").write_text(TOY_MIGRATIONS)
    index = _set(tmp_path / "set", ext, version=None if command == "stamp" else "1.0.0")
    before = folder_state(tmp_path / "set")
    kind = "safetensors" if ext == ".safetensors" else "bin"
    new_index = f"v2.{kind}.index.json"
    done = run(tmp_path / "set", *_set_command(command, index.name, new_index))
    assert done.returncode == 0, done.stderr
    after = folder_state(tmp_path / "set")
    assert {k: after[k] for k in before} == before  # the source set and config untouched
    added = sorted(set(after) - set(before))
    assert added[-1] == new_index, added
    pattern = r"v2-\d{5}-of-\d{5}-[0-9a-f]{8}" + re.escape(ext)
    assert added[:-1] and all(re.fullmatch(pattern, n) for n in added[:-1]), added
    version = "1.0.0" if command == "stamp" else "3.0.0"
    assert str(read_metadata(tmp_path / "set" / new_index).version) == version


def test_a_set_output_onto_a_file_that_is_not_an_index_is_refused_untouched(tmp_path: Path) -> None:
    (tmp_path / "mig.py").write_text(TOY_MIGRATIONS)
    index = _set(tmp_path / "set")
    (tmp_path / "set" / "notes.txt").write_text("my notes\n")
    before = folder_state(tmp_path)
    line = one_error_line(run(tmp_path / "set", *_set_command("upgrade", index.name, "notes.txt")))
    assert "notes.txt is a file" in line
    assert folder_state(tmp_path) == before


@pytest.mark.parametrize("source", ["set", "model folder"])
def test_an_output_folder_holding_another_config_json_is_refused_untouched(
    tmp_path: Path, source: str
) -> None:
    (tmp_path / "mig.py").write_text(TOY_MIGRATIONS)
    src = _model_folder(tmp_path / "src") if source == "model folder" else _set(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "mine"}\n')
    before = folder_state(tmp_path)
    line = one_error_line(run(tmp_path / "src", *_set_command("upgrade", str(src), str(out))))
    assert "config.json" in line and "nothing was written" in line
    assert folder_state(tmp_path) == before


@pytest.mark.parametrize("source", ["set", "model folder"])
def test_an_output_folder_keeps_the_users_other_files(tmp_path: Path, source: str) -> None:
    (tmp_path / "mig.py").write_text(TOY_MIGRATIONS)
    src = _model_folder(tmp_path / "src") if source == "model folder" else _set(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    shutil.copyfile(tmp_path / "src" / "config.json", out / "config.json")  # an earlier copy
    done = run(tmp_path / "src", *_set_command("upgrade", str(src), str(out)))
    assert done.returncode == 0, done.stderr
    assert (out / "notes.txt").read_text() == "my notes\n"
    assert str(read_metadata(out).version) == "3.0.0"


def _model_folder(folder: Path, version: str | None = "1.0.0") -> Path:
    """What ``save_pretrained`` writes for a small model: config.json and model.safetensors
    (stamped ``version``)."""
    from safetensors.torch import save_file

    folder.mkdir()
    if version is None:
        save_file(toy_sd(), str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        cm.save(folder / "model.safetensors", toy_sd(), schema="toy", version=version)
    (folder / "config.json").write_text('{"model_type": "toy"}\n')
    return folder


@pytest.mark.parametrize("there", ["nothing", "an empty folder"])
def test_stamping_a_model_folder_to_a_folder_writes_a_folder_of_its_layout(
    tmp_path: Path, there: str
) -> None:
    src = _model_folder(tmp_path / "src", version=None)
    out = tmp_path / "out"
    if there == "an empty folder":
        out.mkdir()
    done = run(tmp_path, "stamp", str(src), *STAMP, "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert out.is_dir()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert str(read_metadata(out).version) == "1.0.0"
    assert read_metadata(src).version is None


def test_a_model_folder_written_to_a_file_name_never_replaces_a_file_there(tmp_path: Path) -> None:
    """``stamp FOLDER -o flat.pth`` wrote safetensors bytes over a user's torch file."""
    src = _model_folder(tmp_path / "src", version=None)
    users = tmp_path / "flat.pth"
    torch.save({"w": torch.zeros(2)}, users)
    before = folder_state(tmp_path)
    done = run(tmp_path, "stamp", str(src), *STAMP, "-o", str(users))
    assert done.returncode == 2 and "flat.pth" in one_error_line(done)
    assert folder_state(tmp_path) == before


@pytest.mark.parametrize("where", ["a missing folder", "an existing folder"])
def test_a_file_output_that_cannot_be_a_file_is_named_as_given(tmp_path: Path, where: str) -> None:
    """The error names the path given and what to do, never an internal temporary."""
    src = tmp_path / "a.pth"
    torch.save(toy_sd(), src)
    out = tmp_path / "nodir" / "x.pth" if where == "a missing folder" else tmp_path / "adir"
    if where == "an existing folder":
        out.mkdir()
    before = folder_state(tmp_path)
    done = run(tmp_path, "stamp", str(src), *STAMP, "-o", str(out))
    line = one_error_line(done)
    assert done.returncode == 2 and str(out) in line and "ckptmigrate-tmp" not in line, line
    assert folder_state(tmp_path) == before


def test_stamp_onto_its_own_source_is_refused_as_upgrade_is(tmp_path: Path) -> None:
    src = tmp_path / "a.pth"
    torch.save(toy_sd(), src)
    before = folder_state(tmp_path)
    done = run(tmp_path, "stamp", str(src), *STAMP, "-o", str(src))
    assert done.returncode == 2 and "--in-place" in one_error_line(done)
    assert folder_state(tmp_path) == before
