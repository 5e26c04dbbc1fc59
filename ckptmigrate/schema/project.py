"""A project's configuration: the ``[tool.ckptmigrate]`` table of its pyproject.toml.

Read the same way by the CLI, the registry and the pytest plugin. Light on purpose (no
dataclass of schemas, no torch): every command finds its project before anything else.

>>> configured("migrations")  # doctest: +SKIP
['/home/me/project/migrations']
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import CkptMigrateError

__all__ = [
    "MAX_PYPROJECT_BYTES",
    "PYPROJECT",
    "ProjectConfig",
    "configured",
    "find_config",
    "fixtures_folders",
    "migrations_folder",
    "project_folder",
    "project_on_sys_path",
]

#: A pyproject.toml larger than this is refused unread: project files are kilobytes.
MAX_PYPROJECT_BYTES = 4 * 1024 * 1024

PYPROJECT = "pyproject.toml"


class ProjectConfig(NamedTuple):
    """The ``[tool.ckptmigrate]`` table of a project and the folder of its pyproject.toml."""

    folder: Path
    section: dict[str, Any]


def _read_section(folder: Path) -> dict[str, Any] | None:
    """``[tool.ckptmigrate]`` of ``folder``'s pyproject.toml; None without the file or table."""
    path = folder / PYPROJECT
    if not path.is_file():
        return None
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PYPROJECT_BYTES + 1)
        data = {} if len(raw) > MAX_PYPROJECT_BYTES else tomllib.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and TOMLDecodeError included
        raise CkptMigrateError(f"cannot read {path}: {exc}") from None
    if len(raw) > MAX_PYPROJECT_BYTES:
        raise CkptMigrateError(
            f"cannot read {path}: larger than {MAX_PYPROJECT_BYTES} bytes, which no project "
            "file needs"
        )
    tool = data.get("tool")
    section = tool.get("ckptmigrate") if isinstance(tool, dict) else None
    return section if isinstance(section, dict) else None


def find_config(start: str | os.PathLike[str] | None = None) -> ProjectConfig | None:
    """The nearest pyproject.toml with a ``[tool.ckptmigrate]`` table, walking up from
    ``start`` (default: the working folder) as git and pytest do.

    The walk stops at the top of a git work tree (a folder holding ``.git``): a pyproject.toml
    above the repository belongs to another project.

    >>> find_config("src/models").folder  # doctest: +SKIP
    PosixPath('/home/me/project')
    """
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        section = _read_section(folder)
        if section is not None:
            return ProjectConfig(folder, section)
        if (folder / ".git").exists():
            return None
    return None


def configured(key: str, root: str | os.PathLike[str] | None = None) -> list[str]:
    """``[tool.ckptmigrate] key = [...]`` of the project found from ``root`` (see
    :func:`find_config`), relative paths made absolute against the pyproject.toml's folder."""
    config = find_config(root)
    if config is None:
        return []
    value = config.section.get(key, [])
    items = [value] if isinstance(value, str) else list(value)
    out = []
    for item in items:
        candidate = config.folder / item
        out.append(str(candidate) if candidate.exists() else str(item))
    return out


def fixtures_folders() -> list[str]:
    """Where legacy fixtures live: ``[tool.ckptmigrate] fixtures``, else ``fixtures``."""
    return configured("fixtures") or ["fixtures"]


def migrations_folder() -> Path:
    """Where a new migration module goes: the first configured migrations folder that
    exists, else ``migrations``."""
    for source in configured("migrations"):
        if Path(source).is_dir():
            return Path(source)
    return Path("migrations")


def project_folder(root: str | os.PathLike[str] | None = None) -> Path:
    """The folder of the configuring pyproject.toml (:func:`find_config`), else ``root`` or the
    working folder: where the project's own model code is imported from."""
    config = find_config(root)
    return config.folder if config is not None else Path(root or os.getcwd())


@contextmanager
def project_on_sys_path(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Put ``folder`` first on ``sys.path`` while migrations import (as Alembic's
    ``prepend_sys_path``), so ``from mynet import MyNet`` finds the project's own code."""
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        if entry in sys.path:
            sys.path.remove(entry)
