"""Where a checkpoint keeps its parts: ours, Lightning, nested, the tutorial's, or a flat dict.

Torch-free: it works on decoded objects whose tensors may be real or metadata stubs, so the
full loader and the metadata-only reader share it. ``split`` takes a file's top-level object
apart into a :class:`Checkpoint`; ``assemble`` puts one back together in the same layout.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .checkpoint import Checkpoint
from .errors import CheckpointFormatError
from .stamp import STAMP_KEY, parse_stamp


@dataclass(frozen=True)
class Layout:
    """The top-level keys of one checkpoint layout; ``None`` means "kept in the stamp"."""

    name: str
    state_dict_key: str | None
    hparams_key: str | None
    optimizer_key: str | None
    meta_key: str | None


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("ckptmigrate", "state_dict", "hparams", "optimizer", "meta"),
        Layout("lightning", "state_dict", "hyper_parameters", "optimizer_states", None),
        Layout("tutorial", "model_state_dict", None, "optimizer_state_dict", None),
        Layout("nested", "model", None, "optimizer", None),
        Layout("flat", None, None, None, None),
    )
}
_LIGHTNING_MARKERS = ("hyper_parameters", "optimizer_states", "pytorch-lightning_version")


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
    if isinstance(obj.get("state_dict"), dict):
        if any(marker in obj for marker in _LIGHTNING_MARKERS):
            return LAYOUTS["lightning"]
        return LAYOUTS["ckptmigrate"]
    if isinstance(obj.get("model_state_dict"), dict):
        return LAYOUTS["tutorial"]
    if isinstance(obj.get("model"), dict):
        return LAYOUTS["nested"]
    if all(is_tensor_like(v) or _is_extra_state(k) for k, v in obj.items()):
        return LAYOUTS["flat"]
    keys = ", ".join(repr(k) for k in list(obj)[:8])
    raise CheckpointFormatError(
        "found no state_dict: expected a dict of tensors, or a dict with 'state_dict', "
        f"'model_state_dict' or 'model'; top-level keys are {keys}",
        path=path,
    )


def split(obj: Any, *, path: object = None) -> Checkpoint:
    """Take a file's top-level object apart into a :class:`Checkpoint` (stamp parsed)."""
    layout = detect_layout(obj, path=path)
    if layout.state_dict_key is None:
        raw_sd, rest = obj, {}
    else:
        rest = dict(obj)
        raw_sd = rest.pop(layout.state_dict_key)
    state_dict = _check_state_dict(raw_sd, path=path)
    module_metadata = _module_metadata(raw_sd)

    raw_stamp = rest.pop(STAMP_KEY, None)
    if layout.name == "flat" and module_metadata is not None:
        raw_stamp = module_metadata.get("", {}).pop(STAMP_KEY, None)
    stamp_extras: dict[str, Any] = {}
    if raw_stamp is not None:
        stamp = parse_stamp(raw_stamp, path=path)
        stamp_extras = raw_stamp
    hparams = _pop_dict(rest, layout.hparams_key, stamp_extras, "hparams", path)
    meta = _pop_dict(rest, layout.meta_key, stamp_extras, "meta", path)
    optimizer = rest.pop(layout.optimizer_key, None) if layout.optimizer_key else None
    return Checkpoint(
        state_dict=state_dict,
        hparams=hparams,
        meta=meta,
        schema=stamp.schema if raw_stamp is not None else None,
        version=stamp.version if raw_stamp is not None else None,
        history=stamp.history if raw_stamp is not None else [],
        mounts=stamp.mounts if raw_stamp is not None else [],
        optimizer=optimizer,
        extra=rest,
        module_metadata=module_metadata,
        layout=layout.name,
    )


def assemble(ckpt: Checkpoint, stamp: dict[str, Any] | None) -> Any:
    """The object to write for ``ckpt`` in its layout, carrying ``stamp`` when given."""
    layout = LAYOUTS.get(ckpt.layout, LAYOUTS["ckptmigrate"])
    sd: OrderedDict[str, Any] = OrderedDict(ckpt.state_dict)
    metadata = copy.deepcopy(ckpt.module_metadata) if ckpt.module_metadata is not None else None
    stamp_out = dict(stamp) if stamp is not None else None

    if layout.name == "flat":
        if ckpt.optimizer is not None or ckpt.extra:
            raise ValueError(
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
    out: dict[str, Any] = {layout.state_dict_key: sd}  # type: ignore[dict-item]
    for key, value, slot in (
        (layout.hparams_key, ckpt.hparams, "hparams"),
        (layout.meta_key, ckpt.meta, "meta"),
    ):
        if key is not None:
            out[key] = value
        elif stamp_out is not None:
            stamp_out[slot] = value
    if ckpt.optimizer is not None and layout.optimizer_key is not None:
        out[layout.optimizer_key] = ckpt.optimizer
    clash = [k for k in ckpt.extra if k in out or k == STAMP_KEY]
    if clash:
        raise ValueError(f"extra entries {clash} clash with the {layout.name} layout's own keys")
    out.update(ckpt.extra)
    if stamp_out is not None:
        out[STAMP_KEY] = stamp_out
    return out


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
                f"state_dict keys must be strings, found {type(key).__name__} {key!r}", path=path
            )
        if not (is_tensor_like(value) or _is_extra_state(key)):
            raise CheckpointFormatError(
                f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor", path=path
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
    key: str | None,
    stamp: dict[str, Any],
    slot: str,
    path: object,
) -> dict[str, Any]:
    value = rest.pop(key, None) if key is not None else stamp.get(slot)
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    if hasattr(value, "__dict__") and not is_tensor_like(value):  # argparse.Namespace and kin
        return dict(vars(value))
    raise CheckpointFormatError(f"{slot} must be a dict, found {type(value).__name__}", path=path)
