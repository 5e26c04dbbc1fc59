"""Scan a tree of checkpoints (a model registry): schema, version and what each one is behind.

Metadata only (stamps, keys and shapes from headers and pickles, never tensor data), in
parallel across files. A sharded set or a DCP folder counts as one checkpoint; a checkpoint
with mounts gets one row per mount (``prefix``), each judged against its own schema.

>>> rows = scan("registry/", schemas)
>>> [r.path for r in rows if r.behind]
['registry/old/model.pth']
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CkptMigrateError, PathNotFoundError
from ..schema.schema import Schema

if TYPE_CHECKING:
    from ..formats.layout import Layout

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "REMOTE_WORKERS",
    "ScanRow",
    "find_checkpoints",
    "json_values",
    "judge",
    "read_rows",
    "scan",
    "scan_paths",
]

#: File names that :func:`scan` treats as checkpoints.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
#: Threads that read objects behind a URL at once, unless ``workers`` says otherwise: the
#: reads wait on the network, not on the CPUs.
REMOTE_WORKERS = 16
#: Protocols whose listing of a prefix also answers for an object at it (S3's LIST, with a
#: HEAD only when it lists nothing), so a scan of a prefix there is one paginated listing.
_LISTED_FIRST = ("s3", "s3a")


@dataclass
class ScanRow:
    """One checkpoint (or one mount of it, at ``prefix``) found by :func:`scan`; ``error`` says
    why the rest may be missing. ``tensors`` and ``nbytes`` count the mount's own keys."""

    path: str
    prefix: str = ""
    format: str | None = None
    schema: str | None = None
    version: str | None = None
    current: str | None = None
    behind: bool | None = None  # None: unknown (no stamp, unknown schema, unreadable)
    steps: list[str] = field(default_factory=list)
    tensors: int = 0
    nbytes: int = 0
    error: str | None = None
    #: the mount's history (steps applied, oldest first), its hparams and the file's meta
    #: (metrics, dataset...), as JSON values (what else a file held is shown as text)
    history: list[dict[str, Any]] = field(default_factory=list)
    hparams: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    #: the read failed for a reason outside the checkpoint's bytes (its store failed or
    #: timed out, the OS refused): a catalog does not trust the row and reads it again next
    #: time (not in :meth:`to_dict`)
    transient: bool = field(default=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        values = asdict(self)
        del values["transient"]
        return values


def find_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Every checkpoint under ``root``, sorted; a DCP or sharded folder is one entry.

    A ``root`` that does not exist raises :class:`PathNotFoundError`: a typo is not an empty
    registry.
    """
    from ..formats.remote import RemotePath, location

    where = location(root)
    if isinstance(where, RemotePath):
        return _find_remote(where)  # type: ignore[return-value]
    root = Path(where)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise PathNotFoundError(root, "checkpoint folder", "an existing folder or file to scan")
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        if ".metadata" in files or any(f.endswith(".index.json") for f in files):
            found.append(here)
            dirs[:] = []  # its shards are part of it
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(here / f for f in files if f.endswith(CHECKPOINT_SUFFIXES))
    return sorted(found)


def _find_remote(root: Any) -> list[Any]:
    """The checkpoints under the URL ``root`` (one listing of every object under it; a folder
    holding ``.metadata`` or an index is one checkpoint; hidden folders are skipped, as
    locally). Each is a path of ``root``'s store, which keeps what the listing said of it
    (size, ETag, modification time)."""
    listed = root.store.protocol in _LISTED_FIRST
    objects = [o for o in root.rglob("*") if o.key != root.key] if listed else []
    if not objects:
        if root.is_file():
            return [root]
        if not root.is_dir():
            raise PathNotFoundError(
                root, "checkpoint folder", "an existing folder or object to scan"
            )
        if not listed:
            objects = list(root.rglob("*"))

    def hidden(o: Any) -> bool:
        folders = o.key[len(root.key) :].strip("/").split("/")[:-1]
        return any(part.startswith(".") for part in folders)

    objects = [o for o in objects if not hidden(o)]
    folders = {o.parent for o in objects if o.name == ".metadata" or o.name.endswith(".index.json")}

    def inside(o: Any) -> bool:
        return any(o.key.startswith(f.key + "/") for f in folders)

    found = [f for f in folders if not inside(f)]
    found += [o for o in objects if o.name.endswith(CHECKPOINT_SUFFIXES) and not inside(o)]
    return sorted(found)


def read_rows(
    path: str | os.PathLike[str],
    allowed_globals: Iterable[str] = (),
    layouts: Sequence[Layout] = (),
) -> list[ScanRow]:
    """The metadata half of a file's rows (format, stamp, tensors, bytes), one per mount (one
    row without mounts): no schema needed, torch-free, so a worker process can compute it.
    ``allowed_globals`` lets trusted classes through; ``layouts`` are declared first (a worker
    process has none of the layouts its parent's migrations declared)."""
    from ..base.readable import path_text
    from ..engine.mounts import all_mounts, owner_of
    from ..errors import RemoteStorageError
    from ..formats.layout import declare_layout
    from ..formats.registry import reader_for
    from ..formats.remote import location
    from ..io.files import read_metadata

    for layout in layouts:
        declare_layout(layout)
    row = ScanRow(path_text(path))
    path = location(path)
    try:
        target, fmt = reader_for(path)
        row.format = fmt.name
        ckpt = read_metadata(target, allowed_globals=list(allowed_globals), fmt=fmt)
    except RemoteStorageError as exc:
        row.error, row.transient = str(exc), True
        return [row]
    except CkptMigrateError as exc:
        row.error = str(exc)
        return [row]
    except OSError as exc:
        row.error, row.transient = f"cannot read it: {exc}", True
        return [row]
    row.meta = json_values(ckpt.meta)
    mounts = all_mounts(ckpt) if ckpt.mounts else []
    if not mounts:
        row.schema = ckpt.schema
        row.version = str(ckpt.version) if ckpt.version is not None else None
        row.history = json_values(list(ckpt.history))
        row.hparams = json_values(ckpt.hparams)
        _count(row, ckpt.state_dict.values())
        return [row]
    owner = owner_of(ckpt)
    rows = []
    for m in mounts:
        mine = [v for k, v in ckpt.state_dict.items() if owner(k) == m.prefix]
        own = ckpt.hparams.get(m.hparams) if m.hparams is not None else ckpt.hparams
        mount_row = replace(
            row,
            prefix=m.prefix,
            schema=m.schema,
            version=str(m.version),
            history=json_values(list(m.history)),
            hparams=json_values(own if isinstance(own, Mapping) else {}),
        )
        _count(mount_row, mine)
        rows.append(mount_row)
    return rows


#: Containers in a stored value open at most this deep; deeper ones are shown as text.
_JSON_DEPTH = 16


def json_values(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON values: dicts (str keys), lists, str, finite numbers, bools, None;
    anything else (a tensor stub, a class, a NaN) as its bounded text, containers past
    :data:`_JSON_DEPTH` too.

    >>> json_values({"lr": 1e-3, "betas": (0.9, 0.99), "act": torch.nn.GELU})
    {'lr': 0.001, 'betas': [0.9, 0.99], 'act': "<class 'torch.nn...GELU'>"}
    """
    import math

    from ..base.readable import bounded_repr

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if abs(value) < 1 << 63 else bounded_repr(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if depth < _JSON_DEPTH and isinstance(value, Mapping):
        return {str(k): json_values(v, depth + 1) for k, v in value.items()}
    if depth < _JSON_DEPTH and isinstance(value, (list, tuple)):
        return [json_values(v, depth + 1) for v in value]
    return bounded_repr(value)


def _count(row: ScanRow, values: Iterable[Any]) -> None:
    values = list(values)
    unique = {id(v): v for v in values if hasattr(v, "info")}
    row.tensors = len(values)
    row.nbytes = sum(v.info.nbytes for v in unique.values())


def judge(row: ScanRow, schemas: Mapping[str, Schema]) -> ScanRow:
    """The schema half: current version, behind or not, the steps that would run (the same
    answer as ``info``'s, from :func:`~ckptmigrate.schema.registry.schema_status`)."""
    from ..schema.registry import schema_status

    if row.error is not None:
        return row
    if row.schema is None or row.version is None:
        row.error = "no ckptmigrate stamp"
        return row
    status = schema_status(row.schema, row.version, schemas)
    row.current = None if status.current is None else str(status.current)
    row.behind = status.behind
    row.steps = [p.name for p in status.plan or []]
    if status.error is not None:
        row.error = str(status.error)
    return row


def scan(
    root: str | os.PathLike[str],
    schemas: Mapping[str, Schema] | Iterable[Schema] = (),
    *,
    workers: int | None = None,
    processes: bool | None = False,
    progress: Callable[[int, int], None] | None = None,
    allowed_globals: Iterable[str] = (),
) -> list[ScanRow]:
    """Scan every checkpoint under ``root`` against ``schemas`` (by name), in parallel.

    Reads metadata only. ``progress(done, total)`` is called as files finish. Rows come back
    in path order, a file with mounts as one row per mount (root first, then by the stamp's
    order); a file that cannot be read gets a row with ``error`` set.

    Threads (the default) overlap waiting on slow storage (a network file system); decoding
    headers is CPU work that one interpreter runs one thread at a time, so on local disks
    ``processes=True`` reads with ``workers`` processes (default: one per CPU) and is faster
    for many files; ``processes=None`` picks them for 64 files or more on a multi-core
    machine. Objects behind a URL are read by threads, :data:`REMOTE_WORKERS` at once
    unless ``workers`` says otherwise. Worker processes start by spawning, so a script that calls it needs the usual
    ``if __name__ == "__main__":`` guard (the CLI has one). ``allowed_globals``
    (``"module.Name"``) lets trusted pickled classes through the safe reader.

    >>> rows = scan("registry/", [schema], workers=8)
    """
    return scan_paths(
        find_checkpoints(root),
        schemas,
        workers=workers,
        processes=processes,
        progress=progress,
        allowed_globals=allowed_globals,
    )


def scan_paths(
    paths: Sequence[Path],
    schemas: Mapping[str, Schema] | Iterable[Schema] = (),
    *,
    workers: int | None = None,
    processes: bool | None = False,
    progress: Callable[[int, int], None] | None = None,
    allowed_globals: Iterable[str] = (),
    judged: bool = True,
) -> list[ScanRow]:
    """:func:`scan` of the checkpoints ``paths`` names (as :func:`find_checkpoints` finds
    them), in that order; ``judged=False`` leaves the schema half (:func:`judge`) undone."""
    from ..formats.remote import RemotePath

    by_name = schemas if isinstance(schemas, Mapping) else {s.name: s for s in schemas}
    cpus = os.cpu_count() or 1
    remote = any(isinstance(p, RemotePath) for p in paths)
    if remote:
        processes = False  # objects behind a URL: threads overlap the requests' waits
        # each read keeps its own blocks: concurrent reads would evict each other's
        paths = [p.for_one_read() if isinstance(p, RemotePath) else p for p in paths]
    if processes is None:
        processes = len(paths) >= 64 and cpus > 1 and workers != 1
    pool: Executor
    if processes:
        import multiprocessing

        workers = workers or cpus
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
        chunk = max(1, len(paths) // (workers * 8))
    else:
        pool = ThreadPoolExecutor(
            max_workers=workers or (REMOTE_WORKERS if remote else min(32, cpus * 4))
        )
        chunk = 1
    from ..formats.layout import declared_layouts

    rows: list[ScanRow] = []
    read = functools.partial(
        read_rows, allowed_globals=tuple(allowed_globals), layouts=tuple(declared_layouts())
    )
    with pool:
        for done, file_rows in enumerate(pool.map(read, paths, chunksize=chunk), 1):
            rows.extend(judge(row, by_name) if judged else row for row in file_rows)
            if progress is not None:
                progress(done, len(paths))
    return rows
