"""Model folders of ONE weights file and no index, what ``save_pretrained`` writes for a small
model: read as that file by every command, upgraded into a new folder ``from_pretrained`` loads,
or in place.

``model.safetensors`` is written by transformers' ``save_pretrained``; ``pytorch_model.bin`` by
``huggingface_hub.save_torch_state_dict(safe_serialization=False)`` (transformers 5 writes
safetensors only). Logits are compared exactly (``atol=0, rtol=0``): every upgrade here copies
the tensor bytes or splits and re-merges them, so nothing may move by even one ulp.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hf_models import INPUT, assert_same_tokens, tiny_gpt2, upgrade_1_to_2, write_migrations
from processes import one_error_line, run

import ckptmigrate as cm
from ckptmigrate.errors import CheckpointFormatError, UnversionedCheckpointError
from ckptmigrate.formats.detect import detect_format

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")
tokenizers = pytest.importorskip("tokenizers")

WEIGHTS = {"st": "model.safetensors", "bin": "pytorch_model.bin"}
SIDE = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT-2 and its tokenizer saved whole: one weights file per folder, no index."""
    root = tmp_path_factory.mktemp("hf1")
    model, tokenizer = tiny_gpt2()
    model.save_pretrained(root / "st")
    tokenizer.save_pretrained(root / "st")
    (root / "bin").mkdir()
    huggingface_hub.save_torch_state_dict(
        model.state_dict(), root / "bin", safe_serialization=False
    )
    model.config.save_pretrained(root / "bin")
    model.generation_config.save_pretrained(root / "bin")
    tokenizer.save_pretrained(root / "bin")
    for kind, name in WEIGHTS.items():
        held = sorted(os.listdir(root / kind))
        assert name in held and not any(n.endswith(".index.json") for n in held), held
    write_migrations(root)
    return {"root": root, "st": root / "st", "bin": root / "bin"}


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(INPUT).logits


def info(path: Path) -> dict:
    done = run(path.parent, "info", str(path), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("kind", ["st", "bin"])
def test_info_reads_a_folder_of_one_weights_file_as_that_file(folders, kind):
    folder = folders[kind]
    whole, single = info(folder), info(folder / WEIGHTS[kind])
    assert whole["path"] == str(folder)
    assert whole["format"] == single["format"] == detect_format(folder)
    assert whole["format"] == ("safetensors" if kind == "st" else "torch-zip")
    for field in ("layout", "tensors", "tensor_bytes", "dtypes", "file_bytes"):
        assert whole[field] == single[field], field
    assert whole["file_bytes"] == (folder / WEIGHTS[kind]).stat().st_size
    assert len(cm.load(folder).state_dict) == whole["tensors"]


def test_diff_reads_model_folders_as_their_weights_files(folders):
    root = folders["root"]
    by_file = run(root, "diff", "st/model.safetensors", "bin/pytorch_model.bin")
    by_folder = run(root, "diff", "st", "bin")
    # save_pretrained leaves the tied lm_head.weight out; the state_dict saved whole has it
    assert by_folder.returncode == by_file.returncode == 1, by_folder.stderr
    assert "lm_head.weight" in by_folder.stdout

    def body(out: str) -> list[str]:
        return [line for line in out.splitlines() if not line.startswith(("A:", "B:"))]

    assert body(by_folder.stdout) == body(by_file.stdout)


@pytest.mark.parametrize("migration", ["split", "streamed"])
@pytest.mark.parametrize("kind", ["st", "bin"])
def test_upgrading_a_one_file_folder_writes_a_folder_from_pretrained_loads(
    folders, tmp_path, kind, migration
):
    source, out = folders[kind], tmp_path / "upgraded"
    upgrade_1_to_2(folders["root"], migration, str(source), "-o", str(out))
    assert sorted(os.listdir(out)) == sorted(os.listdir(source))  # same names, nothing more
    for name in SIDE:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert info(out)["version"] == info(out / WEIGHTS[kind])["version"] == "2.0.0"
    assert info(source)["version"] is None  # the source is left as it was
    torch.testing.assert_close(logits(out), logits(source), atol=0, rtol=0)
    assert_same_tokens(out, source)


@pytest.mark.parametrize("migration", ["split", "streamed"])
@pytest.mark.parametrize("kind", ["st", "bin"])
def test_upgrading_a_one_file_folder_in_place_rewrites_its_weights_file_with_a_backup(
    folders, tmp_path, kind, migration
):
    folder = copy_of(folders[kind], tmp_path)
    names, old = sorted(os.listdir(folder)), (folder / WEIGHTS[kind]).read_bytes()
    upgrade_1_to_2(folders["root"], migration, str(folder), "--in-place")
    assert sorted(os.listdir(folder)) == names
    assert info(folder)["version"] == "2.0.0"
    backup = tmp_path / f"{folder.name}.1.0.0.bak"
    assert (backup / WEIGHTS[kind]).read_bytes() == old
    assert sorted(os.listdir(backup)) == names  # the backup is a model folder too
    torch.testing.assert_close(logits(folder), logits(folders[kind]), atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["st", "bin"])
def test_stamping_a_one_file_folder_in_place_keeps_it_loadable(folders, tmp_path, kind):
    folder = copy_of(folders[kind], tmp_path)
    done = run(
        tmp_path, "stamp", str(folder), "--in-place", "--schema", "tinygpt", "--version", "1.0.0"
    )
    assert done.returncode == 0, done.stderr
    assert (info(folder)["schema"], info(folder)["version"]) == ("tinygpt", "1.0.0")
    torch.testing.assert_close(logits(folder), logits(folders[kind]), atol=0, rtol=0)


def test_scan_of_a_one_file_folder_lists_its_weights_file(folders, tmp_path):
    folder = copy_of(folders["st"], tmp_path)
    run(tmp_path, "stamp", str(folder), "--in-place", "--schema", "tinygpt", "--version", "1.0.0")
    done = run(tmp_path, "scan", str(folder), "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert [(Path(r["path"]).name, r["version"]) for r in rows] == [("model.safetensors", "1.0.0")]


def test_an_upgrade_refused_leaves_no_new_folder(folders, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(UnversionedCheckpointError):
        cm.upgrade_file(folders["st"], out, cm.Schema("tinygpt", current="2.0.0"))
    assert not out.exists()


def test_two_weights_files_and_no_index_are_refused_naming_both(folders, tmp_path):
    folder = copy_of(folders["st"], tmp_path)
    shutil.copyfile(folders["bin"] / "pytorch_model.bin", folder / "pytorch_model.bin")
    line = one_error_line(run(tmp_path, "info", str(folder)))
    assert "model.safetensors" in line and "pytorch_model.bin" in line and "pass the file" in line
    with pytest.raises(CheckpointFormatError, match="2 weights files"):
        cm.load(folder)
    assert info(folder / "pytorch_model.bin")["format"] == "torch-zip"  # each one still reads


@pytest.mark.parametrize("held", [[], ["config.json", "weights.pth"]])
def test_a_folder_without_a_known_weights_file_is_still_refused(tmp_path, held):
    folder = tmp_path / "plain"
    folder.mkdir()
    for name in held:
        (folder / name).write_text("{}")
    line = one_error_line(run(tmp_path, "info", str(folder)))
    assert "is a directory but neither a torch.distributed checkpoint" in line


def test_an_upgrade_into_a_new_folder_leaves_backups_of_the_weights_file_behind(folders, tmp_path):
    folder = copy_of(folders["st"], tmp_path)
    shutil.copyfile(folder / "model.safetensors", folder / "model.safetensors.1.0.0.bak")
    schema = cm.Schema("tinygpt", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.SetHparam("tied", True)])
    done = cm.upgrade_file(folder, tmp_path / "new", schema, from_version="1.0.0")
    assert done.streamed and done.dst == tmp_path / "new"
    assert sorted(os.listdir(tmp_path / "new")) == sorted(os.listdir(folders["st"]))
