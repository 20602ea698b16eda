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

A corrupt file (SD cards do this after a power cut) is not a reason for a gate to stay
down: at open it is renamed to ``outbox.db.corrupt-<UTC time>`` (kept for forensics) and a
fresh outbox starts, with :attr:`Outbox.quarantined` set so the caller raises an alarm. The
events in the bad file are lost; that must show as a gap at the collector, never be hidden
by a new event reusing a seq. So seqs are also reserved in blocks in a sidecar file
(``outbox.seq``, fsynced before any seq of a new block is committed): a fresh outbox starts
at the reserved mark, above every seq the old one can have used.

A ``state`` row (key → blob) may be written in the same transaction as an event: what is
derived from events (the site's occupancy counts) then can never disagree with them after a
power cut, and costs no second fsync.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from scanner import durable
from scanner.events import now_ms

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    created TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value BLOB NOT NULL)
"""

# The statements, named once here. (Module level also keeps mutmut from planting their lower-
# and upper-case spellings, which SQLite reads the same: equivalent mutants that each cost a
# whole run of the gate's tests; docs/mutation.md.)
_WAL = "PRAGMA journal_mode=WAL"
# FULL: the WAL is fsynced on every commit, so a returned append survives power loss.
_SYNC_FULL = "PRAGMA synchronous=FULL"
# A delivered check-in is personal data the gate no longer needs: zero its bytes instead of
# leaving them readable in free pages until they happen to be reused.
_SECURE_DELETE = "PRAGMA secure_delete=ON"
_QUICK_CHECK = "PRAGMA quick_check"
# Fold the WAL into the database and cut it to nothing.
_CHECKPOINT = "PRAGMA wal_checkpoint(TRUNCATE)"
_BEGIN = "BEGIN IMMEDIATE"
_COMMIT = "COMMIT"
_ROLLBACK = "ROLLBACK"
_IS_NEW = "SELECT name FROM sqlite_master WHERE name = 'meta'"
_START_SEQS = "INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', ?)"
_COUNT = "SELECT COUNT(*) FROM outbox"
_NEXT_SEQ = "SELECT value FROM meta WHERE key = 'next_seq'"
_INSERT = "INSERT INTO outbox (seq, created, payload) VALUES (?, ?, ?)"
_SET_STATE = "INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)"
_ADVANCE = "UPDATE meta SET value = ? WHERE key = 'next_seq'"
_DELETE_SEQ = "DELETE FROM outbox WHERE seq = ?"
_DELETE_RANGE = "DELETE FROM outbox WHERE seq BETWEEN ? AND ?"
_DELETE_UPTO = "DELETE FROM outbox WHERE seq <= ?"
_PENDING = "SELECT seq, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?"
_STATE = "SELECT value FROM state WHERE key = ?"
_OLDEST = "SELECT created FROM outbox ORDER BY seq LIMIT 1"


# Seqs reserved per sidecar write: one extra fsync per this many appends, and the gap a
# corrupted outbox leaves at the collector is at most this much larger than the real loss.
SEQ_BLOCK = 1000
# A corrupt outbox moved aside is kept this long for a technician, then deleted: the longest
# time any contact-tracing system kept check-ins (4 weeks), never longer.
QUARANTINE_KEEP_DAYS = 28
# What SQLite says about a file it cannot trust (as opposed to one it cannot open at all).
_CORRUPT_MARKERS = ("file is not a database", "malformed", "corrupt")


class OutboxError(Exception):
    """The outbox cannot take or give events (full, disk full, read-only, corrupt, closed).

    The caller must treat this as "no record was made": the gate fails secure.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Outbox:
    """Bounded, durable FIFO of event payloads keyed by a per-device ``seq``."""

    def __init__(
        self,
        path: Path,
        max_events: int,
        *,
        clock: Callable[[], str] = now_ms,
        seq_block: int = SEQ_BLOCK,
    ) -> None:
        self.path = Path(path)
        self.max_events = max_events
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._seq_block = max(1, int(seq_block))
        self.seq_path = self.path.with_name(self.path.name.removesuffix(".db") + ".seq")
        #: Where a corrupt outbox found at open was moved to (None: the file was fine).
        self.quarantined: Path | None = None
        try:
            conn = self._open()
        except _Corrupt as exc:
            self.quarantined = self._quarantine(str(exc))
            try:
                conn = self._open()
            except _Corrupt as again:
                raise OutboxError(f"cannot use {self.path}: {again}") from again
        self._conn = conn
        self._expire_quarantined()

    def _expire_quarantined(self) -> None:
        """Delete quarantined outboxes older than QUARANTINE_KEEP_DAYS: kept that long for a
        technician to look into, never longer than the check-ins in them may be kept at all."""
        cutoff = time.time() - timedelta(days=QUARANTINE_KEEP_DAYS).total_seconds()
        for old in self.path.parent.glob(f"{self.path.name}.corrupt-*"):
            try:
                if old.stat().st_mtime < cutoff:  # pragma: no mutate (tie)
                    old.unlink()
                    log.warning(
                        "deleted %s: a quarantined outbox older than %d days", old, QUARANTINE_KEEP_DAYS
                    )
            except OSError as exc:
                log.warning("cannot delete the old quarantined outbox %s: %s", old, exc)

    def _open(self) -> sqlite3.Connection:
        try:
            self._create_private(self.path)
            conn = sqlite3.connect(
                str(self.path),
                # sqlite3's default busy timeout (5 s) covers a reader such as `selftest`.
                isolation_level=None,  # explicit BEGIN/COMMIT: we decide what one transaction is
                check_same_thread=False,  # shared by the pipeline and publisher under self._lock
            )
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"cannot open {self.path}: {exc}") from exc
        try:
            mode = conn.execute(_WAL).fetchone()[0]
            if mode != "wal":
                log.warning("outbox %s: journal_mode is %s, not wal", self.path, mode)
            conn.execute(_SYNC_FULL)
            conn.execute(_SECURE_DELETE)
            fresh = conn.execute(_IS_NEW).fetchone() is None
            if not fresh:
                check = [str(r[0]) for r in conn.execute(_QUICK_CHECK).fetchall()]
                if check != ["ok"]:
                    raise sqlite3.DatabaseError(f"quick_check: corrupt: {'; '.join(check[:3])}")
            self._reserved = self._read_reserved()
            # One transaction, so a crash cannot leave a new file that starts again at 1. A new
            # file beside an old high-water mark (quarantined or deleted outbox) continues above
            # every seq the old file can have used; an existing file keeps its own next_seq.
            conn.execute(_BEGIN)
            for statement in _SCHEMA.split(";"):
                conn.execute(statement)
            conn.execute(_START_SEQS, (self._reserved,))
            conn.execute(_COMMIT)
            if fresh and self._reserved > 1:
                log.warning("outbox %s is new: seqs continue at %d", self.path, self._reserved)
            self._depth = int(conn.execute(_COUNT).fetchone()[0])
        except sqlite3.Error as exc:
            conn.close()
            if isinstance(exc, sqlite3.DatabaseError) and any(m in str(exc) for m in _CORRUPT_MARKERS):
                raise _Corrupt(str(exc)) from exc
            raise OutboxError(f"cannot use {self.path}: {exc}") from exc
        return conn

    def _quarantine(self, why: str) -> Path:
        """Move the corrupt file and its -wal/-shm aside (0600, personal data); return the new name."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            for suffix in ("-wal", "-shm", ""):  # the database file last: it names the set
                src = Path(f"{self.path}{suffix}")
                if src.exists():
                    dst = Path(f"{target}{suffix}")
                    os.rename(src, dst)
                    os.chmod(dst, 0o600)
            durable.fsync_dir(self.path.parent)
        except OSError as exc:
            raise OutboxError(f"{self.path} is corrupt ({why}) and cannot be moved aside: {exc}") from exc
        log.error("outbox %s is corrupt (%s): moved to %s, starting a new one", self.path, why, target)
        return target

    # --- seq high-water mark -----------------------------------------------------------------

    def _read_reserved(self) -> int:
        """The first seq not yet reserved (1 when there is no sidecar or it is unreadable)."""
        try:
            return max(1, int(self.seq_path.read_bytes()))  # int() reads ASCII digits, blanks around
        except FileNotFoundError:
            return 1
        except (OSError, ValueError) as exc:
            # The db's own next_seq still holds; only the protection against a lost db is gone.
            log.warning("outbox seq mark %s unreadable (%s); rewritten on append", self.seq_path, exc)
            return 1

    def _reserve(self, seq: int) -> None:
        """Make sure ``seq`` is below the mark on disk before it is committed (caller holds the lock)."""
        if seq < self._reserved:
            return
        mark = seq + self._seq_block
        try:
            durable.replace_file(self.seq_path, b"%d\n" % mark)
        except OSError as exc:
            raise OutboxError(f"cannot reserve seqs in {self.seq_path}: {exc}") from exc
        self._reserved = mark

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

    def append(
        self,
        build: Callable[[int, str], bytes],
        *,
        state: Callable[[bytes], tuple[str, bytes] | None] | None = None,
    ) -> int:
        """Allocate the next seq, store ``build(seq, created)`` and commit; return the seq.

        When this returns, the event is on disk (fsynced). ``build`` runs inside the
        transaction so the payload can carry its own seq; if it raises, nothing is stored
        and the seq is not consumed. ``state(payload)`` runs after it, in the same
        transaction: the (key, blob) it returns replaces that state row (None: none).
        """
        with self._lock:
            conn = self._require()
            if self._depth >= self.max_events:
                raise OutboxError(f"full: {self._depth} events (max {self.max_events})")
            try:
                conn.execute(_BEGIN)
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot begin: {exc}") from exc
            try:
                seq = int(conn.execute(_NEXT_SEQ).fetchone()[0])
                self._reserve(seq)
                created = self._clock()
                payload = build(seq, created)
                conn.execute(_INSERT, (seq, created, payload))
                row = state(payload) if state is not None else None
                if row is not None:
                    conn.execute(_SET_STATE, row)
                conn.execute(_ADVANCE, (seq + 1,))
                conn.execute(_COMMIT)
            except sqlite3.Error as exc:
                self._rollback(conn)
                raise OutboxError(f"cannot append: {exc}") from exc
            except OutboxError:
                self._rollback(conn)
                raise
            except BaseException:
                self._rollback(conn)
                raise
            self._depth += 1
            return seq

    def remove(self, seqs: Iterable[int]) -> int:
        """Delete the given seqs (unknown ones are ignored); return how many were deleted."""
        rows: list[tuple[int, ...]] = [(int(s),) for s in seqs]
        if not rows:
            return 0
        return self._delete(_DELETE_SEQ, rows)

    def remove_range(self, first: int, last: int) -> int:
        """Delete every row with ``first`` <= seq <= ``last`` in one statement (a collector's ack range)."""
        return self._delete(_DELETE_RANGE, [(int(first), int(last))])

    def remove_upto(self, seq: int) -> int:
        """Delete every row with seq <= ``seq`` (the collector's cumulative ack)."""
        return self._delete(_DELETE_UPTO, [(int(seq),)])

    def _delete(self, sql: str, rows: list[tuple[int, ...]]) -> int:
        with self._lock:
            conn = self._require()
            before = conn.total_changes
            try:
                conn.execute(_BEGIN)
                conn.executemany(sql, rows)
                conn.execute(_COMMIT)
            except sqlite3.Error as exc:
                self._rollback(conn)
                raise OutboxError(f"cannot remove: {exc}") from exc
            except BaseException:
                # Anything else (an int too large to bind, an interrupt) must not leave the write
                # transaction open on the connection the pipeline appends through.
                self._rollback(conn)
                raise
            deleted = conn.total_changes - before
            self._depth -= deleted
            if deleted and self._depth == 0:
                # Drained: checkpoint, so the WAL frames that still held delivered check-ins
                # are gone from the card too.
                try:
                    conn.execute(_CHECKPOINT)
                except sqlite3.Error as exc:  # only tidiness failed: the rows are deleted
                    log.warning("outbox %s: checkpoint after draining failed: %s", self.path, exc)
            return deleted

    # --- reading ---------------------------------------------------------------------------

    def pending(self, after_seq: int = 0, limit: int = 100) -> list[tuple[int, bytes]]:
        """Up to ``limit`` (seq, payload) rows with seq > ``after_seq``, in seq order."""
        with self._lock:
            conn = self._require()
            try:
                cur = conn.execute(_PENDING, (int(after_seq), int(limit)))
                return [(int(seq), bytes(payload)) for seq, payload in cur.fetchall()]
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read: {exc}") from exc

    def saved_state(self, key: str) -> bytes | None:
        """The blob last written under ``key`` with an event (None: never, or unreadable)."""
        with self._lock:
            conn = self._require()
            try:
                row = conn.execute(_STATE, (key,)).fetchone()
            except sqlite3.Error as exc:
                log.warning("outbox %s: cannot read state %r: %s", self.path, key, exc)
                return None
            return None if row is None else bytes(row[0])

    def depth(self) -> int:
        with self._lock:
            self._require()
            return self._depth

    def oldest_created(self) -> str | None:
        with self._lock:
            conn = self._require()
            try:
                row = conn.execute(_OLDEST).fetchone()
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read: {exc}") from exc
            return None if row is None else str(row[0])

    @property
    def next_seq(self) -> int:
        """The seq the next append will get (a peek: nothing is reserved)."""
        with self._lock:
            conn = self._require()
            try:
                return int(conn.execute(_NEXT_SEQ).fetchone()[0])
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
                conn.execute(_ROLLBACK)
        except sqlite3.Error:
            # SQLite may already have rolled back (e.g. on SQLITE_FULL); the next BEGIN recovers.
            pass


class _Corrupt(Exception):
    """SQLite does not trust the file's contents (internal: the outbox quarantines it)."""


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
        outbox.seq_path.unlink(missing_ok=True)
    return n / elapsed if elapsed > 0 else float("inf")
