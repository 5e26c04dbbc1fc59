"""ckptmigrate: versioned PyTorch checkpoints and the migrations that keep them loadable.

>>> import ckptmigrate as cm
>>> schema = cm.Schema("tinylm", current="2.0.0", build=lambda hp: TinyLM(**hp))
>>> ckpt = cm.load("old.pth", schema=schema)   # upgraded on the way in

Importing this package does not import torch: paths that only read metadata stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import errors
from .base.version import __version__ as __version__
from .engine.api import attach, load, load_into, save
from .engine.upgrade import upgrade
from .errors import *  # noqa: F403 - every error, as errors.__all__ lists them
from .formats.layout import Layout, declare_layout
from .inspection.diff import (
    diff,
)  # binds the function over the submodule; deepdiff loads on first use
from .io.report import LoadReport
from .schema import ops
from .schema.registry import get_schema, list_schemas
from .schema.schema import Schema
from .values.checkpoint import Checkpoint
from .values.stamp import Mount

__all__ = [
    *errors.__all__,  # every error the package raises
    "Checkpoint",
    "Layout",
    "LoadReport",
    "Mount",
    "Schema",
    "attach",
    "declare_layout",
    "diff",
    "errors",
    "get_schema",
    "list_schemas",
    "FileUpgrade",
    "Rewrite",
    "upgrade_file",
    "upgrade_in_place",
    "stamp_in_place",
    "load",
    "load_into",
    "ops",
    "save",
    "upgrade",
]

if TYPE_CHECKING:
    from .engine.inplace import stamp_in_place, upgrade_in_place
    from .engine.rewrite import Rewrite, upgrade_file

    FileUpgrade = Rewrite

# file rewriting pulls in the zip writer, sharded and DCP formats and the lock: on first use
_LAZY = {
    "upgrade_file": "engine.rewrite",
    "Rewrite": "engine.rewrite",
    "FileUpgrade": "engine.rewrite",
    "upgrade_in_place": "engine.inplace",
    "stamp_in_place": "engine.inplace",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ckptmigrate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
