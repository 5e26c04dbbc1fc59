"""The registry: one way to find a schema, one error for an unknown name, one pyproject reader,
one answer to "is it behind", one ``from_version`` rule and one planned-step record."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

import ckptmigrate as cm
from ckptmigrate import cli
from ckptmigrate.engine.inplace import migrate_file
from ckptmigrate.errors import UnknownSchemaError
from ckptmigrate.inspection.fixtures import check_fixture, fixture_from_golden
from ckptmigrate.inspection.scan import scan
from ckptmigrate.schema import discovery, registry
from ckptmigrate.schema.registry import get_schema, list_schemas, pick_schema, schema_status

MIGRATIONS = """
import torch
from torch import nn

import ckptmigrate as cm


class Toy(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


schema = cm.Schema("toy", current="3.0.0", build=lambda hp: Toy(hp.get("width", 4)))
schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("blocks.", "layers.")])
schema.add_migration("2.0.0", "3.0.0", [cm.ops.SetHparam("width", 4, overwrite=False)])
"""

#: a typo of the one schema there is: every lookup must say the same about it
TYPO = "tyo"


def toy_sd(prefix: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {f"{prefix}.{i}.{p}": torch.randn(4, 4 if p == "weight" else 1).squeeze(-1)
            for i in range(2) for p in ("weight", "bias")}  # fmt: skip


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project configured by pyproject (``migrations = "mig"``, a string), worked in from it:
    a.pth (toy 1.0.0), b.pth (toy 3.0.0), raw.pth (unstamped)."""
    (tmp_path / "mig").mkdir()
    (tmp_path / "mig" / "toy.py").write_text(MIGRATIONS)
    (tmp_path / "pyproject.toml").write_text(
        '[tool.ckptmigrate]\nmigrations = "mig"\nfixtures = "fixtures"\n'
    )
    cm.save(tmp_path / "a.pth", toy_sd("blocks"), schema="toy", version="1.0.0")
    cm.save(tmp_path / "b.pth", toy_sd("layers"), schema="toy", version="3.0.0")
    torch.save(toy_sd("blocks"), tmp_path / "raw.pth")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def schemas(project: Path) -> dict[str, cm.Schema]:
    return registry.find_schemas([str(project / "mig")])


def write_fixture(project: Path, schema_name: str) -> Path:
    """A fixture at 3.0.0 written by today's Toy, its golden record naming ``schema_name``."""
    model = schemas(project)["toy"].build({"width": 4}).eval()
    folder = project / "fixtures" / "toy"
    folder.mkdir(parents=True, exist_ok=True)
    x = torch.linspace(-1, 1, 8).reshape(2, 4)
    with torch.no_grad():
        y = model(x)
    cm.save(folder / "3.0.0.pth", model.state_dict(), schema=schema_name, version="3.0.0")
    golden = {"fixture": "3.0.0.pth", "schema": schema_name, "version": "3.0.0", "variant": None}
    golden |= {"input": x, "output": y, "atol": 1e-6, "rtol": 1e-6, "hparams": {"width": 4}}
    torch.save(golden, folder / "3.0.0.golden.pt")
    return folder / "3.0.0.golden.pt"


def run_pytest(cwd: Path) -> subprocess.CompletedProcess[str]:
    plugin = []
    if not any(ep.value == "ckptmigrate.pytest_plugin" for ep in entry_points(group="pytest11")):
        plugin = ["-p", "ckptmigrate.pytest_plugin"]
    quiet = ["-v", "-p", "no:cacheprovider", "-p", "no:hypothesispytest"]
    command = [sys.executable, "-m", "pytest", *quiet, *plugin]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd)


def cli_raises(*args: str) -> UnknownSchemaError:
    """What the command raises under ``--debug`` (the error the one-line message renders)."""
    with pytest.raises(UnknownSchemaError) as info:
        cli.main([*args, "--debug"])
    return info.value


# -- one error for an unknown name ---------------------------------------------------------------


def test_an_unknown_schema_is_one_error_from_every_entry_point(project: Path) -> None:
    model = schemas(project)["toy"].build({})
    fixture = fixture_from_golden(write_fixture(project, TYPO))
    from_python = []
    for call in (
        lambda: cm.load("raw.pth", schema=TYPO, from_version="1.0.0"),
        lambda: cm.attach(model, TYPO),
        lambda: cm.diff("raw.pth", "b.pth", upgrade=True, schema=TYPO, from_version="1.0.0"),
        lambda: cm.diff("raw.pth", "raw.pth", upgrade=True, schema=TYPO, from_version="1.0.0"),
        lambda: migrate_file("a.pth", "out.pth", schemas=schemas(project), schema=TYPO),
        lambda: get_schema(TYPO),
    ):
        with pytest.raises(UnknownSchemaError) as info:
            call()
        from_python.append(info.value)
    from_cli = [
        cli_raises("upgrade", "raw.pth", "-o", "o.pth", "--schema", TYPO, "--from-version", "1"),
        cli_raises("upgrade", "a.pth", "-o", "o.pth", "--schema", TYPO),  # stamped: still unknown
        cli_raises(
            "diff", "raw.pth", "b.pth", "--upgrade", "--schema", TYPO, "--from-version", "1"
        ),
        cli_raises("diff", "raw.pth", "--model", TYPO, "--from-version", "1.0.0"),
        cli_raises("history", TYPO),
        cli_raises("stamp", "raw.pth", "--schema", TYPO, "--guess", "-o", "s.pth"),
    ]
    for exc in from_python + from_cli:
        assert type(exc) is UnknownSchemaError
        assert (exc.expected, exc.known, exc.nearest) == (TYPO, ["toy"], "toy")
    assert {str(exc) for exc in from_python + from_cli} == {str(from_python[0])}
    message = str(from_python[0])
    assert message.startswith(f"no schema named {TYPO!r} was discovered (found: toy; did you")
    # the fixture check (pytest plugin, ckptmigrate check) reports the same sentence, CLI-phrased
    reason = check_fixture(fixture, schemas(project)).reason
    assert reason == from_cli[0].render(cli=True) and "--migrations PATH" in reason


def test_the_one_line_of_the_cli_is_the_errors_cli_rendering(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = UnknownSchemaError(TYPO, ["toy"]).render(cli=True)
    for args in (["history", TYPO], ["upgrade", "a.pth", "-o", "o.pth", "--schema", TYPO]):
        assert cli.main(args) == 2
        assert capsys.readouterr().err.strip() == f"ckptmigrate: error: {expected}"


def test_the_pytest_plugin_reports_an_unknown_schema_with_the_same_error(project: Path) -> None:
    write_fixture(project, TYPO)
    (project / "tests").mkdir()
    (project / "tests" / "test_custom.py").write_text(textwrap.dedent("""
        import pytest
        from ckptmigrate.errors import UnknownSchemaError

        def test_the_fixture_helper_raises_the_one_error(ckpt_fixture):
            with pytest.raises(UnknownSchemaError) as info:
                ckpt_fixture("fixtures/toy/3.0.0.pth")
            assert info.value.nearest == "toy"
            assert isinstance(info.value, LookupError)  # what it raised before
        """))
    done = run_pytest(project)
    assert "test_the_fixture_helper_raises_the_one_error PASSED" in done.stdout, done.stdout
    assert UnknownSchemaError(TYPO, ["toy"]).render(cli=True) in done.stdout
    assert "1 failed, 1 passed" in done.stdout


def test_get_schema_and_list_schemas_are_lookups_over_a_table() -> None:
    a, b = cm.Schema("beta", current="1.0"), cm.Schema("alpha", current="1.0")
    assert list_schemas([a, b]) == ["alpha", "beta"] == cm.list_schemas({"beta": a, "alpha": b})
    assert get_schema("beta", [a, b]) is a and cm.get_schema(a, []) is a
    with pytest.raises(UnknownSchemaError) as info:
        get_schema("zzzzzz", [a, b])
    assert info.value.nearest is None and "did you mean" not in str(info.value)
    assert isinstance(info.value, cm.SchemaMismatchError) and isinstance(info.value, LookupError)


def test_pick_schema_takes_the_stamp_then_the_name_then_the_only_one(project: Path) -> None:
    table = schemas(project)
    raw = cm.load("raw.pth", upgrade=False)
    assert pick_schema(raw, table).name == "toy"  # the only one
    assert pick_schema(raw, table, fallback="toy").name == "toy"
    with pytest.raises(cm.UnversionedCheckpointError):
        pick_schema(raw, {**table, "other": cm.Schema("other", current="1.0")})
    stamped = cm.load("a.pth", upgrade=False)
    with pytest.raises(cm.SchemaMismatchError) as info:
        pick_schema(stamped, {**table, "other": cm.Schema("other", current="1.0")}, "other")
    assert type(info.value) is cm.SchemaMismatchError


def test_discovery_is_a_name_for_the_registry() -> None:
    assert discovery.find_schemas is registry.find_schemas
    assert discovery.find_config is registry.find_config
    assert discovery.configured is registry.configured


# -- one pyproject reader --------------------------------------------------------------------------


def test_the_cli_and_the_plugin_find_the_same_pyproject_from_a_subfolder(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_fixture(project, "toy")
    sub = project / "pkg"
    sub.mkdir()
    (sub / "pytest.ini").write_text("[pytest]\n")  # pytest's config file is here, not above
    monkeypatch.chdir(sub)
    assert registry.find_config().folder == project.resolve()
    assert cli.main(["history", "--json"]) == 0
    assert [row["schema"] for row in json.loads(capsys.readouterr().out)] == ["toy"]
    done = run_pytest(sub)
    assert "toy-3.0.0 PASSED" in done.stdout, done.stdout + done.stderr


def test_a_pyproject_larger_than_any_project_file_is_refused_unparsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ckptmigrate.schema.project import MAX_PYPROJECT_BYTES

    (tmp_path / ".git").mkdir()  # the walk up stops here
    filler = "# " + "x" * 1000 + "\n"
    body = '[tool.ckptmigrate]\nmigrations = ["m"]\n'
    (tmp_path / "pyproject.toml").write_text(body + filler * (MAX_PYPROJECT_BYTES // 1000))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cm.CkptMigrateError, match="larger than"):
        registry.find_config()
    assert cli.main(["history"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pyproject.toml" in err and "larger than" in err
    (tmp_path / "pyproject.toml").write_text(body + filler)  # a normal size reads
    assert registry.find_config().section == {"migrations": ["m"]}


# -- one answer to "is it behind" ------------------------------------------------------------------


@pytest.fixture()
def registry_tree(project: Path) -> Path:
    """Files behind, current, newer than the code, off the graph, and of an unknown schema."""
    root = project / "runs"
    root.mkdir()
    for name, schema_name, version in (
        ("behind", "toy", "1.0.0"),
        ("current", "toy", "3.0.0"),
        ("newer", "toy", "9.0.0"),
        ("offgraph", "toy", "1.5.0"),
        ("unknown", TYPO, "1.0.0"),
    ):
        cm.save(root / f"{name}.pth", toy_sd("blocks"), schema=schema_name, version=version)
    return root


def test_info_and_scan_agree_on_behind_for_the_same_files(
    project: Path, registry_tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = {Path(r.path).stem: r for r in scan(registry_tree, schemas(project))}
    for name, row in rows.items():
        assert cli.main(["info", str(registry_tree / f"{name}.pth"), "--json"]) == 0
        status = json.loads(capsys.readouterr().out)["status"]
        assert status["registered"] == (row.current is not None), name
        assert status.get("behind") == row.behind, name
        assert ("error" in status) == (row.error is not None), name
        assert [p["step"] for p in status.get("plan") or []] == row.steps, name
    verdicts = {name: (row.behind, row.error is not None) for name, row in rows.items()}
    assert verdicts == {
        "behind": (True, False),
        "current": (False, False),
        "newer": (False, True),  # newer than the code: not behind, and not "current" either
        "offgraph": (True, True),
        "unknown": (None, True),
    }
    assert rows["unknown"].error == str(UnknownSchemaError(TYPO, ["toy"]))


def test_scan_does_not_call_a_file_newer_than_the_code_current(
    project: Path, registry_tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["scan", str(registry_tree)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "newer.pth" in x)
    assert "current" not in line.replace("current version", "") and "newer than 3.0.0" in line


@pytest.mark.parametrize(
    ("version", "behind", "steps", "error"),
    [("1.0.0", True, 2, None), ("3.0.0", False, 0, None), ("9.0.0", False, None, "newer than")],
)
def test_schema_status_is_the_one_verdict(version, behind, steps, error, project: Path) -> None:
    status = schema_status("toy", version, schemas(project))
    assert status.registered and status.behind is behind
    assert (None if status.plan is None else len(status.plan)) == steps
    assert (error is None) == (status.error is None)
    assert error is None or error in str(status.error)


# -- one from_version rule, one planned-step record ----------------------------------------------


def test_a_from_version_that_contradicts_the_stamp_is_one_error_everywhere(project: Path) -> None:
    table = schemas(project)
    raised = []
    for call in (
        lambda: cm.load("a.pth", schema=table["toy"], from_version="2.0.0"),
        lambda: cm.diff("a.pth", "b.pth", upgrade=True, schemas=table, from_version="2.0.0"),
        lambda: migrate_file("a.pth", "o.pth", schemas=table, from_version="2.0.0"),
        lambda: cm.upgrade_file("a.pth", "o.pth", table["toy"], from_version="2.0.0"),
    ):
        with pytest.raises(cm.VersionConflictError) as info:
            call()
        raised.append(info.value)
    assert {(str(e.stamped), str(e.given)) for e in raised} == {("1.0.0", "2.0.0")}
    assert not (project / "o.pth").exists()


def test_every_plan_listing_is_the_planned_step_record(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = schemas(project)
    records = [p.record() for p in table["toy"].plan("1.0.0")]
    assert cm.diff("a.pth", "b.pth", upgrade=True, schemas=table).upgrade["steps"] == records
    assert migrate_file("a.pth", None, schemas=table, dry_run=True).plan == records
    assert cli.main(["info", "a.pth", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"]["plan"] == records
    assert cli.main(["diff", "a.pth", "b.pth", "--upgrade", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["upgrade"]["steps"] == records
