"""Hugging Face-style sharded checkpoints: an index JSON naming the shard of every tensor.

A set is ``model.safetensors.index.json`` (or ``pytorch_model.bin.index.json``) plus the
shards its ``weight_map`` names, read as one logical checkpoint. Our stamp, hparams and meta
live in the index's ``metadata`` as the JSON objects ``ckptmigrate.stamp``,
``ckptmigrate.hparams`` and ``ckptmigrate.meta`` (and, for safetensors, in every shard's header
too, so a shard alone still says what it is). The index is the commit point: new shards are
written under fresh names first, the index replaces the old one atomically, and only then are
old shards that no index names any more removed (:mod:`.set_swap` keeps the journal that lets
the next run finish or undo a killed one).

>>> ckpt = read_sharded_metadata("llama-7b/")  # doctest: +SKIP
>>> len(ckpt.state_dict), ckpt.version
(291, <Version('2.0.0')>)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..errors import CheckpointFormatError, CheckpointWriteError, OutputOccupiedError
from ..values.checkpoint import Checkpoint
from ..values.tensorinfo import TensorStub
from .atomic import TEMP_MARKER, atomic_path
from .bounds import read_json_file
from .detect import INDEX_SUFFIX
from .layout import from_parts
from .remote import location
from .safetensors_copy import data_start

__all__ = [
    "INDEX_SUFFIX",
    "SetOutput",
    "ShardedSet",
    "find_index",
    "group_by_size",
    "is_index_file",
    "output_for",
    "read_index",
    "read_sharded",
    "read_sharded_metadata",
    "shard_name",
    "unchanged_shard",
    "write_index",
]

STAMP = "ckptmigrate.stamp"
HPARAMS = "ckptmigrate.hparams"
META = "ckptmigrate.meta"
_T = TypeVar("_T")
_DIGEST = re.compile(r"-[0-9a-f]{8}$")
#: The journal of a set rewrite under way, beside its index (see :mod:`.set_swap`).
PENDING_SUFFIX = ".ckptmigrate-pending"
#: Parts of the names of files ckptmigrate keeps beside a set (never shards); the lock's
#: suffix is spelled here because formats do not import :mod:`ckptmigrate.formats.lock`.
_OURS = (TEMP_MARKER, ".ckptmigrate.lock", PENDING_SUFFIX)


@dataclass
class ShardedSet:
    """A parsed index: where it lies, its raw JSON, and which shard holds each key."""

    index_path: Path
    index: dict[str, Any]
    weight_map: dict[str, str]
    kind: str  # "safetensors" or "bin"
    sources: dict[int, tuple[Path, int]] = field(default_factory=dict)  # id(stub) -> bytes
    #: each shard's (device, inode, size, mtime) as read: only that file is ever deleted
    identities: dict[str, list[int]] = field(default_factory=dict)
    graphs: dict[str, Any] = field(default_factory=dict)  # .bin shard -> its ZipGraph
    headers: dict[str, dict[str, str]] = field(default_factory=dict)  # other tools' entries
    #: .bin shard -> the dict it holds, decoded (stubs): what tells a shard left unchanged
    contents: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.index_path.parent

    @property
    def shards(self) -> list[str]:
        """Shard file names in the order the weight map first names them."""
        return list(dict.fromkeys(self.weight_map.values()))

    @property
    def shared_header(self) -> dict[str, str]:
        """Other tools' header entries every shard carries alike (HF's ``format: pt``), for
        shards written anew when tensors move between them."""
        first, *others = [self.headers.get(s, {}) for s in self.shards] or [{}]
        return {k: v for k, v in first.items() if all(h.get(k) == v for h in others)}


@dataclass(frozen=True)
class SetOutput:
    """Where a set's rewrite goes: its folder, its index, and how its shards are named (each
    then given a fresh digest by :class:`~.set_swap.SetSwap`). Made by :func:`output_for`."""

    folder: Path
    index_name: str
    #: set when ``-o`` named the index: the new shards are named after it
    stem: str | None = None

    def shard(self, i: int, n: int, kind: str, like: str | None = None) -> str:
        """The name of the ``i``-th of ``n`` new shards: ``like`` (the old shard's name) unless
        the index was named, else ``STEM-0000i-of-0000n.EXT``."""
        if self.stem is None and like is not None:
            return like
        ext = ".safetensors" if kind == "safetensors" else ".bin"
        stem = self.stem or ("model" if kind == "safetensors" else "pytorch_model")
        return f"{stem}-{i:05d}-of-{n:05d}{ext}"


def output_for(sset: ShardedSet, dst: str | os.PathLike[str]) -> SetOutput:
    """Where writing ``sset`` to ``dst`` puts it, every name derived here.

    ``dst`` naming the set itself (its folder or index): in place. ``dst`` ending in
    ``.index.json``: that index, its shards beside it named after it
    (``v2.safetensors.index.json`` -> ``v2-00001-of-00002-<digest>.safetensors``), so they are
    told apart from the shards of another set in that folder. Anything else is a folder
    (created if missing) that gets the index and shards under the set's own names. A file at
    ``dst`` that is not an index is refused (:class:`~ckptmigrate.errors.OutputOccupiedError`).

    >>> output_for(sset, "out/v2.safetensors.index.json")  # doctest: +SKIP
    SetOutput(folder=PosixPath('out'), index_name='v2.safetensors.index.json', stem='v2')
    """
    dst = Path(dst)
    if dst.is_dir():
        return SetOutput(dst, sset.index_path.name)
    if dst.name.endswith(INDEX_SUFFIX):
        if dst.exists() and os.path.samefile(dst, sset.index_path):
            return SetOutput(sset.folder, sset.index_path.name)
        stem = dst.name[: -len(INDEX_SUFFIX)].removesuffix(".safetensors").removesuffix(".bin")
        return SetOutput(dst.parent if str(dst.parent) else Path("."), dst.name, stem or "model")
    if os.path.lexists(dst):
        raise OutputOccupiedError(dst, [], "a sharded set's folder")
    return SetOutput(dst, sset.index_path.name)


def check_output(sset: ShardedSet, out: SetOutput) -> None:
    """Refuse, before anything is written, an output whose index name is not a plain file's,
    or that holds a file under a companion's name that is not that companion's copy."""
    from .model_folder import check_side_files

    index = out.folder / out.index_name
    if os.path.lexists(index) and (index.is_symlink() or not index.is_file()):
        raise OutputOccupiedError(out.folder, [out.index_name], "a sharded set")
    check_side_files(sset.folder, _own_files(sset), out.folder, "a sharded set")


def is_index_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a sharded set's index JSON file."""
    return str(path).endswith(INDEX_SUFFIX) and location(path).is_file()


def find_index(path: str | os.PathLike[str]) -> Path:
    """The index JSON of a set given by its folder or by the index file itself."""
    path = location(path)  # type: ignore[assignment]
    if not path.is_dir():
        return path
    found = sorted(path.glob("*" + INDEX_SUFFIX))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise CheckpointFormatError(
            f"expected exactly one *{INDEX_SUFFIX} file in the folder, found {names}: pass the "
            "index file itself",
            path=path,
        )
    return found[0]


def read_index(path: str | os.PathLike[str]) -> ShardedSet:
    """Parse and check a sharded set's index (shards must exist beside it)."""
    index_path = find_index(path)
    index = read_json_file(index_path, what="the index JSON")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointFormatError("the index has no weight_map of key -> shard", path=index_path)
    identities = {}
    for shard in dict.fromkeys(weight_map.values()):
        problem = shard_name_problem(shard)
        if problem:
            raise CheckpointFormatError(f"shard name {shard!r} {problem}", path=index_path)
        if not (index_path.parent / shard).is_file():
            raise CheckpointFormatError(f"shard {shard!r} is missing", path=index_path)
        identities[shard] = file_identity(index_path.parent / shard)
    kinds = {"safetensors" if s.endswith(".safetensors") else "bin" for s in weight_map.values()}
    if len(kinds) > 1:
        raise CheckpointFormatError("the index mixes safetensors and .bin shards", path=index_path)
    kind = kinds.pop() if kinds else "safetensors"
    return ShardedSet(index_path, index, dict(weight_map), kind, identities=identities)


def shard_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a shard of a set (None if it can): a shard is a plain file of
    the index's own folder, and none of the files ckptmigrate keeps beside a set."""
    if name in ("", ".", "..") or any(c in name for c in ("/", "\\", "\0")):
        return "leaves the folder (a shard is a plain file name beside the index)"
    if name.endswith(INDEX_SUFFIX) or any(m in name for m in _OURS):
        return "names an index or a ckptmigrate lock, journal or temporary file, not a shard"
    return None


def file_identity(path: Path) -> list[int]:
    """What tells the file at ``path`` from another one put under its name since."""
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def _checkpoint(sset: ShardedSet, tensors: dict[str, Any]) -> Checkpoint:
    """The set as one checkpoint: its tensors, and our stamp, hparams and meta from the index."""
    metadata = sset.index.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CheckpointFormatError("the index's metadata is not an object", path=sset.index_path)

    def parts() -> dict[str, Any]:
        found: dict[str, Any] = {}
        for slot, key in (("hparams", HPARAMS), ("meta", META)):
            value = metadata.get(key) or {}
            if not isinstance(value, dict):
                raise CheckpointFormatError(
                    f"index entry {key!r} is not an object", path=sset.index_path
                )
            found[slot] = dict(value)
        return found

    return from_parts(
        tensors, layout="sharded", stamp=metadata.get(STAMP), parts=parts, path=sset.index_path
    )


def _ordered(sset: ShardedSet, tensors: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in sset.weight_map if k not in tensors]
    if missing:
        raise CheckpointFormatError(
            f"the index names {missing[0]!r}, which its shard {sset.weight_map[missing[0]]!r} "
            "does not hold",
            path=sset.index_path,
        )
    return {k: tensors[k] for k in sset.weight_map}


def read_sharded_metadata(
    path: str | os.PathLike[str], *, allowed_globals: Any = ()
) -> tuple[Checkpoint, ShardedSet]:
    """The set as one Checkpoint of stubs (no tensor data read) and its parsed index.

    ``sset.sources`` maps each safetensors stub to its bytes, for copying them later.
    """
    sset = read_index(path)
    tensors: dict[str, Any] = {}
    for shard in sset.shards:
        shard_path = sset.folder / shard
        if sset.kind == "safetensors":
            from .safetensors_file import tied_aliases
            from .safetensors_header import read_safetensors_header

            infos, metadata = read_safetensors_header(shard_path)
            start = data_start(shard_path)
            sset.headers[shard] = {
                k: v for k, v in metadata.items() if not k.startswith("ckptmigrate.")
            }
            for key, info in infos.items():
                stub = TensorStub(info)
                tensors[key] = stub
                sset.sources[id(stub)] = (shard_path, start + (info.data_offsets or (0, 0))[0])
            for alias, src in tied_aliases(metadata, infos, path=shard_path).items():
                tensors[alias] = tensors[src]
        else:
            from .registry import TORCH_ZIP, detect
            from .torch import read_torch_metadata, read_zip_graph

            names = list(allowed_globals)
            kind = detect(shard_path)
            if kind is TORCH_ZIP:
                # decoded with rebuild recipes, so an upgrade can copy its storages later
                sset.graphs[shard] = read_zip_graph(shard_path, allowed_globals=names)
                obj = sset.graphs[shard].obj
            else:
                obj = read_torch_metadata(shard_path, allowed_globals=names, kind=kind.name)
            if not isinstance(obj, dict):
                raise CheckpointFormatError("a .bin shard must hold a dict", path=shard_path)
            sset.contents[shard] = obj
            tensors.update(obj)
    return _checkpoint(sset, _ordered(sset, tensors)), sset


def read_sharded(
    path: str | os.PathLike[str], *, map_location: Any = "cpu", mmap: bool = False
) -> Checkpoint:
    """Load every tensor of a sharded set into one Checkpoint (no migration)."""
    sset = read_index(path)
    tensors: dict[str, Any] = {}
    for shard in sset.shards:
        shard_path = sset.folder / shard
        if sset.kind == "safetensors":
            from .safetensors_file import read_safetensors

            tensors.update(read_safetensors(shard_path, map_location=map_location)[0])
        else:
            from .torch import read_torch

            tensors.update(read_torch(shard_path, map_location=map_location, mmap=mmap))
    return _checkpoint(sset, _ordered(sset, tensors))


def unchanged_shard(
    sset: ShardedSet, shard: str, entries: dict[str, Any], originals: dict[str, Any]
) -> bool:
    """Whether the .bin ``shard`` would be written back holding exactly what it holds:
    ``entries`` has its keys, in its order, each with the very object ``originals`` (the
    set's stubs, or its tensors as loaded) had under that key; then it is copied whole."""
    held = sset.contents.get(shard)
    if held is None or list(held) != list(entries):
        return False
    return all(k in originals and entries[k] is originals[k] for k in held)


def group_by_size(
    items: Iterable[_T],
    size_of: Callable[[_T], int],
    limit: int,
    held_as: Callable[[_T], Hashable] | None = None,
) -> list[list[_T]]:
    """``items`` in order, cut into groups of at most ``limit`` bytes (an item larger than
    ``limit`` alone in its group): the shards a set is written as. Never no group.
    ``held_as``: what a shard stores an item as; an item held as an earlier one (a tied
    weight's second key) joins that one's group, its bytes not counted again, so a tie is
    never cut apart into two stored copies.

    >>> group_by_size([3, 3, 5], lambda n: n, 6)
    [[3, 3], [5]]
    """
    groups: list[list[_T]] = [[]]
    size = 0
    holding: dict[Hashable, list[_T]] = {}
    for item in items:
        held = held_as(item) if held_as is not None else None
        if held is not None and held in holding:
            holding[held].append(item)
            continue
        nbytes = size_of(item)
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += nbytes
        if held is not None:
            holding[held] = groups[-1]
    return groups


def shard_name(old: str, digest_of: Any) -> str:
    """A new shard name: the old one with a content digest, so the old set stays intact.

    >>> shard_name("model-00001-of-00002.safetensors", ["2.0.0", ["w"]])  # doctest: +SKIP
    'model-00001-of-00002-3f2a9c1b.safetensors'
    """
    stem, dot, ext = old.partition(".")
    digest = hashlib.sha256(json.dumps(digest_of, sort_keys=True).encode()).hexdigest()[:8]
    return f"{_DIGEST.sub('', stem)}-{digest}{dot}{ext}"


def index_metadata(ckpt: Checkpoint, stamp: dict[str, Any] | None) -> dict[str, Any]:
    """Our entries for the index's ``metadata`` object."""
    out: dict[str, Any] = {}
    if stamp is not None:
        out[STAMP] = stamp
    if stamp is not None or ckpt.hparams:
        out[HPARAMS] = ckpt.hparams
    if stamp is not None or ckpt.meta:
        out[META] = ckpt.meta
    return out


def write_index(
    folder: Path,
    name: str,
    base: dict[str, Any],
    weight_map: dict[str, str],
    total_size: int,
    ours: dict[str, Any],
) -> Path:
    """Write the index atomically (the commit point of a set); keeps other tools' entries."""
    index = {k: v for k, v in base.items() if k not in ("metadata", "weight_map")}
    metadata = {
        k: v for k, v in (base.get("metadata") or {}).items() if not k.startswith("ckptmigrate.")
    }
    metadata["total_size"] = total_size
    metadata.update(ours)
    try:
        json.dumps(ours)
    except (TypeError, ValueError) as exc:
        raise CheckpointWriteError(
            f"hparams and meta must be JSON-serialisable in an index ({exc})"
        ) from None
    index = {"metadata": metadata, **index, "weight_map": weight_map}
    target = folder / name
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(index, indent=2) + "\n", "utf-8")
    return target


def companion_files(sset: ShardedSet) -> list[Path]:
    """The files beside a set that make it a model folder (``config.json``, generation and
    tokenizer files...): :func:`~.model_folder.side_files`, less any other set in the folder."""
    from .model_folder import side_files

    return side_files(sset.folder, _own_files(sset))


def _own_files(sset: ShardedSet) -> set[str]:
    """The set's index and shards, and those of any other set in its folder."""
    skip = {sset.index_path.name, *sset.weight_map.values()}
    for other in sset.folder.glob("*" + INDEX_SUFFIX):
        skip.add(other.name)
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            skip.update(read_json_file(other, what="an index")["weight_map"].values())
    return skip


def copy_companions(sset: ShardedSet, folder: Path) -> list[Path]:
    """Copy :func:`companion_files` into ``folder`` (atomically each), unless it is the set's
    own folder, so that ``from_pretrained(folder)`` finds its config and tokenizer."""
    from .model_folder import copy_side_files

    return copy_side_files(sset.folder, _own_files(sset), folder)
