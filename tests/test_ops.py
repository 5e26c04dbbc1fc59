"""Declarative ops: what each one does, its inverse, and the collisions it refuses."""

from __future__ import annotations

import re

import pytest
import torch

import ckptmigrate as cm
from ckptmigrate import ops
from ckptmigrate.schema.ops import ABSENT, OpError


def base() -> cm.Checkpoint:
    """A small GPT-2-like checkpoint behind a DataParallel ``module.`` prefix."""
    gen = torch.Generator().manual_seed(0)
    return cm.Checkpoint(
        {
            "module.blocks.0.attn.c_attn.weight": torch.randn(12, 4, generator=gen),
            "module.blocks.0.attn.c_attn.bias": torch.randn(12, generator=gen),
            "module.blocks.0.fc.weight": torch.randn(6, 4, generator=gen),
            "module.head.scale": torch.randn(6, generator=gen),
        },
        hparams={"d": 4, "eps": 1e-5},
        schema="m",
        version="1.0.0",
    )


def applied(op: ops.Op, ckpt: cm.Checkpoint | None = None) -> cm.Checkpoint:
    out = (ckpt or base()).copy()
    op.apply(out)
    return out


def assert_same(a: cm.Checkpoint, b: cm.Checkpoint) -> None:
    assert list(a.state_dict) == list(b.state_dict)
    for key in a.state_dict:
        assert a.state_dict[key].dtype == b.state_dict[key].dtype, key
        assert torch.equal(a.state_dict[key], b.state_dict[key]), key
    assert a.hparams == b.hparams


def _double_head(ckpt):
    ckpt.state_dict["module.head.scale"] = ckpt.state_dict["module.head.scale"] * 2


def _halve_head(ckpt):
    ckpt.state_dict["module.head.scale"] = ckpt.state_dict["module.head.scale"] / 2


QKV = ["{p}.q.{kind}", "{p}.k.{kind}", "{p}.v.{kind}"]

INVERTIBLE = {
    "rename-prefix": ops.RenamePrefix("module.blocks.", "module.layers."),
    "strip-prefix": ops.StripPrefix("module."),
    "rename-keys": ops.RenameKeys(
        r"module\.blocks\.(\d+)\.(.*)",
        r"module.layers.\1.\2",
        reverse=(r"module\.layers\.(\d+)\.(.*)", r"module.blocks.\1.\2"),
    ),
    "add-key": ops.AddKey("module.head.bias", torch.zeros(6)),
    "split": ops.Split("{p}.c_attn.{kind}", QKV, dim=0),
    "split-sizes": ops.Split("{p}.c_attn.{kind}", QKV, dim=0, sizes=[6, 3, 3]),
    "reshape": ops.Reshape("module.head.scale", shape=(2, 3), from_shape=(6,)),
    "transpose": ops.Transpose("{p}.fc.weight", 0, 1),
    "cast": ops.Cast("{p}.weight", dtype=torch.float64, from_dtype="float32"),
    "set-hparam-previous-value": ops.SetHparam("eps", 1e-6, previous=1e-5),
    "set-hparam-previous-absent": ops.SetHparam("act", "gelu", previous=ABSENT),
    "rename-hparam": ops.RenameHparam("d", "d_model"),
    "drop-hparam-with-default": ops.DropHparam("eps", default=1e-5),
    "call-with-inverse": ops.Call(_double_head, _halve_head),
}


@pytest.mark.parametrize("op", INVERTIBLE.values(), ids=INVERTIBLE.keys())
def test_apply_then_inverse_restores_keys_tensors_and_hparams(op):
    original = base()
    forward = applied(op, original)
    assert (list(forward.state_dict), forward.hparams) != (
        list(original.state_dict),
        original.hparams,
    ) or any(
        not torch.equal(forward.state_dict[k], original.state_dict[k])
        or forward.state_dict[k].dtype != original.state_dict[k].dtype
        for k in original.state_dict
    ), "the op changed nothing, so the round trip proves nothing"
    inverse = op.inverse()
    assert inverse is not None and op.reversible
    back = applied(inverse, forward)
    assert_same(back, original)
    assert_same(original, base())  # the ops worked on copies


@pytest.mark.parametrize(
    "op",
    [
        ops.RenameKeys(r"module\.(.*)", r"\1"),
        ops.DropKeys(r"module\.head\..*"),
        ops.Reshape("module.head.scale", shape=(2, 3)),
        ops.Cast("{p}.weight", dtype=torch.float16),
        ops.SetHparam("eps", 1e-6),
        ops.DropHparam("eps"),
        ops.Call(_double_head),
    ],
    ids=repr,
)
def test_ops_without_what_to_restore_have_no_inverse(op):
    assert op.inverse() is None
    assert not op.reversible


# ---------------------------------------------------------------- each op's effect


def test_rename_prefix_renames_only_matching_keys_in_place():
    out = applied(ops.RenamePrefix("module.blocks.", "module.layers."))
    assert list(out.state_dict) == [
        "module.layers.0.attn.c_attn.weight",
        "module.layers.0.attn.c_attn.bias",
        "module.layers.0.fc.weight",
        "module.head.scale",
    ]
    src = base()
    assert torch.equal(
        out.state_dict["module.layers.0.fc.weight"], src.state_dict["module.blocks.0.fc.weight"]
    )


def test_strip_prefix_removes_the_wrapper_prefix():
    out = applied(ops.StripPrefix("module."))
    assert all(not k.startswith("module.") for k in out.state_dict)
    assert "head.scale" in out.state_dict


def test_rename_prefix_on_checkpoint_already_in_new_layout_raises():
    new_layout = applied(ops.RenamePrefix("module.blocks.", "module.layers."))
    with pytest.raises(OpError, match="already has the new layout"):
        ops.RenamePrefix("module.blocks.", "module.layers.").apply(new_layout)


def test_rename_keys_uses_regex_groups_and_fullmatch():
    op = ops.RenameKeys(r"module\.blocks\.(\d+)\.fc\.(weight|bias)", r"module.blocks.\1.mlp.\2")
    out = applied(op)
    assert "module.blocks.0.mlp.weight" in out.state_dict
    assert "module.blocks.0.fc.weight" not in out.state_dict
    # fullmatch: a pattern matching only part of a key matches nothing, an error unless optional
    with pytest.raises(ops.NothingMatched, match=r"RenameKeys\('fc', 'mlp'\) matched no key"):
        applied(ops.RenameKeys(r"fc", "mlp"))
    optional = ops.RenameKeys(r"fc", "mlp", missing_ok=True)
    assert list(applied(optional).state_dict) == list(base().state_dict)


def test_rename_keys_onto_an_existing_key_raises():
    op = ops.RenameKeys(r"module\.head\.scale", "module.blocks.0.fc.weight")
    with pytest.raises(OpError, match="already exists"):
        applied(op)


def test_rename_keys_two_keys_onto_one_raises():
    op = ops.RenameKeys(r"module\.blocks\.0\.attn\.c_attn\.(weight|bias)", "module.fused")
    with pytest.raises(OpError, match="would both become"):
        applied(op)


def test_drop_keys_drops_every_full_match():
    out = applied(ops.DropKeys(r".*\.bias"))
    assert "module.blocks.0.attn.c_attn.bias" not in out.state_dict
    assert len(out.state_dict) == 3


def test_add_key_adds_a_fresh_copy_of_the_default_and_refuses_to_overwrite():
    default = torch.zeros(6)
    op = ops.AddKey("module.head.bias", default)
    out1, out2 = applied(op), applied(op)
    assert torch.equal(out1.state_dict["module.head.bias"], default)
    assert out1.state_dict["module.head.bias"] is not default
    assert (
        out1.state_dict["module.head.bias"].data_ptr()
        != out2.state_dict["module.head.bias"].data_ptr()
    )
    with pytest.raises(OpError, match="already exists"):
        ops.AddKey("module.head.scale", default).apply(base())


def test_add_key_default_may_be_computed_from_the_checkpoint():
    op = ops.AddKey("module.head.bias", lambda ckpt: torch.full((ckpt.hparams["d"],), 0.5))
    assert torch.equal(applied(op).state_dict["module.head.bias"], torch.full((4,), 0.5))


def test_split_fills_templates_and_chunks_equally():
    src = base()
    out = applied(ops.Split("{p}.c_attn.{kind}", QKV, dim=0))
    assert list(out.state_dict)[:6] == [
        "module.blocks.0.attn.q.weight",
        "module.blocks.0.attn.k.weight",
        "module.blocks.0.attn.v.weight",
        "module.blocks.0.attn.q.bias",
        "module.blocks.0.attn.k.bias",
        "module.blocks.0.attn.v.bias",
    ]
    fused = src.state_dict["module.blocks.0.attn.c_attn.weight"]
    assert torch.equal(out.state_dict["module.blocks.0.attn.k.weight"], fused[4:8])
    assert out.state_dict["module.blocks.0.attn.q.bias"].shape == (4,)


def test_split_with_sizes_uses_them():
    out = applied(ops.Split("{p}.c_attn.{kind}", QKV, dim=0, sizes=[6, 3, 3]))
    shapes = [out.state_dict[f"module.blocks.0.attn.{n}.weight"].shape for n in "qkv"]
    assert shapes == [(6, 4), (3, 4), (3, 4)]


def test_split_along_dim_one():
    ckpt = cm.Checkpoint({"x.fused": torch.arange(12.0).reshape(2, 6)})
    out = applied(ops.Split("{p}.fused", ["{p}.a", "{p}.b"], dim=1), ckpt)
    assert torch.equal(out.state_dict["x.a"], torch.tensor([[0.0, 1, 2], [6, 7, 8]]))


def test_split_not_divisible_raises():
    with pytest.raises(OpError, match="not divisible"):
        applied(ops.Split("{p}.c_attn.{kind}", ["{p}.a.{kind}"] * 5, dim=0))


def test_split_onto_existing_keys_raises():
    ckpt = base()
    ckpt.state_dict["module.blocks.0.attn.q.weight"] = torch.zeros(4, 4)
    with pytest.raises(OpError, match="already exist"):
        applied(ops.Split("{p}.c_attn.{kind}", QKV, dim=0), ckpt)


@pytest.mark.parametrize("sizes", [None, [6, 3, 3]])
def test_merge_concatenates_and_splits_back(sizes):
    split = applied(ops.Split("{p}.c_attn.{kind}", QKV, dim=0, sizes=sizes))
    merge = ops.Merge(QKV, "{p}.c_attn.{kind}", dim=0, sizes=sizes)
    merged = applied(merge, split)
    assert_same(merged, base())
    assert_same(applied(merge.inverse(), merged), split)


def test_merge_with_a_missing_source_raises():
    split = applied(ops.Split("{p}.c_attn.{kind}", QKV, dim=0))
    del split.state_dict["module.blocks.0.attn.v.weight"]
    with pytest.raises(OpError, match="missing"):
        applied(ops.Merge(QKV, "{p}.c_attn.{kind}"), split)


def test_merge_onto_an_existing_key_raises():
    split = applied(ops.Split("{p}.c_attn.{kind}", QKV, dim=0))
    split.state_dict["module.blocks.0.attn.c_attn.weight"] = torch.zeros(1)
    with pytest.raises(OpError, match="already exists"):
        applied(ops.Merge(QKV, "{p}.c_attn.{kind}"), split)


def test_reshape_transpose_cast_change_matching_tensors_only():
    src = base()
    reshaped = applied(ops.Reshape("module.head.scale", shape=(2, 3)))
    assert reshaped.state_dict["module.head.scale"].shape == (2, 3)
    transposed = applied(ops.Transpose("{p}.fc.weight", 0, 1))
    assert torch.equal(
        transposed.state_dict["module.blocks.0.fc.weight"],
        src.state_dict["module.blocks.0.fc.weight"].T,
    )
    assert transposed.state_dict["module.blocks.0.fc.weight"].is_contiguous()
    cast = applied(ops.Cast("{p}.weight", dtype="bfloat16"))
    dtypes = {k: v.dtype for k, v in cast.state_dict.items()}
    assert dtypes["module.blocks.0.fc.weight"] == torch.bfloat16
    assert dtypes["module.blocks.0.attn.c_attn.bias"] == torch.float32


def test_reshape_to_a_wrong_size_raises():
    with pytest.raises(OpError):
        applied(ops.Reshape("module.head.scale", shape=(4, 4)))


def test_cast_to_an_unknown_dtype_raises():
    with pytest.raises(OpError, match="not a torch dtype"):
        applied(ops.Cast("{p}.weight", dtype="float33"))


def test_set_hparam_overwrites_by_default():
    assert applied(ops.SetHparam("eps", 1e-6)).hparams["eps"] == 1e-6


@pytest.mark.parametrize(("present", "expected"), [(True, 1e-5), (False, 1e-3)])
def test_set_hparam_without_overwrite_only_fills_a_missing_value(present, expected):
    ckpt = base()
    if not present:
        del ckpt.hparams["eps"]
    out = applied(ops.SetHparam("eps", 1e-3, overwrite=False), ckpt)
    assert out.hparams["eps"] == expected


def test_set_hparam_inverse_restores_previous_value_or_absence():
    set_prev = ops.SetHparam("eps", 1e-6, previous=1e-5)
    assert applied(set_prev.inverse(), applied(set_prev)).hparams["eps"] == 1e-5
    set_new = ops.SetHparam("act", "gelu", previous=ABSENT)
    forward = applied(set_new)
    assert forward.hparams["act"] == "gelu"
    assert "act" not in applied(set_new.inverse(), forward).hparams


def test_rename_hparam_renames_and_refuses_a_collision():
    out = applied(ops.RenameHparam("d", "d_model"))
    assert out.hparams == {"d_model": 4, "eps": 1e-5}
    with pytest.raises(ops.NothingMatched, match="matched no hparam"):
        applied(ops.RenameHparam("missing", "x"))
    assert applied(ops.RenameHparam("missing", "x", missing_ok=True)).hparams == base().hparams
    with pytest.raises(OpError, match="already exists"):
        applied(ops.RenameHparam("d", "eps"))


def test_drop_hparam_drops_and_its_inverse_restores_the_default():
    op = ops.DropHparam("eps", default=1e-5)
    out = applied(op)
    assert "eps" not in out.hparams
    assert applied(op.inverse(), out).hparams["eps"] == 1e-5


def test_call_runs_the_function_on_the_checkpoint():
    out = applied(ops.Call(_double_head))
    assert torch.equal(
        out.state_dict["module.head.scale"], base().state_dict["module.head.scale"] * 2
    )


# ---------------------------------------------------------------- module metadata


def test_module_metadata_prefixes_follow_renames():
    ckpt = cm.Checkpoint(
        {
            "blocks.0.weight": torch.ones(2),
            "blocks.0.running_mean": torch.zeros(2),
            "head.weight": torch.ones(2),
        },
        module_metadata={
            "": {"version": 1},
            "blocks": {"version": 1},
            "blocks.0": {"version": 2},
            "head": {"version": 1},
        },
    )
    out = applied(ops.RenamePrefix("blocks.", "layers."), ckpt)
    assert out.module_metadata == {
        "": {"version": 1},
        "layers": {"version": 1},
        "layers.0": {"version": 2},
        "head": {"version": 1},
    }
    back = applied(ops.RenamePrefix("layers.", "blocks."), out)
    assert back.module_metadata == ckpt.module_metadata


def test_module_metadata_follows_regex_renames_and_strip_prefix():
    ckpt = cm.Checkpoint(
        {"module.norm.1.weight": torch.ones(2), "module.norm.1.bias": torch.zeros(2)},
        module_metadata={"": {}, "module": {}, "module.norm": {}, "module.norm.1": {"version": 2}},
    )
    out = applied(ops.RenameKeys(r"(.*)\.norm\.1\.(\w+)", r"\1.norm1.\2"), ckpt)
    assert out.module_metadata["module.norm1"] == {"version": 2}
    stripped = applied(ops.StripPrefix("module."), out)
    assert stripped.module_metadata["norm1"] == {"version": 2}


# ---------------------------------------------------------------- steps built from ops


@pytest.mark.parametrize(
    ("op_list", "reversible"),
    [
        ([ops.RenamePrefix("a.", "b."), ops.SetHparam("x", 1, previous=ABSENT)], True),
        ([ops.RenamePrefix("a.", "b."), ops.DropKeys("c")], False),
        ([ops.Call(_double_head)], False),
        ([ops.Call(_double_head, _halve_head)], True),
        ([], True),
    ],
)
def test_a_step_is_reversible_when_every_op_has_an_inverse(op_list, reversible):
    schema = cm.Schema("m", current="2.0.0")
    step = schema.add_migration("1.0.0", "2.0.0", op_list)
    assert step.reversible is reversible


def test_add_migration_refuses_non_ops():
    schema = cm.Schema("m", current="2.0.0")
    with pytest.raises(cm.MigrationGraphError, match="cm.ops"):
        schema.add_migration("1.0.0", "2.0.0", [lambda ckpt: None])


def test_op_collision_inside_a_step_is_a_migration_error_naming_the_step():
    schema = cm.Schema("m", current="2.0.0")
    schema.add_migration(
        "1.0.0", "2.0.0", [ops.RenameKeys(r"module\.head\.scale", "module.blocks.0.fc.weight")]
    )
    with pytest.raises(cm.MigrationError, match=re.escape("1.0.0 -> 2.0.0")) as info:
        cm.upgrade(base(), schema)
    assert isinstance(info.value.__cause__, OpError)
