"""Rename matching per module: a renamed weight carries the bias beside it."""

from __future__ import annotations

from ckptmigrate.inspection.diff import MIN_RENAME_CONFIDENCE, match_renames, name_similarity

VEC = ((32,), "float32")


def test_a_bias_below_the_threshold_follows_its_renamed_weight() -> None:
    removed = {"input_stack.0.weight": ((32, 16), "float32"), "input_stack.0.bias": VEC}
    added = {"stem.0.weight": ((32, 16), "float32"), "stem.0.bias": VEC}
    assert name_similarity("input_stack.0.bias", "stem.0.bias") < MIN_RENAME_CONFIDENCE
    weight_score = name_similarity("input_stack.0.weight", "stem.0.weight")

    renamed = {r["from"]: r for r in match_renames(removed, added)}

    assert renamed["input_stack.0.bias"]["to"] == "stem.0.bias"
    assert renamed["input_stack.0.bias"]["confidence"] == weight_score  # lifted to the weight's
    assert "input_stack.0.weight -> stem.0.weight" in renamed["input_stack.0.bias"]["reason"]


def test_a_sibling_moves_only_to_the_same_leaf_with_its_shape_and_dtype() -> None:
    removed = {
        "input_stack.0.weight": ((32, 16), "float32"),
        "input_stack.0.bias": VEC,
        "input_stack.0.scale": ((32,), "float16"),
    }
    added = {
        "stem.0.weight": ((32, 16), "float32"),
        "stem.0.bias": ((33,), "float32"),  # another shape: a new parameter, not the old bias
        "stem.0.scale": VEC,  # another dtype
        "stem.0.shift": VEC,  # another leaf
    }
    assert [r["from"] for r in match_renames(removed, added)] == ["input_stack.0.weight"]


def test_a_module_whose_keys_went_two_ways_lifts_nothing() -> None:
    removed = {
        "input_stack.0.weight": ((32, 16), "float32"),
        "input_stack.0.gain": VEC,
        "input_stack.0.bias": VEC,
    }
    added = {
        "stem.0.weight": ((32, 16), "float32"),
        "input_stack_n.0.gain": VEC,
        "stem.0.bias": VEC,
    }
    pairs = {r["from"]: r["to"] for r in match_renames(removed, added)}
    assert pairs == {
        "input_stack.0.weight": "stem.0.weight",
        "input_stack.0.gain": "input_stack_n.0.gain",
    }  # which module the bias went to is not known: it stays removed and added
