"""Streaming upgrades: rename-only plans rewrite the metadata and copy tensor bytes as stored."""

from __future__ import annotations

import contextlib
import zipfile
from collections.abc import Iterator

import pytest
import torch

import ckptmigrate as cm
from ckptmigrate.streaming import upgrade_file


def _schema() -> cm.Schema:
    schema = cm.Schema("net", current="2.0.0")
    schema.add_migration(
        "1.0.0",
        "2.0.0",
        [
            cm.ops.RenamePrefix("blocks.", "layers."),
            cm.ops.DropKeys(r".*\.unused"),
            cm.ops.SetHparam("eps", 1e-5, overwrite=False),
        ],
    )
    return schema


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = {
        "blocks.0.weight": torch.randn(8, 4),
        "blocks.0.bias": torch.randn(8),
        "blocks.0.unused": torch.randn(1000),
        "head.weight": torch.randn(3, 8).half(),
        "head.t": torch.randn(4, 6).t(),  # a non-contiguous view keeps its strides
    }
    sd["tied.weight"] = sd["blocks.0.weight"]
    return sd


@contextlib.contextmanager
def torch_io_forbidden() -> Iterator[None]:
    """Inside, torch.load / torch.save raise: a streamed upgrade must not need them."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load/torch.save was called on the streaming path")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "load", refuse)
        mp.setattr(torch, "save", refuse)
        yield


@pytest.fixture()
def old_file(tmp_path):
    src = tmp_path / "old.pth"
    cm.save(src, _state_dict(), schema="net", version="1.0.0", hparams={"d": 4})
    return src


def test_rename_only_upgrade_streams_and_torch_reads_the_result(old_file, tmp_path):
    sd = _state_dict()
    dst = tmp_path / "new.pth"
    with torch_io_forbidden():
        result = upgrade_file(old_file, dst, _schema())
    assert result.streamed and result.bytes_through_python == 0
    assert result.steps and str(result.target_version) == "2.0.0"
    for mmap in (False, True):
        obj = torch.load(dst, weights_only=True, mmap=mmap)
        new = obj["state_dict"]
        assert list(new) == [
            "layers.0.weight",
            "layers.0.bias",
            "head.weight",
            "head.t",
            "tied.weight",
        ]
        assert torch.equal(new["layers.0.weight"], sd["blocks.0.weight"])
        assert new["head.weight"].dtype == torch.float16
        assert new["head.t"].stride() == sd["head.t"].stride()
        assert torch.equal(new["head.t"], sd["head.t"])
        assert new["tied.weight"].data_ptr() == new["layers.0.weight"].data_ptr()
        assert obj["hparams"] == {"d": 4, "eps": 1e-5}
        assert obj["__ckptmigrate__"]["version"] == "2.0.0"


def test_dropped_storage_is_not_copied_and_data_stays_64_byte_aligned(old_file, tmp_path):
    dst = tmp_path / "new.pth"
    with torch_io_forbidden():
        result = upgrade_file(old_file, dst, _schema())
    assert result.bytes_copied < old_file.stat().st_size - 4000  # the 1000-float 'unused' is gone
    raw = dst.read_bytes()
    with zipfile.ZipFile(dst) as zf:
        assert zf.testzip() is None  # every CRC matches
        for info in zf.infolist():
            name_len, extra_len = int.from_bytes(
                raw[info.header_offset + 26 : info.header_offset + 28], "little"
            ), int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0


def test_streamed_upgrade_equals_the_loaded_upgrade(old_file, tmp_path):
    dst = tmp_path / "new.pth"
    with torch_io_forbidden():
        upgrade_file(old_file, dst, _schema())
    streamed = cm.load(dst, schema=_schema())
    loaded = cm.load(old_file, schema=_schema())
    assert list(streamed.state_dict) == list(loaded.state_dict)
    for key, value in loaded.state_dict.items():
        assert torch.equal(streamed.state_dict[key], value)
    assert streamed.hparams == loaded.hparams
    assert [h["step"] for h in streamed.history] == [h["step"] for h in loaded.history]


def test_flat_state_dict_stays_flat_and_carries_the_stamp(tmp_path):
    src = tmp_path / "flat.pth"
    torch.save(_state_dict(), src)
    dst = tmp_path / "flat2.pth"
    with torch_io_forbidden():
        result = upgrade_file(src, dst, _schema(), from_version="1.0.0")
    assert result.streamed
    sd = torch.load(dst, weights_only=True)
    assert "layers.0.weight" in sd and sd._metadata[""]["__ckptmigrate__"]["version"] == "2.0.0"


def test_function_step_falls_back_to_the_loaded_path(old_file, tmp_path):
    schema = cm.Schema("net", current="2.0.0")

    @schema.migration("1.0.0", "2.0.0")
    def double(ckpt: cm.Checkpoint) -> None:
        ckpt.state_dict = {k: v * 2 for k, v in ckpt.state_dict.items()}

    dst = tmp_path / "new.pth"
    result = upgrade_file(old_file, dst, schema)
    assert not result.streamed
    new = torch.load(dst, weights_only=True)["state_dict"]
    assert torch.equal(new["blocks.0.bias"], _state_dict()["blocks.0.bias"] * 2)


def test_in_place_upgrade_replaces_the_file_atomically(old_file):
    with torch_io_forbidden():
        result = upgrade_file(old_file, old_file, _schema())
    assert result.streamed
    assert [p.name for p in old_file.parent.iterdir()] == ["old.pth"]
    assert cm.files.read_metadata(old_file).version == cm.Schema("x", "2.0.0").current


def test_safetensors_rename_streams_header_and_bytes(tmp_path):
    src = tmp_path / "m.safetensors"
    sd = {k: v.contiguous() for k, v in _state_dict().items()}
    cm.save(src, sd, schema="net", version="1.0.0")
    dst = tmp_path / "m2.safetensors"
    with torch_io_forbidden():
        result = upgrade_file(src, dst, _schema())
    assert result.streamed and result.bytes_through_python == 0
    new = cm.load(dst, upgrade=False)
    assert torch.equal(new.state_dict["layers.0.weight"], sd["blocks.0.weight"])
    assert new.state_dict["tied.weight"] is new.state_dict["layers.0.weight"]
    assert "layers.0.unused" not in new.state_dict and str(new.version) == "2.0.0"
