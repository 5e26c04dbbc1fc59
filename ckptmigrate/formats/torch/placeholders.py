"""Placeholders: what a torch value or a caller-allowed global decodes to instead of the real
thing (:class:`TorchConstant`, :class:`OpaqueObject`); nothing is imported.

>>> read_torch_metadata("run.ckpt", allowed_globals=["argparse.Namespace"])["hparams"]  # doctest: +SKIP
OpaqueObject(name='argparse.Namespace', ...)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .guards import GuardedType, refuse_build


@dataclass(frozen=True)
class TorchConstant:
    """A torch value a pickle names but we do not import: a dtype, layout, qscheme, class."""

    name: str

    def __repr__(self) -> str:
        return self.name

    def __reduce__(self) -> Any:
        return (TorchConstant, (self.name,))  # copies rebuild it; they never set its state

    def __setstate__(self, state: Any) -> None:
        refuse_build(self.name)


@dataclass(eq=False)
class OpaqueObject:
    """What a caller-allowed global (``allowed_globals``) decodes to: its name and its args.

    ``state`` holds what the pickle's BUILD opcode would have passed to ``__setstate__``;
    ``items`` what SETITEMS stored into it (a dict subclass such as Lightning's AttributeDict).
    """

    name: str
    args: tuple[Any, ...] = ()
    state: Any = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    items: dict[Any, Any] = field(default_factory=dict)

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
