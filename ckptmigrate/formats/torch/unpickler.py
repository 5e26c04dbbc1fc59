"""The restricted unpickler and the one way a pickle is decoded: the opcode walk first, then
the C unpickler under the decode and hashing budgets, globals resolved through the allow-list.

>>> load_pickle(io.BytesIO(data), allowed_map(()))  # doctest: +SKIP
{'fc.weight': TensorStub(...)}
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from ...errors import CheckpointFormatError, RedirectError, UnsafeCheckpointError, UsageError
from ..bounds import DecodeBudget, decode_bounded, tuple_chain_bound
from .allowlist import check_global, holds_dict_redirects, plain_dicts, python3_name
from .opcodes import ScanCorrupt
from .read_errors import FORMAT_ERRORS
from .walk import ScanResult, scan_pickle

#: The largest pickle (``data.pkl`` or legacy main pickle) we decode.
MAX_PICKLE_BYTES = 1 << 30


class MetadataUnpickler(pickle.Unpickler):
    """Resolves globals only to our stub builders; storages only to :class:`~.storages.StorageRef`."""

    def __init__(
        self,
        file: Any,
        *,
        allowed: dict[str, Any],
        persistent_load: Callable[[Any], Any] | None = None,
        path: object = None,
    ) -> None:
        super().__init__(file, encoding="ASCII")
        self._allowed = allowed
        self._load_storage = persistent_load
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        full = python3_name(module, name)
        check_global(full, self._allowed, self._path)
        return self._allowed[full]

    def persistent_load(self, pid: Any) -> Any:
        if self._load_storage is None:
            raise CheckpointFormatError("unexpected persistent id in a torch header pickle")
        return self._load_storage(pid)


def scan_globals(file: BinaryIO, allowed: dict[str, Any] | None, path: object = None) -> list[str]:
    """:func:`scan_pickle` from ``file``'s position; leaves the position unchanged."""
    start = file.tell()
    with _pickle_bytes(file) as (buf, end):
        return scan_pickle(buf, start, end, allowed, path).globals


@contextmanager
def _pickle_bytes(file: BinaryIO) -> Iterator[tuple[Any, int]]:
    """The bytes ``file`` reads from, indexed by its positions, and where its data ends.

    A BytesIO shares its bytes (no copy); a :class:`BoundedReader` over a file is mapped.
    """
    if isinstance(file, io.BytesIO):
        data = file.getvalue()
        yield data, len(data)
    elif isinstance(file, BoundedReader):
        if os.fstat(file.fileno()).st_size == 0:
            yield b"", 0
            return
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            yield mapped, min(file.limit, len(mapped))
    else:
        raise UsageError(f"cannot scan a pickle from {type(file).__name__}")


def load_pickle(
    file: BinaryIO,
    allowed: dict[str, Any],
    persistent_load: Callable[[Any], Any] | None = None,
    path: object = None,
) -> Any:
    """Scan, then decode one pickle from ``file``'s current position; unsafe beats corrupt."""
    return load_pickle_scanned(file, allowed, persistent_load, path)[0]


def load_pickle_scanned(
    file: BinaryIO,
    allowed: dict[str, Any],
    persistent_load: Callable[[Any], Any] | None = None,
    path: object = None,
) -> tuple[Any, ScanResult]:
    """:func:`load_pickle`, also returning what the opcode walk found.

    Only the opcodes the walk has seen reach the C unpickler: when the walk stops on a
    malformed opcode, the unpickler gets the pickle cut there (a global it names might still
    be refused as unsafe, but no memo index the walk has not checked is ever read).
    """
    start = file.tell()
    scan_error: ScanCorrupt | None = None
    with _pickle_bytes(file) as (buf, end):
        try:
            scan = scan_pickle(buf, start, end, allowed, path)
        except ScanCorrupt as exc:
            scan_error = exc
            scan = ScanResult([], exc.pos, estimate=exc.effects.estimate)
            scan.hashed = exc.effects.hashed
        tuple_bound = tuple_chain_bound(buf, start, scan.end)
    stored = scan.end - start
    # the pickle's bytes are held, and a frame or string is read into a copy of its own
    budget = DecodeBudget(stored, 2 * stored + scan.estimate, path=path, hashed=scan.hashed)
    file.seek(start)
    source = file if scan_error is None else BoundedReader(file, scan.end)
    try:
        unpickler = MetadataUnpickler(
            source, allowed=allowed, persistent_load=persistent_load, path=path
        )
        obj = decode_bounded(unpickler.load, tuple_bound, path, budget)
    except (UnsafeCheckpointError, CheckpointFormatError, RedirectError):
        raise  # RedirectError: an object its redirect's target cannot hold
    except FORMAT_ERRORS as exc:
        problem = scan_error or exc
        raise CheckpointFormatError(
            f"corrupt pickle ({type(problem).__name__}: {problem})"
        ) from exc
    if scan_error is not None:  # cannot happen: the cut pickle has no STOP
        raise CheckpointFormatError(f"corrupt pickle (ScanCorrupt: {scan_error})")
    if holds_dict_redirects(allowed):
        obj = plain_dicts(obj)  # objects redirected to dict, plain dicts before anyone sees them
    return obj, scan


class BoundedReader(io.RawIOBase):
    """Reads from ``file`` but refuses any single read past ``limit``: a pickle that declares
    a 4 GiB string must not make us allocate 4 GiB first."""

    def __init__(self, file: BinaryIO, limit: int) -> None:
        super().__init__()
        self._file = file
        self._limit = limit

    @property
    def limit(self) -> int:
        """The position no read may pass."""
        return self._limit

    def fileno(self) -> int:
        return self._file.fileno()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._file.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def read(self, size: int | None = -1) -> bytes:
        remaining = self._limit - self._file.tell()
        if size is None or size < 0:
            size = remaining
        if size > remaining:
            raise EOFError(f"pickle wants {size} bytes but the file ends after {remaining}")
        return self._file.read(size)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readline(self, size: int | None = -1) -> bytes:
        return self._file.readline(min(65536, size if size and size > 0 else 65536))
