"""Resume training from an old checkpoint, and write checkpoints for the old code.

The resume fixture (tinylm 1.0.0, before the q/k/v split) holds Adam's state after a few steps
of the old code and the losses the old code computed next; the downgrade tests load files
written through the inverse steps into the old model definitions of the fixture generator.
"""

from __future__ import annotations

import copy
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptmigrate as cm
from ckptmigrate.inspection.fixtures import (
    check_fixture,
    check_fixtures,
    find_fixtures,
    read_golden,
)

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
RESUME = FIXTURES / "tinylm" / "1.0.0-resume.golden.pt"
followers_module = importlib.import_module("ckptmigrate.engine.followers")  # state follows here


def resume_fixture():
    return find_fixtures(RESUME)[0]


# -- the resume fixture -----------------------------------------------------------------------


def test_the_resume_fixture_holds_adam_state_by_name_from_before_the_qkv_split(schemas):
    stored = cm.load(resume_fixture().path, schema=schemas["tinylm"], upgrade=False)
    group = stored.optimizer["param_groups"][0]
    assert "blocks.0.attn.c_attn.weight" in group["param_names"]
    assert len(stored.optimizer["state"]) == len(group["params"])
    record = read_golden(RESUME)["resume"]
    assert len(record["batches"]) == len(record["losses"]) >= 3


def test_the_resume_fixture_reproduces_the_old_codes_next_losses(schemas):
    result = check_fixture(resume_fixture(), schemas)
    assert result.ok, result.reason
    assert result.steps_applied == 4
    assert result.resume_max_abs_error is not None and result.resume_max_abs_error <= 1e-5


def test_the_resume_check_fails_when_the_optimizer_state_is_left_behind(schemas, monkeypatch):
    follow = followers_module.follow_trace

    def forget(named, *args, **kwargs):  # the weights migrate, the optimizer starts fresh
        followed = follow(named, *args, **kwargs)
        named.states = {}
        return followed

    monkeypatch.setattr(followers_module, "follow_trace", forget)
    result = check_fixture(resume_fixture(), schemas)
    assert not result.ok
    assert "resumed training differs from the old code at step 2" in result.reason
    assert result.max_abs_error is not None and result.max_abs_error <= 1e-5  # weights are fine


def test_the_resume_check_fails_when_the_split_shares_adams_step_counter(schemas, monkeypatch):
    follow = followers_module.follow_trace

    def share_steps(named, trace, transformed, new_params):
        follow(named, trace, transformed, new_params)
        first = {}
        for name, state in named.states.items():
            for part in ("q_proj", "k_proj", "v_proj"):
                if part in name:
                    state["step"] = first.setdefault(name.replace(part, "*"), state["step"])

    monkeypatch.setattr(followers_module, "follow_trace", share_steps)
    assert not check_fixture(resume_fixture(), schemas).ok


def test_the_resume_check_needs_the_schema_to_say_how_to_train(schemas):
    tinylm = schemas["tinylm"]
    bare = copy.copy(tinylm)
    bare.optimizer = bare.train_step = None
    result = check_fixture(resume_fixture(), {"tinylm": bare})
    assert not result.ok and "optimizer=" in result.reason and "train_step=" in result.reason


def test_ckptmigrate_check_runs_the_resume_fixture(tmp_path):
    folder = tmp_path / "tinylm"
    folder.mkdir()
    for name in ("1.0.0-resume.pth", "1.0.0-resume.golden.pt"):
        (folder / name).write_bytes((FIXTURES / "tinylm" / name).read_bytes())
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "ckptmigrate",
            "check",
            str(tmp_path),
            "--json",
            "--migrations",
            str(REPO / "migrations"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "resume" in run.stdout


# -- writing for the old code ----------------------------------------------------------------


def old_model(old_code, cls_name: str, hparams: dict) -> torch.nn.Module:
    return getattr(old_code, cls_name)(**hparams)


def test_a_downgraded_resume_checkpoint_loads_into_the_old_code_with_weights_and_adam(
    schemas, old_code, tmp_path
):
    tinylm = schemas["tinylm"]
    fixture = resume_fixture()
    current = cm.load(fixture.path, schema=tinylm)
    back = cm.upgrade(current, tinylm, to="1.0.0")
    assert [h["downgrade"] for h in back.history[-4:]] == [True] * 4
    path = tmp_path / "for-old-code.pth"
    cm.save(path, back)

    # the old code, as it loaded its files: plain torch.load, strict load_state_dict
    obj = torch.load(path, weights_only=True)
    assert obj["__ckptmigrate__"]["version"] == "1.0.0"
    model = old_model(old_code, "TinyLM_1_0", obj["hparams"])
    model.load_state_dict(obj["state_dict"], strict=True)
    optimizer = old_code.lm_optimizer_1_0(model)
    optimizer.load_state_dict(obj["optimizer"])

    original = torch.load(fixture.path, weights_only=True)
    assert obj["optimizer"]["param_groups"] == original["optimizer"]["param_groups"]
    for pos, state in original["optimizer"]["state"].items():
        for field, value in state.items():
            assert torch.equal(obj["optimizer"]["state"][pos][field], value), (pos, field)
    golden = read_golden(fixture.golden_path)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(golden["input"]), golden["output"])
    losses = [old_code.lm_train_step_1_0(model, optimizer, b) for b in golden["resume"]["batches"]]
    torch.testing.assert_close(
        torch.tensor(losses, dtype=torch.float64), golden["resume"]["losses"], atol=1e-5, rtol=1e-5
    )


def test_a_checkpoint_trained_with_todays_code_is_written_for_the_old_code_by_the_cli(
    schemas, old_code, tmp_path
):
    tinylm = schemas["tinylm"]
    hparams = {
        "vocab_size": 32,
        "d_model": 8,
        "n_layers": 1,
        "n_heads": 2,
        "max_len": 16,
        "activation": "gelu",
        "norm_eps": 1e-5,
    }
    torch.manual_seed(3)
    model = tinylm.build(hparams)
    model.embed_scale.fill_(1.0)  # what the old code computed; anything else cannot go back
    optimizer = tinylm.optimizer(model)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 32, (4, 9), generator=gen) for _ in range(5)]
    for batch in batches[:3]:
        tinylm.train_step(model, optimizer, batch)
    src, dst = tmp_path / "today.pth", tmp_path / "old.pth"
    cm.save(
        src,
        cm.Checkpoint(
            dict(model.state_dict()),
            hparams=hparams,
            schema="tinylm",
            version="4.0.0",
            optimizer=optimizer.state_dict(),
        ),
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "ckptmigrate",
            "upgrade",
            str(src),
            "-o",
            str(dst),
            "--to",
            "1.0.0",
            "--migrations",
            str(REPO / "migrations"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr

    obj = torch.load(dst, weights_only=True)
    assert obj["hparams"] == {
        k: hparams[k] for k in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len")
    }
    old = old_model(old_code, "TinyLM_1_0", obj["hparams"])
    old.load_state_dict(obj["state_dict"], strict=True)
    old_optimizer = old_code.lm_optimizer_1_0(old)
    old_optimizer.load_state_dict(obj["optimizer"])
    probe = batches[0][:, :-1]
    model.eval(), old.eval()
    with torch.no_grad():
        torch.testing.assert_close(old(probe), model(probe), atol=1e-5, rtol=1e-5)
    old_losses = [old_code.lm_train_step_1_0(old, old_optimizer, b) for b in batches[3:]]
    new_losses = [tinylm.train_step(model, optimizer, b) for b in batches[3:]]
    torch.testing.assert_close(old_losses, new_losses, atol=1e-5, rtol=1e-5)


def test_a_checkpoint_the_old_code_cannot_represent_is_refused_on_the_way_down(schemas):
    tinylm = schemas["tinylm"]
    model = tinylm.build({"d_model": 8, "n_layers": 1, "activation": "gelu_tanh"})
    ckpt = cm.Checkpoint(
        dict(model.state_dict()), hparams=model.hparams, schema="tinylm", version="4.0.0"
    )
    with pytest.raises(cm.MigrationError, match="embed_scale"):
        cm.upgrade(ckpt, tinylm, to="1.0.0")
    model.embed_scale.fill_(1.0)
    ckpt.state_dict = dict(model.state_dict())
    with pytest.raises(cm.MigrationError, match="exact GELU only"):
        cm.upgrade(ckpt, tinylm, to="1.0.0")


def test_every_tinylm_step_is_declared_reversible(schemas):
    assert all(step.reversible for step in schemas["tinylm"].steps)
    assert check_fixtures(FIXTURES / "tinylm", schemas)  # the chain still passes forward
