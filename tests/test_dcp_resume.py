"""Two gloo ranks resume from a DCP checkpoint whose FQN-keyed optimizer state was migrated.

``get_state_dict(model, optimizer)`` keys Adam's state by parameter name (``state`` by FQN,
``param_groups[i]["params"]`` listing FQNs); two ranks save it with ``dcp.save``. The model
code renames ``body`` to ``encoder``; the CLI upgrades the folder with a rename; two ranks
load it with ``set_state_dict`` into the renamed model and take the same steps as the
uninterrupted run. The two-rank harness is the one of ``test_dcp_gloo``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("this torch build has no torch.distributed gloo backend", allow_module_level=True)

from gloo_ranks import WORLD, init_ranks, run_ranks  # noqa: E402

import ckptmigrate as cm  # noqa: E402
from ckptmigrate.io.files import read_checkpoint  # noqa: E402

#: both runs do the same float operations in the same order; the slack covers summation order
RTOL, ATOL = 1e-6, 1e-7
STEPS = 3


class Net(nn.Module):
    def __init__(self, trunk: str) -> None:
        super().__init__()
        self.trunk = trunk
        setattr(self, trunk, nn.Linear(4, 8))
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(getattr(self, self.trunk)(x)))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen)


def _train(model: nn.Module, opt: torch.optim.Optimizer, rank: int, steps: range) -> list[float]:
    losses = []
    for step in steps:
        x, y = _batch(rank, step)
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _ddp(trunk: str, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(seed)
    model = DistributedDataParallel(Net(trunk))
    return model, torch.optim.Adam(model.parameters(), lr=0.05)


def _save_worker(rank: int, store: str, folder: str, out: str) -> None:
    """Train, save with get_state_dict + dcp.save, train on: the uninterrupted run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    init_ranks(rank, store)
    try:
        model, opt = _ddp("body", seed=0)
        _train(model, opt, rank, range(STEPS))
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=folder)
        if rank == 0:
            torch.save(optim_sd, Path(out) / "optim_saved.pt")
        losses = _train(model, opt, rank, range(STEPS, 2 * STEPS))
        (Path(out) / f"uninterrupted-{rank}.json").write_text(json.dumps(losses))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _resume_worker(rank: int, store: str, folder: str, out: str) -> None:
    """The renamed model loads the migrated folder with set_state_dict and trains on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from ckptmigrate.formats.dcp import SafeFileSystemReader

    init_ranks(rank, store)
    try:
        model, opt = _ddp("encoder", seed=1)  # the weights must come from the file
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, storage_reader=SafeFileSystemReader(folder))
        set_state_dict(
            model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
        losses = _train(model, opt, rank, range(STEPS, 2 * STEPS))
        (Path(out) / f"resumed-{rank}.json").write_text(json.dumps(losses))
        dist.barrier()
    finally:
        dist.destroy_process_group()


MIGRATION = """
import ckptmigrate as cm

schema = cm.Schema("net", current="2.0.0")
schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("body.", "encoder.")])
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("dcp-resume")
    run_ranks(_save_worker, str(base / "save-store"), str(base / "old"), str(base))
    (base / "migrations").mkdir()
    (base / "migrations" / "net.py").write_text(textwrap.dedent(MIGRATION))
    return base


def _losses(base: Path, kind: str) -> list[list[float]]:
    return [json.loads((base / f"{kind}-{rank}.json").read_text()) for rank in range(WORLD)]


def test_two_ranks_resume_after_the_cli_migrates_fqn_keyed_adam_state(saved, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = ["upgrade", str(saved / "old"), "-o", str(tmp_path / "new"), "--schema", "net"]
    args += ["--from-version", "1.0.0", "--migrations", str(saved / "migrations")]
    proc = subprocess.run(
        [sys.executable, "-m", "ckptmigrate", *args], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    run_ranks(_resume_worker, str(tmp_path / "load-store"), str(tmp_path / "new"), str(tmp_path))
    for resumed, expected in zip(_losses(tmp_path, "resumed"), _losses(saved, "uninterrupted")):
        assert len(resumed) == len(expected) == STEPS
        torch.testing.assert_close(
            torch.tensor(resumed), torch.tensor(expected), rtol=RTOL, atol=ATOL
        )


def _saved_state(saved: Path) -> dict:
    """Adam's state as rank 0 held it when the ranks saved (FQN-keyed)."""
    return torch.load(saved / "optim_saved.pt", weights_only=True)


def test_fqn_keyed_state_is_placed_by_name_whatever_the_names_given(saved):
    rename = cm.Schema("net", current="2.0.0")
    rename.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("body.", "encoder.")])
    given = ["head.bias", "head.weight", "body.bias", "body.weight"]  # ignored: the state names
    ckpt = cm.load(saved / "old", schema=rename, from_version="1.0.0", param_names=given)
    want = _saved_state(saved)
    got = ckpt.optimizer
    assert got["param_groups"][0]["params"] == [
        "encoder.weight",
        "encoder.bias",
        "head.weight",
        "head.bias",
    ]  # Adam(model.parameters())'s order, keyed by name as the file was
    for name, state in want["state"].items():
        new_name = name.replace("body.", "encoder.")
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got["state"][new_name][field], state[field]), (name, field)


def test_fqn_keyed_state_follows_a_split_and_a_drop_and_is_written_back_by_name(saved, tmp_path):
    schema = cm.Schema("net", current="2.0.0")
    split = cm.ops.Split("body.{kind}", ["a.{kind}", "b.{kind}"])
    schema.add_migration("1.0.0", "2.0.0", [split, cm.ops.DropKeys(r"^head\.bias$")])
    cm.upgrade_file(saved / "old", tmp_path / "new", schema, from_version="1.0.0")
    written = read_checkpoint(tmp_path / "new").optimizer  # through DCP's own loader
    assert written["param_groups"][0]["params"] == [
        "a.weight",
        "a.bias",
        "b.weight",
        "b.bias",
        "head.weight",
    ]
    assert sorted(written["state"]) == sorted(written["param_groups"][0]["params"])
    want = _saved_state(saved)["state"]
    for part, rows in (("a", slice(0, 4)), ("b", slice(4, 8))):
        for kind in ("weight", "bias"):
            got = written["state"][f"{part}.{kind}"]["exp_avg"]
            assert torch.equal(got, want[f"body.{kind}"]["exp_avg"][rows]), (part, kind)
    assert torch.equal(written["state"]["head.weight"]["exp_avg"], want["head.weight"]["exp_avg"])
