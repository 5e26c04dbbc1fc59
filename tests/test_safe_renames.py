"""Safe renames: collisions name both keys, an op never applies twice, reversibility is declared."""

from __future__ import annotations

import pytest
import torch
from packaging.version import Version

import ckptmigrate as cm
from ckptmigrate.schema.ops import OpError


def ckpt(*keys: str) -> cm.Checkpoint:
    return cm.Checkpoint({k: torch.zeros(6, 2) for k in keys}, schema="s", version="1.0.0")


def test_a_rename_onto_an_existing_key_names_both():
    op = cm.ops.RenameKeys(r"blocks\.(\d+)\.w", r"layers.\1.w")
    with pytest.raises(OpError, match=r"'blocks\.0\.w' to 'layers\.0\.w', but 'layers\.0\.w'"):
        op.apply(ckpt("blocks.0.w", "layers.0.w"))


def test_two_keys_renamed_to_one_name_both():
    op = cm.ops.RenameKeys(r"(a|b)\.w", "c.w")
    with pytest.raises(OpError, match=r"'b\.w' and 'a\.w' would both become 'c\.w'"):
        op.apply(ckpt("a.w", "b.w"))


def test_rename_patterns_are_anchored():
    op = cm.ops.RenameKeys(r"w", "weight")
    c = ckpt("w", "head.w", "w2")
    op.apply(c)
    assert list(c.state_dict) == ["weight", "head.w", "w2"]


@pytest.mark.parametrize(
    "op",
    [
        cm.ops.RenamePrefix("blocks.", "layers."),
        cm.ops.RenameKeys(r"blocks\.(.*)", r"layers.\1", reverse=(r"layers\.(.*)", r"blocks.\1")),
        cm.ops.Split("{p}.qkv", ["{p}.q", "{p}.k", "{p}.v"]),
        cm.ops.Merge(["{p}.a", "{p}.b"], "{p}.ab"),
    ],
    ids=["RenamePrefix", "RenameKeys", "Split", "Merge"],
)
def test_an_op_applied_to_a_checkpoint_that_already_has_the_new_layout_is_refused(op):
    old = ckpt("blocks.qkv", "blocks.a", "blocks.b")
    op.apply(old)
    before = dict(old.state_dict)
    with pytest.raises(OpError, match="already has the new layout"):
        op.apply(old)
    assert old.state_dict == before


def test_a_step_applied_twice_fails_naming_the_step():
    schema = cm.Schema("s", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.Split("{p}.qkv", ["{p}.q", "{p}.k", "{p}.v"])])
    once = cm.upgrade(ckpt("x.qkv"), schema)
    mislabelled = once.copy()
    mislabelled.version = Version("1.0.0")  # a wrong stamp
    with pytest.raises(cm.MigrationError, match="1.0.0 -> 2.0.0.*already has the new layout"):
        cm.upgrade(mislabelled, schema)


def test_strip_prefix_on_an_unwrapped_checkpoint_raises_unless_optional():
    c = ckpt("a.w")
    with pytest.raises(cm.ops.NothingMatched, match="StripPrefix|RenamePrefix"):
        cm.ops.StripPrefix("module.").apply(c)
    cm.ops.StripPrefix("module.", missing_ok=True).apply(c)
    cm.ops.STRIP_DATAPARALLEL.apply(c)  # the shipped wrapper ops are optional
    assert list(c.state_dict) == ["a.w"]


def test_every_op_says_whether_it_is_reversible():
    assert cm.ops.RenamePrefix("a.", "b.").reversible
    assert cm.ops.Split("{p}.qkv", ["{p}.q", "{p}.k"]).reversible
    assert not cm.ops.RenameKeys("a", "b").reversible
    assert cm.ops.RenameKeys("a", "b", reverse=("b", "a")).reversible
    assert not cm.ops.DropKeys("a").reversible
    assert not cm.ops.Reshape("w", shape=(12,)).reversible
    assert cm.ops.Reshape("w", shape=(12,), from_shape=(6, 2)).reversible


def test_a_step_declared_reversible_is_refused_at_registration_when_an_op_is_one_way():
    schema = cm.Schema("s", current="2.0.0")
    with pytest.raises(cm.MigrationGraphError, match="declared reversible.*drop keys 'old'"):
        schema.add_migration("1.0.0", "2.0.0", [cm.ops.DropKeys("old")], reversible=True)
    assert schema.steps == []


def test_a_step_declared_one_way_is_not_used_for_downgrades():
    schema = cm.Schema("s", current="2.0.0")
    step = schema.add_migration(
        "1.0.0", "2.0.0", [cm.ops.RenamePrefix("a.", "b.")], reversible=False
    )
    assert not step.reversible
    with pytest.raises(cm.NoMigrationPathError):
        cm.upgrade(
            cm.Checkpoint({"b.w": torch.ones(1)}, schema="s", version="2.0.0"), schema, to="1.0.0"
        )
    reversible = cm.Schema("s", current="2.0.0")
    reversible.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("a.", "b.")], reversible=True)
    down = cm.upgrade(
        cm.Checkpoint({"b.w": torch.ones(1)}, schema="s", version="2.0.0"), reversible, to="1.0.0"
    )
    assert list(down.state_dict) == ["a.w"] and down.history[-1]["downgrade"] is True
