"""Ops as data (``op_data`` / ``op_from_data``): each op written as JSON and read back acts as
the op did, and each inverse read back from JSON undoes its op, value for value."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

import ckptmigrate as cm
from ckptmigrate.schema.ops.data import known_ops, op_data, op_from_data
from ckptmigrate.schema.provenance import ops_digest

ops = cm.ops

#: the ops below move, reshape, permute, pad and cast values: each comes back exactly
EXACT = {"rtol": 0.0, "atol": 0.0}


def sample() -> cm.Checkpoint:
    gen = torch.Generator().manual_seed(0)
    sd = {
        "blocks.0.qkv.weight": torch.randn(6, 4, generator=gen),
        "blocks.0.fc.weight": torch.randn(4, 4, generator=gen),
        "experts.0.w": torch.randn(2, 3, generator=gen),
        "experts.1.w": torch.randn(2, 3, generator=gen),
        "emb.weight": torch.randn(5, 4, generator=gen),
        "rope.weight": torch.randn(8, 4, generator=gen),
    }
    return cm.Checkpoint(sd, hparams={"eps": 1e-5, "old": 1}, schema="m", version="1.0.0")


QKV = ["blocks.{n}.q.{kind}", "blocks.{n}.k.{kind}", "blocks.{n}.v.{kind}"]

REVERSIBLE = {
    "rename prefix": ops.RenamePrefix("blocks.", "layers."),
    "rename keys": ops.RenameKeys(
        r"blocks\.(\d+)\.fc\.(.*)",
        r"blocks.\1.up.\2",
        reverse=(r"blocks\.(\d+)\.up\.(.*)", r"blocks.\1.fc.\2"),
    ),
    "split": ops.Split("blocks.{n}.qkv.{kind}", QKV),
    "split by sizes": ops.Split("blocks.{n}.qkv.{kind}", QKV, sizes=[2, 3, 1]),
    "split interleaved": ops.SplitInterleaved("blocks.{n}.qkv.{kind}", QKV, sizes=[1, 1, 1]),
    "stack": ops.Stack("experts.{i}.w", "experts.w", count=2),
    "permute for rope": ops.PermuteForRope("rope.weight", n_heads=2),
    "reshape": ops.Reshape("emb.weight", shape=(20,), from_shape=(5, 4)),
    "transpose": ops.Transpose("emb.weight"),
    "cast": ops.Cast("emb.weight", dtype=torch.float64, from_dtype=torch.float32),
    "pad": ops.Pad("emb.weight", size=8, from_size=5),
    "pad to a multiple": ops.Pad("emb.weight", multiple=4, from_size=5, fill="mean"),
    "set hparam": ops.SetHparam("eps", 1e-6, previous=1e-5),
    "set a new hparam": ops.SetHparam("new", [1, 2], previous=ops.ABSENT),
    "rename hparam": ops.RenameHparam("old", "renamed"),
    "drop hparam": ops.DropHparam("old", default=1),
}


def through_json(data):
    """``data`` as a file would bring it back: JSON text, parsed."""
    return json.loads(json.dumps(data, allow_nan=False))


def assert_same(a: cm.Checkpoint, b: cm.Checkpoint) -> None:
    assert list(a.state_dict) == list(b.state_dict)
    for key, value in a.state_dict.items():
        assert b.state_dict[key].dtype == value.dtype, key
        torch.testing.assert_close(b.state_dict[key], value, **EXACT)
    assert a.hparams == b.hparams


@pytest.mark.parametrize("name", sorted(REVERSIBLE))
def test_an_op_read_back_from_json_does_what_the_op_does(name):
    op = REVERSIBLE[name]
    rebuilt = op_from_data(through_json(op_data(op)))
    assert type(rebuilt) is type(op)
    expected, got = sample(), sample()
    op.apply(expected)
    rebuilt.apply(got)
    assert_same(expected, got)


@pytest.mark.parametrize("name", sorted(REVERSIBLE))
def test_an_inverse_read_back_from_json_undoes_its_op_value_for_value(name):
    op = REVERSIBLE[name]
    undo = op_from_data(through_json(op_data(op.inverse())))
    ckpt = sample()
    op.apply(ckpt)
    with pytest.raises(AssertionError):  # the op changed something, so undoing it shows
        assert_same(sample(), ckpt)
    undo.apply(ckpt)
    assert_same(sample(), ckpt)


def test_a_downgrade_through_the_recorded_inverse_matches_the_schemas_own():
    schema = cm.Schema("m", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [REVERSIBLE[n] for n in ("split", "stack", "pad")])
    up = cm.upgrade(sample(), schema)
    undo = [op_from_data(d) for d in through_json(up.history[-1]["inverse"])]
    by_data = up.copy()
    for op in undo:
        op.apply(by_data)
    assert_same(cm.upgrade(up, schema, to="1.0.0"), by_data)
    assert_same(sample(), by_data)


def test_fields_at_their_default_are_left_out_so_a_field_added_later_changes_no_data():
    assert op_data(ops.Split("a", ["b", "c"])) == {
        "op": "Split",
        "args": {"source": "a", "targets": ["b", "c"]},
    }
    assert op_from_data({"op": "Split", "args": {"source": "a", "targets": ["b", "c"]}}) == (
        ops.Split("a", ["b", "c"], dim=0, sizes=None, missing_ok=False)
    )
    assert op_data(ops.Split("a", ["b", "c"], dim=1))["args"]["dim"] == 1


def test_ops_that_are_not_data_say_so():
    with pytest.raises(cm.OpDataError, match="runs code"):
        op_data(ops.Call(lambda ckpt: None))
    with pytest.raises(cm.OpDataError, match="Tensor"):
        op_data(ops.AddKey("x", torch.zeros(2)))


def test_a_step_whose_inverse_is_data_records_it_even_when_the_step_is_not():
    schema = cm.Schema("m", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [ops.AddKey("extra", torch.zeros(2))])
    entry = cm.upgrade(sample(), schema).history[-1]
    assert entry["inverse"] == [op_data(ops.DropKeys("extra"))]
    assert entry["digest"]["of"] == "ops"


@dataclass
class RenameOneKey(ops.Op):
    """A declarative op of a project's own: it says it acts on key names only."""

    acts_on = frozenset({ops.KEYS})
    old: str
    new: str

    def apply(self, ckpt: cm.Checkpoint) -> None:
        ckpt.state_dict = {
            (self.new if k == self.old else k): v for k, v in ckpt.state_dict.items()
        }

    def inverse(self) -> ops.Op:
        return RenameOneKey(self.new, self.old)


@dataclass
class Rewrites(ops.Op):
    """An op of a project's own that does not say what it acts on: it may run anything."""

    old: str

    def apply(self, ckpt: cm.Checkpoint) -> None:
        ckpt.state_dict.pop(self.old)


def test_a_projects_own_declarative_op_is_data_by_module_and_name_one_that_runs_code_is_not():
    data = op_data(RenameOneKey("emb.weight", "embed.weight"))
    assert data["op"] == f"{__name__}.RenameOneKey"
    assert op_from_data(through_json(data)) == RenameOneKey("emb.weight", "embed.weight")
    assert f"{__name__}.Rewrites" not in known_ops()
    with pytest.raises(cm.OpDataError):
        op_from_data({"op": f"{__name__}.Rewrites", "args": {"old": "emb.weight"}})


def test_the_digest_of_ops_follows_their_data():
    a = [ops.RenamePrefix("blocks.", "layers.")]
    assert ops_digest(a) == ops_digest([ops.RenamePrefix("blocks.", "layers.")])
    assert ops_digest(a) != ops_digest([ops.RenamePrefix("blocks.", "layer.")])
    assert ops_digest(a) != ops_digest([ops.RenamePrefix("blocks.", "layers.", missing_ok=True)])
    cast = ops.Cast("w", dtype=torch.float16)
    assert ops_digest([cast]) == ops_digest([ops.Cast("w", dtype="torch.float16")])
    tensor = ops.AddKey("x", torch.zeros(2))
    assert ops_digest([tensor]) == ops_digest([ops.AddKey("x", torch.zeros(2))])
    assert ops_digest([tensor]) != ops_digest([ops.AddKey("x", torch.ones(2))])
