"""What an op that matched nothing was near: the keys' first components and the closest keys.

Only the error path uses it, so it may walk every key once::

    >>> leading_components(["net.encoder.w", "net.head.b", "step"])
    ['net.', 'step']
    >>> mount_prefix("encoder.", ["net.encoder.w"])
    'net.'
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Sequence

__all__ = ["leading_components", "literal_head", "longest_literal", "mount_prefix", "nearest"]

#: distinct names difflib compares at most (it is quadratic-ish in their length, linear in count)
_SAMPLE = 2000
_REGEX_SPECIAL = frozenset(".^$*+?{}[]|()\\")
_QUANTIFIERS = frozenset("*+?{")
_LITERAL_RUN = re.compile(r"(?:\\[^A-Za-z0-9]|[^.^$*+?{}\[\]|()\\])+")


def leading_components(keys: Sequence[str], n: int = 3) -> list[str]:
    """The most common first dotted components of ``keys`` (``'net.'``), most common first."""
    counts = Counter(k.partition(".")[0] + ("." if "." in k else "") for k in keys)
    return [c for c, _ in counts.most_common(n)]


def nearest(needle: str, names: Sequence[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``names`` that contain ``needle``, else the most similar ones."""
    if needle:
        containing = [k for k in names if needle in k][:n]
        if containing:
            return containing
    sample = list(dict.fromkeys(names))[:_SAMPLE]
    return difflib.get_close_matches(needle, sample, n=n, cutoff=0.3)


def mount_prefix(head: str, keys: Sequence[str]) -> str | None:
    """The prefix under which keys start with ``head`` (``'net.'`` for ``net.encoder.w``)."""
    if not head:
        return None
    for key in keys:
        at = key.find(head)
        if at > 0 and key[at - 1] == ".":
            return key[:at]
    return None


def literal_head(pattern: str) -> str:
    """The literal text every full match of the regex ``pattern`` starts with (maybe "")."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern) and not pattern[i + 1].isalnum():
            char, i = pattern[i + 1], i + 2
        elif ch in _REGEX_SPECIAL:
            break
        else:
            char, i = ch, i + 1
        if i < len(pattern) and pattern[i] in _QUANTIFIERS:
            break  # the last char is optional or repeated: not part of every match
        out.append(char)
    return "".join(out)


def longest_literal(pattern: str) -> str:
    """The longest run of literal text in the regex ``pattern`` (to find near keys by)."""
    runs = [re.sub(r"\\(.)", r"\1", run) for run in _LITERAL_RUN.findall(pattern)]
    return max(runs, key=len, default="")
