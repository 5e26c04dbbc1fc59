"""Summarise many renames of one pattern as one line: ``blocks.N.* -> layers.N.* (x1200)``.

Two renames share a pattern when their old and new keys differ only in integer components
(layer indices) and in a common tail, so ``blocks.3.attn.w -> layers.3.attn.w`` and
``blocks.7.mlp.b -> layers.7.mlp.b`` are both ``blocks.N.* -> layers.N.*``. The tail that old
and new key share is folded to ``*`` up to the last integer component, which stays as ``N``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: a pattern covering at least this many renames prints as one line (smaller ones key by key)
MIN_GROUP = 8


class RenameGroup:
    """Renames sharing one pattern; ``members`` are the diff's ``{from, to, ...}`` records."""

    __slots__ = ("pattern_from", "pattern_to", "members")

    def __init__(
        self, pattern_from: str, pattern_to: str, members: list[Mapping[str, Any]] | None = None
    ) -> None:
        self.pattern_from = pattern_from
        self.pattern_to = pattern_to
        self.members = [] if members is None else members

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not RenameGroup:
            return NotImplemented
        mine = (self.pattern_from, self.pattern_to, self.members)
        return mine == (other.pattern_from, other.pattern_to, other.members)  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"RenameGroup(pattern_from={self.pattern_from!r}, pattern_to={self.pattern_to!r}, "
            f"members={self.members!r})"
        )

    @property
    def summarised(self) -> bool:
        return len(self.members) >= MIN_GROUP


def _is_index(token: str) -> bool:
    return token.isdigit()


def rename_pattern(old: str, new: str) -> tuple[str, str]:
    """The pattern of one rename: ``("blocks.3.attn.w", "layers.3.attn.w")`` ->
    ``("blocks.N.*", "layers.N.*")``."""
    a, b = old.split("."), new.split(".")
    shared = 0
    while (
        shared < min(len(a), len(b)) - 1
        and a[-1 - shared] == b[-1 - shared]
        and not _is_index(a[-1 - shared])
    ):
        shared += 1
    head_a, head_b = a[: len(a) - shared], b[: len(b) - shared]
    if [t for t in head_a if _is_index(t)] != [t for t in head_b if _is_index(t)]:
        return old, new  # renumbered: N would claim the same index on both sides
    tail = ["*"] if shared else []

    def fold(tokens: list[str]) -> str:
        return ".".join(["N" if _is_index(t) else t for t in tokens] + tail)

    return fold(head_a), fold(head_b)


def group_renames(renamed: Iterable[Mapping[str, Any]]) -> list[RenameGroup]:
    """The renames grouped by pattern, groups in order of their first member.

    >>> [(g.pattern_from, g.pattern_to, len(g.members)) for g in group_renames(d.renamed)]
    [('blocks.N.*', 'layers.N.*', 1200)]
    """
    groups: dict[tuple[str, str], RenameGroup] = {}
    for record in renamed:
        key = rename_pattern(str(record["from"]), str(record["to"]))
        groups.setdefault(key, RenameGroup(*key)).members.append(record)
    return list(groups.values())
