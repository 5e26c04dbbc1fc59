"""One DCP tensor at a time: read from its chunks in the rank files, or written as DCP does.

DCP's ``FileSystemWriter`` stores each tensor chunk as a ``torch.save`` archive of that chunk
at ``storage_data``'s (file, offset, length), keyed by ``MetadataIndex(fqn, offsets, index)``;
``state_dict_metadata[fqn].chunks`` says where each chunk lies in the whole tensor (a tensor
sharded across ranks has one chunk a rank). :func:`read_dcp_tensor` reads the chunks of one
tensor and assembles it, so no other tensor is read; :func:`save_dcp_chunk` appends a tensor
to a rank file the way DCP's writer does, so DCP's own loader (and ours) reads it back.

Each archive's pickle passes the decode budget (:func:`~.torch.check_torch_bytes`) before
``torch.load(weights_only=True)`` reads it from a view of its byte range (no copy of the file
in memory); a chunk whose shape or dtype is not what ``.metadata`` declares is refused.

>>> w = read_dcp_tensor("ckpt/step-100", md, "model.fc.weight")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..errors import CheckpointFormatError, CheckpointWriteError, NotReplayableError
from ..values.checkpoint import Checkpoint
from ..values.tensorinfo import DTYPE_SIZES, SAFETENSORS_DTYPES, TensorStub
from .detect import open_regular_file
from .torch import check_torch_bytes

if TYPE_CHECKING:
    import torch

    from .safetensors_copy import Part

__all__ = [
    "MAX_SHARD_BYTES",
    "NewTensor",
    "read_dcp_tensor",
    "read_item_bytes",
    "save_dcp_chunk",
    "write_dcp_safetensors",
    "write_dcp_sharded",
]


@dataclass
class NewTensor:
    """A tensor a rewrite writes anew: its shape and dtype (for headers written first), and
    how to compute its values when its turn comes (one tensor in memory at a time)."""

    shape: tuple[int, ...]
    dtype: str  # a torch dtype's name: "float32"
    compute: Callable[[], torch.Tensor]


class _ByteRange(io.RawIOBase):
    """A read-only, seekable view of ``length`` bytes of ``file`` from ``start``."""

    def __init__(self, file: BinaryIO, start: int, length: int) -> None:
        super().__init__()
        self._file, self._start, self._length, self._pos = file, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = max(0, min(len(view), self._length - self._pos))
        if not want:
            return 0
        self._file.seek(self._start + self._pos)  # the file is ours alone: no race
        got = self._file.readinto(view[:want]) or 0
        self._pos += got
        return got


def _chunk_infos(md: Any, fqn: str) -> list[tuple[Any, Any]]:
    """Each chunk of ``fqn``: its ``ChunkStorageMetadata`` and its storage record."""
    entry = md.state_dict_metadata[fqn]
    found = {}
    for index, info in md.storage_data.items():
        if index.fqn == fqn:
            found[tuple(index.offset or ())] = info
    out = []
    for chunk in entry.chunks:
        info = found.get(tuple(chunk.offsets))
        if info is None:
            raise CheckpointFormatError(
                f"DCP entry {fqn!r} has a chunk at {tuple(chunk.offsets)} that storage_data "
                "does not place in any file"
            )
        out.append((chunk, info))
    return out


def read_item_bytes(
    file: BinaryIO, info: Any, limit: int, what: str, rule: str, path: object
) -> BinaryIO:
    """The bytes DCP stored for one item at ``info`` (its ``_StorageInfo``) in ``file``: a
    view of the byte range, or, where DCP wrote it through transforms (zstd), the bytes those
    give back, in memory and never more than ``limit`` of them (``rule`` says why, for the
    :class:`~ckptmigrate.errors.BudgetExceededError`)."""
    view = _ByteRange(file, info.offset, info.length)
    descriptors = getattr(info, "transform_descriptors", None)
    if not descriptors:
        return view
    from torch.distributed.checkpoint.filesystem import _StorageReaderTransforms

    from .dcp import InflateBound

    try:  # DCP's own extensions (ZStandard needs zstandard or pyzstd)
        stream = _StorageReaderTransforms().transform_load_stream(None, descriptors, view)
    except Exception as exc:
        raise NotReplayableError(f"{what} is stored through {descriptors} ({exc})") from None
    inflated = what + f" in {info.relative_path}, inflated by {', '.join(descriptors)}"
    return io.BytesIO(InflateBound(stream, limit, inflated, rule, path).read())


def _read_chunk(folder: Path, info: Any, what: str, nbytes: int) -> torch.Tensor:
    """One chunk of ``nbytes`` declared bytes, read weights-only once its pickle fits."""
    import torch

    from .dcp import CHUNK_FRAMING_ALLOWANCE

    with open_regular_file(folder / info.relative_path) as f:
        limit = nbytes + CHUNK_FRAMING_ALLOWANCE
        rule = f"its declared {nbytes} bytes plus {CHUNK_FRAMING_ALLOWANCE >> 20} MiB"
        view = read_item_bytes(f, info, limit, what, rule, folder)
        check_torch_bytes(view, what=what, path=folder / info.relative_path)
        try:
            loaded = torch.load(view, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointFormatError(
                f"{what} could not be read ({type(exc).__name__}: {exc})",
                path=folder / info.relative_path,
            ) from None
    if not isinstance(loaded, torch.Tensor):
        raise CheckpointFormatError(
            f"{what} holds a {type(loaded).__name__}, not a tensor", path=folder
        )
    return loaded


def read_dcp_tensor(folder: str | os.PathLike[str], md: Any, fqn: str) -> torch.Tensor:
    """The tensor ``fqn`` of the DCP folder whose decoded ``.metadata`` is ``md``, assembled
    from its chunks (one chunk: that chunk itself), reading nothing else."""
    import torch

    folder = Path(folder)
    entry = md.state_dict_metadata[fqn]
    shape = tuple(entry.size)
    dtype = entry.properties.dtype
    parts = _chunk_infos(md, fqn)
    out: torch.Tensor | None = None
    for i, (chunk, info) in enumerate(parts):
        what = f"chunk {i} of DCP entry {fqn!r}"
        nbytes = dtype.itemsize * math.prod(chunk.sizes)
        part = _read_chunk(folder, info, what, nbytes)
        if tuple(part.shape) != tuple(chunk.sizes) or part.dtype != dtype:
            raise CheckpointFormatError(
                f"{what} is a {part.dtype} tensor of shape {tuple(part.shape)}, but .metadata "
                f"declares {dtype} of shape {tuple(chunk.sizes)}",
                path=folder / info.relative_path,
            )
        if len(parts) == 1 and tuple(chunk.sizes) == shape:
            return part
        if out is None:
            out = torch.zeros(shape, dtype=dtype)
        view = out
        for dim, (start, size) in enumerate(zip(chunk.offsets, chunk.sizes)):
            view = view.narrow(dim, start, size)
        view.copy_(part)
        del part
    if out is None:  # a tensor with no chunks: nothing stored (numel 0)
        out = torch.zeros(shape, dtype=dtype)
    return out


def save_dcp_chunk(file: BinaryIO, tensor: torch.Tensor) -> tuple[int, int]:
    """Append ``tensor`` to the rank file ``file`` as DCP's writer stores a chunk (a
    ``torch.save`` archive of exactly its elements); returns its (offset, length)."""
    tensor = tensor.detach().cpu()
    if (
        not tensor.is_contiguous()
        or tensor.storage_offset()
        or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()
    ):
        tensor = tensor.contiguous().clone()  # torch.save writes a view's whole storage
    import torch

    offset = file.tell()
    torch.save(tensor, file)
    return offset, file.tell() - offset


#: The largest shard a DCP folder written as a sharded safetensors set gets (what
#: transformers' ``save_pretrained`` defaults to, ``max_shard_size="5GB"``).
MAX_SHARD_BYTES = 5 * 10**9


def _parts(src: Path, md: Any, new: Checkpoint) -> list[tuple[str, Part]]:
    """Each tensor of ``new`` (stubs of the DCP folder ``src``, or :class:`NewTensor`) as a
    safetensors part whose bytes are made when written: read from its chunks, or computed."""
    from .safetensors_copy import Part

    parts: list[tuple[str, Part]] = []
    made: dict[int, Part] = {}  # one part a tensor: tied names are stored once
    for key, leaf in new.state_dict.items():
        if isinstance(leaf, NewTensor):
            produce = leaf.compute
        elif isinstance(leaf, TensorStub) and leaf.info.storage_key in md.state_dict_metadata:
            produce = functools.partial(read_dcp_tensor, src, md, leaf.info.storage_key)
        else:
            raise CheckpointWriteError(
                f"safetensors holds tensors only, but {key!r} is a {type(leaf).__name__}: "
                "write this checkpoint as a DCP folder or a .pth instead"
            )
        if id(leaf) not in made:
            shape, dtype = tuple(leaf.shape), str(leaf.dtype)
            if dtype not in SAFETENSORS_DTYPES.values():
                raise CheckpointWriteError(f"safetensors has no dtype {dtype} (for {key!r})")
            nbytes = DTYPE_SIZES[dtype]
            for d in shape:
                nbytes *= d
            made[id(leaf)] = Part(
                dtype, shape, nbytes, produce=_as_bytes(key, shape, dtype, produce)
            )
        parts.append((key, made[id(leaf)]))
    return parts


def _as_bytes(
    key: str, shape: tuple[int, ...], dtype: str, produce: Callable[[], torch.Tensor]
) -> Callable[[], memoryview]:
    """``produce()``'s tensor as its bytes, once it is checked to be what the header says."""

    def made() -> memoryview:
        import torch

        tensor = produce()
        if tuple(tensor.shape) != shape or str(tensor.dtype) != f"torch.{dtype}":
            raise CheckpointWriteError(
                f"{key!r} came out {tensor.dtype} of shape {tuple(tensor.shape)}, but the "
                f"header says {dtype} of shape {shape}"
            )
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        return memoryview(flat.numpy())  # holds the tensor until written

    return made


def _header(new: Checkpoint) -> dict[str, str]:
    from .safetensors_file import checkpoint_header

    header = checkpoint_header(dataclasses.replace(new, state_dict={}, layout="ckptmigrate"))
    header.setdefault("format", "pt")  # as save_pretrained writes it: transformers checks it
    return header


def write_dcp_safetensors(
    src: str | os.PathLike[str], new: Checkpoint, dst: str | os.PathLike[str]
) -> int:
    """Write ``new`` (read from the DCP folder ``src``: its stubs kept as stored, its
    :class:`NewTensor` computed) as the safetensors file ``dst``, tensor by tensor: the
    header first, then each tensor read from its chunks (or computed) and written, one in
    memory at a time. Returns the data bytes written.

    >>> write_dcp_safetensors("ckpt/step-100", stubs, "model.safetensors")  # doctest: +SKIP
    """
    from .dcp import read_dcp_metadata
    from .safetensors_copy import write_safetensors_parts

    src = Path(src)
    md = read_dcp_metadata(src, torch_classes=True)
    return write_safetensors_parts(dst, _parts(src, md, new), _header(new))[1]


def write_dcp_sharded(
    src: str | os.PathLike[str],
    new: Checkpoint,
    index: str | os.PathLike[str],
    max_shard_bytes: int | None = None,
) -> tuple[int, list[str]]:
    """Write ``new`` (as for :func:`write_dcp_safetensors`) as a sharded safetensors set
    whose index is ``index`` (``out/model.safetensors.index.json``): shards of at most
    ``max_shard_bytes`` (default :data:`MAX_SHARD_BYTES`; a larger tensor alone in its
    shard) named after the index (``model-00001-of-00002-<digest>.safetensors``), each
    streamed tensor by tensor, the
    index written last (:class:`~.set_swap.SetSwap`: a kill leaves the old index, if any,
    whole). Returns the data bytes written and the old shards removed.
    """
    from ..values.stamp import stamp_of
    from .dcp import read_dcp_metadata
    from .detect import INDEX_SUFFIX
    from .safetensors_copy import write_safetensors_parts
    from .set_swap import SetSwap
    from .sharded import SetOutput, group_by_size, index_metadata

    src, index = Path(src), Path(index)
    md = read_dcp_metadata(src, torch_classes=True)
    parts, header = _parts(src, md, new), _header(new)
    limit = MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    # a tied name's part joins its first name's shard: stored once, as an alias
    groups = group_by_size(parts, lambda entry: entry[1].nbytes, limit, lambda e: id(e[1]))
    stem = index.name[: -len(INDEX_SUFFIX)].removesuffix(".safetensors") or "model"
    out = SetOutput(index.parent, index.name, stem)
    out.folder.mkdir(parents=True, exist_ok=True)
    swap = SetSwap.replacing(out.folder, out.index_name)
    names = [
        swap.fresh_name(
            out.shard(i, len(groups), "safetensors"),
            [str(new.version), [(key, list(part.shape)) for key, part in group]],
        )
        for i, group in enumerate(groups, 1)
    ]
    weight_map: dict[str, str] = {}
    total = 0
    try:
        swap.start()
        for name, group in zip(names, groups):
            total += write_safetensors_parts(out.folder / name, group, header)[1]
            swap.wrote(name)
            weight_map.update((key, name) for key, _ in group)
        weight_map = {key: weight_map[key] for key, _ in parts}  # the keys' order, ties too
        swap.commit({}, weight_map, total, index_metadata(new, stamp_of(new)))
    except BaseException:
        swap.abort()
        raise
    return total, swap.finish()
