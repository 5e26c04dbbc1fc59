"""Running a plan: purity, in-place writes refused, failures named and chained, history kept."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from packaging.version import Version

import ckptmigrate as cm
from ckptmigrate import ops


def make_ckpt(**kwargs) -> cm.Checkpoint:
    defaults = dict(
        state_dict={"w": torch.arange(4.0), "b": torch.ones(2)},
        hparams={"d": 4, "nested": {"eps": 1e-5}},
        meta={"notes": ["a"]},
        schema="m",
        version="1.0.0",
        history=[{"from": "0.9.0", "to": "1.0.0", "step": "older"}],
        optimizer={"state": {0: {"step": 1}}, "param_groups": [{"lr": 0.1}]},
        extra={"epoch": 3, "callbacks": {"cb": {"n": 1}}},
    )
    defaults.update(kwargs)
    return cm.Checkpoint(**defaults)


def schema_with(fn, *, source="1.0.0", target="2.0.0", **kwargs) -> cm.Schema:
    schema = cm.Schema("m", current=target)
    schema.migration(source, target, **kwargs)(fn)
    return schema


def snapshot(ckpt: cm.Checkpoint) -> dict:
    return {
        "keys": list(ckpt.state_dict),
        "ids": {k: id(v) for k, v in ckpt.state_dict.items()},
        "values": {k: v.clone() for k, v in ckpt.state_dict.items()},
        "versions": {k: v._version for k, v in ckpt.state_dict.items()},
        "hparams": repr(ckpt.hparams),
        "meta": repr(ckpt.meta),
        "history": repr(ckpt.history),
        "optimizer": repr(ckpt.optimizer),
        "extra": repr(ckpt.extra),
        "version": ckpt.version,
    }


def assert_unchanged(ckpt: cm.Checkpoint, before: dict) -> None:
    after = snapshot(ckpt)
    for key in ("keys", "ids", "versions", "hparams", "meta", "history", "optimizer", "extra"):
        assert after[key] == before[key], key
    for key, value in before["values"].items():
        assert torch.equal(ckpt.state_dict[key], value), key
    assert ckpt.version == before["version"]


# ---------------------------------------------------------------- purity


def test_upgrade_leaves_the_input_untouched_when_a_step_mutates_in_place():
    def mutate_everything(ckpt):
        ckpt.state_dict["new"] = ckpt.state_dict.pop("w") * 2
        ckpt.hparams["d"] = 8
        ckpt.hparams["nested"]["eps"] = 1e-6
        ckpt.meta["notes"].append("b")
        ckpt.history.append({"bogus": True})
        ckpt.optimizer["param_groups"][0]["lr"] = 1.0
        ckpt.extra["epoch"] = 99
        ckpt.extra["callbacks"]["cb"]["n"] = 2

    ckpt = make_ckpt()
    before = snapshot(ckpt)
    out = cm.upgrade(ckpt, schema_with(mutate_everything))
    assert_unchanged(ckpt, before)
    assert out.hparams["nested"]["eps"] == 1e-6
    assert out.extra["callbacks"]["cb"]["n"] == 2
    assert out.optimizer["param_groups"][0]["lr"] == 1.0
    assert torch.equal(out.state_dict["new"], torch.arange(4.0) * 2)


def test_upgrade_shares_untouched_tensors_and_returns_plain_tensors():
    def rename(ckpt):
        ckpt.state_dict = {k.upper(): v for k, v in ckpt.state_dict.items()}
        ckpt.state_dict["HEAD"] = ckpt.state_dict["W"][:2]

    ckpt = make_ckpt()
    out = cm.upgrade(ckpt, schema_with(rename))
    assert out.state_dict["W"] is ckpt.state_dict["w"]
    assert all(type(v) is torch.Tensor for v in out.state_dict.values())
    assert out is not ckpt


def test_upgrade_to_the_stored_version_returns_an_equal_copy():
    ckpt = make_ckpt()
    out = cm.upgrade(ckpt, schema_with(lambda c: None), to="1.0.0")
    assert out is not ckpt and out.state_dict is not ckpt.state_dict
    assert out.version == Version("1.0.0") and out.history == ckpt.history


def test_a_step_may_return_a_new_checkpoint():
    def rebuild(ckpt):
        return cm.Checkpoint({"only": ckpt.state_dict["w"] + 1}, hparams={"x": 1})

    out = cm.upgrade(make_ckpt(), schema_with(rebuild))
    assert list(out.state_dict) == ["only"]
    assert out.schema == "m" and out.version == Version("2.0.0")


def test_a_failure_in_a_later_step_leaves_the_input_untouched():
    schema = cm.Schema("m", current="3.0.0")

    @schema.migration("1.0.0", "2.0.0")
    def first(ckpt):
        ckpt.hparams["d"] = 5

    @schema.migration("2.0.0", "3.0.0")
    def second(ckpt):
        raise RuntimeError("boom")

    ckpt = make_ckpt()
    before = snapshot(ckpt)
    with pytest.raises(cm.MigrationError):
        cm.upgrade(ckpt, schema)
    assert_unchanged(ckpt, before)


# ---------------------------------------------------------------- in-place writes


def _add_(sd):
    sd["w"].add_(1)


def _setitem(sd):
    sd["w"][0] = 5


def _copy_(sd):
    sd["w"].copy_(torch.zeros(4))


def _out_kwarg(sd):
    torch.add(sd["b"], sd["b"], out=sd["w"][:2])


def _out_kwarg_whole(sd):
    torch.mul(torch.ones(4), 3, out=sd["w"])


def _view_written(sd):
    sd["w"].view(2, 2)[1].zero_()


def _slice_written(sd):
    sd["w"][1:3].mul_(0)


def _detach_written(sd):
    sd["w"].detach().fill_(7)


def _data_written(sd):
    sd["w"].data.sub_(1)


def _iadd(sd):
    w = sd["w"]
    w += 1


def _set_data(sd):
    sd["w"].data = torch.ones(4)


def _numpy_written(sd):
    sd["w"].numpy()[0] = 9


@pytest.mark.parametrize(
    "write",
    [
        _add_,
        _setitem,
        _copy_,
        _out_kwarg,
        _out_kwarg_whole,
        _view_written,
        _slice_written,
        _detach_written,
        _data_written,
        _iadd,
        _set_data,
        _numpy_written,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_a_step_writing_into_an_input_tensor_is_a_migration_error_and_the_input_is_unchanged(
    write,
):
    def step(ckpt):
        write(ckpt.state_dict)

    ckpt = make_ckpt()
    before = snapshot(ckpt)
    with pytest.raises(cm.MigrationError, match="step"):
        cm.upgrade(ckpt, schema_with(step))
    assert_unchanged(ckpt, before)


def test_a_write_that_slips_past_the_guard_is_still_caught_by_the_version_counter():
    def sneaky(ckpt):
        with torch._C.DisableTorchFunctionSubclass():
            ckpt.state_dict["w"].add_(1)

    with pytest.raises(cm.MigrationError, match="in place"):
        cm.upgrade(make_ckpt(), schema_with(sneaky))


def test_two_threads_upgrading_at_once_keep_each_others_guard():
    """One thread's step ending must not unguard another's: a view of an input taken after
    it (``w[:2]``) still refuses the write, and the input keeps its values."""
    import threading

    b_inside, a_done = threading.Event(), threading.Event()
    errors: dict[str, BaseException] = {}

    def slow_writer(ckpt):
        b_inside.set()
        assert a_done.wait(30)
        ckpt.state_dict["w"][:2].add_(100)  # a view made after the other step ended

    def quick(ckpt):
        pass

    victim = make_ckpt()
    before = snapshot(victim)

    def run_b():
        try:
            cm.upgrade(victim, schema_with(slow_writer))
        except BaseException as exc:  # noqa: BLE001 - kept for the assertion below
            errors["b"] = exc

    b = threading.Thread(target=run_b)
    b.start()
    assert b_inside.wait(30)
    cm.upgrade(make_ckpt(), schema_with(quick))
    a_done.set()
    b.join(30)
    assert isinstance(errors.get("b"), cm.MigrationError) and "in place" in str(errors["b"])
    assert_unchanged(victim, before)  # refused before the write, not only noticed after it


def test_a_call_op_writing_in_place_is_a_migration_error_and_the_input_is_unchanged():
    schema = cm.Schema("m", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [ops.Call(lambda c: c.state_dict["w"].add_(1))])
    ckpt = make_ckpt()
    before = snapshot(ckpt)
    with pytest.raises(cm.MigrationError):
        cm.upgrade(ckpt, schema)
    assert_unchanged(ckpt, before)


@pytest.mark.parametrize(
    "write",
    [
        lambda c: c.optimizer["state"][0]["exp_avg"].add_(1),
        lambda c: c.extra["best_score"].fill_(0),
        lambda c: c.hparams["init"][0].mul_(2),
    ],
    ids=["optimizer", "extra", "hparams"],
)
def test_writing_into_a_tensor_outside_the_state_dict_is_a_migration_error(write):
    ckpt = make_ckpt(
        optimizer={"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []},
        extra={"best_score": torch.tensor(0.5)},
        hparams={"init": [torch.arange(2.0)]},
    )
    before = snapshot(ckpt)
    tensors = [
        ckpt.optimizer["state"][0]["exp_avg"],
        ckpt.extra["best_score"],
        ckpt.hparams["init"][0],
    ]
    values = [t.clone() for t in tensors]
    with pytest.raises(cm.MigrationError, match="in place"):
        cm.upgrade(ckpt, schema_with(write))
    assert_unchanged(ckpt, before)
    assert all(torch.equal(t, v) for t, v in zip(tensors, values))


def test_a_step_may_replace_optimizer_tensors_and_gets_plain_tensors_back():
    exp_avg = torch.ones(3)
    ckpt = make_ckpt(optimizer={"state": {0: {"exp_avg": exp_avg, "step": torch.tensor(1.0)}}})

    def step(c):
        c.optimizer["state"][0]["exp_avg"] = c.optimizer["state"][0]["exp_avg"] * 2

    out = cm.upgrade(ckpt, schema_with(step))
    assert torch.equal(out.optimizer["state"][0]["exp_avg"], torch.full((3,), 2.0))
    assert out.optimizer["state"][0]["step"] is ckpt.optimizer["state"][0]["step"]
    assert all(
        type(t) is torch.Tensor for t in out.optimizer["state"][0].values()
    ), "the read-only guard leaked out of the step"
    assert torch.equal(exp_avg, torch.ones(3))


def test_a_step_that_clones_and_writes_into_the_clone_works():
    def step(ckpt):
        w = ckpt.state_dict["w"].clone()
        w.add_(1)
        w[0] = 100
        ckpt.state_dict["w"] = w
        ckpt.state_dict["b"] = torch.cat([ckpt.state_dict["b"], ckpt.state_dict["b"] * 2])

    ckpt = make_ckpt()
    before = snapshot(ckpt)
    out = cm.upgrade(ckpt, schema_with(step))
    assert_unchanged(ckpt, before)
    assert torch.equal(out.state_dict["w"], torch.tensor([100.0, 2.0, 3.0, 4.0]))
    assert torch.equal(out.state_dict["b"], torch.tensor([1.0, 1.0, 2.0, 2.0]))


def test_requires_grad_toggle_is_not_a_write():
    def step(ckpt):
        ckpt.state_dict["w"] = ckpt.state_dict["w"].detach().requires_grad_(False) * 1

    cm.upgrade(make_ckpt(), schema_with(step))


# ---------------------------------------------------------------- failures named and chained


def test_a_step_that_raises_is_a_migration_error_naming_the_step_with_the_cause_chained():
    original = KeyError("blocks.0.weight")

    def rename_blocks(ckpt):
        raise original

    with pytest.raises(cm.MigrationError) as info:
        cm.upgrade(make_ckpt(), schema_with(rename_blocks, source="1.0.0", target="1.1.0"))
    err = info.value
    assert err.__cause__ is original
    assert (err.schema, err.from_version, err.to_version) == (
        "m",
        Version("1.0.0"),
        Version("1.1.0"),
    )
    assert "rename_blocks" in err.step
    message = str(err)
    for part in ("m", "1.0.0", "1.1.0", "rename_blocks", "blocks.0.weight"):
        assert part in message


@pytest.mark.parametrize("returned", [5, {"w": torch.zeros(1)}, "ckpt"], ids=type)
def test_a_step_returning_a_non_checkpoint_is_a_migration_error(returned):
    with pytest.raises(cm.MigrationError, match="return"):
        cm.upgrade(make_ckpt(), schema_with(lambda ckpt: returned))


@pytest.mark.parametrize("value", [3, "text", [1, 2], None])
def test_a_step_leaving_a_non_tensor_in_the_state_dict_is_a_migration_error(value):
    def step(ckpt):
        ckpt.state_dict["bad"] = value

    with pytest.raises(cm.MigrationError, match="'bad'"):
        cm.upgrade(make_ckpt(), schema_with(step))


def test_extra_state_entries_may_hold_non_tensors():
    def step(ckpt):
        ckpt.state_dict["layer._extra_state"] = {"fp8_meta": [1, 2]}

    out = cm.upgrade(make_ckpt(), schema_with(step))
    assert out.state_dict["layer._extra_state"] == {"fp8_meta": [1, 2]}


def test_a_step_replacing_hparams_by_a_non_dict_is_a_migration_error():
    def step(ckpt):
        ckpt.hparams = [("d", 4)]

    with pytest.raises(cm.MigrationError, match="hparams"):
        cm.upgrade(make_ckpt(), schema_with(step))


# ---------------------------------------------------------------- history


def test_history_gets_one_entry_per_step_in_order():
    schema = cm.Schema("m", current="3.0.0")
    schema.add_migration("1.0.0", "1.1.0", [ops.RenamePrefix("w", "weight")])

    @schema.migration("1.1.0", "2.0.0", breaking=True)
    def pin_old_eps(ckpt):
        ckpt.hparams.setdefault("eps", 1e-5)

    @schema.migration("2.0.0", "3.0.0")
    def noop(ckpt):
        pass

    out = cm.upgrade(make_ckpt(), schema)
    assert out.history[0] == {"from": "0.9.0", "to": "1.0.0", "step": "older"}
    added = [(h["from"], h["to"], h["step"], h["breaking"]) for h in out.history[1:]]
    assert added == [
        ("1.0.0", "1.1.0", "rename prefix 'w' -> 'weight'", False),
        ("1.1.0", "2.0.0", pin_old_eps.__qualname__, True),
        ("2.0.0", "3.0.0", noop.__qualname__, False),
    ]
    for entry in out.history[1:]:
        assert entry["applied_at"] and entry["by"].startswith("ckptmigrate ")
    assert out.version == Version("3.0.0")


# ---------------------------------------------------------------- tied tensors


def test_tied_tensors_stay_one_object_after_a_function_step_renames_keys():
    shared = torch.randn(3, 2)
    ckpt = make_ckpt(state_dict={"embed.weight": shared, "head.weight": shared})

    def rename(ckpt):
        ckpt.state_dict = {"tok_" + k: v for k, v in ckpt.state_dict.items()}

    out = cm.upgrade(ckpt, schema_with(rename))
    assert out.state_dict["tok_embed.weight"] is out.state_dict["tok_head.weight"]
    assert out.state_dict["tok_embed.weight"] is shared


def test_tied_tensors_stay_one_object_after_an_op_step():
    shared = torch.randn(3, 2)
    schema = cm.Schema("m", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [ops.RenameKeys(r"(\w+)\.weight", r"\1.w")])
    out = cm.upgrade(make_ckpt(state_dict={"embed.weight": shared, "head.weight": shared}), schema)
    assert out.state_dict["embed.w"] is out.state_dict["head.w"]


# ---------------------------------------------------------------- belonging


def test_a_step_that_calls_sys_exit_is_a_failed_step_not_the_end_of_the_process():
    # SystemExit is no Exception: it went past the step's handler and ended the command with
    # the step's exit code and no message
    def bail_out(ckpt):
        sys.exit(5)

    with pytest.raises(cm.MigrationError) as info:
        cm.upgrade(make_ckpt(), schema_with(bail_out, source="1.0.0", target="1.1.0"))
    assert isinstance(info.value.__cause__, SystemExit)
    assert "bail_out" in str(info.value) and "SystemExit: 5" in str(info.value)


def upgrade_with_step(tmp_path, body: str, imports: str = "") -> subprocess.CompletedProcess:
    """``ckptmigrate upgrade a.pth -o b.pth`` in a real process, the 1.0.0 -> 2.0.0 step
    of schema ``m`` being a function with ``body``."""
    migrations = tmp_path / "mig.py"
    migrations.write_text(
        f"{imports}import ckptmigrate as cm\n"
        "schema = cm.Schema('m', current='2.0.0')\n"
        "@schema.migration('1.0.0', '2.0.0')\n"
        f"def step(ckpt):\n{body}"
    )
    src = tmp_path / "a.pth"
    cm.save(src, {"w": torch.zeros(2)}, schema="m", version="1.0.0")
    return subprocess.run(
        [sys.executable, "-m", "ckptmigrate", "upgrade", str(src), "-o", str(tmp_path / "b.pth")]
        + ["--migrations", str(migrations)],
        capture_output=True,
        text=True,
    )


def test_the_cli_reports_a_step_calling_sys_exit_in_one_line(tmp_path):
    done = upgrade_with_step(tmp_path, "    sys.exit(5)\n", imports="import sys\n")
    assert done.returncode == 2, done
    assert done.stderr.startswith("ckptmigrate: error:") and "step" in done.stderr
    assert "SystemExit: 5" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "b.pth").exists()


def test_the_cli_prints_our_warnings_as_one_line_and_torchs_internal_notes_not_at_all(tmp_path):
    # torch warns about its own internals (a pickle protocol 4 file); that was a second,
    # two-line stderr message beside ours
    done = upgrade_with_step(
        tmp_path,
        "    torch_file = os.path.join(os.path.dirname(torch.__file__), 'serialization.py')\n"
        "    warnings.warn_explicit('a note torch makes', UserWarning, torch_file, 1)\n"
        "    warnings.warn('head.bias starts from\\nzero')\n",
        imports="import os, warnings\nimport torch\n",
    )
    assert done.returncode == 0, done
    assert done.stderr.splitlines() == ["ckptmigrate: warning: head.bias starts from zero"]


def test_checkpoint_of_another_schema_raises_schema_mismatch_before_any_step():
    calls = []
    ckpt = make_ckpt(schema="other")
    with pytest.raises(cm.SchemaMismatchError) as info:
        cm.upgrade(ckpt, schema_with(lambda c: calls.append(1)))
    assert (info.value.expected, info.value.found) == ("m", "other")
    assert calls == []


def test_checkpoint_without_version_raises_unversioned():
    with pytest.raises(cm.UnversionedCheckpointError, match="from_version"):
        cm.upgrade(make_ckpt(schema=None, version=None), schema_with(lambda c: None))
