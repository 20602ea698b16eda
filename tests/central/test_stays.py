"""Stays from check-ins, in both stores: pairs, annulments, missing exits, exits without
entries, late events, the day end, entry-only sites, and retention (with a partition boundary).

Every test ends by deriving every stay again from the check-ins (``rebuild_stays``) and
checking that the result is the one the incremental upkeep gave: stays are derived data.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import pytest

from scanner.central.stays import StayRules
from scanner.central.store import RejectedEvent, Store, open_store
from scanner.config import CollectorConfig
from tests import pg
from tests.helpers import Checkins

RULES = StayRules.from_config(CollectorConfig())  # 04:00, Asia/Ho_Chi_Minh (UTC+7), 12 h, 30 min
ZONE = RULES.zone
DAY = datetime(2026, 11, 20).date()
A, B, C = "a" * 32, "b" * 32, "c" * 32
MARKET, SHOP = "market", "shop"  # the market has exit gates from the start; the shop has none


def at(hhmm: str, day_offset: int = 0) -> datetime:
    """A local time at the sites (UTC+7) on DAY (+ offset), as an aware datetime."""
    hours, minutes = (int(x) for x in hhmm.split(":"))
    return datetime.combine(DAY + timedelta(days=day_offset), time(hours, minutes), ZONE)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = open_store(pg.store_url(request.param, tmp_path), RULES)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def gates() -> Checkins:
    return Checkins()


def stays(store: Store, subject: str | None = None, site: str | None = None) -> list[tuple[str, str, str]]:
    """(start HH:MM local, end HH:MM local, kind), checked against a full rebuild first."""
    incremental = store.all_stays()
    store.rebuild_stays()
    assert store.all_stays() == incremental, "rebuilding from the check-ins gave other stays"
    return [
        (f"{s.start.astimezone(ZONE):%H:%M}", f"{s.end.astimezone(ZONE):%H:%M}", s.kind)
        for s in incremental
        if (subject is None or s.subject == subject) and (site is None or s.site == site)
    ]


def opening(store: Store, gates: Checkins) -> None:
    """The market's exit gate has been in use since the day before."""
    store.insert_batch([gates.event(MARKET, "out", at("12:00", -1), C)])


def test_an_entry_and_the_next_exit_make_a_stay(store: Store, gates: Checkins):
    opening(store, gates)
    store.insert_batch(
        [
            gates.event(MARKET, "in", at("08:00"), A),
            gates.event(MARKET, "in", at("08:05"), B, decision="rejected", reason="denylisted"),
            gates.event(MARKET, "out", at("09:30"), A),
            gates.event(MARKET, "in", at("11:00"), A),
            gates.event(MARKET, "out", at("11:45"), A),
            gates.event(
                MARKET, "out", at("12:00"), None, reason="exit_request", credential_type="exit_button"
            ),
        ]
    )
    assert stays(store, A) == [("08:00", "09:30", "paired"), ("11:00", "11:45", "paired")]
    assert stays(store, B) == []  # turned away: never inside


def test_an_annulled_entry_is_no_stay_even_when_the_annulment_comes_late(store: Store, gates: Checkins):
    opening(store, gates)
    first = gates.event(MARKET, "in", at("08:00"), A)
    second = gates.event(MARKET, "in", at("08:01"), A)
    store.insert_batch([first, gates.annul(first, at("08:00") + timedelta(seconds=10)), second])
    store.insert_batch([gates.event(MARKET, "out", at("09:00"), A)])
    assert stays(store, A) == [("08:01", "09:00", "paired")]
    # The other one never passed either, and the gate says so in a later batch.
    store.insert_batch([gates.annul(second, at("08:01") + timedelta(seconds=10))])
    assert stays(store, A) == [("04:00", "09:00", "open_start")]


def test_an_annulment_just_after_the_day_end_annuls_the_entry_before_it(store: Store, gates: Checkins):
    opening(store, gates)
    late = gates.event(MARKET, "in", at("03:59", 1), A)  # still the site day of DAY
    store.insert_batch([late])
    assert stays(store, A) == [("03:59", "04:00", "inferred")]
    store.insert_batch([gates.annul(late, at("04:00", 1) + timedelta(seconds=5))])
    assert stays(store, A) == []


def test_an_entry_with_no_exit_closes_at_max_stay_or_the_day_end(store: Store, gates: Checkins):
    opening(store, gates)
    store.insert_batch([gates.event(MARKET, "in", at("08:00"), A), gates.event(MARKET, "in", at("20:00"), B)])
    assert stays(store, A) == [("08:00", "20:00", "inferred")]  # max_stay_h = 12
    assert stays(store, B) == [("20:00", "04:00", "inferred")]  # the day ends at 04:00
    assert store.inside(at("19:59")) == {MARKET: 1}
    assert store.inside(at("20:00")) == {MARKET: 1}  # A is out at 20:00 sharp, B in
    assert store.inside(at("04:00", 1)) == {}


def test_an_exit_with_no_entry_is_an_open_start_stay(store: Store, gates: Checkins):
    opening(store, gates)
    store.insert_batch(
        [
            gates.event(MARKET, "out", at("10:00"), A),
            gates.event(MARKET, "in", at("11:00"), B),
            gates.event(MARKET, "out", at("12:00"), B),
            gates.event(MARKET, "out", at("13:00"), B),
            gates.event(MARKET, "out", at("18:00", 1), C),
        ]
    )
    assert stays(store, A) == [("04:00", "10:00", "open_start")]  # from the day start
    # Not inside twice: the open start begins where their previous stay ended.
    assert stays(store, B) == [("11:00", "12:00", "paired"), ("12:00", "13:00", "open_start")]
    # At most max_stay_h before the exit.
    assert stays(store, C)[-1] == ("06:00", "18:00", "open_start")


def test_an_exit_after_max_stay_does_not_close_the_entry(store: Store, gates: Checkins):
    opening(store, gates)
    store.insert_batch(
        [gates.event(MARKET, "in", at("06:00"), A), gates.event(MARKET, "out", at("19:00"), A)]
    )
    assert stays(store, A) == [("06:00", "18:00", "inferred"), ("18:00", "19:00", "open_start")]


def test_a_subject_who_enters_again_without_an_exit_left_before(store: Store, gates: Checkins):
    opening(store, gates)
    store.insert_batch(
        [
            gates.event(MARKET, "in", at("08:00"), A),
            gates.event(MARKET, "in", at("10:00"), A),
            gates.event(MARKET, "out", at("11:00"), A),
        ]
    )
    assert stays(store, A) == [("08:00", "10:00", "inferred"), ("10:00", "11:00", "paired")]


def test_the_day_end_splits_a_night(store: Store, gates: Checkins):
    opening(store, gates)
    store.insert_batch(
        [gates.event(MARKET, "in", at("03:30", 1), A), gates.event(MARKET, "out", at("04:30", 1), A)]
    )
    assert stays(store, A) == [("03:30", "04:00", "inferred"), ("04:00", "04:30", "open_start")]
    days = sorted({s.day for s in store.all_stays() if s.subject == A})
    assert days == [DAY, DAY + timedelta(days=1)]


def test_late_events_correct_the_stays_they_touch(store: Store, gates: Checkins):
    opening(store, gates)
    store.insert_batch([gates.event(MARKET, "in", at("08:00"), A), gates.event(MARKET, "in", at("08:00"), B)])
    assert stays(store, A) == [("08:00", "20:00", "inferred")]
    # The exit gate was offline for hours; its events come now, the newest first.
    exit_ = gates.event(MARKET, "out", at("09:00"), A)
    store.insert_batch([exit_])
    store.insert_batch(
        [gates.event(MARKET, "out", at("07:30"), A), gates.event(MARKET, "in", at("07:00"), A)]
    )
    assert stays(store, A) == [("07:00", "07:30", "paired"), ("08:00", "09:00", "paired")]
    assert stays(store, B) == [("08:00", "20:00", "inferred")]  # untouched
    # A resend (the same event) changes nothing.
    assert store.insert_batch([exit_]) == 0
    assert stays(store, A) == [("07:00", "07:30", "paired"), ("08:00", "09:00", "paired")]


def test_a_site_without_exit_gates_keeps_default_stays_until_its_first_exit(store: Store, gates: Checkins):
    store.insert_batch([gates.event(SHOP, "in", at("08:00"), A), gates.event(SHOP, "in", at("08:00", 1), A)])
    assert stays(store, A) == [("08:00", "08:30", "entry_only"), ("08:00", "08:30", "entry_only")]
    # An exit gate appears on the second day: from then on, entries wait for exits.
    store.insert_batch([gates.event(SHOP, "out", at("09:00", 1), B)])
    assert stays(store, A) == [("08:00", "08:30", "entry_only"), ("08:00", "20:00", "inferred")]
    # A late event shows it was there on the first day already.
    store.insert_batch([gates.event(SHOP, "out", at("12:00"), A)])
    assert stays(store, A) == [("08:00", "12:00", "paired"), ("08:00", "20:00", "inferred")]


def test_changed_rules_are_noticed_and_a_rebuild_applies_them(tmp_path: Path, gates: Checkins):
    url = f"sqlite:{tmp_path / 'c.db'}"
    store = open_store(url, RULES)
    store.insert_batch(
        [gates.event(MARKET, "out", at("07:00"), C), gates.event(MARKET, "in", at("08:00"), A)]
    )
    store.rebuild_stays()
    store.close()
    short = StayRules.from_config(CollectorConfig(max_stay_h=2.0, day_start="05:00", timezone="+07:00"))
    store = open_store(url, short)
    try:
        assert store.rules_changed
        store.rebuild_stays()
        assert not store.rules_changed
        assert [(s.subject, s.seconds) for s in store.all_stays() if s.subject == A] == [(A, 7200.0)]
    finally:
        store.close()
    assert not open_store(url, short).rules_changed


# --- retention -----------------------------------------------------------------------------------


def drain(store: Store, cutoff: datetime) -> list[int]:
    steps = []
    while removed := store.expire_step(cutoff):
        steps.append(removed)
        assert len(steps) < 1000
    return steps


def test_retention_deletes_whole_days_up_to_the_cutoff_and_leaves_no_gap(store: Store, gates: Checkins):
    """Cut at a UTC midnight: the last millisecond before it goes (with its day partition on
    PostgreSQL), the first one at it stays; so do the stays of site days after it. What the
    store forgot is no gap in the gate's seqs."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    cutoff = today - timedelta(days=27)
    old = [gates.event(MARKET, "in", cutoff - timedelta(days=d), A, device="g") for d in (12, 5, 1)]
    edge = gates.event(MARKET, "in", cutoff - timedelta(milliseconds=1), B, device="g")
    kept = gates.event(MARKET, "in", cutoff, C, device="g")
    recent = gates.event(MARKET, "in", today - timedelta(hours=3), A, device="g")
    store.insert_batch([*old, edge, kept, recent])
    store.insert_rejected([RejectedEvent(MARKET, "g", 7, "x", b"{")])
    before = {s.subject for s in store.all_stays()}
    assert before == {A, B, C}
    if store.kind == "postgresql":
        days = store.partitions("checkins")  # type: ignore[attr-defined]
        assert (cutoff - timedelta(days=1)).date() in days and cutoff.date() in days
    steps = drain(store, cutoff)
    assert steps, "nothing was deleted"
    assert store.seqs_between(MARKET, "g", 1, 100) == [5, 6]  # kept and recent
    # Stays go by the site day they belong to: A's old ones are gone, its recent one is kept,
    # and so is the edge's, whose site day (06:59 local) is the cutoff's.
    left = [(s.subject, s.day) for s in store.all_stays()]
    assert sorted(left) == sorted(
        [(A, RULES.day_of(today - timedelta(hours=3))), (B, RULES.day_of(cutoff)), (C, RULES.day_of(cutoff))]
    )
    # Seqs 1-4 are gone by retention, 7 is dead-lettered (and recent): none of it is a gap.
    assert store.islands() == {(MARKET, "g"): [(1, 4), (5, 7)]}
    assert store.islands_between(MARKET, "g", 1, 10)[0] == (1, 4)
    if store.kind == "postgresql":
        days = store.partitions("checkins")  # type: ignore[attr-defined]
        assert (cutoff - timedelta(days=1)).date() not in days and cutoff.date() in days
    assert drain(store, cutoff) == []  # a second run finds nothing


def test_retention_steps_are_bounded(store: Store, gates: Checkins, monkeypatch: pytest.MonkeyPatch):
    from scanner.central import store as store_module

    monkeypatch.setattr(store_module, "RETENTION_BATCH", 7)
    now = datetime.now(UTC)
    # Years old (a gate whose clock was far off): on PostgreSQL these share the default partition.
    ancient = [
        gates.event(MARKET, "in", now - timedelta(days=800, minutes=i), A, device="h") for i in range(20)
    ]
    store.insert_batch(ancient)
    store.insert_batch([gates.event(MARKET, "in", now - timedelta(hours=1), B, device="h")])
    steps = drain(store, now - timedelta(days=28))
    assert max(steps) <= 7 and sum(steps) >= 20
    assert store.count() == 1 and {s.subject for s in store.all_stays()} == {B}
    assert store.islands() == {(MARKET, "h"): [(1, 20), (21, 21)]}


# --- stores made by the version before stays ------------------------------------------------

_OLD_PG = [
    """CREATE TABLE checkins (event_id TEXT PRIMARY KEY, device TEXT NOT NULL, site TEXT NOT NULL,
    direction TEXT NOT NULL, seq BIGINT NOT NULL, ts TIMESTAMPTZ NOT NULL, subject TEXT,
    decision TEXT NOT NULL, reason TEXT NOT NULL, credential_type TEXT NOT NULL, raw JSONB NOT NULL,
    received TIMESTAMPTZ NOT NULL DEFAULT now())""",
    "CREATE INDEX checkins_device_seq ON checkins (site, device, seq)",
    "CREATE INDEX checkins_subject_ts ON checkins (subject, ts)",
    "CREATE INDEX checkins_site_ts ON checkins (site, ts)",
    """CREATE TABLE rejected (id BIGSERIAL PRIMARY KEY, received TIMESTAMPTZ NOT NULL DEFAULT now(),
    site TEXT, device TEXT, seq BIGINT, reason TEXT NOT NULL, payload BYTEA NOT NULL)""",
    "CREATE UNIQUE INDEX rejected_device_seq ON rejected (site, device, seq) WHERE seq IS NOT NULL",
]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_store_from_before_stays_keeps_its_check_ins_and_gets_stays(kind: str, tmp_path: Path):
    import sqlite3

    gates = Checkins()
    recent = datetime.combine(datetime.now(ZONE).date() - timedelta(days=2), time(12), ZONE)
    old = [gates.event(MARKET, "out", recent, A), gates.event(MARKET, "in", recent - timedelta(hours=1), A)]
    columns = "event_id, device, site, direction, seq, ts, subject, decision, reason, credential_type, raw"
    rows = [
        (
            e.event_id,
            e.device,
            e.site,
            e.direction,
            e.seq,
            e.ts,
            e.subject,
            e.decision,
            e.reason,
            "plain",
            e.raw,
        )
        for e in old
    ]
    url = pg.store_url(kind, tmp_path)
    if kind == "postgresql":
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            for statement in _OLD_PG:
                conn.execute(statement)
            for row in rows:
                conn.execute(f"INSERT INTO checkins ({columns}) VALUES ({', '.join(['%s'] * 11)})", row)
            conn.execute(
                "INSERT INTO rejected (site, device, seq, reason, payload) VALUES ('s', 'd', 9, 'x', '')"
            )
    else:
        conn = sqlite3.connect(tmp_path / "collector.db")
        conn.execute(
            "CREATE TABLE checkins (event_id TEXT PRIMARY KEY, device TEXT NOT NULL, site TEXT NOT NULL, "
            "direction TEXT NOT NULL, seq INTEGER NOT NULL, ts TEXT NOT NULL, subject TEXT, "
            "decision TEXT NOT NULL, reason TEXT NOT NULL, credential_type TEXT NOT NULL, raw TEXT NOT NULL, "
            "received TEXT NOT NULL "
            "DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))) WITHOUT ROWID"
        )
        conn.executemany(f"INSERT INTO checkins ({columns}) VALUES ({', '.join('?' * 11)})", rows)
        conn.commit()
        conn.close()
    store = open_store(url, RULES)
    try:
        assert store.count() == 2 and store.rules_changed
        store.rebuild_stays()
        assert [(s.subject, s.kind, s.seconds) for s in store.all_stays() if s.subject == A] == [
            (A, "inferred", 3600.0)
        ] or [(s.subject, s.kind) for s in store.all_stays() if s.subject == A] == [(A, "paired")]
        store.insert_batch([gates.event(MARKET, "in", recent, B)])
        assert store.count() == 3
        if kind == "postgresql":
            store.insert_rejected([RejectedEvent(MARKET, "g", 1, "y", b"")])
            assert [r.seq for r in store.rejected()] == [9, 1]  # the moved one first
    finally:
        store.close()
