"""ckptmigrate: versioned PyTorch checkpoints and the migrations that keep them loadable.

>>> import ckptmigrate as cm
>>> schema = cm.Schema("tinylm", current="2.0.0", build=lambda hp: TinyLM(**hp))
>>> ckpt = cm.load("old.pth", schema=schema)   # upgraded on the way in

Importing this package does not import torch: paths that only read metadata stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import errors, ops
from .api import attach, load, load_into, save
from .checkpoint import Checkpoint
from .diff import diff  # binds the function over the submodule; deepdiff loads on first use
from .errors import (
    AlreadyStampedError,
    AmbiguousMigrationPathError,
    AmbiguousVersionError,
    BackupExistsError,
    BreakingMigrationError,
    BudgetExceededError,
    CheckpointFormatError,
    CheckpointWriteError,
    CkptMigrateError,
    CommandLineError,
    DuplicateSchemaError,
    FileTooLargeError,
    FixtureCheckError,
    FixtureNotFoundError,
    FutureVersionError,
    HashingBudgetExceededError,
    InPlaceWriteError,
    InternalError,
    LayoutNameError,
    LoadMismatchError,
    LockError,
    LockTimeoutError,
    MigrationError,
    MigrationGraphError,
    MigrationPathError,
    ModelBuildError,
    MountError,
    NoMigrationPathError,
    NothingMatched,
    NotReplayableError,
    OpError,
    OpMatchedNothingError,
    OutputOccupiedError,
    ParamNamesUnknown,
    ParamNamesUnknownError,
    PathNotFoundError,
    SchemaMismatchError,
    TargetPastCurrentError,
    UnknownFormatError,
    UnknownLayoutError,
    UnknownSchemaError,
    UnsafeCheckpointError,
    UnversionedCheckpointError,
    UsageError,
    VersionConflictError,
)
from .layout import Layout, declare_layout
from .registry import get_schema, list_schemas
from .report import LoadReport
from .schema import Schema
from .stamp import Mount
from .upgrade import upgrade
from .version import __version__ as __version__

__all__ = [
    # errors: every one the package raises (ckptmigrate.errors.__all__)
    "AlreadyStampedError",
    "AmbiguousMigrationPathError",
    "AmbiguousVersionError",
    "BackupExistsError",
    "BreakingMigrationError",
    "BudgetExceededError",
    "CheckpointFormatError",
    "CheckpointWriteError",
    "CkptMigrateError",
    "CommandLineError",
    "DuplicateSchemaError",
    "FileTooLargeError",
    "FixtureCheckError",
    "FixtureNotFoundError",
    "FutureVersionError",
    "HashingBudgetExceededError",
    "InPlaceWriteError",
    "InternalError",
    "LayoutNameError",
    "LoadMismatchError",
    "LockError",
    "LockTimeoutError",
    "MigrationError",
    "MigrationGraphError",
    "MigrationPathError",
    "ModelBuildError",
    "MountError",
    "NoMigrationPathError",
    "NotReplayableError",
    "NothingMatched",
    "OpError",
    "OpMatchedNothingError",
    "OutputOccupiedError",
    "ParamNamesUnknown",
    "ParamNamesUnknownError",
    "PathNotFoundError",
    "SchemaMismatchError",
    "TargetPastCurrentError",
    "UnknownFormatError",
    "UnknownLayoutError",
    "UnknownSchemaError",
    "UnsafeCheckpointError",
    "UnversionedCheckpointError",
    "UsageError",
    "VersionConflictError",
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
    from .inplace import stamp_in_place, upgrade_in_place
    from .streaming import FileUpgrade, upgrade_file

# file rewriting pulls in the zip writer, sharded and DCP formats and the lock: on first use
_LAZY = {
    "upgrade_file": "streaming",
    "FileUpgrade": "streaming",
    "upgrade_in_place": "inplace",
    "stamp_in_place": "inplace",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ckptmigrate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
