"""A Lightning run resumes after a submodule rename migrated by the CLI.

``Trainer.fit`` with ``torch.optim.Adam(self.parameters())`` writes position-keyed optimizer
state (no ``param_names``). The module code then renames ``body`` to ``encoder``; the CLI,
in a subprocess, upgrades the ``.ckpt`` with a ``RenamePrefix`` migration from a migrations
folder; ``Trainer.fit(ckpt_path=...)`` with the renamed module resumes and takes the same
steps as an uninterrupted run of the old code.
"""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from processes import run
from torch import nn

L = pytest.importorskip("lightning")

#: both runs do the same float operations in the same order; the slack covers summation order
RTOL, ATOL = 1e-6, 1e-7
BATCHES_PER_EPOCH = 3


class _Net(L.LightningModule):
    """Training logic shared by the old and the new code; ``trunk`` is the renamed submodule."""

    trunk_name = ""

    def __init__(self) -> None:
        super().__init__()
        setattr(self, self.trunk_name, nn.Linear(4, 8))
        self.norm = nn.BatchNorm1d(8)  # float buffers beside the parameters
        self.head = nn.Linear(8, 1)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        hidden = torch.tanh(self.norm(getattr(self, self.trunk_name)(x)))
        loss = (self.head(hidden) - y).pow(2).mean()
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


class OldNet(_Net):
    trunk_name = "body"


class NewNet(_Net):
    trunk_name = "encoder"


def _loader() -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    n = 8 * BATCHES_PER_EPOCH
    data = torch.utils.data.TensorDataset(
        torch.randn(n, 4, generator=gen), torch.randn(n, 1, generator=gen)
    )
    return torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)


def _fit(model: _Net, epochs: int, ckpt_path: Path | None = None) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no val loop", "num_workers": not what is tested
        trainer.fit(model, _loader(), ckpt_path=ckpt_path)
    return trainer


MIGRATION = """
import ckptmigrate as cm

schema = cm.Schema("net", current="2.0.0")
schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("body.", "encoder.")])
"""


def test_a_lightning_run_resumes_after_the_cli_migrates_a_submodule_rename(tmp_path):
    torch.manual_seed(0)
    uninterrupted = OldNet()
    _fit(uninterrupted, epochs=2)
    expected = uninterrupted.losses[BATCHES_PER_EPOCH:]

    torch.manual_seed(0)
    first = OldNet()
    trainer = _fit(first, epochs=1)
    trainer.save_checkpoint(tmp_path / "old.ckpt")
    assert first.losses == uninterrupted.losses[:BATCHES_PER_EPOCH]
    opt_state = torch.load(tmp_path / "old.ckpt", weights_only=True)["optimizer_states"][0]
    assert "param_names" not in opt_state["param_groups"][0]  # keyed by position only

    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "net.py").write_text(textwrap.dedent(MIGRATION))
    proc = run(
        tmp_path, "upgrade", "old.ckpt", "-o", "new.ckpt", "--migrations", "migrations",
        "--schema", "net", "--from-version", "1.0.0",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    written = torch.load(tmp_path / "new.ckpt", weights_only=True)
    assert "encoder.weight" in written["state_dict"] and "body.weight" not in written["state_dict"]
    kept = written["optimizer_states"][0]
    assert kept["param_groups"][0]["params"] == opt_state["param_groups"][0]["params"]
    for position, state in opt_state["state"].items():  # a rename moves no position
        assert torch.equal(kept["state"][position]["exp_avg"], state["exp_avg"]), position

    torch.manual_seed(1)  # the weights must come from the file, not from the seed
    resumed = NewNet()
    _fit(resumed, epochs=2, ckpt_path=tmp_path / "new.ckpt")
    assert len(resumed.losses) == len(expected) == BATCHES_PER_EPOCH
    torch.testing.assert_close(
        torch.tensor(resumed.losses), torch.tensor(expected), rtol=RTOL, atol=ATOL
    )
