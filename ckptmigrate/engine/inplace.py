"""Rewrite a checkpoint in place: the lock, the sweep of killed writers, the backup.

An in-place rewrite holds the lock beside the file (:mod:`ckptmigrate.formats.lock`) from the first
read to the rename, so it reads, plans and writes a file nobody else is rewriting: when several
processes upgrade one file at once, each step runs once, and the others find the file current
(or fail with a clear error). The old file is kept as a backup first (``model.pth`` ->
``model.pth.1.0.0.bak``, a hard link where possible) unless ``backup=False``; every write is
atomic, so a crash leaves the old file or the new one, never half of one. What is read,
planned and written is :func:`ckptmigrate.engine.rewrite.rewrite`'s, as for any other output.

>>> upgrade_in_place("model.pth", schema)            # backup, lock, atomic rename
>>> stamp_in_place("legacy.pth", "tinylm", "1.0.0")
"""

from __future__ import annotations

import filecmp
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BackupExistsError
from ..formats.lock import DEFAULT_TIMEOUT, file_lock
from ..formats.remote import is_remote, location
from ..formats.torch import with_redirects
from ..schema.schema import redirects_of
from .rewrite import Rewrite, rewrite, stamp_plan, upgrade_plan

if TYPE_CHECKING:
    from packaging.version import Version

    from ..schema.schema import Schema
    from ..values.checkpoint import Checkpoint

__all__ = [
    "BackupExistsError",
    "UpgradeOutcome",
    "backup_path",
    "stamp_in_place",
    "migrate_file",
    "upgrade_in_place",
]


#: The result of an in-place upgrade: the one :class:`~ckptmigrate.rewrite.Rewrite`.
UpgradeOutcome = Rewrite


def backup_path(path: str | os.PathLike[str], version: object) -> Path:
    """Where an in-place upgrade keeps the old file: ``model.pth`` -> ``model.pth.1.0.0.bak``."""
    path = Path(path)
    return path.with_name(f"{path.name}.{version}.bak")


def _in_place_target(path: str | os.PathLike[str]) -> Path:
    # Through a symlink, rewrite the file it names (and lock beside that), not the link.
    return Path(os.path.realpath(path))


def migrate_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None,
    *,
    schemas: Schema | Mapping[str, Schema],
    schema: str | None = None,
    to: str | Version | None = None,
    from_version: str | Version | None = None,
    dry_run: bool = False,
    backup: bool = True,
    allowed_globals: Iterable[Any] = (),
    on_plan: Callable[[Rewrite], Any] | None = None,
    progress: Callable[..., Any] | None = None,
    lock_timeout: float = DEFAULT_TIMEOUT,
    param_names: Sequence[str] | None = None,
) -> Rewrite:
    """Read ``src``, plan its upgrade, and write it to ``dst`` (``None``: in place, locked).

    ``schemas`` is a Schema or the discovered table; ``schema`` names the one to use for an
    unstamped file; ``param_names`` names position-keyed optimizer state for the steps that
    need its names (see :func:`ckptmigrate.upgrade`). A file already at the target is not
    rewritten in place.

    >>> migrate_file("model.pth", "model-v3.pth", schemas=find_schemas(["migrations"]))
    """
    in_place = dst is None and not dry_run
    remote = is_remote(src)
    if remote:
        target: Any = location(src)
    else:
        target = _in_place_target(src) if in_place else Path(src)
    planner = upgrade_plan(
        schemas,
        name=schema,
        to=to,
        from_version=from_version,
        param_names=param_names,
        what="--from-version",
        path=target,
    )
    allowed = with_redirects(allowed_globals, redirects_of(schemas))  # refused before reading
    options: dict[str, Any] = dict(
        safe_globals=allowed, dry_run=dry_run, on_plan=on_plan, progress=progress
    )
    if not in_place:
        return rewrite(target, dst, planner, **options)
    if remote:
        # an object store has no lock beside the object: the backup is a server-side copy,
        # and the new object replaces the old one only once its upload completes
        kept = (lambda plan: _write_object_backup(target, plan.backup_label)) if backup else None
        return rewrite(target, None, planner, before_write=kept, **options)
    kept = (lambda plan: _write_backup(target, plan.backup_label)) if backup else None
    with _locked(target, lock_timeout):
        return rewrite(target, None, planner, before_write=kept, **options)


@contextmanager
def _locked(target: Path, timeout: float) -> Iterator[None]:
    """The lock beside ``target``, held while it is rewritten, and nothing half done by a
    writer that died before."""
    with file_lock(target, timeout=timeout):
        _sweep_killed_writers(target)
        yield


def _sweep_killed_writers(target: Path) -> None:
    """Under the lock, before the read: finish or undo what writers that died left half done
    (a folder swap; a set rewrite, as its journal says) and remove their temporaries."""
    from ..formats.folder_swap import recover_interrupted_write
    from ..formats.set_swap import recover

    recover_interrupted_write(target)
    recover(target)


def upgrade_in_place(
    path: str | os.PathLike[str],
    schema: Schema | Mapping[str, Schema],
    *,
    to: str | Version | None = None,
    from_version: str | Version | None = None,
    backup: bool = True,
    dry_run: bool = False,
    safe_globals: Iterable[Any] = (),
    schema_name: str | None = None,
    on_plan: Callable[[Rewrite], Any] | None = None,
    progress: Callable[..., Any] | None = None,
    lock_timeout: float = DEFAULT_TIMEOUT,
    param_names: Sequence[str] | None = None,
) -> Rewrite:
    """Upgrade the file at ``path`` in place: lock, re-read, plan, back up, write atomically.

    ``param_names`` (the old parameter names in the optimizer's order) names position-keyed
    optimizer state for steps that split, merge or drop parameters.

    A file already at the target is left alone (``outcome.plan == []``, nothing written).
    Waits up to ``lock_timeout`` seconds for another process rewriting the same file, then
    raises :class:`~ckptmigrate.errors.LockTimeoutError`.

    >>> outcome = upgrade_in_place("model.pth", schema)
    >>> outcome.backup
    'model.pth.1.0.0.bak'
    """
    return migrate_file(
        path,
        None,
        schemas=schema,
        schema=schema_name,
        to=to,
        from_version=from_version,
        dry_run=dry_run,
        backup=backup,
        allowed_globals=safe_globals,
        on_plan=on_plan,
        progress=progress,
        lock_timeout=lock_timeout,
        param_names=param_names,
    )


def _write_backup(src: Path, version: object) -> Path:
    """Keep ``src`` beside itself; an identical backup (a rerun after a crash) is kept, a
    different one is an error.

    The backup is a hard link where the file system allows one (else an fsynced copy): an
    in-place write never writes into the old file, it renames a new one over its name (a set
    gets new shards, a folder a new tree), so the old bytes stay as they were under the
    backup's name, and a 100 GB file is backed up in microseconds. A sharded set's backup is
    a folder of its index and the shards it names, nothing else of the folder they lie in.
    """
    from ..formats.atomic import atomic_path, fsync_path, remove_stale_temps
    from ..formats.detect import INDEX_SUFFIX
    from ..formats.sharded import is_index_file

    files = None
    if is_index_file(src) or (src.is_dir() and any(src.glob("*" + INDEX_SUFFIX))):
        kept, files = _set_backup(src, version)
    else:
        kept = backup_path(src, version)
    remove_stale_temps(kept)  # a half-copied backup of a killed run
    if kept.is_symlink():  # "identical" through the link today, the new version tomorrow
        raise BackupExistsError(kept, link=True)
    if kept.exists():
        if files is not None and _holds_copies(kept, files):
            return kept
        if files is None and _same_contents(kept, src):
            return kept
        raise BackupExistsError(kept)
    if files is not None:  # a set: its own files, linked into a folder renamed into place
        _copy_files_atomically(files, kept)
        return kept
    if src.is_dir():  # a DCP folder: copy the tree, then rename it into place
        _copy_tree_atomically(src, kept)
        return kept
    try:
        os.link(src, kept)  # appears whole or not at all
    except OSError:  # no hard links here (another device, FAT, a policy): copy
        import shutil

        with atomic_path(kept) as tmp:
            shutil.copyfile(src, tmp)
    else:
        fsync_path(kept.parent)
    return kept


def _write_object_backup(src: Any, version: object) -> Any:
    """Keep the object ``src`` beside itself (``model.pth.1.0.0.bak``) as a server-side copy;
    an identical backup (a rerun) is kept, a different one is an error."""
    from ..formats.remote import RemotePath
    from ..formats.sink import copy_object, same_object_bytes

    kept = RemotePath(src.store, f"{src.key}.{version}.bak")
    if kept.exists():
        if same_object_bytes(kept, src):
            return kept
        raise BackupExistsError(kept)
    copy_object(src, kept)
    return kept


def _set_backup(src: Path, version: object) -> tuple[Path, list[Path]]:
    """Where a set's backup goes (``llama.1.0.0.bak`` beside its folder; with other indexes
    in the folder, one per index: ``llama.model.safetensors.1.0.0.bak``) and what it holds."""
    from ..formats.detect import INDEX_SUFFIX
    from ..formats.sharded import read_index

    sset = read_index(src)
    files = [sset.index_path, *(sset.folder / s for s in sset.shards)]
    label = str(version)
    if len(list(sset.folder.glob("*" + INDEX_SUFFIX))) > 1:
        label = f"{sset.index_path.name[: -len(INDEX_SUFFIX)]}.{version}"
    return backup_path(sset.folder, label), files


def _holds_copies(kept: Path, files: list[Path]) -> bool:
    if not kept.is_dir() or sorted(p.name for p in kept.iterdir()) != sorted(f.name for f in files):
        return False
    return all(_same_contents(kept / f.name, f) for f in files)


def _copy_files_atomically(files: list[Path], dst: Path) -> None:
    import shutil

    from ..formats import atomic
    from ..formats.atomic import fsync_path, temp_path_for

    tmp = temp_path_for(dst)
    try:
        tmp.mkdir()
        for f in files:
            _link_or_copy(str(f), str(tmp / f.name))
            fsync_path(tmp / f.name)
        fsync_path(tmp)
        atomic.crash_point("replace")
        os.replace(tmp, dst)
        atomic.crash_point("replaced")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(dst.parent)


def _link_or_copy(src: str, dst: str) -> None:
    """A backup file: a hard link (the original is only ever renamed over), else a copy."""
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _same_contents(a: Path, b: Path) -> bool:
    if a.is_file() and b.is_file():
        return filecmp.cmp(a, b, shallow=False)
    if not (a.is_dir() and b.is_dir()):
        return False
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all(_same_contents(a / n, b / n) for n in names)


def _copy_tree_atomically(src: Path, dst: Path) -> None:
    import shutil

    from ..formats.atomic import copy_tree_synced, fsync_path, temp_path_for

    tmp = temp_path_for(dst)
    try:
        copy_tree_synced(src, tmp, _link_or_copy)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(dst.parent)


def stamp_in_place(
    path: str | os.PathLike[str],
    schema: str,
    version: str | Version | Callable[[Checkpoint], Any],
    *,
    safe_globals: Iterable[Any] = (),
    lock_timeout: float = DEFAULT_TIMEOUT,
    prefix: str = "",
) -> Rewrite:
    """Give the unstamped file at ``path`` its stamp, in place, keeping its format and layout.

    Holds the lock beside the file while it reads and writes; a file that is (meanwhile)
    stamped raises :class:`~ckptmigrate.errors.AlreadyStampedError`. ``version`` may be a
    function of the read checkpoint (to guess it). Returns what was written (``.layout``,
    ``.target_version``): an upgrade of no steps that writes a new stamp.

    >>> stamp_in_place("legacy.pth", "tinylm", "1.0.0")
    >>> stamp_in_place("lightning.ckpt", "net", "1.0.0", prefix="net.")  # a mount at net.
    """
    planner = stamp_plan(schema, version, prefix=prefix, path=path)
    if is_remote(path):  # no lock beside an object: its ETag guards the replacement
        return rewrite(location(path), None, planner, safe_globals=safe_globals)
    target = _in_place_target(path)
    with _locked(target, lock_timeout):
        return rewrite(target, None, planner, safe_globals=safe_globals)
