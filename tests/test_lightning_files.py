"""Old Lightning checkpoints whose hparams are an ``AttributeDict`` or an ``argparse.Namespace``:
read with ``--allow-global``, shown with their real fields, and upgraded.

The files come from a real ``Trainer.save_checkpoint``; Lightning 2 writes hparams as a plain
dict, so the old files put back what Lightning 1.x pickled: the ``model.hparams`` object
itself (``pytorch_lightning.utilities.parsing.AttributeDict``), or a Namespace.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import pytest
import torch
from processes import run

pl = pytest.importorskip("pytorch_lightning")

ATTRIBUTE_DICT = "pytorch_lightning.utilities.parsing.AttributeDict"
MIGRATIONS = {
    # an hparam op: the upgrade copies tensor bytes as stored
    "streamed": """
        import ckptmigrate as cm

        schema = cm.Schema("plnet", current="2.0.0")
        schema.add_migration("1.0.0", "2.0.0", [cm.ops.SetHparam("width", 3)])
        """,
    # a tensor op: the upgrade loads the file with torch's weights-only loader
    # (no key renames: position-keyed optimizer state then needs no parameter names)
    "loaded": """
        import torch
        import ckptmigrate as cm

        schema = cm.Schema("plnet", current="2.0.0")
        schema.add_migration("1.0.0", "2.0.0", [
            cm.ops.Cast("body.weight", torch.float64), cm.ops.SetHparam("width", 3),
        ])
        """,
}


class Net(pl.LightningModule):
    def __init__(self, lr: float = 0.1, layers: int = 2, width: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = torch.nn.Linear(width, 4)

    def training_step(self, batch, _index):
        return self.body(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.ones(4, 3))
        return torch.utils.data.DataLoader(data, batch_size=2)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from pytorch_lightning.utilities.parsing import AttributeDict

    root = tmp_path_factory.mktemp("lightning")
    trainer = pl.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", default_root_dir=root,
    )  # fmt: skip
    trainer.fit(Net(lr=0.01, layers=3))
    trainer.save_checkpoint(root / "new.ckpt")
    raw = torch.load(root / "new.ckpt", weights_only=False)  # our own file, just written
    raw["hyper_parameters"] = AttributeDict(lr=0.01, layers=3)
    torch.save(raw, root / "attributedict.ckpt")
    raw["hyper_parameters"] = argparse.Namespace(lr=0.01, layers=3)
    torch.save(raw, root / "namespace.ckpt")
    for name, text in MIGRATIONS.items():
        (root / f"{name}.py").write_text(textwrap.dedent(text))
    return {"root": root, "AttributeDict": root / "attributedict.ckpt"} | {
        "Namespace": root / "namespace.ckpt"
    }


GLOBALS = {"AttributeDict": ATTRIBUTE_DICT, "Namespace": "argparse.Namespace"}


@pytest.mark.parametrize("kind", ["AttributeDict", "Namespace"])
def test_info_shows_the_real_fields_of_an_allowed_hparams_object(files, kind):
    done = run(files["root"], "info", str(files[kind]), "--allow-global", GLOBALS[kind], "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["layout"] == "lightning"
    assert info["hparams"] == {"lr": 0.01, "layers": 3}


@pytest.mark.parametrize("kind", ["AttributeDict", "Namespace"])
def test_an_allowed_hparams_object_is_still_refused_without_the_flag(files, kind):
    done = run(files["root"], "info", str(files[kind]), "--json")
    assert done.returncode == 2
    assert f"--allow-global {GLOBALS[kind]}" in done.stderr


@pytest.mark.parametrize("migration", ["streamed", "loaded"])
@pytest.mark.parametrize("kind", ["AttributeDict", "Namespace"])
def test_an_old_lightning_file_upgrades_and_lightning_loads_the_result(
    files, tmp_path, kind, migration
):
    out = tmp_path / "upgraded.ckpt"
    done = run(
        files["root"], "upgrade", str(files[kind]), "-o", str(out), "--allow-global",
        GLOBALS[kind], "--migrations", str(files["root"] / f"{migration}.py"),
        "--schema", "plnet", "--from-version", "1.0.0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    info = json.loads(run(tmp_path, "info", str(out), "--json").stdout)
    assert info["hparams"] == {"lr": 0.01, "layers": 3, "width": 3}
    assert info["version"] == "2.0.0"
    old = torch.load(files[kind], weights_only=False)  # our own test file
    raw = torch.load(out, weights_only=True)  # hparams are a plain dict now
    # float32 -> float64 is exact, so the values compare with zero tolerance
    torch.testing.assert_close(
        raw["state_dict"]["body.weight"].float(), old["state_dict"]["body.weight"], atol=0, rtol=0
    )
    assert raw["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.01, abs=0)
    model = Net.load_from_checkpoint(out, map_location="cpu", weights_only=True)
    assert (model.hparams.lr, model.hparams.layers, model.hparams.width) == (0.01, 3, 3)
    torch.testing.assert_close(model.body.weight, old["state_dict"]["body.weight"], atol=0, rtol=0)
