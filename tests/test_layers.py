"""The package's layers, and the rule that a module imports only its own layer or lower ones.

Every ``import`` in ``ckptmigrate/`` is read from the source, the ones inside functions (lazy)
and under ``TYPE_CHECKING`` included: hiding an import in a function does not change which
layer depends on which. A module must be placed in :data:`LAYERS` before it can be imported
by anything; a new one fails here until its author says where it lives.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ckptmigrate as cm

PACKAGE = Path(cm.__file__).parent

#: The layers, lowest first, and the modules in each (dotted, below ``ckptmigrate``). An
#: entry ``"formats.*"`` places every module of that package not named on its own. Each layer
#: is a folder of the package (:data:`FOLDERS`), apart from the package surface at the top.
LAYERS: dict[str, tuple[str, ...]] = {
    # the vocabulary every layer speaks: typed errors, versions, how a value is printed
    "base": ("errors", "base", "base.*"),
    # the values a read produces and a write consumes: a checkpoint, its stamp, a tensor stub
    "values": ("values", "values.*"),
    # bytes on disk: one module per file format, the dict layouts inside them, the file lock
    "formats": ("formats", "formats.*"),
    # a path as a checkpoint: one open, one sniff, one dispatch; what a load would report
    "checkpoint": ("io", "io.*"),
    # what versions exist and how to go between them, knowing nothing about files
    "schema": ("schema", "schema.*"),
    # running migrations on checkpoints: planning, guarding, following optimizer state, I/O
    "engine": ("engine", "engine.*"),
    # looking at checkpoints: differences, fixtures checks, scans, drafts of migrations
    "inspect": ("inspection", "inspection.*"),
    # what a person or a test runner touches: the package surface, the CLI and its output
    "interface": ("", "__main__", "cli", "render", "terminal", "pytest_plugin"),
}

#: The folder that holds each layer's modules; the top level holds the package surface (the
#: interface) and ``errors``, the one base module users import by name.
FOLDERS = {
    "base": "base",
    "values": "values",
    "formats": "formats",
    "checkpoint": "io",
    "schema": "schema",
    "engine": "engine",
    "inspect": "inspection",
}

RANK = {name: rank for rank, name in enumerate(LAYERS)}

#: The import cycles left, each inside one layer, each with why; a new cycle fails. Cycles
#: among the format modules are not listed: the formats are being regrouped by format.
KNOWN_CYCLES = [
    {
        "values.checkpoint",
        "values.stamp",
    },  # annotations only (TYPE_CHECKING): a Checkpoint holds Mounts
    {
        "engine.mounts",
        "engine.upgrade",
    },  # upgrading a file upgrades each mount, each through run_plan
]


def layer_of(module: str) -> str | None:
    """The layer of ``module`` (dotted, below ``ckptmigrate``; ``""`` is the package)."""
    for layer, members in LAYERS.items():
        if module in members:
            return layer
    package = module.rpartition(".")[0]
    while package:
        for layer, members in LAYERS.items():
            if f"{package}.*" in members:
                return layer
        package = package.rpartition(".")[0]
    return None


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imported_modules(source: str, module: str, *, package: bool) -> list[tuple[str, int]]:
    """``(module, line)`` for each ckptmigrate module that ``source`` imports, anywhere in it."""
    found: list[tuple[str, int]] = []
    here = module.split(".") if module else []
    if not package:
        here = here[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "ckptmigrate" or alias.name.startswith("ckptmigrate."):
                    found.append((alias.name.removeprefix("ckptmigrate").lstrip("."), node.lineno))
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = here[: len(here) - (node.level - 1)]
            target = ".".join([*base, *([node.module] if node.module else [])])
        elif node.module == "ckptmigrate" or (node.module or "").startswith("ckptmigrate."):
            target = node.module.removeprefix("ckptmigrate").lstrip(".")  # type: ignore[union-attr]
        else:
            continue
        for alias in node.names:  # ``from . import api`` imports the submodule api
            sub = f"{target}.{alias.name}" if target else alias.name
            found.append((sub if _exists(sub) else target, node.lineno))
    return found


def _exists(module: str) -> bool:
    path = PACKAGE.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _modules() -> list[tuple[Path, str]]:
    return [(path, _module_name(path)) for path in sorted(PACKAGE.rglob("*.py"))]


def import_graph() -> dict[str, set[str]]:
    """Each module and the ckptmigrate modules it imports (lazily or not)."""
    return {
        module: {
            target
            for target, _ in imported_modules(
                path.read_text(encoding="utf-8"), module, package=_is_package(path)
            )
            if target != module
        }
        for path, module in _modules()
    }


def import_cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of ``graph`` with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def upward_imports() -> list[str]:
    offenders = []
    for path, module in _modules():
        mine = layer_of(module)
        if mine is None:
            continue  # reported by test_every_module_has_a_layer
        text = path.read_text(encoding="utf-8")
        for target, line in imported_modules(text, module, package=_is_package(path)):
            theirs = layer_of(target)
            if theirs is not None and RANK[theirs] > RANK[mine]:
                offenders.append(
                    f"{path.relative_to(PACKAGE)}:{line} imports {target or 'ckptmigrate'}: "
                    f"{mine} ({module or 'ckptmigrate'}) must not import {theirs}"
                )
    return offenders


def test_every_module_has_a_layer():
    unplaced = [
        f"{path.relative_to(PACKAGE)}: place {module!r} in tests/test_layers.py LAYERS"
        for path, module in _modules()
        if layer_of(module) is None
    ]
    assert not unplaced, "\n" + "\n".join(unplaced)


def test_every_layer_entry_names_a_module_that_exists():
    named = [m for members in LAYERS.values() for m in members if not m.endswith(".*")]
    assert [m for m in named if m and not _exists(m)] == []
    assert len(named) == len(set(named)), "a module is placed in two layers"


def test_no_module_imports_a_higher_layer():
    offenders = upward_imports()
    assert not offenders, "\n" + "\n".join(offenders)


def test_the_only_import_cycles_are_the_known_ones_inside_one_layer():
    cycles = [
        sorted(c)
        for c in import_cycles(import_graph())
        if c not in KNOWN_CYCLES and {layer_of(m) for m in c} != {"formats"}
    ]
    assert cycles == []
    assert all(len({layer_of(m) for m in c}) == 1 for c in KNOWN_CYCLES)


def test_the_cycle_finder_finds_a_lazy_cycle_and_leaves_a_chain_alone():
    graph = {"schema": {"graph"}, "graph": {"ops"}, "ops": {"schema"}, "guess": {"schema"}}
    assert import_cycles(graph) == [{"schema", "graph", "ops"}]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize(
    ("module", "source", "imported"),
    [
        ("schema.schema", "def f():\n    from ..engine.guess import guess\n", "engine.guess"),
        ("values.stamp", "from .. import __version__\n", ""),  # the package itself
        ("formats.dcp", "from ..inspection.diff import diff\n", "inspection.diff"),
        ("formats.dcp", "import ckptmigrate.cli\n", "cli"),
        ("schema.registry", "from ckptmigrate.engine import api\n", "engine.api"),
    ],
)
def test_the_walk_sees_an_import_however_it_is_written(module, source, imported):
    assert [t for t, _ in imported_modules(source, module, package=False)] == [imported]
    assert RANK[layer_of(imported)] > RANK[layer_of(module)]  # each would be refused


def test_a_module_of_a_placed_package_takes_its_layer_and_others_need_placing():
    assert layer_of("formats.torch.pickle_meta") == "formats"
    assert layer_of("values.tensorinfo") == "values"
    assert layer_of("brand_new_module") is None


def test_each_layer_lives_in_its_own_folder():
    """The tree shows the layers: a module's folder is its layer's; the top level holds the
    package surface and ``errors``."""
    misplaced = []
    for path, module in _modules():
        layer = layer_of(module)
        top = module.partition(".")[0]
        folder = top if "." in module or top in FOLDERS.values() else None
        expected = None if layer == "interface" or module == "errors" else FOLDERS.get(layer)
        if folder != expected:
            misplaced.append(f"{path.relative_to(PACKAGE)}: layer {layer}, folder {expected}/")
    assert misplaced == []
    assert sorted(FOLDERS) == sorted(set(LAYERS) - {"interface"})
