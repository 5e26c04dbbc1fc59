"""PEP 440 versions for schemas and checkpoints, parsed once and compared as versions."""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

from ..errors import MigrationGraphError

#: This library's own release (pyproject.toml says the same); stamps record it in written_by.
__version__ = "0.1.0"


def parse_version(value: str | Version, *, what: str = "version") -> Version:
    """Return ``value`` as a :class:`packaging.version.Version`.

    >>> parse_version("1.10.0") > parse_version("1.9.0")
    True
    """
    if isinstance(value, Version):
        return value
    if not isinstance(value, str):
        raise MigrationGraphError(
            f"{what} must be a PEP 440 version string such as '1.2.0', got {type(value).__name__}"
        )
    try:
        return Version(value)
    except (InvalidVersion, ValueError):  # ValueError: a release number past int()'s digit limit
        raise MigrationGraphError(
            f"{what} {value[:60]!r} is not a PEP 440 version: use a string such as '1.2.0'"
        ) from None
