"""The checkpoint formats, one object each, and :func:`detect`: the one place a path is sniffed.

A :class:`Format` says whether a path is its own from what one look at it learned (the path's
``stat`` and a file's first bytes), reads the checkpoint's metadata (stubs, no tensor data, no
torch import) or all of it, writes one, and lists the files it takes on disk. The formats are
registered in the order they are asked: the folders first (a DCP folder, a sharded set, a
model folder of one weights file), then the files by their magic bytes.

>>> fmt = detect("model.pth")  # doctest: +SKIP
>>> fmt.name, fmt.read_metadata(Path("model.pth")).layout  # doctest: +SKIP
('torch-zip', 'ckptmigrate')
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from ..base.frozen import FrozenRecord, set_fields
from ..errors import (
    CheckpointFormatError,
    CheckpointWriteError,
    InternalError,
    UnknownFormatError,
)
from ..values.checkpoint import Checkpoint
from .detect import EMPTY_ZIP_MAGIC, INDEX_SUFFIX, TORCH_LEGACY_MAGIC, ZIP_MAGIC, open_regular_file
from .remote import RemotePath, location

__all__ = [
    "DCP_FOLDER",
    "MODEL_FOLDER",
    "REGISTERED",
    "SAFETENSORS",
    "SHARDED_SET",
    "TORCH_LEGACY",
    "TORCH_ZIP",
    "DEFAULT_READ",
    "Format",
    "ReadOptions",
    "detect",
    "format_named",
    "output_format",
    "reader_for",
]

#: How many first bytes of a file :func:`detect` reads for the formats to sniff.
HEAD_BYTES = 64
_LONG1 = 0x8A
_FRAME = 0x95


class ReadOptions(FrozenRecord):
    """How a read loads tensors: onto which device, memory-mapped or not, and the globals a
    pickle may name beyond torch's weights-only set (formats without pickles ignore them)."""

    __slots__ = ("map_location", "mmap", "safe_globals")
    map_location: Any
    mmap: bool
    safe_globals: tuple[Any, ...]

    def __init__(
        self, map_location: Any = "cpu", mmap: bool = False, safe_globals: tuple[Any, ...] = ()
    ) -> None:
        set_fields(self, map_location=map_location, mmap=mmap, safe_globals=safe_globals)


DEFAULT_READ = ReadOptions()


class Format(Protocol):
    """One checkpoint format: how it is told, read and written.

    ``copy_write`` is a writer that copies stored tensor bytes instead of loading them, where
    the format has one (None where it has not).
    """

    name: str
    #: the suffixes an output path names this format by (a new file cannot be sniffed)
    suffixes: tuple[str, ...]
    copy_write: Callable[..., Any] | None

    def sniff(self, path: Path, head: bytes, st: os.stat_result) -> bool:
        """Whether ``path`` (its ``stat`` and, for a file, its first bytes) is this format."""
        ...

    def read_metadata(self, path: Path, *, allowed_globals: Iterable[str] = ()) -> Checkpoint:
        """The checkpoint with metadata stubs for its tensors: no tensor data, no torch."""
        ...

    def read(self, path: Path, options: ReadOptions = DEFAULT_READ) -> Checkpoint:
        """Every tensor of the checkpoint loaded (no migration)."""
        ...

    def write(self, path: Path, ckpt: Checkpoint) -> None:
        """Write ``ckpt`` at ``path`` atomically."""
        ...

    def files(self, path: Path) -> list[Path]:
        """The files the checkpoint at ``path`` takes on disk."""
        ...


def _is_dir(st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode)


class _Format:
    """What most formats share: no suffix of their own, no copying writer, one file on disk,
    and no write of their own (the defaults a format overrides)."""

    name = ""
    suffixes: tuple[str, ...] = ()
    copy_write: Callable[..., Any] | None = None

    def write(self, path: Path, ckpt: Checkpoint) -> None:
        raise CheckpointWriteError(
            f"a {self.name} checkpoint is written by upgrading one (ckptmigrate upgrade), not "
            "saved whole: save this checkpoint as .pth or .safetensors"
        )

    def files(self, path: Path) -> list[Path]:
        return [path]


class _TorchFile(_Format):
    """A ``torch.save`` file: its object graph decoded without torch, its tensors loaded with
    torch's weights-only loader, its parts found by :mod:`ckptmigrate.formats.layout`."""

    name = "torch-zip"

    def sniff(self, path: Path, head: bytes, st: os.stat_result) -> bool:
        return head.startswith(ZIP_MAGIC) or head.startswith(EMPTY_ZIP_MAGIC)

    def read_metadata(self, path: Path, *, allowed_globals: Iterable[str] = ()) -> Checkpoint:
        from .layout import split
        from .torch import read_torch_metadata

        obj = read_torch_metadata(path, allowed_globals=list(allowed_globals), kind=self.name)
        return split(obj, path=path)

    def read(self, path: Path, options: ReadOptions = DEFAULT_READ) -> Checkpoint:
        from .layout import split
        from .torch import read_torch

        obj = read_torch(
            path,
            map_location=options.map_location,
            mmap=options.mmap,
            safe_globals=options.safe_globals,
            kind=self.name,
        )
        return split(obj, path=path)

    def write(self, path: Path, ckpt: Checkpoint) -> None:
        from ..values.stamp import stamp_of
        from .layout import assemble
        from .torch import write_torch

        stamp = stamp_of(ckpt)
        if ckpt.layout == "safetensors":  # a safetensors file's tensors, saved in our layout
            extra = dict(ckpt.extra)
            extra.pop("safetensors_metadata", None)
            ckpt = replace(ckpt, layout="ckptmigrate", extra=extra)
        write_torch(path, assemble(ckpt, stamp))


class _TorchLegacyFile(_TorchFile):
    """A pre-zip ``torch.save`` file (torch < 1.6, or ``_use_new_zipfile_serialization=False``):
    read like a zip one; written as torch writes today, a zip."""

    name = "torch-legacy"

    def sniff(self, path: Path, head: bytes, st: os.stat_result) -> bool:
        """True if ``head`` starts a pickle whose first object is torch's legacy magic number."""
        if len(head) < 2 or head[0] != 0x80:
            return False
        pos = 2
        if head[1] >= 4 and len(head) > pos and head[pos] == _FRAME:
            pos += 9  # FRAME opcode + 8-byte frame length (pickle protocol 4+)
        if len(head) < pos + 2 or head[pos] != _LONG1:
            return False
        size = head[pos + 1]
        raw = head[pos + 2 : pos + 2 + size]
        return len(raw) == size and int.from_bytes(raw, "little", signed=True) == TORCH_LEGACY_MAGIC


class _SafetensorsFile(_Format):
    """A ``.safetensors`` file: tensors, and our stamp, hparams and meta in its header."""

    name = "safetensors"
    suffixes = (".safetensors",)

    def sniff(self, path: Path, head: bytes, st: os.stat_result) -> bool:
        if len(head) < 9:
            return False
        (header_len,) = struct.unpack("<Q", head[:8])
        return 0 < header_len <= st.st_size - 8 and head[8:9] == b"{"

    def read_metadata(self, path: Path, *, allowed_globals: Iterable[str] = ()) -> Checkpoint:
        from .safetensors_file import read_safetensors_metadata, to_checkpoint

        return to_checkpoint(*read_safetensors_metadata(path), path)

    def read(self, path: Path, options: ReadOptions = DEFAULT_READ) -> Checkpoint:
        from .safetensors_file import read_safetensors, to_checkpoint

        return to_checkpoint(*read_safetensors(path, map_location=options.map_location), path)

    def write(self, path: Path, ckpt: Checkpoint) -> None:
        from .safetensors_file import write_checkpoint

        write_checkpoint(path, ckpt)


class _ShardedSet(_Format):
    """A Hugging Face-style sharded set: an index JSON naming its shards, given by its folder
    or by the index file."""

    name = "sharded"

    def sniff(self, path: Path, head: bytes, st: os.stat_result) -> bool:
        if _is_dir(st):
            return any(child.is_file() for child in path.glob("*" + INDEX_SUFFIX))
        return str(path).endswith(INDEX_SUFFIX) and head.lstrip().startswith(b"{")

    def read_metadata(self, path: Path, *, allowed_globals: Iterable[str] = ()) -> Checkpoint:
        from .sharded import read_sharded_metadata

        return read_sharded_metadata(path, allowed_globals=list(allowed_globals))[0]

    def read(self, path: Path, options: ReadOptions = DEFAULT_READ) -> Checkpoint:
        from .sharded import read_sharded

        return read_sharded(path, map_location=options.map_location, mmap=options.mmap)

    def files(self, path: Path) -> list[Path]:
        from .sharded import read_index

        sset = read_index(path)
        return [sset.index_path, *(sset.folder / s for s in sset.shards)]


class _DcpFolder(_Format):
    """A ``torch.distributed.checkpoint`` folder: ``.metadata``, each rank's ``*.distcp`` and
    our stamp file."""

    name = "dcp"

    def sniff(self, path: Path, head: bytes, st: os.stat_result) -> bool:
        return _is_dir(st) and (path / ".metadata").is_file()

    def read_metadata(self, path: Path, *, allowed_globals: Iterable[str] = ()) -> Checkpoint:
        from .dcp import read_dcp_metadata_checkpoint

        return read_dcp_metadata_checkpoint(path)

    def read(self, path: Path, options: ReadOptions = DEFAULT_READ) -> Checkpoint:
        from .dcp import read_dcp

        return read_dcp(path)

    def write(self, path: Path, ckpt: Checkpoint) -> None:
        from .dcp import write_dcp

        write_dcp(path, ckpt)

    def files(self, path: Path) -> list[Path]:
        return [p for p in path.rglob("*") if p.is_file()]


class _ModelFolder(_Format):
    """A ``save_pretrained`` folder of one weights file and no index: read and written as that
    file (:mod:`.model_folder`)."""

    name = "model-folder"

    def sniff(self, path: Path, head: bytes, st: os.stat_result) -> bool:
        from .model_folder import weights_file

        return _is_dir(st) and weights_file(path) is not None

    def read_metadata(self, path: Path, *, allowed_globals: Iterable[str] = ()) -> Checkpoint:
        weights, fmt = reader_for(path)
        return fmt.read_metadata(weights, allowed_globals=allowed_globals)

    def read(self, path: Path, options: ReadOptions = DEFAULT_READ) -> Checkpoint:
        weights, fmt = reader_for(path)
        return fmt.read(weights, options)

    def write(self, path: Path, ckpt: Checkpoint) -> None:
        from .model_folder import weights_file

        weights = weights_file(path)
        if weights is None:  # sniffed as a model folder, so it held one
            raise InternalError(f"{path} holds no weights file to write")
        output_format(weights).write(weights, ckpt)

    def files(self, path: Path) -> list[Path]:
        weights, fmt = reader_for(path)
        return fmt.files(weights)


TORCH_ZIP: Format = _TorchFile()
TORCH_LEGACY: Format = _TorchLegacyFile()
SAFETENSORS: Format = _SafetensorsFile()
SHARDED_SET: Format = _ShardedSet()
DCP_FOLDER: Format = _DcpFolder()
MODEL_FOLDER: Format = _ModelFolder()

#: Every format, in the order :func:`detect` asks them: a set's folder may hold a stray
#: ``model.safetensors`` (the set first), an index file is JSON (before the magic bytes).
REGISTERED: tuple[Format, ...] = (
    DCP_FOLDER,
    SHARDED_SET,
    MODEL_FOLDER,
    TORCH_ZIP,
    TORCH_LEGACY,
    SAFETENSORS,
)


def format_named(name: str) -> Format:
    """The registered format called ``name`` (an :class:`UnknownFormatError` if none is)."""
    for fmt in REGISTERED:
        if fmt.name == name:
            return fmt
    raise UnknownFormatError(f"no format is called {name!r}", found=name)


def detect(path: str | os.PathLike[str]) -> Format:
    """The format of the checkpoint at ``path``: one ``stat``, one read of a file's first
    bytes, then each registered format's :meth:`Format.sniff`, in order.

    Files are told apart by their magic bytes, never by their names (but for a sharded set's
    index, ``*.index.json`` holding a JSON object); folders by what they hold. A path that is
    none of them is an :class:`~ckptmigrate.errors.UnknownFormatError` naming what was found;
    one that cannot be read (missing, empty, a FIFO) a
    :class:`~ckptmigrate.errors.CheckpointFormatError` saying why.

    >>> detect("weights.safetensors").name  # doctest: +SKIP
    'safetensors'
    """
    where = location(path)
    try:
        st: Any = where.stat()
    except (OSError, CheckpointFormatError):
        st = None  # open_regular_file says why, in its own words
    head = b""
    if st is None or not _is_dir(st):
        with open_regular_file(where) as f:
            st = os.fstat(f.fileno()) if isinstance(where, Path) else where.stat()
            if st.st_size == 0:
                raise CheckpointFormatError("is empty (0 bytes), expected a checkpoint", path=path)
            head = f.read(HEAD_BYTES)
    for fmt in REGISTERED:
        if fmt.sniff(where, head, st):
            return fmt
    if _is_dir(st):
        raise UnknownFormatError(
            "is a directory but neither a torch.distributed checkpoint (no .metadata file) nor "
            "a sharded checkpoint (no *.index.json file)",
            found="a directory",
            path=path,
        )
    raise UnknownFormatError(
        f"unknown format (first bytes {head[:8]!r}): expected a torch.save zip or legacy "
        "file, or a safetensors file",
        found=head[:8],
        path=path,
    )


def reader_for(path: str | os.PathLike[str]) -> tuple[Path, Format]:
    """What a read of ``path`` reads: the path and its format, or a model folder's weights
    file and that file's format (each path sniffed once).

    >>> reader_for("llama-7b/")  # doctest: +SKIP
    (PosixPath('llama-7b/model.safetensors'), SAFETENSORS)
    """
    where = location(path)  # one store for a URL: the sniff's reads serve the read after it
    fmt = detect(where)
    if fmt is MODEL_FOLDER:
        from .model_folder import weights_file

        weights = weights_file(where)
        if weights is None:  # sniffed as a model folder, so it held one
            raise InternalError(f"{path} holds no weights file to write")
        return weights, detect(weights)
    return where, fmt  # type: ignore[return-value]


def output_format(path: str | os.PathLike[str]) -> Format:
    """The format to write a new file at ``path`` in: the one its suffix names, else a
    ``torch.save`` zip (a file not written yet has no bytes to sniff)."""
    suffix = path.suffix if isinstance(path, RemotePath) else Path(path).suffix
    for fmt in REGISTERED:
        if suffix in fmt.suffixes:
            return fmt
    return TORCH_ZIP
