"""A private PostgreSQL for the tests: one cluster per test session, one database per test.

The cluster (scanner.bench.outbox.LocalPostgres: initdb + pg_ctl on a free port in a temp dir
owned by ``postgres``, run through ``runuser`` because initdb refuses root, unix socket in
that dir) starts on first use and stops (``pg_ctl -m immediate``) when the session ends.
Where the server binaries, runuser or psycopg are missing, tests that need it are skipped
with the reason.
"""

from __future__ import annotations

import atexit
import uuid

import pytest

from scanner.bench.outbox import LocalPostgres, PostgresUnavailable

_server: LocalPostgres | None = None
_unavailable: str | None = None


def server() -> LocalPostgres:
    """The session's cluster, started on first call; skips the calling test if impossible."""
    global _server, _unavailable
    if _unavailable is not None:
        pytest.skip(_unavailable)
    if _server is None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            _unavailable = "psycopg 3 is not installed (pip install -e '.[test]')"
            pytest.skip(_unavailable)
        try:
            # fsync off: a test database need not survive power loss, and it saves seconds.
            _server = LocalPostgres(durable=False).start()
        except PostgresUnavailable as exc:
            _unavailable = f"no private PostgreSQL: {exc}"
            pytest.skip(_unavailable)
        atexit.register(_server.stop)
    return _server


def new_database() -> str:
    """A fresh, empty database on the session's cluster; returns its URL."""
    return server().create_database(f"t_{uuid.uuid4().hex[:12]}")


def store_url(kind: str, tmp_path) -> str:  # type: ignore[no-untyped-def]
    if kind == "postgresql":
        return new_database()
    return f"sqlite:{tmp_path / 'collector.db'}"
