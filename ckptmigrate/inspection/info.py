"""What a checkpoint holds and what a schema's history is, as JSON-able records.

These are the records ``ckptmigrate info`` and ``ckptmigrate history`` print (the CLI renders
them with :mod:`ckptmigrate.render`); Python callers get the same data. Reading a checkpoint's
record reads its metadata only: no tensor data, no torch import.

>>> info_record("ckpt/model.safetensors")["tensors"]  # doctest: +SKIP
12
>>> history_record(schema)["steps"][0]["from"]  # doctest: +SKIP
'1.0.0'
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..base.readable import key_text, path_text
from ..engine.mounts import all_mounts
from ..errors import CkptMigrateError
from ..formats.layout import is_tensor_like
from ..formats.registry import reader_for
from ..io import files
from ..io.report import signature
from ..schema.registry import find_schemas, schema_status
from ..schema.schema import Schema
from ..values.tensorinfo import DTYPE_SIZES
from .diff import plain

__all__ = [
    "edited_history",
    "history_record",
    "info_record",
    "key_rows",
    "schema_list_record",
    "schema_status_record",
    "tensor_bytes",
    "unloaded_migrations",
]

#: the schemas to judge a stamp against, or a function that finds them (called when needed)
SchemasSource = Mapping[str, Schema] | Callable[[], Mapping[str, Schema]] | None


def tensor_bytes(value: Any) -> int:
    """The bytes a tensor (or a metadata stub of one) holds."""
    info = getattr(value, "info", None)
    if info is not None:
        return int(info.nbytes)
    shape, dtype = signature(value)
    return math.prod(shape) * DTYPE_SIZES.get(dtype, 0)


def key_rows(tensors: dict[str, Any]) -> list[dict[str, Any]]:
    """``info --keys``: one row per tensor (name, shape, dtype, parameters, bytes), from stubs."""
    rows = []
    for name, value in tensors.items():
        shape, dtype = signature(value)
        rows.append(
            {
                "key": name,
                "shape": list(shape),
                "dtype": dtype,
                "params": math.prod(shape),
                "bytes": tensor_bytes(value),
            }
        )
    return rows


def schema_status_record(
    name: str | None, version: Any, schemas: SchemasSource = None, history: Sequence[Any] = ()
) -> dict[str, Any] | None:
    """Whether a stamp (or mount) is behind its registered schema (finding schemas imports
    migrations: a failure to is recorded as ``{"registered": None, "error": ...}``), and which
    steps its ``history`` says ran that have been edited since (``edited``)."""
    if name is None or version is None:
        return None
    try:
        found = _schemas(schemas)
    except CkptMigrateError as exc:
        return {"registered": None, "error": str(exc)}
    status = schema_status(name, version, found, history)
    if not status.registered:
        return {"registered": False, "error": str(status.error)}
    record: dict[str, Any] = {
        "registered": True,
        "current": str(status.current),
        "behind": status.behind,
        "plan": None if status.plan is None else [p.record() for p in status.plan],
        "edited": [e.record() for e in status.edited],
    }
    if status.error is not None:
        record["error"] = str(status.error)
    return record


def info_record(
    path: str | os.PathLike[str],
    *,
    schemas: SchemasSource = None,
    allowed_globals: Iterable[Any] = (),
    keys: bool = False,
) -> dict[str, Any]:
    """What ``ckptmigrate info`` shows, as JSON-able data (metadata read only).

    ``schemas`` (default: the configured or installed ones) tells whether each stamp is
    behind; ``keys=True`` adds one row per tensor.
    """
    target, fmt = reader_for(path)
    ckpt = files.read_metadata(target, allowed_globals=allowed_globals, fmt=fmt)
    tensors = {k: v for k, v in ckpt.state_dict.items() if is_tensor_like(v)}
    dtypes: dict[str, int] = {}
    for value in tensors.values():
        dtype = signature(value)[1]
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
    record = {
        "path": path_text(path),
        "format": fmt.name,
        "layout": ckpt.layout,
        "file_bytes": files.checkpoint_bytes(target, fmt),
        "schema": ckpt.schema,
        "version": None if ckpt.version is None else str(ckpt.version),
        "history": plain(ckpt.history),
        "tensors": len(tensors),
        "tensor_bytes": sum(tensor_bytes(v) for v in tensors.values()),
        "dtypes": dict(sorted(dtypes.items())),
        "hparams": plain(ckpt.hparams),
        "meta": plain(ckpt.meta),
        "optimizer": ckpt.optimizer is not None,
        "extra": sorted(key_text(k) for k in ckpt.extra),
        "status": (
            schema_status_record(ckpt.schema, ckpt.version, schemas, ckpt.history)
            if not ckpt.mounts
            else None
        ),
        "mounts": (
            [
                {
                    "prefix": m.prefix,
                    "schema": m.schema,
                    "version": str(m.version),
                    "history": plain(m.history),
                    "tensors": sum(1 for k in tensors if k.startswith(m.prefix)),
                    "status": schema_status_record(m.schema, m.version, schemas, m.history),
                }
                for m in all_mounts(ckpt)
            ]
            if ckpt.mounts
            else []
        ),
    }
    if keys:
        record["keys"] = key_rows(tensors)
    return record


def edited_history(record: dict[str, Any]) -> list[str]:
    """One warning a stamp (or mount) of ``record`` whose history holds edited steps."""
    from ..errors import HistoryEditedWarning

    parts = [("", record["schema"], record["status"])]
    parts += [(m["prefix"], m["schema"], m["status"]) for m in record["mounts"]]
    return [
        str(HistoryEditedWarning(schema, status["edited"], path=record["path"], prefix=prefix))
        for prefix, schema, status in parts
        if status is not None and status.get("edited")
    ]


def unloaded_migrations(record: dict[str, Any]) -> list[str]:
    """Why the migrations could not be loaded, once per status of ``record`` that needed them."""
    statuses = [record["status"], *(m["status"] for m in record["mounts"])]
    return [s["error"] for s in statuses if s is not None and s.get("registered") is None]


def history_record(schema: Schema) -> dict[str, Any]:
    """The migration graph of ``schema``, oldest step first."""
    return {
        "schema": schema.name,
        "current": str(schema.current),
        "origin": schema.origin,
        "versions": [str(v) for v in schema.graph.versions],
        "steps": [
            {
                "from": str(s.source),
                "to": str(s.target),
                "step": s.name,
                "breaking": s.breaking,
                "reversible": s.reversible,
                "preferred": s.preferred,
            }
            for s in schema.steps
        ],
    }


def schema_list_record(schemas: Mapping[str, Schema]) -> list[dict[str, Any]]:
    """Every discovered schema: name, current version, step count and where it came from."""
    return [
        {
            "schema": s.name,
            "current": str(s.current),
            "steps": len(s.steps),
            "origin": s.origin,
        }
        for _, s in sorted(schemas.items())
    ]


def _schemas(schemas: SchemasSource) -> Mapping[str, Schema]:
    if schemas is None:
        return find_schemas()
    if callable(schemas):
        return schemas()
    return schemas
