"""One error hierarchy: every exception the package raises is a ``CkptMigrateError`` from
``ckptmigrate.errors``, exported at the top level, and builds on its parent's ``__init__``.

The source is walked, not sampled: a ``raise`` of anything else anywhere in ``ckptmigrate/``
fails here, naming the file and line.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import ckptmigrate as cm
from ckptmigrate import errors

PACKAGE = Path(cm.__file__).parent

#: Raises of other classes that are right where they are, each with why.
ALLOWED = {
    # os.rename raises OSError with the errno; the renameat2 wrapper raises the same, so
    # callers handle a failed system call one way
    ("formats/folder_swap.py", "OSError"),
    # the temporary a writer was handed vanished: the OS's condition, reported as os would
    ("formats/atomic.py", "FileNotFoundError"),
    # argparse's protocol: a type= function raises it, argparse prints "argument --jobs: ..."
    ("cli.py", "ArgumentTypeError"),
    # Python's protocols: a module's __getattr__ and a frozen object's __setattr__
    ("__init__.py", "AttributeError"),
    ("formats/torch/__init__.py", "AttributeError"),  # PEP 562 module __getattr__: a missing name
    ("values/tensorinfo.py", "AttributeError"),
    ("base/frozen.py", "AttributeError"),  # the records of the metadata path
    # the file object the unpickler reads through ends: the decoder catches it (FORMAT_ERRORS)
    ("formats/torch/unpickler.py", "EOFError"),
    # the opcode walk's signal for a malformed pickle (a CheckpointFormatError carrying where the
    # walk stopped): raised by the walk and by the stack model it runs, caught by the decoder
    # (unpickler.load_pickle_scanned) and archive.check_torch_bytes; private to the one module
    # they shared until #14 gave each its module
    ("formats/torch/walk.py", "ScanCorrupt"),
    ("formats/torch/stack_model.py", "ScanCorrupt"),
    # a DCP tensor read on touch failed inside a step: carried past the step's own `except
    # Exception` and turned back into the folder's error (a CkptMigrateError) by the rewrite
    ("engine/ontouch.py", "ReadFailed"),
    # pytest's own collection error, raised as pytest asks a collector to
    ("pytest_plugin.py", "CollectError"),
}


def _sources() -> list[tuple[str, ast.Module]]:
    return [
        (path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(), filename=str(path)))
        for path in sorted(PACKAGE.rglob("*.py"))
    ]


def _raised_class(node: ast.Raise) -> str | None:
    """The class name a ``raise`` names; None for a re-raise (``raise``, ``raise exc``)."""
    exc = node.exc
    if exc is None:
        return None
    called = isinstance(exc, ast.Call)
    if called:
        exc = exc.func
    if isinstance(exc, ast.Subscript):
        return None  # ``raise outcome["error"]``: a value caught elsewhere, raised again
    if isinstance(exc, ast.Attribute):
        if not called and not exc.attr[:1].isupper():
            return None  # ``raise writer.error``: a caught value kept on an object
        return exc.attr
    if isinstance(exc, ast.Name):
        # ``raise exc`` re-raises a caught value; classes are CamelCase
        return exc.id if exc.id.lstrip("_")[:1].isupper() else None
    return "<expression>"


def _handled_here(tree: ast.Module, name: str) -> bool:
    """Whether the module catches ``name`` itself (``except name``, ``isinstance(x, name)``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            if name in {n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)}:
                return True
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
            if name in {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}:
                return True
    return False


def _abstract_stub(tree: ast.Module, node: ast.Raise) -> bool:
    """``raise NotImplementedError`` as the whole body of a method: the abstract idiom."""
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and fn.body == [node]:
            return True
    return False


def _private_classes(tree: ast.Module) -> set[str]:
    return {n.name for n in tree.body if isinstance(n, ast.ClassDef) and n.name.startswith("_")}


def test_every_raise_in_the_package_is_a_ckptmigrate_error():
    public = set(errors.__all__)
    offenders = []
    for rel, tree in _sources():
        private = _private_classes(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Raise):
                continue
            name = _raised_class(node)
            if name is None or name in public or (rel, name) in ALLOWED:
                continue
            if name == "NotImplementedError" and _abstract_stub(tree, node):
                continue
            if name in private and _handled_here(tree, name):
                continue  # control flow inside one module, never seen by a caller
            offenders.append(f"{rel}:{node.lineno} raises {name}")
    assert offenders == []


def test_the_walk_sees_what_it_must_refuse(tmp_path):
    """The checker itself: each kind of raise it must refuse, and each it must let through."""
    source = """
class _Flow(Exception):
    pass

class _Escapes(Exception):
    pass

def a():
    raise ValueError("plain")

def b():
    raise _Escapes()

def c():
    try:
        raise _Flow()
    except _Flow:
        pass

def d(exc):
    raise exc

def e():
    raise errors.UsageError("typed")

def f():
    raise NotImplementedError
"""
    tree = ast.parse(source)
    private = _private_classes(tree)
    kinds = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise):
            name = _raised_class(node)
            ok = (
                name is None
                or name in errors.__all__
                or (name == "NotImplementedError" and _abstract_stub(tree, node))
                or (name in private and _handled_here(tree, name))
            )
            kinds[name] = ok
    assert kinds == {
        "ValueError": False,
        "_Escapes": False,
        "_Flow": True,
        None: True,
        "UsageError": True,
        "NotImplementedError": True,
    }


def _error_classes(*, warnings: bool = False) -> list[type[BaseException]]:
    return [
        obj
        for name, obj in vars(errors).items()
        if inspect.isclass(obj)
        and issubclass(obj, BaseException)
        and issubclass(obj, Warning) == warnings
        and obj.__module__ == errors.__name__
    ]


def test_every_error_class_derives_from_the_base_and_is_exported():
    classes = _error_classes()
    assert {c.__name__ for c in classes} <= set(errors.__all__)
    for cls in classes:
        assert issubclass(cls, cm.CkptMigrateError), cls
        assert getattr(cm, cls.__name__) is cls, f"{cls.__name__} is not exported by ckptmigrate"


def test_every_warning_class_derives_from_the_warning_base_and_is_exported():
    classes = _error_classes(warnings=True)
    assert cm.HistoryEditedWarning in classes
    for cls in classes:
        assert issubclass(cls, cm.CkptMigrateWarning) and cls.__name__ in errors.__all__, cls
        assert getattr(cm, cls.__name__) is cls, f"{cls.__name__} is not exported by ckptmigrate"


def test_no_error_skips_its_parents_init():
    """An ``__init__`` calls ``super().__init__``, never a grandparent's, so every attribute a
    parent promises is set (``UnknownSchemaError`` is a ``SchemaMismatchError`` with ``path``)."""
    tree = ast.parse(Path(errors.__file__).read_text())
    direct = [
        f"{cls.name}: {ast.unparse(call)}"
        for cls in tree.body
        if isinstance(cls, ast.ClassDef)
        for call in ast.walk(cls)
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "__init__"
        and not (
            isinstance(call.func.value, ast.Call) and ast.unparse(call.func.value) == "super()"
        )
    ]
    assert direct == []


@pytest.mark.parametrize(
    "error, parent_attrs",
    [
        (errors.UnknownSchemaError("mdl", ["model"]), {"expected": "mdl", "path": None}),
        (errors.TargetPastCurrentError("m", "3.0.0", "2.0.0"), {"stored": "3.0.0"}),
        (errors.AmbiguousVersionError("m", [("1.0.0", 0.5)], path="a.pth"), {"schema": "m"}),
    ],
)
def test_subclasses_carry_their_parents_facts(error, parent_attrs):
    for attr, value in parent_attrs.items():
        assert getattr(error, attr) == value
    assert str(error) == error.render()


def test_a_gap_and_an_ambiguity_are_different_errors():
    assert not issubclass(cm.AmbiguousMigrationPathError, cm.NoMigrationPathError)
    assert not issubclass(cm.NoMigrationPathError, cm.AmbiguousMigrationPathError)
    gap = cm.NoMigrationPathError("m", "1.0.0", "3.0.0", reason="no step leaves 2.0.0")
    assert gap.reason in str(gap) and isinstance(gap, cm.MigrationPathError)


def test_api_misuse_is_a_usage_error_and_still_a_type_error(tmp_path):
    with pytest.raises(cm.UsageError) as info:
        cm.save(tmp_path / "a.pth", {"w": 1})  # a state_dict needs schema=
    assert isinstance(info.value, TypeError) and isinstance(info.value, cm.CkptMigrateError)


def test_an_unwritable_checkpoint_is_a_write_error(tmp_path):
    import torch

    schema = cm.Schema("m", current="1.0.0")
    ckpt = cm.Checkpoint(state_dict={"w": torch.zeros(2)}, optimizer={"state": {}})
    with pytest.raises(cm.CheckpointWriteError, match="tensors only"):
        cm.save(tmp_path / "a.safetensors", ckpt, schema=schema, version="1.0.0")
    assert not (tmp_path / "a.safetensors").exists()
