"""Loading a schema's named weights: fetched into torch.hub's cache, verified, upgraded.

The cache is torch.hub's: ``<hub dir>/checkpoints/<file name of the URL>``, where the hub dir
is ``$TORCH_HOME/hub`` (``$XDG_CACHE_HOME/torch/hub``, else ``~/.cache/torch/hub``) or whatever
``torch.hub.set_dir`` chose, so weights fetched by ckptmigrate and by ``torch.hub`` share one
folder. Every load hashes the file: a mismatch is refused (:class:`WeightsHashMismatchError`),
and a cached file that no longer matches is fetched again.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from packaging.version import Version

from ..errors import UnknownWeightsError
from ..io.download import fetch_verified
from ..schema.schema import Schema
from ..schema.weights import Weights
from ..values.checkpoint import Checkpoint

__all__ = [
    "DEFAULT_TIMEOUT",
    "cache_dir",
    "every_weights",
    "get_weights",
    "golden_file",
    "load_weights",
    "weights_file",
]

#: Seconds one read of a download may wait before it is given up.
DEFAULT_TIMEOUT = 60.0


def cache_dir() -> Path:
    """torch.hub's checkpoint cache (``torch.hub.get_dir() / "checkpoints"``)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def get_weights(schema: Schema, name: str) -> Weights:
    """The weights ``schema`` lists as ``name`` (or :class:`UnknownWeightsError`)."""
    try:
        return schema.weights[name]
    except KeyError:
        raise UnknownWeightsError(schema.name, name, list(schema.weights)) from None


def weights_file(
    weights: Weights,
    *,
    cache: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """The verified local file of ``weights``: downloaded into ``cache`` (default:
    :func:`cache_dir`) when it is not there or no longer matches its sha256."""
    folder = Path(cache) if cache is not None else cache_dir()
    return fetch_verified(weights.url, weights.sha256, folder, timeout=timeout)


def golden_file(
    weights: Weights,
    *,
    cache: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path | None:
    """The verified golden record of ``weights``, None when they list none."""
    if weights.golden is None or weights.golden_sha256 is None:
        return None
    folder = Path(cache) if cache is not None else cache_dir()
    return fetch_verified(weights.golden, weights.golden_sha256, folder, timeout=timeout)


def load_weights(
    schema: Schema | str,
    name: str,
    *,
    to: str | Version | None = None,
    cache: str | os.PathLike[str] | None = None,
    map_location: Any = "cpu",
    mmap: bool = False,
    safe_globals: Iterable[Any] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> Checkpoint:
    """Fetch the weights ``schema`` lists as ``name``, verify their sha256, and load them
    upgraded to ``to`` (default: ``schema.current``).

    An unstamped file takes the version the entry says it was saved at; a stamp that says
    another version is a :class:`~ckptmigrate.errors.VersionConflictError`.

    >>> ckpt = cm.load_weights(schema, "stripes_v1")
    >>> model = schema.build(ckpt.hparams); model.load_state_dict(ckpt.state_dict)
    """
    from ..schema.registry import get_schema
    from .api import load

    resolved = get_schema(schema)
    weights = get_weights(resolved, name)
    path = weights_file(weights, cache=cache, timeout=timeout)
    return load(
        path,
        schema=resolved,
        to=to,
        from_version=weights.version,
        map_location=map_location,
        mmap=mmap,
        safe_globals=safe_globals,
    )


def every_weights(schemas: Mapping[str, Schema]) -> list[tuple[Schema, Weights]]:
    """Each schema's weights, schemas by name, weights in the order they were added."""
    return [(schemas[n], w) for n in sorted(schemas) for w in schemas[n].weights.values()]
