"""How a sharded set is rewritten so that a kill at any moment leaves the old set or the new
one, whole, and the next run clears what the killed one left.

A rewrite (an upgrade or a stamp, in place or into a folder) goes:

1. new shard names are chosen **fresh**: never a name that is in the folder, that an index
   there names, or that another rewrite's journal is about to write, so no file the old
   index did not name is overwritten, and no shard of the old set is written into;
2. the journal ``INDEX.ckptmigrate-pending`` is written (atomically): its writer
   (:class:`.atomic.WriterIdentity`), the shards the replaced index names, each with its
   identity as read (device, inode, size, mtime), and the new names;
3. the new shards are written, each atomically, and once each is whole the journal records
   its identity (rewritten atomically);
4. the index is replaced: the commit point;
5. the journal is **settled**: a new shard that no index in the folder names is deleted (the
   commit did not happen) when it is the very file the journal recorded, or, not recorded
   yet, a fresh name written after the journal; and so is an old shard that no index names
   (it did), when it is still the very file that was read; then the journal goes.

Step 5 needs no record of whether the commit happened: what the indexes on disk name decides,
so it is the same after a clean run, an exception, or a SIGKILL (the next run, holding the
lock, calls :func:`recover`, which settles the journals of dead writers and removes their
temporaries). A file no journal lists, or one that any index still names (another set's shard,
a hostile index's pick of a user's file), is never deleted. A later "write only what changed"
keeps an unchanged shard's name in the new index and leaves it out of the journal's new names:
neither direction of step 5 touches it.

>>> swap = SetSwap.replacing(folder, "model.safetensors.index.json", old=sset.identities)
>>> name = swap.fresh_name("model-00001-of-00002.safetensors", digest_of)
>>> swap.start(); write_shard(folder / name); swap.commit(base, weight_map, total, ours)
>>> removed = swap.finish()
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import sharded
from .atomic import (
    TEMP_MARKER,
    atomic_path,
    fsync_path,
    recorded_writer_alive,
    remove_stale_temps_where,
    this_writer,
)
from .bounds import read_json_file
from .detect import INDEX_SUFFIX
from .sharded import PENDING_SUFFIX, file_identity, shard_name, shard_name_problem

__all__ = ["SetSwap", "named_in", "recover"]


def named_in(folder: Path) -> set[str] | None:
    """Every name some index in ``folder`` names, or None when an index there cannot be read
    (then nothing it might name can be told apart, and nothing is deleted)."""
    names: set[str] = set()
    for index in folder.glob("*" + INDEX_SUFFIX):
        try:
            weight_map = read_json_file(index, what="an index")["weight_map"]
            names.update(str(v) for v in weight_map.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
    return names


@dataclass
class SetSwap:
    """One rewrite of the set whose index is ``folder / index_name`` (see the module doc)."""

    folder: Path
    index_name: str
    #: shards the replaced index names (this folder's) -> their identity as read
    old: dict[str, list[int]] = field(default_factory=dict)
    #: names chosen for shards this rewrite writes
    new: list[str] = field(default_factory=list)
    #: new shards written whole -> their identity (what the journal records)
    written: dict[str, list[int]] = field(default_factory=dict)
    _taken: set[str] = field(default_factory=set, repr=False)
    _started: bool = field(default=False, repr=False)

    @classmethod
    def replacing(
        cls, folder: Path, index_name: str, old: dict[str, list[int]] | None = None
    ) -> SetSwap:
        """A rewrite of ``folder / index_name``; ``old``: the shards of the index it replaces
        as read (None: whatever index of that name is there now, if any)."""
        recover(folder)  # what dead writers left here (in place, the caller did it already)
        if old is None:
            old = _shards_of(folder / index_name)
        swap = cls(folder, index_name, dict(old))
        swap._taken = set(os.listdir(folder)) | (named_in(folder) or set()) | _pending_in(folder)
        return swap

    @property
    def journal(self) -> Path:
        return self.folder / (self.index_name + PENDING_SUFFIX)

    def fresh_name(self, old_name: str, digest_of: Any) -> str:
        """A shard name from ``old_name`` and a digest of ``digest_of`` that nothing in the
        folder has, names or is about to write."""
        n = 0
        while True:
            name = shard_name(old_name, digest_of if n == 0 else [digest_of, n])
            if name not in self._taken:
                self._taken.add(name)
                self.new.append(name)
                return name
            n += 1

    def start(self) -> None:
        """Write the journal: from here on, a kill leaves nothing the next run cannot find."""
        self._write_journal()
        self._started = True

    def wrote(self, name: str) -> None:
        """The new shard ``name`` is written whole (flushed, renamed): the journal records
        which file it is, so that the next run deletes that file and no other put under its
        name, should the commit not happen."""
        self.written[name] = file_identity(self.folder / name)
        self._write_journal()

    def _write_journal(self) -> None:
        record = {
            **this_writer().record(),
            "index": self.index_name,
            "old": self.old,
            "new": self.new,
            "written": self.written,
        }
        with atomic_path(self.journal) as tmp:
            tmp.write_text(json.dumps(record, indent=1) + "\n", "utf-8")

    def commit(
        self,
        base: dict[str, Any],
        weight_map: dict[str, str],
        total_size: int,
        ours: dict[str, Any],
    ) -> Path:
        """Replace the index (the commit point); see :func:`.sharded.write_index`."""
        return sharded.write_index(self.folder, self.index_name, base, weight_map, total_size, ours)

    def finish(self) -> list[str]:
        """Settle the journal (after a commit, or after a failure: the indexes decide);
        returns the old shards removed."""
        if not self._started:
            return []
        return _settle(self.folder, self.journal, self.old, self.new, self.written)

    abort = finish


def _shards_of(index: Path) -> dict[str, list[int]]:
    """The plain-named shards an index names, with their identities (none if unreadable)."""
    try:
        weight_map = read_json_file(index, what="an index")["weight_map"]
        names = {str(v) for v in weight_map.values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    out = {}
    for name in sorted(names):
        if shard_name_problem(name) is None:
            with contextlib.suppress(OSError):
                out[name] = file_identity(index.parent / name)
    return out


def _pending_in(folder: Path) -> set[str]:
    """The new names every journal in ``folder`` lists (another rewrite's shards to be)."""
    names: set[str] = set()
    for journal in folder.glob("*" + PENDING_SUFFIX):
        record = _read_journal(journal)
        if record is not None:
            names.update(record["new"])
    return names


_FRESH = re.compile(r"-[0-9a-f]{8}$")  # what sharded.shard_name appends


def _read_journal(journal: Path) -> dict[str, Any] | None:
    try:
        record = read_json_file(journal, what="a set rewrite's journal")
        old = {str(k): [int(x) for x in v] for k, v in dict(record["old"]).items()}
        new = [str(n) for n in record["new"]]
        written = {str(k): [int(x) for x in v] for k, v in dict(record.get("written", {})).items()}
        writer = {"pid": int(record["pid"]), "host": str(record["host"])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError):
        return None
    written = {k: v for k, v in written.items() if k in new}
    writer |= {k: record[k] for k in ("start", "boot") if k in record}
    return {"old": old, "new": new, "written": written, "writer": writer}


def _fresh(name: str) -> bool:
    """A shard name in the form new shards get (``-<8 hex digits>`` before the extension)."""
    return shard_name_problem(name) is None and bool(_FRESH.search(name.partition(".")[0]))


def _written_by(path: Path, journal: Path, begun: int | None) -> bool:
    """Whether ``path``, a new name the journal has not recorded yet, can be the shard its
    rewrite was writing: a fresh name, written after the journal was (a journal planted beside
    a user's files names nothing it may delete)."""
    if not _fresh(path.name) or path.parent / journal.name != journal or begun is None:
        return False
    try:
        return path.stat().st_mtime_ns >= begun
    except OSError:
        return False


def _is_recorded(path: Path, identity: list[int]) -> bool:
    """Whether ``path`` is the very new shard the journal recorded (not a file put there since)."""
    try:
        return _fresh(path.name) and file_identity(path) == identity
    except OSError:
        return False


def _settle(
    folder: Path,
    journal: Path,
    old: dict[str, list[int]],
    new: Iterable[str],
    written: Mapping[str, list[int]],
) -> list[str]:
    named = named_in(folder)
    removed: list[str] = []
    try:
        begun = journal.stat().st_mtime_ns
    except OSError:
        begun = None
    if named is not None:
        for name in new:
            if name in named:
                continue
            path = folder / name
            if name in written:
                ours = _is_recorded(path, written[name])
            else:
                ours = _written_by(path, journal, begun)
            if not ours:
                continue
            with contextlib.suppress(FileNotFoundError):
                (folder / name).unlink()  # written by the rewrite, never committed
        for name, identity in old.items():
            if name in named or shard_name_problem(name) is not None:
                continue
            with contextlib.suppress(OSError):
                if file_identity(folder / name) == identity:  # still the file that was read
                    (folder / name).unlink()
                    removed.append(name)
    with contextlib.suppress(FileNotFoundError):
        journal.unlink()
    with contextlib.suppress(OSError):
        fsync_path(folder)
    return removed


def recover(path: str | os.PathLike[str]) -> list[str]:
    """Settle what dead writers left in a set's folder: their journals (see the module doc)
    and their temporaries of the set's files. Call it holding the set's lock, before reading
    the set; ``path`` is the set's folder or index (anything else: nothing to do). Returns
    the names removed.

    >>> recover("llama/")  # doctest: +SKIP
    ['model-00001-of-00002-3f2a9c1b.safetensors', 'model.safetensors.index.json.ckptmigrate-pending']
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not (path.is_dir() or path.name.endswith(INDEX_SUFFIX)):
        return []
    if not any(folder.glob("*" + PENDING_SUFFIX)) and not any(folder.glob("*" + TEMP_MARKER + "*")):
        return []  # the usual case: nothing was left
    removed: list[str] = []
    for journal in sorted(folder.glob("*" + PENDING_SUFFIX)):
        record = _read_journal(journal)
        if record is None:
            continue  # not one of ours (ours are written atomically, so always whole): kept
        if recorded_writer_alive(record["writer"]):
            continue  # a live writer's (or, journals of old versions, another host's): not ours
        gone = [n for n in record["new"] if (folder / n).exists()]
        removed += _settle(folder, journal, record["old"], record["new"], record["written"])
        removed += [n for n in gone if not (folder / n).exists()]
        removed.append(journal.name)

    # A temporary of a writer that died is never the only copy of anything (the file it was
    # to replace stays until the rename): whatever it was for (a shard, the index, a copied
    # config.json or tokenizer file), it is debris.
    removed += [p.name for p in remove_stale_temps_where(folder, lambda base: True)]
    return removed
