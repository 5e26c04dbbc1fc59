"""Where migrations come from: kept as a name for :mod:`ckptmigrate.schema.registry`, which holds it.

>>> from ckptmigrate.discovery import find_schemas  # the same function as registry's
"""

from __future__ import annotations

from .registry import (
    ENTRY_POINT_GROUP,
    PYPROJECT,
    ProjectConfig,
    collect,
    configured,
    find_config,
    find_schemas,
    import_source,
    project_folder,
    project_on_sys_path,
    schemas_in,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "PYPROJECT",
    "ProjectConfig",
    "collect",
    "configured",
    "find_config",
    "find_schemas",
    "import_source",
    "project_folder",
    "project_on_sys_path",
    "schemas_in",
]
