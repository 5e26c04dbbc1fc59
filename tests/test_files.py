"""Checkpoint files on disk: our stamp, every layout a PyTorch user has, safety, atomic writes."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import struct
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hostile import replace_member
from packaging.version import Version
from torch import nn

import ckptmigrate as cm
from ckptmigrate import ops
from ckptmigrate.io.files import read_metadata

TEMP_GLOB = "*.ckptmigrate-tmp-*"


@pytest.fixture
def schema() -> cm.Schema:
    s = cm.Schema("tiny", current="2.0.0")
    s.add_migration("1.0.0", "2.0.0", [ops.RenameKeys(r"(.*)blocks\.(.*)", r"\1layers.\2")])
    return s


class Tiny(nn.Module):
    def __init__(self, prefix: str = "blocks") -> None:
        super().__init__()
        torch.manual_seed(0)
        setattr(self, prefix, nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
        self.head = nn.Linear(4, 2)


def tree_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(tree_equal, a, b))
    return type(a) is type(b) and a == b


def read_safetensors_metadata(path: Path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))["__metadata__"]


def folder_state(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}


def optimizer_state(block: str = "blocks", prefix: str = "") -> dict:
    """Adam state of Tiny(block) after one step, keyed by name as torch >= 2.6 writes it."""
    model = Tiny(block)
    opt = torch.optim.Adam([(prefix + name, p) for name, p in model.named_parameters()], lr=1e-3)
    model.train()
    model.head(model.get_submodule(block)(torch.ones(2, 3))).sum().backward()
    opt.step()
    return opt.state_dict()


# ---------------------------------------------------------------- our own files


def test_saved_file_is_a_plain_torch_file_with_exactly_our_four_keys(tmp_path, schema):
    p = tmp_path / "model.pth"
    sd = Tiny("layers").state_dict()
    cm.save(p, sd, schema=schema, hparams={"d": 4}, meta={"run": "x"})
    obj = torch.load(p, weights_only=True)
    assert isinstance(obj, dict)
    assert set(obj) == {"state_dict", "hparams", "meta", "__ckptmigrate__"}
    assert tree_equal(dict(obj["state_dict"]), dict(sd))
    assert obj["hparams"] == {"d": 4} and obj["meta"] == {"run": "x"}
    stamp = obj["__ckptmigrate__"]
    assert stamp["schema"] == "tiny"
    assert Version(stamp["version"]) == Version("2.0.0")
    assert stamp["history"] == []
    assert isinstance(stamp["format"], int)
    assert set(stamp["written_by"]) == {"ckptmigrate", "torch", "time"}
    assert stamp["written_by"]["ckptmigrate"] == cm.__version__
    assert stamp["written_by"]["torch"] == torch.__version__.split("+")[0]


def test_save_by_schema_name_needs_a_version(tmp_path):
    sd = {"w": torch.ones(1)}
    with pytest.raises(TypeError, match="version"):
        cm.save(tmp_path / "a.pth", sd, schema="tiny")
    cm.save(tmp_path / "a.pth", sd, schema="tiny", version="1.0.0")
    assert (
        torch.load(tmp_path / "a.pth", weights_only=True)["__ckptmigrate__"]["version"] == "1.0.0"
    )


def test_load_upgrades_and_records_history_that_survives_a_save(tmp_path, schema):
    old = tmp_path / "old.pth"
    cm.save(old, Tiny("blocks").state_dict(), schema="tiny", version="1.0.0", hparams={"d": 4})
    ckpt = cm.load(old, schema=schema)
    assert ckpt.version == Version("2.0.0")
    assert set(ckpt.state_dict) == set(Tiny("layers").state_dict())
    new = tmp_path / "new.pth"
    cm.save(new, ckpt)
    stamp = torch.load(new, weights_only=True)["__ckptmigrate__"]
    assert [(h["from"], h["to"]) for h in stamp["history"]] == [("1.0.0", "2.0.0")]
    assert all("applied_at" in h and "by" in h for h in stamp["history"])
    Tiny("layers").load_state_dict(cm.load(new, schema=schema).state_dict_for_torch())


def test_load_to_and_upgrade_false(tmp_path):
    schema = cm.Schema("tiny", current="3.0.0")
    schema.add_migration("1.0.0", "2.0.0", [ops.SetHparam("a", 1, previous=ops.ABSENT)])
    schema.add_migration("2.0.0", "3.0.0", [ops.SetHparam("b", 2, previous=ops.ABSENT)])
    p = tmp_path / "m.pth"
    cm.save(p, {"w": torch.ones(1)}, schema="tiny", version="1.0.0")
    assert cm.load(p, schema=schema, to="2.0.0").hparams == {"a": 1}
    assert cm.load(p, schema=schema, upgrade=False).version == Version("1.0.0")
    assert cm.load(p, schema=schema).hparams == {"a": 1, "b": 2}


def test_upgrade_false_returns_a_file_newer_than_the_code_as_stored(tmp_path, schema):
    p = tmp_path / "future.pth"
    cm.save(p, {"w": torch.ones(1)}, schema="tiny", version="9.0.0")
    assert cm.load(p, schema=schema, upgrade=False).version == Version("9.0.0")
    with pytest.raises(cm.FutureVersionError):
        cm.load(p, schema=schema)


def test_file_of_another_schema_raises_schema_mismatch(tmp_path, schema):
    p = tmp_path / "other.pth"
    cm.save(p, {"w": torch.ones(1)}, schema="other", version="1.0.0")
    with pytest.raises(cm.SchemaMismatchError, match="other"):
        cm.load(p, schema=schema)


def test_mmap_load_reads_the_same_tensors(tmp_path, schema):
    p = tmp_path / "m.pth"
    sd = Tiny("layers").state_dict()
    cm.save(p, sd, schema=schema)
    assert tree_equal(cm.load(p, schema=schema, mmap=True).state_dict, dict(sd))


# ---------------------------------------------------------------- safetensors


def test_safetensors_header_carries_stamp_hparams_and_meta_as_json_strings(tmp_path, schema):
    p = tmp_path / "model.safetensors"
    cm.save(p, Tiny("layers").state_dict(), schema=schema, hparams={"d": 4}, meta={"run": "x"})
    metadata = read_safetensors_metadata(p)
    assert all(isinstance(v, str) for v in metadata.values())
    stamp = json.loads(metadata["ckptmigrate.stamp"])
    assert (stamp["schema"], stamp["version"]) == ("tiny", "2.0.0")
    assert set(stamp["written_by"]) == {"ckptmigrate", "torch", "time"}
    assert json.loads(metadata["ckptmigrate.hparams"]) == {"d": 4}
    assert json.loads(metadata["ckptmigrate.meta"]) == {"run": "x"}


def test_safetensors_round_trip_keeps_tensors_dtypes_order_and_stamp(tmp_path, schema):
    sd = {
        "z.weight": torch.randn(3, 2),
        "a.half": torch.randn(4).to(torch.bfloat16),
        "m.count": torch.tensor([1, 2, 3], dtype=torch.int64),
    }
    p = tmp_path / "m.safetensors"
    cm.save(p, sd, schema=schema, hparams={"d": [1, 2]}, meta={"note": "ok"})
    ckpt = cm.load(p, schema=schema)
    assert tree_equal(ckpt.state_dict, sd)
    assert ckpt.hparams == {"d": [1, 2]} and ckpt.meta == {"note": "ok"}
    assert ckpt.version == Version("2.0.0") and ckpt.schema == "tiny"


def test_plain_safetensors_file_needs_from_version_and_upgrades(tmp_path, schema):
    from safetensors.torch import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"blocks.0.weight": torch.ones(2)}, str(p))
    with pytest.raises(cm.UnversionedCheckpointError):
        cm.load(p, schema=schema)
    ckpt = cm.load(p, schema=schema, from_version="1.0.0")
    assert list(ckpt.state_dict) == ["layers.0.weight"]


def test_non_json_hparams_to_safetensors_raise_and_write_nothing(tmp_path, schema):
    p = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="hparams"):
        cm.save(p, {"w": torch.ones(1)}, schema=schema, hparams={"ns": argparse.Namespace(a=1)})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- tied weights and _metadata


def tied_state_dict() -> dict:
    shared = torch.randn(5, 3)
    return {"embed.weight": shared, "head.weight": shared, "head.bias": torch.zeros(5)}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_tied_weights_survive_a_round_trip_as_one_storage(tmp_path, schema, suffix):
    p = tmp_path / f"tied{suffix}"
    cm.save(p, tied_state_dict(), schema=schema)
    sd = cm.load(p, schema=schema).state_dict
    a, b = sd["embed.weight"], sd["head.weight"]
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert torch.equal(a, b)
    assert sd["head.bias"].untyped_storage().data_ptr() != a.untyped_storage().data_ptr()


def test_tied_weights_stay_tied_in_the_torch_file_itself(tmp_path, schema):
    p = tmp_path / "tied.pth"
    cm.save(p, tied_state_dict(), schema=schema)
    sd = torch.load(p, weights_only=True)["state_dict"]
    assert sd["embed.weight"].untyped_storage().data_ptr() == (
        sd["head.weight"].untyped_storage().data_ptr()
    )


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_module_metadata_survives_a_round_trip(tmp_path, schema, suffix):
    sd = Tiny("layers").state_dict()
    expected = dict(sd._metadata)
    assert expected["layers.1"]["version"] == 2  # BatchNorm's own version
    p = tmp_path / f"bn{suffix}"
    cm.save(p, sd, schema=schema)
    ckpt = cm.load(p, schema=schema)
    assert dict(ckpt.module_metadata) == expected
    assert dict(ckpt.state_dict_for_torch()._metadata) == expected
    if suffix == ".pth":
        assert dict(torch.load(p, weights_only=True)["state_dict"]._metadata) == expected


# ---------------------------------------------------------------- flat state_dict files


def test_plain_state_dict_file_needs_from_version(tmp_path, schema):
    p = tmp_path / "raw.pth"
    torch.save(Tiny("blocks").state_dict(), p)
    with pytest.raises(cm.UnversionedCheckpointError, match="ckptmigrate stamp"):
        cm.load(p, schema=schema)
    ckpt = cm.load(p, schema=schema, from_version="1.0.0")
    assert ckpt.layout == "flat" and ckpt.version == Version("2.0.0")
    Tiny("layers").load_state_dict(ckpt.state_dict_for_torch())


def test_flat_file_stays_flat_with_the_stamp_in_metadata_and_loads_in_old_code(tmp_path, schema):
    src = tmp_path / "raw.pth"
    old_model = Tiny("blocks")
    torch.save(old_model.state_dict(), src)
    ckpt = cm.load(src, schema=schema, from_version="1.0.0", upgrade=False)
    dst = tmp_path / "stamped.pth"
    cm.save(dst, ckpt, hparams={"d": 4}, meta={"note": "legacy"})

    obj = torch.load(dst, weights_only=True)
    assert isinstance(obj, OrderedDict)
    assert list(obj) == list(old_model.state_dict())
    stamp = obj._metadata[""]["__ckptmigrate__"]
    assert (stamp["schema"], stamp["version"]) == ("tiny", "1.0.0")
    assert stamp["hparams"] == {"d": 4} and stamp["meta"] == {"note": "legacy"}
    assert obj._metadata["blocks.1"]["version"] == 2

    fresh = Tiny("blocks")
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(torch.load(dst))  # old code, no ckptmigrate
    assert tree_equal(dict(fresh.state_dict()), dict(old_model.state_dict()))

    again = cm.load(dst, schema=schema)
    assert again.hparams == {"d": 4} and again.meta == {"note": "legacy"}
    assert again.version == Version("2.0.0") and again.layout == "flat"
    assert "__ckptmigrate__" not in again.module_metadata[""]


# ---------------------------------------------------------------- other layouts


def lightning_dict() -> dict:
    sd = OrderedDict(("model." + k, v) for k, v in Tiny("blocks").state_dict().items())
    return {
        "epoch": 4,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": sd,
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 4}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val'}": {"best_model_score": torch.tensor(0.5)}},
        "optimizer_states": [optimizer_state(prefix="model.")],
        "lr_schedulers": [{"last_epoch": 4, "base_lrs": [0.001]}],
        "hparams_name": "kwargs",
        "hyper_parameters": {"d": 4, "lr": 1e-3},
    }


def test_lightning_checkpoint_keeps_every_key_and_layout(tmp_path, schema):
    src = tmp_path / "epoch=4.ckpt"
    original = lightning_dict()
    torch.save(original, src)
    ckpt = cm.load(src, schema=schema, from_version="1.0.0", upgrade=False)
    assert ckpt.layout == "lightning"
    assert ckpt.hparams == {"d": 4, "lr": 1e-3}
    assert tree_equal(ckpt.optimizer, original["optimizer_states"])
    assert set(ckpt.extra) == {
        "epoch",
        "global_step",
        "pytorch-lightning_version",
        "loops",
        "callbacks",
        "lr_schedulers",
        "hparams_name",
    }
    dst = tmp_path / "stamped.ckpt"
    cm.save(dst, ckpt)
    written = torch.load(dst, weights_only=True)
    assert set(written) == set(original) | {"__ckptmigrate__"}
    for key, value in original.items():
        if key == "state_dict":
            assert tree_equal(dict(written[key]), dict(value))
        else:
            assert tree_equal(written[key], value), key


def test_lightning_checkpoint_upgrade_renames_keys_and_keeps_the_rest(tmp_path, schema):
    src = tmp_path / "last.ckpt"
    original = lightning_dict()
    torch.save(original, src)
    dst = tmp_path / "upgraded.ckpt"
    cm.save(dst, cm.load(src, schema=schema, from_version="1.0.0"))
    written = torch.load(dst, weights_only=True)
    assert all(
        k.startswith("model.layers.") or k.startswith("model.head.") for k in written["state_dict"]
    )
    assert written["__ckptmigrate__"]["version"] == "2.0.0"
    for key in ("hyper_parameters", "callbacks", "epoch", "lr_schedulers"):
        assert tree_equal(written[key], original[key]), key
    # the optimizer state followed its renamed parameters
    assert tree_equal(written["optimizer_states"], [optimizer_state("layers", prefix="model.")])


@pytest.mark.parametrize(
    ("layout", "sd_key", "opt_key", "extra"),
    [
        ("nested", "model", "optimizer", {"epoch": 7}),
        ("tutorial", "model_state_dict", "optimizer_state_dict", {"epoch": 7, "loss": 0.25}),
    ],
)
def test_nested_and_tutorial_dicts_keep_their_keys(
    tmp_path, schema, layout, sd_key, opt_key, extra
):
    original = {sd_key: Tiny("blocks").state_dict(), opt_key: optimizer_state(), **extra}
    src = tmp_path / "in.pt"
    torch.save(original, src)
    ckpt = cm.load(src, schema=schema, from_version="1.0.0", upgrade=False)
    assert ckpt.layout == layout
    assert tree_equal(ckpt.optimizer, original[opt_key])
    assert ckpt.extra == extra
    dst = tmp_path / "out.pt"
    cm.save(dst, ckpt, hparams={"d": 4})
    written = torch.load(dst, weights_only=True)
    assert set(written) == set(original) | {"__ckptmigrate__"}
    assert tree_equal(dict(written[sd_key]), dict(original[sd_key]))
    assert tree_equal(written[opt_key], original[opt_key])
    assert written["__ckptmigrate__"]["hparams"] == {"d": 4}
    assert cm.load(dst, schema=schema).hparams == {"d": 4}


@pytest.mark.parametrize(
    "obj",
    [
        lambda: Tiny("blocks").state_dict(),
        lambda: {"state_dict": Tiny("blocks").state_dict(), "epoch": 1},
        lambda: {"model": Tiny("blocks").state_dict(), "optimizer": optimizer_state()},
    ],
    ids=["flat", "ckptmigrate", "nested"],
)
def test_legacy_pre_zip_files_are_read(tmp_path, schema, obj):
    p = tmp_path / "legacy.pth"
    original = obj()
    torch.save(original, p, _use_new_zipfile_serialization=False)
    assert p.read_bytes()[:2] != b"PK"
    ckpt = cm.load(p, schema=schema, from_version="1.0.0")
    assert set(ckpt.state_dict) == set(Tiny("layers").state_dict())
    Tiny("layers").load_state_dict(ckpt.state_dict_for_torch())


# ---------------------------------------------------------------- devices


def save_with_cuda_tags(monkeypatch, obj, path, **kwargs) -> None:
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(obj, path, **kwargs)


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_cuda_saved_file_loads_on_cpu_by_default(tmp_path, monkeypatch, schema, zipfile):
    p = tmp_path / "cuda.pth"
    sd = Tiny("blocks").state_dict()
    save_with_cuda_tags(monkeypatch, sd, p, _use_new_zipfile_serialization=zipfile)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(p, weights_only=True)
    ckpt = cm.load(p, schema=schema, from_version="1.0.0", upgrade=False)
    assert {t.device.type for t in ckpt.state_dict.values()} == {"cpu"}
    assert tree_equal(ckpt.state_dict, dict(sd))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("where", ["meta", torch.device("meta"), torch.device("cpu")], ids=str)
def test_map_location_is_honoured(tmp_path, monkeypatch, schema, where, suffix):
    p = tmp_path / f"m{suffix}"
    if suffix == ".pth":
        save_with_cuda_tags(monkeypatch, Tiny("blocks").state_dict(), p)
    else:
        cm.save(p, Tiny("blocks").state_dict(), schema="tiny", version="1.0.0")
    ckpt = cm.load(p, schema=schema, from_version="1.0.0", map_location=where)
    assert {t.device.type for t in ckpt.state_dict.values()} == {torch.device(where).type}


# ---------------------------------------------------------------- safety


def namespace_file(tmp_path: Path) -> Path:
    p = tmp_path / "ns.pth"
    # a key the schema's 1.0.0 -> 2.0.0 rename acts on: a migration that matched nothing would fail
    sd = {"blocks.0.w": torch.ones(2)}
    torch.save({"state_dict": sd, "hparams": argparse.Namespace(d=4)}, p)
    return p


def test_unallowed_global_raises_unsafe_naming_it(tmp_path, schema):
    with pytest.raises(cm.UnsafeCheckpointError) as info:
        cm.load(namespace_file(tmp_path), schema=schema, from_version="1.0.0")
    assert info.value.global_name == "argparse.Namespace"
    assert "argparse.Namespace" in str(info.value) and "safe_globals" in str(info.value)


@pytest.mark.parametrize(
    "allowed", [argparse.Namespace, "argparse.Namespace"], ids=["class", "name"]
)
def test_safe_globals_allow_a_trusted_class(tmp_path, schema, allowed):
    ckpt = cm.load(
        namespace_file(tmp_path), schema=schema, from_version="1.0.0", safe_globals=[allowed]
    )
    assert ckpt.hparams == {"d": 4}


class Exploit:
    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("where", ["top", "hparams", "state_dict"])
def test_malicious_pickle_is_refused_without_running(tmp_path, schema, zipfile, where):
    canary = tmp_path / "CANARY"
    evil = Exploit(canary)
    obj = {"state_dict": {"w": torch.ones(1)}, "hparams": {}}
    if where == "top":
        obj["payload"] = evil
    elif where == "hparams":
        obj["hparams"] = {"x": evil}
    else:
        obj["state_dict"]["evil._extra_state"] = evil
    p = tmp_path / "evil.pth"
    torch.save(obj, p, _use_new_zipfile_serialization=zipfile)
    assert not canary.exists()
    for kwargs in ({}, {"upgrade": False}, {"safe_globals": [argparse.Namespace]}):
        with pytest.raises(cm.UnsafeCheckpointError) as info:
            cm.load(p, schema=schema, from_version="1.0.0", **kwargs)
        assert not isinstance(info.value, pickle.UnpicklingError)
        assert "system" in info.value.global_name
    assert not canary.exists()


# ---------------------------------------------------------------- not a checkpoint


def random_bytes(n: int) -> bytes:
    data = random.Random(0).randbytes(n)
    return b"\x00" + data[1:]  # never a zip or pickle magic by chance


def truncated_zip(tmp_path: Path) -> bytes:
    p = tmp_path / "whole.pth"
    cm.save(p, Tiny("layers").state_dict(), schema="tiny", version="2.0.0")
    data = p.read_bytes()
    p.unlink()
    return data[: len(data) // 2]


def truncated_safetensors(tmp_path: Path) -> bytes:
    p = tmp_path / "whole.safetensors"
    cm.save(p, Tiny("layers").state_dict(), schema="tiny", version="2.0.0")
    data = p.read_bytes()
    p.unlink()
    return data[:-10]


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("random.pth", lambda tmp: random_bytes(4096)),
        ("empty.pth", lambda tmp: b""),
        ("text.pth", lambda tmp: b"hello, I am not a checkpoint\n"),
        ("truncated.pth", truncated_zip),
        ("truncated.safetensors", truncated_safetensors),
        ("header-only.pth", lambda tmp: b"PK\x03\x04" + b"\x00" * 20),
    ],
)
def test_corrupt_or_foreign_files_raise_checkpoint_format_error(tmp_path, schema, name, content):
    p = tmp_path / name
    p.write_bytes(content(tmp_path))
    with pytest.raises(cm.CheckpointFormatError):
        cm.load(p, schema=schema, from_version="1.0.0")


@pytest.mark.parametrize(
    "obj",
    [[torch.ones(1)], {"a": 1, "b": "text"}, torch.ones(3)],
    ids=["list", "dict-without-tensors", "bare-tensor"],
)
def test_torch_files_that_hold_no_state_dict_raise_checkpoint_format_error(tmp_path, schema, obj):
    p = tmp_path / "odd.pth"
    torch.save(obj, p)
    with pytest.raises(cm.CheckpointFormatError):
        cm.load(p, schema=schema, from_version="1.0.0")


def test_missing_file_raises_checkpoint_format_error(tmp_path, schema):
    with pytest.raises(cm.CheckpointFormatError, match="no such file"):
        cm.load(tmp_path / "nope.pth", schema=schema)


# ---------------------------------------------------------------- versions and stamps


def test_from_version_for_a_stamped_file_with_another_version_conflicts(tmp_path, schema):
    p = tmp_path / "m.pth"
    cm.save(p, {"blocks.w": torch.ones(1)}, schema="tiny", version="1.0.0")
    with pytest.raises(cm.VersionConflictError, match="1.0.0"):
        cm.load(p, schema=schema, from_version="2.0.0")
    assert cm.load(p, schema=schema, from_version="1.0").version == Version("2.0.0")


def stamp_with(**changes) -> dict:
    stamp = {
        "schema": "tiny",
        "version": "1.0.0",
        "history": [],
        "format": 1,
        "written_by": {"ckptmigrate": "0.1.0", "torch": "2.13.0", "time": "x"},
    }
    stamp.update(changes)
    return stamp


MALFORMED = {
    "bad-version": stamp_with(version="one point oh"),
    "float-version": stamp_with(version=1.0),
    "schema-not-a-string": stamp_with(schema=5),
    "empty-schema": stamp_with(schema=""),
    "format-from-the-future": stamp_with(format=99),
    "history-not-a-list": stamp_with(history="1.0.0"),
    "stamp-not-a-dict": ["tiny", "1.0.0"],
}


@pytest.mark.parametrize("stamp", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("layout", ["ckptmigrate", "flat", "safetensors"])
def test_malformed_stamp_raises_checkpoint_format_error(tmp_path, schema, stamp, layout):
    sd = OrderedDict(w=torch.ones(1))
    if layout == "safetensors":
        from safetensors.torch import save_file

        p = tmp_path / "m.safetensors"
        save_file(dict(sd), str(p), metadata={"ckptmigrate.stamp": json.dumps(stamp)})
    elif layout == "flat":
        p = tmp_path / "m.pth"
        sd._metadata = {"": {"__ckptmigrate__": stamp}}
        torch.save(sd, p)
    else:
        p = tmp_path / "m.pth"
        torch.save({"state_dict": sd, "hparams": {}, "__ckptmigrate__": stamp}, p)
    for upgrade in (True, False):
        with pytest.raises(cm.CheckpointFormatError):
            cm.load(p, schema=schema, upgrade=upgrade)


# ---------------------------------------------------------------- load never writes


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_never_writes(tmp_path, schema, suffix):
    stamped = tmp_path / f"old{suffix}"
    cm.save(stamped, Tiny("blocks").state_dict(), schema="tiny", version="1.0.0")
    raw = tmp_path / "raw.pth"
    torch.save(Tiny("blocks").state_dict(), raw)
    before = folder_state(tmp_path)
    for _ in range(2):
        assert cm.load(stamped, schema=schema).version == Version("2.0.0")
        cm.load(raw, schema=schema, from_version="1.0.0")
        cm.load(stamped, schema=schema, upgrade=False)
    assert folder_state(tmp_path) == before


# ---------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()], ids=type)
def test_a_failing_torch_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, exc):
    p = tmp_path / "model.pth"
    cm.save(p, {"w": torch.ones(2)}, schema="tiny", version="1.0.0")
    old_bytes = p.read_bytes()
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(100)
        raise exc

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(type(exc)):
        cm.save(p, {"w": torch.zeros(2)}, schema="tiny", version="2.0.0")
    assert p.read_bytes() == old_bytes
    assert list(tmp_path.glob(TEMP_GLOB)) == []
    assert [c.name for c in tmp_path.iterdir()] == ["model.pth"]


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()], ids=type)
def test_a_failing_safetensors_write_leaves_the_old_file_and_no_temporary(
    tmp_path, monkeypatch, exc
):
    import safetensors.torch

    p = tmp_path / "model.safetensors"
    cm.save(p, {"w": torch.ones(2)}, schema="tiny", version="1.0.0")
    old_bytes = p.read_bytes()

    def write_some_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
        raise exc

    monkeypatch.setattr(safetensors.torch, "save_file", write_some_then_fail)
    with pytest.raises(type(exc)):
        cm.save(p, {"w": torch.zeros(2)}, schema="tiny", version="2.0.0")
    assert p.read_bytes() == old_bytes
    assert list(tmp_path.glob(TEMP_GLOB)) == []


def test_a_successful_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "model.pth"
    cm.save(p, {"w": torch.ones(2)}, schema="tiny", version="1.0.0")
    cm.save(p, {"w": torch.zeros(2)}, schema="tiny", version="2.0.0")
    assert torch.equal(torch.load(p, weights_only=True)["state_dict"]["w"], torch.zeros(2))
    assert [c.name for c in tmp_path.iterdir()] == ["model.pth"]


def _text(value: str) -> bytes:
    raw = value.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw  # BINUNICODE


def test_a_size_list_appended_to_after_its_rebuild_call_does_not_change_the_mapped_shape(
    tmp_path,
):
    # {"state_dict": {"w": rebuild(storage of 4 floats, 0, size=[2], stride=[1])},
    #  "hparams": {"z": size + [2], "y": stride + [2]}}: the lists are memoised and APPENDed
    # to after the rebuild call; torch.load builds (2,), and so must the mapped load
    tensor = (
        b"ctorch._utils\n_rebuild_tensor_v2\nq\x02((" + _text("storage") + b"q\x03"
        b"ctorch\nFloatStorage\nq\x04" + _text("0") + b"q\x05" + _text("cpu") + b"q\x06"
        b"K\x04tq\x07QK\x00]q\x08K\x02a]q\tK\x01a\x89ccollections\nOrderedDict\nq\n)Rq\x0b"
        b"tq\x0cRq\r"
    )
    pkl = (
        b"\x80\x02}q\x00"
        + _text("state_dict")
        + b"}q\x0e"
        + _text("w")
        + tensor
        + b"ss"
        + _text("hparams")
        + b"}q\x0f"
        + _text("z")
        + b"h\x08K\x02as"
        + _text("y")
        + b"h\tK\x02as"
        + b"s."
    )
    torch.save({"w": torch.arange(4.0)}, tmp_path / "good.pth")
    path = replace_member(tmp_path / "good.pth", tmp_path / "appended.pth", "/data.pkl", pkl)

    stored = torch.load(path, weights_only=True)["state_dict"]["w"]
    assert stored.shape == (2,)
    assert read_metadata(path).state_dict["w"].shape == (2,)
    mapped = cm.load(path, mmap=True).state_dict["w"]
    assert mapped.shape == (2,) and mapped.stride() == (1,)
    assert torch.equal(mapped, stored)
