"""Key renames composed: a run of prefix renames becomes one map, applied once per key.

A plan of 20 steps that each rename a prefix would walk a 100k-key state_dict 20 times.
Prefix renames compose exactly into a small set of rules, ``old prefix -> new prefix``, where
the longest matching rule wins; applying the composite costs one or two dict lookups per key,
whatever the number of steps::

    >>> rules = PrefixMap()
    >>> rules.then("blocks.", "layers.", step=0)
    >>> rules.then("layers.", "decoder.layers.", step=1)
    >>> rules.apply(["blocks.0.w", "head.w"])
    (['decoder.layers.0.w', 'head.w'], {0, 1})

``upgrade`` uses it for runs of steps made only of prefix renames (``RenamePrefix``, and
``RenameKeys`` whose pattern is a literal prefix then ``(.*)``) and hparam ops; anything the
composite cannot vouch for (a step that renames nothing, a collision) is left to the
step-by-step path, which raises the exact error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

__all__ = ["PrefixMap", "literal_prefix_rename"]

_SPECIAL = frozenset(".^$*+?{}[]|()\\")
_NAMED_TAIL = re.compile(r"(.*)\(\?P<(\w+)>\.\*\)", re.DOTALL)


def _literal(pattern: str) -> str | None:
    """The string a regex without metacharacters matches (escapes allowed), else None."""
    out = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            if i + 1 == len(pattern) or pattern[i + 1].isalnum():
                return None  # \d, \1, \A...: not a literal
            out.append(pattern[i + 1])
            i += 2
            continue
        if ch in _SPECIAL:
            return None
        out.append(ch)
        i += 1
    return "".join(out)


def literal_prefix_rename(pattern: str, repl: str) -> tuple[str, str] | None:
    """``(r"blocks\\.(.*)", r"layers.\\1")`` -> ``("blocks.", "layers.")``, else None.

    Such a regex rename is a prefix rename for every key without a newline (``.`` stops there).
    """
    named = _NAMED_TAIL.fullmatch(pattern)
    if named is not None:
        head, refs = named[1], ("\\1", "\\g<1>", f"\\g<{named[2]}>")
    elif pattern.endswith("(.*)"):
        head, refs = pattern[: -len("(.*)")], ("\\1", "\\g<1>")
    else:
        return None
    old = _literal(head)
    if old is None:
        return None
    for ref in refs:
        new = repl[: -len(ref)]
        if repl.endswith(ref) and "\\" not in new:
            return old, new
    return None


class PrefixMap:
    """A composite of prefix renames: ``rules[a] = (b, steps)`` sends ``a + rest`` to ``b + rest``.

    The longest ``a`` that a key starts with decides; a key no rule matches is unchanged.
    ``steps`` are the indices of the renames that changed keys governed by the rule.
    """

    def __init__(self, max_rules: int = 256) -> None:
        self.rules: dict[str, tuple[str, frozenset[int]]] = {}
        self.max_rules = max_rules

    @property
    def too_big(self) -> bool:
        return len(self.rules) > self.max_rules

    def then(self, old: str, new: str, *, step: int) -> None:
        """Compose with one more rename: keys starting with ``old`` start with ``new`` instead.

        ``old != new``, so that a rename that matches a key changes it.
        """
        rules = self.rules
        out: dict[str, tuple[str, frozenset[int]]] = {}
        for a, (b, steps) in rules.items():
            if b.startswith(old):  # every key under ``a`` is renamed again
                out[a] = (new + b[len(old) :], steps | {step})
                continue
            out[a] = (b, steps)
            if old.startswith(b):  # only keys under ``a`` that go on with the rest of ``old``
                narrower = a + old[len(b) :]
                if not self._governed_elsewhere(a, narrower):
                    out[narrower] = (new, steps | {step})
        if not any(old.startswith(a) for a in rules):  # keys no rule governed yet
            out[old] = (new, frozenset({step}))
        self.rules = out

    def _governed_elsewhere(self, a: str, narrower: str) -> bool:
        """Whether a rule longer than ``a`` already governs the keys under ``narrower``."""
        return any(
            len(a) < len(other) <= len(narrower) and narrower.startswith(other)
            for other in self.rules
        )

    def matcher(self) -> Callable[[str], tuple[str, str] | None]:
        """For a string: the longest rule prefix it starts with and the string renamed by it,
        or None when no rule matches."""
        rules = self.rules
        lengths = sorted({len(a) for a in rules}, reverse=True)

        def match(s: str) -> tuple[str, str] | None:
            for n in lengths:
                a = s[:n]  # a short string is its own slice: a rule equal to it matches
                rule = rules.get(a)
                if rule is not None:
                    return a, rule[0] + s[len(a) :]
            return None

        return match

    def apply(self, keys: Sequence[str]) -> tuple[list[str], set[int]]:
        """The renamed keys (same order) and the renames that changed at least one of them."""
        match = self.matcher()
        used: set[str] = set()
        out = []
        for key in keys:
            hit = match(key)
            if hit is None:
                out.append(key)
            else:
                used.add(hit[0])
                out.append(hit[1])
        fired: set[int] = set()
        for a in used:
            fired |= self.rules[a][1]
        return out, fired

    def module_renamer(self) -> Callable[[str], str]:
        """Module prefixes follow their keys, the way ``RenamePrefix`` moves them (root stays)."""
        match = self.matcher()

        def move(prefix: str) -> str:
            hit = match(prefix + ".") if prefix else None
            return prefix if hit is None else hit[1][:-1]

        return move
