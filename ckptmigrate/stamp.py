"""The stamp: which schema and version a checkpoint is, and how it got there.

Torch-free: the metadata-only readers use it too. A stamp is a plain dict so that torch's
weights-only loader and a safetensors header (as JSON) can both carry it.
"""

from __future__ import annotations

import datetime as _dt
import sys
from dataclasses import dataclass, field
from typing import Any

from packaging.version import InvalidVersion, Version

from .errors import CheckpointFormatError

STAMP_KEY = "__ckptmigrate__"
#: The stamp layout this code writes; a stamp with a newer format is refused.
FORMAT_VERSION = 1


def library_version() -> str:
    from . import __version__

    return __version__


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Stamp:
    """The parsed stamp of a checkpoint."""

    schema: str
    version: Version
    history: list[dict[str, Any]] = field(default_factory=list)
    format: int = FORMAT_VERSION
    written_by: dict[str, str] = field(default_factory=dict)


def make_stamp(schema: str, version: Version, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The stamp dict to write beside a checkpoint's tensors."""
    written_by = {"ckptmigrate": library_version(), "time": utc_now()}
    from importlib import metadata  # ~40 ms: only when writing

    torch = sys.modules.get("torch")
    try:
        # the installed version, without importing torch (seconds) on metadata-only paths
        version_text = torch.__version__ if torch is not None else metadata.version("torch")
        written_by["torch"] = str(version_text).split("+")[0]
    except metadata.PackageNotFoundError:  # pragma: no cover - torch is a dependency
        pass
    return {
        "schema": schema,
        "version": str(version),
        "history": [dict(h) for h in history],
        "format": FORMAT_VERSION,
        "written_by": written_by,
    }


def parse_stamp(raw: Any, *, path: object = None) -> Stamp:
    """Validate a stamp read from a file; a malformed one is a :class:`CheckpointFormatError`."""
    if not isinstance(raw, dict):
        raise CheckpointFormatError(
            f"the ckptmigrate stamp must be a dict, found {type(raw).__name__}", path=path
        )
    schema = raw.get("schema")
    if not isinstance(schema, str) or not schema:
        raise CheckpointFormatError(
            f"the stamp's schema must be a non-empty string, found {schema!r}", path=path
        )
    version = raw.get("version")
    if not isinstance(version, str):
        raise CheckpointFormatError(
            f"the stamp's version must be a PEP 440 string, found {version!r}", path=path
        )
    try:
        parsed = Version(version)
    except InvalidVersion:
        raise CheckpointFormatError(
            f"the stamp's version {version!r} is not a PEP 440 version", path=path
        ) from None
    fmt = raw.get("format", FORMAT_VERSION)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise CheckpointFormatError(f"the stamp's format must be an int, found {fmt!r}", path=path)
    if fmt > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"the stamp has format {fmt}, newer than {FORMAT_VERSION}, the newest this ckptmigrate "
            "reads: upgrade ckptmigrate",
            path=path,
        )
    history = raw.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise CheckpointFormatError("the stamp's history must be a list of dicts", path=path)
    written_by = raw.get("written_by", {})
    if not isinstance(written_by, dict):
        raise CheckpointFormatError("the stamp's written_by must be a dict", path=path)
    return Stamp(schema, parsed, [dict(h) for h in history], fmt, dict(written_by))
