"""Where migrations come from: folders, dotted modules, pyproject.toml, entry points."""

from __future__ import annotations

import importlib.metadata
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

import ckptmigrate as cm
from ckptmigrate import discovery
from ckptmigrate.discovery import find_schemas, import_source


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
