"""Ops as data: a JSON-able dict per op, and the op rebuilt from one.

A step of ops records the ops that undo it in the file's history, so that code which does not
know the step can still write the file back (see :mod:`ckptmigrate.schema.history`)::

    >>> op_data(RenameKeys(r"a\\.(.*)", r"b.\\1", reverse=(r"b\\.(.*)", r"a.\\1")))
    {'op': 'RenameKeys', 'args': {'pattern': 'a\\\\.(.*)', 'repl': 'b.\\\\1',
     'reverse': ['b\\\\.(.*)', 'a.\\\\1']}}

:func:`op_from_data` rebuilds an op from such a dict, and trusts nothing in it: the name must
be one of the declarative op classes this process has imported (ckptmigrate's own by their
name, others by ``module.QualName``; never an import, never an eval), the fields must be the
class's own, each value must have the field's type, and the data is bounded in size and depth.
An op that acts on ``CODE`` (``Call``, or an op class that rewrites without saying what it
acts on) is never rebuilt from data.
"""

from __future__ import annotations

import math
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, Union

from ...errors import OpDataError, OpError
from .base import ABSENT, CODE, UNKNOWN, Op
from .tensors import TensorOp

__all__ = ["MAX_DEPTH", "MAX_NODES", "MAX_OPS", "MAX_TEXT", "known_ops", "op_data", "op_from_data"]

#: data nests at most this deep: an op's fields hold lists of strings and hparam values
MAX_DEPTH = 16
#: at most this many values (containers and scalars) in one list of ops' data
MAX_NODES = 20_000
#: at most this many ops in one list (a step's inverse)
MAX_OPS = 1_000
#: a string value (a key pattern, an hparam) is at most this long
MAX_TEXT = 65_536

#: how the markers ``ABSENT`` and ``UNKNOWN`` are written: ``{"$marker": "ABSENT"}``
MARKER_KEY = "$marker"
_MARKERS = {"ABSENT": ABSENT, "UNKNOWN": UNKNOWN}
_OPS_PACKAGE = __name__.rpartition(".")[0]


def op_name(cls: type) -> str:
    """The name an op class is written under: ours by class name, others
    ``<module's last name>.QualName`` (``net_migrations.RenameBlocks``): the defining file's
    stem, the same whether the file was imported by path (as discovery does, under a private
    package) or as ``mypkg.net_migrations``, so its digest and recorded data do not depend on
    how it was imported."""
    if cls.__module__.rpartition(".")[0] == _OPS_PACKAGE:
        return cls.__name__
    return f"{cls.__module__.rpartition('.')[2]}.{cls.__qualname__}"


def known_ops() -> dict[str, type[Op]]:
    """Every op class data may name: the public, declarative subclasses of :class:`Op` that
    this process has imported, by :func:`op_name`; a name two such classes share names
    neither (which one a file meant is unknown)."""
    found: dict[str, type[Op]] = {}
    shared: set[str] = set()
    todo = list(Op.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__name__.startswith("_") or CODE in cls.acts_on or not is_dataclass(cls):
            continue
        if issubclass(cls, TensorOp) and cls.transform is TensorOp.transform:
            continue  # the base of the tensor ops: it transforms nothing itself
        name = op_name(cls)
        if found.setdefault(name, cls) is not cls and not _same_class(found[name], cls):
            shared.add(name)
    for name in shared:
        del found[name]
    return found


def _same_class(a: type, b: type) -> bool:
    """Whether two classes are one definition imported twice (by path and by package name):
    same name, same defining file, same fields."""
    file_a, file_b = (getattr(sys.modules.get(c.__module__), "__file__", None) for c in (a, b))
    return (
        a.__qualname__ == b.__qualname__
        and file_a is not None
        and file_b is not None
        and os.path.realpath(file_a) == os.path.realpath(file_b)
        and [f.name for f in fields(a)] == [f.name for f in fields(b)]
    )


def op_data(op: Op) -> dict[str, Any]:
    """``op`` as JSON-able data: ``{"op": name, "args": {field: value}}``.

    Raises :class:`OpDataError` when it cannot be data: an op that runs caller code, or a
    field holding something that is not JSON (a tensor, a function).
    """
    cls = type(op)
    if not is_dataclass(op) or op.runs_user_code:
        raise OpDataError(f"{op.describe()} runs code, so it cannot be written as data")
    known = known_ops().get(op_name(cls))
    if known is not cls and (known is None or not _same_class(known, cls)):
        raise OpDataError(f"{op.describe()}: its class {op_name(cls)} cannot be rebuilt from data")
    # fields left at their defaults are left out: a field a later ckptmigrate adds (with a
    # default) changes neither the data of an op that does not use it nor its digest, and an
    # older ckptmigrate still reads it
    args = {
        f.name: _encode(getattr(op, f.name), f"{op_name(cls)}.{f.name}")
        for f in fields(op)
        if f.init and not _is_default(f, getattr(op, f.name))
    }
    return {"op": op_name(cls), "args": args}


def _is_default(f: Any, value: Any) -> bool:
    if f.default is not MISSING:
        default = f.default
    elif f.default_factory is not MISSING:
        default = f.default_factory()
    else:
        return False
    if default is ABSENT or default is UNKNOWN or value is ABSENT or value is UNKNOWN:
        return value is default
    try:
        return type(value) is type(default) and bool(value == default)
    except Exception:  # a value whose == is not a bool (a tensor): not the default
        return False


def _encode(value: Any, where: str) -> Any:
    if value is ABSENT or value is UNKNOWN:
        return {MARKER_KEY: repr(value)}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise OpDataError(f"{where} is {value}, which JSON cannot hold")
        return value
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.dtype):
        return str(value)  # "torch.float16": the ops that take a dtype take its name too
    if isinstance(value, (list, tuple)):
        return [_encode(v, where) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        if set(value) == {MARKER_KEY}:
            raise OpDataError(f"{where} is a dict that reads as a marker")
        return {k: _encode(v, where) for k, v in value.items()}
    raise OpDataError(f"{where} holds a {type(value).__name__}, which is not JSON data")


def op_from_data(data: Any) -> Op:
    """The op that :func:`op_data` wrote as ``data``; anything else is an :class:`OpDataError`.

    >>> op_from_data({"op": "RenamePrefix", "args": {"old": "a.", "new": "b."}})
    RenamePrefix(old='a.', new='b.', missing_ok=False)
    """
    return ops_from_data([data])[0]


def ops_from_data(data: Any) -> list[Op]:
    """A list of ops from their data (a step's inverse), checked as :func:`op_from_data` does."""
    if not isinstance(data, list):
        raise OpDataError(f"ops as data must be a list, found a {type(data).__name__}")
    if len(data) > MAX_OPS:
        raise OpDataError(f"{len(data)} ops, more than the {MAX_OPS} a step may hold")
    check_bounds(data)
    known = known_ops()
    return [_rebuild(entry, known) for entry in data]


def check_bounds(data: Any) -> None:
    """Refuse data nested past :data:`MAX_DEPTH`, past :data:`MAX_NODES` values, with a string
    past :data:`MAX_TEXT`, or holding anything but JSON's types; iterative, so hostile depth
    costs no recursion."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise OpDataError(f"the ops' data holds more than {MAX_NODES} values")
        if depth > MAX_DEPTH:
            raise OpDataError(f"the ops' data nests deeper than {MAX_DEPTH}")
        if isinstance(value, str):
            if len(value) > MAX_TEXT:
                raise OpDataError(f"a string of {len(value)} characters (at most {MAX_TEXT})")
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise OpDataError(f"a dict key is a {type(k).__name__}, not a string")
                stack.append((k, depth + 1))
                stack.append((v, depth + 1))
        elif value is not None and not isinstance(value, (bool, int, float)):
            raise OpDataError(f"the ops' data holds a {type(value).__name__}, not JSON data")


def _rebuild(entry: Any, known: dict[str, type[Op]]) -> Op:
    if not isinstance(entry, dict) or set(entry) != {"op", "args"}:
        raise OpDataError(
            'an op as data is a dict of "op" (its name) and "args", found ' + _kind(entry)
        )
    name, args = entry["op"], entry["args"]
    if isinstance(name, str) and name not in known and name.count(".") > 1:
        name = ".".join(name.rsplit(".", 2)[-2:])  # written before names were module.QualName
    if not isinstance(name, str) or name not in known:
        shown = repr(name)[:80] if isinstance(name, str) else _kind(name)
        raise OpDataError(
            f"the op {shown} is not one this ckptmigrate knows (known: "
            f"{', '.join(sorted(n for n in known if '.' not in n))}, and the op classes of "
            "migrations imported here); nothing is imported or run for a name read from a file"
        )
    if not isinstance(args, dict):
        raise OpDataError(f"the args of {name} must be a dict, found {_kind(args)}")
    cls = known[name]
    own = {f.name: f for f in fields(cls) if f.init}
    strange = sorted(set(args) - set(own))
    if strange:
        raise OpDataError(f"{name} has no field {strange[0]!r} (its fields: {', '.join(own)})")
    hints = _hints(cls)
    values = {}
    for key, raw in args.items():
        value = _decode(raw)
        hint = hints.get(key, Any)
        if not _conforms(value, hint):
            raise OpDataError(
                f"{name}.{key} must be {_hint_text(hint)}, found {_kind(raw)} {repr(raw)[:60]}"
            )
        values[key] = tuple(value) if _wants_tuple(hint) and isinstance(value, list) else value
    try:
        # the op checks its values (a template's fields, a dtype's name) as it is built, and
        # what they could make it cost when read from a file (a regex, a pad's size)
        op = cls(**values).as_recorded()
    except TypeError as exc:  # a required field missing
        raise OpDataError(f"{name}: {exc}") from None
    except OpError as exc:
        raise OpDataError(f"{name}: {exc}") from None
    if op.runs_user_code:  # e.g. a default that is callable cannot come from JSON, but check
        raise OpDataError(f"{name} would run code, so it is not rebuilt from data")
    return op


def _decode(raw: Any) -> Any:
    if isinstance(raw, dict):
        if set(raw) == {MARKER_KEY}:
            marker = _MARKERS.get(raw[MARKER_KEY]) if isinstance(raw[MARKER_KEY], str) else None
            if marker is None:
                raise OpDataError(f"unknown marker {repr(raw[MARKER_KEY])[:40]}")
            return marker
        return {k: _decode(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_decode(v) for v in raw]
    return raw


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation this process cannot resolve: the op checks its values
        return {}


def _conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` (decoded JSON) has the type ``hint`` names; an unknown hint passes."""
    if hint is Any or value is ABSENT or value is UNKNOWN:
        return hint is Any or _is_any_typed(hint)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            return False  # a string is a Sequence, but never a list of them
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_conforms, value, args))
        return not args or all(_conforms(v, args[0]) for v in value)
    if origin in (dict, Mapping):
        return isinstance(value, dict)
    return True


def _is_any_typed(hint: Any) -> bool:
    return hint is Any or any(arg is Any for arg in typing.get_args(hint))


def _wants_tuple(hint: Any) -> bool:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return any(_wants_tuple(arg) for arg in typing.get_args(hint))
    return typing.get_origin(hint) is tuple


def _hint_text(hint: Any) -> str:
    if typing.get_origin(hint) is None and hasattr(hint, "__name__"):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
