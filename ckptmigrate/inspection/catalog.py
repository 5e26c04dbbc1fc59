"""A catalog of the fleet: every checkpoint a scan found, kept in SQLite or PostgreSQL.

``ckptmigrate scan ROOT --catalog catalog.sqlite`` records each checkpoint (where, size, a
fingerprint of its files' sizes and modification times, format, error) and each of its mounts
(schema, version, current version, behind or not, the steps an upgrade would run, history,
hparams, meta such as metrics). A rescan reads only what changed: a checkpoint whose
fingerprint is the one recorded is not opened at all; one that is gone is removed. Its rows are
judged again against today's schemas, which costs no read.

A root behind a URL (``s3://bucket/prefix``) is listed once; the listing's size and ETag of
each object are its fingerprint, so a rescan with nothing changed makes that listing and no
other request, and what is new or changed is read by range, several objects at once.

The catalog is an SQLite file (the embedded default) or, for a team, a PostgreSQL database
named by a ``postgresql://`` URL (``pip install ckptmigrate[postgres]``). Both hold the same
two tables, ``ckptmigrate_files`` and ``ckptmigrate_mounts``, with JSON values as text.

>>> with open_catalog("catalog.sqlite") as catalog:
...     result = scan_into(catalog, "registry/", schemas)
...     best = query(catalog, schema="tinylm", best="val_loss")
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import CatalogError, MigrationGraphError, UsageError
from ..formats.remote import Location, RemotePath, location
from ..schema.schema import Schema
from .scan import ScanRow, find_checkpoints, judge, scan_paths

__all__ = [
    "CATALOG_FORMAT",
    "Catalog",
    "CatalogScan",
    "fingerprint",
    "open_catalog",
    "query",
    "scan_into",
]

#: The layout of the tables; a catalog written with another is refused, not guessed at.
CATALOG_FORMAT = "1"

_TABLES = (
    """CREATE TABLE IF NOT EXISTS ckptmigrate_catalog (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS ckptmigrate_files (
        location TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        size BIGINT NOT NULL,
        format TEXT,
        scanned_at TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS ckptmigrate_mounts (
        location TEXT NOT NULL,
        prefix TEXT NOT NULL,
        format TEXT,
        schema_name TEXT,
        version TEXT,
        current_version TEXT,
        behind INTEGER,
        steps TEXT NOT NULL,
        history TEXT NOT NULL,
        hparams TEXT NOT NULL,
        meta TEXT NOT NULL,
        tensors BIGINT NOT NULL,
        nbytes BIGINT NOT NULL,
        read_error TEXT,
        error TEXT,
        PRIMARY KEY (location, prefix)
    )""",
    "CREATE INDEX IF NOT EXISTS ckptmigrate_mounts_schema ON ckptmigrate_mounts (schema_name)",
)


class Catalog:
    """An open catalog: a DB-API connection and its parameter style. Use as a context
    manager (or call :meth:`close`)."""

    def __init__(self, connection: Any, *, placeholder: str, where: str) -> None:
        self.connection = connection
        self.placeholder = placeholder
        self.where = where

    def sql(self, statement: str) -> str:
        """``statement`` written with ``?`` placeholders, in this database's style."""
        return statement if self.placeholder == "?" else statement.replace("?", self.placeholder)

    def execute(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._errors():
            cursor = self.connection.cursor()
            try:
                cursor.execute(self.sql(statement), tuple(params))
                return list(cursor.fetchall()) if cursor.description else []
            finally:
                cursor.close()

    def executemany(self, statement: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._errors():
            cursor = self.connection.cursor()
            try:
                cursor.executemany(self.sql(statement), [tuple(r) for r in rows])
            finally:
                cursor.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything inside commits together, or (on any error, Ctrl-C included) not at all."""
        try:
            yield
        except BaseException:
            with self._errors():
                self.connection.rollback()
            raise
        with self._errors():
            self.connection.commit()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except CatalogError:
            raise
        except Exception as exc:
            if type(exc).__module__.split(".")[0] not in ("sqlite3", "psycopg", "psycopg2"):
                raise
            raise CatalogError(self.where, f"{type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        with self._errors():
            self.connection.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_catalog(target: str | os.PathLike[str]) -> Catalog:
    """The catalog ``target`` names, its tables made if new: a ``postgresql://`` (or
    ``postgres://``) URL, else the path of an SQLite file (created if absent)."""
    text = os.fspath(target)
    if text.startswith(("postgresql://", "postgres://")):
        catalog = _open_postgres(text)
    else:
        catalog = _open_sqlite(Path(text))
    with catalog.transaction():
        for statement in _TABLES:
            catalog.execute(statement)
        found = catalog.execute("SELECT value FROM ckptmigrate_catalog WHERE key = 'format'")
        if not found:
            catalog.execute(
                "INSERT INTO ckptmigrate_catalog (key, value) VALUES ('format', ?)",
                (CATALOG_FORMAT,),
            )
        elif found[0][0] != CATALOG_FORMAT:
            raise CatalogError(
                catalog.where,
                f"its tables are in catalog format {found[0][0]!r}; this ckptmigrate writes "
                f"format {CATALOG_FORMAT!r}",
            )
    return catalog


def _open_sqlite(path: Path) -> Catalog:
    import sqlite3

    if path.is_dir():
        raise CatalogError(str(path), "it is a folder; name an SQLite file")
    try:
        connection = sqlite3.connect(path, timeout=30)
        connection.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as exc:
        raise CatalogError(str(path), f"{type(exc).__name__}: {exc}") from None
    return Catalog(connection, placeholder="?", where=str(path))


def _open_postgres(url: str) -> Catalog:
    from ..base.readable import url_without_secrets

    where = url_without_secrets(url)
    try:
        import psycopg
    except ImportError:
        raise CatalogError(
            where, "a PostgreSQL catalog needs psycopg: pip install 'ckptmigrate[postgres]'"
        ) from None
    try:
        connection = psycopg.connect(url, connect_timeout=10)
    except psycopg.Error as exc:
        raise CatalogError(where, " ".join(str(exc).split())) from None
    return Catalog(connection, placeholder="%s", where=where)


def fingerprint(path: Location) -> tuple[str | None, int]:
    """``(fingerprint, size)`` of a checkpoint from its metadata alone (no byte read): a file's
    size and modification time, or those of every file in a DCP or sharded folder. An object
    behind a URL has its size and ETag (else its modification time) as its store's listing
    gave them; ``None`` when the store tells neither, so nothing shows a change: read it
    (also a file that cannot be stat'ed, gone since it was listed: its read says why)."""
    if isinstance(path, RemotePath):
        return _remote_fingerprint(path)
    try:
        return _local_fingerprint(path)
    except OSError:
        return None, 0


def _local_fingerprint(path: Path) -> tuple[str, int]:
    st = path.stat()
    if not path.is_dir():
        return f"{st.st_size}:{st.st_mtime_ns}", st.st_size
    digest = hashlib.sha256()
    size = 0
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_file(follow_symlinks=False):
            est = entry.stat(follow_symlinks=False)
            size += est.st_size
            digest.update(f"{entry.name}\0{est.st_size}\0{est.st_mtime_ns}\n".encode())
    return f"folder:{digest.hexdigest()}", size


#: The fields of an fsspec info that change with an object's bytes, the first one found
#: used: S3's and HTTP's ETag, GCS's etag and generation, then modification times.
_VERSION_FIELDS = (
    "ETag",
    "etag",
    "generation",
    "LastModified",
    "Last-Modified",
    "mtime",
    "updated",
)


def _remote_fingerprint(path: RemotePath) -> tuple[str | None, int]:
    """An object's ``size`` and version (ETag, else modification time) from what its
    store's listing said, or a folder's over every object under it; no request for what a
    listing already gave."""
    objects = [(k[len(path.key) :], info) for k, info in path.store.known_under(path.key)]
    if not objects:  # an object (a folder's listing is known: no request to tell which)
        info = path.store.info(path.key)
        objects = [("", info)] if info is not None and info.get("type") != "directory" else []
    size = sum(int(found.get("size") or 0) for _, found in objects)
    digest = hashlib.sha256()
    for name, found in objects:
        version = next((found[f] for f in _VERSION_FIELDS if found.get(f) is not None), None)
        if version is None:
            return None, size
        digest.update(f"{name}\0{found.get('size')}\0{version}\n".encode())
    if not objects:
        return None, 0
    kind = "object" if objects[0][0] == "" else "objects"
    return f"{kind}:{digest.hexdigest()}", size


@dataclass
class CatalogScan:
    """What :func:`scan_into` did: every row now recorded under the root (path order), and
    the count of checkpoints read, left unread because unchanged, and removed as gone."""

    rows: list[ScanRow] = field(default_factory=list)
    read: int = 0
    unchanged: int = 0
    removed: int = 0


def scan_into(
    catalog: Catalog,
    root: str | os.PathLike[str],
    schemas: Mapping[str, Schema] | Iterable[Schema] = (),
    *,
    workers: int | None = None,
    processes: bool | None = False,
    progress: Callable[[int, int], None] | None = None,
    allowed_globals: Iterable[str] = (),
) -> CatalogScan:
    """Scan ``root`` into ``catalog``: read the checkpoints that are new or changed since the
    last scan (by :func:`fingerprint`), drop the ones that are gone, judge every row against
    ``schemas``; all in one transaction. ``root`` may be a URL (``s3://bucket/prefix``):
    its listing gives every fingerprint, and ``workers`` threads (16 by default) read what
    changed. Rows come back in path order, whatever order the reads finished in.

    >>> with open_catalog("fleet.sqlite") as catalog:  # doctest: +SKIP
    ...     done = scan_into(catalog, "s3://models/runs", schemas, workers=32)
    >>> done.read, done.unchanged, done.removed  # doctest: +SKIP
    (1000, 0, 0)
    """
    by_name = schemas if isinstance(schemas, Mapping) else {s.name: s for s in schemas}
    where = location(root)
    base: Location = where if isinstance(where, RemotePath) else where.absolute()
    paths: list[Location] = list(find_checkpoints(base))
    if not isinstance(base, RemotePath):
        paths = [p.absolute() for p in paths]
    under, params = _recorded_under(base)
    recorded = dict(
        catalog.execute(
            f"SELECT location, fingerprint FROM ckptmigrate_files WHERE {under}", params
        )
    )
    prints = {str(p): fingerprint(p) for p in paths}  # before reading: a change mid-read shows
    changed = [p for p in paths if _changed(recorded.get(str(p)), prints[str(p)][0])]
    fresh = scan_paths(
        changed,
        workers=workers,
        processes=processes,
        progress=progress,
        allowed_globals=allowed_globals,
        judged=False,
    )
    kept = [loc for loc in prints if loc in recorded and loc not in {str(c) for c in changed}]
    gone = [loc for loc in recorded if loc not in prints]
    # a read that its store (or the OS) failed is not trusted: the next scan reads it again
    untrusted = {r.path for r in fresh if r.transient}
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    with catalog.transaction():
        stored = _mount_rows(catalog, base, kept)
        rows = [_judged(r, by_name) for r in [*fresh, *stored]]
        every = [(loc,) for loc in [*prints, *gone]]  # rows come back below, judged again
        catalog.executemany("DELETE FROM ckptmigrate_mounts WHERE location = ?", every)
        stale = [(str(p),) for p in changed] + [(loc,) for loc in gone]
        catalog.executemany("DELETE FROM ckptmigrate_files WHERE location = ?", stale)
        formats = {r.path: r.format for r in fresh}
        catalog.executemany(
            "INSERT INTO ckptmigrate_files (location, fingerprint, size, format, scanned_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [
                (loc, _recorded_print(prints[loc][0], loc in untrusted), prints[loc][1])
                + (formats.get(loc), now)
                for loc in (str(p) for p in changed)
            ],
        )
        catalog.executemany(
            f"INSERT INTO ckptmigrate_mounts ({_MOUNT_COLUMNS}) VALUES ({_MARKS})",
            [_mount_values(raw, row) for raw, row in zip([*fresh, *stored], rows)],
        )
    rows.sort(key=lambda r: (r.path, r.prefix != "", r.prefix))
    return CatalogScan(rows, read=len(changed), unchanged=len(kept), removed=len(gone))


#: What a file's record holds in place of a fingerprint that proves nothing (a store that
#: tells no ETag or time, a read that failed): never equal to a fingerprint, so read again.
_UNTRUSTED = "read-again"


def _changed(recorded: str | None, now: str | None) -> bool:
    """Whether a checkpoint must be read: new, changed, or with nothing to tell it by."""
    return now is None or recorded != now


def _recorded_print(now: str | None, untrusted: bool) -> str:
    return _UNTRUSTED if now is None or untrusted else now


def _judged(raw: ScanRow, schemas: Mapping[str, Schema]) -> ScanRow:
    """``raw`` (a read's row: its error is the read's) judged against today's ``schemas``."""
    return judge(replace(raw, steps=list(raw.steps)), schemas)


_MOUNT_COLUMNS = (
    "location, prefix, format, schema_name, version, current_version, behind, steps, "
    "history, hparams, meta, tensors, nbytes, read_error, error"
)
_MARKS = ", ".join("?" * len(_MOUNT_COLUMNS.split(", ")))


def _mount_values(raw: ScanRow, row: ScanRow) -> tuple[Any, ...]:
    return (
        raw.path,
        raw.prefix,
        raw.format,
        raw.schema,
        raw.version,
        row.current,
        None if row.behind is None else int(row.behind),
        json.dumps(row.steps),
        json.dumps(raw.history),
        json.dumps(raw.hparams),
        json.dumps(raw.meta),
        raw.tensors,
        raw.nbytes,
        raw.error,
        row.error,
    )


def _row_of(values: Sequence[Any]) -> tuple[ScanRow, ScanRow]:
    """The stored ``(raw, judged)`` rows of one ``ckptmigrate_mounts`` record."""
    loc, prefix, fmt, schema, version, current, behind, steps, history, hparams, meta = values[:11]
    tensors, nbytes, read_error, error = values[11:]
    raw = ScanRow(
        path=loc,
        prefix=prefix,
        format=fmt,
        schema=schema,
        version=version,
        tensors=int(tensors),
        nbytes=int(nbytes),
        error=read_error,
        history=json.loads(history),
        hparams=json.loads(hparams),
        meta=json.loads(meta),
    )
    judged = replace(
        raw,
        current=current,
        behind=None if behind is None else bool(behind),
        steps=json.loads(steps),
        error=error,
    )
    return raw, judged


def _recorded_under(base: Location) -> tuple[str, tuple[Any, ...]]:
    """The WHERE clause (and its parameters) of the records at or under ``base`` (a local
    folder, or a prefix behind a URL: its locations are URLs)."""
    exact = str(base)
    sep = "/" if isinstance(base, RemotePath) else os.sep
    prefix = exact.rstrip(sep) + sep
    return "location = ? OR substr(location, 1, ?) = ?", (exact, len(prefix), prefix)


def _mount_rows(catalog: Catalog, base: Location, locations: Sequence[str]) -> list[ScanRow]:
    """The raw rows recorded for ``locations`` under ``base`` (as a read produced them)."""
    wanted = set(locations)
    where, params = _recorded_under(base)
    every = catalog.execute(
        f"SELECT {_MOUNT_COLUMNS} FROM ckptmigrate_mounts WHERE {where}", params
    )
    return [_row_of(v)[0] for v in every if v[0] in wanted]


def _metric(row: ScanRow, name: str) -> float | None:
    """``row.meta``'s number at the dotted ``name`` (``metrics.val_loss``); None when absent
    or not a finite number."""
    value: Any = row.meta
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if number == number and abs(number) != float("inf") else None


def query(
    catalog: Catalog,
    *,
    schemas: Mapping[str, Schema] | None = None,
    schema: str | None = None,
    version: str | None = None,
    behind: bool | None = None,
    best: str | None = None,
    maximize: bool = False,
) -> list[ScanRow]:
    """The recorded rows that match, in path order: of ``schema``, at ``version``, behind (or
    current, ``behind=False``). ``schemas`` judges them again against today's code (rows of a
    schema it does not hold keep what the scan said). ``best`` keeps the one row whose
    ``meta`` number at that dotted name is smallest (largest with ``maximize``)."""
    if version is not None and schema is None:
        raise UsageError("a version means something only within a schema: pass schema= too")
    rows = []
    for values in catalog.execute(f"SELECT {_MOUNT_COLUMNS} FROM ckptmigrate_mounts"):
        raw, judged = _row_of(values)
        if schemas is not None and raw.schema in schemas:
            judged = _judged(raw, schemas)
        rows.append(judged)
    if schema is not None:
        rows = [r for r in rows if r.schema == schema]
    if version is not None:
        from ..base.version import parse_version

        wanted = parse_version(version)
        rows = [r for r in rows if r.version is not None and _same_version(r.version, wanted)]
    if behind is not None:
        rows = [r for r in rows if r.behind is behind]
    rows.sort(key=lambda r: (r.path, r.prefix != "", r.prefix))
    if best is None:
        return rows
    scored = [(m, r) for r in rows if (m := _metric(r, best)) is not None]
    if not scored:
        return []
    pick = max if maximize else min
    return [pick(scored, key=lambda pair: pair[0])[1]]


def _same_version(text: str, wanted: Any) -> bool:
    from ..base.version import parse_version

    try:
        return parse_version(text) == wanted
    except MigrationGraphError:  # a stamp's version that is not PEP 440
        return False
