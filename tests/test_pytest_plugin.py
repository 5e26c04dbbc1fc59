"""The pytest plugin: an out-of-tree project gets one test per legacy fixture from it alone."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from processes import run_pytest, summary
from torch import nn
from toy import write_fixture

MIGRATIONS = '''
"""toy: 1.0.0 called its projection `fc`; 2.0.0 calls it `proj` and adds a `scale` hparam."""
import torch
from torch import nn

import ckptmigrate as cm


class Toy(nn.Module):
    def __init__(self, width=4, scale=2.0):
        super().__init__()
        self.scale = scale
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        return self.proj(x) * self.scale


schema = cm.Schema("toy", current="2.0.0", build=lambda hp: Toy(**hp))
schema.add_migration(
    "1.0.0",
    "2.0.0",
    [cm.ops.RenamePrefix("fc.", "proj."), cm.ops.SetHparam("scale", 1.0, overwrite=False)],
    breaking=True,
)
'''


class OldToy(nn.Module):
    """The project's model as version 1.0.0 had it: the fixture is written by this code."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Toy_2_0(nn.Module):
    """Version 2.0.0 as it was written (a frozen copy of the migrations file's Toy)."""

    def __init__(self, width: int = 4, scale: float = 2.0) -> None:
        super().__init__()
        self.scale = scale
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.scale


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's project: migrations, fixtures written by old and current code, pyproject."""
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "toy.py").write_text(MIGRATIONS)
    torch.manual_seed(0)
    write_fixture(tmp_path / "fixtures" / "toy", OldToy(), "1.0.0", {"width": 4})
    write_fixture(tmp_path / "fixtures" / "toy", Toy_2_0(), "2.0.0", {"width": 4, "scale": 2.0})
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent("""
            [tool.ckptmigrate]
            migrations = ["migrations"]
            fixtures = ["fixtures"]
            """))
    return tmp_path


def nudge(path: Path, key: str) -> None:
    raw = torch.load(path, weights_only=True)
    raw["state_dict"][key] = raw["state_dict"][key] + 1e-3
    torch.save(raw, path)


def test_a_project_gets_one_test_per_fixture_from_the_plugin_alone(project):
    done = run_pytest(project)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\b2 passed\b", summary(done)), summary(done)
    assert "fixtures/toy/1.0.0.golden.pt::toy-1.0.0 PASSED" in done.stdout


def test_a_nudged_fixture_fails_its_test_with_the_reason(project):
    nudge(project / "fixtures" / "toy" / "1.0.0.pth", "fc.bias")
    done = run_pytest(project)
    assert done.returncode == 1
    assert re.search(r"\b1 failed, 1 passed\b", summary(done)), summary(done)
    assert "toy-1.0.0 FAILED" in done.stdout
    assert "differs from the golden output: max abs error" in done.stdout


def test_a_run_naming_other_paths_leaves_the_fixtures_out(project):
    (project / "tests").mkdir()
    (project / "tests" / "test_nothing.py").write_text("def test_ok():\n    pass\n")
    done = run_pytest(project, "tests")
    assert re.search(r"\b1 passed\b", summary(done)), summary(done)
    assert "golden" not in done.stdout


def test_command_line_options_configure_a_project_without_settings(project):
    (project / "pyproject.toml").unlink()
    (project / "pytest.ini").write_text("[pytest]\n")
    done = run_pytest(project, "--ckpt-fixtures", "fixtures", "--ckpt-migrations", "migrations")
    assert re.search(r"\b2 passed\b", summary(done)), summary(done)


def test_pytest_ini_options_configure_the_plugin(project):
    (project / "pyproject.toml").write_text(textwrap.dedent("""
            [tool.pytest.ini_options]
            ckpt_fixtures = ["fixtures"]
            ckpt_migrations = ["migrations"]
            """))
    done = run_pytest(project)
    assert re.search(r"\b2 passed\b", summary(done)), summary(done)


def test_ckpt_fixture_serves_custom_tests_and_fixtures_outside_testpaths_still_run(project):
    pyproject = project / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text() + '[tool.pytest.ini_options]\ntestpaths = ["tests"]\n'
    )
    (project / "tests").mkdir()
    (project / "tests" / "test_custom.py").write_text(textwrap.dedent("""
            def test_upgraded_fixture_has_the_new_layout(ckpt_fixture):
                ckpt = ckpt_fixture("fixtures/toy/1.0.0.pth")
                assert set(ckpt.state_dict) == {"proj.weight", "proj.bias"}
                assert ckpt.hparams == {"width": 4, "scale": 1.0}
                assert str(ckpt.version) == "2.0.0"

            def test_stored_fixture_is_untouched(ckpt_fixture):
                ckpt = ckpt_fixture("fixtures/toy/1.0.0.pth", upgrade=False)
                assert "fc.weight" in ckpt.state_dict

            def test_fixtures_are_listed_and_checked(ckpt_fixture):
                fixtures = ckpt_fixture.all()
                assert [f.version for f in fixtures] == ["1.0.0", "2.0.0"]
                assert all(ckpt_fixture.check(f).ok for f in fixtures)
                assert ckpt_fixture.golden(fixtures[0])["input"].shape == (2, 4)
            """))
    done = run_pytest(project)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\b5 passed\b", summary(done)), summary(done)


def test_importing_the_plugin_does_not_import_torch():
    code = "import sys, ckptmigrate.pytest_plugin; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr
