"""The named weights of the discovered schemas: listed, and checked against their golden records.

A weights entry with a golden record (``golden=``, ``golden_sha256=``) is checked as a legacy
fixture is: fetched and verified, upgraded to the current version, loaded with
``strict=True`` into the model built from the migrated hparams, run on the record's input and
compared with the output the weights gave when they were published.

>>> [r.ok for r in check_weights(find_schemas(["migrations"]))]
[True]
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..engine.weights import DEFAULT_TIMEOUT, every_weights, golden_file, weights_file
from ..errors import CkptMigrateError, CommandLineError
from ..io.golden import Fixture, fixture_from_golden
from ..schema.schema import Schema
from ..schema.weights import Weights
from .fixtures import FixtureResult, check_fixture

__all__ = ["check_weights", "select_weights", "weights_record"]


def select_weights(
    schemas: Mapping[str, Schema], which: str | None = None
) -> list[tuple[Schema, Weights]]:
    """The weights ``which`` names: ``None`` every one, ``SCHEMA`` a schema's, ``SCHEMA:NAME``
    one entry (an unknown schema or name is an error naming what exists)."""
    from ..engine.weights import get_weights
    from ..schema.registry import get_schema

    if which is None:
        return every_weights(schemas)
    name, _, entry = which.partition(":")
    schema = get_schema(name, dict(schemas))
    if entry:
        return [(schema, get_weights(schema, entry))]
    return [(schema, w) for w in schema.weights.values()]


def weights_record(schemas: Mapping[str, Schema], which: str | None = None) -> list[dict[str, Any]]:
    """What ``ckptmigrate weights`` prints: one dict per entry, with its schema and whether it
    is behind the schema's current version (it is upgraded on the way in)."""
    return [
        {"schema": schema.name, "current": str(schema.current), **w.to_dict()}
        for schema, w in select_weights(schemas, which)
    ]


def check_weights(
    schemas: Mapping[str, Schema],
    which: str | None = None,
    *,
    cache: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    safe_globals: Iterable[Any] = (),
) -> list[FixtureResult]:
    """Check every selected entry that has a golden record; one result each (a failure to
    fetch, verify or reproduce is a failed result, not a raise)."""
    selected = [(s, w) for s, w in select_weights(schemas, which) if w.golden is not None]
    if which is not None and ":" in which and not selected:
        raise CommandLineError(f"weights {which} list no golden record to check against")
    allowed = list(safe_globals)
    return [_check_one(schema, w, schemas, cache, timeout, allowed) for schema, w in selected]


def _check_one(
    schema: Schema,
    weights: Weights,
    schemas: Mapping[str, Schema],
    cache: str | os.PathLike[str] | None,
    timeout: float,
    safe_globals: list[Any],
) -> FixtureResult:
    label = Fixture(
        path=Path(weights.url),
        golden_path=Path(weights.golden or weights.url),
        schema=schema.name,
        version=str(weights.version),
        variant=weights.name,
    )
    try:
        path = weights_file(weights, cache=cache, timeout=timeout)
        golden = golden_file(weights, cache=cache, timeout=timeout)
        if golden is None:
            return FixtureResult(label, reason="the weights list no golden record")
        fixture = fixture_from_golden(golden)
    except CkptMigrateError as exc:
        return FixtureResult(label, reason=" ".join(exc.render(cli=True).split()))
    if (fixture.schema, fixture.version) != (schema.name, str(weights.version)):
        return FixtureResult(
            label,
            reason=f"the golden record is of {fixture.schema} {fixture.version}, but the "
            f"weights are listed as {schema.name} {weights.version}",
        )
    checked = replace(fixture, path=path, variant=weights.name)
    return check_fixture(checked, schemas, safe_globals=safe_globals)
