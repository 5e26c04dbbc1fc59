"""How reading a torch.save file fails: the stdlib errors that mean a corrupt file, and the
path every error names.

>>> reading(path, lambda: read_zip(path, allowed))  # doctest: +SKIP
"""

from __future__ import annotations

import os
import pickle
import struct
import zlib
from collections.abc import Callable
from typing import TypeVar

from ...errors import CheckpointFormatError, RedirectError, UnsafeCheckpointError

# Errors a malformed pickle or zip raises from the stdlib; all mean "corrupt file". (The zip
# reader, zip_directory, raises CheckpointFormatError itself: zipfile is not imported.)
FORMAT_ERRORS = (
    pickle.UnpicklingError,
    zlib.error,
    EOFError,
    struct.error,
    ValueError,
    RecursionError,
    MemoryError,
    OverflowError,
    LookupError,
    TypeError,
    AttributeError,
    NotImplementedError,
)


def with_path(exc: CheckpointFormatError | UnsafeCheckpointError, path: object) -> Exception:
    """``exc`` naming ``path`` (an unsafe error names its path already)."""
    if exc.path is not None or isinstance(exc, UnsafeCheckpointError):
        return exc  # unsafe errors are raised with their path already
    return CheckpointFormatError(str(exc), path=path)


_T = TypeVar("_T")


def reading(path: str | os.PathLike[str], read: Callable[[], _T]) -> _T:
    """``read()``, its errors as :func:`read_torch_metadata` raises them (with the path)."""
    try:
        return read()
    except (CheckpointFormatError, UnsafeCheckpointError) as exc:
        raise with_path(exc, path) from exc.__cause__
    except RedirectError:
        raise  # the file is fine; its redirect's target cannot hold an object in it
    except FORMAT_ERRORS + (OSError,) as exc:  # OSError: a seek to an offset a lie gave
        raise CheckpointFormatError(f"corrupt checkpoint ({exc})", path=path) from exc
