"""Function steps on a DCP folder, run on tensors read when the step first uses them.

The step gets the folder as loading it would give it (every value stored as bytes read),
each tensor read from its chunks on the first torch call that needs its values, behind the
read-only guard. So it answers as on the loaded folder: its control flow, errors, fallbacks,
random draws and refusals are the same (``cm.load`` of the folder with the same step is the
reference), while a tensor it never uses is never read, and one it returns as it was keeps
its chunks in the linked rank files. Many of these cases come from an adversarial review of
an earlier design that replayed the step on deferred tensors and answered otherwise.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from dcp_steps import (
    EXACT,
    assert_same,
    clobber_chunk,
    refused_as_when_loaded,
    save_folder,
    schema_of,
    small_model,
)
from torch.distributed.checkpoint import FileSystemWriter

import ckptmigrate as cm
from ckptmigrate.errors import CheckpointFormatError, UnsafeCheckpointError
from ckptmigrate.formats.dcp import read_dcp_metadata
from ckptmigrate.formats.dcp_rewrite import VALUES_FILE
from ckptmigrate.io.files import read_checkpoint


def _model_sd() -> dict[str, torch.Tensor]:
    return small_model(big=True)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return save_folder(tmp_path / "step-100", {"model": _model_sd()}, thread_count=2)


def _schema(step) -> cm.Schema:
    return schema_of(step)


def _upgraded_and_loaded(folder: Path, tmp_path: Path, step) -> tuple[cm.Checkpoint, ...]:
    """The step run by upgrade_file on the DCP folder (tensors read on touch) and by cm.load
    (the loaded folder: the reference)."""
    out = tmp_path / "v2"
    assert cm.upgrade_file(folder, out, _schema(step), from_version="1.0.0").streamed
    return read_checkpoint(out), cm.load(folder, schema=_schema(step), from_version="1.0.0")


def _assert_same(got: dict, want: dict) -> None:
    assert_same(got, want, ordered=False)


def numpy_edit(ckpt: cm.Checkpoint) -> None:
    sd = ckpt.state_dict
    w = sd["a"] * 2  # a tensor the step computed: its own, writable
    w.numpy()[0, :] = 0.0  # .numpy() shares w's memory: this zeroes w's first row
    sd["a"] = w


def asarray_edit(ckpt: cm.Checkpoint) -> None:
    sd = ckpt.state_dict
    w = sd["b"] + 1
    arr = np.asarray(w)  # shares w's memory, as .numpy() does
    arr *= 10
    sd["b"] = w


def from_numpy_edit(ckpt: cm.Checkpoint) -> None:
    sd = ckpt.state_dict
    w = sd["b"] + 1
    torch.from_numpy(w.numpy()).zero_()  # the same memory, through a numpy round trip
    sd["b"] = w


@pytest.mark.parametrize("step", [numpy_edit, asarray_edit, from_numpy_edit])
def test_a_write_through_numpy_into_a_computed_tensor_is_kept(folder, tmp_path, step):
    got, want = _upgraded_and_loaded(folder, tmp_path, step)
    _assert_same(got.state_dict, want.state_dict)


def zero_a_row_picked_by_a_tensor(ckpt: cm.Checkpoint) -> None:
    sd = ckpt.state_dict
    w = sd["a"] * 2
    row = w[torch.tensor(1)]  # a 0-dim integer index: basic indexing, a view of w's row
    row.zero_()  # so this zeroes w's row 1
    sd["a"] = w


def test_a_write_into_a_row_picked_by_a_tensor_index_is_kept(folder, tmp_path):
    got, want = _upgraded_and_loaded(folder, tmp_path, zero_a_row_picked_by_a_tensor)
    assert torch.count_nonzero(want.state_dict["a"][1]) == 0
    _assert_same(got.state_dict, want.state_dict)


def zero_an_input_row_picked_by_a_tensor(ckpt: cm.Checkpoint) -> None:
    ckpt.state_dict["a"][torch.tensor(1)].zero_()  # a view of the input: a write into it


def test_a_write_into_an_input_row_picked_by_a_tensor_index_is_refused(folder, tmp_path):
    with pytest.raises(cm.MigrationError):
        cm.load(folder, schema=_schema(zero_an_input_row_picked_by_a_tensor), from_version="1.0.0")
    with pytest.raises(cm.MigrationError):
        schema = _schema(zero_an_input_row_picked_by_a_tensor)
        cm.upgrade_file(folder, tmp_path / "v2", schema, from_version="1.0.0")


def reverse_keys(ckpt: cm.Checkpoint) -> None:
    ckpt.state_dict = dict(reversed(list(ckpt.state_dict.items())))


def test_a_step_that_reorders_keys_keeps_its_order(folder, tmp_path):
    got, want = _upgraded_and_loaded(folder, tmp_path, reverse_keys)
    assert list(got.state_dict) == list(want.state_dict)


@pytest.fixture()
def with_epoch(tmp_path: Path) -> Path:
    """A DCP folder with a non-tensor entry beside the model, as training loops save."""
    out = tmp_path / "step-200"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = {"model": _model_sd(), "epoch": 3}
        dcp.save(state, storage_writer=FileSystemWriter(out, thread_count=2))
    return out


def epoch_branch(ckpt: cm.Checkpoint) -> None:
    if isinstance(ckpt.extra.get("epoch"), int) and ckpt.extra["epoch"] >= 3:
        ckpt.state_dict["b"] = ckpt.state_dict["b"] * 0  # trained long enough: reset


def epoch_to_hparams(ckpt: cm.Checkpoint) -> None:
    ckpt.hparams["epoch"] = ckpt.extra["epoch"]


def epoch_plus_one(ckpt: cm.Checkpoint) -> None:
    ckpt.extra["epoch"] = ckpt.extra["epoch"] + 1


@pytest.mark.parametrize("step", [epoch_branch, epoch_to_hparams, epoch_plus_one])
def test_a_step_sees_a_dcp_folders_non_tensor_values(with_epoch, tmp_path, step):
    out = tmp_path / "v2"
    cm.upgrade_file(with_epoch, out, _schema(step), from_version="1.0.0")
    got = read_checkpoint(out)
    want = cm.load(with_epoch, schema=_schema(step), from_version="1.0.0")
    _assert_same(got.state_dict, want.state_dict)
    assert got.hparams == want.hparams
    assert got.extra["epoch"] == want.extra["epoch"]


@pytest.fixture()
def with_optimizer(tmp_path: Path) -> Path:
    model = _model_sd()
    optimizer = {
        "state": {k: {"step": torch.tensor(3.0), "exp_avg": v * 0.5} for k, v in model.items()},
        "param_groups": [{"lr": 0.01, "params": list(model)}],
    }
    out = tmp_path / "step-300"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = {"model": model, "optimizer": optimizer}
        dcp.save(state, storage_writer=FileSystemWriter(out, thread_count=2))
    return out


def scale_lr(ckpt: cm.Checkpoint) -> None:
    group = ckpt.optimizer["param_groups"][0]
    group["lr"] = group["lr"] * 0.1


def test_a_step_reads_a_dcp_optimizers_learning_rate(with_optimizer, tmp_path):
    out = tmp_path / "v2"
    cm.upgrade_file(with_optimizer, out, _schema(scale_lr), from_version="1.0.0")
    assert read_checkpoint(out).optimizer["param_groups"][0]["lr"] == pytest.approx(0.001)


def set_lr(ckpt: cm.Checkpoint) -> None:
    ckpt.optimizer["param_groups"][0]["lr"] = 0.5


def test_a_steps_edit_of_a_dcp_optimizers_param_groups_is_written(with_optimizer, tmp_path):
    out = tmp_path / "v2"
    cm.upgrade_file(with_optimizer, out, _schema(set_lr), from_version="1.0.0")
    assert read_checkpoint(out).optimizer["param_groups"][0]["lr"] == 0.5
    pth = tmp_path / "a.pth"
    torch.save({"state_dict": _model_sd(), "optimizer": _pth_optimizer()}, pth)
    cm.upgrade_file(pth, tmp_path / "b.pth", _schema(set_lr), from_version="1.0.0")
    assert read_checkpoint(tmp_path / "b.pth").optimizer["param_groups"][0]["lr"] == 0.5


def _pth_optimizer() -> dict:
    steps = {i: {"step": torch.tensor(3.0)} for i in range(4)}
    return {"state": steps, "param_groups": [{"lr": 0.01, "params": [0, 1, 2, 3]}]}


def sdpa_dropout(ckpt: cm.Checkpoint) -> None:
    torch.manual_seed(0)
    x = ckpt.state_dict["a"].reshape(2, 2, 6)
    ckpt.state_dict["att"] = torch.nn.functional.scaled_dot_product_attention(
        x, x, x, dropout_p=0.5
    )
    torch.manual_seed(1)  # later draws must not change what the step computed


def test_random_draws_inside_other_ops_are_made_when_the_step_makes_them(folder, tmp_path):
    got, want = _upgraded_and_loaded(folder, tmp_path, sdpa_dropout)
    assert sorted(got.state_dict) == sorted(want.state_dict)
    for key, value in want.state_dict.items():
        torch.testing.assert_close(got.state_dict[key], value, rtol=1.3e-6, atol=1e-5, msg=key)


def first_values_in_threads(ckpt: cm.Checkpoint) -> None:
    from concurrent.futures import ThreadPoolExecutor

    sd = ckpt.state_dict

    def first(key: str) -> tuple[str, float | None]:
        try:
            return key, float(sd[key].reshape(-1).tolist()[0])  # "big": a large tensor's values
        except Exception:
            return key, None

    with ThreadPoolExecutor(2) as pool:
        ckpt.hparams["first"] = dict(pool.map(first, ["a", "big"]))


def test_a_large_tensors_values_read_in_a_worker_thread_are_the_loaded_ones(folder, tmp_path):
    got, want = _upgraded_and_loaded(folder, tmp_path, first_values_in_threads)
    assert want.hparams["first"]["big"] is not None
    assert got.hparams == want.hparams


def pick_missing_row(ckpt: cm.Checkpoint) -> None:
    ckpt.state_dict["x"] = ckpt.state_dict["a"][torch.tensor([10])]  # a has 4 rows


def test_a_step_that_fails_only_on_the_values_is_the_steps_error(folder, tmp_path):
    refused_as_when_loaded(folder, tmp_path, pick_missing_row)


def pick_rows_or_fall_back(ckpt: cm.Checkpoint) -> None:
    sd = ckpt.state_dict
    try:
        sd["x"] = sd["a"][torch.tensor([10])]
    except IndexError:  # fewer rows than asked: keep the first
        sd["x"] = sd["a"][:1].clone()


def test_a_step_catching_an_error_only_the_values_show_takes_its_fallback(folder, tmp_path):
    got, want = _upgraded_and_loaded(folder, tmp_path, pick_rows_or_fall_back)
    _assert_same(got.state_dict, want.state_dict)


def cast_like(ckpt: cm.Checkpoint) -> None:
    sd = ckpt.state_dict
    ckpt.hparams["type"] = sd["a"].type()  # "torch.FloatTensor", as loaded
    sd["i_as_a"] = sd["i"].type(sd["a"].type())  # the legacy way to cast like another


def test_tensor_type_names_a_cpu_tensor_type(folder, tmp_path):
    got, want = _upgraded_and_loaded(folder, tmp_path, cast_like)
    assert want.hparams["type"] == "torch.FloatTensor"
    assert got.hparams == want.hparams
    _assert_same(got.state_dict, want.state_dict)


def computed_pair_in_extra(ckpt: cm.Checkpoint) -> None:
    ckpt.extra["pair"] = (ckpt.state_dict["a"] * 2, 3)  # DCP pickles a tuple entry whole


def plain_pair_in_extra(ckpt: cm.Checkpoint) -> None:
    ckpt.extra["pair"] = (torch.ones(2), 3)


@pytest.mark.parametrize("step", [computed_pair_in_extra, plain_pair_in_extra])
def test_a_tensor_in_a_tuple_in_extra_is_written_readably(folder, tmp_path, step):
    out = tmp_path / "v2"
    cm.upgrade_file(folder, out, _schema(step), from_version="1.0.0")
    got = read_checkpoint(out).extra["pair"]
    want = cm.load(folder, schema=_schema(step), from_version="1.0.0").extra["pair"]
    torch.testing.assert_close(got[0], want[0], **EXACT)
    assert got[1] == want[1] == 3


def tie_a_computed_tensor(ckpt: cm.Checkpoint) -> None:
    sd = ckpt.state_dict
    sd["w"] = sd["b"] * 2
    sd["w_tied"] = sd["w"]  # one tensor under two names (tied weights)
    sd["a_tied"] = sd["a"]  # an input under two names: this one stays tied


def test_a_computed_tensor_under_two_keys_stays_tied_in_safetensors(folder, tmp_path):
    out = tmp_path / "model.safetensors"
    cm.upgrade_file(folder, out, _schema(tie_a_computed_tensor), from_version="1.0.0")
    got = read_checkpoint(out).state_dict
    want = cm.load(folder, schema=_schema(tie_a_computed_tensor), from_version="1.0.0")
    assert want.state_dict["w_tied"] is want.state_dict["w"]  # the step's own result
    _assert_same(got, want.state_dict)
    assert got["a_tied"].data_ptr() == got["a"].data_ptr()  # passes: inputs stay tied
    assert got["w_tied"].data_ptr() == got["w"].data_ptr()  # fails: stored twice


def rename_and_scale(ckpt: cm.Checkpoint) -> None:
    """The README's kind of step: names rewritten, one tensor computed from another."""
    sd = {k.replace("a", "alpha"): v for k, v in ckpt.state_dict.items()}
    sd["b"] = sd["b"] * 2
    ckpt.state_dict = sd


def test_a_tensor_the_step_never_uses_is_never_read(folder, tmp_path):
    clobber_chunk(folder, "model.big")  # loading the folder would fail on it
    with pytest.raises((CheckpointFormatError, UnsafeCheckpointError)):
        cm.load(folder, schema=_schema(rename_and_scale), from_version="1.0.0")
    out = tmp_path / "v2"
    result = cm.upgrade_file(folder, out, _schema(rename_and_scale), from_version="1.0.0")
    assert result.streamed
    md = read_dcp_metadata(out)
    assert "model.big" in md.state_dict_metadata  # kept as stored, its bytes as they were
    sd = _model_sd()
    values = dcp_values(out, ["model.alpha", "model.b", "model.i"])
    torch.testing.assert_close(values["model.alpha"], sd["a"], **EXACT)
    torch.testing.assert_close(values["model.b"], sd["b"] * 2, **EXACT)


def dcp_values(folder: Path, fqns: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a DCP folder, read by DCP's own loader (nothing else read)."""
    from ckptmigrate.formats.dcp import SafeFileSystemReader

    md = read_dcp_metadata(folder)
    state = {
        fqn: torch.empty(tuple(md.state_dict_metadata[fqn].size), dtype=_dtype(folder, fqn))
        for fqn in fqns
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=SafeFileSystemReader(folder))
    return state


def _dtype(folder: Path, fqn: str) -> torch.dtype:
    return read_dcp_metadata(folder, torch_classes=True).state_dict_metadata[fqn].properties.dtype


def test_the_rank_files_are_linked_and_only_the_computed_tensor_written(folder, tmp_path):
    out = tmp_path / "v2"
    result = cm.upgrade_file(folder, out, _schema(rename_and_scale), from_version="1.0.0")
    ranks = sorted(p.name for p in folder.glob("*.distcp"))
    assert sorted(p.name for p in out.glob("*.distcp") if p.name != VALUES_FILE) == ranks
    for name in ranks:  # hard links: the same bytes, not copies
        assert (out / name).stat().st_ino == (folder / name).stat().st_ino
    assert result.bytes_copied == sum((folder / n).stat().st_size for n in ranks)
    sd = _model_sd()
    assert result.bytes_through_python < 16 * 1024  # b (24 bytes), .metadata, the stamp
    assert result.bytes_through_python < sd["big"].numel() * 4 // 10
    got = read_checkpoint(out).state_dict
    want = cm.load(folder, schema=_schema(rename_and_scale), from_version="1.0.0").state_dict
    assert list(got) == list(want)
    _assert_same(got, want)


def touch_big_and_swallow(ckpt: cm.Checkpoint) -> None:
    try:
        ckpt.hparams["big"] = float(ckpt.state_dict["big"].sum())
    except Exception:  # noqa: BLE001 - what a step may do; the folder's error must stand
        ckpt.hparams["big"] = None


def test_a_tensor_that_cannot_be_read_is_the_folders_error_not_the_steps(folder, tmp_path):
    clobber_chunk(folder, "model.big")
    out = tmp_path / "v2"
    for step in (touch_big_and_swallow, rename_and_scale_big):
        with pytest.raises(CheckpointFormatError) as raised:
            cm.upgrade_file(folder, out, _schema(step), from_version="1.0.0")
        assert not isinstance(raised.value, cm.MigrationError)
        assert "model.big" in str(raised.value)
        assert not out.exists()


def rename_and_scale_big(ckpt: cm.Checkpoint) -> None:
    ckpt.state_dict["big"] = ckpt.state_dict["big"] * 2


def add_in_place(ckpt):
    ckpt.state_dict["a"].add_(1)


def set_a_row(ckpt):
    ckpt.state_dict["a"][0] = 1.0


def zero_through_data(ckpt):
    ckpt.state_dict["a"].data.zero_()


def init_zeros(ckpt):
    torch.nn.init.zeros_(ckpt.state_dict["a"])


def into_out(ckpt):
    torch.add(ckpt.state_dict["b"], 1, out=ckpt.state_dict["b"])


def copy_into(ckpt):
    ckpt.state_dict["b"].copy_(torch.zeros(6))


@pytest.mark.parametrize(
    "step", [add_in_place, set_a_row, zero_through_data, init_zeros, into_out, copy_into]
)
def test_a_write_into_an_input_is_refused_as_when_loaded(folder, tmp_path, step):
    refused_as_when_loaded(folder, tmp_path, step, match="in place")
    torch.testing.assert_close(dcp_values(folder, ["model.a"])["model.a"], _model_sd()["a"])


def test_a_function_step_streams_dcp_into_safetensors(folder, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "model.safetensors"
    result = cm.upgrade_file(folder, out, _schema(rename_and_scale), from_version="1.0.0")
    assert result.streamed and result.format == "safetensors"
    want = cm.load(folder, schema=_schema(rename_and_scale), from_version="1.0.0").state_dict
    got = load_file(out)
    assert list(got) == list(want)
    _assert_same(got, want)
