"""The collector's store: every check-in from every gate, once, keyed by ``event_id``, and the
stays derived from them.

Two backends behind one class shape: SQLite for one site with no setup (``sqlite:PATH``: WAL,
``synchronous=FULL``, file 0600) and PostgreSQL when it grows (``postgresql://…`` via
psycopg 3). The raw JSON is kept next to the columns the collector and ``trace`` query on, so
nothing a gate sent is ever lost to a column choice. What the collector cannot store as a
check-in goes to a dead-letter table, ``rejected``, as the bytes that arrived (a check-in holds
no personal data beyond pseudonyms by design): the gate may then forget it, and it is still
kept centrally for whoever can repair it.

Stays (``scanner.central.stays``) are derived in the same transaction as the check-ins that
make them: a batch's commit carries the stays of every unit (subject, site, site day) its
events touch, derived again from all of that unit's check-ins, so a late event corrects
exactly the stays it changes and the stays never disagree with the check-ins. Rules that
change (``day_start``, ``max_stay_h``, …) make every stay stale: ``rules_changed`` says so
and ``rebuild_stays`` derives them all again.

Retention: check-ins, stays and dead letters older than ``collector.retention_days`` go, in
steps (``expire_step``) small enough to run between two ingest batches. SQLite deletes a
bounded number of rows per step. PostgreSQL keeps each of the three tables partitioned by day
(check-ins by scan time, stays by site day, dead letters by arrival) and drops a whole day's
partition per step; a day-partition is created as its first row comes, and rows far outside
the retention window (a gate whose clock is years off) land in a default partition that is
emptied in bounded deletes. Dropping a device's oldest check-ins must not read as a gap, so
the highest seq dropped per device is kept (``seq_floor``) and counts as handled.

``ts`` is the gate's scan time. SQLite keeps it as the gate's RFC 3339 text (fixed width,
always ``Z``, so text order is time order); PostgreSQL as ``timestamptz``. Callers pass
``datetime`` bounds and get ``str`` or aware ``datetime`` back from both alike.

Not thread-safe: one thread (the collector's worker, or ``trace``) owns a store.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sqlite3
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from scanner.central.stays import ANNUL_GRACE, Stay, StayRules, UnitEvent, derive, units_of
from scanner.config import CollectorConfig
from scanner.events import parse_utc, utc_ms

log = logging.getLogger(__name__)

UNIT_QUERY_MAX = 500  # subjects per query when deriving stays (SQLite allows 32766 parameters)
SQLITE_CACHE_KIB = 128 * 1024
SQLITE_CHECKPOINT_PAGES = 16_000  # 64 MB of WAL between checkpoints
RETENTION_BATCH = 2000  # rows per SQLite delete step: well under a second between two batches
LOOKAHEAD_DAYS = 7  # PostgreSQL: a day this far ahead still gets its own partition
LOCK_TIMEOUT = "1s"  # PostgreSQL: a partition drop waits no longer than this for a reader


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
    annuls: str | None = None  # with decision "annulled": the event_id it annuls


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


class Store(Protocol):
    kind: str
    rules: StayRules
    rules_changed: bool

    def insert_batch(self, events: Sequence[StoredEvent]) -> int: ...
    def insert_rejected(self, events: Sequence[RejectedEvent]) -> int: ...
    def rejected(self) -> list[RejectedEvent]: ...
    def islands(self) -> dict[tuple[str, str], list[tuple[int, int]]]: ...
    def seqs_between(self, site: str, device: str, lo: int, hi: int) -> list[int]: ...
    def islands_between(self, site: str, device: str, lo: int, hi: int) -> list[tuple[int, int]]: ...
    def count(self) -> int: ...
    def stays_of(self, subjects: Sequence[str], start: datetime, end: datetime) -> list[Stay]: ...
    def stays_near(self, site: str, lo: datetime, hi: datetime) -> list[Stay]: ...
    def all_stays(self) -> list[Stay]: ...
    def inside(self, now: datetime) -> dict[str, int]: ...
    def rebuild_stays(self) -> int: ...
    def expire_step(self, cutoff: datetime) -> int: ...
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
    "annuls",
)
_STAY_COLUMNS = ("site", "subject", "day", "start_ts", "end_ts", "kind", "entry_id", "exit_id")
_STAY = ", ".join(_STAY_COLUMNS)
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

# Stays are never longer than rules.longest, so "started before hi and ends after lo" becomes a
# range scan of (…, start_ts) from lo - longest.
_STAYS_OF = f"SELECT {_STAY} FROM stays WHERE subject = ? AND start_ts >= ? AND start_ts <= ? AND end_ts >= ?"
_ALL_EVENTS = (
    "SELECT subject, site, event_id, direction, decision, ts, annuls FROM checkins "
    "WHERE subject IS NOT NULL ORDER BY subject, site"
)
_STAYS_NEAR = f"SELECT {_STAY} FROM stays WHERE site = ? AND start_ts >= ? AND start_ts <= ? AND end_ts >= ?"


def open_store(url: str, rules: StayRules | None = None, *, retention_days: int | None = None) -> Store:
    """``sqlite:PATH`` or ``postgresql://…`` (also ``postgres://``); default rules from the
    config's defaults."""
    defaults = CollectorConfig()
    rules = rules or StayRules.from_config(defaults)
    days = retention_days if retention_days is not None else defaults.retention_days
    if url.startswith("sqlite:"):
        path = url.removeprefix("sqlite:")
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise StoreError("sqlite: needs a path, e.g. sqlite:/var/lib/gate-scanner/collector.db")
        return SqliteStore(Path(path), rules)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url, rules, retention_days=days)
    raise StoreError(f"unknown store {url.split(':', 1)[0]!r}: use sqlite:PATH or postgresql://…")


def _redact(url: str) -> str:
    """The URL without a password, for messages."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    userinfo, host = rest.rsplit("@", 1)
    return f"{scheme}://{userinfo.split(':', 1)[0]}@{host}"


class _Base:
    """What both backends share: the stay upkeep and the queries that read stays.

    A backend provides ``_query``/``_exec`` inside or outside its open transaction, ``_t`` (a
    datetime as the backend's time parameter) and ``_ph`` (its placeholder).
    """

    kind: str
    rules: StayRules
    rules_changed: bool
    _ph: str

    # --- backend primitives ------------------------------------------------------------------

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _exec(self, sql: str, params: Sequence[Any]) -> None:
        raise NotImplementedError

    def _execmany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        raise NotImplementedError

    def _t(self, moment: datetime) -> Any:
        raise NotImplementedError

    def _d(self, day: date) -> Any:
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql if self._ph == "?" else sql.replace("?", self._ph)

    # --- reading check-ins ---------------------------------------------------------------------

    def rejected(self) -> list[RejectedEvent]:
        return _rejected_events(self._query(_SELECT_REJECTED, ()))

    def islands(self) -> dict[tuple[str, str], list[tuple[int, int]]]:
        return _with_floors(_group_islands(self._query(_ISLANDS, ())), self._query(_FLOORS, ()))

    def seqs_between(self, site: str, device: str, lo: int, hi: int) -> list[int]:
        sql = "SELECT seq FROM checkins WHERE site = ? AND device = ? AND seq BETWEEN ? AND ? ORDER BY seq"
        rows = self._query(self._sql(sql), (site, device, lo, hi))
        return [int(r[0]) for r in rows]

    def islands_between(self, site: str, device: str, lo: int, hi: int) -> list[tuple[int, int]]:
        """Runs of consecutive handled (stored, dead-lettered or expired) seqs of a device in [lo, hi]."""
        rows = self._query(self._sql(_ISLANDS_BETWEEN), (site, device, lo, hi) * 2)
        floor_sql = "SELECT upto FROM seq_floor WHERE site = ? AND device = ?"
        floor = self._query(self._sql(floor_sql), (site, device))
        return _floor_run(floor, lo, hi) + [(int(a), int(b)) for a, b in rows]

    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM checkins", ())[0][0])

    # --- stays: upkeep -------------------------------------------------------------------------

    def _after_insert(self, events: Sequence[StoredEvent]) -> None:
        """Inside the batch's transaction: note new exit gates, then derive the touched units."""
        units = units_of([(e.site, e.subject, e.ts, e.decision) for e in events], self.rules)
        firsts: dict[str, datetime] = {}
        for e in events:
            if e.direction == "out":
                at = parse_utc(e.ts)
                firsts[e.site] = min(at, firsts.get(e.site, at))
        if firsts:
            known = self._first_exits(sorted(firsts))
            for site, first in firsts.items():
                old = known.get(site)
                if old is not None and old <= first:
                    continue
                self._exec(
                    self._sql(
                        "INSERT INTO sites (site, first_exit) VALUES (?, ?) "
                        "ON CONFLICT (site) DO UPDATE SET first_exit = excluded.first_exit"
                    ),
                    (site, self._t(first)),
                )
                # The site has had an exit gate since ``first``: its days from then on are no
                # longer entry-only, for every subject there.
                until = old if old is not None else datetime.now(UTC) + timedelta(days=LOOKAHEAD_DAYS)
                units |= self._units_at(site, self.rules.bounds(self.rules.day_of(first))[0], until)
        self._derive(units)

    def _units_at(self, site: str, start: datetime, end: datetime) -> set[tuple[str, str, date]]:
        rows = self._query(
            self._sql(
                "SELECT DISTINCT subject, ts FROM checkins WHERE site = ? AND ts >= ? AND ts < ? "
                "AND subject IS NOT NULL"
            ),
            (site, self._t(start), self._t(end + self.rules.longest)),
        )
        return {(site, subject, self.rules.day_of(_aware(ts))) for subject, ts in rows}

    def _first_exits(self, sites: Sequence[str]) -> dict[str, datetime]:
        marks = ", ".join([self._ph] * len(sites))
        rows = self._query(f"SELECT site, first_exit FROM sites WHERE site IN ({marks})", tuple(sites))
        return {site: _aware(first) for site, first in rows if first is not None}

    def _derive(self, units: Iterable[tuple[str, str, date]]) -> int:
        """Derive the units again from their check-ins and replace their stays; returns stays."""
        by_day: dict[date, list[tuple[str, str]]] = {}
        for site, subject, day in units:
            by_day.setdefault(day, []).append((site, subject))
        written = 0
        for day, pairs in sorted(by_day.items()):
            start, end = self.rules.bounds(day)
            firsts = self._first_exits(sorted({site for site, _ in pairs}))
            events = self._unit_events(pairs, start, end + ANNUL_GRACE)
            stays: list[Stay] = []
            for site, subject in pairs:
                first = firsts.get(site)
                entry_only = first is None or first >= end
                stays += derive(
                    site, subject, day, events.get((site, subject), ()), self.rules, entry_only=entry_only
                )
            self._replace_stays(day, pairs, stays)
            written += len(stays)
        return written

    def _unit_events(
        self, pairs: Sequence[tuple[str, str]], start: datetime, end: datetime
    ) -> dict[tuple[str, str], list[UnitEvent]]:
        """The check-ins of the units (site, subject) in [start, end): one query per
        UNIT_QUERY_MAX subjects, on the (subject, ts) index; other sites' rows are dropped."""
        wanted = set(pairs)
        subjects = sorted({subject for _, subject in pairs})
        out: dict[tuple[str, str], list[UnitEvent]] = {}
        for i in range(0, len(subjects), UNIT_QUERY_MAX):
            chunk = subjects[i : i + UNIT_QUERY_MAX]
            marks = ", ".join([self._ph] * len(chunk))
            rows = self._query(
                "SELECT site, subject, event_id, direction, decision, ts, annuls FROM checkins "
                f"WHERE subject IN ({marks}) AND ts >= {self._ph} AND ts < {self._ph}",
                (*chunk, self._t(start), self._t(end)),
            )
            for site, subject, event_id, direction, decision, ts, annuls in rows:
                if (site, subject) in wanted:
                    unit = out.setdefault((site, subject), [])
                    unit.append(UnitEvent(event_id, direction, decision, _text_ts(ts), annuls))
        return out

    def _replace_stays(self, day: date, pairs: Sequence[tuple[str, str]], stays: Sequence[Stay]) -> None:
        self._execmany(
            self._sql("DELETE FROM stays WHERE subject = ? AND site = ? AND day = ?"),
            [(subject, site, self._d(day)) for site, subject in pairs],
        )
        self._insert_stays(stays)

    def _insert_stays(self, stays: Sequence[Stay]) -> None:
        if stays:
            marks = ", ".join([self._ph] * len(_STAY_COLUMNS))
            self._execmany(
                f"INSERT INTO stays ({_STAY}) VALUES ({marks})", [self._stay_row(s) for s in stays]
            )

    def _stay_row(self, s: Stay) -> tuple[Any, ...]:
        return (
            s.site,
            s.subject,
            self._d(s.day),
            self._t(s.start),
            self._t(s.end),
            s.kind,
            s.entry_id,
            s.exit_id,
        )

    def _derive_all(self, rows: Iterable[tuple[Any, ...]]) -> int:
        """Every stay from every check-in, streamed in (subject, site) order."""
        firsts = {site: _aware(f) for site, f in self._query("SELECT site, first_exit FROM sites", ()) if f}
        written = 0
        pending: list[Stay] = []
        for (subject, site), group in itertools.groupby(rows, key=lambda r: (r[0], r[1])):
            events = [UnitEvent(i, d, dec, _text_ts(ts), a) for _, _, i, d, dec, ts, a in group]
            first = firsts.get(site)
            for day in sorted({self.rules.day_of(parse_utc(e.ts)) for e in events}):
                entry_only = first is None or first >= self.rules.bounds(day)[1]
                pending += derive(site, subject, day, events, self.rules, entry_only=entry_only)
            if len(pending) >= RETENTION_BATCH:
                self._insert_stays(pending)
                written += len(pending)
                pending = []
        self._insert_stays(pending)
        return written + len(pending)

    def _record_rules(self) -> None:
        self._exec(
            self._sql(
                "INSERT INTO meta (key, value) VALUES ('stay_rules', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            ),
            (self.rules.key(),),
        )
        self.rules_changed = False

    def _rules_differ(self) -> bool:
        rows = self._query("SELECT value FROM meta WHERE key = 'stay_rules'", ())
        return not rows or rows[0][0] != self.rules.key()

    # --- stays: reading ------------------------------------------------------------------------

    def stays_of(self, subjects: Sequence[str], start: datetime, end: datetime) -> list[Stay]:
        """The subjects' stays that overlap [start, end] (touching counts), by start."""
        found: list[Stay] = []
        floor = self._t(start - self.rules.longest)
        for subject in dict.fromkeys(subjects):
            rows = self._query(self._sql(_STAYS_OF), (subject, floor, self._t(end), self._t(start)))
            found += [_stay(r) for r in rows]
        return sorted(found, key=lambda s: (s.start, s.site, s.subject))

    def stays_near(self, site: str, lo: datetime, hi: datetime) -> list[Stay]:
        """Every stay at ``site`` that overlaps [lo, hi] (touching counts)."""
        rows = self._query(
            self._sql(_STAYS_NEAR), (site, self._t(lo - self.rules.longest), self._t(hi), self._t(lo))
        )
        return [_stay(r) for r in rows]

    def all_stays(self) -> list[Stay]:
        rows = self._query(f"SELECT {_STAY} FROM stays", ())
        return sorted((_stay(r) for r in rows), key=_stay_order)

    def inside(self, now: datetime) -> dict[str, int]:
        """Per site, the stays that cover ``now``: who is inside by the check-ins."""
        days = sorted({self.rules.day_of(now - self.rules.longest), self.rules.day_of(now)})
        marks = ", ".join([self._ph] * len(days))
        rows = self._query(
            f"SELECT site, COUNT(*) FROM stays WHERE day IN ({marks}) AND start_ts <= {self._ph} "
            f"AND end_ts > {self._ph} GROUP BY site",
            (*[self._d(d) for d in days], self._t(now), self._t(now)),
        )
        return {site: int(n) for site, n in rows}


class SqliteStore(_Base):
    kind = "sqlite"
    _ph = "?"

    def __init__(self, path: Path, rules: StayRules) -> None:
        self.path = path
        self.rules = rules
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
            # The default 2 MB page cache thrashes once the indexes outgrow it (a month of a
            # busy site): every insert then reads its index pages back from disk.
            self._conn.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
            # A batch dirties pages all over the (subject, …) indexes: at the default 1,000
            # pages the WAL is checkpointed on nearly every commit, writing each page twice.
            self._conn.execute(f"PRAGMA wal_autocheckpoint = {SQLITE_CHECKPOINT_PAGES}")
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
                CREATE TABLE IF NOT EXISTS stays (
                    site TEXT NOT NULL,
                    subject TEXT NOT NULL,
                    day TEXT NOT NULL,
                    start_ts TEXT NOT NULL,
                    end_ts TEXT NOT NULL,
                    kind TEXT NOT NULL,
                    entry_id TEXT,
                    exit_id TEXT
                );
                CREATE INDEX IF NOT EXISTS stays_subject_start ON stays (subject, start_ts);
                CREATE INDEX IF NOT EXISTS stays_site_start ON stays (site, start_ts);
                CREATE INDEX IF NOT EXISTS stays_day ON stays (day, site);
                CREATE TABLE IF NOT EXISTS sites (site TEXT PRIMARY KEY, first_exit TEXT);
                CREATE TABLE IF NOT EXISTS seq_floor (
                    site TEXT NOT NULL, device TEXT NOT NULL, upto INTEGER NOT NULL,
                    PRIMARY KEY (site, device)
                );
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                """
            )
            columns = {row[1] for row in self._conn.execute("PRAGMA table_info(checkins)")}
            if "annuls" not in columns:  # a store made before annulments existed
                self._conn.execute("ALTER TABLE checkins ADD COLUMN annuls TEXT")
            self.rules_changed = self._rules_differ()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open sqlite:{path}: {exc}") from exc

    # --- primitives ------------------------------------------------------------------------------

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        try:
            return self._conn.execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite:{self.path}: query failed: {exc}") from exc

    def _exec(self, sql: str, params: Sequence[Any]) -> None:
        self._conn.execute(sql, tuple(params))

    def _execmany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    def _t(self, moment: datetime) -> str:
        return utc_ms(moment)

    def _d(self, day: date) -> str:
        return day.isoformat()

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[None]:
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield
            conn.execute("COMMIT")
        except BaseException as exc:
            # Whatever stopped us (a value sqlite3 cannot bind raises UnicodeEncodeError, not
            # sqlite3.Error), an open transaction would swallow the next batch's COMMIT.
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if not isinstance(exc, Exception) or isinstance(exc, StoreError):
                raise
            # Locked, busy, I/O, disk full heal by waiting; a value sqlite refuses does not.
            refused = sqlite3.IntegrityError | sqlite3.DataError | sqlite3.InterfaceError
            transient = isinstance(exc, sqlite3.Error) and not isinstance(exc, refused)
            raise StoreError(f"sqlite:{self.path}: {what} failed: {exc}", transient=transient) from exc

    # --- writing ---------------------------------------------------------------------------------

    def insert_batch(self, events: Sequence[StoredEvent]) -> int:
        """Store the events and their stays in one transaction (one fsync); return how many were new."""
        if not events:
            return 0
        sql = f"INSERT INTO checkins ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
        sql += "ON CONFLICT (event_id) DO NOTHING"
        with self._transaction("insert"):
            before = self._conn.total_changes
            self._conn.executemany(sql, [_row(e) for e in events])
            inserted = self._conn.total_changes - before
            self._after_insert(events)
        return inserted

    def insert_rejected(self, events: Sequence[RejectedEvent]) -> int:
        """Dead-letter the events in one transaction; a known (site, device, seq) only once."""
        if not events:
            return 0
        with self._transaction("insert"):
            before = self._conn.total_changes
            self._conn.executemany(_insert_rejected_sql("?"), [_rejected_row(e) for e in events])
            return self._conn.total_changes - before

    def rebuild_stays(self) -> int:
        """Derive every stay again from the check-ins (in one transaction); returns how many."""
        with self._transaction("rebuild"):
            self._conn.execute("DELETE FROM stays")
            self._conn.execute("DELETE FROM sites")
            self._conn.execute(
                "INSERT INTO sites (site, first_exit) "
                "SELECT site, MIN(ts) FROM checkins WHERE direction = 'out' GROUP BY site"
            )
            written = self._derive_all(self._conn.execute(_ALL_EVENTS))
            self._record_rules()
        return written

    def expire_step(self, cutoff: datetime) -> int:
        """Delete at most RETENTION_BATCH rows older than ``cutoff``; 0 when nothing is left."""
        limit = RETENTION_BATCH
        at = utc_ms(cutoff)
        with self._transaction("retention"):
            for (site,) in self._conn.execute("SELECT DISTINCT site FROM checkins").fetchall():
                rows = self._conn.execute(
                    "SELECT event_id, device, seq FROM checkins WHERE site = ? AND ts < ? LIMIT ?",
                    (site, at, limit),
                ).fetchall()
                if rows:
                    self._raise_floor([(site, device, seq) for _, device, seq in rows])
                    self._conn.executemany("DELETE FROM checkins WHERE event_id = ?", [(r[0],) for r in rows])
                    return len(rows)
            day = self.rules.day_of(cutoff).isoformat()
            gone = self._conn.execute(
                "DELETE FROM stays WHERE rowid IN (SELECT rowid FROM stays WHERE day < ? LIMIT ?)",
                (day, limit),
            ).rowcount
            if gone:
                return gone
            rows = self._conn.execute(
                "SELECT id, site, device, seq FROM rejected WHERE received < ? ORDER BY id LIMIT ?",
                (at, limit),
            ).fetchall()
            self._raise_floor([(s, d, q) for _, s, d, q in rows if q is not None])
            self._conn.executemany("DELETE FROM rejected WHERE id = ?", [(r[0],) for r in rows])
            return len(rows)

    def _raise_floor(self, seqs: Iterable[tuple[str, str, int]]) -> None:
        self._conn.executemany(
            "INSERT INTO seq_floor (site, device, upto) VALUES (?, ?, ?) "
            "ON CONFLICT (site, device) DO UPDATE SET upto = MAX(upto, excluded.upto)",
            [(site, device, upto) for (site, device), upto in _floors(seqs).items()],
        )

    def close(self) -> None:
        self._conn.close()


class PostgresStore(_Base):
    kind = "postgresql"
    _ph = "%s"

    def __init__(self, url: str, rules: StayRules, *, retention_days: int) -> None:
        try:
            import psycopg  # the optional `postgres` extra: a gate never has it
        except ImportError as exc:
            raise StoreError(
                "PostgreSQL store needs psycopg 3: pip install 'gate-scanner[postgres]'"
            ) from exc
        self._psycopg = psycopg
        self._url = url
        self._where = _redact(url)
        self.rules = rules
        self.retention_days = retention_days
        self._partitions: set[str] = set()
        try:
            self._conn = psycopg.connect(url, autocommit=False, connect_timeout=10)
            with self._conn.transaction():
                # Two collectors starting at once would race on CREATE TABLE IF NOT EXISTS.
                self._conn.execute("SELECT pg_advisory_xact_lock(74201)")
                self._create_schema()
            self.rules_changed = self._rules_differ()
        except psycopg.Error as exc:
            raise StoreError(f"cannot open {self._where}: {exc}") from exc

    def _create_schema(self) -> None:
        conn = self._conn
        kind = conn.execute(
            "SELECT relkind FROM pg_class WHERE relname = 'checkins' AND relkind IN ('r', 'p')"
        )
        legacy = (kind.fetchone() or ("",))[0] == "r"
        if legacy:
            # A store made before retention: one plain table each. Moved once into the
            # partitioned layout, then dropped.
            log.warning("store %s: moving check-ins into day partitions (once)", self._where)
            conn.execute("ALTER TABLE checkins RENAME TO checkins_unpartitioned")
            conn.execute("ALTER TABLE rejected RENAME TO rejected_unpartitioned")
            for index in (
                "checkins_device_seq",
                "checkins_subject_ts",
                "checkins_site_ts",
                "rejected_device_seq",
            ):
                conn.execute(f"DROP INDEX IF EXISTS {index}")
        # Partitioned tables need the partition key in every unique index: (event_id, ts). A
        # resend carries the same ts (the gate resends the committed bytes), so this is still
        # one row per event_id.
        conn.execute(
            """
            CREATE TABLE IF NOT EXISTS checkins (
                event_id TEXT NOT NULL,
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
                received TIMESTAMPTZ NOT NULL DEFAULT now(),
                annuls TEXT,
                PRIMARY KEY (event_id, ts)
            ) PARTITION BY RANGE (ts)
            """
        )
        for name, cols in (
            ("checkins_device_seq", "site, device, seq"),
            ("checkins_subject_ts", "subject, ts"),
            ("checkins_site_ts", "site, ts"),
        ):
            conn.execute(f"CREATE INDEX IF NOT EXISTS {name} ON checkins ({cols})")
        conn.execute(
            """
            CREATE TABLE IF NOT EXISTS rejected (
                id BIGSERIAL,
                received TIMESTAMPTZ NOT NULL DEFAULT now(),
                site TEXT,
                device TEXT,
                seq BIGINT,
                reason TEXT NOT NULL,
                payload BYTEA NOT NULL,
                CHECK (seq IS NULL OR (site IS NOT NULL AND device IS NOT NULL))
            ) PARTITION BY RANGE (received)
            """
        )
        conn.execute("CREATE INDEX IF NOT EXISTS rejected_device_seq ON rejected (site, device, seq)")
        conn.execute(
            """
            CREATE TABLE IF NOT EXISTS stays (
                site TEXT NOT NULL,
                subject TEXT NOT NULL,
                day DATE NOT NULL,
                start_ts TIMESTAMPTZ NOT NULL,
                end_ts TIMESTAMPTZ NOT NULL,
                kind TEXT NOT NULL,
                entry_id TEXT,
                exit_id TEXT
            ) PARTITION BY RANGE (day)
            """
        )
        conn.execute("CREATE INDEX IF NOT EXISTS stays_subject_start ON stays (subject, start_ts)")
        conn.execute("CREATE INDEX IF NOT EXISTS stays_site_start ON stays (site, start_ts)")
        for table in _PARTITIONED:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {table}_default PARTITION OF {table} DEFAULT")
        conn.execute("CREATE TABLE IF NOT EXISTS sites (site TEXT PRIMARY KEY, first_exit TIMESTAMPTZ)")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS seq_floor (site TEXT NOT NULL, device TEXT NOT NULL, "
            "upto BIGINT NOT NULL, PRIMARY KEY (site, device))"
        )
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        if legacy:
            today = datetime.now(UTC).date()
            for table in ("checkins", "rejected"):
                column = "ts" if table == "checkins" else "received"
                days = conn.execute(
                    f"SELECT DISTINCT ({column} AT TIME ZONE 'UTC')::date FROM {table}_unpartitioned"
                ).fetchall()
                for (day,) in days:
                    if self._keeps_partition(day, today):
                        self._create_partition(table, day)
                conn.execute(f"INSERT INTO {table} SELECT * FROM {table}_unpartitioned")
                conn.execute(f"DROP TABLE {table}_unpartitioned")
            # Dead letters list in id order: new ones after the moved ones.
            conn.execute(
                "SELECT setval(pg_get_serial_sequence('rejected', 'id'), COALESCE(MAX(id), 0) + 1, false) "
                "FROM rejected"
            )

    # --- primitives ------------------------------------------------------------------------------

    def _connection(self) -> Any:
        # A restarted server or a cut link closes a psycopg connection for good: without a
        # new one, every retry of the collector's would fail the same way.
        if self._conn.closed:
            self._conn = self._psycopg.connect(self._url, autocommit=False, connect_timeout=10)
        return self._conn

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        conn = self._connection()
        if conn.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE:
            return conn.execute(sql, params).fetchall()  # inside a write: its errors go there
        try:
            with conn.transaction():
                return conn.execute(sql, params).fetchall()
        except self._psycopg.Error as exc:
            raise StoreError(f"{self._where}: query failed: {exc}") from exc

    def _exec(self, sql: str, params: Sequence[Any]) -> None:
        self._conn.execute(sql, params)

    def _execmany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(sql, rows)

    def _t(self, moment: datetime) -> datetime:
        return moment

    def _d(self, day: date) -> date:
        return day

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[Any]:
        psycopg = self._psycopg
        try:
            conn = self._connection()
            # The transaction block rolls back on any exception, BaseException included.
            with conn.transaction():
                yield conn
        except StoreError:
            raise
        except Exception as exc:
            # A value the server refuses (class 22/23) or psycopg cannot send (a NUL, a lone
            # surrogate) stays refused; a lost or busy server does not.
            transient = isinstance(exc, psycopg.Error) and not isinstance(
                exc, psycopg.DataError | psycopg.IntegrityError
            )
            raise StoreError(f"{self._where}: {what} failed: {exc}", transient=transient) from exc

    # --- partitions ------------------------------------------------------------------------------

    def _keeps_partition(self, day: date, today: date) -> bool:
        """Days inside the retention window (and a week ahead) get their own partition; the
        rest (a gate clock years off) share the default one."""
        return (
            today - timedelta(days=self.retention_days + 1) <= day <= today + timedelta(days=LOOKAHEAD_DAYS)
        )

    def _ensure_partitions(self, table: str, days: Iterable[date]) -> None:
        today = datetime.now(UTC).date()
        wanted = [d for d in sorted(set(days)) if self._keeps_partition(d, today)]
        missing = [d for d in wanted if _partition(table, d) not in self._partitions]
        if not missing:
            return
        with self._transaction("partition"):
            # One collector at a time, so two never create the same day.
            self._conn.execute("SELECT pg_advisory_xact_lock(74202)")
            for day in missing:
                self._create_partition(table, day)
        self._partitions.update(_partition(table, d) for d in missing)

    def _create_partition(self, table: str, day: date) -> None:
        conn = self._conn
        name = _partition(table, day)
        if conn.execute("SELECT 1 FROM pg_class WHERE relname = %s", (name,)).fetchone():
            return
        column = _PARTITIONED[table]
        lo, hi = _bound(table, day), _bound(table, day + timedelta(days=1))
        clash = conn.execute(
            f"SELECT 1 FROM {table}_default WHERE {column} >= %s AND {column} < %s LIMIT 1", (lo, hi)
        ).fetchone()
        if clash is None:
            conn.execute(f"CREATE TABLE {name} PARTITION OF {table} FOR VALUES FROM ('{lo}') TO ('{hi}')")
            return
        # The default partition already holds rows of that day (its day was far ahead then):
        # move them, or the new partition would be refused.
        conn.execute(f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
        conn.execute(
            f"WITH moved AS (DELETE FROM {table}_default WHERE {column} >= %s AND {column} < %s RETURNING *) "
            f"INSERT INTO {name} SELECT * FROM moved",
            (lo, hi),
        )
        conn.execute(f"ALTER TABLE {table} ATTACH PARTITION {name} FOR VALUES FROM ('{lo}') TO ('{hi}')")

    def partitions(self, table: str) -> list[date]:
        """The days that have their own partition of ``table`` (tests, the bench)."""
        rows = self._query(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = %s::regclass",
            (table,),
        )
        prefix = f"{table}_p"
        return sorted(
            datetime.strptime(n[len(prefix) :], "%Y%m%d").date() for (n,) in rows if n.startswith(prefix)
        )

    # --- stays, set-based: one statement per site day, not one per unit ----------------------

    def _unit_events(
        self, pairs: Sequence[tuple[str, str]], start: datetime, end: datetime
    ) -> dict[tuple[str, str], list[UnitEvent]]:
        rows = self._conn.execute(
            "SELECT u.site, u.subject, c.event_id, c.direction, c.decision, c.ts, c.annuls "
            "FROM unnest(%b::text[], %b::text[]) AS u(site, subject) JOIN checkins c "
            "ON c.subject = u.subject AND c.site = u.site AND c.ts >= %s AND c.ts < %s",
            ([p[0] for p in pairs], [p[1] for p in pairs], start, end),
        ).fetchall()
        out: dict[tuple[str, str], list[UnitEvent]] = {}
        for site, subject, i, d, dec, ts, a in rows:
            out.setdefault((site, subject), []).append(UnitEvent(i, d, dec, utc_ms(ts), a))
        return out

    def _replace_stays(self, day: date, pairs: Sequence[tuple[str, str]], stays: Sequence[Stay]) -> None:
        # The constant day lets the planner touch one partition only.
        self._conn.execute(
            "DELETE FROM stays s USING unnest(%b::text[], %b::text[]) AS u(site, subject) "
            "WHERE s.day = %s AND s.subject = u.subject AND s.site = u.site",
            ([p[0] for p in pairs], [p[1] for p in pairs], day),
        )
        self._insert_stays(stays)

    def _insert_stays(self, stays: Sequence[Stay]) -> None:
        if not stays:
            return
        columns = [list(c) for c in zip(*(self._stay_row(s) for s in stays), strict=True)]
        types = ("text", "text", "date", "timestamptz", "timestamptz", "text", "text", "text")
        arrays = ", ".join(f"%b::{t}[]" for t in types)
        self._conn.execute(f"INSERT INTO stays ({_STAY}) SELECT * FROM unnest({arrays})", columns)

    # --- writing ---------------------------------------------------------------------------------

    def insert_batch(self, events: Sequence[StoredEvent]) -> int:
        """One INSERT … SELECT FROM unnest(arrays), the stays, one commit per batch."""
        if not events:
            return 0
        days = {parse_utc(e.ts).date() for e in events}
        self._ensure_partitions("checkins", days)
        self._ensure_partitions("stays", {d for _, _, d in units_of(_unit_rows(events), self.rules)})
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
            "text",
        )
        arrays = ", ".join(f"%b::{t}[]" for t in types)
        sql = (
            f"INSERT INTO checkins ({', '.join(_COLUMNS)}) SELECT * FROM unnest({arrays}) "
            "ON CONFLICT (event_id, ts) DO NOTHING"
        )
        with self._transaction("insert") as conn:
            inserted = max(conn.execute(sql, [list(c) for c in cols]).rowcount, 0)
            # Two collectors deriving the same unit at once would each miss the other's event:
            # the stays part of a batch runs one collector at a time, after the other's commit.
            conn.execute("SELECT pg_advisory_xact_lock(74203)")
            self._after_insert(events)
        return inserted

    def insert_rejected(self, events: Sequence[RejectedEvent]) -> int:
        """Dead-letter the events in one transaction; a known (site, device, seq) only once."""
        if not events:
            return 0
        self._ensure_partitions(
            "rejected", [datetime.now(UTC).date(), (datetime.now(UTC) + timedelta(hours=1)).date()]
        )
        # No unique index across partitions without the partition key: look before inserting,
        # under the lock that also orders two collectors' dead letters.
        sql = (
            "INSERT INTO rejected (site, device, seq, reason, payload) SELECT %s, %s, %s::bigint, %s, %s "
            "WHERE %s::bigint IS NULL OR NOT EXISTS "
            "(SELECT 1 FROM rejected WHERE site = %s AND device = %s AND seq = %s::bigint)"
        )
        inserted = 0
        with self._transaction("insert") as conn:
            conn.execute("SELECT pg_advisory_xact_lock(74204)")
            with conn.cursor() as cur:
                for e in events:
                    cur.execute(sql, (*_rejected_row(e), e.seq, e.site, e.device, e.seq))
                    inserted += max(cur.rowcount, 0)
        return inserted

    def rebuild_stays(self) -> int:
        """Derive every stay again from the check-ins (in one transaction); returns how many."""
        with self._transaction("rebuild") as conn:
            days = conn.execute("SELECT DISTINCT (ts AT TIME ZONE 'UTC')::date FROM checkins").fetchall()
        # A site day spans two UTC days; stays of days past the window share the default.
        self._ensure_partitions("stays", {d - timedelta(days=i) for (d,) in days for i in (0, 1)})
        with self._transaction("rebuild") as conn:
            conn.execute("SELECT pg_advisory_xact_lock(74203)")
            conn.execute("TRUNCATE stays")
            conn.execute("DELETE FROM sites")
            conn.execute(
                "INSERT INTO sites (site, first_exit) "
                "SELECT site, MIN(ts) FROM checkins WHERE direction = 'out' GROUP BY site"
            )
            with conn.cursor(name="rebuild") as cursor:  # server side: streamed, not all in memory
                cursor.itersize = 20_000
                cursor.execute(_ALL_EVENTS)
                written = self._derive_all(cursor)
            self._record_rules()
        return written

    def expire_step(self, cutoff: datetime) -> int:
        """Drop one day-partition wholly older than ``cutoff``, or delete a bounded batch of old
        rows from a default partition; 0 when nothing is left."""
        today = datetime.now(UTC).date()
        # The days ahead get their partitions here too, so ingest seldom has to.
        for table in _PARTITIONED:
            self._ensure_partitions(table, [today + timedelta(days=i) for i in range(LOOKAHEAD_DAYS)])
        limits = {
            "checkins": cutoff.astimezone(UTC).date(),
            "stays": self.rules.day_of(cutoff),
            "rejected": cutoff.astimezone(UTC).date(),
        }
        for table, first_kept in limits.items():
            for day in self.partitions(table):
                if day + timedelta(days=1) > first_kept:
                    break
                name = _partition(table, day)
                with self._transaction("retention") as conn:
                    # Dropping needs an exclusive lock on the parent: wait for readers no
                    # longer than this, and try again at the next step, rather than queueing
                    # every insert behind a long trace query.
                    conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                    if table != "stays":
                        self._floor_from(
                            conn,
                            f"SELECT site, device, MAX(seq) FROM {name} "
                            "WHERE seq IS NOT NULL GROUP BY site, device",
                        )
                    conn.execute(f"DROP TABLE {name}")
                self._partitions.discard(name)
                return 1
        for table, column, bound in (
            ("checkins", "ts", cutoff),
            ("stays", "day", self.rules.day_of(cutoff)),
            ("rejected", "received", cutoff),
        ):
            picked = f"SELECT ctid FROM {table}_default WHERE {column} < %s LIMIT {RETENTION_BATCH}"
            with self._transaction("retention") as conn:
                if table == "stays":
                    gone = conn.execute(
                        f"DELETE FROM {table}_default WHERE ctid IN ({picked})", (bound,)
                    ).rowcount
                else:
                    # The floor from exactly the rows deleted: one statement, so one pick.
                    gone = conn.execute(
                        f"WITH gone AS (DELETE FROM {table}_default WHERE ctid IN ({picked}) "
                        "RETURNING site, device, seq), "
                        "floor AS (INSERT INTO seq_floor (site, device, upto) "
                        "SELECT site, device, MAX(seq) FROM gone WHERE seq IS NOT NULL GROUP BY site, device "
                        "ON CONFLICT (site, device) "
                        "DO UPDATE SET upto = GREATEST(seq_floor.upto, excluded.upto)) "
                        "SELECT COUNT(*) FROM gone",
                        (bound,),
                    ).fetchone()[0]
            if gone:
                return int(gone)
        return 0

    def _floor_from(self, conn: Any, select: str) -> None:
        conn.execute(
            f"INSERT INTO seq_floor (site, device, upto) {select} "
            "ON CONFLICT (site, device) DO UPDATE SET upto = GREATEST(seq_floor.upto, excluded.upto)"
        )

    def close(self) -> None:
        self._conn.close()


# --- shared helpers ------------------------------------------------------------------------------

_PARTITIONED = {"checkins": "ts", "stays": "day", "rejected": "received"}
_FLOORS = "SELECT site, device, upto FROM seq_floor"


def _partition(table: str, day: date) -> str:
    return f"{table}_p{day:%Y%m%d}"


def _bound(table: str, day: date) -> str:
    # Check-ins and dead letters by UTC day; stays by the site day they belong to.
    return day.isoformat() if table == "stays" else f"{day.isoformat()} 00:00:00+00"


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
        e.annuls,
    )


def _unit_rows(events: Sequence[StoredEvent]) -> list[tuple[str, str | None, str, str]]:
    return [(e.site, e.subject, e.ts, e.decision) for e in events]


def _aware(value: Any) -> datetime:
    """A stored time (SQLite text, PostgreSQL datetime) as an aware UTC datetime."""
    return parse_utc(value) if isinstance(value, str) else value.astimezone(UTC)


def _text_ts(value: Any) -> str:
    return value if isinstance(value, str) else utc_ms(value)


def _stay(row: tuple[Any, ...]) -> Stay:
    site, subject, day, start, end, kind, entry_id, exit_id = row
    return Stay(
        site=site,
        subject=subject,
        day=date.fromisoformat(day) if isinstance(day, str) else day,
        start=_aware(start),
        end=_aware(end),
        kind=kind,
        entry_id=entry_id,
        exit_id=exit_id,
    )


def _stay_order(s: Stay) -> tuple[Any, ...]:
    return (s.site, s.subject, s.start, s.end, s.kind)


_SELECT_REJECTED = f"SELECT {', '.join(_REJECTED)} FROM rejected ORDER BY id"


def _insert_rejected_sql(placeholder: str) -> str:
    values = ", ".join([placeholder] * len(_REJECTED))
    return f"INSERT INTO rejected ({', '.join(_REJECTED)}) VALUES ({values}) ON CONFLICT DO NOTHING"


def _rejected_events(rows: Iterable[tuple[Any, ...]]) -> list[RejectedEvent]:
    return [RejectedEvent(site, device, seq, reason, bytes(blob)) for site, device, seq, reason, blob in rows]


def _rejected_row(e: RejectedEvent) -> tuple[Any, ...]:
    return (e.site, e.device, e.seq, e.reason, e.payload)


def _group_islands(rows: Iterable[tuple[Any, ...]]) -> dict[tuple[str, str], list[tuple[int, int]]]:
    out: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for site, device, lo, hi in rows:
        out.setdefault((site, device), []).append((int(lo), int(hi)))
    return out


def _floors(seqs: Iterable[tuple[str, str, int]]) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for site, device, seq in seqs:
        out[(site, device)] = max(seq, out.get((site, device), 0))
    return out


def _with_floors(
    islands: dict[tuple[str, str], list[tuple[int, int]]], floors: Iterable[tuple[Any, ...]]
) -> dict[tuple[str, str], list[tuple[int, int]]]:
    """Seqs at or below a device's expired floor count as handled: retention is no gap."""
    for site, device, upto in floors:
        islands[(site, device)] = [(1, int(upto)), *islands.get((site, device), [])]
    return islands


def _floor_run(floor: list[tuple[Any, ...]], lo: int, hi: int) -> list[tuple[int, int]]:
    if floor and int(floor[0][0]) >= lo:
        return [(lo, min(int(floor[0][0]), hi))]
    return []


def stay_checksum(stays: Iterable[Stay]) -> int:
    """An order-free fingerprint of a set of stays (the bench compares incremental with rebuilt)."""
    total = 0
    for s in stays:
        fields = (s.site, s.subject, s.day, utc_ms(s.start), utc_ms(s.end), s.kind, s.entry_id, s.exit_id)
        text = "|".join(map(str, fields))
        total = (total + zlib.crc32(text.encode())) & 0xFFFFFFFFFFFF
    return total
