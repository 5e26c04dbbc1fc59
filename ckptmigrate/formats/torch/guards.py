"""BUILD guards: what a global resolves to can be neither patched by a pickle's BUILD opcode
nor by setattr.

A pickle's BUILD opcode sets attributes on the object below it, through ``__setstate__``, the
object's ``__dict__`` (even of a frozen dataclass) or setattr. Aimed at a global it would rewrite
our shared allow-list (turn torch.float32 into float64 for every later file) or a class for the
whole process (collections.Counter). torch's loader refuses BUILD on anything but tensors,
parameters and OrderedDicts; so does every object a global resolves to here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from ...errors import UnsafeCheckpointError


def refuse_build(what: str) -> NoReturn:
    """Raise for a BUILD (or setattr) aimed at ``what``."""
    raise UnsafeCheckpointError(
        f"BUILD on {what}",
        detail="the BUILD opcode sets attributes on a value that only OrderedDicts, tensors "
        "and allowed classes may receive",
    )


class GuardedType(type):
    """Metaclass of the classes a global resolves to: neither BUILD nor setattr changes them."""

    def __setstate__(cls, state: Any) -> None:
        refuse_build(cls.__name__)

    def __setattr__(cls, name: str, value: Any) -> None:
        refuse_build(cls.__name__)


class GuardedCall:
    """A function a global resolves to, wrapped so BUILD cannot set its ``__defaults__``."""

    __slots__ = ("_func", "_name")

    def __init__(self, func: Callable[..., Any], name: str) -> None:
        object.__setattr__(self, "_func", func)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._func(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        refuse_build(self._name)

    def __setstate__(self, state: Any) -> None:
        refuse_build(self._name)

    def __repr__(self) -> str:
        return self._name
