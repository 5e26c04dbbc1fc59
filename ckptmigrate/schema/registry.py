"""The registry: where schemas come from, and the one way to find one by name.

Everyone who looks a schema up (``cm.load(schema="name")``, the CLI, ``cm.diff``, the pytest
plugin, ``scan``) goes through :func:`get_schema` or :func:`pick_schema`, so an unknown name is
one :class:`~ckptmigrate.errors.UnknownSchemaError` everywhere, listing the known names and the
nearest one; :func:`schema_status` says whether a stamp is behind its schema, for ``info`` and
``scan`` alike. As torchvision's ``get_weight``, lookups are functions over a value: the
discovered table is a plain ``{name: Schema}`` dict, and creating a Schema registers nothing.

Migrations come from folders of Python files, dotted modules, pyproject or entry points. The
configuration is the ``[tool.ckptmigrate]`` table of the nearest pyproject.toml up from
the working folder (:func:`find_config`, read the same way by the CLI and the pytest plugin);
its folder is first on ``sys.path`` while migrations import (and, under the CLI and the pytest
plugin, for the whole command or session: a ``build=`` may import the project's code late).

Importing a migration module is what registers its schemas: every module-level
:class:`Schema` it defines is collected by name. Two different schemas with one name is an
error naming both places.

>>> list_schemas(find_schemas(["migrations"]))
['tinylm', 'tinyconv']
>>> get_schema("tinylm").current  # discovered from [tool.ckptmigrate] migrations
<Version('4.0.0')>
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from ..errors import (
    CkptMigrateError,
    DuplicateSchemaError,
    SchemaMismatchError,
    UnknownSchemaError,
    UnversionedCheckpointError,
)
from ..formats.layout import Layout, declare_layout
from .history import EditedStep, edited_steps
from .project import (
    PYPROJECT,
    ProjectConfig,
    configured,
    find_config,
    fixtures_folders,
    migrations_folder,
    project_folder,
    project_on_sys_path,
)
from .schema import Schema

if TYPE_CHECKING:
    from ..values.checkpoint import Checkpoint
    from .graph import PlannedStep

__all__ = [
    "ENTRY_POINT_GROUP",
    "PYPROJECT",
    "ProjectConfig",
    "SchemaStatus",
    "Schemas",
    "collect",
    "configured",
    "find_config",
    "find_schemas",
    "fixtures_folders",
    "get_schema",
    "import_source",
    "list_schemas",
    "migrations_folder",
    "pick_schema",
    "project_folder",
    "project_on_sys_path",
    "schema_status",
    "schema_table",
    "schemas_in",
]

ENTRY_POINT_GROUP = "ckptmigrate.migrations"


def import_source(source: str) -> list[ModuleType]:
    """Import a folder of Python files (each on its own) or a dotted module name."""
    path = Path(source)
    if path.is_dir():
        # regular files only: opening a FIFO named x.py would block the import forever
        files = sorted(f for f in path.glob("*.py") if not f.name.startswith("_") and f.is_file())
        return [_import_file(f) for f in files]
    if path.suffix == ".py" and path.is_file():
        return [_import_file(path)]
    try:
        return [importlib.import_module(source)]
    except ImportError as exc:
        raise CkptMigrateError(
            f"cannot import migrations from {source!r}: it is neither a folder, a .py file nor "
            f"an importable module ({exc})"
        ) from None


def _import_file(path: Path) -> ModuleType:
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    name = f"ckptmigrate_migrations_{digest}.{resolved.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise CkptMigrateError(f"cannot import migrations file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise CkptMigrateError(
            f"importing migrations file {path} failed: {type(exc).__name__}: {exc}"
        ) from exc
    return module


def schemas_in(obj: Any) -> list[Schema]:
    """The Schema objects an imported module (or an entry point's value) defines."""
    if isinstance(obj, Schema):
        return [obj]
    if isinstance(obj, ModuleType):
        return [v for v in vars(obj).values() if isinstance(v, Schema)]
    if isinstance(obj, (list, tuple)):
        return [s for s in obj if isinstance(s, Schema)]
    return []


def collect(items: Iterable[tuple[str, Any]]) -> dict[str, Schema]:
    """Register schemas by name from ``(origin, module-or-schema)`` pairs; refuse clashes.

    A module's module-level :class:`~ckptmigrate.layout.Layout` values are declared, so that
    files in those layouts read (:func:`~ckptmigrate.formats.layout.declare_layout`).
    """
    found: dict[str, Schema] = {}
    for origin, obj in items:
        if isinstance(obj, ModuleType):
            for value in vars(obj).values():
                if isinstance(value, Layout):
                    declare_layout(value)
        for schema in schemas_in(obj):
            schema.origin = schema.origin or origin
            other = found.get(schema.name)
            if other is not None and other is not schema:
                raise DuplicateSchemaError(schema.name, other.origin or "?", origin)
            found[schema.name] = schema
    return found


def _entry_points() -> list[tuple[str, Any]]:
    from importlib.metadata import entry_points

    out = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            out.append((f"entry point {ep.name} ({ep.value})", ep.load()))
        except Exception as exc:
            raise CkptMigrateError(
                f"loading migrations entry point {ep.name} ({ep.value}) failed: {exc}"
            ) from exc
    return out


def find_schemas(
    sources: Sequence[str] | None = None, *, root: str | os.PathLike[str] | None = None
) -> dict[str, Schema]:
    """Discover schemas: ``sources`` if given, else ``[tool.ckptmigrate] migrations`` of the
    nearest configuring pyproject.toml (:func:`find_config`), else the installed
    ``ckptmigrate.migrations`` entry points.

    While sources import, the project's folder (that pyproject.toml's, else ``root`` or the
    working folder) is first on ``sys.path``.

    >>> schemas = find_schemas(["migrations"])
    >>> schemas["tinylm"].current
    """
    sources = list(sources or []) or configured("migrations", root)
    if sources:
        with project_on_sys_path(project_folder(root)):
            items = [(src, module) for src in sources for module in import_source(src)]
        return collect((f"{getattr(m, '__file__', src)}", m) for src, m in items)
    return collect(_entry_points())


#: What a caller may hand over as "the schemas": one, a table by name, a list, or None
#: (discover them with :func:`find_schemas`).
Schemas = Schema | Mapping[str, Schema] | Iterable[Schema] | None


def schema_table(schemas: Schemas = None) -> dict[str, Schema]:
    """``schemas`` as a ``{name: Schema}`` table; None discovers them (:func:`find_schemas`).

    >>> schema_table([tinylm, tinyconv])
    {'tinylm': Schema('tinylm', ...), 'tinyconv': Schema('tinyconv', ...)}
    """
    if schemas is None:
        return find_schemas()
    if isinstance(schemas, Schema):
        return {schemas.name: schemas}
    if isinstance(schemas, Mapping):
        return dict(schemas)
    return {s.name: s for s in schemas}


def list_schemas(schemas: Schemas = None) -> list[str]:
    """The names of ``schemas`` (default: the discovered ones), sorted.

    >>> list_schemas()
    ['tinyconv', 'tinylm']
    """
    return sorted(schema_table(schemas))


def get_schema(name: str | Schema, schemas: Schemas = None) -> Schema:
    """The schema called ``name`` among ``schemas`` (default: the discovered ones).

    A Schema object is returned as it is. An unknown name raises
    :class:`~ckptmigrate.errors.UnknownSchemaError`, listing the known names and the nearest.

    >>> get_schema("tinylm").current
    <Version('4.0.0')>
    """
    if isinstance(name, Schema):
        return name
    table = schema_table(schemas)
    found = table.get(name)
    if found is None:
        raise UnknownSchemaError(name, list(table))
    return found


def pick_schema(
    ckpt: Checkpoint,
    schemas: Schemas,
    name: str | None = None,
    *,
    path: object = None,
    fallback: str | None = None,
) -> Schema:
    """The schema that upgrades ``ckpt``: its stamp's, else ``name``, else ``fallback``, else
    the only one there is.

    A ``name`` no schema has is an :class:`UnknownSchemaError` (the first thing wrong), a
    ``name`` other than the stamp's a :class:`SchemaMismatchError`, and an unstamped file with
    nothing to choose by an :class:`UnversionedCheckpointError`.

    >>> pick_schema(cm.load("raw.pth", upgrade=False), schemas, "tinylm").name
    'tinylm'
    """
    table = schema_table(schemas)
    if name is not None:
        get_schema(name, table)
        if ckpt.schema is not None and name != ckpt.schema:
            raise SchemaMismatchError(name, ckpt.schema, path=path)
    chosen = ckpt.schema or name or fallback
    if chosen is None and len(table) == 1:
        chosen = next(iter(table))
    if chosen is None:
        raise UnversionedCheckpointError(path=path)
    return get_schema(chosen, table)


@dataclass(frozen=True)
class SchemaStatus:
    """Where a stamp (or a mount) stands against its registered schema.

    ``current`` is None when no such schema is registered; ``plan`` is None when it is not
    registered or the steps to current cannot be planned, and ``error`` then says why.
    ``edited`` lists the steps the history says ran that have changed since.
    """

    schema: str
    version: Version
    current: Version | None = None
    plan: list[PlannedStep] | None = None
    error: CkptMigrateError | None = None
    edited: tuple[EditedStep, ...] = ()

    @property
    def registered(self) -> bool:
        return self.current is not None

    @property
    def behind(self) -> bool | None:
        """Older than the schema's current version (None: not registered)."""
        return None if self.current is None else self.version < self.current


def schema_status(
    name: str, version: str | Version, schemas: Schemas, history: Sequence[Any] = ()
) -> SchemaStatus:
    """Whether ``name`` at ``version`` is behind its schema in ``schemas``, and the steps to
    current: the one answer ``info`` and ``scan`` give. ``history`` (the stamp's) tells which
    applied steps were edited since.

    >>> schema_status("tinylm", "1.0.0", schemas).behind
    True
    """
    from ..base.version import parse_version

    version = parse_version(version)
    try:
        schema = get_schema(name, schemas)
    except UnknownSchemaError as exc:
        return SchemaStatus(name, version, error=exc)
    edited = tuple(edited_steps(schema.graph, history))
    try:
        plan = schema.plan(version, history=history)
    except CkptMigrateError as exc:
        return SchemaStatus(name, version, schema.current, error=exc, edited=edited)
    return SchemaStatus(name, version, schema.current, plan, edited=edited)
