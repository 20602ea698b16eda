"""Contact tracing over the collector's store: known visits → the expected contacts, every format."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from scanner import cli, events
from scanner.central.collector import parse_event
from scanner.central.store import open_store
from scanner.central.trace import TraceError, parse_duration, parse_time, pseudonyms, read_key, trace
from scanner.models import CheckinEvent
from tests import pg

KEY = b"k" * 32
P = events.Pseudonymizer(KEY)
CASE_ID = "079123456789"  # the subject the health authority asks about (a CCCD number)
CASE = P.subject("cccd", CASE_ID.encode())
NEAR_A = P.subject("plain", b"EMP-1")  # 5 min after the case at site A
LATE_A = P.subject("plain", b"EMP-2")  # 40 min after: outside 15 min, inside 45 min
NEAR_B = P.subject("signed", b"pass-3")  # 10 min before the case's visit to site B
OTHER_SITE = P.subject("plain", b"EMP-4")  # same minute as the case, at site C
T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)

# (subject, site, minutes after T0, decision)
VISITS = [
    (CASE, "site-a", 0, "accepted"),
    (NEAR_A, "site-a", 5, "accepted"),
    (NEAR_A, "site-a", 6, "rejected"),  # the same contact twice: listed once per visit
    (LATE_A, "site-a", 40, "accepted"),
    (CASE, "site-b", 240, "accepted"),
    (NEAR_B, "site-b", 230, "rejected"),  # turned away, but was there
    (OTHER_SITE, "site-c", 0, "accepted"),
    (CASE, "site-c", 60 * 24 * 3, "accepted"),  # outside --from/--to
]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = pg.store_url(request.param, tmp_path)
    store = open_store(url)
    try:
        batch = []
        for seq, (subject, site, minutes, decision) in enumerate(VISITS, 1):
            at = T0 + timedelta(minutes=minutes)
            event = CheckinEvent(
                event_id=events.Uuid7().new(int(at.timestamp() * 1000)),
                seq=seq,
                device=f"{site}-gate",
                site=site,
                direction="in",
                ts=events.utc_ms(at),
                clock_synced=True,
                decision=decision,
                reason="ok" if decision == "accepted" else "denylisted",
                credential_type="plain",
                subject=subject,
            )
            batch.append(parse_event(f"gate/{site}/{site}-gate/checkin", events.to_json(event), "gate"))
        assert store.insert_batch(batch) == len(VISITS)
    finally:
        store.close()
    return url


def test_visits_and_contacts_within_the_window(store_url: str):
    store = open_store(store_url)
    try:
        subjects = pseudonyms(KEY, CASE_ID)
        assert CASE in subjects
        start, end = T0 - timedelta(hours=1), T0 + timedelta(days=1)
        rows = trace(store, subjects, start, end, timedelta(minutes=15))
        wide = trace(store, subjects, start, end, timedelta(minutes=45))
    finally:
        store.close()
    visits = [(r.site, r.ts) for r in rows if r.kind == "visit"]
    assert visits == [("site-a", "2026-11-20T08:00:00.000Z"), ("site-b", "2026-11-20T12:00:00.000Z")]
    contacts = [(r.visit_ts[11:16], r.subject, r.decision, r.delta_s) for r in rows if r.kind == "contact"]
    assert contacts == [("08:00", NEAR_A, "accepted", 300.0), ("12:00", NEAR_B, "rejected", -600.0)]
    assert {r.subject for r in wide if r.kind == "contact"} == {NEAR_A, LATE_A, NEAR_B}
    assert OTHER_SITE not in {r.subject for r in wide}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["trace", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _config(tmp_path: Path, url: str, key: bool = True) -> Path:
    key_path = tmp_path / "state" / "subject.key"
    if key:
        key_path.parent.mkdir(exist_ok=True)
        key_path.write_bytes(KEY)
    cfg = tmp_path / "collector.toml"
    cfg.write_text(f'[storage]\ndir = "{tmp_path / "state"}"\n\n[collector]\nstore = "{url}"\n')
    return cfg


WHEN = ("--from", "2026-11-20T07:00:00Z", "--to", "2026-11-21T07:00:00+07:00")


def test_cli_formats(store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    cfg = _config(tmp_path, store_url)
    code, out, _ = _run(capsys, "--config", str(cfg), "--subject", CASE_ID, *WHEN, "--format", "json")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(d["kind"], d["subject"]) for d in lines] == [
        ("visit", CASE),
        ("contact", NEAR_A),
        ("visit", CASE),
        ("contact", NEAR_B),
    ]
    assert CASE_ID not in out

    code, out, _ = _run(capsys, "--config", str(cfg), "--pseudonym", CASE.upper(), *WHEN, "--format", "csv")
    assert code == 0
    table = list(csv.DictReader(io.StringIO(out)))
    assert [r["subject"] for r in table if r["kind"] == "contact"] == [NEAR_A, NEAR_B]
    assert table[0]["site"] == "site-a" and table[0]["ts"] == "2026-11-20T08:00:00.000Z"

    code, out, _ = _run(
        capsys, "--config", str(cfg), "--subject", CASE_ID, "--type", "cccd", *WHEN, "--window", "45m"
    )
    assert code == 0
    assert out.count("VISIT") == 2 and LATE_A in out
    assert out.rstrip().endswith("2 visits, 3 distinct contacts")

    # The wrong credential type is a different pseudonym: nobody.
    code, out, _ = _run(capsys, "--config", str(cfg), "--subject", CASE_ID, "--type", "plain", *WHEN)
    assert code == 0 and out.rstrip().endswith("0 visits, 0 distinct contacts")


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
        ((*WHEN, "--window", "soon"), "duration"),
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
    assert parse_time("2026-11-20T15:00:00+07:00") == T0
    assert parse_time("2026-11-20T08:00") == T0
