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
from .errors import *  # noqa: F403 - every error, as errors.__all__ lists them

__all__ = [
    *errors.__all__,  # every error the package raises
    "Adapter",
    "Checkpoint",
    "GlobalRedirect",
    "Layout",
    "LoadReport",
    "Mount",
    "Schema",
    "Weights",
    "attach",
    "declare_layout",
    "diff",
    "errors",
    "follow_base",
    "get_schema",
    "list_schemas",
    "FileUpgrade",
    "Rewrite",
    "upgrade_file",
    "upgrade_in_place",
    "stamp_in_place",
    "load",
    "load_into",
    "load_weights",
    "ops",
    "read_adapter",
    "save",
    "upgrade",
    "upgrade_adapter",
    "write_adapter",
]

if TYPE_CHECKING:
    from .engine.adapters import Adapter, follow_base, read_adapter, upgrade_adapter, write_adapter
    from .engine.api import attach, load, load_into, save
    from .engine.inplace import stamp_in_place, upgrade_in_place
    from .engine.rewrite import Rewrite, upgrade_file
    from .engine.upgrade import upgrade
    from .engine.weights import load_weights
    from .formats.layout import Layout, declare_layout
    from .formats.torch import GlobalRedirect
    from .inspection.diff import diff
    from .io.report import LoadReport
    from .schema import ops
    from .schema.registry import get_schema, list_schemas
    from .schema.schema import Schema
    from .schema.weights import Weights
    from .values.checkpoint import Checkpoint
    from .values.stamp import Mount

    FileUpgrade = Rewrite

# Each public name is imported on first use: a command pays only for the modules it touches
# (``ckptmigrate diff`` never imports the engine). The module each name lives in:
_LAZY = {
    "Adapter": "engine.adapters",
    "follow_base": "engine.adapters",
    "read_adapter": "engine.adapters",
    "upgrade_adapter": "engine.adapters",
    "write_adapter": "engine.adapters",
    "attach": "engine.api",
    "load": "engine.api",
    "load_into": "engine.api",
    "save": "engine.api",
    "Checkpoint": "values.checkpoint",
    "GlobalRedirect": "formats.torch",
    "diff": "inspection.diff",
    "Layout": "formats.layout",
    "declare_layout": "formats.layout",
    "get_schema": "schema.registry",
    "list_schemas": "schema.registry",
    "LoadReport": "io.report",
    "Schema": "schema.schema",
    "Weights": "schema.weights",
    "load_weights": "engine.weights",
    "Mount": "values.stamp",
    "upgrade": "engine.upgrade",
    "upgrade_file": "engine.rewrite",
    "Rewrite": "engine.rewrite",
    "FileUpgrade": "engine.rewrite",
    "upgrade_in_place": "engine.inplace",
    "stamp_in_place": "engine.inplace",
}


def __getattr__(name: str) -> Any:
    if name == "ops":
        from .schema import ops

        return ops
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # the function, not a submodule of the same name, from now on
        return value
    raise AttributeError(f"module 'ckptmigrate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
