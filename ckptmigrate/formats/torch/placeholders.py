"""Placeholders: what a torch value or a caller-allowed global decodes to instead of the real
thing (:class:`TorchConstant`, :class:`OpaqueObject`); nothing is imported.

>>> read_torch_metadata("run.ckpt", allowed_globals=["argparse.Namespace"])["hparams"]  # doctest: +SKIP
OpaqueObject(name='argparse.Namespace', ...)
"""

from __future__ import annotations

from typing import Any

from ...base.frozen import FrozenRecord, set_fields
from .guards import GuardedType, refuse_build


class TorchConstant(FrozenRecord):
    """A torch value a pickle names but we do not import: a dtype, layout, qscheme, class."""

    __slots__ = ("name",)
    name: str

    def __init__(self, name: str) -> None:
        set_fields(self, name=name)

    def graph_children(self) -> tuple[Any, ...]:
        """Its name, for :func:`bounds.check_graph`."""
        return (self.name,)

    def __repr__(self) -> str:
        return self.name

    def __reduce__(self) -> Any:
        return (TorchConstant, (self.name,))  # copies rebuild it; they never set its state

    def __setstate__(self, state: Any) -> None:
        refuse_build(self.name)


class OpaqueObject:
    """What a caller-allowed global (``allowed_globals``) decodes to: its name and its args.

    ``state`` holds what the pickle's BUILD opcode would have passed to ``__setstate__``;
    ``items`` what SETITEMS stored into it (a dict subclass such as Lightning's AttributeDict).
    Compared by identity.
    """

    __slots__ = ("name", "args", "state", "kwargs", "items")

    def __init__(
        self,
        name: str,
        args: tuple[Any, ...] = (),
        state: Any = None,
        kwargs: dict[str, Any] | None = None,
        items: dict[Any, Any] | None = None,
    ) -> None:
        self.name = name
        self.args = args
        self.state = state
        self.kwargs = {} if kwargs is None else kwargs
        self.items = {} if items is None else items

    def __repr__(self) -> str:
        return (
            f"OpaqueObject(name={self.name!r}, args={self.args!r}, state={self.state!r}, "
            f"kwargs={self.kwargs!r}, items={self.items!r})"
        )

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def fields(self) -> dict[Any, Any] | None:
        """The mapping the object held: its dict items and the attributes BUILD set
        (``argparse.Namespace``); None when it held neither."""
        attributes = self.state if isinstance(self.state, dict) else {}
        if not self.items and not attributes:
            return None
        return {**self.items, **attributes}

    def graph_children(self) -> tuple[Any, ...]:
        """What it holds, for :func:`bounds.check_graph`."""
        return (self.args, self.state, self.kwargs, self.items)


class OpaqueMeta(GuardedType):
    """Metaclass of the class a caller-allowed global resolves to (see :func:`opaque_global`)."""

    def __repr__(cls) -> str:
        return f"<opaque global {cls.global_name}>"  # type: ignore[attr-defined]


class _OpaqueGlobal(metaclass=OpaqueMeta):
    """Base of the classes a caller-allowed global name resolves to (NEWOBJ needs a type)."""

    global_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
        return OpaqueObject(cls.global_name, args, None, kwargs)


def opaque_global(name: str) -> type:
    """The class the caller-allowed global ``name`` resolves to: calling it makes an
    :class:`OpaqueObject`."""
    return OpaqueMeta(name.rpartition(".")[2], (_OpaqueGlobal,), {"global_name": name})
