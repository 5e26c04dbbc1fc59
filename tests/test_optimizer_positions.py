"""Position-keyed optimizer state (``Adam(model.parameters())``) through renames and beyond.

A step that only renames moves no position, so such state passes through it untouched; any
other step needs each position's name: ``--param-names FILE`` / ``param_names=``, else the
file's own parameter order once verified (counts, and every state tensor shaped like its
parameter; with ``build=``, buffers told from parameters). The models and schemas live in a
migrations module written to disk, as the CLI finds them.
"""

from __future__ import annotations

import copy
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from processes import run

import ckptmigrate as cm

REPO = Path(__file__).resolve().parents[1]
THIS_REPO = {"PYTHONPATH": str(REPO)}  # the CLI runs imports this checkout's package
#: the same float operations in the same order on both sides; slack for summation order only
RTOL, ATOL = 1e-6, 1e-7

MIGRATIONS = '''
import torch
from torch import nn

import ckptmigrate as cm


class Net(nn.Module):
    """``trunk`` (fused ``qkv`` or separate ``q``/``k``/``v``), a float buffer, a ``head``."""

    def __init__(self, trunk="body", split=False):
        super().__init__()
        self.trunk, self.split = trunk, split
        if split:
            for part in "qkv":
                setattr(self, part, nn.Linear(4, 4))
        else:
            setattr(self, trunk, nn.Linear(4, 12))
        self.register_buffer("scale", torch.full((1,), 0.5))  # float, not a parameter
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        if self.split:
            q, k, v = self.q(x), self.k(x), self.v(x)
        else:
            q, k, v = getattr(self, self.trunk)(x).split(4, dim=-1)
        return self.head(torch.tanh(q * k) * self.scale + v)


def train_step(model, opt, batch):
    opt.zero_grad()
    loss = (model(batch) - 1.0).pow(2).mean()
    loss.backward()
    opt.step()
    return loss.detach()


def adam(model):
    return torch.optim.Adam(model.parameters(), lr=0.05)


# renames only: body. -> encoder.
net = cm.Schema("net", current="2.0.0", build=lambda hp: Net("encoder"),
                example_input=lambda: torch.ones(2, 4), optimizer=adam, train_step=train_step)
net.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("body.", "encoder.")])

# a split: needs each position's name; no build=, so the float buffer blocks the deduction
SPLIT = cm.ops.Split("body.{kind}", ["q.{kind}", "k.{kind}", "v.{kind}"])
fused = cm.Schema("fused", current="2.0.0")
fused.add_migration("1.0.0", "2.0.0", [SPLIT])

# the same split with build=: the built model tells the buffer from the parameters
built = cm.Schema("built", current="2.0.0", build=lambda hp: Net(split=True))
built.add_migration("1.0.0", "2.0.0", [SPLIT])
'''

BATCHES = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(6)]


@pytest.fixture()
def mig(tmp_path) -> dict:
    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "net.py").write_text(MIGRATIONS)
    return {**runpy.run_path(str(folder / "net.py")), "dir": folder}


def _trained(mig: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[float]]:
    """Old code after 3 steps, and the 3 losses it takes next (run on copies)."""
    torch.manual_seed(0)
    model = mig["Net"]()
    opt = mig["adam"](model)
    for batch in BATCHES[:3]:
        mig["train_step"](model, opt, batch)
    ahead_model = copy.deepcopy(model)
    ahead_opt = mig["adam"](ahead_model)
    ahead_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    ahead = [float(mig["train_step"](ahead_model, ahead_opt, b)) for b in BATCHES[3:]]
    return model, opt, ahead


def _save_old(path: Path, model, opt, schema: str = "net", order=None) -> dict:
    sd = model.state_dict()
    keys = order if order is not None else list(sd)
    opt_sd = copy.deepcopy(opt.state_dict())
    assert "param_names" not in opt_sd["param_groups"][0]  # keyed by position only
    cm.save(path, cm.Checkpoint({k: sd[k] for k in keys}, schema=schema, version="1.0.0",
                                optimizer=opt_sd))  # fmt: skip
    return opt_sd


def _resumed_losses(mig: dict, model: torch.nn.Module, ckpt: cm.Checkpoint) -> list[float]:
    model.load_state_dict(ckpt.state_dict)
    opt = mig["adam"](model)
    opt.load_state_dict(ckpt.optimizer)
    return [float(mig["train_step"](model, opt, b)) for b in BATCHES[3:]]


def _assert_same_losses(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=RTOL, atol=ATOL)


def _assert_same_state(got: dict, want: dict) -> None:
    assert got["param_groups"][0]["params"] == want["param_groups"][0]["params"]
    assert sorted(got["state"]) == sorted(want["state"])
    for position, state in want["state"].items():
        assert torch.equal(got["state"][position]["exp_avg"], state["exp_avg"]), position


# -- a plan that only renames keeps the positions ----------------------------------------------


def test_the_cli_upgrades_a_rename_only_plan_keeping_positional_state(mig, tmp_path):
    model, opt, ahead = _trained(mig)
    opt_sd = _save_old(tmp_path / "old.pth", model, opt)
    proc = run(
        tmp_path, "upgrade", "old.pth", "-o", "new.pth", "--migrations", "migrations", **THIS_REPO
    )
    assert proc.returncode == 0, proc.stderr
    new = cm.load(tmp_path / "new.pth", upgrade=False)
    _assert_same_state(new.optimizer, opt_sd)
    _assert_same_losses(_resumed_losses(mig, mig["Net"]("encoder"), new), ahead)


def test_load_into_takes_a_rename_only_plan_with_positional_state(mig, tmp_path):
    model, opt, ahead = _trained(mig)
    opt_sd = _save_old(tmp_path / "old.pth", model, opt)
    target = mig["Net"]("encoder")
    ckpt = cm.load_into(target, tmp_path / "old.pth", schema=mig["net"])
    _assert_same_state(ckpt.optimizer, opt_sd)
    _assert_same_losses(_resumed_losses(mig, target, ckpt), ahead)


def test_check_and_the_pytest_plugin_pass_a_resume_fixture_with_positional_state(mig, tmp_path):
    model, opt, ahead = _trained(mig)
    fixtures = tmp_path / "fixtures"
    fixtures.mkdir()
    _save_old(fixtures / "1.0.0.pth", model, opt)
    x = torch.ones(2, 4)
    with torch.no_grad():
        out = model.eval()(x)
    record = {"fixture": "1.0.0.pth", "schema": "net", "version": "1.0.0", "input": x,
              "output": out, "resume": {"batches": BATCHES[3:], "losses": ahead}}  # fmt: skip
    torch.save(record, fixtures / "1.0.0.golden.pt")
    proc = run(tmp_path, "check", "fixtures", "--json", "--migrations", "migrations", **THIS_REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    nudged = {**record, "resume": {"batches": BATCHES[3:], "losses": [v + 1e-3 for v in ahead]}}
    torch.save(nudged, fixtures / "1.0.0.golden.pt")  # the resume check runs, and can fail
    failed = run(tmp_path, "check", "fixtures", "--migrations", "migrations", **THIS_REPO)
    assert failed.returncode == 1 and "resumed training differs" in failed.stdout
    torch.save(record, fixtures / "1.0.0.golden.pt")

    (tmp_path / "test_fixtures.py").write_text(
        "def test_it(ckpt_fixture):\n"
        "    result = ckpt_fixture.check('fixtures/1.0.0.golden.pt')\n"
        "    assert result.ok, result.reason\n"
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\nckpt_migrations = migrations\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--ckpt-fixtures",
         "fixtures"], cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout  # the collected fixture and the test that checks it


def _function_schema(fn) -> cm.Schema:
    schema = cm.Schema("net", current="2.0.0")
    schema.migration("1.0.0", "2.0.0")(fn)
    return schema


def rename_trunk(ckpt: cm.Checkpoint) -> None:
    ckpt.state_dict = {k.replace("body.", "encoder."): v for k, v in ckpt.state_dict.items()}


def swap_head_bias_and_scale(ckpt: cm.Checkpoint) -> None:
    """Same names, two same-shaped tensors swapped: positions would now lie."""
    sd = dict(ckpt.state_dict)
    sd["scale"], sd["body.bias"] = sd["body.bias"][:1].clone(), sd["body.bias"]
    ckpt.state_dict = sd


def test_a_function_step_that_only_renames_keeps_positional_state(mig, tmp_path):
    model, opt, ahead = _trained(mig)
    opt_sd = _save_old(tmp_path / "old.pth", model, opt)
    ckpt = cm.load(tmp_path / "old.pth", schema=_function_schema(rename_trunk))
    _assert_same_state(ckpt.optimizer, opt_sd)
    _assert_same_losses(_resumed_losses(mig, mig["Net"]("encoder"), ckpt), ahead)


def test_a_function_step_that_replaces_tensors_needs_the_names(mig, tmp_path):
    model, opt, _ = _trained(mig)
    _save_old(tmp_path / "old.pth", model, opt)
    with pytest.raises(
        cm.ParamNamesUnknownError, match=r"swap_head_bias_and_scale.*param_names=\[\.\.\.\]"
    ):
        cm.load(tmp_path / "old.pth", schema=_function_schema(swap_head_bias_and_scale))


def test_a_rename_that_moves_a_tensor_into_another_module_needs_the_names(mig, tmp_path):
    model, opt, _ = _trained(mig)
    _save_old(tmp_path / "old.pth", model, opt)
    schema = cm.Schema("net", current="2.0.0")  # body.bias now listed after head's entries
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenameKeys(r"^body\.bias$", "head.extra")])
    with pytest.raises(cm.ParamNamesUnknownError, match=r"param_names=\[\.\.\.\]") as raised:
        cm.load(tmp_path / "old.pth", schema=schema)
    assert "--param-names" not in str(raised.value)  # Python callers read the keyword only


# -- other plans: names from the file's verified order, or given --------------------------------


def _split_expectations(opt_sd: dict, ckpt: cm.Checkpoint, mig: dict) -> None:
    """Today's Adam(model.parameters()) loads the state; q/k/v got the fused moments' thirds."""
    target = mig["Net"](split=True)
    target.load_state_dict(ckpt.state_dict)
    opt = mig["adam"](target)
    opt.load_state_dict(ckpt.optimizer)
    fused = opt_sd["state"][0]["exp_avg"]  # body.weight, the optimizer's first parameter
    for i, part in enumerate("qkv"):
        got = opt.state[getattr(target, part).weight]["exp_avg"]
        assert torch.equal(got, fused[4 * i : 4 * (i + 1)]), part
    assert torch.equal(opt.state[target.head.bias]["exp_avg"], opt_sd["state"][3]["exp_avg"])


def test_without_build_a_float_buffer_blocks_the_deduction_and_the_cli_names_the_flag(
    mig, tmp_path
):
    model, opt, _ = _trained(mig)
    _save_old(tmp_path / "old.pth", model, opt, schema="fused")
    proc = run(
        tmp_path, "upgrade", "old.pth", "-o", "new.pth", "--migrations", "migrations", **THIS_REPO
    )
    assert proc.returncode == 2 and not (tmp_path / "new.pth").exists()
    line = proc.stderr.strip()
    assert line.startswith("ckptmigrate: error: ") and "\n" not in line
    assert "5 floating-point tensors" in line and "4 parameters" in line
    assert "--param-names FILE" in line and "param_names=" not in line


def test_with_build_the_files_parameter_order_names_the_state(mig, tmp_path):
    model, opt, _ = _trained(mig)
    opt_sd = _save_old(tmp_path / "old.pth", model, opt, schema="built")
    proc = run(
        tmp_path, "upgrade", "old.pth", "-o", "new.pth", "--migrations", "migrations", **THIS_REPO
    )
    assert proc.returncode == 0, proc.stderr
    _split_expectations(opt_sd, cm.load(tmp_path / "new.pth", upgrade=False), mig)


def test_the_deduction_is_refused_when_a_state_tensor_does_not_fit_its_parameter(mig, tmp_path):
    model, opt, _ = _trained(mig)
    # head first in the file: position 0 (body.weight, 12x4) would be head.weight (3x4)
    order = ["head.weight", "head.bias", "body.weight", "body.bias", "scale"]
    _save_old(tmp_path / "old.pth", model, opt, schema="built", order=order)
    with pytest.raises(
        cm.ParamNamesUnknownError, match=r"\[3, 4\].*exp_avg.*\[12, 4\].*param_names="
    ):
        cm.load(tmp_path / "old.pth", schema=mig["built"])


@pytest.fixture()
def names_file(tmp_path) -> Path:
    path = tmp_path / "names.txt"
    path.write_text(
        "# Adam(model.parameters()) order\nbody.weight\nbody.bias\nhead.weight\nhead.bias\n"
    )
    return path


NAMES = ["body.weight", "body.bias", "head.weight", "head.bias"]


def test_param_names_file_on_the_cli_upgrade_to_a_new_file_and_in_place(mig, tmp_path, names_file):
    model, opt, _ = _trained(mig)
    opt_sd = _save_old(tmp_path / "old.pth", model, opt, schema="fused")
    args = ["--migrations", "migrations", "--param-names", str(names_file)]
    proc = run(tmp_path, "upgrade", "old.pth", "-o", "new.pth", *args, **THIS_REPO)
    assert proc.returncode == 0, proc.stderr
    _split_expectations(opt_sd, cm.load(tmp_path / "new.pth", upgrade=False), mig)
    proc = run(tmp_path, "upgrade", "old.pth", "--in-place", *args, **THIS_REPO)
    assert proc.returncode == 0, proc.stderr
    _split_expectations(opt_sd, cm.load(tmp_path / "old.pth", upgrade=False), mig)


def test_a_param_names_file_that_does_not_fit_is_refused(mig, tmp_path):
    model, opt, _ = _trained(mig)
    _save_old(tmp_path / "old.pth", model, opt, schema="fused")
    (tmp_path / "names.txt").write_text("body.weight\nbody.bias\nhead.weight\n")
    args = ["--migrations", "migrations", "--param-names", "names.txt"]
    proc = run(tmp_path, "upgrade", "old.pth", "-o", "new.pth", *args, **THIS_REPO)
    assert proc.returncode == 2 and "3 names, but the optimizer holds 4" in proc.stderr


@pytest.mark.parametrize("how", ["upgrade_file", "upgrade_in_place", "load_into"])
def test_param_names_on_the_python_api(mig, tmp_path, how):
    model, opt, _ = _trained(mig)
    opt_sd = _save_old(tmp_path / "old.pth", model, opt, schema="fused")
    schema = mig["fused"]
    if how == "upgrade_file":
        cm.upgrade_file(tmp_path / "old.pth", tmp_path / "new.pth", schema, param_names=NAMES)
        ckpt = cm.load(tmp_path / "new.pth", upgrade=False)
    elif how == "upgrade_in_place":
        cm.upgrade_in_place(tmp_path / "old.pth", schema, param_names=NAMES)
        ckpt = cm.load(tmp_path / "old.pth", upgrade=False)
    else:
        ckpt = cm.load_into(mig["Net"](split=True), tmp_path / "old.pth", schema=schema,
                            param_names=NAMES)  # fmt: skip
    _split_expectations(opt_sd, ckpt, mig)


def test_named_state_is_placed_by_name_not_by_the_files_key_order(mig, tmp_path):
    model, opt, _ = _trained(mig)
    # the file lists head first; the optimizer (and today's model) list body first
    order = ["head.weight", "head.bias", "scale", "body.weight", "body.bias"]
    opt_sd = _save_old(tmp_path / "old.pth", model, opt, schema="fused", order=order)
    ckpt = cm.load(tmp_path / "old.pth", schema=mig["fused"], param_names=NAMES)
    _split_expectations(opt_sd, ckpt, mig)


def test_several_param_groups_are_never_named_from_the_files_order(tmp_path):
    # a head at another lr listed first: positions 0 = head, 1 = body, while the file lists
    # body first; with equal shapes the "verified" deduction put body's state on head
    torch.manual_seed(0)
    body, head = torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False)
    model = torch.nn.ModuleDict({"body": body, "head": head})
    opt = torch.optim.Adam(
        [{"params": head.parameters(), "lr": 1e-3}, {"params": body.parameters(), "lr": 1e-4}]
    )
    head(body(torch.randn(3, 4))).sum().backward()
    opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "g.pth")
    schema = cm.Schema("grp", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.Transpose("head.weight")])

    with pytest.raises(cm.ParamNamesUnknownError, match="2 param groups"):
        cm.load(tmp_path / "g.pth", schema=schema, from_version="1.0.0")

    names = ["head.weight", "body.weight"]  # the order the optimizer got them
    ckpt = cm.load(tmp_path / "g.pth", schema=schema, from_version="1.0.0", param_names=names)
    old = opt.state_dict()["state"]
    new = ckpt.optimizer["state"]
    assert torch.equal(new[0]["exp_avg"], old[0]["exp_avg"].T)  # head's state followed head
    assert torch.equal(new[1]["exp_avg"], old[1]["exp_avg"])


def test_diff_upgrade_takes_param_names_for_a_plan_that_needs_them(mig, tmp_path, names_file):
    model, opt, _ = _trained(mig)
    _save_old(tmp_path / "old.pth", model, opt, schema="fused")
    args = ["--migrations", "migrations", "--param-names", str(names_file)]
    assert run(tmp_path, "upgrade", "old.pth", "-o", "new.pth", *args, **THIS_REPO).returncode == 0
    diff = ["diff", "old.pth", "new.pth", "--upgrade", "--values", "--migrations", "migrations"]
    refused = run(tmp_path, *diff, **THIS_REPO)
    assert refused.returncode == 2 and "--param-names FILE" in refused.stderr
    assert "param_names=" not in refused.stderr
    done = run(tmp_path, *diff, "--param-names", str(names_file), **THIS_REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no drift" in done.stdout
    lone = run(
        tmp_path, "diff", "old.pth", "new.pth", "--param-names", str(names_file), **THIS_REPO
    )
    assert lone.returncode == 2 and "add --upgrade" in lone.stderr


def test_param_names_reach_a_mount_whose_plan_splits_its_parameters(mig, tmp_path):
    from packaging.version import Version

    from ckptmigrate.values.stamp import Mount

    model, opt, _ = _trained(mig)
    opt_sd = copy.deepcopy(opt.state_dict())
    sd = {f"m.{k}": v for k, v in model.state_dict().items()}
    mounted = cm.Checkpoint(sd, optimizer=opt_sd, mounts=[Mount("m.", "fused", Version("1.0.0"))])
    cm.save(tmp_path / "old.pth", mounted)
    (tmp_path / "names.txt").write_text("".join(f"m.{n}\n" for n in NAMES))
    args = ["upgrade", "old.pth", "-o", "new.pth", "--migrations", "migrations"]
    refused = run(tmp_path, *args, **THIS_REPO)
    assert refused.returncode == 2 and "--param-names FILE" in refused.stderr
    done = run(tmp_path, *args, "--param-names", "names.txt", **THIS_REPO)
    assert done.returncode == 0, done.stderr
    new = cm.load(tmp_path / "new.pth", upgrade=False)
    view = cm.Checkpoint(
        {k[2:]: v for k, v in new.state_dict.items()}, optimizer=new.optimizer
    )  # what today's Net (at m.) and Adam(model.parameters()) load
    _split_expectations(opt_sd, view, mig)
