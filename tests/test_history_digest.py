"""History that cannot lie: each applied step records a digest of its code, and a step edited
after it ran on a file is a warning wherever the file meets today's migrations: ``cm.load``
(and ``cm.upgrade``), ``ckptmigrate check``, ``info`` (the history listing marks the step) and
``diff --upgrade``.

The toy project (``tests/toy.py``) is written three times as migrations files: as it ran, with
``pin_width``'s body edited, and only reformatted (comments, a docstring, other layout), which
is no edit. Each is a real module in its own folder, imported as discovery imports it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import ckptmigrate as cm
from ckptmigrate.schema.provenance import function_digest
from ckptmigrate.schema.registry import find_schemas
from tests.processes import run
from tests.toy import TOY_MIGRATIONS_WITH_MODEL, toy_sd, write_golden

AS_RAN = TOY_MIGRATIONS_WITH_MODEL
PIN = """def pin_width(ckpt):
    ckpt.hparams.setdefault("width", 4)
"""
assert PIN in AS_RAN
EDITED = AS_RAN.replace(
    PIN,
    """def pin_width(ckpt):
    ckpt.hparams.setdefault("width", 4)
    ckpt.meta["pinned"] = "width"
""",
)
REFORMATTED = AS_RAN.replace(
    PIN,
    '''def pin_width(ckpt):
    """2.0.0 -> 3.0.0: the width of old files was 4."""
    # files before 3.0.0 never recorded it
    ckpt.hparams.setdefault(
        "width",
        4,
    )
''',
)
OPS_EDITED = AS_RAN.replace(
    '[cm.ops.RenamePrefix("blocks.", "layers.")]',
    '[cm.ops.RenamePrefix("blocks.", "layers.", missing_ok=True)]',
)


def migrations(tmp_path: Path, name: str, source: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "toy_migrations.py").write_text(source)
    return folder


def schema_of(folder: Path) -> cm.Schema:
    return find_schemas([str(folder)])["toy"]


@pytest.fixture
def project(tmp_path):
    """The migrations as they ran, and a toy 3.0.0 file they upgraded from 1.0.0."""
    ran = migrations(tmp_path, "ran", AS_RAN)
    source = tmp_path / "toy-1.0.0.pth"
    cm.save(source, toy_sd(), schema="toy", version="1.0.0", hparams={"layers": 2})
    path = tmp_path / "toy-3.0.0.pth"
    cm.save(path, cm.load(source, schema=schema_of(ran)))
    return tmp_path, ran, path


def no_warnings(call):
    with warnings.catch_warnings():
        warnings.simplefilter("error", cm.CkptMigrateWarning)
        return call()


def test_each_applied_step_records_the_digest_of_its_code(project):
    _, _, path = project
    history = cm.load(path, upgrade=False).history
    assert [h["step"] for h in history] == ["rename prefix 'blocks.' -> 'layers.'", "pin_width"]
    ops_step, function_step = (h["digest"] for h in history)
    assert ops_step["of"] == "ops" and function_step["of"] == "source"
    assert all(len(d["sha256"]) == 64 for d in (ops_step, function_step))
    # the same source gives the same digest, in another module, in another folder
    again = schema_of(migrations(project[0], "again", AS_RAN))
    assert cm.upgrade(cm.load(project[0] / "toy-1.0.0.pth"), again).history[1]["digest"] == (
        function_step
    )


def test_the_code_that_ran_loads_its_file_without_a_warning(project):
    tmp_path, ran, path = project
    ckpt = no_warnings(lambda: cm.load(path, schema=schema_of(ran)))
    assert str(ckpt.version) == "3.0.0"
    reformatted = schema_of(migrations(tmp_path, "reformatted", REFORMATTED))
    no_warnings(lambda: cm.load(path, schema=reformatted))  # comments and layout are no edit


def test_an_edited_function_step_warns_on_load_naming_the_step_and_the_file(project):
    tmp_path, _, path = project
    edited = schema_of(migrations(tmp_path, "edited", EDITED))
    with pytest.warns(cm.HistoryEditedWarning) as caught:
        ckpt = cm.load(path, schema=edited)
    (warning,) = [w.message for w in caught if isinstance(w.message, cm.HistoryEditedWarning)]
    assert warning.schema == "toy" and warning.path == str(path)
    assert [(s["from"], s["to"], s["step"]) for s in warning.steps] == [
        ("2.0.0", "3.0.0", "pin_width")
    ]
    assert "pin_width" in str(warning) and str(path) in str(warning)
    assert str(ckpt.version) == "3.0.0"  # a warning: the file still loads as it is
    with pytest.warns(cm.HistoryEditedWarning):
        cm.upgrade(cm.load(path, upgrade=False), edited)


def test_an_edited_op_step_warns(project):
    tmp_path, _, path = project
    edited = schema_of(migrations(tmp_path, "ops", OPS_EDITED))
    with pytest.warns(cm.HistoryEditedWarning) as caught:
        cm.load(path, schema=edited)
    steps = [s["step"] for w in caught for s in getattr(w.message, "steps", [])]
    assert steps == ["rename prefix 'blocks.' -> 'layers.'"]


def test_files_written_before_digests_and_malformed_digests_are_not_judged(project):
    tmp_path, _, path = project
    edited = schema_of(migrations(tmp_path, "edited", EDITED))
    ckpt = cm.load(path, upgrade=False)
    for digest in (None, "not a dict", {"of": "source", "sha256": 5}, {"of": "mystery"}):
        ckpt.history = [
            {
                **{k: v for k, v in h.items() if k != "digest"},
                **({} if digest is None else {"digest": digest}),
            }
            for h in ckpt.history
        ]
        cm.save(path, ckpt)
        assert str(no_warnings(lambda: cm.load(path, schema=edited)).version) == "3.0.0"


def test_an_edited_step_in_a_mounts_history_warns_naming_the_mount(tmp_path):
    ran, edited = (
        schema_of(migrations(tmp_path, n, s)) for n, s in [("ran", AS_RAN), ("edited", EDITED)]
    )
    sd = {f"net.{k}": v for k, v in toy_sd().items()}
    path = tmp_path / "lit.pth"
    cm.save(path, sd, schema="toy", version="1.0.0", prefix="net.")
    cm.save(path, cm.load(path, schema=ran))
    no_warnings(lambda: cm.load(path, schema=ran))
    with pytest.warns(cm.HistoryEditedWarning, match="mount at 'net.'"):
        cm.load(path, schema=edited)


def test_a_function_without_source_is_digested_by_its_bytecode_and_the_interpreter():
    scope: dict = {}
    exec("def f(ckpt):\n    ckpt.hparams['a'] = 1\n", scope)
    exec("def g(ckpt):\n    ckpt.hparams['a'] = 1\n", scope)
    exec("def h(ckpt):\n    ckpt.hparams['a'] = 2\n", scope)
    digest = function_digest(scope["f"])
    assert digest["of"] == "bytecode" and digest["python"].count("-") == 1
    assert function_digest(scope["g"]) == digest
    assert function_digest(scope["h"]) != digest


# -- the commands --------------------------------------------------------------------------------


def test_info_marks_the_edited_step_in_the_history_listing(project):
    tmp_path, ran, path = project
    edited = migrations(tmp_path, "edited", EDITED)
    clean = run(tmp_path, "info", str(path), "--migrations", str(ran))
    assert clean.returncode == 0, clean.stderr
    assert "[edited since applied]" not in clean.stdout and "warning" not in clean.stderr
    proc = run(tmp_path, "info", str(path), "--migrations", str(edited))
    assert proc.returncode == 0, proc.stderr
    marked = [line for line in proc.stdout.splitlines() if "[edited since applied]" in line]
    assert len(marked) == 1 and "2.0.0 -> 3.0.0  pin_width" in marked[0]
    assert "ckptmigrate: warning:" in proc.stderr and "pin_width" in proc.stderr
    record = json.loads(
        run(tmp_path, "info", str(path), "--json", "--migrations", str(edited)).stdout
    )
    assert [(e["index"], e["step"]) for e in record["status"]["edited"]] == [(1, "pin_width")]


def test_scan_and_the_catalog_name_the_edited_step(project):
    tmp_path, ran, path = project
    edited = migrations(tmp_path, "edited", EDITED)
    root = path.parent
    clean = json.loads(run(tmp_path, "scan", str(root), "--json", "--migrations", str(ran)).stdout)
    assert clean and all(row["edited"] == [] for row in clean)
    rows = json.loads(
        run(tmp_path, "scan", str(root), "--json", "--migrations", str(edited)).stdout
    )
    by_path = {Path(r["path"]).name: r for r in rows}
    assert [(e["index"], e["step"]) for e in by_path[path.name]["edited"]] == [(1, "pin_width")]
    assert by_path["toy-1.0.0.pth"]["edited"] == []  # nothing applied: nothing to edit
    text = run(tmp_path, "scan", str(root), "--migrations", str(edited)).stdout
    assert "1 applied step(s) edited since: 2.0.0 -> 3.0.0 (pin_width)" in text
    db = tmp_path / "fleet.sqlite"
    done = run(tmp_path, "scan", str(root), "--catalog", str(db), "--migrations", str(ran))
    assert done.returncode == 0, done.stderr
    later = run(tmp_path, "catalog", str(db), "--json", "--migrations", str(edited))  # no read
    assert later.returncode == 0, later.stderr
    by_path = {Path(r["path"]).name: r for r in json.loads(later.stdout)}
    assert [e["step"] for e in by_path[path.name]["edited"]] == ["pin_width"]


def test_diff_upgrade_warns_about_an_edited_step_of_the_upgraded_side(project):
    tmp_path, ran, path = project
    edited = migrations(tmp_path, "edited", EDITED)
    b = tmp_path / "b.pth"
    cm.save(b, cm.load(path, upgrade=False))
    clean = run(tmp_path, "diff", str(path), str(b), "--upgrade", "--migrations", str(ran))
    assert clean.returncode == 0, clean.stderr
    assert "warning" not in clean.stderr
    proc = run(tmp_path, "diff", str(path), str(b), "--upgrade", "--migrations", str(edited))
    assert proc.returncode == 0, proc.stderr
    assert "ckptmigrate: warning:" in proc.stderr and "pin_width" in proc.stderr
    assert str(path) in proc.stderr


def test_check_warns_about_a_fixture_whose_applied_step_was_edited_and_still_passes(project):
    tmp_path, ran, path = project
    edited = migrations(tmp_path, "edited", EDITED)
    fixtures = tmp_path / "fixtures"
    fixtures.mkdir()
    fixture = fixtures / "3.0.0.pth"
    fixture.write_bytes(path.read_bytes())
    model = schema_of(ran).build({"width": 4, "layers": 2}).eval()
    model.load_state_dict(cm.load(fixture, upgrade=False).state_dict)
    x = torch.linspace(-1, 1, 8).reshape(2, 4)
    with torch.no_grad():
        write_golden(fixture, x, model(x), version="3.0.0", hparams={"layers": 2})
    clean = run(tmp_path, "check", str(fixtures), "--migrations", str(ran))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "warning" not in clean.stderr
    proc = run(tmp_path, "check", str(fixtures), "--migrations", str(edited))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 of 1 fixtures ok" in proc.stdout
    assert "ckptmigrate: warning:" in proc.stderr and str(fixture) in proc.stderr


# -- review16: one migrations module, two ways to import it ------------------------------------

CUSTOM_OP = """
from dataclasses import dataclass

import ckptmigrate as cm


@dataclass
class RenameBlocks(cm.ops.RenamePrefix):
    '''The project's own op: a RenamePrefix by another name.'''


schema = cm.Schema("net", current="2.0.0")
schema.add_migration("1.0.0", "2.0.0", [RenameBlocks("blocks.", "layers.")])
"""


def test_a_custom_op_step_is_not_edited_because_its_module_was_imported_by_another_name(tmp_path):
    """The CLI and the pytest plugin import ``[tool.ckptmigrate] migrations = ["mypkg/"]`` by
    path, the training code imports ``mypkg.net_migrations``: one file, unchanged. The op's
    digest names its class by module (``net_migrations.RenameBlocks`` against
    ``mypkg.net_migrations.RenameBlocks``), so the file warns that its step was edited, and
    the recorded inverse names a class the other import cannot rebuild."""
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "net_migrations.py").write_text(CUSTOM_OP)
    by_path = find_schemas([str(package)])["net"]
    source = tmp_path / "net-1.0.0.pth"
    cm.save(source, {"blocks.w": torch.ones(2)}, schema="net", version="1.0.0")
    path = tmp_path / "net-2.0.0.pth"
    cm.save(path, cm.load(source, schema=by_path))
    by_name = find_schemas(["mypkg.net_migrations"], root=tmp_path)["net"]
    assert by_name is not by_path
    no_warnings(lambda: cm.load(path, schema=by_name))


SCALE_OP = """
from dataclasses import dataclass

import ckptmigrate as cm
from ckptmigrate.schema.ops.base import TENSORS


@dataclass
class Scale(cm.ops.TensorOp):
    acts_on = frozenset({TENSORS})  # declared: so it is data, recorded and rebuilt by name
    factor: float = 2.0

    def transform(self, tensor):
        return tensor * self.factor

    def inverse(self):
        return Scale(self.template, 1 / self.factor)


schema = cm.Schema("net", current="2.0.0")
schema.add_migration("1.0.0", "2.0.0", [Scale("w")])
"""


def test_an_edit_to_what_a_projects_own_op_computes_is_an_edited_step(tmp_path):
    """The digest of a step of ops is its ops' data: class name and fields. A project's own op
    class computes in its own ``transform``; editing that changes every value the step writes,
    and the digest stays the same."""
    ran = migrations(tmp_path, "ran", SCALE_OP)
    edited = migrations(
        tmp_path, "edited", SCALE_OP.replace("tensor * self.factor", "tensor * self.factor + 1")
    )
    source = tmp_path / "net-1.0.0.pth"
    cm.save(source, {"w": torch.ones(2)}, schema="net", version="1.0.0")
    path = tmp_path / "net-2.0.0.pth"
    cm.save(path, cm.load(source, schema=find_schemas([str(ran)])["net"]))
    # in a fresh process, as a later run meets the file: only the edited code is imported
    script = (
        "import warnings, ckptmigrate as cm\n"
        "from ckptmigrate.schema.registry import find_schemas\n"
        "warnings.simplefilter('error', cm.HistoryEditedWarning)\n"
        f"cm.load({str(path)!r}, schema=find_schemas([{str(edited)!r}])['net'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert "HistoryEditedWarning" in done.stderr, (done.returncode, done.stderr[-500:])


def test_a_comment_or_docstring_in_a_projects_own_op_class_is_no_edit(tmp_path):
    """Only what the class computes counts: its syntax tree, without docstring or comments.
    Each side runs in a fresh process, as a later run meets the file."""
    folder = migrations(tmp_path, "project", SCALE_OP)
    source = tmp_path / "net-1.0.0.pth"
    cm.save(source, {"w": torch.ones(2)}, schema="net", version="1.0.0")
    path = tmp_path / "net-2.0.0.pth"
    schema = f"find_schemas([{str(folder)!r}])['net']"
    head = (
        "import warnings, ckptmigrate as cm\n"
        "from ckptmigrate.schema.registry import find_schemas\n"
        "warnings.simplefilter('error', cm.HistoryEditedWarning)\n"
    )
    upgrade = f"cm.save({str(path)!r}, cm.load({str(source)!r}, schema={schema}))\n"
    done = subprocess.run([sys.executable, "-c", head + upgrade], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]
    assert "classes" in cm.load(path, upgrade=False).history[-1]["digest"]
    (folder / "toy_migrations.py").write_text(
        SCALE_OP.replace(
            "class Scale(cm.ops.TensorOp):\n", "class Scale(cm.ops.TensorOp):\n    '''Scales.'''\n"
        ).replace("tensor * self.factor", "tensor * self.factor  # by the factor")
    )
    load = f"cm.load({str(path)!r}, schema={schema})\n"
    done = subprocess.run([sys.executable, "-c", head + load], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]


def test_a_digest_recorded_before_op_classes_were_hashed_is_judged_by_its_ops_data():
    from ckptmigrate.schema.provenance import same_code

    today = {"of": "ops", "sha256": "a" * 64, "classes": "b" * 64}
    assert same_code({"of": "ops", "sha256": "a" * 64}, today) is True
    assert same_code({"of": "ops", "sha256": "c" * 64}, today) is False
    assert same_code({"of": "ops", "sha256": "a" * 64, "classes": "d" * 64}, today) is False
