"""Typed steps (a function or a list of ops) and ops that say what they act on.

Every caller that must know whether a step is key-only, composable or runs caller code asks
the op (``Op.acts_on``), never its type, so a subclass that rewrites tensors cannot slip
through the metadata-only streamer.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import ckptmigrate as cm
from ckptmigrate import ops
from ckptmigrate.engine.rewrite import upgrade_file
from ckptmigrate.schema.graph import FunctionStep, OpsStep


class DoublingRename(ops.RenamePrefix):
    """A user's op: renames like its parent, and also doubles every tensor it renames."""

    def apply(self, ckpt: cm.Checkpoint) -> None:
        super().apply(ckpt)
        ckpt.state_dict = {
            k: v * 2 if k.startswith(self.new) else v for k, v in ckpt.state_dict.items()
        }


def test_an_op_that_rewrites_apply_is_treated_as_caller_code():
    assert ops.RenamePrefix("a.", "b.").metadata_only
    op = DoublingRename("a.", "b.")
    assert op.acts_on == {ops.CODE}
    assert op.runs_user_code and not op.metadata_only and not op.composable


def test_an_op_that_declares_what_it_touches_is_believed():
    class QuietRename(ops.RenamePrefix):
        acts_on = frozenset({ops.KEYS})

        def apply(self, ckpt: cm.Checkpoint) -> None:
            super().apply(ckpt)

    assert QuietRename("a.", "b.").metadata_only


def test_the_streamer_does_not_copy_bytes_for_an_op_that_changes_them(tmp_path):
    """Streaming a subclass's step would copy the old bytes and lose the doubling."""
    schema = cm.Schema("net", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [DoublingRename("blocks.", "layers.")])
    src, dst = tmp_path / "old.pth", tmp_path / "new.pth"
    weight = torch.arange(6.0).reshape(2, 3)
    cm.save(src, {"blocks.0.weight": weight}, schema="net", version="1.0.0")
    result = upgrade_file(src, dst, schema)
    assert not result.streamed
    new = torch.load(dst, weights_only=True)["state_dict"]
    torch.testing.assert_close(new["layers.0.weight"], weight * 2, rtol=0, atol=0)


def test_every_builtin_op_declares_what_it_acts_on():
    builtin = [
        cls
        for cls in vars(ops).values()
        if inspect.isclass(cls)
        and issubclass(cls, ops.Op)
        and cls.__module__.startswith(ops.__name__ + ".")
    ]
    assert len(builtin) > 10
    for cls in builtin:
        if cls is ops.Op:
            continue
        assert cls.acts_on <= {ops.KEYS, ops.HPARAMS, ops.TENSORS, ops.CODE}, cls
        assert (ops.CODE in cls.acts_on) == (cls is ops.Call), cls


def test_steps_are_typed_and_a_downgrade_runs_the_inverses_in_reverse():
    schema = cm.Schema("m", current="2.0.0")
    first, second = ops.RenamePrefix("a.", "b."), ops.SetHparam("eps", 1.0, previous=ops.ABSENT)
    schema.add_migration("1.0.0", "2.0.0", [first, second])

    @schema.migration("0.9.0", "1.0.0")
    def bump(ckpt: cm.Checkpoint) -> None:
        pass

    fn_step, ops_step = schema.graph.steps
    assert isinstance(fn_step.action, FunctionStep) and fn_step.action.fn is bump
    assert isinstance(ops_step.action, OpsStep)
    (forward,) = schema.plan("1.0.0")
    assert forward.ops == [first, second]
    (backward,) = schema.plan("2.0.0", "1.0.0")
    assert backward.ops == [second.inverse(), first.inverse()]
    assert schema.plan("0.9.0")[0].ops is None  # a function step has no ops to ask
    with pytest.raises(cm.MigrationGraphError, match="no inverse"):
        fn_step.action.function(downgrade=True)


def test_the_composed_path_does_not_fold_a_subclass_that_changes_values():
    """The one-pass composer folds prefix renames; a subclass that also doubles must run."""
    schema = cm.Schema("net", current="3.0.0")
    schema.add_migration("1.0.0", "2.0.0", [DoublingRename("blocks.", "layers.")])
    schema.add_migration("2.0.0", "3.0.0", [ops.RenamePrefix("layers.", "stack.")])
    weight = torch.ones(2)
    ckpt = cm.Checkpoint(state_dict={"blocks.0.w": weight}, schema="net", version="1.0.0")
    new = cm.upgrade(ckpt, schema)
    torch.testing.assert_close(new.state_dict["stack.0.w"], weight * 2, rtol=0, atol=0)


@pytest.mark.parametrize("mmap", [False, True], ids=["loaded", "mapped"])
def test_a_step_may_deep_copy_the_state_dict_and_edit_its_copy(tmp_path, mmap):
    # behind the read-only guard copy.deepcopy(ckpt.state_dict) raised (torch's deep copy of a
    # tensor subclass), so the everyday "edit a copy, leave the input alone" step failed
    import copy

    path = tmp_path / "a.pth"
    torch.save({"a": torch.ones(3), "b": torch.ones(2)}, path)
    schema = cm.Schema("x", current="2.0.0")

    @schema.migration("1.0.0", "2.0.0")
    def edit_a_copy(ckpt: cm.Checkpoint) -> None:
        sd = copy.deepcopy(ckpt.state_dict)
        sd["a"] += 1  # the copy is the step's own
        sd["tied"] = sd["b"]
        ckpt.state_dict = sd

    got = cm.load(path, schema=schema, from_version="1.0.0", mmap=mmap)
    torch.testing.assert_close(got.state_dict["a"], torch.full((3,), 2.0), rtol=0, atol=0)
    assert type(got.state_dict["a"]) is torch.Tensor
    out = tmp_path / "b.pth"
    upgrade_file(path, out, schema, from_version="1.0.0")
    assert cm.load(out, upgrade=False).state_dict["a"].tolist() == [2.0, 2.0, 2.0]
    assert torch.load(path)["a"].tolist() == [1.0, 1.0, 1.0]  # the input as it was
