"""The collector's store: every check-in from every gate, once, keyed by ``event_id``.

Two backends behind one small class shape: SQLite for one site with no setup
(``sqlite:PATH``: WAL, ``synchronous=FULL``, file 0600) and PostgreSQL when it grows
(``postgresql://…`` via psycopg 3). One table; the raw JSON is kept next to the columns the
collector and ``trace`` query on, so nothing a gate sent is ever lost to a column choice.
What the collector cannot store as a check-in goes to a dead-letter table, ``rejected``, as
the bytes that arrived (a check-in holds no personal data beyond pseudonyms by design): the
gate may then forget it, and it is still kept centrally for whoever can repair it.

``ts`` is the gate's scan time. SQLite keeps it as the gate's RFC 3339 text (fixed width,
always ``Z``, so text order is time order); PostgreSQL as ``timestamptz``. Callers pass
``datetime`` bounds and get ``str`` back from both.

Not thread-safe: one thread (the collector's worker, or ``trace``) owns a store.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from scanner.events import utc_ms


class StoreError(Exception):
    """The store cannot be opened or written; the message names the store, never a password.

    ``transient`` is false when the data, not the store, is at fault (a value the database
    refuses): retrying the same rows cannot succeed, storing the others one by one can.
    """

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True, slots=True)
class StoredEvent:
    event_id: str
    device: str
    site: str
    direction: str
    seq: int
    ts: str  # RFC 3339 UTC with milliseconds, as the gate sent it
    subject: str | None
    decision: str
    reason: str
    credential_type: str
    raw: str  # the event's JSON text


@dataclass(frozen=True, slots=True)
class RejectedEvent:
    """A message the collector refused, kept as it arrived.

    ``site``/``device`` come from the topic; ``seq`` only when the topic names the device
    and the payload a usable seq (the gate then gets it acknowledged).
    """

    site: str | None
    device: str | None
    seq: int | None
    reason: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Visit:
    subject: str | None
    site: str
    device: str
    direction: str
    ts: str
    decision: str
    reason: str


class Store(Protocol):
    kind: str

    def insert_batch(self, events: Sequence[StoredEvent]) -> int: ...
    def insert_rejected(self, events: Sequence[RejectedEvent]) -> int: ...
    def rejected(self) -> list[RejectedEvent]: ...
    def islands(self) -> dict[tuple[str, str], list[tuple[int, int]]]: ...
    def seqs_between(self, site: str, device: str, lo: int, hi: int) -> list[int]: ...
    def islands_between(self, site: str, device: str, lo: int, hi: int) -> list[tuple[int, int]]: ...
    def count(self) -> int: ...
    def visits(self, subjects: Sequence[str], start: datetime, end: datetime) -> list[Visit]: ...
    def at_site(self, site: str, start: datetime, end: datetime) -> list[Visit]: ...
    def close(self) -> None: ...


_COLUMNS = (
    "event_id",
    "device",
    "site",
    "direction",
    "seq",
    "ts",
    "subject",
    "decision",
    "reason",
    "credential_type",
    "raw",
)
_VISIT = "subject, site, device, direction, ts, decision, reason"

_REJECTED = ("site", "device", "seq", "reason", "payload")

# Gaps and islands: consecutive seqs share (seq - row_number), so each group is one run.
# A dead-lettered seq is handled (acknowledged, kept) just like a stored one: no gap. UNION
# also folds a seq held twice (two event_ids) into one, which the row_number trick needs.
_ISLANDS = """
SELECT site, device, MIN(seq), MAX(seq) FROM (
    SELECT site, device, seq, seq - ROW_NUMBER() OVER (PARTITION BY site, device ORDER BY seq) AS grp
    FROM (
        SELECT site, device, seq FROM checkins
        UNION SELECT site, device, seq FROM rejected WHERE seq IS NOT NULL
    ) handled
) runs GROUP BY site, device, grp ORDER BY site, device, MIN(seq)
"""


_ISLANDS_BETWEEN = """
SELECT MIN(seq), MAX(seq) FROM (
    SELECT seq, seq - ROW_NUMBER() OVER (ORDER BY seq) AS grp FROM (
        SELECT seq FROM checkins WHERE site = ? AND device = ? AND seq BETWEEN ? AND ?
        UNION SELECT seq FROM rejected
        WHERE site = ? AND device = ? AND seq BETWEEN ? AND ? AND seq IS NOT NULL
    ) handled
) runs GROUP BY grp ORDER BY MIN(seq)
"""


def open_store(url: str) -> Store:
    """``sqlite:PATH`` or ``postgresql://…`` (also ``postgres://``)."""
    if url.startswith("sqlite:"):
        path = url.removeprefix("sqlite:")
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise StoreError("sqlite: needs a path, e.g. sqlite:/var/lib/gate-scanner/collector.db")
        return SqliteStore(Path(path))
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    raise StoreError(f"unknown store {url.split(':', 1)[0]!r}: use sqlite:PATH or postgresql://…")


def _redact(url: str) -> str:
    """The URL without a password, for messages."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    userinfo, host = rest.rsplit("@", 1)
    return f"{scheme}://{userinfo.split(':', 1)[0]}@{host}"


class SqliteStore:
    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Contact-tracing data: 0600 from the first byte; -wal/-shm inherit the mode.
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            # Opened by the caller, then used by the collector's worker: one owner at a time.
            self._conn = sqlite3.connect(
                str(path), timeout=10.0, isolation_level=None, check_same_thread=False
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(
                """
                CREATE TABLE IF NOT EXISTS checkins (
                    event_id TEXT PRIMARY KEY,
                    device TEXT NOT NULL,
                    site TEXT NOT NULL,
                    direction TEXT NOT NULL,
                    seq INTEGER NOT NULL,
                    ts TEXT NOT NULL,
                    subject TEXT,
                    decision TEXT NOT NULL,
                    reason TEXT NOT NULL,
                    credential_type TEXT NOT NULL,
                    raw TEXT NOT NULL,
                    received TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
                ) WITHOUT ROWID;
                CREATE INDEX IF NOT EXISTS checkins_device_seq ON checkins (site, device, seq);
                CREATE INDEX IF NOT EXISTS checkins_subject_ts ON checkins (subject, ts);
                CREATE INDEX IF NOT EXISTS checkins_site_ts ON checkins (site, ts);
                CREATE TABLE IF NOT EXISTS rejected (
                    id INTEGER PRIMARY KEY,
                    received TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
                    site TEXT,
                    device TEXT,
                    seq INTEGER,
                    reason TEXT NOT NULL,
                    payload BLOB NOT NULL,
                    CHECK (seq IS NULL OR (site IS NOT NULL AND device IS NOT NULL))
                );
                CREATE UNIQUE INDEX IF NOT EXISTS rejected_device_seq
                    ON rejected (site, device, seq) WHERE seq IS NOT NULL;
                """
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open sqlite:{path}: {exc}") from exc

    def insert_batch(self, events: Sequence[StoredEvent]) -> int:
        """Store the events in one transaction (one fsync); return how many were new."""
        if not events:
            return 0
        sql = f"INSERT INTO checkins ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
        sql += "ON CONFLICT (event_id) DO NOTHING"
        return self._write(sql, [_row(e) for e in events])

    def insert_rejected(self, events: Sequence[RejectedEvent]) -> int:
        """Dead-letter the events in one transaction; a known (site, device, seq) only once."""
        return self._write(_insert_rejected_sql("?"), [_rejected_row(e) for e in events]) if events else 0

    def rejected(self) -> list[RejectedEvent]:
        return _rejected_events(self._query(_SELECT_REJECTED, ()))

    def _write(self, sql: str, rows: list[tuple[Any, ...]]) -> int:
        conn = self._conn
        try:
            before = conn.total_changes
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(sql, rows)
            conn.execute("COMMIT")
        except BaseException as exc:
            # Whatever stopped us (a value sqlite3 cannot bind raises UnicodeEncodeError, not
            # sqlite3.Error), an open transaction would swallow the next batch's COMMIT.
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if not isinstance(exc, Exception):
                raise
            # Locked, busy, I/O, disk full heal by waiting; a value sqlite refuses does not.
            refused = sqlite3.IntegrityError | sqlite3.DataError | sqlite3.InterfaceError
            transient = isinstance(exc, sqlite3.Error) and not isinstance(exc, refused)
            raise StoreError(f"sqlite:{self.path}: insert failed: {exc}", transient=transient) from exc
        return conn.total_changes - before

    def islands(self) -> dict[tuple[str, str], list[tuple[int, int]]]:
        return _group_islands(self._query(_ISLANDS, ()))

    def seqs_between(self, site: str, device: str, lo: int, hi: int) -> list[int]:
        rows = self._query(
            "SELECT seq FROM checkins WHERE site = ? AND device = ? AND seq BETWEEN ? AND ? ORDER BY seq",
            (site, device, lo, hi),
        )
        return [int(r[0]) for r in rows]

    def islands_between(self, site: str, device: str, lo: int, hi: int) -> list[tuple[int, int]]:
        """The runs of consecutive handled (stored or dead-lettered) seqs of one device in [lo, hi]."""
        rows = self._query(_ISLANDS_BETWEEN, (site, device, lo, hi) * 2)
        return [(int(a), int(b)) for a, b in rows]

    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM checkins", ())[0][0])

    def visits(self, subjects: Sequence[str], start: datetime, end: datetime) -> list[Visit]:
        if not subjects:
            return []
        marks = ", ".join("?" * len(subjects))
        rows = self._query(
            f"SELECT {_VISIT} FROM checkins WHERE subject IN ({marks}) AND ts BETWEEN ? AND ? ORDER BY ts",
            (*subjects, utc_ms(start), utc_ms(end)),
        )
        return [Visit(*r) for r in rows]

    def at_site(self, site: str, start: datetime, end: datetime) -> list[Visit]:
        rows = self._query(
            f"SELECT {_VISIT} FROM checkins WHERE site = ? AND ts BETWEEN ? AND ? ORDER BY ts",
            (site, utc_ms(start), utc_ms(end)),
        )
        return [Visit(*r) for r in rows]

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite:{self.path}: query failed: {exc}") from exc

    def close(self) -> None:
        self._conn.close()


class PostgresStore:
    kind = "postgresql"

    def __init__(self, url: str) -> None:
        try:
            import psycopg  # the optional `postgres` extra: a gate never has it
        except ImportError as exc:
            raise StoreError(
                "PostgreSQL store needs psycopg 3: pip install 'gate-scanner[postgres]'"
            ) from exc
        self._psycopg = psycopg
        self._url = url
        self._where = _redact(url)
        try:
            self._conn = psycopg.connect(url, autocommit=False, connect_timeout=10)
            with self._conn.transaction():
                # Two collectors starting at once would race on CREATE TABLE IF NOT EXISTS.
                self._conn.execute("SELECT pg_advisory_xact_lock(74201)")
                self._conn.execute(
                    """
                    CREATE TABLE IF NOT EXISTS checkins (
                        event_id TEXT PRIMARY KEY,
                        device TEXT NOT NULL,
                        site TEXT NOT NULL,
                        direction TEXT NOT NULL,
                        seq BIGINT NOT NULL,
                        ts TIMESTAMPTZ NOT NULL,
                        subject TEXT,
                        decision TEXT NOT NULL,
                        reason TEXT NOT NULL,
                        credential_type TEXT NOT NULL,
                        raw JSONB NOT NULL,
                        received TIMESTAMPTZ NOT NULL DEFAULT now()
                    )
                    """
                )
                for name, cols in (
                    ("checkins_device_seq", "site, device, seq"),
                    ("checkins_subject_ts", "subject, ts"),
                    ("checkins_site_ts", "site, ts"),
                ):
                    self._conn.execute(f"CREATE INDEX IF NOT EXISTS {name} ON checkins ({cols})")
                self._conn.execute(
                    """
                    CREATE TABLE IF NOT EXISTS rejected (
                        id BIGSERIAL PRIMARY KEY,
                        received TIMESTAMPTZ NOT NULL DEFAULT now(),
                        site TEXT,
                        device TEXT,
                        seq BIGINT,
                        reason TEXT NOT NULL,
                        payload BYTEA NOT NULL,
                        CHECK (seq IS NULL OR (site IS NOT NULL AND device IS NOT NULL))
                    )
                    """
                )
                self._conn.execute(
                    "CREATE UNIQUE INDEX IF NOT EXISTS rejected_device_seq "
                    "ON rejected (site, device, seq) WHERE seq IS NOT NULL"
                )
        except psycopg.Error as exc:
            raise StoreError(f"cannot open {self._where}: {exc}") from exc

    def insert_batch(self, events: Sequence[StoredEvent]) -> int:
        """One INSERT … SELECT FROM unnest(arrays): one round trip and one commit per batch."""
        if not events:
            return 0
        cols = list(zip(*(_row(e) for e in events), strict=True))
        types = (
            "text",
            "text",
            "text",
            "text",
            "bigint",
            "timestamptz",
            "text",
            "text",
            "text",
            "text",
            "jsonb",
        )
        arrays = ", ".join(f"%s::{t}[]" for t in types)
        sql = (
            f"INSERT INTO checkins ({', '.join(_COLUMNS)}) SELECT * FROM unnest({arrays}) "
            "ON CONFLICT (event_id) DO NOTHING"
        )
        return self._write(sql, [[list(c) for c in cols]])

    def insert_rejected(self, events: Sequence[RejectedEvent]) -> int:
        """Dead-letter the events in one transaction; a known (site, device, seq) only once."""
        return self._write(_insert_rejected_sql("%s"), [_rejected_row(e) for e in events]) if events else 0

    def rejected(self) -> list[RejectedEvent]:
        return _rejected_events(self._query(_SELECT_REJECTED, ()))

    def _write(self, sql: str, rows: list[Sequence[Any]]) -> int:
        psycopg = self._psycopg
        try:
            conn = self._connection()
            inserted = 0
            # The transaction block rolls back on any exception, BaseException included.
            with conn.transaction(), conn.cursor() as cur:
                for row in rows:
                    cur.execute(sql, row)
                    inserted += max(cur.rowcount, 0)
        except Exception as exc:
            # A value the server refuses (class 22/23) or psycopg cannot send (a NUL, a lone
            # surrogate) stays refused; a lost or busy server does not.
            transient = isinstance(exc, psycopg.Error) and not isinstance(
                exc, psycopg.DataError | psycopg.IntegrityError
            )
            raise StoreError(f"{self._where}: insert failed: {exc}", transient=transient) from exc
        return inserted

    def _connection(self) -> Any:
        # A restarted server or a cut link closes a psycopg connection for good: without a
        # new one, every retry of the collector's would fail the same way.
        if self._conn.closed:
            self._conn = self._psycopg.connect(self._url, autocommit=False, connect_timeout=10)
        return self._conn

    def islands(self) -> dict[tuple[str, str], list[tuple[int, int]]]:
        return _group_islands(self._query(_ISLANDS, ()))

    def seqs_between(self, site: str, device: str, lo: int, hi: int) -> list[int]:
        rows = self._query(
            "SELECT seq FROM checkins WHERE site = %s AND device = %s AND seq BETWEEN %s AND %s ORDER BY seq",
            (site, device, lo, hi),
        )
        return [int(r[0]) for r in rows]

    def islands_between(self, site: str, device: str, lo: int, hi: int) -> list[tuple[int, int]]:
        rows = self._query(_ISLANDS_BETWEEN.replace("?", "%s"), (site, device, lo, hi) * 2)
        return [(int(a), int(b)) for a, b in rows]

    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM checkins", ())[0][0])

    def visits(self, subjects: Sequence[str], start: datetime, end: datetime) -> list[Visit]:
        if not subjects:
            return []
        rows = self._query(
            f"SELECT {_VISIT} FROM checkins WHERE subject = ANY(%s) AND ts BETWEEN %s AND %s ORDER BY ts",
            (list(subjects), start, end),
        )
        return [_pg_visit(r) for r in rows]

    def at_site(self, site: str, start: datetime, end: datetime) -> list[Visit]:
        rows = self._query(
            f"SELECT {_VISIT} FROM checkins WHERE site = %s AND ts BETWEEN %s AND %s ORDER BY ts",
            (site, start, end),
        )
        return [_pg_visit(r) for r in rows]

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            conn = self._connection()
            with conn.transaction():
                return conn.execute(sql, params).fetchall()
        except self._psycopg.Error as exc:
            raise StoreError(f"{self._where}: query failed: {exc}") from exc

    def close(self) -> None:
        self._conn.close()


def _row(e: StoredEvent) -> tuple[Any, ...]:
    return (
        e.event_id,
        e.device,
        e.site,
        e.direction,
        e.seq,
        e.ts,
        e.subject,
        e.decision,
        e.reason,
        e.credential_type,
        e.raw,
    )


_SELECT_REJECTED = f"SELECT {', '.join(_REJECTED)} FROM rejected ORDER BY id"


def _insert_rejected_sql(placeholder: str) -> str:
    values = ", ".join([placeholder] * len(_REJECTED))
    return f"INSERT INTO rejected ({', '.join(_REJECTED)}) VALUES ({values}) ON CONFLICT DO NOTHING"


def _rejected_events(rows: Iterable[tuple[Any, ...]]) -> list[RejectedEvent]:
    return [RejectedEvent(site, device, seq, reason, bytes(blob)) for site, device, seq, reason, blob in rows]


def _rejected_row(e: RejectedEvent) -> tuple[Any, ...]:
    return (e.site, e.device, e.seq, e.reason, e.payload)


def _pg_visit(row: tuple[Any, ...]) -> Visit:
    subject, site, device, direction, ts, decision, reason = row
    return Visit(subject, site, device, direction, utc_ms(ts), decision, reason)


def _group_islands(rows: Iterable[tuple[Any, ...]]) -> dict[tuple[str, str], list[tuple[int, int]]]:
    out: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for site, device, lo, hi in rows:
        out.setdefault((site, device), []).append((int(lo), int(hi)))
    return out
