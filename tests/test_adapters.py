"""PEFT LoRA adapters follow their base's migrations: the upgraded adapter on the upgraded base
is the same function as the old adapter on the old base (fp32, rtol 1e-5).

Each test writes a real adapter folder, upgrades it with ``cm.upgrade_adapter`` (or the CLI),
and checks the function through :func:`lora_files.merged`: the base with the adapter's ``s B A``
added, computed from the files alone. Since every op an adapter follows is linear in the
weights, "merge, then upgrade" must equal "upgrade both, then merge".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_files import deltas, factors, merged, read_lora, write_lora
from processes import one_error_line, run

import ckptmigrate as cm

TOL = dict(rtol=1e-5, atol=1e-6)  # fp32 sums of products, in another order


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_same_function(
    schema: cm.Schema, base: dict[str, torch.Tensor], old: Path, new: Path
) -> None:
    """The adapter in ``new`` on the upgraded ``base`` is the adapter in ``old`` on ``base``."""
    version = {"schema": schema.name, "version": "1.0.0"}
    upgraded_base = cm.upgrade(cm.Checkpoint(dict(base), **version), schema).state_dict
    expected = cm.upgrade(cm.Checkpoint(merged(base, old), **version), schema).state_dict
    got = merged(upgraded_base, new)
    assert sorted(got) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **TOL, msg=key)


QKV = ["{p}.q.{kind}", "{p}.k.{kind}", "{p}.v.{kind}"]


def fuse_schema(sizes: list[int] | None = None, dim: int = 0) -> cm.Schema:
    schema = cm.Schema("toy", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.Merge(QKV, "{p}.qkv.{kind}", dim, sizes)])
    return schema


def qkv_base(rows: tuple[int, int, int] = (4, 4, 4), width: int = 6) -> dict[str, torch.Tensor]:
    return {
        f"attn.{n}.weight": randn(r, width, seed=i) for i, (n, r) in enumerate(zip("qkv", rows))
    } | {"attn.o.weight": randn(width, sum(rows), seed=9)}


# -- renames ------------------------------------------------------------------------------------


def test_a_rename_moves_both_keys_and_the_config_names_the_new_modules(tmp_path: Path) -> None:
    schema = cm.Schema("toy", current="2.0.0")
    schema.add_migration(
        "1.0.0",
        "2.0.0",
        [
            cm.ops.RenamePrefix("blocks.", "layers."),
            cm.ops.RenameKeys(r"(.*)\.wq\.(.*)", r"\1.q.\2"),
        ],
    )
    base = {"blocks.0.wq.weight": randn(4, 6), "blocks.0.wv.weight": randn(4, 6, seed=1)}
    old = write_lora(
        tmp_path / "a1",
        {"blocks.0.wq": factors(4, 6, 2, 1), "blocks.0.wv": factors(4, 6, 2, 2)},
        target_modules=["wq", "wv"],
    )
    cm.upgrade_adapter(old, schema, from_version="1.0.0", out=tmp_path / "a2")
    tensors, config = read_lora(tmp_path / "a2")
    assert sorted(tensors) == [
        "base_model.model.layers.0.q.lora_A.weight",
        "base_model.model.layers.0.q.lora_B.weight",
        "base_model.model.layers.0.wv.lora_A.weight",
        "base_model.model.layers.0.wv.lora_B.weight",
    ]
    assert config["target_modules"] == ["q", "wv"]
    assert (tmp_path / "a2" / "README.md").read_text() == "# a PEFT model card\n"
    assert_same_function(schema, base, old, tmp_path / "a2")


# -- split ----------------------------------------------------------------------------------


def test_a_split_cuts_b_along_the_same_rows_and_gives_each_part_a(tmp_path: Path) -> None:
    schema = cm.Schema("toy", current="2.0.0")
    schema.add_migration(
        "1.0.0", "2.0.0", [cm.ops.Split("{p}.c_attn.{kind}", QKV, dim=0, sizes=[4, 2, 2])]
    )
    base = {"attn.c_attn.weight": randn(8, 6), "attn.c_attn.bias": randn(8)}
    lora = factors(8, 6, 3, 1)
    old = write_lora(tmp_path / "a1", {"attn.c_attn": lora}, r=3, target_modules=["c_attn"])
    cm.upgrade_adapter(old, schema, from_version="1.0.0", out=tmp_path / "a2")
    tensors, config = read_lora(tmp_path / "a2")
    b = lora["lora_B.weight"]
    for name, rows in (("q", b[:4]), ("k", b[4:6]), ("v", b[6:])):
        torch.testing.assert_close(tensors[f"base_model.model.attn.{name}.lora_B.weight"], rows)
        torch.testing.assert_close(
            tensors[f"base_model.model.attn.{name}.lora_A.weight"], lora["lora_A.weight"]
        )
    assert config["target_modules"] == ["k", "q", "v"] and config["rank_pattern"] == {}
    assert_same_function(schema, base, old, tmp_path / "a2")


def test_a_split_along_the_input_dim_cuts_a_and_copies_b(tmp_path: Path) -> None:
    schema = cm.Schema("toy", current="2.0.0")
    schema.add_migration(
        "1.0.0", "2.0.0", [cm.ops.Split("{p}.proj.weight", ["{p}.x.weight", "{p}.y.weight"], 1)]
    )
    base = {"m.proj.weight": randn(5, 8)}
    lora = factors(5, 8, 2, 3)
    old = write_lora(tmp_path / "a1", {"m.proj": lora}, target_modules=["proj"])
    cm.upgrade_adapter(old, schema, from_version="1.0.0", out=tmp_path / "a2")
    tensors, _ = read_lora(tmp_path / "a2")
    torch.testing.assert_close(
        tensors["base_model.model.m.y.lora_A.weight"], lora["lora_A.weight"][:, 4:]
    )
    torch.testing.assert_close(tensors["base_model.model.m.y.lora_B.weight"], lora["lora_B.weight"])
    assert_same_function(schema, base, old, tmp_path / "a2")


def test_a_gpt2_conv1d_adapter_follows_the_split_of_c_attn_along_dim_1(tmp_path: Path) -> None:
    """GPT-2 stores ``c_attn.weight`` as (in, 3 * out) and PEFT marks it fan_in_fan_out: the
    split of its columns cuts B's rows all the same."""
    schema = cm.Schema("gpt2", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.Split("{p}.c_attn.{kind}", QKV, dim=1)])
    base = {"h.0.attn.c_attn.weight": randn(6, 12)}
    lora = factors(12, 6, 2, 1)
    old = write_lora(
        tmp_path / "a1", {"h.0.attn.c_attn": lora}, target_modules=["c_attn"], fan_in_fan_out=True
    )
    cm.upgrade_adapter(old, schema, from_version="1.0.0", out=tmp_path / "a2")
    tensors, _ = read_lora(tmp_path / "a2")
    torch.testing.assert_close(
        tensors["base_model.model.h.0.attn.k.lora_B.weight"], lora["lora_B.weight"][4:8]
    )
    assert_same_function(schema, base, old, tmp_path / "a2")


# -- merge ------------------------------------------------------------------------------------


def test_a_merge_builds_the_block_diagonal_and_the_rank_grows_to_the_sum(tmp_path: Path) -> None:
    schema = fuse_schema()
    base = qkv_base()
    parts = {"attn.q": factors(4, 6, 2, 1), "attn.k": factors(4, 6, 3, 2)}
    parts["attn.v"] = factors(4, 6, 4, 3)
    old = write_lora(
        tmp_path / "a1", parts, rank_pattern={"k": 3, "v": 4}, alpha_pattern={"k": 6, "v": 8}
    )  # every part's scale is 2
    cm.upgrade_adapter(old, schema, from_version="1.0.0", out=tmp_path / "a2")
    tensors, config = read_lora(tmp_path / "a2")
    a = tensors["base_model.model.attn.qkv.lora_A.weight"]
    b = tensors["base_model.model.attn.qkv.lora_B.weight"]
    assert a.shape == (9, 6) and b.shape == (12, 9)
    torch.testing.assert_close(a, torch.cat([p["lora_A.weight"] for p in parts.values()]))
    torch.testing.assert_close(b, torch.block_diag(*[p["lora_B.weight"] for p in parts.values()]))
    assert config["rank_pattern"] == {"attn.qkv": 9}
    assert config["alpha_pattern"] == {"attn.qkv": 18}  # scale 2 at rank 9
    assert config["target_modules"] == ["qkv"]
    assert_same_function(schema, base, old, tmp_path / "a2")

    # x -> W x + s B A x, directly: the fused output is the three outputs side by side
    x = randn(3, 6, seed=7)
    before = {k: base[k] + d for k, d in deltas(old).items()}
    fused = torch.cat([base[f"attn.{n}.weight"] for n in "qkv"])
    fused = fused + deltas(tmp_path / "a2")["attn.qkv.weight"]
    torch.testing.assert_close(
        x @ fused.T, torch.cat([x @ before[f"attn.{n}.weight"].T for n in "qkv"], 1), **TOL
    )


def test_a_merge_folds_unequal_scales_into_b(tmp_path: Path) -> None:
    schema = fuse_schema()
    old = write_lora(
        tmp_path / "a1",
        {
            "attn.q": factors(4, 6, 2, 1),
            "attn.k": factors(4, 6, 2, 2),
            "attn.v": factors(4, 6, 2, 3),
        },
        alpha_pattern={"k": 1, "v": 32},
        use_rslora=True,
    )
    cm.upgrade_adapter(old, schema, from_version="1.0.0", out=tmp_path / "a2")
    assert_same_function(schema, qkv_base(), old, tmp_path / "a2")


def test_an_adapter_on_q_and_v_only_follows_the_merge_of_q_k_v(tmp_path: Path) -> None:
    schema = fuse_schema(sizes=[4, 2, 2])  # grouped-query: k and v have 2 rows
    old = write_lora(
        tmp_path / "a1", {"attn.q": factors(4, 6, 2, 1), "attn.v": factors(2, 6, 2, 2)},
        target_modules=["q", "v"],
    )  # fmt: skip
    cm.upgrade_adapter(old, schema, from_version="1.0.0", out=tmp_path / "a2")
    tensors, _ = read_lora(tmp_path / "a2")
    b = tensors["base_model.model.attn.qkv.lora_B.weight"]
    assert b.shape == (8, 4) and b[4:6].eq(0).all()  # k's rows: no change there
    assert_same_function(schema, qkv_base((4, 2, 2)), old, tmp_path / "a2")


def test_a_merge_whose_missing_part_has_no_known_size_is_refused(tmp_path: Path) -> None:
    old = write_lora(
        tmp_path / "a1", {"attn.q": factors(4, 6, 2, 1), "attn.v": factors(2, 6, 2, 2)}
    )
    with pytest.raises(cm.AdapterFollowError, match=r"not 'attn\.k\.weight'.*sizes="):
        cm.upgrade_adapter(old, fuse_schema(), from_version="1.0.0", out=tmp_path / "a2")
    assert not (tmp_path / "a2").exists()


def test_a_merge_along_the_input_dim_makes_a_block_diagonal(tmp_path: Path) -> None:
    schema = cm.Schema("toy", current="2.0.0")
    schema.add_migration(
        "1.0.0", "2.0.0", [cm.ops.Merge(["{p}.x.weight", "{p}.y.weight"], "{p}.xy.weight", 1)]
    )
    base = {"m.x.weight": randn(5, 3), "m.y.weight": randn(5, 3, seed=1)}
    old = write_lora(tmp_path / "a1", {"m.x": factors(5, 3, 2, 1), "m.y": factors(5, 3, 2, 2)})
    cm.upgrade_adapter(old, schema, from_version="1.0.0", out=tmp_path / "a2")
    tensors, _ = read_lora(tmp_path / "a2")
    assert tensors["base_model.model.m.xy.lora_A.weight"].shape == (4, 6)
    assert_same_function(schema, base, old, tmp_path / "a2")


# -- inverse round trip -----------------------------------------------------------------------


def test_merge_then_split_gives_back_function_equal_adapters_of_the_old_ranks(
    tmp_path: Path,
) -> None:
    schema = fuse_schema(sizes=[4, 2, 2])
    base = qkv_base((4, 2, 2))
    old = write_lora(
        tmp_path / "a1",
        {"attn.q": factors(4, 6, 2, 1), "attn.v": factors(2, 6, 3, 2)},
        rank_pattern={"v": 3},
        target_modules=["q", "v"],
    )
    cm.upgrade_adapter(old, schema, from_version="1.0.0", out=tmp_path / "a2")
    assert_same_function(schema, base, old, tmp_path / "a2")
    done = cm.upgrade_adapter(tmp_path / "a2", schema, to="1.0.0", out=tmp_path / "a3")
    assert done.source_version == "2.0.0"  # the stamp the upgrade wrote
    tensors, config = read_lora(tmp_path / "a3")
    shapes = {k.removeprefix("base_model.model."): tuple(t.shape) for k, t in tensors.items()}
    assert shapes == {
        "attn.q.lora_A.weight": (2, 6),
        "attn.q.lora_B.weight": (4, 2),
        "attn.v.lora_A.weight": (3, 6),
        "attn.v.lora_B.weight": (2, 3),
    }  # k had no adapter before and has none after; each part sheds the others' blocks
    assert config["target_modules"] == ["q", "v"]
    for key, delta in deltas(old).items():
        torch.testing.assert_close(deltas(tmp_path / "a3")[key], delta, **TOL)


def test_an_untrained_adapter_keeps_its_rank_through_a_split(tmp_path: Path) -> None:
    schema = cm.Schema("toy", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.Split("{p}.c_attn.{kind}", QKV, dim=0)])
    zero_b = {"lora_A.weight": randn(2, 6), "lora_B.weight": torch.zeros(6, 2)}  # PEFT's init
    old = write_lora(tmp_path / "a1", {"attn.c_attn": zero_b}, target_modules=["c_attn"])
    cm.upgrade_adapter(old, schema, from_version="1.0.0", out=tmp_path / "a2")
    tensors, _ = read_lora(tmp_path / "a2")
    assert tensors["base_model.model.attn.k.lora_B.weight"].shape == (2, 2)


# -- layouts ----------------------------------------------------------------------------------


def test_rope_permutation_and_interleaved_qkv_move_b_rows(tmp_path: Path) -> None:
    schema = cm.Schema("neox", current="2.0.0")
    schema.add_migration(
        "1.0.0",
        "2.0.0",
        [
            cm.ops.SplitInterleaved("{p}.qkv.weight", ["{p}.q.weight", "{p}.k.weight", "{p}.v.weight"],
                                    dim=0, sizes=[4, 4, 4]),
            cm.ops.PermuteForRope("{p}.q.weight", n_heads=2),
        ],
    )  # fmt: skip
    base = {"l.qkv.weight": randn(24, 8)}
    old = write_lora(tmp_path / "a1", {"l.qkv": factors(24, 8, 2, 1)}, target_modules=["qkv"])
    cm.upgrade_adapter(old, schema, from_version="1.0.0", out=tmp_path / "a2")
    assert_same_function(schema, base, old, tmp_path / "a2")
    cm.upgrade_adapter(tmp_path / "a2", schema, to="1.0.0", out=tmp_path / "a3")
    torch.testing.assert_close(
        deltas(tmp_path / "a3")["l.qkv.weight"], deltas(old)["l.qkv.weight"], **TOL
    )


def test_a_padded_vocabulary_pads_the_embedding_adapter_with_zeros(tmp_path: Path) -> None:
    schema = cm.Schema("gpt", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [
        cm.ops.Pad("{p}.embed.weight", multiple=8, from_size=10, fill="mean"),
        cm.ops.Pad("{p}.head.weight", multiple=8, from_size=10),
    ])  # fmt: skip
    emb = {"lora_embedding_A": randn(2, 10, seed=2), "lora_embedding_B": randn(6, 2, seed=3)}
    old = write_lora(
        tmp_path / "a1", {"m.embed": emb, "m.head": factors(10, 6, 2, 4)},
        target_modules=["embed", "head"],
    )  # fmt: skip
    cm.upgrade_adapter(old, schema, from_version="1.0.0", out=tmp_path / "a2")
    tensors, _ = read_lora(tmp_path / "a2")
    a = tensors["base_model.model.m.embed.lora_embedding_A"]
    assert a.shape == (2, 16) and a[:, 10:].eq(0).all()
    new = deltas(tmp_path / "a2")
    for key, delta in deltas(old).items():  # the old tokens: the same change; new ones: none
        torch.testing.assert_close(new[key][:10], delta, **TOL)
        assert new[key][10:].eq(0).all()
    cm.upgrade_adapter(tmp_path / "a2", schema, to="1.0.0", out=tmp_path / "a3")  # Slice
    for key, delta in deltas(old).items():
        torch.testing.assert_close(deltas(tmp_path / "a3")[key], delta, **TOL)


def test_a_cast_of_the_base_leaves_the_adapter_in_its_dtype(tmp_path: Path) -> None:
    schema = cm.Schema("toy", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.Cast("{p}.weight", torch.bfloat16)])
    old = write_lora(tmp_path / "a1", {"attn.q": factors(4, 6, 2, 1)})
    cm.upgrade_adapter(old, schema, from_version="1.0.0", out=tmp_path / "a2")
    tensors, _ = read_lora(tmp_path / "a2")
    assert {t.dtype for t in tensors.values()} == {torch.float32}


def test_modules_to_save_follow_the_op_itself(tmp_path: Path) -> None:
    schema = cm.Schema("toy", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("score.", "classifier.")])
    old = write_lora(
        tmp_path / "a1",
        {"attn.q": factors(4, 6, 2, 1), "score": {"weight": randn(3, 4), "bias": randn(3)}},
        modules_to_save=["score"],
    )
    cm.upgrade_adapter(old, schema, from_version="1.0.0", out=tmp_path / "a2")
    tensors, config = read_lora(tmp_path / "a2")
    assert "base_model.model.classifier.weight" in tensors
    assert config["modules_to_save"] == ["classifier"]


# -- refused ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ops", "says"),
    [
        ([cm.ops.Transpose("{p}.q.weight")], "fan_in_fan_out"),
        ([cm.ops.Stack("e.{i}.q.weight", "e.q.weight", count=2)], "target_parameters"),
        ([cm.ops.Reshape("{p}.q.weight", (24,))], "no rows or columns"),
        ([cm.ops.DropKeys(r"attn\.q\.weight")], "drops"),
    ],
    ids=["transpose", "stack", "reshape", "drop"],
)
def test_a_step_the_adapter_cannot_follow_is_refused_before_writing(
    tmp_path: Path, ops: list, says: str
) -> None:
    schema = cm.Schema("toy", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", ops, name="the_step")
    old = write_lora(tmp_path / "a1", {"attn.q": factors(4, 6, 2, 1)})
    with pytest.raises(cm.AdapterFollowError, match=says) as caught:
        cm.upgrade_adapter(old, schema, from_version="1.0.0", out=tmp_path / "a2")
    assert "toy 1.0.0 -> 2.0.0 (the_step)" in str(caught.value)
    assert not (tmp_path / "a2").exists()


def test_a_function_step_is_refused_naming_it(tmp_path: Path) -> None:
    schema = cm.Schema("toy", current="2.0.0")

    @schema.migration("1.0.0", "2.0.0")
    def fuse_by_hand(ckpt: cm.Checkpoint) -> None:
        pass

    old = write_lora(tmp_path / "a1", {"attn.q": factors(4, 6, 2, 1)})
    with pytest.raises(cm.AdapterFollowError, match="the function .*fuse_by_hand.*is code"):
        cm.upgrade_adapter(old, schema, from_version="1.0.0", out=tmp_path / "a2")


def test_an_unstamped_adapter_needs_from_version(tmp_path: Path) -> None:
    old = write_lora(tmp_path / "a1", {"attn.q": factors(4, 6, 2, 1)})
    with pytest.raises(cm.UnversionedCheckpointError):
        cm.upgrade_adapter(old, fuse_schema(), out=tmp_path / "a2")


def test_an_output_folder_with_files_is_refused(tmp_path: Path) -> None:
    old = write_lora(tmp_path / "a1", {"attn.q": factors(4, 6, 2, 1)})
    (tmp_path / "a2").mkdir()
    (tmp_path / "a2" / "notes.txt").write_text("mine")
    with pytest.raises(cm.OutputOccupiedError):
        cm.upgrade_adapter(old, fuse_schema([4, 4, 4]), from_version="1.0.0", out=tmp_path / "a2")
    assert (tmp_path / "a2" / "notes.txt").read_text() == "mine"


# -- hostile adapters ------------------------------------------------------------------------


def _hostile(folder: Path, case: str) -> None:
    config = folder / "adapter_config.json"
    good = json.loads(config.read_text())
    edits = {
        "bad_json": lambda: config.write_text("{not json"),
        "a_list": lambda: config.write_text("[1, 2]"),
        "deep": lambda: config.write_text("[" * 5000 + "]" * 5000),
        "not_lora": lambda: config.write_text(json.dumps({**good, "peft_type": "IA3"})),
        "rank_text": lambda: config.write_text(json.dumps({**good, "r": "8"})),
        "alpha_nan": lambda: config.write_text(json.dumps({**good, "lora_alpha": float("nan")})),
        "regex_key": lambda: config.write_text(json.dumps({**good, "rank_pattern": {"(a+)+$": 2}})),
        "dora": lambda: config.write_text(json.dumps({**good, "use_dora": True})),
        "rank_mismatch": lambda: config.write_text(json.dumps({**good, "r": 3})),
    }
    if case in edits:
        edits[case]()
        return
    bad = {
        "no_prefix": {"attn.q.lora_A.weight": randn(2, 6), "attn.q.lora_B.weight": randn(4, 2)},
        "no_b": {"base_model.model.attn.q.lora_A.weight": randn(2, 6)},
        "b_wrong_rank": {
            "base_model.model.attn.q.lora_A.weight": randn(2, 6),
            "base_model.model.attn.q.lora_B.weight": randn(4, 5),
        },
        "ints": {
            "base_model.model.attn.q.lora_A.weight": torch.ones(2, 6, dtype=torch.int64),
            "base_model.model.attn.q.lora_B.weight": torch.ones(4, 2, dtype=torch.int64),
        },
        "magnitude": {"base_model.model.attn.q.lora_magnitude_vector": randn(4)},
    }[case]
    from safetensors.torch import save_file

    save_file(bad, str(folder / "adapter_model.safetensors"))


HOSTILE = [
    "bad_json", "a_list", "deep", "not_lora", "rank_text", "alpha_nan", "regex_key", "dora",
    "rank_mismatch", "no_prefix", "no_b", "b_wrong_rank", "ints", "magnitude",
]  # fmt: skip


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_adapter_is_a_format_error_and_nothing_is_written(
    tmp_path: Path, case: str
) -> None:
    old = write_lora(tmp_path / "a1", {"attn.q": factors(4, 6, 2, 1)})
    _hostile(old, case)
    with pytest.raises(cm.CheckpointFormatError):
        cm.upgrade_adapter(old, fuse_schema(), from_version="1.0.0", out=tmp_path / "a2")
    assert not (tmp_path / "a2").exists()


# -- the command line -------------------------------------------------------------------------

MIGRATION = """
import ckptmigrate as cm

schema = cm.Schema("toy", current="2.0.0")
schema.add_migration("1.0.0", "2.0.0", [
    cm.ops.Merge(["{p}.q.{k}", "{p}.k.{k}", "{p}.v.{k}"], "{p}.qkv.{k}", 0, sizes=[4, 2, 2]),
])
"""


def test_the_cli_finds_an_adapter_folder_and_upgrades_it(tmp_path: Path) -> None:
    (tmp_path / "toy.py").write_text(MIGRATION)
    old = write_lora(
        tmp_path / "a1", {"attn.q": factors(4, 6, 2, 1), "attn.v": factors(2, 6, 2, 2)}
    )
    flags = ["--migrations", str(tmp_path / "toy.py")]
    done = run(tmp_path, "upgrade", str(old), "-o", str(tmp_path / "a2"), "--from-version", "1.0.0",
               *flags)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "toy 1.0.0 -> 2.0.0, 1 step(s)" in done.stdout and "wrote" in done.stdout
    made: dict = {}
    exec(MIGRATION, made)  # the test's own text, the schema the CLI ran
    assert_same_function(made["schema"], qkv_base((4, 2, 2)), old, tmp_path / "a2")
    # stamped now: back down without --from-version, a dry run first
    dry = run(tmp_path, "upgrade", str(tmp_path / "a2"), "-o", str(tmp_path / "a3"), "--to",
              "1.0.0", "--dry-run", *flags)  # fmt: skip
    assert dry.returncode == 0 and "dry run" in dry.stdout and not (tmp_path / "a3").exists()
    in_place = run(tmp_path, "upgrade", str(tmp_path / "a2"), "--in-place", *flags)
    assert "-o NEWDIR" in one_error_line(in_place)


def test_the_cli_reports_a_hostile_adapter_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "toy.py").write_text(MIGRATION)
    old = write_lora(tmp_path / "a1", {"attn.q": factors(4, 6, 2, 1)})
    _hostile(old, "bad_json")
    done = run(tmp_path, "upgrade", str(old), "-o", str(tmp_path / "a2"), "--from-version",
               "1.0.0", "--migrations", str(tmp_path / "toy.py"))  # fmt: skip
    assert "adapter_config.json is not valid JSON" in one_error_line(done)


def test_an_adapter_already_current_keeps_its_config(tmp_path: Path) -> None:
    old = write_lora(tmp_path / "a1", {"attn.v": factors(4, 6, 3, 1)}, rank_pattern={"v": 3})
    done = cm.upgrade_adapter(old, fuse_schema(), from_version="2.0.0", out=tmp_path / "a2")
    assert done.plan == [] and read_lora(tmp_path / "a2")[1] == read_lora(old)[1]


def test_the_cli_adapter_flag_on_a_model_file_says_it_is_not_an_adapter(tmp_path: Path) -> None:
    (tmp_path / "toy.py").write_text(MIGRATION)
    cm.save(tmp_path / "model.safetensors", qkv_base(), schema="toy", version="1.0.0")
    done = run(tmp_path, "upgrade", str(tmp_path / "model.safetensors"), "-o", str(tmp_path / "x"),
               "--adapter", "--migrations", str(tmp_path / "toy.py"))  # fmt: skip
    assert "is not a PEFT adapter" in one_error_line(done)
