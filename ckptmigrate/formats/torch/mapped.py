"""A CPU load rebuilt from our decoded graph, skipping torch's Python unpickler.

A zip file whose pickle holds only what ``torch.save(state_dict)`` writes (dicts, lists,
tuples, plain values and tensors rebuilt by ``torch._utils._rebuild_tensor_v2`` /
``_rebuild_parameter``) has been decoded and checked by our reader already, so each tensor is
rebuilt from it with those same torch functions, over the storages ``torch.load`` makes: slices
of one mapping of the file (``mmap=True``), or each record read by torch's own zip reader.
The pickle is decoded once, not once by our reader and again by torch's. Anything else goes
through ``torch.load`` (:func:`.load.read_torch`).

>>> done, obj = load_mapped(Path("model.pth"), "cpu")  # doctest: +SKIP
>>> done, obj = load_mapped(Path("model.pth"), "cpu", mmap=False)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...values.tensorinfo import TensorStub
from ..detect import open_regular_file
from .allowlist import allowed_map
from .archive import ZipDecoded, decode_zip
from .guards import GuardedCall
from .metadata import read_torch_metadata
from .read_errors import reading
from .storages import STORAGE_DTYPES, StorageRef
from .zip_directory import ZIP_STORED, local_header_end

_V2 = "torch._utils._rebuild_tensor_v2"
_PARAMETER = "torch._utils._rebuild_parameter"
#: The globals a mapped load rebuilds itself; any other sends the file through torch.load.
MAPPED_GLOBALS = frozenset(
    {"collections.OrderedDict", _V2, _PARAMETER, "torch.storage.UntypedStorage"}
    | {f"torch.{name}" for name in STORAGE_DTYPES if not name.startswith("Q")}
)
_ATOMS = (str, int, float, bool, type(None))
_MAX_FORMAT_VERSION = 3  # the archive format torch.save writes (``<archive>/version``)


class _NotMapped(Exception):
    """The graph holds something only torch.load should rebuild."""


def load_mapped(path: Path, map_location: Any, *, mmap: bool = True) -> tuple[bool, Any]:
    """``(True, obj)``: what ``torch.load(path, mmap=mmap, weights_only=True)`` returns, built
    from our decoded graph; ``(False, None)``: the file needs torch.load itself.

    Raises what :func:`read_torch_metadata` raises for an unsafe or corrupt file.
    """
    import torch

    if not _mapped_setting(torch, map_location):
        read_torch_metadata(path)
        return False, None
    recipes: dict[int, tuple[str, tuple[Any, ...], TensorStub]] = {}
    refs: list[StorageRef] = []
    allowed = allowed_map(())
    for name in (_V2, _PARAMETER):
        allowed[name] = GuardedCall(_recording(name, allowed[name], recipes), name)
    decoded = reading(path, lambda: decode_zip(path, allowed, lambda ref, pid: refs.append(ref)))
    if not _mappable(decoded):
        return False, None
    with open_regular_file(path) as f:
        offsets = _storage_offsets(f, decoded)
        if offsets is None or not _archive_checks(f, decoded):
            return False, None
        size = os.fstat(f.fileno()).st_size
    try:
        if mmap:
            storages = _map_storages(torch, path, size, refs, offsets)
        else:
            storages = _read_storages(torch, path, refs, decoded.prefix)
        return True, _Rebuild(torch, recipes, storages).value(decoded.obj)
    except (_NotMapped, RecursionError):
        return False, None
    except (RuntimeError, TypeError, ValueError, OverflowError, AssertionError):
        # torch's rebuild refused what our stubs let through (an int tensor that requires
        # grad, a negative stride...): torch.load reports it the usual way
        return False, None


def _mapped_setting(torch: Any, map_location: Any) -> bool:
    """Only a plain CPU load outside fake-tensor and skip-data modes is rebuilt here."""
    if isinstance(map_location, torch.device):
        map_location = str(map_location)
    if not isinstance(map_location, str) or map_location != "cpu":
        return False
    if sys.byteorder != "little" or torch._guards.detect_fake_mode(None) is not None:
        return False
    return not getattr(torch.serialization._serialization_tls, "skip_data", False)


def _recording(
    name: str, build: Callable[..., Any], recipes: dict[int, tuple[str, tuple[Any, ...], Any]]
) -> Callable[..., Any]:
    def rebuild(*args: Any) -> Any:
        stub = build(*args)  # checks the arguments against the storage, as the reader does
        if name == _V2:
            # torch gets the size and stride as they were checked: the pickle may APPEND to a
            # memoised list after this call (torch.load builds the tensor now, so never sees it)
            args = (*args[:2], tuple(args[2]), tuple(args[3]), *args[4:])
        recipes[id(stub)] = (name, args, stub)  # the stub stays alive, so its id stays unique
        return stub

    return rebuild


def _mappable(decoded: ZipDecoded) -> bool:
    scan = decoded.scan
    if scan.outside_torch or scan.protocol not in (None, 2):  # torch warns on other protocols
        return False
    if not set(scan.globals) <= MAPPED_GLOBALS:
        return False
    # torch reads the archive named by its first member, and refuses TorchScript archives
    first = decoded.infos[0].filename if decoded.infos else ""
    names = {info.filename for info in decoded.infos}
    return first.startswith(decoded.prefix) and decoded.prefix + "constants.pkl" not in names


def _storage_offsets(f: Any, decoded: ZipDecoded) -> dict[str, int] | None:
    """Where each storage record's bytes start; None when one is not stored plainly."""
    data = decoded.prefix + "data/"
    offsets: dict[str, int] = {}
    for info in decoded.infos:
        if not info.filename.startswith(data):
            continue
        if info.compress_type != ZIP_STORED or info.flag_bits & 1:
            return None
        offset = local_header_end(f, info)
        if offset is None:
            return None
        offsets[info.filename] = offset
    return offsets


def _read_record(f: Any, decoded: ZipDecoded, name: str) -> bytes | None:
    for info in decoded.infos:
        if info.filename == decoded.prefix + name and info.compress_type == ZIP_STORED:
            offset = local_header_end(f, info)
            if offset is None:
                return None
            f.seek(offset)
            return f.read(min(info.file_size, 64))
    return None


def _archive_checks(f: Any, decoded: ZipDecoded) -> bool:
    """The records torch.load looks at besides the pickle say what this build handles."""
    version = _read_record(f, decoded, ".data/version") or _read_record(f, decoded, "version")
    text = version.strip() if version is not None else b""
    if not text.isdigit() or not 1 <= int(text) <= _MAX_FORMAT_VERSION:
        return False
    has_byteorder = any(i.filename == decoded.prefix + "byteorder" for i in decoded.infos)
    if has_byteorder:
        return _read_record(f, decoded, "byteorder") == b"little"
    # no record (torch < 2.1 wrote none): torch.load follows set_default_load_endianness
    import torch.serialization as ts

    return ts.get_default_load_endianness() in (None, ts.LoadEndianness.LITTLE)


def _map_storages(
    torch: Any, path: Path, size: int, refs: list[StorageRef], offsets: dict[str, int]
) -> dict[int, Any]:
    """The typed storage for each reference, sliced from one mapping as torch.load does."""
    from torch.serialization import MAP_SHARED, default_restore_location

    shared = torch.serialization.get_default_mmap_options() == MAP_SHARED
    whole = torch.UntypedStorage.from_file(os.fspath(path), shared, size)
    loaded: dict[str, Any] = {}
    storages: dict[int, Any] = {}
    for ref in refs:
        typed = loaded.get(ref.key)
        if typed is None:
            dtype = getattr(torch, ref.dtype)
            nbytes = ref.numel * torch._utils._element_size(dtype)
            start = offsets.get(ref.key)
            if start is None or start + nbytes > size:
                raise _NotMapped(ref.key)
            storage = default_restore_location(whole[start : start + nbytes], "cpu")
            typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
            if typed._data_ptr() != 0:
                loaded[ref.key] = typed
        storages[id(ref)] = typed
    return storages


def _read_storages(torch: Any, path: Path, refs: list[StorageRef], prefix: str) -> dict[int, Any]:
    """The typed storage for each reference, each record read into memory by torch's zip
    reader as torch.load reads it (``get_storage_from_record``)."""
    from torch.serialization import default_restore_location

    reader = torch._C.PyTorchFileReader(os.fspath(path))
    data = prefix + "data/"
    loaded: dict[str, Any] = {}
    storages: dict[int, Any] = {}
    for ref in refs:
        typed = loaded.get(ref.key)
        if typed is None:
            if not ref.key.startswith(data):
                raise _NotMapped(ref.key)
            dtype = getattr(torch, ref.dtype)
            nbytes = ref.numel * torch._utils._element_size(dtype)
            record = "data/" + ref.key[len(data) :]  # the reader names records inside the archive
            storage = reader.get_storage_from_record(record, nbytes, torch.UntypedStorage)
            storage = default_restore_location(storage._typed_storage()._untyped_storage, "cpu")
            typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
            if typed._data_ptr() != 0:
                loaded[ref.key] = typed
        storages[id(ref)] = typed
    return storages


class _Rebuild:
    """Replaces every stub in a decoded graph by its tensor, in place; tuples are rebuilt."""

    def __init__(
        self,
        torch: Any,
        recipes: dict[int, tuple[str, tuple[Any, ...], Any]],
        storages: dict[int, Any],
    ) -> None:
        self.torch = torch
        self.recipes = recipes
        self.storages = storages
        self.done: dict[int, Any] = {}  # id(original) -> its replacement
        self.keep: list[Any] = []  # originals stay alive while their ids are keys

    def value(self, obj: Any) -> Any:
        if isinstance(obj, _ATOMS) and type(obj) in _ATOMS:
            return obj
        known = self.done.get(id(obj))
        if known is not None:
            return known
        kind = type(obj)
        if kind is TensorStub:
            return self.remember(obj, self.tensor(obj))
        if kind is dict or kind is OrderedDict:
            self.remember(obj, obj)
            self.fill(obj)
            if kind is OrderedDict:
                self.fill(vars(obj))  # what BUILD set: a state_dict's _metadata
            return obj
        if kind is list:
            self.remember(obj, obj)
            obj[:] = [self.value(item) for item in obj]
            return obj
        if kind is tuple:
            return self.remember(obj, tuple(self.value(item) for item in obj))
        if kind in (set, frozenset) and all(type(item) in _ATOMS for item in obj):
            return obj
        raise _NotMapped(kind.__name__)

    def remember(self, original: Any, replacement: Any) -> Any:
        self.done[id(original)] = replacement
        self.keep.append(original)
        return replacement

    def fill(self, mapping: dict[Any, Any]) -> None:
        for key, item in mapping.items():
            if type(key) not in _ATOMS:
                raise _NotMapped("a dict key that is not a plain value")
            mapping[key] = self.value(item)

    def tensor(self, stub: TensorStub) -> Any:
        recipe = self.recipes.get(id(stub))
        if recipe is None or recipe[2] is not stub:
            raise _NotMapped("a tensor without its rebuild call")
        name, args, _ = recipe
        utils = self.torch._utils
        if name == _V2:
            storage = self.storages[id(args[0])]
            return utils._rebuild_tensor_v2(storage, *(self.value(a) for a in args[1:]))
        return utils._rebuild_parameter(*(self.value(a) for a in args))
