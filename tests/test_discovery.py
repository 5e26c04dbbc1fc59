"""Where migrations come from: folders, dotted modules, pyproject.toml, entry points."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

import ckptmigrate as cm
from ckptmigrate.schema import discovery
from ckptmigrate.schema.discovery import find_schemas, import_source


def migration_source(name: str, current: str = "2.0.0") -> str:
    return textwrap.dedent(f"""
        import ckptmigrate as cm

        schema = cm.Schema({name!r}, current={current!r})

        @schema.migration("1.0.0", "2.0.0")
        def rename_blocks(ckpt):
            ckpt.state_dict = {{
                k.replace("blocks.", "layers."): v for k, v in ckpt.state_dict.items()
            }}
        """)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "migrations"
    write(root / "alpha.py", migration_source("alpha"))
    write(
        root / "beta.py", migration_source("beta", current="3.0.0").replace('"2.0.0")', '"3.0.0")')
    )
    write(root / "_private.py", "raise RuntimeError('files starting with _ are not imported')\n")
    write(root / "notes.txt", "not python")
    return root


def test_a_folder_of_migration_files_registers_each_schema(folder):
    found = find_schemas([str(folder)])
    assert sorted(found) == ["alpha", "beta"]
    assert str(found["beta"].current) == "3.0.0"
    assert [(str(s.source), str(s.target)) for s in found["alpha"].steps] == [("1.0.0", "2.0.0")]
    assert found["alpha"].origin.endswith("alpha.py")


def test_a_fifo_named_like_a_migration_file_is_skipped_not_opened(folder):
    # opening a FIFO blocks until a writer comes: the import would hang every command
    fifo = folder / "x.py"
    os.mkfifo(fifo)
    done = subprocess.run(
        [sys.executable, "-m", "ckptmigrate", "history", "--migrations", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "alpha" in done.stdout and "beta" in done.stdout


def test_a_single_python_file_is_a_source(folder):
    assert list(find_schemas([str(folder / "alpha.py")])) == ["alpha"]


def test_importing_the_same_folder_twice_gives_the_same_schema_objects(folder):
    first = find_schemas([str(folder)])
    second = find_schemas([str(folder)])
    assert first["alpha"] is second["alpha"]
    assert first["beta"] is second["beta"]
    assert len(second["alpha"].steps) == 1  # not registered twice


def test_a_dotted_module_is_a_source(tmp_path, monkeypatch):
    package = unique("team_models")
    write(tmp_path / "site" / package / "__init__.py", "")
    write(tmp_path / "site" / package / "migrations.py", migration_source("gamma"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    found = find_schemas([f"{package}.migrations"])
    assert list(found) == ["gamma"]


def test_pyproject_migrations_are_used_from_the_current_folder(tmp_path, folder, monkeypatch):
    write(tmp_path / "pyproject.toml", '[tool.ckptmigrate]\nmigrations = ["migrations"]\n')
    monkeypatch.chdir(tmp_path)
    assert sorted(find_schemas()) == ["alpha", "beta"]


def test_explicit_sources_win_over_pyproject(tmp_path, folder, monkeypatch):
    write(tmp_path / "pyproject.toml", '[tool.ckptmigrate]\nmigrations = ["migrations"]\n')
    write(tmp_path / "other" / "delta.py", migration_source("delta"))
    monkeypatch.chdir(tmp_path)
    assert list(find_schemas([str(tmp_path / "other")])) == ["delta"]


def test_load_resolves_a_schema_by_name_through_pyproject(tmp_path, folder, monkeypatch):
    write(tmp_path / "pyproject.toml", '[tool.ckptmigrate]\nmigrations = ["migrations"]\n')
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "old.pth"
    cm.save(p, {"blocks.0.weight": torch.ones(1)}, schema="alpha", version="1.0.0")
    assert list(cm.load(p, schema="alpha").state_dict) == ["layers.0.weight"]
    with pytest.raises(cm.SchemaMismatchError, match="no schema named 'nonexistent'") as info:
        cm.load(p, schema="nonexistent")
    assert "alpha" in str(info.value) and "beta" in str(info.value)


def fake_entry_points(monkeypatch, values: list[str]) -> None:
    eps = [
        importlib.metadata.EntryPoint(name=f"ep{i}", value=value, group=discovery.ENTRY_POINT_GROUP)
        for i, value in enumerate(values)
    ]

    def entry_points(**params):
        assert params == {"group": discovery.ENTRY_POINT_GROUP}
        return eps

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_entry_points_are_used_without_sources_or_pyproject(tmp_path, monkeypatch):
    module_a, module_b = unique("ep_mod_a"), unique("ep_mod_b")
    write(tmp_path / "site" / f"{module_a}.py", migration_source("epsilon"))
    write(tmp_path / "site" / f"{module_b}.py", migration_source("zeta"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.chdir(tmp_path)  # no pyproject.toml here
    fake_entry_points(monkeypatch, [module_a, f"{module_b}:schema"])
    found = find_schemas()
    assert sorted(found) == ["epsilon", "zeta"]
    assert module_a in found["epsilon"].origin


def test_a_broken_entry_point_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_entry_points(monkeypatch, [unique("no_such_module")])
    with pytest.raises(cm.CkptMigrateError, match="entry point"):
        find_schemas()


def test_two_files_with_different_schemas_of_one_name_raise_naming_both(tmp_path):
    root = tmp_path / "clash"
    first = write(root / "one.py", migration_source("same"))
    second = write(root / "two.py", migration_source("same"))
    with pytest.raises(cm.DuplicateSchemaError) as info:
        find_schemas([str(root)])
    assert info.value.name == "same"
    message = str(info.value)
    assert str(first.resolve()) in message or first.name in message
    assert str(second.resolve()) in message or second.name in message
    assert "one.py" in message and "two.py" in message


def test_the_same_name_from_two_sources_is_a_duplicate(tmp_path, folder):
    write(tmp_path / "elsewhere" / "alpha_again.py", migration_source("alpha"))
    with pytest.raises(cm.DuplicateSchemaError, match="alpha_again.py"):
        find_schemas([str(folder), str(tmp_path / "elsewhere")])


def test_a_source_that_is_neither_folder_file_nor_module_is_a_clear_error(tmp_path):
    with pytest.raises(cm.CkptMigrateError, match="neither a folder"):
        import_source(unique("missing_module"))


def test_a_migration_file_that_fails_to_import_is_a_clear_error(tmp_path):
    write(tmp_path / "bad" / "broken.py", "import ckptmigrate\n1 / 0\n")
    with pytest.raises(cm.CkptMigrateError, match="broken.py") as info:
        find_schemas([str(tmp_path / "bad")])
    assert isinstance(info.value.__cause__, ZeroDivisionError)


# -- the project's configuration, found from any subfolder ---------------------------------------

MYNET = """
from torch import nn


class MyNet(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        return self.proj(x)
"""

MYNET_MIGRATIONS = """
import ckptmigrate as cm
from mynet import MyNet  # the project's own model code, beside pyproject.toml

schema = cm.Schema("mynet", current="2.0.0", build=lambda hp: MyNet(**hp))
schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("fc.", "proj.")])
"""


@pytest.fixture
def mynet_project(tmp_path) -> Path:
    """A project whose migrations file ``migrations/mynet.py`` imports ``mynet`` from its root."""
    root = tmp_path / "project"
    write(root / "pyproject.toml", '[tool.ckptmigrate]\nmigrations = ["migrations"]\n')
    write(root / "mynet.py", MYNET)
    write(root / "migrations" / "mynet.py", MYNET_MIGRATIONS)
    (root / "src" / "deep").mkdir(parents=True)
    return root


def test_the_configuring_pyproject_is_found_from_a_subfolder(mynet_project, monkeypatch):
    write(mynet_project / "src" / "pyproject.toml", "[tool.black]\nline-length = 100\n")
    monkeypatch.chdir(mynet_project / "src" / "deep")
    config = discovery.find_config()
    assert config is not None and config.folder == mynet_project.resolve()
    # relative paths resolve against that pyproject's folder, not the working folder
    assert discovery.configured("migrations") == [str(mynet_project.resolve() / "migrations")]


def test_the_walk_stops_at_the_top_of_a_git_work_tree(tmp_path, monkeypatch):
    write(tmp_path / "pyproject.toml", '[tool.ckptmigrate]\nmigrations = ["migrations"]\n')
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    (tmp_path / "repo" / "src").mkdir()
    monkeypatch.chdir(tmp_path / "repo" / "src")
    assert discovery.find_config() is None
    assert discovery.configured("migrations") == []


def test_the_project_folder_is_on_sys_path_only_while_migrations_import(mynet_project, monkeypatch):
    monkeypatch.chdir(mynet_project / "src" / "deep")
    monkeypatch.delitem(sys.modules, "mynet", raising=False)
    before = list(sys.path)
    found = find_schemas()
    assert list(found) == ["mynet"]
    assert type(found["mynet"].build({"width": 3})).__name__ == "MyNet"
    assert sys.path == before


def console_script(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"the {name} console script is not installed"
    return found


def test_the_console_script_imports_the_projects_code_from_a_subfolder(mynet_project):
    """``ckptmigrate`` (not ``python -m``) has no working folder on sys.path of its own."""
    old = mynet_project / "src" / "deep" / "old.pth"
    cm.save(old, {"fc.weight": torch.ones(4, 4)}, schema="mynet", version="1.0.0")
    done = subprocess.run(
        [console_script("ckptmigrate"), "upgrade", "old.pth", "-o", "new.pth"],
        cwd=old.parent,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert list(torch.load(old.parent / "new.pth", weights_only=True)["state_dict"]) == [
        "proj.weight"
    ]


@pytest.mark.parametrize("when", ["at import", "when building"])
def test_the_pytest_plugin_imports_the_projects_code_from_a_subfolder(mynet_project, when):
    from processes import run_pytest, summary
    from toy import write_fixture

    if when == "when building":
        write(mynet_project / "migrations" / "mynet.py", LAZY_MIGRATIONS)

    class OldNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    write(
        mynet_project / "pyproject.toml",
        '[tool.ckptmigrate]\nmigrations = ["migrations"]\nfixtures = ["fixtures"]\n',
    )
    fixture = write_fixture(mynet_project / "fixtures" / "mynet", OldNet(), "1.0.0", {})
    raw = torch.load(fixture, weights_only=True)  # write_fixture stamps its own schema name
    raw["__ckptmigrate__"]["schema"] = "mynet"
    torch.save(raw, fixture)
    golden = torch.load(fixture.with_name("1.0.0.golden.pt"), weights_only=True)
    golden["schema"] = "mynet"
    torch.save(golden, fixture.with_name("1.0.0.golden.pt"))
    done = run_pytest(mynet_project / "src" / "deep")
    assert "1 passed" in summary(done), done.stdout + done.stderr


LAZY_MIGRATIONS = """
import ckptmigrate as cm


def build(hp):
    from mynet import MyNet  # imported only when a model is built, after discovery

    return MyNet(**hp)


schema = cm.Schema("mynet", current="2.0.0", build=build)
schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("fc.", "proj.")])
"""


def test_a_build_that_imports_the_projects_code_late_works_under_the_console_script(
    mynet_project,
):
    write(mynet_project / "migrations" / "mynet.py", LAZY_MIGRATIONS)
    old = mynet_project / "src" / "deep" / "old.pth"
    cm.save(
        old,
        {"fc.weight": torch.ones(4, 4), "fc.bias": torch.zeros(4)},
        schema="mynet",
        version="1.0.0",
        hparams={"width": 4},
    )
    done = subprocess.run(
        [console_script("ckptmigrate"), "diff", "old.pth", "--model", "mynet"],
        cwd=old.parent,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_diff_of_two_files_never_reads_the_projects_pyproject(mynet_project):
    """Only a command that looks for migrations reads pyproject.toml (and imports tomllib):
    a diff of two stamped files inside a project starts as fast as one outside it."""
    here = mynet_project / "src" / "deep"
    for name, key, version in (("a.pth", "fc.weight", "1.0.0"), ("b.pth", "proj.weight", "2.0.0")):
        cm.save(here / name, {key: torch.ones(4, 4)}, schema="mynet", version=version)
    probe = (
        "import sys\n"
        "from ckptmigrate.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print(code, 'tomllib' in sys.modules, 'mynet' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, "diff", "a.pth", "b.pth"],
        cwd=here,
        capture_output=True,
        text=True,
    )
    assert done.stdout.split()[-3:] == ["1", "False", "False"], done.stdout + done.stderr
    done = subprocess.run(  # --upgrade looks for migrations: the project's are found
        [sys.executable, "-c", probe, "diff", "a.pth", "b.pth", "--upgrade"],
        cwd=here,
        capture_output=True,
        text=True,
    )
    assert done.stdout.split()[-3:] == ["0", "True", "True"], done.stdout + done.stderr
