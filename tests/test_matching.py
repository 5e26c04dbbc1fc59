"""base.matching gives difflib's ratio, the same float, for the names rename matching scores."""

from __future__ import annotations

import difflib
import random
import re

import pytest

from ckptmigrate.base.matching import matched_length, matching_ratio


def difflib_ratio(a, b) -> float:
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def difflib_matched(a, b) -> int:
    blocks = difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()
    return sum(block.size for block in blocks)


KEYS = [
    "",
    "w",
    "blocks.0.attn.q.weight",
    "layers.0.attn.q.weight",
    "layers.0.attn.k.weight",
    "layers.12.attn.o.weight",
    "model.encoder.layers.11.self_attn.q_proj.weight",
    "encoder.block.11.attention.query.weight",
    "input_stack.0.bias",
    "stem.0.bias",
    "aaaa.aaaa.aaaa",
    "a.a.a.a.a.a.a",
    "transformer.h.3.mlp.c_fc.weight",
    "model.layers.3.mlp.gate_up_proj.weight",
]


@pytest.mark.parametrize("a", KEYS)
@pytest.mark.parametrize("b", KEYS)
def test_key_names_score_as_difflib_scores_them(a: str, b: str) -> None:
    assert matching_ratio(a, b) == difflib_ratio(a, b)
    tokens_a, tokens_b = re.split(r"[._]", a), re.split(r"[._]", b)
    assert matching_ratio(tokens_a, tokens_b) == difflib_ratio(tokens_a, tokens_b)


@pytest.mark.parametrize("letters", ["a", "ab", "abc", "abcdefghij"])
def test_random_strings_with_many_ties_match_difflib_blocks(letters: str) -> None:
    rng = random.Random(letters)
    for _ in range(3000):
        a = "".join(rng.choice(letters) for _ in range(rng.randint(0, 24)))
        b = "".join(rng.choice(letters) for _ in range(rng.randint(0, 24)))
        assert matched_length(a, b) == difflib_matched(a, b), (a, b)
        assert matching_ratio(a, b) == difflib_ratio(a, b), (a, b)


def test_token_lists_match_difflib_element_by_element() -> None:
    rng = random.Random(7)
    tokens = ["blocks", "layers", "0", "1", "weight", "bias", "w", "\x00", "é"]
    for _ in range(3000):
        a = [rng.choice(tokens) for _ in range(rng.randint(0, 9))]
        b = [rng.choice(tokens) for _ in range(rng.randint(0, 9))]
        assert matching_ratio(a, b) == difflib_ratio(a, b), (a, b)


def test_two_empty_sequences_are_alike_as_in_difflib() -> None:
    assert matching_ratio("", "") == matching_ratio([], []) == difflib_ratio("", "") == 1.0
    assert matching_ratio("abc", "") == difflib_ratio("abc", "") == 0.0


def test_a_long_name_does_not_exhaust_the_stack() -> None:
    a = "ab" * 3000
    b = "ba" * 3000
    assert matched_length(a, b) == difflib_matched(a, b)
