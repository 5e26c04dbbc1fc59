"""Where a checkpoint keeps its parts: ours, Lightning, nested dicts, the tutorial's, a flat
dict, or a layout a migrations module declares.

Torch-free: it works on decoded objects whose tensors may be real or metadata stubs, so the
full loader and the metadata-only reader share it. ``split`` takes a file's top-level object
apart into a :class:`Checkpoint`; ``assemble`` puts one back together in the same layout.
"""

from __future__ import annotations

import contextlib
from _thread import allocate_lock
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..base.readable import bounded_repr, key_text
from ..errors import (
    CheckpointFormatError,
    CheckpointWriteError,
    LayoutNameError,
    UnknownLayoutError,
    UsageError,
)
from ..values.checkpoint import Checkpoint
from ..values.stamp import STAMP_KEY, Stamp, parse_stamp

KeyPath = tuple[str, ...]


@dataclass(frozen=True)
class Layout:
    """Where one checkpoint layout keeps its parts: a top-level key, a path of keys into nested
    dicts (``("model", "state_dict")``), or ``None`` for "kept in the stamp".

    A layout no built-in one covers is named in a migrations module, at module level, and
    discovery declares it (:func:`declare_layout`)::

        layout = cm.Layout("trainer", state_dict="net", hparams=("cfg", "model"), optimizer="opt")
    """

    name: str
    state_dict: str | KeyPath | None
    hparams: str | KeyPath | None = None
    optimizer: str | KeyPath | None = None
    meta: str | KeyPath | None = None
    markers: tuple[str, ...] = ()  # top-level keys of which one must be present

    def __post_init__(self) -> None:
        for slot in ("state_dict", "hparams", "optimizer", "meta"):
            value = getattr(self, slot)
            path = (value,) if isinstance(value, str) else value
            if path is not None and (not path or not all(isinstance(p, str) for p in path)):
                raise UsageError(f"Layout {slot}= must be a key, a tuple of keys or None")
            object.__setattr__(self, slot, None if path is None else tuple(path))

    def matches(self, obj: dict[Any, Any]) -> bool:
        """Whether ``obj`` (a file's top-level dict) has this layout."""
        if self.state_dict is None:
            return all(is_tensor_like(v) or _is_extra_state(k) for k, v in obj.items())
        if self.markers and not any(marker in obj for marker in self.markers):
            return False
        return isinstance(_get(obj, self.state_dict), dict)  # type: ignore[arg-type]


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(
            "lightning",
            "state_dict",
            "hyper_parameters",
            "optimizer_states",
            markers=("hyper_parameters", "optimizer_states", "pytorch-lightning_version"),
        ),
        Layout("ckptmigrate", "state_dict", "hparams", "optimizer", "meta"),
        Layout("tutorial", "model_state_dict", None, "optimizer_state_dict"),
        Layout("nested-args", ("model", "state_dict"), ("model", "model_args"), "optimizer"),
        Layout("nested", "model", None, "optimizer"),
        Layout("model-state", "model_state", None, "optimizer_state"),
        Layout("flat", None),
    )
}
_DECLARED: dict[str, Layout] = {}
#: what declares more layouts when a file matches none (the CLI: import the migrations)
_SOURCES: list[Callable[[], object]] = []
_SOURCES_LOCK = allocate_lock()  # threading.Lock itself, without importing threading


def declare_layout(layout: Layout) -> Layout:
    """Make ``layout`` known to every reader in this process (tried before the built-in ones).

    Discovery declares the :class:`Layout` values a migrations module defines; declaring the
    same layout again is a no-op, another one under a taken name a :class:`LayoutNameError`.
    """
    taken = LAYOUTS.get(layout.name) or _DECLARED.get(layout.name)
    if taken is not None and taken != layout:
        raise LayoutNameError(layout.name, builtin=layout.name in LAYOUTS)
    _DECLARED[layout.name] = layout
    return layout


def declared_layouts() -> list[Layout]:
    """The layouts declared in this process (to declare them again in a worker process)."""
    return list(_DECLARED.values())


@contextlib.contextmanager
def layouts_from(source: Callable[[], object]) -> Iterator[None]:
    """While inside, a file in none of the known layouts first calls ``source`` (once), which
    declares more of them, and is matched again: migrations are imported only when a file
    needs their layouts.

    >>> with layouts_from(lambda: find_schemas(["migrations"])):
    ...     ckpt = read_metadata("trainer.pt")   # a layout migrations/ declares
    """
    _SOURCES.append(source)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            _SOURCES.remove(source)


def _declare_more() -> None:
    """Run the waiting layout sources, each once."""
    with _SOURCES_LOCK:
        waiting = list(_SOURCES)
        _SOURCES.clear()
        for source in waiting:
            source()


def layout_named(name: str) -> Layout | None:
    """The built-in or declared layout called ``name``."""
    return LAYOUTS.get(name) or _DECLARED.get(name)


def is_tensor_like(value: Any) -> bool:
    """A real tensor or a metadata stub of one (both have ``shape`` and ``dtype``)."""
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, type)


def detect_layout(obj: Any, *, path: object = None) -> Layout:
    """Which layout a file's top-level object has; a :class:`CheckpointFormatError` if none."""
    if not isinstance(obj, dict):
        raise CheckpointFormatError(
            f"expected a dict of tensors or a checkpoint dict at the top level, found "
            f"{type(obj).__name__}",
            path=path,
        )
    for attempt in range(2):
        for layout in (*_DECLARED.values(), *LAYOUTS.values()):
            if layout.matches(obj):
                return layout
        if attempt == 0:
            _declare_more()  # returns once any source another thread runs has finished
    raise UnknownLayoutError([key_text(k) for k in obj], path=path)


def from_parts(
    state_dict: dict[str, Any],
    *,
    layout: str,
    stamp: Any = None,
    parts: Callable[[], dict[str, Any]] | None = None,
    path: object = None,
) -> Checkpoint:
    """The one way a format's raw parts become a :class:`Checkpoint`.

    ``stamp`` is the stamp as the file keeps it (parsed here, so a bad one is reported before
    a bad part), an already parsed :class:`~ckptmigrate.stamp.Stamp`, or None; ``parts``
    gives the other fields (``hparams``, ``meta``, ``optimizer``, ``extra``,
    ``module_metadata``), each checked by the format in its own words, once the stamp is.

    >>> from_parts({"w": stub}, layout="safetensors", stamp={"schema": "m", "version": "1.0"})
    ...     # doctest: +SKIP
    """
    parsed = stamp if isinstance(stamp, Stamp) or stamp is None else parse_stamp(stamp, path=path)
    fields = parts() if parts is not None else {}
    return Checkpoint(
        state_dict=state_dict,
        schema=parsed.schema if parsed else None,
        version=parsed.version if parsed else None,
        history=parsed.history if parsed else [],
        mounts=parsed.mounts if parsed else [],
        layout=layout,
        **fields,
    )


def split(obj: Any, *, path: object = None) -> Checkpoint:
    """Take a file's top-level object apart into a :class:`Checkpoint` (stamp parsed)."""
    layout = detect_layout(obj, path=path)
    if layout.state_dict is None:
        raw_sd, rest = obj, {}
    else:
        rest = dict(obj)
        raw_sd = _pop(rest, layout.state_dict)
    state_dict = _check_state_dict(raw_sd, path=path)
    module_metadata = _module_metadata(raw_sd)

    raw_stamp = rest.pop(STAMP_KEY, None)
    if layout.name == "flat" and module_metadata is not None:
        root = module_metadata.get("", {})
        if not isinstance(root, dict):  # where torch keeps the root module's version record
            raise CheckpointFormatError(
                f"the state_dict's _metadata[''] must be a dict, found {type(root).__name__}",
                path=path,
            )
        raw_stamp = root.pop(STAMP_KEY, None)
    stamp_extras = raw_stamp if isinstance(raw_stamp, dict) else {}

    def parts() -> dict[str, Any]:
        hparams = _pop_dict(rest, layout.hparams, stamp_extras, "hparams", path)
        meta = _pop_dict(rest, layout.meta, stamp_extras, "meta", path)
        optimizer = _pop(rest, layout.optimizer) if layout.optimizer else None
        return {
            "hparams": hparams,
            "meta": meta,
            "optimizer": optimizer,
            "extra": rest,
            "module_metadata": module_metadata,
        }

    return from_parts(state_dict, layout=layout.name, stamp=raw_stamp, parts=parts, path=path)


def assemble(ckpt: Checkpoint, stamp: dict[str, Any] | None) -> Any:
    """The object to write for ``ckpt`` in its layout, carrying ``stamp`` when given."""
    import copy  # only writing a file back needs it

    layout = layout_named(ckpt.layout) or LAYOUTS["ckptmigrate"]
    sd: OrderedDict[str, Any] = OrderedDict(ckpt.state_dict)
    metadata = copy.deepcopy(ckpt.module_metadata) if ckpt.module_metadata is not None else None
    stamp_out = dict(stamp) if stamp is not None else None

    if layout.name == "flat":
        if ckpt.optimizer is not None or ckpt.extra:
            raise CheckpointWriteError(
                "a flat state_dict file holds tensors only, but this checkpoint has optimizer "
                "state or extra entries: save it with layout='ckptmigrate' to keep them"
            )
        if stamp_out is not None:
            stamp_out["hparams"] = ckpt.hparams
            stamp_out["meta"] = ckpt.meta
            metadata = metadata if metadata is not None else OrderedDict()
            metadata.setdefault("", {})[STAMP_KEY] = stamp_out
        if metadata is not None:
            sd._metadata = metadata  # type: ignore[attr-defined]
        return sd

    if metadata is not None:
        sd._metadata = metadata  # type: ignore[attr-defined]
    out: dict[str, Any] = {}
    _put(out, layout.state_dict, sd)  # type: ignore[arg-type]
    for key, value, slot in (
        (layout.hparams, ckpt.hparams, "hparams"),
        (layout.meta, ckpt.meta, "meta"),
    ):
        if key is not None:
            _put(out, key, value)
        elif stamp_out is not None:
            stamp_out[slot] = value
    if ckpt.optimizer is not None and layout.optimizer is not None:
        _put(out, layout.optimizer, ckpt.optimizer)
    nested = {
        p[0]
        for p in (layout.state_dict, layout.hparams, layout.optimizer, layout.meta)
        if p and p[1:]
    }
    clash = [k for k, v in ckpt.extra.items() if k == STAMP_KEY or not _merge(out, k, v, nested)]
    if clash:
        raise CheckpointWriteError(
            f"extra entries {clash} clash with the {layout.name} layout's own keys"
        )
    if stamp_out is not None:
        out[STAMP_KEY] = stamp_out
    return out


def _get(obj: Any, path: KeyPath) -> Any:
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def _pop(rest: dict[str, Any], path: KeyPath) -> Any:
    """Take the value at ``path`` out of ``rest`` (copying the dicts above it; a dict left
    empty goes too), or None."""
    head, *tail = path
    if not tail:
        return rest.pop(head, None)
    inner = rest.get(head)
    if not isinstance(inner, dict):
        return None
    inner = rest[head] = dict(inner)
    value = _pop(inner, tuple(tail))
    if not inner:
        del rest[head]
    return value


def _put(out: dict[str, Any], path: KeyPath, value: Any) -> None:
    for key in path[:-1]:
        out = out.setdefault(key, {})
    out[path[-1]] = value


def _merge(out: dict[str, Any], key: str, value: Any, nested: set[str]) -> bool:
    """Put an extra entry back beside the layout's parts (the rest of a dict a part sits in
    goes back into it); False if they clash."""
    if key not in out:
        out[key] = value
        return True
    if key not in nested or not isinstance(value, dict) or any(k in out[key] for k in value):
        return False
    out[key].update(value)
    return True


def _is_extra_state(key: Any) -> bool:
    return isinstance(key, str) and key.endswith("_extra_state")


def _check_state_dict(raw: Any, *, path: object) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise CheckpointFormatError(
            f"the state_dict must be a dict, found {type(raw).__name__}", path=path
        )
    for key, value in raw.items():
        if not isinstance(key, str):
            raise CheckpointFormatError(
                f"state_dict keys must be strings, found {type(key).__name__} {bounded_repr(key)}",
                path=path,
            )
        if not (is_tensor_like(value) or _is_extra_state(key)):
            raise CheckpointFormatError(
                f"state_dict entry {bounded_repr(key)} is a {type(value).__name__}, not a tensor",
                path=path,
            )
    return dict(raw)


def _module_metadata(raw_sd: Any) -> dict[str, dict[str, Any]] | None:
    metadata = getattr(raw_sd, "_metadata", None)
    if not isinstance(metadata, dict):
        return None
    return OrderedDict(
        (k, dict(v) if isinstance(v, dict) else v) for k, v in metadata.items()
    )  # type: ignore[return-value]


def _pop_dict(
    rest: dict[str, Any],
    key: KeyPath | None,
    stamp: dict[str, Any],
    slot: str,
    path: object,
) -> dict[str, Any]:
    value = _pop(rest, key) if key is not None else stamp.get(slot)
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    from .torch import OpaqueObject

    if isinstance(value, OpaqueObject) and value.fields() is not None:  # an allowed global
        return value.fields()  # type: ignore[return-value]
    if hasattr(value, "__dict__") and not is_tensor_like(value):  # argparse.Namespace and kin
        return dict(vars(value))
    raise CheckpointFormatError(f"{slot} must be a dict, found {type(value).__name__}", path=path)
