"""Numbers as a person reads them: floats at six significant digits, sizes in KiB/MiB.

``0.30000000000000004`` prints as ``0.3``, ``1e-05`` stays ``1e-05``, a max abs diff reads
``3.4e-06``; exact values stay in ``--json``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

SIGNIFICANT_DIGITS = 6


def readable_float(value: float) -> str:
    """``value`` at six significant digits, still visibly a float (``2.0``, not ``2``).

    >>> readable_float(0.1 + 0.2), readable_float(1e-5), readable_float(3.4e-06)
    ('0.3', '1e-05', '3.4e-06')
    """
    if not math.isfinite(value):
        return repr(value)
    text = f"{value:.{SIGNIFICANT_DIGITS}g}"
    return text if any(c in text for c in ".e") else f"{text}.0"


def readable(value: Any, _memo: dict[int, str] | None = None) -> str:
    """A value as ``repr`` shows it, with every float in it at a readable precision.

    >>> readable({"lr": 0.1 + 0.2, "betas": (0.9, 0.999), "name": "adam"})
    "{'lr': 0.3, 'betas': (0.9, 0.999), 'name': 'adam'}"

    A container shared in ``value`` is written once and its text reused.
    """
    if isinstance(value, bool) or not isinstance(value, (float, list, tuple, Mapping)):
        return repr(value)
    if isinstance(value, float):
        return readable_float(value)
    memo = {} if _memo is None else _memo
    done = memo.get(id(value))
    if done is not None:
        return done
    if isinstance(value, Mapping):
        items = ", ".join(f"{readable(k, memo)}: {readable(v, memo)}" for k, v in value.items())
        done = "{" + items + "}"
    else:
        items = ", ".join(readable(v, memo) for v in value)
        if isinstance(value, tuple):
            done = f"({items},)" if len(value) == 1 else f"({items})"
        else:
            done = f"[{items}]"
    memo[id(value)] = done  # value is alive in the caller: its id stays its own
    return done


def human_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``; bytes below 1 KiB as a whole number."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover
