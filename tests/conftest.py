"""Fixtures shared by the test files. Plain builders live in modules beside this one
(``toy``, ``processes``, ``crash_points``, ``hostile``); pytest puts this folder on sys.path."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from toy import TOY_MIGRATIONS_WITH_MODEL, toy_sd

import ckptmigrate as cm
from ckptmigrate.schema.discovery import find_schemas

# Tests compare a folder before and after a command: a migrations module imported from it
# must not leave a __pycache__ there, whether or not the shell sets PYTHONDONTWRITEBYTECODE
# (this process and every CLI process a test starts)
sys.dont_write_bytecode = True
os.environ["PYTHONDONTWRITEBYTECODE"] = "1"

#: fixtures of real servers on loopback (and the catalogs on them), for every test file
pytest_plugins = ["postgres_server", "catalog_dbs"]

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    """a.pth (toy 1.0.0, blocks.*), b.pth (toy 3.0.0, layers.*), raw.pth (unstamped, flat)."""
    cm.save(tmp_path / "a.pth", toy_sd(), schema="toy", version="1.0.0", hparams={"layers": 2})
    cm.save(
        tmp_path / "b.pth",
        toy_sd("layers"),
        schema="toy",
        version="3.0.0",
        hparams={"layers": 2, "width": 4},
    )
    torch.save(toy_sd(), tmp_path / "raw.pth")
    (tmp_path / "mig").mkdir()
    (tmp_path / "mig" / "toy.py").write_text(TOY_MIGRATIONS_WITH_MODEL)
    return tmp_path


@pytest.fixture(scope="module")
def schemas() -> dict[str, cm.Schema]:
    """The repo's own schemas (``migrations/``): tinylm and tinyconv."""
    return find_schemas([str(REPO / "migrations")])


@pytest.fixture(scope="module")
def old_code() -> ModuleType:
    """scripts/make_fixtures.py: the old model definitions, as the fixtures were written."""
    spec = importlib.util.spec_from_file_location(
        "make_fixtures", REPO / "scripts/make_fixtures.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_fixtures", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def fast_tmp_path(tmp_path: Path) -> Iterator[Path]:
    """An empty folder on tmpfs where there is one (fsync is free there; the renames under
    test are the same on any POSIX file system), else one under ``tmp_path``."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        folder = Path(tempfile.mkdtemp(dir=shm, prefix="ckptmigrate-test-"))
        yield folder
        shutil.rmtree(folder, ignore_errors=True)
        return
    (tmp_path / "fast").mkdir()
    yield tmp_path / "fast"
