"""Contact tracing by overlapping stays: edge cases, every output format, the plot, retention."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import pytest

from scanner import cli, events
from scanner.central.stays import StayRules
from scanner.central.store import open_store
from scanner.central.trace import (
    TraceError,
    parse_duration,
    parse_time,
    pseudonyms,
    read_key,
    retention_note,
    trace,
)
from scanner.config import CollectorConfig
from tests import pg
from tests.helpers import Checkins

KEY = b"k" * 32
P = events.Pseudonymizer(KEY)
CASE_ID = "079123456789"  # the subject the health authority asks about (a CCCD number)
CASE = P.subject("cccd", CASE_ID.encode())
TOUCH = P.subject("plain", b"EMP-1")  # enters as the case leaves
AFTER = P.subject("plain", b"EMP-2")  # comes 30 min after the case left: only with a margin
SHORT = P.subject("plain", b"EMP-3")  # overlaps the case's first stay by 5 min
BOTH = P.subject("signed", b"pass-4")  # inside across the case's leaving and coming back
ELSEWHERE = P.subject("plain", b"EMP-5")  # same hours, another site
OPEN = P.subject("plain", b"EMP-6")  # left by the exit with no entry seen
RULES = StayRules.from_config(CollectorConfig())
ZONE = RULES.zone
# A fixed past day keeps the expected times readable; the retention note is tested apart.
DAY = datetime(2026, 11, 20).date()


def at(hhmm: str) -> datetime:
    hours, minutes = (int(x) for x in hhmm.split(":"))
    return datetime.combine(DAY, time(hours, minutes), ZONE)


# (site, direction, local time, subject)
MOVES = [
    ("market", "out", "05:00", "f" * 32),  # the market has an exit gate
    ("market", "in", "08:00", CASE),
    ("market", "out", "09:00", CASE),
    ("market", "in", "09:00", TOUCH),
    ("market", "out", "10:00", TOUCH),
    ("market", "in", "09:30", AFTER),
    ("market", "out", "10:00", AFTER),
    ("market", "in", "08:55", SHORT),
    ("market", "out", "09:40", SHORT),
    ("market", "in", "08:30", BOTH),
    ("market", "out", "11:30", BOTH),
    ("market", "in", "11:00", CASE),  # the case comes back
    ("market", "out", "12:00", CASE),
    ("market", "out", "11:20", OPEN),
    ("station", "out", "05:00", "f" * 32),
    ("station", "in", "08:00", ELSEWHERE),
    ("station", "out", "12:00", ELSEWHERE),
]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = pg.store_url(request.param, tmp_path)
    gates = Checkins()
    store = open_store(url, RULES)
    try:
        batch = [gates.event(site, d, at(hhmm), subject) for site, d, hhmm, subject in MOVES]
        assert store.insert_batch(batch) == len(MOVES)
    finally:
        store.close()
    return url


def contacts(rows, subject: str) -> list[tuple[str, str, str, float]]:  # type: ignore[no-untyped-def]
    """(the case's stay start, overlap start, end (local HH:MM), seconds) for one contact."""
    return [
        (_hm(r.of_stay), _hm(r.overlap_start), _hm(r.overlap_end), r.overlap_s)
        for r in rows
        if r.kind == "contact" and r.subject == subject
    ]


def _hm(text: str) -> str:
    return f"{events.parse_utc(text).astimezone(ZONE):%H:%M}"


def test_overlap_edge_cases(store_url: str):
    store = open_store(store_url, RULES)
    try:
        day = (at("00:00"), at("23:59"))
        plain = trace(store, [CASE], *day)
        hour = trace(store, [CASE], *day, margin=timedelta(hours=1))
        picky = trace(store, [CASE], *day, min_overlap=timedelta(minutes=10))
    finally:
        store.close()
    assert [(r.site, _hm(r.start), _hm(r.end), r.stay) for r in plain if r.kind == "stay"] == [
        ("market", "08:00", "09:00", "paired"),
        ("market", "11:00", "12:00", "paired"),
    ]
    # Touching stays met in the door: a contact of zero length, kept when the minimum is 0.
    assert contacts(plain, TOUCH) == [("08:00", "09:00", "09:00", 0.0)]
    assert contacts(picky, TOUCH) == []
    # Five minutes of overlap: listed, but not when at least ten are asked for.
    assert contacts(plain, SHORT) == [("08:00", "08:55", "09:00", 300.0)]
    assert contacts(picky, SHORT) == []
    # The one-hour rule widens the case's stays: someone who came 30 min after it left counts.
    assert contacts(plain, AFTER) == []
    # (and, widened too, the case's second stay just touches it)
    assert contacts(hour, AFTER) == [("08:00", "09:30", "10:00", 1800.0), ("11:00", "10:00", "10:00", 0.0)]
    assert contacts(hour, TOUCH) == [("08:00", "09:00", "10:00", 3600.0), ("11:00", "10:00", "10:00", 0.0)]
    # The case came back: a contact inside across both stays is listed once for each.
    assert contacts(plain, BOTH) == [("08:00", "08:30", "09:00", 1800.0), ("11:00", "11:00", "11:30", 1800.0)]
    # An exit with no entry is an open-start stay (from the day start here): it counts, marked.
    assert {r.stay for r in plain if r.subject == OPEN} == {"open_start"}
    assert contacts(plain, OPEN) == [("08:00", "08:00", "09:00", 3600.0), ("11:00", "11:00", "11:20", 1200.0)]
    everyone = {r.subject for r in hour}
    assert ELSEWHERE not in everyone and CASE in everyone  # same hours, other site: never


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["trace", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _config(tmp_path: Path, url: str, key: bool = True, extra: str = "") -> Path:
    key_path = tmp_path / "state" / "subject.key"
    if key:
        key_path.parent.mkdir(exist_ok=True)
        key_path.write_bytes(KEY)
    cfg = tmp_path / "collector.toml"
    cfg.write_text(f'[storage]\ndir = "{tmp_path / "state"}"\n\n[collector]\nstore = "{url}"\n{extra}')
    return cfg


WHEN = ("--from", "2026-11-20T07:00:00+07:00", "--to", "2026-11-21T04:00:00+07:00")


def test_cli_formats(store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    cfg = _config(tmp_path, store_url)
    code, out, _ = _run(capsys, "--config", str(cfg), "--subject", CASE_ID, *WHEN, "--format", "json")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    # Each stay, then its contacts in the order their overlaps begin.
    assert [(d["kind"], d["subject"]) for d in lines] == [
        ("stay", CASE),
        *[("contact", s) for s in (OPEN, BOTH, SHORT, TOUCH)],
        ("stay", CASE),
        *[("contact", s) for s in (OPEN, BOTH)],
    ]
    assert {d["stay"] for d in lines} == {"paired", "open_start"}
    assert CASE_ID not in out

    code, out, _ = _run(
        capsys, "--config", str(cfg), "--pseudonym", CASE.upper(), *WHEN, "--format", "csv", "--margin", "1h"
    )
    assert code == 0
    table = list(csv.DictReader(io.StringIO(out)))
    assert [r["subject"] for r in table if r["kind"] == "stay"] == [CASE, CASE]
    assert AFTER in {r["subject"] for r in table} and float(table[1]["overlap_s"]) > 0

    code, out, _ = _run(capsys, "--config", str(cfg), "--subject", CASE_ID, "--type", "cccd", *WHEN)
    assert code == 0
    assert out.count("STAY") == 2 and "open_start" in out
    assert out.rstrip().endswith("2 stays, 4 distinct contacts (times UTC)")

    # The wrong credential type is a different pseudonym: nobody.
    code, out, _ = _run(capsys, "--config", str(cfg), "--subject", CASE_ID, "--type", "plain", *WHEN)
    assert code == 0 and out.rstrip().endswith("0 stays, 0 distinct contacts (times UTC)")


def test_plot_names_the_sites_contacts_and_inferred_stays(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    url = f"sqlite:{tmp_path / 'c.db'}"
    gates = Checkins()
    store = open_store(url, RULES)
    moves = [
        *MOVES,
        ("market", "in", "07:30", "e" * 32),  # no exit: an inferred end
    ]
    store.insert_batch([gates.event(site, d, at(hhmm), subject) for site, d, hhmm, subject in moves])
    store.close()
    cfg = _config(tmp_path, url)
    svg, png = tmp_path / "case.svg", tmp_path / "case.png"
    code, _, err = _run(
        capsys, "--config", str(cfg), "--pseudonym", CASE, *WHEN, "--margin", "1h", "--plot", str(svg)
    )
    assert code == 0, err
    text = svg.read_text()
    assert text.startswith("<?xml") and "<svg" in text
    for name in ("site market", f"case {CASE[:8]}", TOUCH[:8], AFTER[:8], BOTH[:8], OPEN[:8], "e" * 8):
        assert name in text, name
    for label in ("inferred", "open start", "entry and exit seen", "margin (1h00m)", "Asia/Ho_Chi_Minh"):
        assert label in text, label
    assert "station" not in text and ELSEWHERE[:8] not in text
    code, _, err = _run(capsys, "--config", str(cfg), "--pseudonym", CASE, *WHEN, "--plot", str(png))
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    code, _, err = _run(
        capsys, "--config", str(cfg), "--pseudonym", CASE, *WHEN, "--plot", str(tmp_path / "x.pdf")
    )
    assert code == 2 and ".svg or .png" in err


def test_a_period_beyond_retention_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    now = datetime(2026, 12, 30, tzinfo=UTC)
    assert retention_note(now - timedelta(days=10), now, 28, now) is None
    partly = retention_note(now - timedelta(days=40), now, 28, now)
    assert partly is not None and "only what came after that is shown" in partly and "28 days" in partly
    gone = retention_note(now - timedelta(days=60), now - timedelta(days=50), 28, now)
    assert gone is not None and "nothing of it can be shown" in gone
    cfg = _config(tmp_path, f"sqlite:{tmp_path / 'c.db'}", extra="retention_days = 7\n")
    long_ago = ("--from", "2020-01-01T00:00:00Z", "--to", "2020-01-14T00:00:00Z")
    code, out, err = _run(capsys, "--config", str(cfg), "--pseudonym", CASE, *long_ago)
    assert code == 0
    assert "deleted after 7 days (collector.retention_days)" in err and "nothing of it can be shown" in out


def test_missing_key_is_an_error_and_is_not_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    cfg = _config(tmp_path, f"sqlite:{tmp_path / 'c.db'}", key=False)
    code, _, err = _run(capsys, "--config", str(cfg), "--subject", CASE_ID, *WHEN)
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "state" / "subject.key").exists()
    with pytest.raises(TraceError):
        read_key(tmp_path / "state" / "subject.key")


@pytest.mark.parametrize(
    "argv, problem",
    [
        (("--from", "yesterday", "--to", "2026-11-21T00:00:00Z"), "ISO 8601"),
        (("--from", "2026-11-21T00:00:00Z", "--to", "2026-11-20T00:00:00Z"), "before"),
        ((*WHEN, "--margin", "soon"), "duration"),
        ((*WHEN, "--min-overlap", "a while"), "duration"),
    ],
)
def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv, problem):
    cfg = _config(tmp_path, f"sqlite:{tmp_path / 'c.db'}")
    code, _, err = _run(capsys, "--config", str(cfg), "--pseudonym", CASE, *argv)
    assert code == 2 and problem in err


def test_parsers():
    assert parse_duration("15m") == timedelta(minutes=15)
    assert parse_duration("1h30m") == timedelta(minutes=90)
    assert parse_duration("90") == timedelta(seconds=90)
    assert parse_time("2026-11-20T15:00:00+07:00") == datetime(2026, 11, 20, 8, tzinfo=UTC)
    assert parse_time("2026-11-20T08:00") == datetime(2026, 11, 20, 8, tzinfo=UTC)
    assert CASE in pseudonyms(KEY, CASE_ID)
