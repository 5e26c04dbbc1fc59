"""Legacy fixtures on disk: a checkpoint the old code wrote, and its golden record beside it.

A golden record, ``<stem>.golden.pt``, is a ``torch.save`` dict holding ``fixture`` (the file
name), ``schema``, ``version``, ``variant``, ``input``, ``output``, ``atol``, ``rtol`` and the
old code's ``hparams``. This module finds and reads them; :mod:`ckptmigrate.inspection.fixtures` checks
them (upgrade, load, compare), and :mod:`ckptmigrate.engine.guess` reads their key signatures.

>>> [f.label for f in find_fixtures("fixtures/tinylm")]
['tinylm 1.0.0', 'tinylm 1.0.0 unstamped', ...]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base.version import parse_version
from ..errors import CheckpointFormatError, PathNotFoundError

GOLDEN_SUFFIX = ".golden.pt"
REQUIRED_KEYS = ("fixture", "schema", "version", "input", "output")
DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-5


@dataclass(frozen=True)
class Fixture:
    """One legacy checkpoint and its golden record; the version comes from the record."""

    path: Path
    golden_path: Path
    schema: str
    version: str
    variant: str | None = None
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    #: the mount whose schema builds the model (None: the only mount of ``schema``, or the
    #: whole file when it has no mounts)
    prefix: str | None = None

    @property
    def label(self) -> str:
        """``"tinyconv 1.0.0 stripes"``: schema, version and variant, for reports."""
        return " ".join(p for p in (self.schema, self.version, self.variant) if p)


def read_golden(golden_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The golden record as stored, read with torch's weights-only loader."""
    import torch

    path = Path(golden_path)
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointFormatError(
            f"not a readable golden record ({type(exc).__name__}: {one_line(exc)})", path=path
        ) from exc
    if not isinstance(record, dict):
        raise CheckpointFormatError(
            f"a golden record is a dict, found a {type(record).__name__}", path=path
        )
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise CheckpointFormatError(
            f"golden record lacks {', '.join(missing)}; it needs {', '.join(REQUIRED_KEYS)}",
            path=path,
        )
    return record


def fixture_from_golden(golden_path: str | os.PathLike[str]) -> Fixture:
    """The :class:`Fixture` a golden record describes (its checkpoint lies beside it)."""
    golden_path = Path(golden_path)
    record = read_golden(golden_path)
    variant = record.get("variant")
    return Fixture(
        path=golden_path.parent / str(record["fixture"]),
        golden_path=golden_path,
        schema=str(record["schema"]),
        version=str(parse_version(str(record["version"]), what="golden record version")),
        variant=None if variant is None else str(variant),
        atol=float(record.get("atol", DEFAULT_ATOL)),
        rtol=float(record.get("rtol", DEFAULT_RTOL)),
        prefix=None if record.get("prefix") is None else str(record["prefix"]),
    )


def find_fixtures(root: str | os.PathLike[str]) -> list[Fixture]:
    """Every fixture whose golden record (``*.golden.pt``) lies under ``root``, sorted by path.

    >>> [f.label for f in find_fixtures("fixtures/tinylm")]
    ['tinylm 1.0.0', 'tinylm 1.0.0 unstamped', ...]
    """
    return [fixture_from_golden(p) for p in golden_paths(root)]


def golden_paths(root: str | os.PathLike[str]) -> list[Path]:
    """Every golden record (``*.golden.pt``) under ``root`` (or ``root`` itself), sorted."""
    root = Path(root)
    if root.is_file() and root.name.endswith(GOLDEN_SUFFIX):
        return [root]
    if not root.is_dir():
        raise PathNotFoundError(
            root,
            "fixtures folder",
            f"the folder that holds the *{GOLDEN_SUFFIX} golden records (e.g. fixtures/)",
        )
    return sorted(root.rglob(f"*{GOLDEN_SUFFIX}"))


def one_line(exc: BaseException, limit: int = 400) -> str:
    """The message of ``exc`` on one line, cut at ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
