"""What a state_dict looks like, without its values: the set of ``(key pattern, ndim, dtype)``.

Layer indices are folded (``layers.3.q.weight`` -> ``layers.#.q.weight``), so that models of
other sizes of the same version still match; :mod:`ckptmigrate.engine.guess` compares them.

>>> signature_of({"layers.3.w": torch.zeros(2, 2)})
frozenset({('layers.#.w', 2, 'float32')})
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .report import signature as tensor_signature

Signature = frozenset[tuple[str, int, str]]
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")


def key_pattern(key: str) -> str:
    """``blocks.3.attn.weight`` -> ``blocks.#.attn.weight``."""
    return _INDEX.sub("#", key)


def signature_of(state_dict: Mapping[str, Any]) -> Signature:
    """The signature of a state_dict of tensors or metadata stubs."""
    out = set()
    for key, value in state_dict.items():
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            shape, dtype = tensor_signature(value)
            out.add((key_pattern(key), len(shape), dtype))
    return frozenset(out)


def similarity(a: Signature, b: Signature) -> float:
    """Jaccard similarity of two signatures (1.0: same keys, ranks and dtypes)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)
