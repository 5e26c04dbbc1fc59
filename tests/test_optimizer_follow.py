"""Optimizer state follows its parameters through renames, splits, drops, adds and functions."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import ckptmigrate as cm


class Fused(nn.Module):
    """Version 1: a fused q|k|v projection and a ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(4, 12)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn.c_attn(x).split(4, dim=-1)
        return self.head(torch.tanh(q * k) + v)


class Separate(nn.Module):
    """Version 2: separate q/k/v projections; ``head`` renamed ``out`` from version 3."""

    def __init__(self, head: str = "head", extra: bool = False) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.q = nn.Linear(4, 4)
        self.attn.k = nn.Linear(4, 4)
        self.attn.v = nn.Linear(4, 4)
        self.head_name = head
        setattr(self, head, nn.Linear(4, 3))
        if extra:
            self.gate = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        out = getattr(self, self.head_name)(torch.tanh(a.q(x) * a.k(x)) + a.v(x))
        return out * self.gate if hasattr(self, "gate") else out


SPLIT = cm.ops.Split("attn.c_attn.{kind}", ["attn.q.{kind}", "attn.k.{kind}", "attn.v.{kind}"])


def make_schema(*later_steps: tuple[str, str, list]) -> cm.Schema:
    schema = cm.Schema("toy", current="3.0.0")
    schema.add_migration("1.0.0", "2.0.0", [SPLIT])
    for source, target, ops in later_steps:
        schema.add_migration(source, target, ops)
    return schema


BATCHES = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(6)]


def train(model: nn.Module, opt: torch.optim.Optimizer, batches: list) -> list[float]:
    losses = []
    for x in batches:
        opt.zero_grad()
        loss = (model(x) - 1.0).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def trained_fused(named: bool = True, lr: float = 0.05) -> tuple[Fused, torch.optim.Adam]:
    torch.manual_seed(0)
    model = Fused()
    params = model.named_parameters() if named else model.parameters()
    opt = torch.optim.Adam(params, lr=lr)
    train(model, opt, BATCHES[:3])
    return model, opt


def checkpoint_of(model: nn.Module, opt: torch.optim.Optimizer, version: str) -> cm.Checkpoint:
    return cm.Checkpoint(
        dict(model.state_dict()),
        schema="toy",
        version=version,
        optimizer=copy.deepcopy(opt.state_dict()),
    )


def state_by_name(opt_sd: dict) -> dict[str, dict]:
    names = [n for g in opt_sd["param_groups"] for n in g["param_names"]]
    positions = [p for g in opt_sd["param_groups"] for p in g["params"]]
    return {names[i]: opt_sd["state"][p] for i, p in enumerate(positions) if p in opt_sd["state"]}


# -- renames, splits, drops, adds ------------------------------------------------------------


def test_a_rename_moves_adams_moments_to_the_new_name():
    model, opt = trained_fused()
    schema = cm.Schema("toy", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("head.", "out.")])
    new = cm.upgrade(checkpoint_of(model, opt, "1.0.0"), schema)
    before, after = state_by_name(opt.state_dict()), state_by_name(new.optimizer)
    assert set(after) == {"attn.c_attn.weight", "attn.c_attn.bias", "out.weight", "out.bias"}
    for field in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(after["out.weight"][field], before["head.weight"][field])
        assert torch.equal(after["attn.c_attn.bias"][field], before["attn.c_attn.bias"][field])


def test_a_split_splits_the_moments_along_the_same_dim():
    model, opt = trained_fused()
    new = cm.upgrade(checkpoint_of(model, opt, "1.0.0"), make_schema(), to="2.0.0")
    before, after = state_by_name(opt.state_dict()), state_by_name(new.optimizer)
    for field in ("exp_avg", "exp_avg_sq"):
        fused = before["attn.c_attn.weight"][field]
        parts = [after[f"attn.{p}.weight"][field] for p in "qkv"]
        assert all(p.shape == (4, 4) for p in parts)
        assert torch.equal(torch.cat(parts, dim=0), fused)
    # each part counts its own steps: torch's Adam increments ``step`` in place
    steps = [after[f"attn.{p}.weight"]["step"] for p in "qkv"]
    assert len({id(s) for s in steps}) == 3 and all(float(s) == 3 for s in steps)


def test_resuming_the_split_model_takes_the_same_steps_as_the_fused_one(tmp_path):
    model, opt = trained_fused()
    path = tmp_path / "old.pth"
    cm.save(path, checkpoint_of(model, opt, "1.0.0"))
    ckpt = cm.load(path, schema=make_schema(), to="2.0.0")

    resumed = Separate()
    resumed.load_state_dict(ckpt.state_dict_for_torch())
    resumed_opt = torch.optim.Adam(resumed.named_parameters(), lr=0.05)
    resumed_opt.load_state_dict(ckpt.optimizer)

    old_losses = train(model, opt, BATCHES[3:])
    new_losses = train(resumed, resumed_opt, BATCHES[3:])
    torch.testing.assert_close(new_losses, old_losses, rtol=1e-5, atol=1e-6)
    fused = torch.cat([resumed.attn.q.weight, resumed.attn.k.weight, resumed.attn.v.weight])
    torch.testing.assert_close(fused, model.attn.c_attn.weight, rtol=1e-5, atol=1e-6)

    # the same weights with a fresh optimizer take measurably different steps
    fresh = Separate()
    fresh.load_state_dict(ckpt.state_dict_for_torch())
    fresh_losses = train(fresh, torch.optim.Adam(fresh.named_parameters(), lr=0.05), BATCHES[3:])
    assert abs(fresh_losses[1] - old_losses[1]) > 1e-3


def test_a_dropped_parameter_drops_its_state_and_todays_optimizer_loads_the_rest():
    model, opt = trained_fused()
    schema = make_schema(("2.0.0", "3.0.0", [cm.ops.DropKeys(r"attn\.v\..*")]))
    new = cm.upgrade(checkpoint_of(model, opt, "1.0.0"), schema, to="3.0.0")
    assert not any(".v." in n for n in state_by_name(new.optimizer))
    target = Separate()
    del target.attn.v
    target_opt = torch.optim.Adam(target.named_parameters(), lr=0.05)
    target_opt.load_state_dict(new.optimizer)
    assert len(target_opt.state) == 6


def test_a_new_parameter_gets_no_state_and_todays_optimizer_still_loads():
    model, opt = trained_fused()
    schema = make_schema(("2.0.0", "3.0.0", [cm.ops.AddKey("gate", torch.ones(3), parameter=True)]))
    new = cm.upgrade(checkpoint_of(model, opt, "1.0.0"), schema, to="3.0.0")
    group = new.optimizer["param_groups"][0]
    # numbered as today's model lists it (a module's own parameters before its children's)
    assert group["param_names"][0] == "gate" and "gate" not in state_by_name(new.optimizer)
    target = Separate(extra=True)
    target.load_state_dict(new.state_dict_for_torch())
    target_opt = torch.optim.Adam(target.named_parameters(), lr=0.05)
    target_opt.load_state_dict(new.optimizer)
    train(target, target_opt, BATCHES[3:4])  # the fresh parameter starts its own state
    assert float(target_opt.state[target.gate]["step"]) == 1
    assert float(target_opt.state[target.head.weight]["step"]) == 4


# -- where the names come from ----------------------------------------------------------------


def test_positional_state_needs_param_names_and_the_refusal_says_which(tmp_path):
    model, opt = trained_fused(named=False)
    assert "param_names" not in opt.state_dict()["param_groups"][0]
    ckpt = checkpoint_of(model, opt, "1.0.0")
    # a float buffer: the file's own order no longer verifies as the optimizer's (5 != 4)
    ckpt.state_dict["attn.scale"] = torch.ones(1)
    with pytest.raises(
        cm.ParamNamesUnknownError, match=r"param_names=\[\.\.\.\].*named_parameters"
    ):
        cm.upgrade(ckpt, make_schema(), to="2.0.0")
    names = [n for n, _ in model.named_parameters()]
    new = cm.upgrade(ckpt, make_schema(), to="2.0.0", param_names=names)
    assert "param_names" not in new.optimizer["param_groups"][0]  # written as the file had it
    target = Separate()
    target_opt = torch.optim.Adam(target.parameters(), lr=0.05)
    target_opt.load_state_dict(new.optimizer)
    fused = opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(target_opt.state[target.attn.k.weight]["exp_avg"], fused[4:8])

    path = tmp_path / "positional.pth"
    cm.save(path, ckpt)
    assert cm.load(path, schema=make_schema(), to="2.0.0", param_names=names).optimizer


def test_positional_state_needs_no_names_when_no_step_touches_parameters():
    model, opt = trained_fused(named=False)
    schema = make_schema()
    schema.add_migration("2.0.0", "3.0.0", [cm.ops.SetHparam("lr", 0.05)])
    ckpt = cm.upgrade(
        checkpoint_of(model, opt, "1.0.0"),
        make_schema(),
        to="2.0.0",
        param_names=[n for n, _ in model.named_parameters()],
    )
    assert cm.upgrade(ckpt, schema, to="3.0.0").optimizer == ckpt.optimizer


@pytest.mark.parametrize("layout", ["nested", "lightning"])
def test_optimizer_state_in_nested_and_lightning_files_follows_too(tmp_path, layout):
    model, opt = trained_fused()
    prefix = "model." if layout == "lightning" else ""
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    opt_sd = copy.deepcopy(opt.state_dict())
    opt_sd["param_groups"][0]["param_names"] = [
        prefix + n for n in opt_sd["param_groups"][0]["param_names"]
    ]
    if layout == "lightning":
        obj = {
            "state_dict": sd,
            "optimizer_states": [opt_sd],
            "epoch": 3,
            "hyper_parameters": {},
            "pytorch-lightning_version": "2.4.0",
        }
        split = cm.ops.Split(prefix + SPLIT.source, [prefix + t for t in SPLIT.targets])
    else:
        obj = {"model": sd, "optimizer": opt_sd, "epoch": 3}
        split = SPLIT
    schema = cm.Schema("toy", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [split])
    src, dst = tmp_path / "in.ckpt", tmp_path / "out.ckpt"
    torch.save(obj, src)
    cm.save(dst, cm.load(src, schema=schema, from_version="1.0.0"))
    written = torch.load(dst, weights_only=True)
    opt_out = written["optimizer_states"][0] if layout == "lightning" else written["optimizer"]
    after = state_by_name(opt_out)
    assert torch.equal(
        after[prefix + "attn.v.bias"]["exp_avg"],
        state_by_name(opt_sd)[prefix + "attn.c_attn.bias"]["exp_avg"][8:],
    )
    assert written["epoch"] == 3


# -- function migrations ------------------------------------------------------------------------


def function_schema(fn, **kwargs) -> cm.Schema:
    schema = make_schema()
    schema.migration("2.0.0", "3.0.0", **kwargs)(fn)
    return schema


def rename_head(ckpt: cm.Checkpoint) -> None:
    ckpt.state_dict = {k.replace("head.", "out."): v for k, v in ckpt.state_dict.items()}


def test_a_function_that_moves_tensors_unchanged_keeps_their_state():
    model, opt = trained_fused()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = cm.upgrade(checkpoint_of(model, opt, "1.0.0"), function_schema(rename_head))
    after = state_by_name(new.optimizer)
    assert torch.equal(
        after["out.weight"]["exp_avg"], state_by_name(opt.state_dict())["head.weight"]["exp_avg"]
    )
    assert "optimizer_state_reset" not in new.history[-1]
    target = Separate("out")
    torch.optim.Adam(target.named_parameters()).load_state_dict(new.optimizer)


def transpose_head(ckpt: cm.Checkpoint) -> None:
    ckpt.state_dict["head.weight"] = ckpt.state_dict["head.weight"] * 1.0  # a new tensor


def test_a_function_that_replaces_a_tensor_resets_its_state_with_a_warning_and_history():
    model, opt = trained_fused()
    with pytest.warns(UserWarning, match="head.weight.*fresh.*optimizer_state="):
        new = cm.upgrade(checkpoint_of(model, opt, "1.0.0"), function_schema(transpose_head))
    assert new.history[-1]["optimizer_state_reset"] == ["head.weight"]
    after = state_by_name(new.optimizer)
    assert "head.weight" not in after and "head.bias" in after
    assert "head.weight" in new.optimizer["param_groups"][0]["param_names"]
    target = Separate()
    torch.optim.Adam(target.named_parameters()).load_state_dict(new.optimizer)


def test_the_optimizer_state_hook_carries_a_replaced_tensors_state():
    def keep(states, before, after):
        return {"head.weight": states["head.weight"]}

    model, opt = trained_fused()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = cm.upgrade(
            checkpoint_of(model, opt, "1.0.0"),
            function_schema(transpose_head, optimizer_state=keep),
        )
    assert "optimizer_state_reset" not in new.history[-1]
    assert torch.equal(
        state_by_name(new.optimizer)["head.weight"]["exp_avg"],
        state_by_name(opt.state_dict())["head.weight"]["exp_avg"],
    )


def test_a_function_that_renames_and_replaces_a_parameter_reports_the_lost_state():
    def rebuild_head(ckpt: cm.Checkpoint) -> None:
        ckpt.state_dict["out.weight"] = ckpt.state_dict.pop("head.weight") + 0.0
        ckpt.state_dict["out.bias"] = ckpt.state_dict.pop("head.bias")

    model, opt = trained_fused()
    with pytest.warns(UserWarning, match="head.weight"):
        new = cm.upgrade(checkpoint_of(model, opt, "1.0.0"), function_schema(rebuild_head))
    assert new.history[-1]["optimizer_state_reset"] == ["head.weight"]
    assert "out.bias" in state_by_name(new.optimizer)
