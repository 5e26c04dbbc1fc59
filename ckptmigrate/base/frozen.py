"""Small immutable records for the metadata path, without the dataclass machinery.

``@dataclass`` generates and compiles code for every class it decorates (a few tenths of a
millisecond each), which the records every ``ckptmigrate diff`` makes would pay at each start.
A :class:`FrozenRecord` takes its fields from ``__slots__`` and behaves as a frozen dataclass
does: equal when of the same class with equal fields, hashable, a readable repr, no assignment,
and copies and pickles rebuild it from its fields.

>>> class Point(FrozenRecord):
...     __slots__ = ("x", "y")
...     def __init__(self, x: int, y: int = 0) -> None:
...         set_fields(self, x=x, y=y)
>>> Point(1) == Point(1, 0), Point(1)
(True, Point(x=1, y=0))
"""

from __future__ import annotations

from typing import Any

__all__ = ["FrozenRecord", "set_fields"]


def set_fields(record: FrozenRecord, **values: Any) -> None:
    """Set a record's fields once, in its ``__init__`` (assignment is refused afterwards)."""
    for name, value in values.items():
        object.__setattr__(record, name, value)


class FrozenRecord:
    """Base of an immutable record whose fields are its ``__slots__``, in order."""

    __slots__ = ()

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._fields() == other._fields()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({shown})"

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of a {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of a {type(self).__name__}")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (self.__class__, self._fields())
