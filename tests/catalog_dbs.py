"""The catalogs the catalog tests write to: an SQLite file, or a database of its own on the
real PostgreSQL server on loopback (``postgres_server``), one test each."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path) -> str:
    """A new, empty catalog: an SQLite file, or a database of its own on the server."""
    if request.param == "sqlite":
        return str(tmp_path / "catalog.sqlite")
    import psycopg

    url = request.getfixturevalue("postgres_url")
    name = f"cat_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return url.rsplit("/", 1)[0] + f"/{name}"
