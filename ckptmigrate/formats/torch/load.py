"""torch.save files (zip and legacy pre-zip) loaded with torch's weights-only loader only.

Before torch sees a file, our own restricted reader walks its pickle (:mod:`.metadata`): torch's
weights-only loader fails alike on random bytes and on a hostile pickle, and we must tell the
two apart. A memory-mapped CPU load of a plain state dict is rebuilt by :mod:`.mapped` instead.

>>> sd = read_torch("model.pth", mmap=True)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ...errors import CheckpointFormatError, CkptMigrateError, UnsafeCheckpointError
from ..atomic import atomic_file
from ..detect import detect_format
from .allowlist import GlobalRedirect, TorchDictRedirects, redirect_map
from .mapped import load_mapped
from .metadata import read_torch_metadata


def global_name(obj: Any) -> str:
    """``module.Name`` of a class or function, or the string itself."""
    if isinstance(obj, str):
        return obj
    return f"{obj.__module__}.{obj.__qualname__}"


def allowed_names(safe_globals: Iterable[Any]) -> list[str | GlobalRedirect]:
    """``safe_globals`` as the metadata readers take them: each class or function by its
    name, each :class:`GlobalRedirect` as it is."""
    return [g if isinstance(g, GlobalRedirect) else global_name(g) for g in safe_globals]


def with_redirects(safe_globals: Iterable[Any], rules: Iterable[GlobalRedirect]) -> list[Any]:
    """``safe_globals`` and the redirect ``rules`` (a schema's), less those for a name the caller
    allows as itself; refused (:class:`~ckptmigrate.errors.RedirectError`) here, before any file
    is read, when one points to a global that is not allowed.

    >>> with_redirects([], [GlobalRedirect("old.Hparams", "builtins.dict")])
    [GlobalRedirect(old='old.Hparams', new='builtins.dict')]
    """
    given = list(safe_globals)
    names = {name for name in allowed_names(given) if isinstance(name, str)}
    found = given + [rule for rule in rules if rule not in given and rule.old not in names]
    redirect_map(allowed_names(found))
    return found


def resolve_global(name: str) -> Any:
    """Import a trusted global given by name (the caller vouched for it)."""
    module, _, attr = name.rpartition(".")
    try:
        value: Any = importlib.import_module(module)
        for part in attr.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise CkptMigrateError(f"cannot import the allowed global {name!r}: {exc}") from None
    return value


def read_torch(
    path: str | os.PathLike[str],
    *,
    map_location: Any = "cpu",
    mmap: bool = False,
    safe_globals: Iterable[Any] = (),
    kind: str | None = None,
) -> Any:
    """The top-level object of a torch.save file, loaded with ``weights_only=True``.

    ``kind`` is the format :func:`~ckptmigrate.formats.registry.detect` found, where the caller
    has sniffed the file already (it is sniffed here otherwise).
    """
    import torch

    path = Path(path)
    fmt = kind if kind is not None else detect_format(path)
    if fmt not in ("torch-zip", "torch-legacy"):
        raise CheckpointFormatError(f"expected a torch.save file, found {fmt}", path=path)
    given_globals = list(safe_globals)
    allowed = [g for g in given_globals if not isinstance(g, GlobalRedirect)]
    names = allowed_names(given_globals)
    if fmt == "torch-zip" and not names:
        # the pickle decoded once, by our reader; raises Unsafe/Format as the reader does
        done, obj = load_mapped(path, map_location, mmap=mmap)
        if done:
            return obj
    else:
        read_torch_metadata(
            path, allowed_globals=names, kind=fmt
        )  # raises Unsafe/Format before torch
    given = {global_name(g): resolve_global(g) if isinstance(g, str) else g for g in allowed}
    objects = [_loadable(obj, name) for name, obj in given.items()]
    to_dict = TorchDictRedirects()
    for old, new in redirect_map(names).items():  # torch maps the old name to the target
        if new == "builtins.dict":  # items and attributes, a plain dict once loaded
            objects.append((to_dict.target(old), old))
            continue
        target = given[new] if new in given else _target(new)
        if target is not None:  # else torch refuses the old name, as it would without one
            objects.append((_loadable(target, new)[0], old))
    try:
        with torch.serialization.safe_globals(objects):
            obj = torch.load(
                path,
                map_location=map_location,
                weights_only=True,
                mmap=mmap and fmt == "torch-zip",
            )
        return to_dict.plain(obj)
    except CkptMigrateError:
        raise
    except Exception as exc:
        text = str(exc)
        reason = _weights_only_reason(text)
        if "Unsupported operand" in reason:
            # an opcode torch's loader lacks (POP, ...), after our reader found nothing unsafe
            raise CheckpointFormatError(
                f"torch's weights-only loader cannot decode its pickle ({reason})", path=path
            ) from None
        if "Unsupported global" in text or "Weights only load failed" in text:
            detail = "" if "Unsupported global" in text else f"torch says: {reason}"
            raise UnsafeCheckpointError(_unsupported_name(text), path=path, detail=detail) from None
        raise CheckpointFormatError(
            f"torch could not read it ({type(exc).__name__}: {text.splitlines()[0][:200]})",
            path=path,
        ) from exc


def _loadable(obj: Any, name: str) -> tuple[Any, str]:
    """What torch's weights-only loader gets for an allowed global: a dict subclass (Lightning's
    ``AttributeDict``) loads as a plain dict of its items, since that loader fills only dicts."""
    if isinstance(obj, type) and issubclass(obj, dict) and obj.__module__ != "collections":
        return (dict, name)
    return (obj, name)


def _target(name: str) -> Any:
    """The object torch's own allow-list has for ``name`` (a redirect's target), dict for
    ``builtins.dict``, or None where this torch does not allow it."""
    from torch import _weights_only_unpickler

    if name == "builtins.dict":
        return dict
    return _weights_only_unpickler._get_allowed_globals().get(name)


def _weights_only_reason(text: str) -> str:
    """The line of a weights-only failure that says what torch refused."""
    _, _, tail = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[0][:200] if lines else ""


def _unsupported_name(text: str) -> str:
    marker = "GLOBAL "
    if marker in text:
        return text.split(marker, 1)[1].split()[0].strip("`'\",")
    return "an unsupported global"


def write_torch(path: str | os.PathLike[str], obj: Any) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    import torch

    with atomic_file(path) as f:
        torch.save(obj, f)
