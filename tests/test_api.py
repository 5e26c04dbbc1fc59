"""The public surface: documented, typed, and cheap to import."""

from __future__ import annotations

import inspect
import pydoc
import subprocess
import sys

import pytest

import ckptmigrate as cm

PUBLIC = [getattr(cm, name) for name in cm.__all__]
FUNCTIONS = [obj for obj in PUBLIC if inspect.isfunction(obj)]


def test_help_of_load_shows_a_typed_documented_signature():
    text = pydoc.render_doc(cm.load, renderer=pydoc.plaintext)
    for part in ("schema", "to", "upgrade", "from_version", "map_location", "safe_globals"):
        assert part in text
    assert "Checkpoint" in text  # the return annotation
    assert "never writes" in text.lower()
    assert ">>>" in text  # an example call


@pytest.mark.parametrize("fn", FUNCTIONS + [cm.diff], ids=lambda f: f.__name__)
def test_every_public_function_has_a_docstring_and_full_annotations(fn):
    assert inspect.getdoc(fn), f"{fn.__name__} has no docstring"
    signature = inspect.signature(fn)  # strings: torch types are TYPE_CHECKING-only
    assert signature.return_annotation is not inspect.Signature.empty, fn.__name__
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        assert param.annotation is not inspect.Parameter.empty, f"{fn.__name__}({param.name})"


@pytest.mark.parametrize("cls", [o for o in PUBLIC if inspect.isclass(o)], ids=lambda c: c.__name__)
def test_every_public_class_has_a_docstring(cls):
    assert cls.__doc__ and cls.__doc__.strip()


def test_every_error_is_a_ckptmigrate_error_importable_from_both_places():
    from ckptmigrate import errors

    names = [n for n in cm.__all__ if n.endswith("Error")]
    assert len(names) >= 10
    for name in names:
        cls = getattr(cm, name)
        assert issubclass(cls, cm.CkptMigrateError)
        assert getattr(errors, name) is cls


def test_every_public_op_is_documented():
    for name in cm.ops.__all__:
        obj = getattr(cm.ops, name)
        if callable(obj):
            assert inspect.getdoc(obj), name


def test_the_package_ships_py_typed():
    from importlib.resources import files

    assert files("ckptmigrate").joinpath("py.typed").is_file()


def test_importing_ckptmigrate_does_not_import_torch():
    code = (
        "import sys, ckptmigrate as cm\n"
        "cm.Schema('m', current='1.0.0')\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
        "assert 'deepdiff' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_cm_diff_stays_the_function_after_its_module_is_imported():
    code = (
        "import ckptmigrate as cm\n"
        "import ckptmigrate.inspection.diff\n"
        "from ckptmigrate.inspection.diff import Diff\n"
        "assert callable(cm.diff) and cm.diff.__name__ == 'diff', cm.diff\n"
        "assert cm.diff is ckptmigrate.diff\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
