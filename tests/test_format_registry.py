"""One format interface: every format registered once, a path sniffed once, a read that opens
each file a bounded number of times, and one error for what no format claims."""

from __future__ import annotations

import builtins
import collections
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ckptmigrate as cm
from ckptmigrate.formats import registry
from ckptmigrate.inspection.info import info_record
from ckptmigrate.io import files


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"fc.weight": torch.randn(3, 4), "fc.bias": torch.randn(3)}


def _sharded(folder: Path, kind: str) -> Path:
    folder.mkdir()
    weight_map = {}
    for i, (key, value) in enumerate(_tensors().items(), 1):
        name = f"model-{i:05d}-of-00002.{'safetensors' if kind == 'st' else 'bin'}"
        if kind == "st":
            save_file({key: value}, str(folder / name))
        else:
            torch.save({key: value}, folder / name)
        weight_map[key] = name
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / f"model.{'safetensors' if kind == 'st' else 'bin'}.index.json").write_text(
        json.dumps(index)
    )
    return folder


def _dcp(folder: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single process, no process group
        dcp.save({"model": _tensors()}, checkpoint_id=folder)
    return folder


def _model_folder(folder: Path) -> Path:
    folder.mkdir()
    save_file(_tensors(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    return folder


def _make(kind: str, tmp_path: Path) -> Path:
    if kind == "torch-zip":
        torch.save(_tensors(), tmp_path / "x.pth")
        return tmp_path / "x.pth"
    if kind == "torch-legacy":
        torch.save(_tensors(), tmp_path / "x.pth", _use_new_zipfile_serialization=False)
        return tmp_path / "x.pth"
    if kind == "safetensors":
        save_file(_tensors(), str(tmp_path / "x.safetensors"))
        return tmp_path / "x.safetensors"
    if kind == "sharded-st":
        return _sharded(tmp_path / "set", "st")
    if kind == "sharded-bin":
        return _sharded(tmp_path / "set", "bin")
    if kind == "dcp":
        return _dcp(tmp_path / "step-1")
    return _model_folder(tmp_path / "tiny")


KINDS = ["torch-zip", "torch-legacy", "safetensors", "sharded-st", "sharded-bin", "dcp", "model"]

#: The most times ``cm.load`` opens a file of the checkpoint, counted by running it: one sniff,
#: then the format's reader (for a torch file: our pickle walk, then torch's loader). Before
#: one format interface, a .pth was opened 5 times (sniffed 3 times).
LOAD_OPENS = {
    "torch-zip": 3,
    "torch-legacy": 3,
    "safetensors": 2,
    "sharded-st": 3,
    "sharded-bin": 7,
    "dcp": 3,
    "model": 2,
}


@pytest.fixture()
def sniffed(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """Each path :func:`registry.detect` is asked about, counted."""
    seen: collections.Counter[str] = collections.Counter()
    real = registry.detect

    def counting(path: str | os.PathLike[str]) -> registry.Format:
        seen[str(Path(path))] += 1
        return real(path)

    monkeypatch.setattr(registry, "detect", counting)
    return seen


@pytest.fixture()
def opened(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> collections.Counter[str]:
    """Each file under ``tmp_path`` opened (``open``, ``io.open``, ``os.open``), counted."""
    seen: collections.Counter[str] = collections.Counter()
    real_open, real_os_open = builtins.open, os.open

    def counting_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(file, (str, os.PathLike)) and str(tmp_path) in str(file):
            seen[str(file)] += 1
        return real_open(file, *args, **kwargs)

    def counting_os_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(tmp_path) in str(file):
            seen[str(file)] += 1
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    monkeypatch.setattr(os, "open", counting_os_open)
    return seen


@pytest.mark.parametrize("kind", KINDS)
def test_load_opens_the_checkpoint_a_bounded_number_of_times(kind, tmp_path, opened):
    path = _make(kind, tmp_path)
    opened.clear()
    ckpt = cm.load(path)
    assert sorted(ckpt.state_dict) == ["fc.bias", "fc.weight"]
    assert sum(opened.values()) <= LOAD_OPENS[kind], dict(opened)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("read", ["load", "read_metadata", "info"])
def test_each_path_is_sniffed_once_per_read(kind, read, tmp_path, sniffed):
    path = _make(kind, tmp_path)
    if read == "load":
        cm.load(path)
    elif read == "read_metadata":
        files.read_metadata(path)
    else:
        info_record(path)
    assert sniffed[str(path)] == 1
    assert set(sniffed.values()) == {1}, dict(sniffed)  # a shard or weights file once each
    if kind == "model":
        assert list(sniffed) == [str(path), str(path / "model.safetensors")]


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("torch-zip", "torch-zip"),
        ("torch-legacy", "torch-legacy"),
        ("safetensors", "safetensors"),
        ("sharded-st", "sharded"),
        ("dcp", "dcp"),
        ("model", "model-folder"),
    ],
)
def test_detect_names_the_registered_format_of_each_kind(kind, name, tmp_path):
    path = _make(kind, tmp_path)
    assert registry.detect(path) is registry.format_named(name)
    assert registry.detect(path) in registry.REGISTERED


def test_a_model_folder_reads_as_its_weights_file_and_its_format(tmp_path):
    folder = _make("model", tmp_path)
    assert registry.reader_for(folder) == (folder / "model.safetensors", registry.SAFETENSORS)
    assert info_record(folder)["format"] == "safetensors"


def test_every_format_is_registered_once_under_its_own_name():
    names = [fmt.name for fmt in registry.REGISTERED]
    assert len(names) == len(set(names)) == 6
    with pytest.raises(cm.UnknownFormatError, match="no format is called 'zip'"):
        registry.format_named("zip")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("out.safetensors", "safetensors"), ("out.pth", "torch-zip"), ("out.bin", "torch-zip")],
)
def test_a_new_file_is_written_in_the_format_its_suffix_names(name, expected):
    assert registry.output_format(name).name == expected


def test_what_no_format_claims_is_one_error_naming_what_was_found(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(cm.UnknownFormatError, match="unknown format") as err:
        registry.detect(junk)
    assert err.value.found == b"not a ch" and err.value.path == str(junk)
    assert isinstance(err.value, cm.CheckpointFormatError)  # callers catching that still do
    (tmp_path / "plain").mkdir()
    with pytest.raises(cm.UnknownFormatError, match="is a directory but") as err:
        cm.load(tmp_path / "plain")
    assert err.value.found == "a directory"


def test_metadata_reads_of_every_format_do_not_import_torch(tmp_path):
    paths = []
    for kind in KINDS:
        (tmp_path / kind).mkdir()
        paths.append(_make(kind, tmp_path / kind))
    script = (
        "import sys\n"
        "from ckptmigrate.io import files\n"
        f"for path in {[str(p) for p in paths]!r}:\n"
        "    files.read_metadata(path)\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"
