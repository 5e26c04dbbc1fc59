"""The house rules that hold the package's shape: a module reaches another only through its
public names.

A private name (``_name``) is its module's own business; a second module that imports it, or
reads it as ``module._name``, makes two places hold one concept and lets them drift apart. The
source is walked, not sampled: every such use anywhere in ``ckptmigrate/`` fails here, naming
the file, the line and the name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ckptmigrate as cm

PACKAGE = Path(cm.__file__).parent

#: Private names still used across modules, as (importing file, module.name), each with why.
ALLOWED: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The module an ``ImportFrom`` in ``module`` (at ``path``) names, made absolute."""
    if not node.level:
        return node.module or ""
    package = module.split(".")
    if path.name != "__init__.py":
        package.pop()
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _private_uses(module: str, path: Path, modules: set[str]) -> list[tuple[int, str]]:
    """``(line, module.name)`` for each private name of another ckptmigrate module used here."""
    tree = ast.parse(path.read_text(), filename=str(path))
    bound: dict[str, str] = {}  # local name -> the ckptmigrate module it is bound to
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ckptmigrate":
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        bound["ckptmigrate"] = "ckptmigrate"
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, path, node)
            if source.split(".")[0] != "ckptmigrate":
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                if full in modules:
                    bound[alias.asname or alias.name] = full
                elif _is_private(alias.name) and source != module:
                    found.append((node.lineno, full))

    def resolve(expr: ast.expr) -> str | None:
        if isinstance(expr, ast.Name):
            return bound.get(expr.id)
        if isinstance(expr, ast.Attribute):
            owner = resolve(expr.value)
            if owner is not None and f"{owner}.{expr.attr}" in modules:
                return f"{owner}.{expr.attr}"
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            owner = resolve(node.value)
            if owner is not None and owner != module:
                found.append((node.lineno, f"{owner}.{node.attr}"))
    return found


def _violations() -> list[tuple[str, int, str]]:
    modules = _modules()
    names = set(modules)
    return [
        (path.relative_to(PACKAGE).as_posix(), line, name)
        for module, path in modules.items()
        for line, name in _private_uses(module, path, names)
    ]


def test_no_module_uses_another_modules_private_names() -> None:
    bad = [
        f"ckptmigrate/{file}:{line} uses {name}"
        for file, line, name in _violations()
        if (file, name) not in ALLOWED
    ]
    assert not bad, "private names used across modules (make them public):\n" + "\n".join(bad)


def test_every_allowed_private_use_still_exists() -> None:
    found = {(file, name) for file, _, name in _violations()}
    assert ALLOWED <= found, f"stale ALLOWED entries: {sorted(ALLOWED - found)}"


def test_the_walk_finds_each_kind_of_private_use(tmp_path: Path) -> None:
    package = tmp_path / "ckptmigrate"
    (package / "formats").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "formats" / "__init__.py").write_text("")
    (package / "formats" / "inner.py").write_text("_hidden = 1\nshown = 2\n")
    (package / "outer.py").write_text(
        "from .formats.inner import _hidden, shown\n"
        "from .formats import inner\n"
        "import ckptmigrate.formats.inner as alias\n"
        "import ckptmigrate.formats.inner\n"
        "def f():\n"
        "    from ..x import __version__\n"
        "    return inner._hidden, alias._hidden, ckptmigrate.formats.inner._hidden, shown\n"
    )
    (package / "formats" / "sibling.py").write_text("from .inner import _hidden\n")
    modules = {
        "ckptmigrate",
        "ckptmigrate.formats",
        "ckptmigrate.formats.inner",
        "ckptmigrate.outer",
        "ckptmigrate.formats.sibling",
    }
    outer = _private_uses("ckptmigrate.outer", package / "outer.py", modules)
    assert (
        sorted(outer)
        == [(1, "ckptmigrate.formats.inner._hidden")]
        + [(7, "ckptmigrate.formats.inner._hidden")] * 3
    )
    sibling = package / "formats" / "sibling.py"
    assert _private_uses("ckptmigrate.formats.sibling", sibling, modules) == [
        (1, "ckptmigrate.formats.inner._hidden")
    ]
