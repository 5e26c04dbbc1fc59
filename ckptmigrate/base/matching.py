"""``difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()``, the same float, faster.

Rename matching scores every same-shape pair of key names, and for names of a few dozen
characters difflib's pure-Python table of matches costs more than the search itself. With no
junk, difflib's matching blocks are found by one rule: the longest common run of ``a`` and
``b`` (the earliest in ``a``, then the earliest in ``b``), then the same on each side of it.
Here each longest run is found with ``str.find`` (C speed): a start in ``a`` is tried only for
a run longer than the best so far. Sequences of strings (``._`` tokens) are compared as
strings of one character per distinct token.

>>> matching_ratio("blocks.0.attn.weight", "layers.0.attn.weight")
0.8
>>> matching_ratio(["blocks", "0", "w"], ["layers", "0", "w"])
0.6666666666666666
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["matched_length", "matching_ratio"]


def matching_ratio(a: str | Sequence[str], b: str | Sequence[str]) -> float:
    """``2 * M / (len(a) + len(b))`` with ``M`` the elements in difflib's matching blocks
    (``1.0`` for two empty sequences), as ``SequenceMatcher(None, a, b, autojunk=False)``."""
    if not isinstance(a, str) or not isinstance(b, str):
        a, b = _as_strings(a, b)
    length = len(a) + len(b)
    if not length:
        return 1.0
    return 2.0 * matched_length(a, b) / length


def matched_length(a: str, b: str) -> int:
    """How many characters difflib's matching blocks of ``a`` and ``b`` cover."""
    total = 0
    pending = [(a, b)]
    while pending:
        a, b = pending.pop()
        if not a or not b:
            continue
        i, j, size = _longest_run(a, b)
        if size:
            total += size
            pending.append((a[:i], b[:j]))
            pending.append((a[i + size :], b[j + size :]))
    return total


def _longest_run(a: str, b: str) -> tuple[int, int, int]:
    """The longest ``a[i:i+size] == b[j:j+size]``: the earliest ``i``, then the earliest ``j``
    (difflib's ``find_longest_match`` without junk); ``(0, 0, 0)`` if none."""
    find = b.find
    len_a, len_b = len(a), len(b)
    best_i = best_j = best = 0
    i = 0
    while i + best < len_a and best < len_b:
        at = find(a[i : i + best + 1])
        if at >= 0:
            size = best + 1
            # a longer run from i is first found at or after the shorter one's first place
            while i + size < len_a and size < len_b:
                longer = find(a[i : i + size + 1], at)
                if longer < 0:
                    break
                at, size = longer, size + 1
            best_i, best_j, best = i, at, size
        i += 1
    return best_i, best_j, best


def _as_strings(a: Sequence[str], b: Sequence[str]) -> tuple[str, str]:
    """``a`` and ``b`` as strings of one character per distinct element (equal elements, equal
    characters), so the character search compares them element by element."""
    codes: dict[str, str] = {}
    out = []
    for seq in (a, b):
        if isinstance(seq, str):
            seq = list(seq)
        out.append("".join([codes.setdefault(item, chr(len(codes))) for item in seq]))
    return out[0], out[1]
