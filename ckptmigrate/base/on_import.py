"""Run a function on a module the moment it is imported, without importing it first.

The CLI sends log records through its own handler, but ``logging`` costs milliseconds to
import and a metadata ``diff`` never needs it: the handler is attached when something does
import it (torch, fsspec, a migration module), before that code can log anything.

>>> with when_imported("logging", lambda logging: logging.getLogger().addHandler(h)):
...     run_the_command()
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

__all__ = ["when_imported"]


@contextlib.contextmanager
def when_imported(name: str, then: Callable[[ModuleType], None]) -> Iterator[None]:
    """``then(module)`` now if ``name`` is imported already, else right after its first import
    inside the block (not at all if none happens)."""
    if name in sys.modules:
        then(sys.modules[name])
        yield
        return
    finder = _FirstImport(name, then)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        finder.done = True  # a spec found inside and run later does not call it either
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(finder)


class _FirstImport:
    """A meta path finder that lets the others find ``name`` and wraps its loader, until an
    import of it runs: a ``find_spec`` probe, or an import that fails, leaves it waiting."""

    def __init__(self, name: str, then: Callable[[ModuleType], None]) -> None:
        self.name = name
        self.then = then
        self.done = False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name or self.done:
            return None
        for finder in sys.meta_path:
            find = None if finder is self else getattr(finder, "find_spec", None)
            spec = None if find is None else find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenRun(spec.loader, self)
        return spec

    def ran(self, module: ModuleType) -> None:
        """The module was imported: ``then`` once, and the finder steps aside."""
        if self.done:
            return
        self.done = True
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        self.then(module)


class _ThenRun:
    """A loader that runs the module with the real loader, puts that loader back in its
    place on the module, then tells the finder it ran."""

    def __init__(self, loader: Any, finder: _FirstImport) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec: Any) -> Any:
        create = getattr(self._loader, "create_module", None)
        return None if create is None else create(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)  # raising: the finder waits for the next import
        self._finder.ran(module)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._loader, attribute)
