"""An op that matches nothing is an error naming the op, the step and the nearest keys, unless
the op was given ``missing_ok=True``; through the CLI it is one line, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from processes import run

import ckptmigrate as cm
from ckptmigrate import ops
from ckptmigrate.errors import OpMatchedNothingError


def lightning_like() -> cm.Checkpoint:
    """The user's module under a LightningModule attribute: every key starts with ``net.``."""
    sd = {
        "net.encoder.w": torch.ones(2, 3),
        "net.encoder.b": torch.zeros(2),
        "net.head.w": torch.ones(3, 2),
    }
    return cm.Checkpoint(sd, hparams={"d": 2}, schema="net", version="1.0.0")


#: every kind of op that looks for keys or hparams, each finding none in ``lightning_like``
NOTHING_TO_DO = [
    ops.RenamePrefix("encoder.", "enc."),
    ops.StripPrefix("module."),
    ops.RenameKeys(r"encoder\.(.*)", r"enc.\1"),
    ops.DropKeys(r"encoder\.running_mean"),
    ops.Split("{p}.qkv.{k}", ["{p}.q.{k}", "{p}.k.{k}"]),
    ops.Merge(["{p}.q.{k}", "{p}.k.{k}"], "{p}.qkv.{k}"),
    ops.Reshape("encoder.w", shape=(6,)),
    ops.Transpose("encoder.w"),
    ops.Cast("encoder.w", dtype="float16"),
    ops.RenameHparam("n_classes", "num_classes"),
    ops.DropHparam("dropout"),
]


def optional(op: ops.Op) -> ops.Op:
    if isinstance(op, ops.RenamePrefix):
        return ops.RenamePrefix(op.old, op.new, missing_ok=True)
    fields = {k: v for k, v in vars(op).items() if k != "missing_ok"}
    return type(op)(**fields, missing_ok=True)


@pytest.mark.parametrize("op", NOTHING_TO_DO, ids=lambda op: type(op).__name__)
def test_an_op_that_matches_nothing_raises_before_changing_anything(op: ops.Op) -> None:
    ckpt = lightning_like()
    keys, hparams = list(ckpt.state_dict), dict(ckpt.hparams)
    with pytest.raises(ops.NothingMatched) as caught:
        op.apply(ckpt)
    assert caught.value.op is op and str(caught.value).startswith(op.label())
    assert list(ckpt.state_dict) == keys and ckpt.hparams == hparams


@pytest.mark.parametrize("op", NOTHING_TO_DO, ids=lambda op: type(op).__name__)
def test_missing_ok_makes_an_op_that_finds_nothing_a_no_op(op: ops.Op) -> None:
    ckpt = lightning_like()
    before = {k: v.clone() for k, v in ckpt.state_dict.items()}
    optional(op).apply(ckpt)
    assert list(ckpt.state_dict) == list(before) and ckpt.hparams == {"d": 2}
    for key, value in before.items():
        assert (
            torch.equal(ckpt.state_dict[key], value) and ckpt.state_dict[key].dtype == value.dtype
        )


@pytest.mark.parametrize(
    "op",
    [o for o in NOTHING_TO_DO if o.inverse() is not None],
    ids=lambda op: type(op).__name__,
)
def test_the_inverse_of_an_optional_op_is_optional_too(op: ops.Op) -> None:
    assert optional(op).inverse().missing_ok and not op.inverse().missing_ok


def net_schema(*steps: list[ops.Op]) -> cm.Schema:
    schema = cm.Schema("net", current=f"1.{len(steps)}.0")
    for n, step in enumerate(steps):
        schema.add_migration(f"1.{n}.0", f"1.{n + 1}.0", step)
    return schema


def test_upgrade_names_the_op_the_step_and_the_prefix_the_keys_start_with() -> None:
    schema = net_schema([ops.RenamePrefix("encoder.", "enc.")])
    with pytest.raises(OpMatchedNothingError) as caught:
        cm.upgrade(lightning_like(), schema)
    err = caught.value
    assert isinstance(err, cm.MigrationError) and isinstance(err, cm.CkptMigrateError)
    assert "RenamePrefix('encoder.', 'enc.') matched no key; keys start with 'net.'" in str(err)
    assert err.op == "RenamePrefix('encoder.', 'enc.')"
    assert (err.schema, str(err.from_version), str(err.to_version)) == ("net", "1.0.0", "1.1.0")
    assert err.starts == ["net."] and err.prefix == "net."
    assert set(err.nearest) == {"net.encoder.w", "net.encoder.b"}
    assert "--prefix net." in str(err) and "missing_ok=True" in str(err)


def test_a_composed_run_raises_the_error_a_step_by_step_run_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib

    upgrade_mod = importlib.import_module("ckptmigrate.engine.upgrade")
    schema = net_schema([ops.RenamePrefix("net.", "model.")], [ops.RenamePrefix("blocks.", "x.")])
    with pytest.raises(OpMatchedNothingError) as composed:
        cm.upgrade(lightning_like(), schema)
    monkeypatch.setattr(upgrade_mod, "apply_composed", lambda *a, **k: None)
    with pytest.raises(OpMatchedNothingError) as stepwise:
        cm.upgrade(lightning_like(), schema)
    assert str(composed.value) == str(stepwise.value)
    assert str(composed.value.to_version) == "1.2.0" and composed.value.starts == ["model."]


def test_a_drop_of_a_buffer_only_some_files_have_is_optional_with_missing_ok() -> None:
    schema = net_schema([ops.DropKeys(r"net\.encoder\.running_mean", missing_ok=True)])
    with_buffer = lightning_like()
    with_buffer.state_dict["net.encoder.running_mean"] = torch.zeros(2)
    assert "net.encoder.running_mean" not in cm.upgrade(with_buffer, schema).state_dict
    upgraded = cm.upgrade(lightning_like(), schema)
    assert list(upgraded.state_dict) == list(lightning_like().state_dict)
    assert str(upgraded.version) == "1.1.0"


NET_MIGRATIONS = """
import ckptmigrate as cm

schema = cm.Schema("net", current="1.1.0")
schema.add_migration("1.0.0", "1.1.0", [cm.ops.RenamePrefix("encoder.", "enc.")])
"""


def test_the_cli_refuses_in_one_line_and_writes_and_stamps_nothing(tmp_path: Path) -> None:
    (tmp_path / "mig").mkdir()
    (tmp_path / "mig" / "net.py").write_text(NET_MIGRATIONS)
    src = tmp_path / "lit.ckpt"
    ckpt = lightning_like()
    cm.save(src, ckpt.state_dict, schema="net", version="1.0.0")
    before = src.read_bytes()
    for target in (["-o", "out.ckpt"], ["--in-place"]):
        proc = run(tmp_path, "upgrade", "lit.ckpt", *target, "--migrations", "mig")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("ckptmigrate: error: ")
        assert "RenamePrefix('encoder.', 'enc.') matched no key; keys start with 'net.'" in lines[0]
        assert "--prefix net." in lines[0]
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lit.ckpt", "mig"]
