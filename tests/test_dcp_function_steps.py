"""A function step on a DCP folder runs on its deferred tensors, tensor by tensor.

A tensor the function returns as it got it (under its name or a new one) keeps its chunks in
the hard-linked rank files; one it computes is written once its turn comes. An in-place write
into an input is refused as the read-only guard refuses it for a mapped file; values Python
needs (``if t.abs().max() > 1``, ``.item()``) are read for small tensors; anything the deferral
cannot replay takes the loaded path, so the result is always the loaded path's.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from crash_points import copied_afresh, killed_runs
from torch.distributed.checkpoint import FileSystemWriter

import ckptmigrate as cm
from ckptmigrate.engine.deferred import VALUES_READ_NOW
from ckptmigrate.formats.dcp import SafeFileSystemReader, read_dcp_metadata
from ckptmigrate.formats.dcp_rewrite import VALUES_FILE
from ckptmigrate.formats.folder_swap import finish_interrupted_swap
from ckptmigrate.io.files import read_checkpoint

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("this torch build has no torch.distributed gloo backend", allow_module_level=True)

from gloo_ranks import init_ranks, run_ranks  # noqa: E402

EXACT = {"rtol": 0.0, "atol": 0.0}  # the same ops on the same values: bit for bit
BIG = (320, 256)  # more elements than VALUES_READ_NOW: its values are never read for Python


def _model_sd() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "blocks.0.q": torch.randn(16, 8, generator=gen),
        "blocks.0.k": torch.randn(16, 8, generator=gen),
        "blocks.0.norm": torch.randn(8, generator=gen),
        "blocks.0.scale": torch.tensor([0.5, 2.0]),
        "embed.weight": torch.randn(*BIG, generator=gen),
        "head.weight": torch.randn(10, 8, generator=gen).double(),
    }


def _save(folder: Path, state: dict | None = None) -> None:
    writer = FileSystemWriter(folder, thread_count=2)  # two rank files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single process, no process group
        dcp.save(state or {"model": _model_sd()}, storage_writer=writer)


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    folder = tmp_path / "step-100"
    _save(folder)
    return folder


def _wreck(folder: Path, fqn: str) -> None:
    """Zero the stored archive of ``fqn``: reading it fails."""
    md = read_dcp_metadata(folder, torch_classes=True)
    (info,) = [i for idx, i in md.storage_data.items() if idx.fqn == fqn]
    with open(folder / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        f.write(b"\0" * info.length)


def _rank_files(folder: Path) -> dict[str, os.stat_result]:
    return {p.name: p.stat() for p in folder.glob("*.distcp") if p.name != VALUES_FILE}


def _schema(step) -> cm.Schema:
    schema = cm.Schema("lm", current="2.0.0")
    schema.migration("1.0.0", "2.0.0")(step)
    return schema


def _loaded(src: Path, schema: cm.Schema) -> dict[str, torch.Tensor]:
    """The loaded path's result: the whole folder read, the step run on its tensors."""
    return cm.load(src, schema=schema, from_version="1.0.0").state_dict


def _dcp_load(folder: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``folder`` read by DCP's own loader into tensors shaped as ``like``."""
    model = {k: torch.zeros_like(v) for k, v in like.items()}
    dcp.load({"model": model}, storage_reader=SafeFileSystemReader(folder), no_dist=True)
    return model


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        torch.testing.assert_close(got[key], value, **EXACT)


def rename(ckpt: cm.Checkpoint) -> None:
    """The README's first migration: a function step that only renames."""
    ckpt.state_dict = {k.replace("blocks.", "layers."): v for k, v in ckpt.state_dict.items()}


def rewrite_many(ckpt: cm.Checkpoint) -> None:
    """Renames, a fused qk, a cast, a resized embedding, a new buffer, and Python control flow
    on values: a small tensor's ``.item()``/``.tolist()``, a reduction of a large one."""
    sd = ckpt.state_dict
    q, k = sd.pop("blocks.0.q"), sd.pop("blocks.0.k")
    sd["blocks.0.qk"] = torch.cat([q, k], dim=0).t().contiguous()
    lo, hi = sd["blocks.0.scale"].tolist()
    norm = sd.pop("blocks.0.norm")
    sd["blocks.0.norm"] = (norm * hi + lo).to(torch.bfloat16)
    if sd["embed.weight"].abs().max() > 1:  # reads the large tensor for one value
        sd["embed.flag"] = torch.tensor([sd["blocks.0.scale"].sum().item()])
    old = sd.pop("embed.weight")
    resized = torch.zeros(old.shape[0] + 4, old.shape[1], device=old.device)
    resized[: old.shape[0]] = old  # a plain tensor the step made, filled with stored values
    sd["embed.weight"] = resized
    sd["lm_head.weight"] = sd.pop("head.weight").cpu().to("cpu").contiguous()  # unchanged
    sd["blocks.0.bias"] = torch.zeros(8)
    ckpt.hparams["eps"] = float(sd["blocks.0.scale"][0])


def test_a_renaming_function_step_keeps_every_tensor_as_stored(saved, tmp_path):
    out = tmp_path / "v2"
    result = cm.upgrade_file(saved, out, _schema(rename), from_version="1.0.0")
    assert result.streamed  # it loaded all and saved one rank
    old, new = _rank_files(saved), _rank_files(out)
    assert sorted(new) == sorted(old) and len(new) == 2
    for name, st in new.items():
        assert (st.st_ino, st.st_dev) == (old[name].st_ino, old[name].st_dev), name
    assert not (out / VALUES_FILE).exists()  # no tensor written anew
    assert result.bytes_through_python < 64 * 1024
    want = _loaded(saved, _schema(rename))
    _assert_same(read_checkpoint(out).state_dict, want)
    _assert_same(_dcp_load(out, want), want)


def test_a_function_step_equals_the_loaded_path_tensor_for_tensor(saved, tmp_path):
    out = tmp_path / "v2"
    schema = _schema(rewrite_many)
    result = cm.upgrade_file(saved, out, schema, from_version="1.0.0")
    assert result.streamed
    assert sorted(_rank_files(out)) == sorted(_rank_files(saved))
    want = _loaded(saved, schema)
    _assert_same(read_checkpoint(out).state_dict, want)
    _assert_same(_dcp_load(out, want), want)
    assert read_checkpoint(out).hparams["eps"] == 0.5
    # only what the step computed went through Python: not the head it returned as it got it
    computed = sum(v.numel() * v.element_size() for k, v in want.items() if k != "lm_head.weight")
    written = (out / VALUES_FILE).stat().st_size
    assert computed <= written < computed + 64 * 1024, (computed, written)


def test_a_function_step_to_safetensors_equals_the_loaded_path(saved, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "model.safetensors"
    schema = _schema(rewrite_many)
    result = cm.upgrade_file(saved, out, schema, from_version="1.0.0")
    assert result.streamed and result.format == "safetensors"
    _assert_same(load_file(out), _loaded(saved, schema))


def test_a_call_op_runs_on_the_deferred_tensors_too(saved, tmp_path):
    schema = cm.Schema("lm", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.Call(rewrite_many)])
    out = tmp_path / "v2"
    assert cm.upgrade_file(saved, out, schema, from_version="1.0.0").streamed
    _assert_same(read_checkpoint(out).state_dict, _loaded(saved, schema))


def _load_worker(rank: int, store: str, folder: str, reference: str) -> None:
    init_ranks(rank, store)
    try:
        want = torch.load(reference, weights_only=True)
        model = {k: torch.zeros_like(v) for k, v in want.items()}
        dcp.load({"model": model}, storage_reader=SafeFileSystemReader(folder))
        for key, value in want.items():
            torch.testing.assert_close(model[key], value, **EXACT)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_the_result_loads_on_two_gloo_ranks(saved, tmp_path):
    out = tmp_path / "v2"
    schema = _schema(rewrite_many)
    assert cm.upgrade_file(saved, out, schema, from_version="1.0.0").streamed
    reference = tmp_path / "want.pt"
    torch.save(_loaded(saved, schema), reference)
    run_ranks(_load_worker, str(tmp_path / "store"), str(out), str(reference))


IN_PLACE = {
    "add_": lambda v: v.add_(1),
    "setitem": lambda v: v.__setitem__(0, 1.0),
    "copy_": lambda v: v.copy_(torch.ones_like(v)),
    "data.zero_": lambda v: v.data.zero_(),
    "init.zeros_": lambda v: torch.nn.init.zeros_(v),
    "iadd": lambda v: v.__iadd__(1),
    "out=": lambda v: torch.add(torch.ones_like(v), 1, out=v),
    "view then fill_": lambda v: v.view(-1).fill_(3.0),
}


@pytest.mark.parametrize("write", sorted(IN_PLACE))
def test_an_in_place_write_into_an_input_is_refused_as_for_a_mapped_file(saved, tmp_path, write):
    def step(ckpt: cm.Checkpoint) -> None:
        IN_PLACE[write](ckpt.state_dict["blocks.0.norm"])

    out = tmp_path / "v2"
    wrecked = tmp_path / "wrecked"
    shutil.copytree(saved, wrecked)
    _wreck(wrecked, "model.embed.weight")  # the loaded path would fail reading it
    with pytest.raises(cm.MigrationError) as deferred:
        cm.upgrade_file(wrecked, out, _schema(step), from_version="1.0.0")
    assert not out.exists()
    # the same step on a mapped torch file: the guard's error, word for word
    pth = tmp_path / "same.pth"
    torch.save(_model_sd(), pth)
    with pytest.raises(cm.MigrationError) as mapped:
        cm.upgrade_file(pth, tmp_path / "same-v2.pth", _schema(step), from_version="1.0.0")
    assert str(deferred.value) == str(mapped.value).replace(str(pth), str(wrecked))
    assert "in place" in str(deferred.value)
    _assert_same(read_checkpoint(saved).state_dict, _model_sd())  # the folder untouched


def test_a_tensor_the_step_mutates_after_a_deferred_call_took_it_is_seen_as_it_was(saved, tmp_path):
    def step(ckpt: cm.Checkpoint) -> None:
        sd = ckpt.state_dict
        offset = torch.zeros(8)
        sd["blocks.0.norm"] = sd["blocks.0.norm"] + offset  # computed when written, later
        offset.add_(100.0)  # after the call: the sum must not see it
        sd["blocks.0.offset"] = offset

    out = tmp_path / "v2"
    schema = _schema(step)
    assert cm.upgrade_file(saved, out, schema, from_version="1.0.0").streamed
    got = read_checkpoint(out).state_dict
    torch.testing.assert_close(got["blocks.0.norm"], _model_sd()["blocks.0.norm"], **EXACT)
    _assert_same(got, _loaded(saved, schema))


def large_values(ckpt: cm.Checkpoint) -> None:
    rows = ckpt.state_dict["embed.weight"].tolist()  # a large tensor's values, for Python
    ckpt.state_dict["embed.weight"] = torch.tensor(rows[::-1])


def tied_by_address(ckpt: cm.Checkpoint) -> None:
    sd = ckpt.state_dict
    if sd["blocks.0.q"].data_ptr() == sd["blocks.0.k"].data_ptr():  # never, when loaded
        del sd["blocks.0.k"]


def writes_into_a_view_of_a_computed_tensor(ckpt: cm.Checkpoint) -> None:
    scaled = ckpt.state_dict["blocks.0.q"] * 2
    scaled[0].fill_(0.0)  # legal on a fresh tensor, and it shows in ``scaled``
    ckpt.state_dict["blocks.0.q"] = scaled


def draws_into_a_computed_tensor(ckpt: cm.Checkpoint) -> None:
    torch.manual_seed(3)
    ckpt.state_dict["blocks.0.init"] = torch.empty_like(ckpt.state_dict["blocks.0.q"]).normal_()


def catches_the_refusal(ckpt: cm.Checkpoint) -> None:
    try:  # the deferral refuses it, the step carries on: the loaded path must decide
        total = sum(ckpt.state_dict["embed.weight"].flatten().tolist())
    except Exception:
        total = -1.0
    ckpt.state_dict["total"] = torch.tensor([total])


@pytest.mark.parametrize(
    "step",
    [
        large_values,
        tied_by_address,
        writes_into_a_view_of_a_computed_tensor,
        draws_into_a_computed_tensor,
        catches_the_refusal,
    ],
)
def test_what_the_deferral_cannot_replay_takes_the_loaded_path(saved, tmp_path, step):
    assert _model_sd()["embed.weight"].numel() > VALUES_READ_NOW
    out = tmp_path / "v2"
    schema = _schema(step)
    result = cm.upgrade_file(saved, out, schema, from_version="1.0.0")
    assert not result.streamed  # loaded, run, saved: never a wrong result
    _assert_same(read_checkpoint(out).state_dict, _loaded(saved, schema))


def test_optimizer_state_follows_a_renaming_function_step(tmp_path):
    model = _model_sd()
    optimizer = {
        "state": {k: {"step": torch.tensor(3.0), "exp_avg": v * 0.5} for k, v in model.items()},
        "param_groups": [{"lr": 0.01, "params": list(model)}],
    }
    src = tmp_path / "step-100"
    _save(src, {"model": model, "optimizer": optimizer})
    out = tmp_path / "v2"
    assert cm.upgrade_file(src, out, _schema(rename), from_version="1.0.0").streamed
    streamed = read_checkpoint(out)
    loaded = cm.load(src, schema=_schema(rename), from_version="1.0.0")
    _assert_same(streamed.state_dict, loaded.state_dict)
    assert streamed.optimizer["param_groups"] == loaded.optimizer["param_groups"]
    assert sorted(streamed.optimizer["state"]) == sorted(loaded.optimizer["state"])
    for name, state in loaded.optimizer["state"].items():
        for slot, value in state.items():
            torch.testing.assert_close(streamed.optimizer["state"][name][slot], value, **EXACT)


def test_random_draws_are_made_when_the_step_makes_them(saved, tmp_path):
    def step(ckpt: cm.Checkpoint) -> None:
        torch.manual_seed(7)
        norm = ckpt.state_dict["blocks.0.norm"]
        ckpt.state_dict["blocks.0.noise"] = torch.randn_like(norm)
        ckpt.state_dict["blocks.0.dropped"] = torch.nn.functional.dropout(norm, 0.5)
        torch.manual_seed(0)  # later draws must not change those: computed later, they would

    out = tmp_path / "v2"
    schema = _schema(step)
    assert cm.upgrade_file(saved, out, schema, from_version="1.0.0").streamed
    _assert_same(read_checkpoint(out).state_dict, _loaded(saved, schema))


def _two_steps(second) -> cm.Schema:
    def first(ckpt: cm.Checkpoint) -> None:
        sd = ckpt.state_dict
        sd["blocks.0.bias"] = torch.arange(8.0)  # a plain tensor the step made
        sd["blocks.0.q2"] = sd["blocks.0.q"] * 2  # computed, deferred

    schema = cm.Schema("lm", current="3.0.0")
    schema.migration("1.0.0", "2.0.0")(first)
    schema.migration("2.0.0", "3.0.0")(second)
    return schema


def test_a_later_step_mixes_the_earlier_steps_plain_and_deferred_tensors(saved, tmp_path):
    def second(ckpt: cm.Checkpoint) -> None:
        sd = ckpt.state_dict
        sd["blocks.0.nb"] = torch.cat([sd["blocks.0.norm"], sd.pop("blocks.0.bias")])
        sd["blocks.0.q2"] = sd["blocks.0.q2"] + sd["blocks.0.k"]

    out = tmp_path / "v3"
    schema = _two_steps(second)
    assert cm.upgrade_file(saved, out, schema, from_version="1.0.0").streamed
    _assert_same(read_checkpoint(out).state_dict, _loaded(saved, schema))


@pytest.mark.parametrize("key", ["blocks.0.bias", "blocks.0.q2"])
def test_a_write_into_what_an_earlier_step_made_is_refused_in_the_next(saved, tmp_path, key):
    def second(ckpt: cm.Checkpoint) -> None:
        ckpt.state_dict[key].mul_(2)

    wrecked = tmp_path / "wrecked"
    shutil.copytree(saved, wrecked)
    _wreck(wrecked, "model.embed.weight")  # refused on the deferred tensors, never loaded
    with pytest.raises(cm.MigrationError, match="writes into an input tensor in place"):
        cm.upgrade_file(wrecked, tmp_path / "v3", _two_steps(second), from_version="1.0.0")
    assert not (tmp_path / "v3").exists()


#: Calls a step makes on its tensors: (what they add to the state_dict, streamed?). Each
#: result equals the loaded path's; the last few the deferral cannot replay: loaded.
EVERYDAY = {
    "max over a dim": (lambda sd: {"m": torch.max(sd["blocks.0.q"], dim=0).values}, True),
    "chunk": (lambda sd: dict(zip("abcd", torch.chunk(sd["blocks.0.q"], 4))), True),
    "iterating rows": (lambda sd: {f"r{i}": r for i, r in enumerate(sd["blocks.0.k"])}, True),
    "index tensor": (lambda sd: {"x": sd["blocks.0.q"][torch.tensor([3, 1])]}, True),
    "numpy round trip": (lambda sd: {"x": torch.from_numpy(sd["blocks.0.q"].numpy() * 2)}, True),
    "torch.equal": (
        lambda sd: {"x": torch.tensor([torch.equal(sd["blocks.0.q"], sd["blocks.0.k"])])},
        True,
    ),
    "no-op casts": (
        lambda sd: {"x": sd["blocks.0.q"].float().to(dtype=torch.float32, device="cpu")},
        True,
    ),
    "stack and matmul": (
        lambda sd: {"x": torch.stack([sd["blocks.0.q"] @ sd["blocks.0.k"].t()] * 2)},
        True,
    ),
    "where": (lambda sd: {"x": torch.where(sd["blocks.0.q"] > 0, sd["blocks.0.q"], 0.0)}, True),
    "dtype view": (lambda sd: {"x": sd["blocks.0.q"].view(torch.int32)}, True),
    "float of a large sum": (
        lambda sd: {"x": torch.tensor([float(sd["embed.weight"].sum())])},
        True,
    ),
    "unique of a small one": (lambda sd: {"x": torch.unique(sd["blocks.0.scale"])}, True),
    "einsum": (
        lambda sd: {"x": torch.einsum("ij,kj->ik", sd["blocks.0.q"], sd["blocks.0.k"])},
        True,
    ),
    "printed": (lambda sd: print(sd["embed.weight"], f"{sd['blocks.0.scale']}") or {}, True),
    "a parameter": (lambda sd: {"x": torch.nn.Parameter(sd["blocks.0.q"])}, True),
    "torch.tensor of one": (lambda sd: {"x": torch.tensor(sd["blocks.0.scale"])}, False),
    "copy_ into empty_like": (
        lambda sd: {"x": torch.empty_like(sd["blocks.0.q"]).copy_(sd["blocks.0.q"])},
        True,
    ),
    "nonzero of a large one": (lambda sd: {"x": (sd["embed.weight"] > 3).nonzero()}, False),
}


@pytest.mark.parametrize("call", sorted(EVERYDAY))
def test_everyday_calls_equal_the_loaded_path(saved, tmp_path, call):
    made, streams = EVERYDAY[call]

    def step(ckpt: cm.Checkpoint) -> None:
        ckpt.state_dict.update(made(ckpt.state_dict))

    out = tmp_path / "v2"
    schema = _schema(step)
    assert cm.upgrade_file(saved, out, schema, from_version="1.0.0").streamed is streams
    _assert_same(read_checkpoint(out).state_dict, _loaded(saved, schema))


def test_a_kill_during_a_function_step_rewrite_leaves_the_old_folder_or_the_new(
    tmp_path, monkeypatch
):
    originals = tmp_path / "originals"
    _save(originals)
    target = tmp_path / "work" / "step-100"
    fresh = copied_afresh(originals, target)

    def rename_and_scale(ckpt: cm.Checkpoint) -> None:
        # small tensors: a forked child must not enter torch's thread pool (it can hang)
        rename(ckpt)
        ckpt.state_dict["layers.0.norm"] = ckpt.state_dict["layers.0.norm"] * 2

    schema = _schema(rename_and_scale)
    want = {k.replace("blocks.", "layers."): v for k, v in _model_sd().items()}
    want["layers.0.norm"] = want["layers.0.norm"] * 2

    def action() -> None:
        assert cm.upgrade_file(target, target, schema, from_version="1.0.0").streamed

    outcomes = {"old": 0, "new": 0}
    for _ in killed_runs(action, monkeypatch, fresh):
        finish_interrupted_swap(target)  # what the next command does first
        loaded = read_checkpoint(target).state_dict
        if sorted(loaded) == sorted(_model_sd()):
            outcomes["old"] += 1
            _assert_same(loaded, _model_sd())
        else:
            outcomes["new"] += 1
            _assert_same(loaded, want)
    assert outcomes["old"] and outcomes["new"], outcomes


def test_writes_into_a_tensor_the_step_computed_are_replayed_when_it_is_written(saved, tmp_path):
    def step(ckpt: cm.Checkpoint) -> None:
        sd = ckpt.state_dict
        scaled = sd["blocks.0.q"] * 2
        before = scaled + 0  # took ``scaled`` before the writes: must not see them
        scaled[0] = 0.0
        scaled += 1
        scaled.mul_(sd["blocks.0.k"])
        padded = torch.zeros_like(sd["embed.weight"])
        padded[:, :128] = sd["embed.weight"][:, :128]  # the README's vocabulary resize
        sd.update({"blocks.0.scaled": scaled, "blocks.0.before": before, "embed.padded": padded})

    out = tmp_path / "v2"
    schema = _schema(step)
    assert cm.upgrade_file(saved, out, schema, from_version="1.0.0").streamed
    got = read_checkpoint(out).state_dict
    torch.testing.assert_close(got["blocks.0.before"], _model_sd()["blocks.0.q"] * 2, **EXACT)
    _assert_same(got, _loaded(saved, schema))


def test_a_function_step_to_a_sharded_safetensors_set_streams(saved, tmp_path, monkeypatch):
    from ckptmigrate.formats import dcp_tensors

    monkeypatch.setattr(dcp_tensors, "MAX_SHARD_BYTES", 16 * 1024)  # several shards
    index = tmp_path / "out" / "model.safetensors.index.json"
    schema = _schema(rewrite_many)
    result = cm.upgrade_file(saved, index, schema, from_version="1.0.0")
    assert result.streamed and result.format == "sharded"
    assert len(list(index.parent.glob("model-*.safetensors"))) > 1
    _assert_same(read_checkpoint(index).state_dict, _loaded(saved, schema))
