"""Rewrite a checkpoint file: upgrade it (to a new file or in place) or stamp it in place.

An in-place rewrite holds the lock beside the file (:mod:`ckptmigrate.lock`) from the first
read to the rename, so it reads, plans and writes a file nobody else is rewriting: when several
processes upgrade one file at once, each step runs once, and the others find the file current
(or fail with a clear error). The old file is kept as a backup first (``model.pth`` ->
``model.pth.1.0.0.bak``, a hard link where possible) unless ``backup=False``; every write is
atomic, so a crash leaves the
old file or the new one, never half of one.

>>> upgrade_in_place("model.pth", schema)            # backup, lock, atomic rename
>>> stamp_in_place("legacy.pth", "tinylm", "1.0.0")
"""

from __future__ import annotations

import filecmp
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import (
    AlreadyStampedError,
    BackupExistsError,
    SchemaMismatchError,
    VersionConflictError,
)
from .formats.atomic import permissions_from
from .lock import DEFAULT_TIMEOUT, file_lock
from .registry import get_schema, pick_schema, schema_table

if TYPE_CHECKING:
    from packaging.version import Version

    from .checkpoint import Checkpoint
    from .schema import Schema

__all__ = [
    "BackupExistsError",
    "UpgradeOutcome",
    "backup_path",
    "stamp_in_place",
    "migrate_file",
    "upgrade_in_place",
]


@dataclass
class UpgradeOutcome:
    """What an upgrade did: the plan, and the files it wrote (none on a dry run)."""

    schema: str
    source_version: str
    target_version: str
    plan: list[dict[str, Any]] = field(default_factory=list)
    written: str | None = None
    backup: str | None = None
    #: the key prefix of the mount this outcome is about ("" for the stamp's root)
    prefix: str = ""
    #: for a file with mounts: one outcome per mount upgraded (each passed to ``on_plan``)
    mounts: list[UpgradeOutcome] = field(default_factory=list)


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
    on_plan: Callable[[UpgradeOutcome], Any] | None = None,
    progress: Callable[..., Any] | None = None,
    lock_timeout: float = DEFAULT_TIMEOUT,
    param_names: Sequence[str] | None = None,
) -> UpgradeOutcome:
    """Read ``src``, plan its upgrade, and write it to ``dst`` (``None``: in place, locked).

    ``schemas`` is a Schema or the discovered table; ``schema`` names the one to use for an
    unstamped file; ``param_names`` names position-keyed optimizer state for the steps that
    need its names (see :func:`ckptmigrate.upgrade`).

    >>> migrate_file("model.pth", "model-v3.pth", schemas=find_schemas(["migrations"]))
    """
    table = schema_table(schemas)
    options: dict[str, Any] = dict(
        name=schema,
        to=to,
        from_version=from_version,
        dry_run=dry_run,
        backup=backup,
        allowed_globals=list(allowed_globals),
        on_plan=on_plan,
        progress=progress,
        param_names=param_names,
    )
    if dst is not None:
        with permissions_from(src):
            return _upgrade(Path(src), Path(dst), table, **options)
    if dry_run:
        return _upgrade(Path(src), None, table, **options)
    target = _in_place_target(src)
    with file_lock(target, timeout=lock_timeout):
        _sweep_killed_writers(target)
        return _upgrade(target, None, table, **options)


def _sweep_killed_writers(target: Path) -> None:
    """Under the lock, before the read: finish or undo what writers that died left half done
    (a folder swap; a set rewrite, as its journal says) and remove their temporaries."""
    from .formats.folder_swap import recover_interrupted_write
    from .formats.set_swap import recover

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
    on_plan: Callable[[UpgradeOutcome], Any] | None = None,
    progress: Callable[..., Any] | None = None,
    lock_timeout: float = DEFAULT_TIMEOUT,
    param_names: Sequence[str] | None = None,
) -> UpgradeOutcome:
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


def _upgrade(
    src: Path,
    dst: Path | None,
    schemas: dict[str, Schema],
    *,
    name: str | None,
    to: Any,
    from_version: Any,
    dry_run: bool,
    backup: bool,
    allowed_globals: list[Any],
    on_plan: Callable[[UpgradeOutcome], Any] | None,
    progress: Callable[..., Any] | None,
    param_names: Sequence[str] | None = None,
) -> UpgradeOutcome:
    from .api import save
    from .files import read_checkpoint
    from .guess import apply_from_version
    from .upgrade import check_belongs, run_plan

    ckpt = read_checkpoint(src, mmap=True, safe_globals=allowed_globals)
    if ckpt.mounts:
        if from_version is not None:
            raise VersionConflictError(ckpt.mounts[0].version, from_version, path=src)
        return _upgrade_mounted(
            ckpt,
            src,
            dst,
            schemas,
            name=name,
            to=to,
            dry_run=dry_run,
            backup=backup,
            on_plan=on_plan,
            allowed_globals=allowed_globals,
            param_names=param_names,
        )
    found = pick_schema(ckpt, schemas, name, path=src)
    newly_stamped = ckpt.version is None and from_version is not None
    ckpt = apply_from_version(ckpt, found, from_version, what="--from-version", path=src)
    if from_version is not None:
        from_version = ckpt.version  # "auto" is guessed once; the writer below gets the version
    version = check_belongs(ckpt, found, path=src)
    plan = found.plan(version, to)
    outcome = UpgradeOutcome(
        schema=found.name,
        source_version=str(version),
        target_version=str(plan[-1].target if plan else version),
        plan=[p.record() for p in plan],
    )
    if on_plan is not None:
        on_plan(outcome)
    in_place = dst is None
    if dry_run or (in_place and not plan and not newly_stamped):
        return outcome
    work = run_plan(ckpt, plan, found, progress=progress, param_names=param_names)
    target = src if dst is None else dst
    if in_place and backup:
        outcome.backup = str(_write_backup(src, version))
    from .streaming import write_streamed

    # rename/drop/hparam plans on big files, sharded sets and DCP folders copy tensor bytes
    streamed = write_streamed(
        src,
        target,
        found,
        to=to,
        from_version=from_version,
        work=work if plan else None,  # nothing to run: a DCP folder only gets its stamp file
        allowed=allowed_globals,
    )
    if not streamed:
        save(target, work)
    outcome.written = str(target)
    return outcome


def _upgrade_mounted(
    ckpt: Checkpoint,
    src: Path,
    dst: Path | None,
    schemas: dict[str, Schema],
    *,
    name: str | None,
    to: Any,
    dry_run: bool,
    backup: bool,
    on_plan: Callable[[UpgradeOutcome], Any] | None,
    allowed_globals: list[Any],
    param_names: Sequence[str] | None = None,
) -> UpgradeOutcome:
    """Upgrade each mount of ``ckpt`` (those of schema ``name`` when given) with its schema.

    ``param_names`` are the optimizer's names: the file's full keys, mount prefixes included.
    The file is written by the writer of its format, as a root-stamped one would be.
    """
    from .api import save
    from .errors import MountError
    from .mounts import all_mounts, mount_plan
    from .streaming import MountedUpgrade, write_streamed

    if name is not None:
        get_schema(name, schemas)  # an unknown name is the first thing wrong
    chosen = [m for m in all_mounts(ckpt) if name is None or m.schema == name]
    if not chosen:
        held = ", ".join(f"{m.schema} at {m.prefix!r}" for m in all_mounts(ckpt))
        raise SchemaMismatchError(str(name), held, path=src)
    if to is not None and len({m.schema for m in chosen}) > 1:
        raise MountError(
            f"--to {to} is one schema's version, but {src} mounts several schemas: pass "
            "--schema S too"
        )
    found = {m.schema: get_schema(m.schema, schemas) for m in chosen}
    outcomes = []
    for m in chosen:
        plan = mount_plan(ckpt, found[m.schema], m.prefix, to)
        outcome = UpgradeOutcome(
            schema=m.schema,
            source_version=str(m.version),
            target_version=str(plan[-1].target if plan else m.version),
            plan=[p.record() for p in plan],
            prefix=m.prefix,
        )
        outcomes.append((m, plan, outcome))
        if on_plan is not None:
            on_plan(outcome)
    total = UpgradeOutcome(
        schema="+".join(o.schema for _, _, o in outcomes),
        source_version="+".join(o.source_version for _, _, o in outcomes),
        target_version="+".join(o.target_version for _, _, o in outcomes),
        plan=[step for _, _, o in outcomes for step in o.plan],
        mounts=[o for _, _, o in outcomes],
    )
    if dry_run or (dst is None and not total.plan):
        return total
    how = MountedUpgrade([(m.prefix, found[m.schema], plan) for m, plan, _ in outcomes])
    how.param_names = param_names
    work = how.run(ckpt)
    if dst is None and backup:
        label = "+".join(f"{m.schema}-{m.version}" for m in all_mounts(ckpt))
        total.backup = str(_write_backup(src, label))
    target = src if dst is None else dst
    # rename/drop/hparam plans copy tensor bytes; sets and DCP folders keep their layout
    streamed = write_streamed(
        src, target, how, work=work if total.plan else None, allowed=allowed_globals
    )
    if not streamed:
        save(target, work)
    total.written = str(target)
    return total


def _write_backup(src: Path, version: object) -> Path:
    """Keep ``src`` beside itself; an identical backup (a rerun after a crash) is kept, a
    different one is an error.

    The backup is a hard link where the file system allows one (else an fsynced copy): an
    in-place write never writes into the old file, it renames a new one over its name (a set
    gets new shards, a folder a new tree), so the old bytes stay as they were under the
    backup's name, and a 100 GB file is backed up in microseconds. A sharded set's backup is
    a folder of its index and the shards it names, nothing else of the folder they lie in.
    """
    from .formats.atomic import atomic_path, fsync_path, remove_stale_temps
    from .formats.detect import INDEX_SUFFIX
    from .formats.sharded import is_index_file

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


def _set_backup(src: Path, version: object) -> tuple[Path, list[Path]]:
    """Where a set's backup goes (``llama.1.0.0.bak`` beside its folder; with other indexes
    in the folder, one per index: ``llama.model.safetensors.1.0.0.bak``) and what it holds."""
    from .formats.detect import INDEX_SUFFIX
    from .formats.sharded import read_index

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

    from .formats import atomic
    from .formats.atomic import fsync_path, temp_path_for

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

    from .formats.atomic import copy_tree_synced, fsync_path, temp_path_for

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
) -> Checkpoint:
    """Give the unstamped file at ``path`` its stamp, in place, keeping its layout.

    Holds the lock beside the file while it reads and writes; a file that is (meanwhile)
    stamped raises :class:`~ckptmigrate.errors.AlreadyStampedError`. ``version`` may be a
    function of the read checkpoint (to guess it). Returns the checkpoint as written.

    >>> stamp_in_place("legacy.pth", "tinylm", "1.0.0")
    >>> stamp_in_place("lightning.ckpt", "net", "1.0.0", prefix="net.")  # a mount at net.
    """
    from .version import parse_version

    given = None if callable(version) else parse_version(version, what="version")
    target = _in_place_target(path)
    with file_lock(target, timeout=lock_timeout):
        _sweep_killed_writers(target)
        ckpt = read_for_stamp(target, safe_globals)
        refuse_restamp(ckpt, prefix, path=path)
        if given is None:
            given = parse_version(version(ckpt), what="version")  # type: ignore[operator]
        ckpt = with_stamp(ckpt, schema, given, prefix)
        write_stamped(target, target, ckpt, safe_globals)
    return ckpt


def refuse_restamp(ckpt: Checkpoint, prefix: str, *, path: object = None) -> None:
    """A stamp (or a mount at ``prefix``) already there is an :class:`AlreadyStampedError`."""
    held = [m for m in ckpt.mounts if m.prefix == prefix]
    if prefix == "" and ckpt.schema is not None:
        raise AlreadyStampedError(ckpt.schema, ckpt.version, path=path)
    if held:
        raise AlreadyStampedError(held[0].schema, held[0].version, path=path, prefix=prefix)


def with_stamp(ckpt: Checkpoint, schema: str, version: Version, prefix: str = "") -> Checkpoint:
    """A copy of ``ckpt`` stamped as ``schema`` ``version`` at the root, or mounted at ``prefix``."""
    from .mounts import mount

    return mount(ckpt, prefix, schema, version)


def read_for_stamp(path: str | os.PathLike[str], safe_globals: Iterable[Any] = ()) -> Checkpoint:
    """What stamping needs: a file whole (it is saved back with its tensors), a sharded set or
    DCP folder by its metadata only (the folder writers copy the tensors as they are)."""
    from .files import read_checkpoint, read_metadata
    from .formats.detect import detect_format
    from .formats.torch import global_name

    if detect_format(path) in ("dcp", "sharded"):
        return read_metadata(path, allowed_globals=[global_name(g) for g in safe_globals])
    return read_checkpoint(path, mmap=True, safe_globals=list(safe_globals))


def write_stamped(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    ckpt: Checkpoint,
    safe_globals: Iterable[Any] = (),
) -> None:
    """Write ``ckpt`` (read from ``src``, now stamped) to ``dst`` in ``src``'s format and layout.

    A file is saved whole, the stamp beside its state_dict. A DCP folder gets
    ``ckptmigrate.json`` (its data files are kept as they are); a sharded set is rewritten the
    way an upgrade writes it (the stamp in the index and every safetensors shard header); a
    model folder's weights file is saved into the folder ``dst`` (or the file it names, or in
    place) with the config and tokenizer files beside it, as an upgrade writes it.
    """
    from .formats.detect import detect_format

    fmt = detect_format(src)
    if fmt == "dcp":
        from .formats.dcp import stamp_dcp

        stamp_dcp(src, dst, ckpt)  # only ckptmigrate.json is new; every rank's file is kept
        return
    if fmt == "sharded":
        from .streaming import MountedUpgrade, write_streamed

        # no steps: the set is rewritten with ckpt's stamp (root fields, mounts), bytes copied
        write_streamed(src, dst, MountedUpgrade(stamp=ckpt), allowed=safe_globals)
        return
    from .api import save

    if Path(src).is_dir():  # a model folder: its weights file, into a folder of its layout
        from .formats.model_folder import write_folder

        write_folder(Path(src), Path(dst), lambda _, target: save(target, ckpt))
        return
    save(dst, ckpt)  # keeps the file's layout; the stamp goes beside it
