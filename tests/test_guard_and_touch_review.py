"""Read on touch and the read-only guard against the loaded path: a second adversarial
review's cases (the first's are in test_dcp_read_on_touch.py). Each comment says what the code
did then ("wrong") and what is right."""

from __future__ import annotations

import collections
import copy
import enum
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from dcp_steps import (
    EXACT,
    assert_same,
    save_folder,
    schema_of,
    small_model,
    upgraded_without_reading,
)
from torch.distributed.checkpoint import FileSystemWriter

import ckptmigrate as cm
from ckptmigrate.io.files import read_checkpoint


def _model_sd() -> dict[str, torch.Tensor]:
    return small_model()


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return save_folder(tmp_path / "step-100", {"model": _model_sd()})


# -- 1. (every format) copy.deepcopy of the state dict mixes up its tensors ----------------------


def deepcopy_state(ckpt: cm.Checkpoint) -> None:
    ckpt.state_dict = copy.deepcopy(ckpt.state_dict)


def test_a_deep_copy_of_the_state_dict_keeps_each_tensor(tmp_path):
    # wrong: ReadOnlyTensor.__deepcopy__ deep-copies a temporary `self.as_subclass(Tensor)`,
    # and torch's Tensor.__deepcopy__ files the copy in memo under id(temporary); the
    # temporary dies, the next tensor's temporary gets the same id, and deepcopy hands back
    # the earlier tensor's copy: 'i' (int64) comes out as a copy of 'b' (float32), silently.
    # right: each key keeps its own values and dtype, as copy.deepcopy of plain tensors.
    sd = {"a": torch.ones(3), "b": torch.zeros(2), "i": torch.arange(3)}
    pth = tmp_path / "m.pth"
    torch.save({"state_dict": sd}, pth)
    got = cm.load(pth, schema=schema_of(deepcopy_state), from_version="1.0.0")
    assert_same(got.state_dict, sd)


def test_a_deep_copy_of_a_dcp_state_dict_keeps_each_tensor(folder, tmp_path):
    # wrong: as above, on both paths, and differently: cm.load gives 'i' a's values (float32),
    # upgrade_file gives 'b' a's values. right: the folder's own tensors.
    out = tmp_path / "v2"
    cm.upgrade_file(folder, out, schema_of(deepcopy_state), from_version="1.0.0")
    assert_same(read_checkpoint(out).state_dict, _model_sd())
    want = cm.load(folder, schema=schema_of(deepcopy_state), from_version="1.0.0")
    assert_same(want.state_dict, _model_sd())


# -- 2. (every format) f"{t:.3f}" of a 0-dim input fails under the guard -------------------------


def format_a_scalar(ckpt: cm.Checkpoint) -> None:
    ckpt.extra["first"] = f"{ckpt.state_dict['a'][0, 0]:.3f}"


def test_formatting_a_0_dim_input_works_as_on_a_plain_tensor(folder, tmp_path):
    # wrong: torch's Tensor.__format__ formats a 0-dim tensor as its item only when
    # type(self) is Tensor; behind the guard it is a ReadOnlyTensor, so a step that works on
    # plain tensors fails ("unsupported format string passed to ReadOnlyTensor.__format__"),
    # on the loaded folder and on touch alike. right: "-1.126", as on the plain tensor.
    plain = f"{_model_sd()['a'][0, 0]:.3f}"
    out = tmp_path / "v2"
    cm.upgrade_file(folder, out, schema_of(format_a_scalar), from_version="1.0.0")
    assert read_checkpoint(out).extra["first"] == plain
    want = cm.load(folder, schema=schema_of(format_a_scalar), from_version="1.0.0")
    assert want.extra["first"] == plain


# -- 3. a view kept from one step, written through .data in a later one ---------------------------

KEPT: dict[str, torch.Tensor] = {}


def keep_a_view(ckpt: cm.Checkpoint) -> None:
    KEPT["row"] = ckpt.state_dict["a"][0]


def write_through_its_data(ckpt: cm.Checkpoint) -> None:
    KEPT["row"].data.fill_(7.0)


# -- 4. a value the output cannot be loaded back with ---------------------------------------------


class Phase(enum.Enum):
    WARMUP = 1


Pair = collections.namedtuple("Pair", "x y")


# -- 5. (every format) a step's edit of named optimizer state is lost ----------------------------


@pytest.fixture()
def with_optimizer(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    model = {"a": torch.randn(4, 6, generator=gen), "b": torch.randn(6, generator=gen)}
    state = {k: {"step": torch.tensor(3.0), "exp_avg": v * 0.5} for k, v in model.items()}
    optimizer = {"state": state, "param_groups": [{"lr": 0.01, "params": list(model)}]}
    out = tmp_path / "step-300"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model, "optimizer": optimizer}, storage_writer=FileSystemWriter(out))
    return out


def rename_and_zero_its_state(ckpt: cm.Checkpoint) -> None:
    ckpt.state_dict["a2"] = ckpt.state_dict.pop("a")
    state = ckpt.optimizer["state"]
    state["a2"] = state.pop("a")
    state["a2"]["exp_avg"] = state["a2"]["exp_avg"] * 0


def rename_zero_and_regroup(ckpt: cm.Checkpoint) -> None:
    rename_and_zero_its_state(ckpt)
    ckpt.optimizer["param_groups"][0]["params"] = ["a2", "b"]


def add_a_parameter_with_state(ckpt: cm.Checkpoint) -> None:
    ckpt.state_dict["c"] = torch.zeros(3)
    ckpt.optimizer["state"]["c"] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3)}
    ckpt.optimizer["param_groups"][0]["params"].append("c")


WANT_ZERO = {
    rename_and_zero_its_state: "a2",
    rename_zero_and_regroup: "a2",
    add_a_parameter_with_state: "c",
}


# -- 6. a tensor the DCP writer cannot store: a bare torch error, or an unreadable folder ----------


def sparse_in_extra(ckpt: cm.Checkpoint) -> None:
    ckpt.extra["adjacency"] = torch.eye(2).to_sparse()


def sparse_in_state(ckpt: cm.Checkpoint) -> None:
    ckpt.state_dict["adjacency"] = torch.eye(2).to_sparse()


def nested_in_state(ckpt: cm.Checkpoint) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors are a prototype
        ckpt.state_dict["ragged"] = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])


@pytest.mark.parametrize("step", [sparse_in_extra, sparse_in_state, nested_in_state])
def test_a_tensor_dcp_cannot_store_is_a_clear_error(folder, tmp_path, step):
    # wrong: a sparse tensor reaches save_dcp_chunk's tensor.contiguous() and a nested one
    # settle's plain.shape: upgrade_file dies with a bare RuntimeError ("unsupported memory
    # format option Contiguous", "NestedTensorImpl doesn't support sizes. Please file an
    # issue"), a traceback at the command line. right: a CkptMigrateError (a
    # CheckpointWriteError naming the key), nothing written.
    out = tmp_path / "v2"
    try:
        cm.upgrade_file(folder, out, schema_of(step), from_version="1.0.0")
    except Exception as exc:  # noqa: BLE001 - what escapes is the point
        assert isinstance(exc, cm.CkptMigrateError), f"{type(exc).__name__}: {exc}"
    assert not out.exists()


def quantized_in_state(ckpt: cm.Checkpoint) -> None:
    ckpt.state_dict["q"] = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)


def test_a_quantized_tensor_is_not_written_into_a_folder_that_cannot_be_read(folder, tmp_path):
    # wrong: the DCP writer stores the step's quantized tensor and the upgrade succeeds, but
    # the folder it wrote cannot be loaded ("DCP could not load it (RuntimeError: false
    # INTERNAL ASSERT FAILED ... Quantized...)"): a corrupt output. The .pth writer stores it
    # and reads it back. right: it reads back (q's int_repr as written), or the upgrade is
    # refused before anything is written.
    out = tmp_path / "v2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cm.upgrade_file(folder, out, schema_of(quantized_in_state), from_version="1.0.0")
        except cm.CkptMigrateError:
            assert not out.exists()
            return
        got = read_checkpoint(out)
    assert got.state_dict["q"].int_repr().tolist() == [10, 10]


# -- 7. torch.func.grad over an input: on touch it runs on the meta tensor -----------------------


def grad_of_an_input(ckpt: cm.Checkpoint) -> None:
    ckpt.state_dict["g"] = torch.func.grad(lambda x: (x * x).sum())(ckpt.state_dict["b"])


def jacrev_of_an_input(ckpt: cm.Checkpoint) -> None:
    jac = torch.func.jacrev(lambda t: t * 2)(ckpt.state_dict["b"])
    ckpt.state_dict["g"] = jac.diagonal().clone()


@pytest.mark.parametrize("step", [grad_of_an_input, jacrev_of_an_input])
def test_torch_func_grad_over_an_input_works_as_when_loaded(folder, tmp_path, step):
    # wrong: loaded, the step gives g = 2 * b. on touch, functorch wraps the unread OnTouch
    # (its meta tensor) and the upgrade fails: "RuntimeError: Function MulBackward0 returned
    # an invalid gradient at index 0 - expected device meta but got cpu". right: g = 2 * b,
    # as loaded.
    want = cm.load(folder, schema=schema_of(step), from_version="1.0.0")
    out = tmp_path / "v2"
    cm.upgrade_file(folder, out, schema_of(step), from_version="1.0.0")
    assert_same(read_checkpoint(out).state_dict, want.state_dict)


# -- 8. (every format) pickling an input inside a step fails ------------------------------------


def round_trip_through_torch_save(ckpt: cm.Checkpoint) -> None:
    import io

    buf = io.BytesIO()
    torch.save(ckpt.state_dict["b"], buf)
    buf.seek(0)
    ckpt.state_dict["b2"] = torch.load(buf, weights_only=True)


def test_torch_save_of_an_input_inside_a_step_works(folder, tmp_path):
    # wrong: the guard's ReadOnlyTensor is a class local to _guard_class, so torch.save (or
    # pickle.dumps, or multiprocessing) of an input fails in both paths: "AttributeError:
    # Can't pickle local object '_guard_class.<locals>.ReadOnlyTensor'". A step that works on
    # plain tensors fails under the guard. right: b2 equals b (a plain tensor).
    out = tmp_path / "v2"
    cm.upgrade_file(folder, out, schema_of(round_trip_through_torch_save), from_version="1.0.0")
    got = read_checkpoint(out).state_dict
    torch.testing.assert_close(got["b2"], _model_sd()["b"], **EXACT)


# -- 9. --in-place of a DCP folder: the backup shares its rank files with the upgraded folder ----


def double_b(ckpt: cm.Checkpoint) -> None:
    ckpt.state_dict["b"] = ckpt.state_dict["b"] * 2


# -- 10. torch.tensor(input): on touch it copies out of the meta tensor --------------------------


def tensor_of_an_input(ckpt: cm.Checkpoint) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "To copy construct from a tensor, use clone()"
        ckpt.extra["total"] = float(torch.tensor(ckpt.state_dict["b"]).sum())


def test_torch_tensor_of_an_input_works_as_when_loaded(folder, tmp_path):
    # wrong: loaded, torch.tensor(b) is a copy of b. on touch, torch.tensor() builds its
    # result from the unread OnTouch's meta tensor (a meta result; a step that keeps it falls
    # back to the loaded path, one that looks at it fails): "NotImplementedError: Cannot copy
    # out of meta tensor; no data!". right: the sum of b, as loaded.
    want = cm.load(folder, schema=schema_of(tensor_of_an_input), from_version="1.0.0")
    out = tmp_path / "v2"
    cm.upgrade_file(folder, out, schema_of(tensor_of_an_input), from_version="1.0.0")
    assert read_checkpoint(out).extra["total"] == want.extra["total"]


# -- 11. (every format) str() of an input names the guard's class --------------------------------


def note_a_value(ckpt: cm.Checkpoint) -> None:
    ckpt.extra["note"] = "first index " + str(ckpt.state_dict["i"][0, 1])


def test_str_of_an_input_is_what_torch_prints(folder, tmp_path):
    # wrong: str()/print()/repr() of an input behind the guard says "ReadOnlyTensor(1,
    # dtype=torch.int32)" where plain torch says "tensor(1, dtype=torch.int32)": a step
    # recording a value in a note writes the guard's class name into the checkpoint (both
    # paths). right: torch's own text.
    plain = "first index " + str(_model_sd()["i"][0, 1])
    out = tmp_path / "v2"
    cm.upgrade_file(folder, out, schema_of(note_a_value), from_version="1.0.0")
    assert read_checkpoint(out).extra["note"] == plain


# -- 12. (not DCP) a value no writer can store in ckpt.meta: a bare pickling error ----------------


def unwritable_meta(ckpt: cm.Checkpoint) -> None:
    ckpt.meta["made_by"] = lambda: 1


def test_an_unwritable_value_in_meta_is_refused_before_the_backup(tmp_path):
    # wrong: _check_picklable looks at extra, optimizer and *_extra_state but not meta, and
    # the .pth writer (no JSON check, unlike DCP and safetensors) dies with a bare
    # "AttributeError: Can't pickle local object 'unwritable_meta.<locals>.<lambda>'", after
    # the in-place backup m.pth.1.0.0.bak was made (it stays). right:
    # a CheckpointWriteError before any backup is made or byte written, as for extra.
    pth = tmp_path / "m.pth"
    torch.save({"state_dict": {"a": torch.ones(2)}}, pth)
    before = pth.read_bytes()
    try:
        cm.upgrade_in_place(pth, schema_of(unwritable_meta), from_version="1.0.0")
    except Exception as exc:  # noqa: BLE001 - what escapes is the point
        assert isinstance(exc, cm.CheckpointWriteError), f"{type(exc).__name__}: {exc}"
    else:
        pytest.fail("a lambda was written")
    assert pth.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth"]


# -- 13. a call that returns the input itself (or an alias) reads it --------------------------------


NO_OPS = {
    "cpu": lambda v: v.cpu(),
    "to(float32)": lambda v: v.to(torch.float32),
    "float": lambda v: v.float(),
    "contiguous": lambda v: v.contiguous(),
    "detach": lambda v: v.detach(),
    "view_as": lambda v: v.view_as(v),
}


@pytest.mark.parametrize("call", sorted(NO_OPS))
def test_a_call_that_returns_the_input_as_it_is_does_not_read_it(folder, tmp_path, call):
    # wrong: the usual normalisation of a conversion script (`{k: v.cpu().float()
    # .contiguous() ...}`) reads every tensor of the folder although each call returns the
    # tensor itself (cpu, to, float, contiguous: torch returns self) or an alias of it
    # (detach, view_as): the step's memory and time are the whole checkpoint's. detach and
    # view_as also write the tensor anew into the values file. The probe, as in
    # test_a_tensor_the_step_never_uses_is_never_read: a chunk that cannot be read. right:
    # no read; the tensor keeps its chunk in the linked rank file.
    op = NO_OPS[call]

    def normalise(ckpt: cm.Checkpoint) -> None:
        ckpt.state_dict["a"] = op(ckpt.state_dict["a"])

    assert upgraded_without_reading(folder, tmp_path, "model.a", normalise).is_dir()


# -- 14. (state keyed by name: every DCP folder) a change of type, not of value, is dropped -------


def step_to_tensor(ckpt: cm.Checkpoint) -> None:
    for state in ckpt.optimizer["state"].values():
        state["step"] = torch.tensor(float(state["step"]))  # torch >= 1.12 keeps it a tensor


def lr_to_tensor(ckpt: cm.Checkpoint) -> None:
    for group in ckpt.optimizer["param_groups"]:
        group["lr"] = torch.tensor(group["lr"])  # as a capturable / compiled optimizer keeps it


@pytest.mark.parametrize("step", [step_to_tensor, lr_to_tensor], ids=lambda s: s.__name__)
def test_a_step_that_makes_an_optimizer_number_a_tensor_is_kept(tmp_path, step):
    # wrong: with state keyed by parameter name, _state_changed/_changed compare the old
    # int 3 with the new tensor(3.) by `bool(old != new)`: equal, so "unchanged", and
    # write_back puts the old int back; the same for an lr made a tensor. Keyed by position
    # the step's tensor is kept (step_to_tensor). right: the step's values, keyed either way.
    model = {"a": torch.ones(2), "b": torch.ones(3)}
    state = {k: {"step": 3, "exp_avg": torch.ones(n)} for k, n in (("a", 2), ("b", 3))}
    optimizer = {"state": state, "param_groups": [{"lr": 0.1, "params": ["a", "b"]}]}
    pth = tmp_path / "m.pth"
    torch.save({"state_dict": model, "optimizer": optimizer}, pth)
    got = cm.load(pth, schema=schema_of(step), from_version="1.0.0").optimizer
    if step is step_to_tensor:
        assert all(isinstance(s["step"], torch.Tensor) for s in got["state"].values())
    else:
        assert isinstance(got["param_groups"][0]["lr"], torch.Tensor)


# -- 15. (state keyed by name) dropping the optimizer, or splitting a group, is undone ------------


def drop_the_optimizer(ckpt: cm.Checkpoint) -> None:
    ckpt.optimizer = None  # a release checkpoint: weights only


def split_the_group(ckpt: cm.Checkpoint) -> None:
    group = ckpt.optimizer["param_groups"][0]
    first, *rest = group["params"]
    ckpt.optimizer["param_groups"] = [
        {**group, "params": [first]},
        {**group, "params": rest, "weight_decay": 0.0},  # no decay for the rest
    ]


# -- 16. (every format) extra made something not a dict: a bare error ------------------------------


def extra_none(ckpt: cm.Checkpoint) -> None:
    ckpt.extra = None


@pytest.mark.parametrize("output", ["v2", "o.pth", "o.safetensors"])
def test_extra_that_is_no_longer_a_dict_is_a_migration_error(folder, tmp_path, output):
    # wrong: a step that sets state_dict or hparams to None gets "MigrationError: ...
    # state_dict became a NoneType, not a dict"; extra is not checked, and upgrade_file dies
    # with a bare "AttributeError: 'NoneType' object has no attribute 'items'" (DCP and
    # .pth; safetensors: TypeError), while cm.load returns extra None. right: a
    # MigrationError as for the other parts, nothing written.
    sources = {"v2": folder, "o.pth": tmp_path / "m.pth", "o.safetensors": tmp_path / "m.pth"}
    torch.save({"state_dict": {"a": torch.ones(2)}, "epoch": 1}, tmp_path / "m.pth")
    out = tmp_path / output
    with pytest.raises(cm.MigrationError):
        cm.upgrade_file(sources[output], out, schema_of(extra_none), from_version="1.0.0")
    assert not out.exists()


# -- 17. (every format) the guard does not follow a step into its worker threads -------------------


def write_through_data_in_a_worker(ckpt: cm.Checkpoint) -> None:
    from concurrent.futures import ThreadPoolExecutor

    sd = ckpt.state_dict
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: sd["a"].data.fill_(5.0)).result()


# -- 18. a write through a view of detach() of an input: refused loaded, written on touch ----------


def write_through_a_detached_view(ckpt: cm.Checkpoint) -> None:
    x = ckpt.state_dict["a"].detach()
    x[0].add_(1.0)


def write_through_a_detached_reshape(ckpt: cm.Checkpoint) -> None:
    ckpt.state_dict["a"].detach().view(-1)[0] = 100.0


def write_through_a_view_of_a_parameter(ckpt: cm.Checkpoint) -> None:
    p = torch.nn.Parameter(ckpt.state_dict["a"], requires_grad=False)  # made by detach()
    p[0].fill_(0.0)


@pytest.mark.parametrize(
    "step",
    [
        write_through_a_detached_view,
        write_through_a_detached_reshape,
        write_through_a_view_of_a_parameter,
    ],
)
def test_a_write_through_a_view_of_a_detached_input_is_refused(folder, tmp_path, step):
    # wrong: detach() of an unread input is an OnTouch alias (_alias) that no guard knows:
    # reading it reads the input without the input's guard callback, so the input's storage
    # never joins the step's guarded set and no version is recorded; x[0] (a view) comes
    # back plain and add_/setitem write into the input's memory. Loaded: "it writes into an
    # input tensor in place (add_)". on touch: the upgrade succeeds and writes the changed
    # row (changed() sees it). right: refused as when loaded, nothing written.
    with pytest.raises(cm.MigrationError, match="in place"):
        cm.load(folder, schema=schema_of(step), from_version="1.0.0")
    out = tmp_path / "v2"
    with pytest.raises(cm.MigrationError, match="in place"):
        cm.upgrade_file(folder, out, schema_of(step), from_version="1.0.0")
    assert not out.exists()


def scale_a_row_of_an_assigned_weight(ckpt: cm.Checkpoint) -> None:
    m = torch.nn.Linear(6, 4, bias=False)
    m.load_state_dict({"weight": ckpt.state_dict["a"]}, assign=True)
    with torch.no_grad():
        m.weight[0] *= 2


def test_the_in_place_refusal_names_the_same_call_as_when_loaded(folder, tmp_path):
    # wrong: loaded, the refusal names the call that writes: "... in place (mul_)"; on
    # touch the same step is refused at "(__setitem__)" (the row view is plain, mul_ runs,
    # and the guard only catches the setitem that follows). right: the same message.
    step = scale_a_row_of_an_assigned_weight
    with pytest.raises(cm.MigrationError) as loaded:
        cm.load(folder, schema=schema_of(step), from_version="1.0.0")
    with pytest.raises(cm.MigrationError) as touched:
        cm.upgrade_file(folder, tmp_path / "v2", schema_of(step), from_version="1.0.0")
    assert str(touched.value) == str(loaded.value)


# -- 19. the fallback to the loaded path runs the step a second time --------------------------------

RUNS: list[int] = []


def init_a_new_layer_and_copy_b(ckpt: cm.Checkpoint) -> None:
    RUNS.append(1)
    ckpt.state_dict["new.weight"] = torch.randn(3)  # a new layer, from the global generator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt.state_dict["b2"] = torch.tensor(ckpt.state_dict["b"])  # meta on touch (case 10)


# -- 20. dicts in extra that DCP's own save handles ---------------------------------------------


def int_keyed_dict(ckpt: cm.Checkpoint) -> None:
    ckpt.extra["by_layer"] = {1: "attn", 2: ckpt.state_dict["b"] * 2}


def test_a_dict_with_int_keys_in_extra_is_written_readably(folder, tmp_path):
    # wrong: the rewrite records the route ('by_layer', 2) with the int key in .metadata's
    # planner_data (dcp.save itself makes the keys str: ('by_layer', '2')); DCP's loader
    # takes an int route element for a list index, and the folder written cannot be loaded
    # ("DCP could not load it (RuntimeError: Missing key in checkpoint state_dict:
    # by_layer.0.)"), by read_checkpoint or by DCP. right: it loads, as dcp.save's would
    # (keys '1', '2').
    out = tmp_path / "v2"
    cm.upgrade_file(folder, out, schema_of(int_keyed_dict), from_version="1.0.0")
    got = read_checkpoint(out).extra["by_layer"]
    assert sorted(str(k) for k in got) == ["1", "2"]


def defaultdict_in_extra(ckpt: cm.Checkpoint) -> None:
    ckpt.extra["seen"] = collections.defaultdict(list, {"x": [1]})


def test_a_defaultdict_in_extra_is_no_bare_type_error(folder, tmp_path):
    # wrong: settle rebuilds each dict as type(node)(pairs) (ontouch._settled, also
    # _plain); defaultdict(pairs) takes the pairs for its default_factory: upgrade_file dies
    # with a bare "TypeError: first argument must be callable or None", while cm.load runs
    # the step. right: written (as a dict, as dcp.save flattens it) or a CkptMigrateError.
    out = tmp_path / "v2"
    try:
        cm.upgrade_file(folder, out, schema_of(defaultdict_in_extra), from_version="1.0.0")
    except Exception as exc:  # noqa: BLE001 - what escapes is the point
        assert isinstance(exc, cm.CkptMigrateError), f"{type(exc).__name__}: {exc}"


# -- 21. (every format) an input in a namedtuple leaks the guard's class ---------------------------


def input_in_a_namedtuple(ckpt: cm.Checkpoint) -> None:
    ckpt.extra["pair"] = Pair(ckpt.state_dict["a"], 1)


def test_an_input_in_a_namedtuple_in_extra_is_written(folder, tmp_path):
    # wrong: run_guarded's _map_tensors/_unwrap skip namedtuples, so the input stays a
    # ReadOnlyTensor inside it: cm.load returns extra["pair"].x as a ReadOnlyTensor, and
    # every writer (DCP on touch, .pth) dies with a bare "AttributeError: Can't pickle local
    # object '_guard_class.<locals>.ReadOnlyTensor'". right: a plain tensor, written (or a
    # CkptMigrateError); _check_picklable passes it because it skips every tensor.
    loaded = cm.load(folder, schema=schema_of(input_in_a_namedtuple), from_version="1.0.0")
    assert type(loaded.extra["pair"].x) is torch.Tensor
    pth = tmp_path / "m.pth"
    torch.save({"state_dict": _model_sd()}, pth)
    for src, out in ((folder, tmp_path / "v2"), (pth, tmp_path / "o.pth")):
        try:
            cm.upgrade_file(src, out, schema_of(input_in_a_namedtuple), from_version="1.0.0")
        except Exception as exc:  # noqa: BLE001 - what escapes is the point
            assert isinstance(exc, cm.CkptMigrateError), f"{out.name}: {type(exc).__name__}: {exc}"


def test_a_step_that_drops_the_optimizer_drops_it(with_optimizer, tmp_path):
    # wrong: keyed by name (every DCP folder), write_back put the followed state back into
    # ckpt.optimizer after the step set it to None: cm.load and upgrade_file both returned
    # the whole optimizer again (keyed by position, it was dropped). right: no optimizer.
    loaded = cm.load(with_optimizer, schema=schema_of(drop_the_optimizer), from_version="1.0.0")
    assert loaded.optimizer is None
    out = tmp_path / "v2"
    cm.upgrade_file(with_optimizer, out, schema_of(drop_the_optimizer), from_version="1.0.0")
    assert read_checkpoint(out).optimizer is None
