"""Optimizer state under a mount follows the root's rules: position-keyed state stays only
through steps that keep the mount's positions; named state follows each op; otherwise names
from ``param_names`` (full keys, with the mount's prefix) or a verified deduction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from processes import run
from torch import nn

import ckptmigrate as cm
from ckptmigrate.engine.mounts import mount

SWAP = [
    cm.ops.RenamePrefix("layers.0.", "tmp."),
    cm.ops.RenamePrefix("layers.1.", "layers.0."),
    cm.ops.RenamePrefix("tmp.", "layers.1."),
]
STEPS = {
    "rename": [cm.ops.RenamePrefix("layers.", "blocks.")],
    "swap": SWAP,
    "transpose": [cm.ops.Transpose("layers.0.weight")],
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])


class LM(nn.Module):
    """A LightningModule's shape: the user's net first, then a head and a float buffer."""

    def __init__(self, buffer: bool = False) -> None:
        super().__init__()
        self.net = Net()
        self.head = nn.Linear(4, 2)
        if buffer:
            self.register_buffer("scale", torch.ones(3))


def trained(named: bool, buffer: bool = False) -> tuple[LM, dict]:
    torch.manual_seed(0)
    lm = LM(buffer)
    opt = torch.optim.Adam(lm.named_parameters() if named else lm.parameters())
    x = torch.randn(2, 4)
    lm.head(lm.net.layers[1](lm.net.layers[0](x))).sum().backward()
    opt.step()
    return lm, opt.state_dict()


def lightning_file(path: Path, lm: LM, opt_sd: dict) -> None:
    raw = {
        "state_dict": lm.state_dict(),
        "optimizer_states": [opt_sd],
        "epoch": 1,
        "global_step": 1,
        "pytorch-lightning_version": "2.0.0",
    }
    torch.save(raw, path)
    cm.save(path, cm.load(path, upgrade=False), schema="net", version="1.0.0", prefix="net.")


def schema(kind: str) -> cm.Schema:
    s = cm.Schema("net", current="2.0.0")
    s.add_migration("1.0.0", "2.0.0", STEPS[kind])
    return s


def by_name(lm: LM, opt_sd: dict) -> dict[str, dict]:
    """The optimizer's per-parameter state, keyed by the names the model had."""
    names = [n for n, _ in lm.named_parameters()]
    positions = [p for g in opt_sd["param_groups"] for p in g["params"]]
    return {names[i]: opt_sd["state"][p] for i, p in enumerate(positions)}


def state_of(ckpt: cm.Checkpoint, model: nn.Module) -> dict[str, dict]:
    """Load the upgraded state into today's model's optimizer: what a resume would see."""
    model.load_state_dict(ckpt.state_dict)
    opt = torch.optim.Adam(model.parameters())
    opt.load_state_dict(ckpt.optimizer[0])
    return {n: opt.state[p] for n, p in model.named_parameters()}


def upgraded(tmp_path: Path, kind: str, named: bool) -> tuple[dict, dict]:
    """(state by old name, state as today's model resumes it) of a mounted file upgraded."""
    lm, opt_sd = trained(named)
    lightning_file(tmp_path / "lit.ckpt", lm, opt_sd)
    out = cm.upgrade(cm.load(tmp_path / "lit.ckpt", upgrade=False), schema(kind))
    return by_name(lm, opt_sd), state_of(out, LM())


@pytest.mark.parametrize("named", [False, True], ids=["positions", "named"])
def test_swapping_two_layers_under_a_mount_moves_their_optimizer_state(
    tmp_path: Path, named: bool
) -> None:
    old, now = upgraded(tmp_path, "swap", named)
    for i, j in ((0, 1), (1, 0)):
        for leaf in ("weight", "bias"):
            got = now[f"net.layers.{i}.{leaf}"]["exp_avg"]
            assert torch.equal(got, old[f"net.layers.{j}.{leaf}"]["exp_avg"])
    assert torch.equal(now["head.weight"]["exp_avg"], old["head.weight"]["exp_avg"])


@pytest.mark.parametrize("named", [False, True], ids=["positions", "named"])
def test_transposing_a_square_weight_under_a_mount_transposes_its_state(
    tmp_path: Path, named: bool
) -> None:
    old, now = upgraded(tmp_path, "transpose", named)
    w = old["net.layers.0.weight"]["exp_avg"]
    assert torch.equal(now["net.layers.0.weight"]["exp_avg"], w.T)
    assert torch.equal(now["net.layers.1.weight"]["exp_avg"], old["net.layers.1.weight"]["exp_avg"])


def test_named_state_under_a_mount_follows_a_rename_and_keeps_the_models_order(
    tmp_path: Path,
) -> None:
    """Adam(model.named_parameters()): the state carries param_names; net's come first."""
    lm, opt_sd = trained(named=True)
    lightning_file(tmp_path / "lit.ckpt", lm, opt_sd)
    out = cm.upgrade(cm.load(tmp_path / "lit.ckpt", upgrade=False), schema("rename"))
    group = out.optimizer[0]["param_groups"][0]
    assert group["param_names"] == [
        "net.blocks.0.weight",
        "net.blocks.0.bias",
        "net.blocks.1.weight",
        "net.blocks.1.bias",
        "head.weight",
        "head.bias",
    ]
    for pos, name in enumerate(n for n, _ in lm.named_parameters()):
        assert torch.equal(
            out.optimizer[0]["state"][pos]["exp_avg"], opt_sd["state"][pos]["exp_avg"]
        )
        assert name.replace("layers", "blocks") == group["param_names"][pos]


def test_fqn_keyed_state_under_a_mount_follows_a_swap() -> None:
    """DCP's get_state_dict keys optimizer state by FQN."""
    lm, opt_sd = trained(named=False)
    old = by_name(lm, opt_sd)
    fqn = {"state": dict(old), "param_groups": [{"lr": 1e-3, "params": list(old)}]}
    ckpt = cm.Checkpoint(dict(lm.state_dict()), optimizer=fqn)
    ckpt = mount(ckpt, "net.", "net", "1.0.0")
    out = cm.upgrade(ckpt, schema("swap"))
    state = out.optimizer["state"]
    assert torch.equal(
        state["net.layers.0.weight"]["exp_avg"], old["net.layers.1.weight"]["exp_avg"]
    )
    assert out.optimizer["param_groups"][0]["params"] == list(old)


def test_a_rename_under_a_mount_keeps_position_keyed_state_as_it_is(tmp_path: Path) -> None:
    lm, opt_sd = trained(named=False, buffer=True)  # a float buffer: no deduction possible
    lightning_file(tmp_path / "lit.ckpt", lm, opt_sd)
    out = cm.upgrade(cm.load(tmp_path / "lit.ckpt", upgrade=False), schema("rename"))
    assert out.optimizer[0]["state"].keys() == opt_sd["state"].keys()
    for pos, st in opt_sd["state"].items():
        assert out.optimizer[0]["state"][pos]["exp_avg"] is not None
        assert torch.equal(out.optimizer[0]["state"][pos]["exp_avg"], st["exp_avg"])


def test_a_swap_under_a_mount_without_names_is_refused_once_worded(tmp_path: Path) -> None:
    lm, opt_sd = trained(named=False, buffer=True)  # 'scale' makes the file's order unusable
    lightning_file(tmp_path / "lit.ckpt", lm, opt_sd)
    with pytest.raises(cm.errors.ParamNamesUnknownError) as info:
        cm.upgrade(cm.load(tmp_path / "lit.ckpt", upgrade=False), schema("swap"))
    assert str(info.value).count("keyed by position only") == 1
    assert "net 1.0.0 -> 2.0.0" in str(info.value)


def test_param_names_with_the_mounts_prefix_name_the_state(tmp_path: Path) -> None:
    lm, opt_sd = trained(named=False, buffer=True)
    lightning_file(tmp_path / "lit.ckpt", lm, opt_sd)
    names = [n for n, _ in lm.named_parameters()]
    ckpt = cm.load(tmp_path / "lit.ckpt", upgrade=False)
    out = cm.upgrade(ckpt, schema("swap"), param_names=names)
    now, old = state_of(out, LM(buffer=True)), by_name(lm, opt_sd)
    assert torch.equal(now["net.layers.0.weight"]["exp_avg"], old["net.layers.1.weight"]["exp_avg"])
    bare = [n.removeprefix("net.") for n in names]
    with pytest.raises(
        cm.errors.ParamNamesUnknownError, match="'layers.0.weight' is 'net.layers.0"
    ):
        cm.upgrade(ckpt, schema("swap"), param_names=bare)


def test_the_cli_passes_param_names_to_a_mounted_file(tmp_path: Path) -> None:
    lm, opt_sd = trained(named=False, buffer=True)
    lightning_file(tmp_path / "lit.ckpt", lm, opt_sd)
    (tmp_path / "names.txt").write_text("\n".join(n for n, _ in lm.named_parameters()) + "\n")
    (tmp_path / "mig").mkdir()
    (tmp_path / "mig" / "net.py").write_text(
        "import ckptmigrate as cm\n"
        "R = cm.ops.RenamePrefix\n"
        "schema = cm.Schema('net', current='2.0.0')\n"
        "schema.add_migration('1.0.0', '2.0.0', [R('layers.0.', 'tmp.'), "
        "R('layers.1.', 'layers.0.'), R('tmp.', 'layers.1.')])\n"
    )
    up = ("upgrade", "lit.ckpt", "-o", "new.ckpt", "--migrations", "mig")
    refused = run(tmp_path, *up)
    assert refused.returncode == 2 and refused.stderr.count("keyed by position only") == 1
    proc = run(tmp_path, *up, "--param-names", "names.txt")
    assert proc.returncode == 0, proc.stderr
    raw = torch.load(tmp_path / "new.ckpt", weights_only=False)
    assert "pytorch-lightning_version" in raw
    out = cm.load(tmp_path / "new.ckpt", upgrade=False)
    now, old = state_of(out, LM(buffer=True)), by_name(lm, opt_sd)
    assert torch.equal(now["net.layers.0.weight"]["exp_avg"], old["net.layers.1.weight"]["exp_avg"])


def test_the_root_mount_keeps_its_keys_around_another_mount_in_place() -> None:
    """The file's order names position-keyed state: a rename at '' moves no key past 'net.'."""
    sd = {"emb.w": torch.zeros(2), "net.a": torch.zeros(3), "head.w": torch.zeros(4)}
    ckpt = mount(cm.Checkpoint(sd), "", "root", "1.0.0")
    ckpt = mount(ckpt, "net.", "net", "1.0.0")
    root = cm.Schema("root", current="2.0.0")
    root.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("head.", "out.")])
    assert list(cm.upgrade(ckpt, root).state_dict) == ["emb.w", "net.a", "out.w"]
