"""Checkpoint layouts real training scripts write, and layouts a migrations module names.

Files are written by ``torch.save`` of a real module's and optimizer's state dicts, in the
layouts those scripts use; the CLI runs as a real process.
"""

from __future__ import annotations

import json
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from processes import run

import ckptmigrate as cm
from ckptmigrate.formats.layout import declare_layout


def trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A module and an optimizer with state: one Adam step on named parameters."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.Adam(model.named_parameters(), lr=0.01)
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def migrations(tmp_path: Path, layout: str = "") -> Path:
    path = tmp_path / f"m_{uuid.uuid4().hex[:8]}.py"
    path.write_text(textwrap.dedent(f"""
        import ckptmigrate as cm

        {layout}
        schema = cm.Schema("seq", current="2.0.0")
        schema.add_migration("1.0.0", "2.0.0", [
            cm.ops.RenamePrefix("0.", "inp."), cm.ops.SetHparam("act", "relu"),
        ])
        """))
    return path


def upgrade(tmp_path: Path, src: Path, mig: Path, *extra: str) -> Path:
    out = tmp_path / f"up-{src.name}"
    args = ["upgrade", str(src), "-o", str(out), "--migrations", str(mig)]
    done = run(tmp_path, *args, "--schema", "seq", "--from-version", "1.0.0", *extra)
    assert done.returncode == 0, done.stderr
    return out


def info(tmp_path: Path, path: Path, *extra: str) -> dict:
    done = run(tmp_path, "info", str(path), "--json", *extra)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_model_state_and_optimizer_state_read_and_upgrade_in_their_layout(tmp_path):
    model, optimizer = trained()
    src = tmp_path / "run.pt"
    torch.save(
        {"model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(), "epoch": 3},
        src,
    )
    shown = info(tmp_path, src)
    assert (shown["layout"], shown["tensors"]) == ("model-state", len(model.state_dict()))
    assert shown["optimizer"] is True and shown["extra"] == ["epoch"]

    raw = torch.load(upgrade(tmp_path, src, migrations(tmp_path)), weights_only=True)
    assert set(raw) == {"model_state", "optimizer_state", "epoch", "__ckptmigrate__"}
    assert list(raw["model_state"]) == [k.replace("0.", "inp.", 1) for k in model.state_dict()]
    assert raw["optimizer_state"]["param_groups"][0]["param_names"][0] == "inp.weight"
    assert raw["epoch"] == 3


def test_a_model_dict_holding_state_dict_and_model_args_reads_and_upgrades(tmp_path):
    model, optimizer = trained()
    args = {"n_layer": 2, "n_embd": 4}
    src = tmp_path / "ckpt.pt"
    torch.save(
        {
            "model": {"state_dict": model.state_dict(), "model_args": args, "arch": "seq"},
            "optimizer": optimizer.state_dict(),
            "iter_num": 500,
        },
        src,
    )
    shown = info(tmp_path, src)
    assert (shown["layout"], shown["tensors"]) == ("nested-args", len(model.state_dict()))
    assert shown["hparams"] == args and shown["optimizer"] is True

    raw = torch.load(upgrade(tmp_path, src, migrations(tmp_path)), weights_only=True)
    assert set(raw) == {"model", "optimizer", "iter_num", "__ckptmigrate__"}
    assert set(raw["model"]) == {"state_dict", "model_args", "arch"}
    assert raw["model"]["model_args"] == {**args, "act": "relu"}
    assert raw["model"]["arch"] == "seq" and raw["iter_num"] == 500
    for key, value in model.state_dict().items():
        new = raw["model"]["state_dict"][key.replace("0.", "inp.", 1)]
        torch.testing.assert_close(new, value, atol=0, rtol=0)


TRAINER_LAYOUT = 'layout = cm.Layout("trainer", state_dict="net", hparams="cfg", optimizer="opt")'


def test_a_layout_named_in_the_migrations_module_reads_and_upgrades_from_the_cli(tmp_path):
    model, optimizer = trained()
    src = tmp_path / "trainer.pt"
    cfg = {"width": 4}
    torch.save(
        {"net": model.state_dict(), "cfg": cfg, "opt": optimizer.state_dict(), "step": 7}, src
    )
    refused = run(tmp_path, "info", str(src))
    assert refused.returncode == 2
    assert refused.stderr.startswith("ckptmigrate: error: ") and "cm.Layout(" in refused.stderr
    assert "--migrations PATH" in refused.stderr and len(refused.stderr.splitlines()) == 1

    mig = migrations(tmp_path, TRAINER_LAYOUT)
    shown = info(tmp_path, src, "--migrations", str(mig))
    assert (shown["layout"], shown["hparams"]) == ("trainer", cfg)
    assert shown["optimizer"] is True and shown["extra"] == ["step"]

    out = upgrade(tmp_path, src, mig)
    raw = torch.load(out, weights_only=True)
    assert set(raw) == {"net", "cfg", "opt", "step", "__ckptmigrate__"}
    assert raw["cfg"] == {**cfg, "act": "relu"} and raw["step"] == 7
    assert list(raw["net"]) == [k.replace("0.", "inp.", 1) for k in model.state_dict()]
    assert info(tmp_path, out, "--migrations", str(mig))["version"] == "2.0.0"


def test_a_layout_path_reaches_into_nested_dicts_and_round_trips(tmp_path):
    layout = declare_layout(
        cm.Layout(f"t{uuid.uuid4().hex[:6]}", ("run", "weights"), hparams=("run", "config"))
    )
    model, _ = trained()
    src = tmp_path / "nested.pt"
    torch.save({"run": {"weights": model.state_dict(), "config": {"w": 4}, "seed": 1}}, src)
    ckpt = cm.load(src, upgrade=False)
    assert (ckpt.layout, ckpt.hparams, ckpt.extra) == (layout.name, {"w": 4}, {"run": {"seed": 1}})
    cm.save(tmp_path / "again.pt", ckpt)
    raw = torch.load(tmp_path / "again.pt", weights_only=True)
    assert set(raw["run"]) == {"weights", "config", "seed"}


def test_a_declared_layout_cannot_take_a_taken_name():
    with pytest.raises(cm.LayoutNameError, match="'lightning' is taken by a built-in layout"):
        declare_layout(cm.Layout("lightning", "weights"))
    name = f"mine{uuid.uuid4().hex[:6]}"
    first = declare_layout(cm.Layout(name, "net"))
    assert declare_layout(cm.Layout(name, "net")) == first  # the same layout again: no-op
    with pytest.raises(cm.LayoutNameError, match="another declared layout"):
        declare_layout(cm.Layout(name, "model_weights"))


def _trainer_file(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    torch.save(
        {"net": model.state_dict(), "cfg": {"width": 4}, "opt": optimizer.state_dict()}, path
    )


def test_diff_of_files_in_a_declared_layout_imports_the_migrations_that_declare_it(tmp_path):
    model, optimizer = trained()
    _trainer_file(tmp_path / "a.pt", model, optimizer)
    with torch.no_grad():
        model[1].bias.add_(1.0)
    _trainer_file(tmp_path / "b.pt", model, optimizer)
    mig = migrations(tmp_path, TRAINER_LAYOUT)
    args = ("diff", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--json")
    refused = run(tmp_path, *args)
    assert refused.returncode == 2 and "cm.Layout(" in refused.stderr
    done = run(tmp_path, *args, "--values", "--migrations", str(mig))
    assert done.returncode == 1, done.stderr
    changed = [v["key"] for v in json.loads(done.stdout)["values"] if not v["equal"]]
    assert changed == ["1.bias"]


def test_stamp_to_a_new_file_in_a_declared_layout_keeps_the_layout(tmp_path):
    model, optimizer = trained()
    src, out = tmp_path / "trainer.pt", tmp_path / "stamped.pt"
    _trainer_file(src, model, optimizer)
    mig = migrations(tmp_path, TRAINER_LAYOUT)
    stamp = ("stamp", str(src), "--schema", "seq", "--version", "1.0.0", "-o", str(out))
    assert run(tmp_path, *stamp).returncode == 2  # no migrations: the layout is unknown
    done = run(tmp_path, *stamp, "--migrations", str(mig))
    assert done.returncode == 0, done.stderr
    assert "layout trainer" in done.stdout
    raw = torch.load(out, weights_only=True)
    assert set(raw) == {"net", "cfg", "opt", "__ckptmigrate__"}
    assert raw["__ckptmigrate__"]["version"] == "1.0.0" and list(raw["net"]) == list(
        model.state_dict()
    )


def test_scan_worker_processes_read_the_layouts_the_migrations_declare(tmp_path):
    from ckptmigrate.inspection.scan import scan
    from ckptmigrate.schema.discovery import find_schemas

    model, optimizer = trained()
    (tmp_path / "reg").mkdir()
    _trainer_file(tmp_path / "reg" / "trainer.pt", model, optimizer)
    found = find_schemas([str(migrations(tmp_path, TRAINER_LAYOUT))])
    (row,) = scan(tmp_path / "reg", found, workers=1, processes=True)
    assert (row.tensors, row.error) == (4, "no ckptmigrate stamp")  # read, in a fresh process
