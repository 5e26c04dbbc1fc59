"""The traps of real state_dicts: per-module versions, BatchNorm counters, non-persistent
buffers, tied weights, ``_extra_state`` and wrapper prefixes, each through a migration."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import ckptmigrate as cm


class LogScale(nn.Module):
    """Version 1 stored ``scale`` as its logarithm; version 2 stores it as is."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version", 2) < 2:
            state_dict[prefix + "scale"] = state_dict[prefix + "scale"].exp()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


class OldLogScale(LogScale):
    _version = 1


def scaled(block: str, module: type) -> nn.Module:
    root = nn.Module()
    setattr(root, block, nn.ModuleList([module()]))
    return root


@pytest.mark.parametrize("as_function", [False, True], ids=["op", "function"])
def test_per_module_versions_follow_a_rename_and_the_module_converts_old_values(
    tmp_path, as_function
):
    old = scaled("blocks", OldLogScale)
    with torch.no_grad():
        old.blocks[0].scale.copy_(torch.tensor([0.0, 1.0, 2.0]))
    src = tmp_path / "old.pth"
    torch.save(old.state_dict(), src)  # flat, with _metadata {"blocks.0": {"version": 1}}
    schema = cm.Schema("scaled", current="2.0.0")
    if as_function:

        @schema.migration("1.0.0", "2.0.0")
        def rename(ckpt):
            ckpt.state_dict = {
                k.replace("blocks.", "layers."): v for k, v in ckpt.state_dict.items()
            }

    else:
        schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("blocks.", "layers.")])
    dst = tmp_path / "new.pth"
    cm.save(dst, cm.load(src, schema=schema, from_version="1.0.0"))
    assert torch.load(dst, weights_only=True)._metadata["layers.0"]["version"] == 1

    model = scaled("layers", LogScale)
    cm.load_into(model, dst, schema=schema)
    torch.testing.assert_close(model.layers[0].scale.data, torch.tensor([0.0, 1.0, 2.0]).exp())


def test_an_old_batchnorm_file_without_num_batches_tracked_loads_strictly(tmp_path):
    bn = nn.BatchNorm1d(3)
    sd = bn.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1  # BatchNorm before torch 0.4.1 saved no counter
    src = tmp_path / "bn.pth"
    torch.save(sd, src)
    schema = cm.Schema("bn", current="1.0.0")
    model = nn.BatchNorm1d(3)
    model.num_batches_tracked.fill_(7)
    ckpt = cm.load_into(model, src, schema=schema, from_version="1.0.0")
    # BatchNorm's own _load_from_state_dict fills the counter in (it keeps its own value)
    assert ckpt.report.clean_for_strict and int(model.num_batches_tracked) == 7
    # a version-2 BatchNorm file without the counter is really missing it
    sd._metadata[""]["version"] = 2
    torch.save(sd, src)
    with pytest.raises(cm.LoadMismatchError, match="num_batches_tracked"):
        cm.load_into(nn.BatchNorm1d(3), src, schema=schema, from_version="1.0.0")


class Embedder(nn.Module):
    def __init__(self, persistent: bool) -> None:
        super().__init__()
        self.wte = nn.Embedding(8, 4)
        self.register_buffer("position_ids", torch.arange(6), persistent=persistent)


def test_old_files_carry_a_buffer_today_not_persistent_the_report_says_so_and_drop_keys_fixes_it(
    tmp_path,
):
    src = tmp_path / "old.pth"
    cm.save(src, Embedder(persistent=True).state_dict(), schema="emb", version="1.0.0")
    schema = cm.Schema("emb", current="1.0.0")
    with pytest.raises(cm.LoadMismatchError, match="non-persistent buffers.*DropKeys"):
        cm.load_into(Embedder(persistent=False), src, schema=schema)
    report = cm.load_into(Embedder(persistent=False), src, schema=schema, strict=False).report
    assert report.unexpected == report.non_persistent == ["position_ids"]

    fixed = cm.Schema("emb", current="1.1.0")
    fixed.add_migration("1.0.0", "1.1.0", [cm.ops.DropKeys("position_ids")])
    assert cm.load_into(Embedder(persistent=False), src, schema=fixed).report.clean_for_strict


class Tied(nn.Module):
    def __init__(self, name: str = "blocks") -> None:
        super().__init__()
        self.wte = nn.Embedding(8, 4)
        setattr(self, name, nn.Linear(4, 4))
        self.lm_head = nn.Linear(4, 8, bias=False)
        self.lm_head.weight = self.wte.weight


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_tied_weights_stay_tied_through_a_migration_and_either_format(tmp_path, suffix):
    src = tmp_path / "old.pth"
    old = Tied()
    cm.save(src, old.state_dict(), schema="tied", version="1.0.0")
    schema = cm.Schema("tied", current="2.0.0", build=lambda hp: Tied("layers"))
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("blocks.", "layers.")])
    dst = tmp_path / f"new{suffix}"
    cm.save(dst, cm.load(src, schema=schema))  # safetensors refuses shared storage: one + alias
    back = cm.load(dst, schema=schema)
    a, b = back.state_dict["wte.weight"], back.state_dict["lm_head.weight"]
    assert a.data_ptr() == b.data_ptr() and torch.equal(a, old.wte.weight)
    model = Tied("layers")
    cm.load_into(model, dst, schema=schema)
    assert model.lm_head.weight is model.wte.weight
    assert torch.equal(model.wte.weight, old.wte.weight)


class WithVocab(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 2)
        self.vocab: dict = {}

    def get_extra_state(self) -> dict:
        return {"tokens": ["<pad>", "a", "b"], "version": 3}

    def set_extra_state(self, state: dict) -> None:
        self.vocab = state


def test_extra_state_entries_survive_a_migration_and_reach_the_module(tmp_path):
    root = nn.Module()
    root.blocks = WithVocab()
    src = tmp_path / "old.pth"
    cm.save(src, root.state_dict(), schema="vocab", version="1.0.0")
    schema = cm.Schema("vocab", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("blocks.", "layers.")])
    dst = tmp_path / "new.pth"
    cm.save(dst, cm.load(src, schema=schema))
    assert torch.load(dst, weights_only=True)["state_dict"]["layers._extra_state"]["version"] == 3
    new = nn.Module()
    new.layers = WithVocab()
    cm.load_into(new, dst, schema=schema)
    assert new.layers.vocab == {"tokens": ["<pad>", "a", "b"], "version": 3}


def wrapped_state(kind: str, model: nn.Module) -> OrderedDict:
    if kind == "dataparallel":
        return nn.DataParallel(model).state_dict()
    if kind == "compile":
        return torch.compile(model).state_dict()  # compiles lazily: no compilation happens here
    return torch.compile(nn.DataParallel(model)).state_dict()


@pytest.mark.parametrize("kind", ["dataparallel", "compile", "both"])
def test_wrapper_prefixes_are_stripped_by_built_in_ops_and_by_load_into(tmp_path, kind):
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    sd = wrapped_state(kind, model)
    assert all(k.startswith(("module.", "_orig_mod.")) for k in sd)
    src = tmp_path / "wrapped.pth"
    cm.save(src, sd, schema="seq", version="1.0.0")

    plain = cm.Schema("seq", current="1.0.0")
    with pytest.raises(cm.LoadMismatchError, match="starts with '(module|_orig_mod)\\.'"):
        cm.load_into(
            nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)),
            src,
            schema=plain,
            strip_wrappers=False,
        )
    target = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    ckpt = cm.load_into(target, src, schema=plain)
    expected = {"dataparallel": ["module."], "compile": ["_orig_mod."]}
    assert ckpt.report.stripped_prefixes == expected.get(kind, ["_orig_mod.", "module."])
    assert torch.equal(target[0].weight, model[0].weight)

    stripping = cm.Schema("seq", current="1.1.0")
    stripping.add_migration("1.0.0", "1.1.0", cm.ops.strip_wrappers())
    assert list(cm.load(src, schema=stripping).state_dict) == list(model.state_dict())
    # a file saved without a wrapper goes through the same step unchanged
    clean = tmp_path / "clean.pth"
    cm.save(clean, model.state_dict(), schema="seq", version="1.0.0")
    assert list(cm.load(clean, schema=stripping).state_dict) == list(model.state_dict())


def test_strip_prefix_constants_name_the_wrappers():
    assert cm.ops.STRIP_DATAPARALLEL.old == "module." and cm.ops.STRIP_COMPILE.old == "_orig_mod."
    assert cm.ops.STRIP_DATAPARALLEL.new == "" and cm.ops.STRIP_DATAPARALLEL.reversible
