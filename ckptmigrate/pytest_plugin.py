"""pytest plugin: one test per legacy fixture, and a ``ckpt_fixture`` fixture for custom tests.

Installed with ckptmigrate (entry point ``pytest11``), it does nothing until fixtures are
configured, in the first of these places that names some::

    pytest --ckpt-fixtures fixtures --ckpt-migrations migrations

    [tool.pytest.ini_options]            # or pytest.ini / setup.cfg
    ckpt_fixtures = ["fixtures"]
    ckpt_migrations = ["migrations"]

    [tool.ckptmigrate]                   # found and read as the ckptmigrate CLI does
    fixtures = ["fixtures"]
    migrations = ["migrations"]

Every ``*.golden.pt`` record under those folders becomes a test that upgrades its checkpoint,
loads it strictly into the model built from the migrated hparams and compares the outputs with
the golden ones (see :mod:`ckptmigrate.inspection.fixtures`). A plain ``pytest`` run, or one given only
``--ckpt-fixtures``, collects the folders even when ``testpaths`` leaves them out; a run naming
other paths collects them only if they lie under those paths.

This module imports neither torch nor ckptmigrate at the top: pytest loads it in every run of
every project that has ckptmigrate installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .errors import FixtureCheckError, FixtureNotFoundError

if TYPE_CHECKING:
    from .inspection.fixtures import Fixture, FixtureResult
    from .schema.schema import Schema
    from .values.checkpoint import Checkpoint

GOLDEN_SUFFIX = ".golden.pt"
_DIRS = pytest.StashKey[list[Path]]()
_SCHEMAS = pytest.StashKey[Any]()
_SYS_PATH = pytest.StashKey[str]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ckptmigrate", "legacy checkpoint fixtures (ckptmigrate)")
    group.addoption(
        "--ckpt-fixtures",
        action="append",
        default=[],
        metavar="DIR",
        help="folder of legacy fixtures (*.golden.pt beside each checkpoint); repeatable",
    )
    group.addoption(
        "--ckpt-migrations",
        action="append",
        default=[],
        metavar="PATH",
        help="folder of migration files or dotted module defining the schemas; repeatable",
    )
    parser.addini("ckpt_fixtures", "folders of legacy checkpoint fixtures", type="args")
    parser.addini("ckpt_migrations", "migration folders or modules for ckptmigrate", type="args")


def _tool_configured(config: pytest.Config, key: str) -> list[str]:
    """``[tool.ckptmigrate] key`` of the nearest configuring pyproject.toml up from the config
    file's folder: the reader the CLI uses (:func:`ckptmigrate.schema.registry.configured`)."""
    from .errors import CkptMigrateError
    from .schema.project import configured

    try:
        return configured(key, _base(config))
    except CkptMigrateError as exc:
        raise pytest.UsageError(f"ckptmigrate: {exc}") from None


def _configured(config: pytest.Config, option: str, ini: str, tool_key: str) -> list[str]:
    given = list(config.getoption(option) or [])
    if given:
        return given
    given = list(config.getini(ini) or [])
    if given:
        return given
    return _tool_configured(config, tool_key)


def _base(config: pytest.Config) -> Path:
    """Relative settings are relative to the config file's folder (the rootdir without one)."""
    return config.inipath.parent if config.inipath else config.rootpath


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ckpt_fixture: a ckptmigrate legacy fixture check")
    explicit = bool(config.getoption("ckpt_fixtures"))
    dirs = []
    for entry in _configured(config, "ckpt_fixtures", "ckpt_fixtures", "fixtures"):
        path = Path(entry)
        if not path.is_absolute():
            # command-line paths are relative to where pytest runs, settings to the config file
            path = (config.invocation_params.dir if explicit else _base(config)) / path
        dirs.append(path.resolve())
    config.stash[_DIRS] = dirs
    if not dirs:
        return
    from_args = getattr(config, "args_source", None) == pytest.Config.ArgsSource.ARGS
    if from_args and not explicit:
        return
    # testpaths (or the named paths) may leave the fixture folders out: add them
    roots = [(config.invocation_params.dir / a.split("::")[0]).resolve() for a in config.args]
    for folder in dirs:
        if folder.is_dir() and not any(folder.is_relative_to(r) for r in roots):
            config.args.append(str(folder))


def _fixture_dirs(config: pytest.Config) -> list[Path]:
    return config.stash.get(_DIRS, [])


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if not file_path.name.endswith(GOLDEN_SUFFIX):
        return None
    resolved = file_path.resolve()
    if any(resolved.is_relative_to(d) for d in _fixture_dirs(parent.config)):
        return GoldenRecordFile.from_parent(parent, path=file_path)
    return None


def _schemas(config: pytest.Config) -> dict[str, Schema]:
    """The schemas the configured migrations define, discovered once per session."""
    if _SCHEMAS not in config.stash:
        from .schema.registry import find_schemas

        sources = []
        for entry in _configured(config, "ckpt_migrations", "ckpt_migrations", "migrations"):
            candidate = Path(entry)
            if not candidate.is_absolute():
                explicit = bool(config.getoption("ckpt_migrations"))
                candidate = (config.invocation_params.dir if explicit else _base(config)) / entry
            sources.append(str(candidate) if candidate.exists() else entry)
        try:
            config.stash[_SCHEMAS] = find_schemas(sources or None, root=_base(config))
        except Exception as exc:  # reported by every fixture test, not as a crash
            config.stash[_SCHEMAS] = exc
        _keep_project_importable(config)
    found = config.stash[_SCHEMAS]
    if isinstance(found, Exception):
        raise FixtureCheckError(f"discovering the migrations failed: {found}")
    return found


def _keep_project_importable(config: pytest.Config) -> None:
    """The project's folder stays on sys.path for the session (a ``build=`` may import the
    project's model code when a fixture is checked); pytest_unconfigure takes it off."""
    import sys

    from .schema.project import project_folder

    entry = str(project_folder(_base(config)))
    if entry not in sys.path:
        sys.path.insert(0, entry)
        config.stash[_SYS_PATH] = entry


def pytest_unconfigure(config: pytest.Config) -> None:
    import sys

    entry = config.stash.get(_SYS_PATH, None)
    if entry is not None and entry in sys.path:
        sys.path.remove(entry)


class GoldenRecordFile(pytest.File):
    """A ``*.golden.pt`` record: collects the one fixture check it describes."""

    def collect(self) -> list[pytest.Item]:
        from .errors import CkptMigrateError
        from .inspection.fixtures import fixture_from_golden

        try:
            fixture = fixture_from_golden(self.path)
        except CkptMigrateError as exc:
            raise self.CollectError(str(exc)) from None
        name = "-".join(p for p in (fixture.schema, fixture.version, fixture.variant) if p)
        return [CkptFixtureItem.from_parent(self, name=name, fixture=fixture)]


class CkptFixtureItem(pytest.Item):
    """Checks one legacy fixture: upgrade, strict load, golden outputs within tolerance."""

    def __init__(self, *, fixture: Fixture, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fixture = fixture
        self.add_marker("ckpt_fixture")

    def runtest(self) -> None:
        from .inspection.fixtures import check_fixture

        result = check_fixture(self.fixture, _schemas(self.config))
        self.user_properties.append(("steps_applied", result.steps_applied))
        self.user_properties.append(("max_abs_error", result.max_abs_error))
        if not result.ok:
            raise FixtureCheckError(result.reason)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None) -> str:
        if isinstance(excinfo.value, FixtureCheckError):
            return f"{self.fixture.path}: {excinfo.value}"
        return str(super().repr_failure(excinfo, style=style))

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"ckpt fixture {self.fixture.label}"


class CkptFixtures:
    """What the ``ckpt_fixture`` fixture gives a test: find, load, upgrade and check fixtures.

    >>> def test_head_renamed(ckpt_fixture):
    ...     ckpt = ckpt_fixture("fixtures/tinyconv/1.0.0-stripes.pth")   # upgraded to current
    ...     assert "head.1.weight" in ckpt.state_dict
    """

    def __init__(self, config: pytest.Config) -> None:
        self._config = config

    @property
    def schemas(self) -> dict[str, Schema]:
        return _schemas(self._config)

    def all(self) -> list[Fixture]:
        """Every fixture under the configured folders."""
        from .inspection.fixtures import find_fixtures

        return [f for d in _fixture_dirs(self._config) if d.is_dir() for f in find_fixtures(d)]

    def find(self, path: str | Path | Fixture) -> Fixture:
        """The fixture of a checkpoint or golden-record path (relative to the rootdir or cwd)."""
        from .inspection.fixtures import Fixture, fixture_from_golden

        if isinstance(path, Fixture):
            return path
        candidate = Path(path)
        if not candidate.exists() and not candidate.is_absolute():
            candidate = _base(self._config) / candidate
        if candidate.name.endswith(GOLDEN_SUFFIX):
            return fixture_from_golden(candidate)
        for golden in sorted(candidate.parent.glob(f"*{GOLDEN_SUFFIX}")):
            fixture = fixture_from_golden(golden)
            if fixture.path.name == candidate.name:
                return fixture
        raise FixtureNotFoundError(candidate)

    def golden(self, path: str | Path | Fixture) -> dict[str, Any]:
        """The golden record (input, output, tolerance, hparams) of a fixture."""
        from .inspection.fixtures import read_golden

        return read_golden(self.find(path).golden_path)

    def __call__(
        self, path: str | Path | Fixture, *, to: str | None = None, upgrade: bool = True
    ) -> Checkpoint:
        """The fixture's checkpoint upgraded to ``to`` (default: current), or as stored."""
        from .inspection.fixtures import load_fixture
        from .schema.registry import get_schema

        fixture = self.find(path)
        schema = get_schema(fixture.schema, self.schemas)  # UnknownSchemaError, a LookupError
        return load_fixture(fixture, schema, to=to, upgrade=upgrade)

    def check(self, path: str | Path | Fixture) -> FixtureResult:
        """Run the full fixture check and return its result."""
        from .inspection.fixtures import check_fixture

        return check_fixture(self.find(path), self.schemas)


@pytest.fixture
def ckpt_fixture(request: pytest.FixtureRequest) -> CkptFixtures:
    """Load, upgrade and check legacy fixtures by path: ``ckpt_fixture("fixtures/m/1.0.pth")``."""
    return CkptFixtures(request.config)


__all__ = ["CkptFixtureItem", "CkptFixtures", "GoldenRecordFile", "ckpt_fixture"]
