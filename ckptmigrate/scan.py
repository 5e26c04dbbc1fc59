"""Scan a tree of checkpoints (a model registry): schema, version and what each one is behind.

Metadata only (stamps, keys and shapes from headers and pickles, never tensor data), in
parallel across files. A sharded set or a DCP folder counts as one checkpoint.

>>> rows = scan("registry/", schemas)
>>> [r.path for r in rows if r.behind]
['registry/old/model.pth']
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import CkptMigrateError, PathNotFoundError
from .schema import Schema

__all__ = ["CHECKPOINT_SUFFIXES", "ScanRow", "find_checkpoints", "judge", "read_row", "scan"]

#: File names that :func:`scan` treats as checkpoints.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


@dataclass
class ScanRow:
    """One checkpoint found by :func:`scan`; ``error`` says why the rest may be missing."""

    path: str
    format: str | None = None
    schema: str | None = None
    version: str | None = None
    current: str | None = None
    behind: bool | None = None  # None: unknown (no stamp, unknown schema, unreadable)
    steps: list[str] = field(default_factory=list)
    tensors: int = 0
    nbytes: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def find_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Every checkpoint under ``root``, sorted; a DCP or sharded folder is one entry.

    A ``root`` that does not exist raises :class:`PathNotFoundError`: a typo is not an empty
    registry.
    """
    root = Path(root)
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


def read_row(path: str | os.PathLike[str], allowed_globals: Iterable[str] = ()) -> ScanRow:
    """The metadata half of a row (format, stamp, tensors, bytes): no schema needed, torch-free,
    so a worker process can compute it. ``allowed_globals`` lets trusted classes through."""
    from .files import read_metadata
    from .formats.detect import detect_format

    row = ScanRow(str(path))
    path = Path(path)
    try:
        row.format = detect_format(path)
        ckpt = read_metadata(path, allowed_globals=list(allowed_globals))
        unique = {id(v): v for v in ckpt.state_dict.values() if hasattr(v, "info")}
        row.tensors = len(ckpt.state_dict)
        row.nbytes = sum(v.info.nbytes for v in unique.values())
        row.schema = ckpt.schema
        row.version = str(ckpt.version) if ckpt.version is not None else None
    except CkptMigrateError as exc:
        row.error = str(exc)
    except OSError as exc:
        row.error = f"cannot read it: {exc}"
    return row


def judge(row: ScanRow, schemas: Mapping[str, Schema]) -> ScanRow:
    """The schema half: current version, behind or not, the steps that would run."""
    from .version import parse_version

    if row.error is not None:
        return row
    if row.schema is None or row.version is None:
        row.error = "no ckptmigrate stamp"
        return row
    schema = schemas.get(row.schema)
    if schema is None:
        row.error = f"schema {row.schema!r} is not among the discovered schemas"
        return row
    try:
        version = parse_version(row.version)
        row.current = str(schema.current)
        row.behind = version < schema.current
        row.steps = [p.name for p in schema.plan(version)] if row.behind else []
    except CkptMigrateError as exc:
        row.error = str(exc)
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
    in path order; a file that cannot be read gets a row with ``error`` set.

    Threads (the default) overlap waiting on slow storage (a network file system); decoding
    headers is CPU work that one interpreter runs one thread at a time, so on local disks
    ``processes=True`` reads with ``workers`` processes (default: one per CPU) and is faster
    for many files; ``processes=None`` picks them for 64 files or more on a multi-core
    machine. Worker processes start by spawning, so a script that calls it needs the usual
    ``if __name__ == "__main__":`` guard (the CLI has one). ``allowed_globals``
    (``"module.Name"``) lets trusted pickled classes through the safe reader.

    >>> rows = scan("registry/", [schema], workers=8)
    """
    by_name = schemas if isinstance(schemas, Mapping) else {s.name: s for s in schemas}
    paths = find_checkpoints(root)
    cpus = os.cpu_count() or 1
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
        pool = ThreadPoolExecutor(max_workers=workers or min(32, cpus * 4))
        chunk = 1
    rows: list[ScanRow] = []
    read = functools.partial(read_row, allowed_globals=tuple(allowed_globals))
    with pool:
        for done, row in enumerate(pool.map(read, paths, chunksize=chunk), 1):
            rows.append(judge(row, by_name))
            if progress is not None:
                progress(done, len(paths))
    return rows
