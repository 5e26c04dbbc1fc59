"""Numbers as a person reads them: floats at six significant digits, sizes in KiB/MiB.

``0.30000000000000004`` prints as ``0.3``, ``1e-05`` stays ``1e-05``, a max abs diff reads
``3.4e-06``; exact values stay in ``--json``. A value from a file shows in a message or a line
as :func:`bounded_repr` writes it: never raising (an int past Python's int->str limit is
``<int of 5000 digits>``), never longer than :data:`MAX_SHOWN` characters. A path shows as
:func:`path_text` writes it: a URL without the credentials it may carry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

SIGNIFICANT_DIGITS = 6
#: A value from a file takes at most this many characters of a message.
MAX_SHOWN = 200
#: Past this many digits an int's length is estimated (counting them exactly costs a power).
_EXACT_DIGITS = 100_000
#: Containers inside a shown value open at most this deep (the rest is ``...``).
_SHOWN_DEPTH = 8


def readable_float(value: float) -> str:
    """``value`` at six significant digits, still visibly a float (``2.0``, not ``2``).

    >>> readable_float(0.1 + 0.2), readable_float(1e-5), readable_float(3.4e-06)
    ('0.3', '1e-05', '3.4e-06')
    """
    if not math.isfinite(value):
        return repr(value)
    text = f"{value:.{SIGNIFICANT_DIGITS}g}"
    return text if any(c in text for c in ".e") else f"{text}.0"


def int_text(value: int) -> str:
    """``str(value)``, or ``<int of 5000 digits>`` past ``sys.get_int_max_str_digits()``.

    >>> int_text(12), int_text(10**4999)
    ('12', '<int of 5000 digits>')
    """
    try:
        return repr(value)
    except ValueError:  # too many digits to convert: say how many instead
        pass
    magnitude = abs(int(value))
    fewest = int((magnitude.bit_length() - 1) * math.log10(2)) + 1  # digits of 2**(bits-1)
    if fewest > _EXACT_DIGITS:
        return f"<int of about {fewest} digits>"
    return f"<int of {fewest + (magnitude >= 10**fewest)} digits>"


def bounded_repr(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` for a message about a file: never raises, at most ``limit`` characters
    (the rest cut to ``...``), ints past Python's int->str limit as ``<int of N digits>``.

    >>> bounded_repr((10**5000, 7)), len(bounded_repr("x" * 5000))
    ('(<int of 5001 digits>, 7)', 200)
    """
    parts: list[str] = []
    _shown(value, parts, limit + 1, 0)
    text = "".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shown(value: Any, parts: list[str], room: int, depth: int) -> int:
    """Append ``value``'s repr to ``parts`` until ``room`` characters are used; returns the
    room left. A list, tuple or dict is walked, so a large one is never repr'd whole."""
    brackets = _BRACKETS.get(type(value))
    if brackets is None:
        try:
            text = int_text(value) if type(value) is int else repr(value)
        except Exception:  # a subclass holding a huge int (torch.Size), a stand-in's repr
            base = next((b for b in _BRACKETS if isinstance(value, b)), None)
            if base is None:
                text = f"<{type(value).__name__}>"
            else:
                start, end = _BRACKETS[base]
                brackets = (f"{type(value).__name__}({start}", f"{end})")
        if brackets is None:
            parts.append(text[:room])
            return room - len(parts[-1])
    start, end = brackets
    parts.append(start)
    room -= len(start)
    items = value.items() if isinstance(value, dict) else value
    if depth >= _SHOWN_DEPTH and len(value):
        parts.append("...")
        room -= 3
        items = ()
    for i, item in enumerate(items):
        if room <= 0:
            return room
        if i:
            parts.append(", ")
            room -= 2
        if isinstance(value, dict):
            room = _shown(item[0], parts, room, depth + 1)
            parts.append(": ")
            room = _shown(item[1], parts, room - 2, depth + 1)
        else:
            room = _shown(item, parts, room, depth + 1)
    if isinstance(value, tuple) and len(value) == 1:
        parts.append(",")
        room -= 1
    parts.append(end)
    return room - len(end)


_BRACKETS: dict[type, tuple[str, str]] = {list: ("[", "]"), tuple: ("(", ")"), dict: ("{", "}")}


def key_text(key: Any) -> str:
    """A dict key from a file as a string, ``str(key)``, never raising.

    >>> key_text("lr"), key_text(3), key_text(10**4999)
    ('lr', '3', '<int of 5000 digits>')
    """
    try:
        return str(key)
    except Exception:  # str() of an int past Python's int->str limit
        return bounded_repr(key)


def readable(value: Any, _memo: dict[int, str] | None = None) -> str:
    """A value as ``repr`` shows it, with every float in it at a readable precision.

    >>> readable({"lr": 0.1 + 0.2, "betas": (0.9, 0.999), "name": "adam"})
    "{'lr': 0.3, 'betas': (0.9, 0.999), 'name': 'adam'}"

    A container shared in ``value`` is written once and its text reused.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return int_text(value)
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


def url_without_secrets(url: str) -> str:
    """``url`` as it may be printed: without its user, password and query (a presigned URL's
    signature, a database password); a path is returned as it is.

    >>> url_without_secrets("https://me:pw@example.com/w/a.pth?X-Amz-Signature=abc")
    'https://example.com/w/a.pth'
    >>> url_without_secrets("s3://key:secret@bucket/runs/x#1.pth")
    's3://bucket/runs/x#1.pth'
    """
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return url
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address goes back in brackets
        host = f"[{host}]"
    try:
        if parts.port is not None:
            host = f"{host}:{parts.port}"
    except ValueError:  # a port that is not a number: say no port rather than fail
        pass
    if parts.scheme in _OBJECT_STORES:  # '?' and '#' are part of an object's key there
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


#: URL schemes of object stores, whose keys may hold '?' and '#' (no query, no fragment)
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs"})


def path_text(path: object) -> str:
    """``path`` as a message or a line shows it: a URL as :func:`url_without_secrets` writes
    it (a malformed one as its scheme and ``...``), anything else as ``str`` gives it.

    >>> path_text("https://me:secret@host/a/model.pth?X-Amz-Signature=abc")
    'https://host/a/model.pth'
    >>> path_text("runs/model.pth")
    'runs/model.pth'
    """
    text = str(path)
    try:
        return url_without_secrets(text)
    except ValueError:  # a malformed URL (an unclosed [ in its host): only its scheme shows
        return text.partition("://")[0] + "://..."
