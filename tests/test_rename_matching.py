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


def _random_keys(rng, count):
    words = ["blocks", "layers", "attn", "q", "k", "v", "mlp", "fc1", "ln", "weight", "bias"]
    digits = ["0", "1", "2", "11"]
    return list(
        dict.fromkeys(
            ".".join(rng.choice(words + digits) for _ in range(rng.randint(1, 5)))
            for _ in range(count)
        )
    )


def test_a_pairs_bound_is_never_below_its_similarity() -> None:
    import random

    from ckptmigrate.inspection.diff import _Names, _similarity, _similarity_bound

    rng = random.Random(3)
    names = _Names()
    keys = _random_keys(rng, 120)
    for old in keys:
        for new in keys:
            exact = _similarity(old, new, names(old), names(new))
            assert exact == name_similarity(old, new)
            assert _similarity_bound(old, new, names(old), names(new)) >= exact, (old, new)


def test_scoring_only_pairs_that_can_still_win_picks_what_scoring_every_pair_picks() -> None:
    import random

    from ckptmigrate.inspection.diff import _best_first, _Names

    rng = random.Random(5)
    for _ in range(300):
        olds, news = _random_keys(rng, 12), _random_keys(rng, 12)
        order_a = {k: i for i, k in enumerate(olds)}
        order_b = {k: i for i, k in enumerate(news)}
        pairs = [(o, n) for o in olds for n in news if rng.random() < 0.7]
        scored = [(name_similarity(o, n), order_a[o], order_b[n], o, n) for o, n in pairs]
        scored.sort(key=lambda c: (-c[0], c[1], c[2]))
        expected, taken_old, taken_new = [], set(), set()
        for similarity, _, _, o, n in scored:  # every pair scored, then greedy
            if similarity >= MIN_RENAME_CONFIDENCE and o not in taken_old and n not in taken_new:
                taken_old.add(o)
                taken_new.add(n)
                expected.append((similarity, o, n))
        got, taken_old, taken_new = [], set(), set()
        for similarity, o, n, reason in _best_first(
            pairs, None, _Names(), order_a, order_b, taken_old, taken_new
        ):
            taken_old.add(o)
            taken_new.add(n)
            got.append((similarity, o, n))
            assert reason == f"same shape and dtype; name similarity {similarity:.2f}"
        assert got == expected
