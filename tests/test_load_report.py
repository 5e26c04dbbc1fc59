"""What a load into a live model would say, before it loads: load_into's report, diff --model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ckptmigrate as cm

REPO = Path(__file__).resolve().parent.parent


class Net(nn.Module):
    def __init__(self, width: int = 4, head: str = "head") -> None:
        super().__init__()
        self.body = nn.Linear(3, width)
        setattr(self, head, nn.Linear(width, 2))


def schema_for(current: str = "1.0.0") -> cm.Schema:
    return cm.Schema("net", current=current, build=lambda hp: Net(**hp))


def test_load_into_with_strict_false_reports_missing_unexpected_misshapen_and_cast(tmp_path):
    sd = Net(width=5, head="out").state_dict()
    sd["body.bias"] = sd["body.bias"][:4].half()  # fits the model's shape, another dtype
    path = tmp_path / "net.pth"
    cm.save(path, sd, schema=schema_for())
    model = Net()
    ckpt = cm.load_into(model, path, schema=schema_for(), strict=False)
    report = ckpt.report
    assert sorted(report.missing) == ["head.bias", "head.weight"]
    assert sorted(report.unexpected) == ["out.bias", "out.weight"]
    assert report.shape_mismatched == [
        {"key": "body.weight", "checkpoint": (5, 3), "model": (4, 3)}
    ]
    assert report.dtype_casts == [{"key": "body.bias", "checkpoint": "float16", "model": "float32"}]
    assert not report.clean_for_strict
    assert torch.equal(model.body.bias, sd["body.bias"].float())  # loaded, cast silently


def test_a_strict_load_that_would_fail_raises_before_touching_the_model(tmp_path):
    path = tmp_path / "net.pth"
    cm.save(path, Net(head="out").state_dict(), schema=schema_for())
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(cm.LoadMismatchError, match="2 missing: head.weight, head.bias") as info:
        cm.load_into(model, path, schema=schema_for())
    assert info.value.report.unexpected == ["out.weight", "out.bias"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_clean_load_has_an_empty_report(tmp_path):
    path = tmp_path / "net.pth"
    cm.save(path, Net().state_dict(), schema=schema_for())
    report = cm.load_into(Net(), path, schema=schema_for()).report
    assert report.clean_for_strict and report.summary() == "no differences"


# -- ckptmigrate diff CKPT --model SCHEMA ------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ckptmigrate", *args, "--migrations", str(REPO / "migrations")],
        capture_output=True,
        text=True,
    )


def test_diff_model_is_clean_for_an_old_fixture_that_migrates_fully():
    run = run_cli("diff", str(REPO / "fixtures/tinylm/1.0.0.pth"), "--model", "tinylm", "--json")
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert record["has_drift"] is False and record["upgrade"]["from"] == "1.0.0"
    assert record["hparams"]["activation"] == "gelu"  # the model is built from migrated hparams


def test_diff_model_says_what_a_strict_load_would_say_and_exits_1(tmp_path):
    from ckptmigrate.schema.discovery import import_source

    tinylm = import_source(str(REPO / "migrations/tinylm.py"))[0]
    sd = tinylm.TinyLM().state_dict()
    sd["position_ids"] = torch.arange(16)  # what older code saved
    sd["wpe.weight"] = torch.zeros(8, 16)
    sd["ln_f.weight"] = sd["ln_f.weight"].double()
    del sd["lm_head.weight"]
    path = tmp_path / "drifted.pth"
    cm.save(path, sd, schema="tinylm", version="4.0.0", hparams={})

    run = run_cli("diff", str(path), "--model", "tinylm", "--json")
    assert run.returncode == 1, run.stderr
    record = json.loads(run.stdout)
    assert record["missing"] == ["lm_head.weight"]
    assert record["unexpected"] == ["position_ids"]
    assert record["shape_mismatched"] == [
        {"key": "wpe.weight", "checkpoint": [8, 16], "model": [16, 16]}
    ]
    assert record["dtype_casts"] == [
        {"key": "ln_f.weight", "checkpoint": "float64", "model": "float32"}
    ]
    plain = run_cli("diff", str(path), "--model", "tinylm")
    assert plain.returncode == 1
    assert "missing     lm_head.weight" in plain.stdout
    assert "a strict load would fail" in plain.stdout


def test_diff_model_refuses_a_second_file_and_an_unknown_schema(tmp_path):
    fixture = str(REPO / "fixtures/tinylm/4.0.0.pth")
    both = run_cli("diff", fixture, fixture, "--model", "tinylm")
    assert both.returncode == 2 and both.stderr.startswith("ckptmigrate: error:")
    unknown = run_cli("diff", fixture, "--model", "nosuch")
    assert unknown.returncode == 2 and "nosuch" in unknown.stderr
