"""Durable SQLite outbox: every check-in is committed here before the relay moves.

The pipeline appends (one thread), the publisher reads and removes (another thread). Both
share ONE connection behind a lock rather than a connection per thread:

- SQLite lets only one writer in at a time anyway, so two connections would buy no
  parallelism on the write path, only ``SQLITE_BUSY`` handling and busy-timeout waits;
- with one connection the depth can be counted in memory (``COUNT(*)`` scans the table:
  milliseconds at 200k rows, on every append) and stays exact;
- every critical section is one short transaction (one fsync), so the pipeline waits at
  most one publisher ``remove`` behind it.

``seq`` lives in a ``meta`` row updated in the same transaction as the insert, so it is
never reused: not after rows are deleted, not after the process is killed mid-append.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    created TEXT NOT NULL,
    payload BLOB NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', 1);
"""


class OutboxError(Exception):
    """The outbox cannot take or give events (full, disk full, read-only, corrupt, closed).

    The caller must treat this as "no record was made": the gate fails secure.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Outbox:
    """Bounded, durable FIFO of event payloads keyed by a per-device ``seq``."""

    def __init__(self, path: Path, max_events: int, *, clock: Callable[[], str] = utc_now_iso) -> None:
        self.path = Path(path)
        self.max_events = max_events
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        try:
            self._create_private(self.path)
            conn = sqlite3.connect(
                str(self.path),
                timeout=5.0,
                isolation_level=None,  # explicit BEGIN/COMMIT: we decide what one transaction is
                check_same_thread=False,  # shared by the pipeline and publisher under self._lock
            )
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"cannot open {self.path}: {exc}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                log.warning("outbox %s: journal_mode is %s, not wal", self.path, mode)
            # FULL: the WAL is fsynced on every commit, so a returned append survives power loss.
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            self._depth = int(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        except sqlite3.Error as exc:
            conn.close()
            raise OutboxError(f"cannot use {self.path}: {exc}") from exc
        self._conn = conn

    @staticmethod
    def _create_private(path: Path) -> None:
        # Check-ins are personal data: 0600 from the first byte, not chmod after the fact.
        # SQLite gives the -wal and -shm files the mode of the database file.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)

    # --- writing ---------------------------------------------------------------------------

    def append(self, build: Callable[[int, str], bytes]) -> int:
        """Allocate the next seq, store ``build(seq, created)`` and commit; return the seq.

        When this returns, the event is on disk (fsynced). ``build`` runs inside the
        transaction so the payload can carry its own seq; if it raises, nothing is stored
        and the seq is not consumed.
        """
        with self._lock:
            conn = self._require()
            if self._depth >= self.max_events:
                raise OutboxError(f"full: {self._depth} events (max {self.max_events})")
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot begin: {exc}") from exc
            try:
                seq = int(conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0])
                created = self._clock()
                payload = build(seq, created)
                conn.execute(
                    "INSERT INTO outbox (seq, created, payload) VALUES (?, ?, ?)", (seq, created, payload)
                )
                conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq + 1,))
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback(conn)
                raise OutboxError(f"cannot append: {exc}") from exc
            except BaseException:
                self._rollback(conn)
                raise
            self._depth += 1
            return seq

    def remove(self, seqs: Iterable[int]) -> int:
        """Delete the given seqs (unknown ones are ignored); return how many were deleted."""
        rows = [(int(s),) for s in seqs]
        if not rows:
            return 0
        return self._delete("DELETE FROM outbox WHERE seq = ?", rows, many=True)

    def remove_range(self, first: int, last: int) -> int:
        """Delete every row with ``first`` <= seq <= ``last`` in one statement (a collector's ack range)."""
        return self._delete(
            "DELETE FROM outbox WHERE seq BETWEEN ? AND ?", [(int(first), int(last))], many=False
        )

    def remove_upto(self, seq: int) -> int:
        """Delete every row with seq <= ``seq`` (the collector's cumulative ack)."""
        return self._delete("DELETE FROM outbox WHERE seq <= ?", [(int(seq),)], many=False)

    def _delete(self, sql: str, rows: list[tuple[int, ...]], *, many: bool) -> int:
        with self._lock:
            conn = self._require()
            before = conn.total_changes
            try:
                conn.execute("BEGIN IMMEDIATE")
                if many:
                    conn.executemany(sql, rows)
                else:
                    conn.execute(sql, rows[0])
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback(conn)
                raise OutboxError(f"cannot remove: {exc}") from exc
            deleted = conn.total_changes - before
            self._depth -= deleted
            return deleted

    # --- reading ---------------------------------------------------------------------------

    def pending(self, after_seq: int = 0, limit: int = 100) -> list[tuple[int, bytes]]:
        """Up to ``limit`` (seq, payload) rows with seq > ``after_seq``, in seq order."""
        with self._lock:
            conn = self._require()
            try:
                cur = conn.execute(
                    "SELECT seq, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                    (int(after_seq), int(limit)),
                )
                return [(int(seq), bytes(payload)) for seq, payload in cur.fetchall()]
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read: {exc}") from exc

    def depth(self) -> int:
        with self._lock:
            self._require()
            return self._depth

    def oldest_created(self) -> str | None:
        with self._lock:
            conn = self._require()
            try:
                row = conn.execute("SELECT created FROM outbox ORDER BY seq LIMIT 1").fetchone()
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read: {exc}") from exc
            return None if row is None else str(row[0])

    @property
    def next_seq(self) -> int:
        """The seq the next append will get (a peek: nothing is reserved)."""
        with self._lock:
            conn = self._require()
            try:
                return int(conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0])
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read: {exc}") from exc

    # --- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Idempotent. Later calls raise OutboxError("closed")."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError("closed")
        return self._conn

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            # SQLite may already have rolled back (e.g. on SQLITE_FULL); the next BEGIN recovers.
            pass


def bench_commits(path: Path, n: int) -> float:
    """Durable appends per second on the filesystem holding ``path`` (a scratch file).

    The file must not exist (so a real outbox is never touched); it is deleted afterwards.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; bench_commits needs a scratch path")
    payload = b'{"bench":' + b"x" * 300 + b"}"  # about the size of a check-in event
    outbox = Outbox(path, max_events=max(n, 10))
    try:
        start = time.perf_counter()
        for _ in range(n):
            outbox.append(lambda seq, created: payload)
        elapsed = time.perf_counter() - start
    finally:
        outbox.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    return n / elapsed if elapsed > 0 else float("inf")
