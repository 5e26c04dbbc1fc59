"""The stamp: which schema and version a checkpoint is, and how it got there.

Torch-free: the metadata-only readers use it too. A stamp is a plain dict so that torch's
weights-only loader and a safetensors header (as JSON) can both carry it.

Its root fields (``schema``, ``version``, ``history``) are the mount at ``""``; ``mounts``
places more schemas at key prefixes (a LightningModule's ``net.``, a backbone and a head)::

    {"schema": "lit", "version": "1.0.0", "history": [], "format": 2,
     "mounts": [{"prefix": "net.", "schema": "net", "version": "2.0.0", "history": []}]}

A stamp with mounts has format 2, so that a reader of format 1 refuses it instead of taking
the root fields for the whole file; without mounts it stays format 1, as before.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from packaging.version import InvalidVersion, Version

from ..base.readable import bounded_repr
from ..base.version import __version__
from ..errors import CheckpointFormatError

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

STAMP_KEY = "__ckptmigrate__"
#: The newest stamp layout this code reads and writes; a stamp with a newer format is refused.
FORMAT_VERSION = 2
#: The layout of a stamp without mounts (what every earlier ckptmigrate wrote and reads).
ROOT_ONLY_FORMAT = 1


def library_version() -> str:
    return __version__


def utc_now() -> str:
    import datetime as _dt  # only writing a stamp needs the time

    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Mount:
    """A schema placed at a key prefix: the file's keys under ``prefix`` are that schema's keys.

    ``hparams`` names the entry of the file's hparams that is this mount's own dict; None (the
    default) lets the mount's migrations see and edit the file's whole hparams.

    >>> Mount("net.", "net", Version("1.0.0"))
    """

    prefix: str
    schema: str
    version: Version
    history: list[dict[str, Any]] = field(default_factory=list)
    hparams: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prefix": self.prefix,
            "schema": self.schema,
            "version": str(self.version),
            "history": [dict(h) for h in self.history],
        }
        if self.hparams is not None:
            out["hparams"] = self.hparams
        return out


class Stamp:
    """The parsed stamp of a checkpoint: the mount at ``""`` (maybe absent) and the others."""

    __slots__ = ("schema", "version", "history", "format", "written_by", "mounts")

    def __init__(
        self,
        schema: str | None,
        version: Version | None,
        history: list[dict[str, Any]] | None = None,
        format: int = ROOT_ONLY_FORMAT,
        written_by: dict[str, str] | None = None,
        mounts: list[Mount] | None = None,
    ) -> None:
        self.schema = schema
        self.version = version
        self.history = [] if history is None else history
        self.format = format
        self.written_by = {} if written_by is None else written_by
        self.mounts = [] if mounts is None else mounts

    def __repr__(self) -> str:
        return (
            f"Stamp(schema={self.schema!r}, version={self.version!r}, history={self.history!r}, "
            f"format={self.format}, written_by={self.written_by!r}, mounts={self.mounts!r})"
        )


def history_entry(planned: Any) -> dict[str, Any]:
    """The history entry of a step that just ran: its record, the digest of its code (and, for
    a reversible step of ops, its inverse as data: ``planned.provenance()``), when, and by
    which ckptmigrate."""
    return {
        **planned.record(),
        **planned.provenance(),
        "applied_at": utc_now(),
        "by": f"ckptmigrate {library_version()}",
    }


def stamp_of(ckpt: Checkpoint) -> dict[str, Any] | None:
    """The stamp dict to write for ``ckpt``, or None when it has neither a stamp nor mounts."""
    if ckpt.stamped or ckpt.mounts:
        return make_stamp(ckpt.schema, ckpt.version, ckpt.history, ckpt.mounts)
    return None


def make_stamp(
    schema: str | None,
    version: Version | None,
    history: list[dict[str, Any]],
    mounts: list[Mount] | tuple[Mount, ...] = (),
) -> dict[str, Any]:
    """The stamp dict to write beside a checkpoint's tensors (root fields absent when None)."""
    written_by = {"ckptmigrate": library_version(), "time": utc_now()}
    from importlib import metadata  # ~40 ms: only when writing

    torch = sys.modules.get("torch")
    try:
        # the installed version, without importing torch (seconds) on metadata-only paths
        version_text = torch.__version__ if torch is not None else metadata.version("torch")
        written_by["torch"] = str(version_text).split("+")[0]
    except metadata.PackageNotFoundError:  # pragma: no cover - torch is a dependency
        pass
    out: dict[str, Any] = {}
    if schema is not None and version is not None:
        out.update(schema=schema, version=str(version), history=[dict(h) for h in history])
    out["format"] = FORMAT_VERSION if mounts else ROOT_ONLY_FORMAT
    if mounts:
        check_prefixes([m.prefix for m in mounts], error=ValueError)
        out["mounts"] = [m.to_json() for m in mounts]
    out["written_by"] = written_by
    return out


def check_prefixes(prefixes: list[str], *, error: Any, path: object = None) -> None:
    """Mount prefixes are non-empty, end with ``.`` and do not overlap; else ``error``."""

    def fail(message: str) -> Exception:
        return (
            CheckpointFormatError(message, path=path)
            if error is CheckpointFormatError
            else error(message)
        )

    for prefix in prefixes:
        if not isinstance(prefix, str) or not prefix.endswith(".") or prefix == ".":
            raise fail(
                "a mount prefix must be a string ending with '.' (like 'net.'), found "
                f"{bounded_repr(prefix)}"
            )
    ordered = sorted(prefixes)
    for shorter, longer in zip(ordered, ordered[1:]):
        if longer.startswith(shorter):
            raise fail(
                f"mount prefixes {bounded_repr(shorter)} and {bounded_repr(longer)} overlap: "
                "each key belongs to one mount, so no prefix may start another"
            )


def _parse_version(raw: Any, what: str, path: object) -> Version:
    if not isinstance(raw, str):
        raise CheckpointFormatError(
            f"{what} version must be a PEP 440 string, found {bounded_repr(raw)}", path=path
        )
    try:
        return Version(raw)
    except (InvalidVersion, ValueError):  # ValueError: a release number past int()'s digit limit
        raise CheckpointFormatError(
            f"{what} version {raw[:60]!r} is not a PEP 440 version", path=path
        ) from None


def _parse_history(raw: Any, what: str, path: object) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not all(isinstance(h, dict) for h in raw):
        raise CheckpointFormatError(f"{what} history must be a list of dicts", path=path)
    return [dict(h) for h in raw]


def _parse_mounts(raw: Any, path: object) -> list[Mount]:
    if not isinstance(raw, list) or not raw or not all(isinstance(m, dict) for m in raw):
        raise CheckpointFormatError(
            f"the stamp's mounts must be a non-empty list of dicts, found {bounded_repr(raw)}",
            path=path,
        )
    mounts = []
    for entry in raw:
        prefix = entry.get("prefix")
        check_prefixes([prefix], error=CheckpointFormatError, path=path)
        what = f"the mount at {bounded_repr(prefix)}:"
        schema = entry.get("schema")
        if not isinstance(schema, str) or not schema:
            raise CheckpointFormatError(
                f"{what} schema must be a non-empty string, found {bounded_repr(schema)}", path=path
            )
        hparams = entry.get("hparams")
        if hparams is not None and (not isinstance(hparams, str) or not hparams):
            raise CheckpointFormatError(
                f"{what} hparams must name an hparams entry (a string), found "
                f"{bounded_repr(hparams)}",
                path=path,
            )
        version = _parse_version(entry.get("version"), f"{what} its", path)
        history = _parse_history(entry.get("history", []), f"{what} its", path)
        mounts.append(Mount(prefix, schema, version, history, hparams))
    check_prefixes([m.prefix for m in mounts], error=CheckpointFormatError, path=path)
    return mounts


def parse_stamp(raw: Any, *, path: object = None) -> Stamp:
    """Validate a stamp read from a file; a malformed one is a :class:`CheckpointFormatError`."""
    if not isinstance(raw, dict):
        raise CheckpointFormatError(
            f"the ckptmigrate stamp must be a dict, found {type(raw).__name__}", path=path
        )
    fmt = raw.get("format", ROOT_ONLY_FORMAT)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise CheckpointFormatError(
            f"the stamp's format must be an int, found {bounded_repr(fmt)}", path=path
        )
    if fmt > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"the stamp has format {bounded_repr(fmt)}, newer than {FORMAT_VERSION}, the newest "
            "this ckptmigrate reads: upgrade ckptmigrate",
            path=path,
        )
    mounts = _parse_mounts(raw["mounts"], path) if "mounts" in raw else []
    if mounts and fmt < FORMAT_VERSION:
        raise CheckpointFormatError(
            f"the stamp has mounts but format {fmt}: mounts need format {FORMAT_VERSION}, so "
            "that older readers refuse the file instead of misreading it",
            path=path,
        )
    schema = raw.get("schema")
    rooted = not mounts or any(k in raw for k in ("schema", "version", "history"))
    parsed: Version | None = None
    if rooted:
        if not isinstance(schema, str) or not schema:
            raise CheckpointFormatError(
                f"the stamp's schema must be a non-empty string, found {bounded_repr(schema)}",
                path=path,
            )
        parsed = _parse_version(raw.get("version"), "the stamp's", path)
    history = _parse_history(raw.get("history", []), "the stamp's", path)
    written_by = raw.get("written_by", {})
    if not isinstance(written_by, dict):
        raise CheckpointFormatError("the stamp's written_by must be a dict", path=path)
    return Stamp(schema if rooted else None, parsed, history, fmt, dict(written_by), mounts)
