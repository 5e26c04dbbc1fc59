"""Which version is an unstamped file? Compare its key signature with each version's.

A signature (:mod:`ckptmigrate.io.signature`) is the set of ``(key pattern, ndim, dtype)`` of a
state_dict. Each version's signatures come from the schema's legacy fixtures (the files the old
code wrote) or from ``schema.add_signature``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, replace

from packaging.version import Version

from ..base.version import parse_version
from ..errors import AmbiguousVersionError, CkptMigrateError, UsageError, VersionConflictError
from ..io.files import read_metadata
from ..io.golden import find_fixtures
from ..io.signature import Signature, key_pattern, signature_of, similarity
from ..schema.registry import fixtures_folders
from ..schema.schema import Schema
from ..values.checkpoint import Checkpoint

__all__ = [
    "Guess",
    "Signature",
    "apply_from_version",
    "guess_version",
    "key_pattern",
    "resolve_from_version",
    "signature_of",
    "signatures_from_fixtures",
    "similarity",
]


@dataclass(frozen=True)
class Guess:
    """The version an unstamped file most likely has, how sure, and the runners-up."""

    version: Version
    confidence: float
    candidates: list[tuple[str, float]]


def signatures_from_fixtures(
    schema: Schema, roots: Iterable[str | os.PathLike[str]]
) -> dict[Version, list[Signature]]:
    """Each version's signatures, read (metadata only) from the schema's fixtures."""
    found: dict[Version, list[Signature]] = {}
    for root in roots:
        if not os.path.isdir(root):
            continue
        for fixture in find_fixtures(root):
            if fixture.schema != schema.name:
                continue
            try:
                ckpt = read_metadata(fixture.path)
            except CkptMigrateError:
                continue
            found.setdefault(Version(str(fixture.version)), []).append(
                signature_of(ckpt.state_dict)
            )
    return found


def guess_version(
    ckpt: Checkpoint,
    schema: Schema,
    *,
    fixtures: Iterable[str | os.PathLike[str]] | None = None,
    threshold: float = 0.95,
    path: object = None,
) -> Guess:
    """Identify the version of an unstamped checkpoint by its signature.

    Raises :class:`AmbiguousVersionError` (listing the candidates) when two versions match
    equally well or none matches at least ``threshold``; ``path`` names the file in it.

    >>> guess_version(cm.load("old.pt", upgrade=False), schema).version
    <Version('1.0.0')>
    """
    known: dict[Version, list[Signature]] = {v: list(sigs) for v, sigs in schema.signatures.items()}
    if fixtures is None:
        fixtures = fixtures_folders()
    for version, sigs in signatures_from_fixtures(schema, fixtures).items():
        known.setdefault(version, []).extend(sigs)
    mine = signature_of(ckpt.state_dict)
    scores = sorted(
        ((max(similarity(mine, s) for s in sigs), v) for v, sigs in known.items() if sigs),
        key=lambda item: (-item[0], item[1]),
    )
    ranked = [(str(v), round(score, 4)) for score, v in scores]
    if not scores or scores[0][0] < threshold:
        raise AmbiguousVersionError(schema.name, ranked[:3], tied=False, path=path)
    best = scores[0][0]
    tied = [(v, s) for v, s in ranked if s == round(best, 4)]
    if len(tied) > 1:
        raise AmbiguousVersionError(schema.name, tied, path=path)
    return Guess(scores[0][1], best, ranked)


def resolve_from_version(
    ckpt: Checkpoint,
    schema: Schema,
    given: str | Version,
    *,
    what: str = "from_version",
    path: object = None,
) -> Version:
    """The version ``given`` for a file: ``"auto"`` is its stamp, else guessed from its keys.

    >>> resolve_from_version(cm.load("old.pt", upgrade=False), schema, "auto")
    <Version('1.0.0')>
    """
    if isinstance(given, str) and given == "auto":
        if ckpt.version is not None:
            return ckpt.version
        return guess_version(ckpt, schema, path=path).version
    return parse_version(given, what=what)


def apply_from_version(
    ckpt: Checkpoint,
    schema: Schema | None,
    from_version: str | Version | None,
    *,
    what: str = "from_version",
    path: object = None,
) -> Checkpoint:
    """``ckpt`` with the version ``from_version`` says (``"auto"``: guessed), for an unstamped
    file; a stamped one is returned as it is when the two agree.

    None changes nothing. A stamp that says another version is a
    :class:`~ckptmigrate.errors.VersionConflictError`: the stamp wins, so the caller is told.

    >>> apply_from_version(raw, schema, "1.0.0").version
    <Version('1.0.0')>
    """
    if from_version is None:
        return ckpt
    if schema is not None:
        given = resolve_from_version(ckpt, schema, from_version, what=what, path=path)
    elif isinstance(from_version, str) and from_version == "auto":
        raise UsageError("from_version='auto' needs schema= to compare signatures with")
    else:
        given = parse_version(from_version, what=what)
    if ckpt.version is not None:
        if ckpt.version != given:
            raise VersionConflictError(ckpt.version, given, path=path)
        return ckpt
    if schema is None:
        raise UsageError("from_version= needs schema= to say which schema the file belongs to")
    return replace(ckpt, schema=schema.name, version=given)
