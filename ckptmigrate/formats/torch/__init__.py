"""torch.save files: their object graph read without torch, their tensors loaded with torch's
weights-only loader, their graph rewritten with the tensor data copied as stored.

One module per concept, each using the others' public names only:

- :mod:`.metadata`: :func:`read_torch_metadata` (one sniff, then the zip or the legacy reader);
- :mod:`.archive` (the zip container, torch >= 1.6; its central directory read by
  :mod:`.zip_directory`, without zipfile) and :mod:`.legacy` (before 1.6);
- :mod:`.unpickler`: the restricted unpickler, and the one way a pickle is decoded;
- :mod:`.walk`, :mod:`.opcodes`, :mod:`.stack_model`: the opcode walk run before any decode,
  the opcode tables it reads, and the model of the unpickler's stack for the decode budgets;
- :mod:`.allowlist`, :mod:`.guards`, :mod:`.placeholders`, :mod:`.storages`: what a global or
  a persistent id decodes to, and why a pickle's BUILD cannot change it;
- :mod:`.read_errors`: which errors mean a corrupt file, and the path they name;
- :mod:`.load` and :mod:`.mapped`: loads through torch, and the mapped CPU load built here;
- :mod:`.zip_graph` and :mod:`.zip_writer`: a graph rewritten, an archive written as torch does;
- :mod:`.save_copy`: tensors saved as torch saves them, the source's unchanged storages copied.

>>> from ckptmigrate.formats.torch import read_torch_metadata
>>> read_torch_metadata("model.pth")["fc.weight"]  # doctest: +SKIP
TensorStub(Tensor, shape=(10, 20), dtype=float32)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .allowlist import WEIGHTS_ONLY_GLOBALS, GlobalRedirect, python3_name, redirect_map
    from .archive import ZipRecordInfo, check_torch_bytes, read_zip_records
    from .load import (
        allowed_names,
        global_name,
        read_torch,
        resolve_global,
        with_redirects,
        write_torch,
    )
    from .mapped import MAPPED_GLOBALS, load_mapped
    from .metadata import read_torch_metadata, scan_pickle_globals
    from .placeholders import OpaqueObject, TorchConstant
    from .save_copy import save_copying, storage_buffer
    from .unpickler import MAX_PICKLE_BYTES
    from .walk import ScanResult, scan_pickle
    from .zip_graph import ZipGraph, read_zip_graph, write_zip_graph
    from .zip_writer import TorchZipWriter, write_zip_copy

__all__ = [
    "MAPPED_GLOBALS",
    "MAX_PICKLE_BYTES",
    "WEIGHTS_ONLY_GLOBALS",
    "GlobalRedirect",
    "OpaqueObject",
    "ScanResult",
    "TorchConstant",
    "TorchZipWriter",
    "ZipGraph",
    "ZipRecordInfo",
    "allowed_names",
    "check_torch_bytes",
    "global_name",
    "load_mapped",
    "python3_name",
    "read_torch",
    "read_torch_metadata",
    "read_zip_graph",
    "read_zip_records",
    "redirect_map",
    "resolve_global",
    "save_copying",
    "scan_pickle",
    "scan_pickle_globals",
    "storage_buffer",
    "with_redirects",
    "write_torch",
    "write_zip_copy",
    "write_zip_graph",
]

# Each name is imported from its module on first use: reading a file's metadata pays for the
# readers, not for the writers and the torch loaders.
_LAZY = {
    "GlobalRedirect": "allowlist",
    "MAPPED_GLOBALS": "mapped",
    "MAX_PICKLE_BYTES": "unpickler",
    "OpaqueObject": "placeholders",
    "ScanResult": "walk",
    "TorchConstant": "placeholders",
    "TorchZipWriter": "zip_writer",
    "WEIGHTS_ONLY_GLOBALS": "allowlist",
    "ZipGraph": "zip_graph",
    "ZipRecordInfo": "archive",
    "allowed_names": "load",
    "check_torch_bytes": "archive",
    "global_name": "load",
    "load_mapped": "mapped",
    "python3_name": "allowlist",
    "read_torch": "load",
    "read_torch_metadata": "metadata",
    "read_zip_graph": "zip_graph",
    "read_zip_records": "archive",
    "redirect_map": "allowlist",
    "resolve_global": "load",
    "save_copying": "save_copy",
    "scan_pickle": "walk",
    "scan_pickle_globals": "metadata",
    "storage_buffer": "save_copy",
    "with_redirects": "load",
    "write_torch": "load",
    "write_zip_copy": "zip_writer",
    "write_zip_graph": "zip_graph",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
