"""DCP tensor ops without loading DCP, and DCP -> safetensors, tensor by tensor.

A plan with ``Merge``, ``Split`` or ``Cast`` on a DCP folder reads only the tensors it
touches (each from its chunks in the rank files), writes the results into one new values
file, and keeps every other entry's storage: the rank files are hard links of the old ones,
as many as there were. ``upgrade DCP -o OUT.safetensors`` writes the header first, then each
tensor as it is read. Two gloo ranks load the folder into the new model; safetensors' own
loader reads the file.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from crash_points import copied_afresh, killed_runs
from torch.distributed.checkpoint import FileSystemWriter

import ckptmigrate as cm
from ckptmigrate.errors import UnsafeCheckpointError
from ckptmigrate.formats.atomic import TEMP_MARKER
from ckptmigrate.formats.dcp import METADATA_FILE, SafeFileSystemReader, read_dcp_metadata
from ckptmigrate.formats.dcp_rewrite import VALUES_FILE
from ckptmigrate.formats.folder_swap import finish_interrupted_swap
from ckptmigrate.io.files import read_checkpoint, read_metadata

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("this torch build has no torch.distributed gloo backend", allow_module_level=True)

from gloo_ranks import init_ranks, run_ranks  # noqa: E402

EXACT = {"rtol": 0.0, "atol": 0.0}  # copies and concatenations: the stored values themselves


def _model_sd() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "layers.0.q": torch.randn(64, 32, generator=gen),
        "layers.0.k": torch.randn(64, 32, generator=gen),
        "layers.0.fused": torch.randn(48, 16, generator=gen),
        "layers.0.norm": torch.randn(32, generator=gen),
        "head.weight": torch.randn(10, 32, generator=gen).double(),
        "embed.weight": torch.randn(100, 32, generator=gen),  # never touched
    }


def _schema(current: str = "2.0.0") -> cm.Schema:
    """lm 1 -> 2: q and k merged, ``fused`` split in three, ``norm`` cast to bf16, a rename."""
    schema = cm.Schema("lm", current=current)
    schema.add_migration(
        "1.0.0",
        "2.0.0",
        [
            cm.ops.Merge(["{p}.q", "{p}.k"], "{p}.qk", dim=0),
            cm.ops.Split("{p}.fused", ["{p}.a", "{p}.b", "{p}.c"], dim=0),
            cm.ops.Cast("{p}.norm", dtype="bfloat16"),
            cm.ops.RenamePrefix("head.", "lm_head."),
        ],
    )
    return schema


def _expected() -> dict[str, torch.Tensor]:
    sd = _model_sd()
    a, b, c = torch.chunk(sd["layers.0.fused"], 3, dim=0)
    return {
        "layers.0.qk": torch.cat([sd["layers.0.q"], sd["layers.0.k"]], dim=0),
        "layers.0.a": a,
        "layers.0.b": b,
        "layers.0.c": c,
        "layers.0.norm": sd["layers.0.norm"].to(torch.bfloat16),  # torch's own cast
        "lm_head.weight": sd["head.weight"],
        "embed.weight": sd["embed.weight"],
    }


def _save(folder: Path, state: dict | None = None) -> None:
    writer = FileSystemWriter(folder, thread_count=2)  # two rank files: __0_0, __0_1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single process, no process group
        dcp.save(state or {"model": _model_sd()}, storage_writer=writer)


def _rank_files(folder: Path) -> dict[str, os.stat_result]:
    return {p.name: p.stat() for p in folder.glob("*.distcp") if p.name != VALUES_FILE}


def _assert_values(got: dict[str, torch.Tensor]) -> None:
    want = _expected()
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        torch.testing.assert_close(got[key], value, **EXACT)


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    folder = tmp_path / "step-100"
    _save(folder)
    return folder


def _save_zstd(folder: Path) -> None:
    from torch.distributed.checkpoint._extension import ZStandard

    writer = FileSystemWriter(folder, thread_count=2, _extensions=[ZStandard()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single process, no process group
        dcp.save({"model": _model_sd()}, storage_writer=writer)


def test_zstd_chunks_are_read_through_the_transform_tensor_by_tensor(tmp_path):
    # a zstd folder took the loaded path: the whole checkpoint in memory, saved as one rank
    pytest.importorskip("zstandard")
    src, out = tmp_path / "z", tmp_path / "v2"
    _save_zstd(src)
    infos = read_dcp_metadata(src, torch_classes=True).storage_data.values()
    assert all(info.transform_descriptors for info in infos)
    result = cm.upgrade_file(src, out, _schema(), from_version="1.0.0")
    assert result.streamed
    assert sorted(_rank_files(out)) == sorted(_rank_files(src))  # kept, not one new rank
    _assert_values(read_checkpoint(out).state_dict)  # through DCP's own loader


def test_a_zstd_chunk_inflating_past_its_declared_size_is_refused_when_streamed(tmp_path):
    pytest.importorskip("zstandard")
    import dataclasses

    import zstandard

    src = tmp_path / "z"
    _save_zstd(src)
    md = pickle.loads((src / METADATA_FILE).read_bytes())  # our own test file: trusted
    index = next(i for i in md.storage_data if i.fqn == "model.layers.0.q")  # merged: read
    info = md.storage_data[index]
    frame = zstandard.ZstdCompressor().compress(bytes(64 << 20))  # declared: 8 KiB
    with open(src / info.relative_path, "ab") as f:
        offset = f.tell()
        f.write(frame)
    md.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(frame))
    (src / METADATA_FILE).write_bytes(pickle.dumps(md))
    with pytest.raises(cm.BudgetExceededError) as caught:
        cm.upgrade_file(src, tmp_path / "v2", _schema(), from_version="1.0.0")
    assert "'model.layers.0.q'" in caught.value.what and "stream.zstd" in caught.value.what
    assert not (tmp_path / "v2").exists()


def test_tensor_ops_keep_the_rank_files_and_write_only_the_results(saved, tmp_path):
    before = {name: (saved / name).read_bytes() for name in _rank_files(saved)}
    out = tmp_path / "v2"
    result = cm.upgrade_file(saved, out, _schema(), from_version="1.0.0")
    assert result.streamed  # not loaded whole and saved as one rank
    old, new = _rank_files(saved), _rank_files(out)
    assert sorted(new) == sorted(old) and len(new) == 2  # the number of rank files kept
    for name, st in new.items():
        assert (st.st_ino, st.st_dev) == (old[name].st_ino, old[name].st_dev), name
        assert (saved / name).read_bytes() == before[name], name
    assert (out / VALUES_FILE).exists()
    touched = sum(v.numel() * v.element_size() for k, v in _expected().items() if "layers" in k)
    written = (out / VALUES_FILE).stat().st_size
    assert touched <= written < touched + 64 * 1024, (touched, written)
    _assert_values(read_checkpoint(out).state_dict)


def test_tensors_the_plan_does_not_touch_are_never_read(saved, tmp_path):
    md = read_dcp_metadata(saved, torch_classes=True)
    (info,) = [i for idx, i in md.storage_data.items() if idx.fqn == "model.embed.weight"]
    with open(saved / info.relative_path, "r+b") as f:  # its archive wrecked on disk
        f.seek(info.offset)
        f.write(b"\0" * info.length)
    out = tmp_path / "v2"
    result = cm.upgrade_file(saved, out, _schema(), from_version="1.0.0")
    assert result.streamed
    assert sorted(read_metadata(out).state_dict) == sorted(_expected())
    want = {k: v for k, v in _expected().items() if k != "embed.weight"}  # still wrecked
    model = {k: torch.zeros_like(v) for k, v in want.items()}
    dcp.load({"model": model}, storage_reader=SafeFileSystemReader(out), no_dist=True)
    for key, value in want.items():
        torch.testing.assert_close(model[key], value, **EXACT)


def _load_worker(rank: int, store: str, folder: str) -> None:
    init_ranks(rank, store)
    try:
        expected = _expected()
        model = {k: torch.zeros_like(v) for k, v in expected.items()}
        dcp.load({"model": model}, storage_reader=SafeFileSystemReader(folder))
        for key, value in expected.items():
            torch.testing.assert_close(model[key], value, **EXACT)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_the_result_loads_on_two_gloo_ranks_into_the_new_model(saved, tmp_path):
    out = tmp_path / "v2"
    assert cm.upgrade_file(saved, out, _schema(), from_version="1.0.0").streamed
    run_ranks(_load_worker, str(tmp_path / "store"), str(out))


def _sharded_save_worker(rank: int, store: str, folder: str) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_ranks(rank, store)
    try:
        full = _model_sd()
        model = {
            "layers.0.q": distribute_tensor(full["layers.0.q"], mesh, [Shard(0)]),
            "layers.0.k": distribute_tensor(full["layers.0.k"], mesh, [Shard(1)]),
            **{k: v for k, v in full.items() if k not in ("layers.0.q", "layers.0.k")},
        }
        dcp.save({"model": model}, checkpoint_id=folder)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_tensor_sharded_across_ranks_is_assembled_from_its_chunks(tmp_path):
    src = tmp_path / "sharded"
    run_ranks(_sharded_save_worker, str(tmp_path / "store"), str(src))
    assert len(_rank_files(src)) == 2
    out = tmp_path / "v2"
    assert cm.upgrade_file(src, out, _schema(), from_version="1.0.0").streamed
    assert sorted(_rank_files(out)) == sorted(_rank_files(src))
    _assert_values(read_checkpoint(out).state_dict)
    st = tmp_path / "v2.safetensors"
    assert cm.upgrade_file(src, st, _schema(), from_version="1.0.0").streamed
    from safetensors.torch import load_file

    _assert_values(load_file(st))


def test_a_hostile_metadata_is_refused_before_anything_is_written(saved, tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    (saved / METADATA_FILE).write_bytes(pickle.dumps(Boom()))
    for out in (tmp_path / "v2", tmp_path / "v2.safetensors"):
        with pytest.raises(UnsafeCheckpointError):
            cm.upgrade_file(saved, out, _schema(), from_version="1.0.0")
        assert not out.exists()
    assert not (Path.cwd() / "pwned").exists()


def test_a_kill_during_the_tensor_rewrite_leaves_the_old_folder_or_the_new(tmp_path, monkeypatch):
    originals = tmp_path / "originals"
    _save(originals)
    target = tmp_path / "work" / "step-100"
    fresh = copied_afresh(originals, target)

    def action() -> None:
        assert cm.upgrade_file(target, target, _schema(), from_version="1.0.0").streamed

    outcomes = {"old": 0, "new": 0}
    for _ in killed_runs(action, monkeypatch, fresh):
        finish_interrupted_swap(target)  # what the next command does first
        loaded = read_checkpoint(target).state_dict
        if sorted(loaded) == sorted(_model_sd()):
            outcomes["old"] += 1
            for key, value in _model_sd().items():
                torch.testing.assert_close(loaded[key], value, **EXACT)
        else:
            outcomes["new"] += 1
            _assert_values(loaded)
    assert outcomes["old"] and outcomes["new"], outcomes


# --- DCP -> safetensors ---------------------------------------------------------------------


def test_upgrade_to_safetensors_streams_and_equals_dcps_own_load(saved, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "model.safetensors"
    result = cm.upgrade_file(saved, out, _schema(), from_version="1.0.0")
    assert result.streamed and result.format == "safetensors"
    _assert_values(load_file(out))
    with safe_open(out, framework="pt") as f:
        assert '"2.0.0"' in f.metadata()["ckptmigrate.stamp"]
    stamped = read_checkpoint(out)
    assert (stamped.schema, str(stamped.version)) == ("lm", "2.0.0")
    # a rename-only plan: every tensor copied from DCP, equal to DCP's own load
    plain = cm.Schema("lm", current="2.0.0")
    plain.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("head.", "lm_head.")])
    out2 = tmp_path / "plain.safetensors"
    assert cm.upgrade_file(saved, out2, plain, from_version="1.0.0").streamed
    state = {"model": {k: torch.zeros_like(v) for k, v in _model_sd().items()}}
    dcp.load(state, storage_reader=SafeFileSystemReader(saved), no_dist=True)
    got = load_file(out2)
    for key, value in state["model"].items():
        torch.testing.assert_close(got[key.replace("head.", "lm_head.")], value, **EXACT)


def test_transformers_from_pretrained_reads_the_converted_file(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=8)
    model = transformers.GPT2LMHeadModel(config)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if "attn.bias" not in k}
    src = tmp_path / "dcp"
    _save(src, {"model": sd})
    schema = cm.Schema("gpt2", current="1.0.0")
    folder = tmp_path / "hf"
    folder.mkdir()
    config.save_pretrained(folder)
    cm.upgrade_file(src, folder / "model.safetensors", schema, from_version="1.0.0")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(folder)
    for key, value in sd.items():
        torch.testing.assert_close(loaded.state_dict()[key], value, **EXACT)


def test_the_cli_converts_a_dcp_folder_to_one_safetensors_file(saved, tmp_path):
    mig = tmp_path / "migs.py"
    mig.write_text(
        "import ckptmigrate as cm\n"
        "schema = cm.Schema('lm', current='2.0.0')\n"
        "schema.add_migration('1.0.0', '2.0.0', [cm.ops.Merge(['{p}.q', '{p}.k'], '{p}.qk'),"
        " cm.ops.Split('{p}.fused', ['{p}.a', '{p}.b', '{p}.c']),"
        " cm.ops.Cast('{p}.norm', dtype='bfloat16'), cm.ops.RenamePrefix('head.', 'lm_head.')])\n"
    )
    out = tmp_path / "out.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "ckptmigrate", "upgrade", str(saved), "-o", str(out)]
        + ["--migrations", str(mig), "--schema", "lm", "--from-version", "1.0.0"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr
    from safetensors.torch import load_file

    _assert_values(load_file(out))


def test_a_kill_while_writing_safetensors_leaves_no_partial_file(saved, tmp_path, monkeypatch):
    out = tmp_path / "model.safetensors"

    def action() -> None:
        cm.upgrade_file(saved, out, _schema(), from_version="1.0.0")

    def reset() -> None:
        if out.exists():
            out.unlink()

    for _ in killed_runs(action, monkeypatch, reset, 8):
        names = [p.name for p in tmp_path.iterdir() if p.name.startswith("model")]
        if out.exists():
            from safetensors.torch import load_file

            _assert_values(load_file(out))
        else:
            assert all(TEMP_MARKER in n for n in names), names


def test_a_later_rename_keeps_the_tensors_an_earlier_rewrite_wrote(saved, tmp_path):
    v2 = tmp_path / "v2"
    cm.upgrade_file(saved, v2, _schema(), from_version="1.0.0")
    schema = _schema(current="3.0.0")
    schema.add_migration("2.0.0", "3.0.0", [cm.ops.RenamePrefix("layers.", "blocks.")])
    v3 = tmp_path / "v3"
    assert cm.upgrade_file(v2, v3, schema).streamed  # a new .metadata, values carried over
    assert sorted(_rank_files(v3)) == sorted(_rank_files(saved))
    got = {k.replace("blocks.", "layers."): v for k, v in read_checkpoint(v3).state_dict.items()}
    _assert_values(got)


def test_upgrade_to_a_sharded_set_writes_shards_then_the_index(saved, tmp_path, monkeypatch):
    from ckptmigrate.formats import dcp_tensors

    monkeypatch.setattr(dcp_tensors, "MAX_SHARD_BYTES", 16 * 1024)  # several shards
    index = tmp_path / "out" / "model.safetensors.index.json"
    result = cm.upgrade_file(saved, index, _schema(), from_version="1.0.0")
    assert result.streamed and result.format == "sharded"
    shards = sorted(p.name for p in index.parent.glob("model-*.safetensors"))
    assert len(shards) >= 3, shards
    loaded = read_checkpoint(index)
    assert (loaded.schema, str(loaded.version)) == ("lm", "2.0.0")
    _assert_values(loaded.state_dict)
    # written again over itself: the new set replaces the old, whose shards are removed
    again = cm.upgrade_file(saved, index, _schema(), from_version="1.0.0")
    assert sorted(again.removed) == shards
    left = sorted(p.name for p in index.parent.iterdir())
    assert len(left) == len(shards) + 1 and not set(left) & set(shards), left
    _assert_values(read_checkpoint(index).state_dict)


def test_transformers_from_pretrained_reads_a_converted_sharded_set(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from ckptmigrate.formats import dcp_tensors

    monkeypatch.setattr(dcp_tensors, "MAX_SHARD_BYTES", 4 * 1024)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=8)
    sd = {
        k: v.detach().clone()
        for k, v in transformers.GPT2LMHeadModel(config).state_dict().items()
        if "attn.bias" not in k
    }
    src = tmp_path / "dcp"
    _save(src, {"model": sd})
    folder = tmp_path / "hf"
    folder.mkdir()
    config.save_pretrained(folder)
    index = folder / "model.safetensors.index.json"
    cm.upgrade_file(src, index, cm.Schema("gpt2", current="1.0.0"), from_version="1.0.0")
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    loaded = transformers.GPT2LMHeadModel.from_pretrained(folder)
    for key, value in sd.items():
        torch.testing.assert_close(loaded.state_dict()[key], value, **EXACT)


def test_optimizer_state_follows_the_ops_as_on_the_loaded_path(tmp_path):
    model = _model_sd()
    optimizer = {
        "state": {k: {"step": torch.tensor(3.0), "exp_avg": v * 0.5} for k, v in model.items()},
        "param_groups": [{"lr": 0.01, "params": list(model)}],
    }
    src = tmp_path / "step-100"
    _save(src, {"model": model, "optimizer": optimizer, "epoch": 7})
    out = tmp_path / "v2"
    assert cm.upgrade_file(src, out, _schema(), from_version="1.0.0").streamed
    streamed = read_checkpoint(out)
    loaded = cm.load(src, schema=_schema(), from_version="1.0.0")  # everything in memory
    assert streamed.extra["epoch"] == 7
    assert list(streamed.state_dict) == list(loaded.state_dict)
    for key, value in loaded.state_dict.items():
        torch.testing.assert_close(streamed.state_dict[key], value, **EXACT)
    assert streamed.optimizer["param_groups"] == loaded.optimizer["param_groups"]
    assert sorted(streamed.optimizer["state"]) == sorted(loaded.optimizer["state"])
    for name, state in loaded.optimizer["state"].items():
        for slot, value in state.items():
            torch.testing.assert_close(streamed.optimizer["state"][name][slot], value, **EXACT)


def test_chained_ops_on_one_tensor_compute_it_once_written(saved, tmp_path):
    schema = cm.Schema("lm", current="3.0.0")
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.Merge(["{p}.q", "{p}.k"], "{p}.qk", dim=1)])
    schema.add_migration(
        "2.0.0",
        "3.0.0",
        [cm.ops.Cast("{p}.qk", dtype="float16"), cm.ops.Transpose("{p}.qk", 0, 1)],
    )
    out = tmp_path / "v3"
    assert cm.upgrade_file(saved, out, schema, from_version="1.0.0").streamed
    sd = _model_sd()
    want = torch.cat([sd["layers.0.q"], sd["layers.0.k"]], dim=1).to(torch.float16).t()
    got = read_checkpoint(out).state_dict["layers.0.qk"]
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, want, **EXACT)


def test_a_function_step_streams_to_safetensors_too(saved, tmp_path):
    schema = cm.Schema("lm", current="2.0.0")

    @schema.migration("1.0.0", "2.0.0")
    def double_norm(ckpt: cm.Checkpoint) -> None:
        ckpt.state_dict["layers.0.norm"] = ckpt.state_dict["layers.0.norm"] * 2

    out = tmp_path / "model.safetensors"
    result = cm.upgrade_file(saved, out, schema, from_version="1.0.0")
    assert result.streamed  # the norm read, the others copied from their chunks
    from safetensors.torch import load_file

    got = load_file(out)
    torch.testing.assert_close(got["layers.0.norm"], _model_sd()["layers.0.norm"] * 2, **EXACT)
    assert sorted(got) == sorted(_model_sd())


def _as_function() -> cm.Schema:
    """The upgrade of :func:`_schema`, written as one function step."""
    schema = cm.Schema("lm", current="2.0.0")

    @schema.migration("1.0.0", "2.0.0")
    def upgrade(ckpt: cm.Checkpoint) -> None:
        sd, out = ckpt.state_dict, {}
        for key, value in sd.items():
            if key == "layers.0.q":
                out["layers.0.qk"] = torch.cat([value, sd["layers.0.k"]], dim=0)
            elif key == "layers.0.fused":
                out.update(zip(["layers.0.a", "layers.0.b", "layers.0.c"], value.chunk(3, 0)))
            elif key == "layers.0.norm":
                out[key] = value.to(torch.bfloat16)
            elif key != "layers.0.k":
                out[key.replace("head.", "lm_head.")] = value
        ckpt.state_dict = out

    return schema


def test_a_function_step_on_a_two_rank_folder_keeps_its_ranks_and_loads_on_two(tmp_path):
    """Tensors sharded across the ranks are read (assembled) only where the step uses
    them; the result keeps the rank files and loads on two gloo ranks into the new model."""
    src = tmp_path / "sharded"
    run_ranks(_sharded_save_worker, str(tmp_path / "store"), str(src))
    out = tmp_path / "v2"
    result = cm.upgrade_file(src, out, _as_function(), from_version="1.0.0")
    assert result.streamed
    assert sorted(_rank_files(out)) == sorted(_rank_files(src))
    _assert_values(read_checkpoint(out).state_dict)
    run_ranks(_load_worker, str(tmp_path / "store2"), str(out))


def test_a_tie_written_into_a_sharded_set_stays_in_one_shard(saved, tmp_path, monkeypatch):
    """A name a step tied to a tensor joins that tensor's shard (stored once, an alias),
    however full the shard; the index keeps the keys' order and counts the tie once."""
    from ckptmigrate.formats import dcp_tensors

    monkeypatch.setattr(dcp_tensors, "MAX_SHARD_BYTES", 16 * 1024)  # several shards
    schema = cm.Schema("lm", current="2.0.0")

    @schema.migration("1.0.0", "2.0.0")
    def tie(ckpt: cm.Checkpoint) -> None:
        ckpt.state_dict["tied"] = ckpt.state_dict["layers.0.q"]

    index = tmp_path / "out" / "model.safetensors.index.json"
    index.parent.mkdir()
    # a function step (it once wrote a torch zip under the index's name)
    cm.upgrade_file(saved, index, schema, from_version="1.0.0")
    written = json.loads(index.read_text())
    weight_map = written["weight_map"]
    assert len(set(weight_map.values())) >= 3
    assert weight_map["tied"] == weight_map["layers.0.q"]
    assert list(weight_map) == [*_model_sd(), "tied"]
    sd = _model_sd()
    assert written["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in sd.values()
    )
    loaded = read_checkpoint(index).state_dict
    assert loaded["tied"].data_ptr() == loaded["layers.0.q"].data_ptr()
    torch.testing.assert_close(loaded["tied"], sd["layers.0.q"], **EXACT)
