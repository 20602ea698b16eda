"""`gate-scanner monitor`: the table logic, and --json as a subprocess against a real broker."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from scanner.central.monitor import GateRow, Monitor, SiteRow, text_checkin, text_gate
from scanner.sim.localbroker import LocalBroker
from tests.helpers import REPO, MonitorProcess

SUBJECT = "1fe0bbc4a2bb1a83c93871ccb202e75c"
# The fields the monitor reads from scanner/schemas/health-1.json (the rest left out: tolerated).
HEALTH = {
    "schema": "gate-scanner/health/1",
    "ts": "2026-11-29T07:30:00.000Z",
    "fps": 29.5,
    "outbox": {"depth": 3, "max": 200000, "oldest_age_s": 1.5},
    "clock_synced": True,
}


def checkin(site: str, device: str, seq: int, decision: str, reason: str) -> bytes:
    return json.dumps(
        {
            "schema": "gate-scanner/checkin/1",
            "event_id": str(uuid.uuid4()),
            "seq": seq,
            "device": device,
            "site": site,
            "direction": "in",
            "ts": f"2026-11-29T07:31:0{seq}.114Z",
            "clock_synced": True,
            "decision": decision,
            "reason": reason,
            "credential": {"type": "plain", "subject": SUBJECT},
        }
    ).encode()


def test_table_tolerates_missing_and_malformed_fields() -> None:
    mon = Monitor("gate")
    row, line = mon.handle("gate/s1/g1/health", b'{"schema": "gate-scanner/health/1"}', True)
    assert row is not None and line is None and row.fps is None and row.last_seen is None
    mon.handle("gate/s1/g1/health", b'{"fps": 12.5, "outbox": {"depth": 4}, "clock_synced": false}', False)
    mon.handle("gate/s1/g1/status", b"not json", True)
    mon.handle("gate/s1/g1/status", b'{"alarms": {"publish_refused": "0x87", "camera": "x"}}', True)
    row, line = mon.handle("gate/s1/g1/checkin", b"[1, 2]", False)
    assert line is None and row is not None and row.invalid == ["checkin"]  # came, unreadable
    assert mon.handle("gate/s1/g1/unknown", b"x", False) == (None, None)
    assert mon.handle("other/s1/g1/status", b"{}", False) == (None, None)
    assert mon.handle("gate/collector/c1/status", b"{}", True) == (None, None)  # not a gate
    row, line = mon.handle(
        "gate/s1/g1/checkin", b'{"decision": "rejected", "credential": {"subject": 7}}', False
    )
    assert line is not None and line.subject is None and line.reason is None
    assert row is not None
    assert (row.fps, row.outbox_depth, row.clock_synced) == (12.5, 4, False)
    assert row.alarms == ["camera", "publish_refused"]
    assert (row.accepts, row.rejects, row.last_decision) == (0, 1, "rejected")
    assert row.last_seen is not None
    table = mon.table()
    assert "g1" in table and "NOSYNC" in table and "camera,publish_refused" in table


def has_gate01(lines: list[dict[str, Any]]) -> bool:
    return any(o["device"] == "gate-01" and o.get("fps") == 29.5 for o in lines)


class FakeGates:
    """Publishes as the gates would: retained availability/status/health, live check-ins."""

    def __init__(self, broker: LocalBroker) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"fake-gates-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
        )
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published(), topic

    def checkin(self, prefix: str, site: str, device: str, seq: int, decision: str, reason: str) -> None:
        self.publish(f"{prefix}/{site}/{device}/checkin", checkin(site, device, seq, decision, reason))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def fleet(broker: LocalBroker, tmp_path: Path) -> Iterator[tuple[FakeGates, str, Path]]:
    """Fake gates under a fresh topic prefix (retained state from other tests stays out)."""
    prefix = f"mon{uuid.uuid4().hex[:8]}"
    config = tmp_path / "operator.toml"
    config.write_text(f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\ntopic_prefix = "{prefix}"\n')
    gates = FakeGates(broker)
    gates.publish(f"{prefix}/site-a/gate-01/availability", "online", retain=True)
    gates.publish(
        f"{prefix}/site-a/gate-01/status",
        json.dumps({"schema": "gate-scanner/status/1", "version": "1.0", "alarms": {"camera": "no frames"}}),
        retain=True,
    )
    gates.publish(
        f"{prefix}/site-a/gate-01/health",
        json.dumps(HEALTH),
        retain=True,
    )
    gates.publish(f"{prefix}/site-b/gate-09/availability", "offline", retain=True)
    try:
        yield gates, prefix, config
    finally:
        for topic in ("site-a/gate-01/availability", "site-a/gate-01/status", "site-a/gate-01/health"):
            gates.publish(f"{prefix}/{topic}", b"", retain=True)
        gates.publish(f"{prefix}/site-b/gate-09/availability", b"", retain=True)
        gates.close()


def test_monitor_json_shows_gates_and_checkins(fleet: Any, tmp_path: Path) -> None:
    gates, prefix, config = fleet
    mon = MonitorProcess(config, "--count", "2", "--duration", "20", stderr=tmp_path / "err")
    try:
        # Retained state arrives first: both gates appear before any check-in.
        seen = mon.until(lambda lines: has_gate01(lines) and any(o["device"] == "gate-09" for o in lines))
        gate01 = [o for o in seen if o["device"] == "gate-01"][-1]
        assert gate01 == {
            "kind": "gate",
            "site": "site-a",
            "device": "gate-01",
            "availability": "online",
            "last_seen": HEALTH["ts"],  # only retained messages so far: the gate's sample time
            "last_decision": None,
            "last_reason": None,
            "accepts": 0,
            "rejects": 0,
            "fps": 29.5,
            "outbox_depth": 3,
            "clock_synced": True,
            "version": "1.0",
            "alarms": ["camera"],
            "invalid": [],
            "inside_gate": None,
            "inside_stays": None,
        }
        assert [o["availability"] for o in seen if o["device"] == "gate-09"] == ["offline"]
        gates.publish(f"{prefix}/site-a/gate-01/checkin", checkin("site-a", "gate-01", 1, "accepted", "ok"))
        gates.publish(
            f"{prefix}/site-b/gate-09/checkin", checkin("site-b", "gate-09", 2, "rejected", "expired")
        )
        code, rest = mon.finish()
    finally:
        mon.kill()
    assert code == 0, (tmp_path / "err").read_text()
    checkins = [o for o in rest if o["kind"] == "checkin"]
    assert checkins == [
        {
            "kind": "checkin",
            "ts": "2026-11-29T07:31:01.114Z",
            "site": "site-a",
            "device": "gate-01",
            "decision": "accepted",
            "reason": "ok",
            "credential_type": "plain",
            "subject": SUBJECT[:8],
            "seq": 1,
            "invalid": [],
        },
        {
            "kind": "checkin",
            "ts": "2026-11-29T07:31:02.114Z",
            "site": "site-b",
            "device": "gate-09",
            "decision": "rejected",
            "reason": "expired",
            "credential_type": "plain",
            "subject": SUBJECT[:8],
            "seq": 2,
            "invalid": [],
        },
    ]
    rows = {o["device"]: o for o in rest if o["kind"] == "gate"}
    assert (rows["gate-01"]["accepts"], rows["gate-01"]["last_decision"]) == (1, "accepted")
    assert (rows["gate-09"]["rejects"], rows["gate-09"]["last_reason"]) == (1, "expired")
    assert rows["gate-01"]["last_seen"] is not None
    assert SUBJECT not in json.dumps(rest)  # only the 8-character prefix is shown


def test_monitor_site_filter(fleet: Any, tmp_path: Path) -> None:
    gates, prefix, config = fleet
    mon = MonitorProcess(
        config, "--site", "site-a", "--count", "2", "--duration", "20", stderr=tmp_path / "err"
    )
    try:
        seen = mon.until(has_gate01)
        gates.publish(
            f"{prefix}/site-b/gate-09/checkin", checkin("site-b", "gate-09", 1, "rejected", "expired")
        )
        for seq in (2, 3):
            gates.publish(
                f"{prefix}/site-a/gate-01/checkin", checkin("site-a", "gate-01", seq, "accepted", "ok")
            )
        code, rest = mon.finish()
    finally:
        mon.kill()
    assert code == 0, (tmp_path / "err").read_text()
    assert {o["site"] for o in seen + rest} == {"site-a"}
    assert [o["seq"] for o in rest if o["kind"] == "checkin"] == [2, 3]


def test_monitor_bad_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[mqtt]\nport = "x"\n')
    result = subprocess.run(
        [sys.executable, "-m", "scanner", "monitor", "--config", str(config), "--duration", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "mqtt.port" in result.stderr


# --- whatever a gate sends: shown where it can be, marked where not, never a traceback ---------

DEEP = b"[" * 100_000 + b"]" * 100_000
DIGITS_400 = b"9" * 400
LONG = "x" * 100_000  # a string no field holds, in a message of ordinary size
HUGE = "x" * 3_000_000  # a message bigger than any a gate sends: not even parsed
ESCAPES = "\x1b[2J\x1b]0;pwned\x07\u202eevil"  # clear the operator's screen, retitle, reverse text

HOSTILE_HEALTH: list[tuple[bytes, set[str]]] = [
    (b'{"outbox": {"depth": NaN}, "fps": 12.0}', {"outbox_depth"}),
    (b'{"outbox": {"depth": Infinity}}', {"outbox_depth"}),
    (b'{"outbox": {"depth": 1e999}, "fps": -Infinity}', {"outbox_depth", "fps"}),
    (b'{"outbox": {"depth": ' + DIGITS_400 + b'}, "fps": ' + DIGITS_400 + b".5}", {"outbox_depth", "fps"}),
    (b'{"outbox": {"depth": 1' + b"0" * 5000 + b"}}", {"outbox_depth"}),  # past Python's int limit
    (
        b'{"outbox": {"depth": 2.5}, "fps": "fast", "clock_synced": "yes"}',
        {"outbox_depth", "fps", "clock_synced"},
    ),
    (b'{"outbox": [4], "fps": true, "ts": 5}', {"outbox_depth", "fps", "last_seen"}),
    (b'{"outbox": {"depth": -3}, "fps": 1e300}', {"outbox_depth", "fps"}),
    (json.dumps({"ts": LONG, "alarms": {LONG: 1}}).encode(), {"last_seen", "alarms"}),
    (json.dumps({"ts": HUGE, "fps": 1.0}).encode(), {"health"}),
    (json.dumps({"ts": ESCAPES, "alarms": [ESCAPES, {"kind": 7}]}).encode(), {"last_seen", "alarms"}),
    (json.dumps({"alarms": {f"a{i}": 1 for i in range(10_000)}}).encode(), {"alarms"}),
    (b'{"outbox": {"depth": ' + DEEP + b"}}", {"health"}),
    (DEEP, {"health"}),
    (b"\xff\xfe{", {"health"}),
    (b"[]", {"health"}),
    (b'"' + HUGE.encode() + b'"', {"health"}),
]
HOSTILE_STATUS: list[tuple[bytes, set[str]]] = [
    (json.dumps({"version": LONG}).encode(), {"version"}),
    (
        json.dumps({"version": ESCAPES, "alarms": {ESCAPES: "x", "camera": "ok"}}).encode(),
        {"version", "alarms"},
    ),
    (b'{"version": NaN, "alarms": 7}', {"version", "alarms"}),
    (b'{"version": ' + DIGITS_400 + b"}", {"version"}),
    (b'{"alarms": ' + DEEP + b"}", {"status"}),
]
HOSTILE_CHECKIN: list[tuple[bytes, set[str]]] = [
    (
        json.dumps({"decision": LONG, "reason": ESCAPES, "ts": 1.5, "seq": 2**70, "credential": []}).encode(),
        {"decision", "reason", "ts", "seq", "credential_type", "subject"},
    ),
    (
        b'{"decision": "accepted", "seq": NaN, "credential": {"type": 7, "subject": "zz' + b"z" * 40 + b'"}}',
        {"seq", "credential_type", "subject"},
    ),
    (b'{"decision": "rejected", "seq": ' + DIGITS_400 + b', "clock_synced": 1e999}', {"seq", "clock_synced"}),
    (b"[" * 100_000, {"checkin"}),
]


def assert_shown_safely(mon: Monitor, row: GateRow | None) -> None:
    assert row is not None
    # --json consumers get strict JSON: no NaN or Infinity anywhere.
    json.dumps(asdict(row), allow_nan=False)
    for line in mon.stream:
        json.dumps(asdict(line), allow_nan=False)
    table = mon.table() + "\n" + text_gate(row) + "".join(text_checkin(c) for c in mon.stream)
    assert all(c.isprintable() for c in table.replace("\n", "")), "control characters reach the terminal"
    assert max(len(line) for line in table.splitlines()) < 1_000


@pytest.mark.parametrize("payload, invalid", HOSTILE_HEALTH, ids=range(len(HOSTILE_HEALTH)))
def test_hostile_health_is_shown_and_marked(payload: bytes, invalid: set[str]) -> None:
    mon = Monitor("gate")
    mon.handle("gate/s1/g1/health", json.dumps(HEALTH).encode(), True)
    row, _ = mon.handle("gate/s1/g1/health", payload, False)
    assert_shown_safely(mon, row)
    assert row is not None and set(row.invalid) == invalid
    if "fps" not in invalid and b'"fps": 12.0' in payload:
        assert row.fps == 12.0  # what is readable is still shown
    if "health" in invalid:  # nothing readable: the last good figures stay, marked stale
        assert (row.fps, row.outbox_depth) == (29.5, 3)
    mon.handle("gate/s1/g1/health", json.dumps(HEALTH).encode(), False)
    assert row.invalid == []  # a good message clears the marks


@pytest.mark.parametrize("payload, invalid", HOSTILE_STATUS, ids=range(len(HOSTILE_STATUS)))
def test_hostile_status_is_shown_and_marked(payload: bytes, invalid: set[str]) -> None:
    mon = Monitor("gate")
    row, _ = mon.handle("gate/s1/g1/status", payload, True)
    assert_shown_safely(mon, row)
    assert row is not None and set(row.invalid) == invalid
    if ESCAPES in payload.decode("utf-8", "replace") and "camera" in payload.decode():
        assert "camera" in row.alarms


@pytest.mark.parametrize("payload, invalid", HOSTILE_CHECKIN, ids=range(len(HOSTILE_CHECKIN)))
def test_hostile_checkin_is_shown_and_marked(payload: bytes, invalid: set[str]) -> None:
    mon = Monitor("gate")
    row, line = mon.handle("gate/s1/g1/checkin", payload, False)
    assert_shown_safely(mon, row)
    assert row is not None
    if invalid == {"checkin"}:
        assert line is None and row.invalid == ["checkin"]
    else:
        assert line is not None and set(line.invalid) == invalid


def test_a_cleared_retained_message_is_not_marked() -> None:
    mon = Monitor("gate")
    mon.handle("gate/s1/g1/health", b"[[[", True)
    row, line = mon.handle("gate/s1/g1/health", b"", True)
    assert row is not None and line is None and row.invalid == []


def test_hostile_availability_and_topic_segments_are_shown_safely() -> None:
    mon = Monitor("gate")
    row, _ = mon.handle("gate/s1/g1/availability", ESCAPES.encode(), True)
    assert_shown_safely(mon, row)
    assert row is not None and row.availability is None and row.invalid == ["availability"]
    row, _ = mon.handle("gate/s\u202e1/" + "g" * 5000 + "/availability", b"online", True)
    assert_shown_safely(mon, row)
    assert row is not None and row.availability == "online"


def test_monitor_survives_a_hostile_gate(broker: LocalBroker, tmp_path: Path) -> None:
    """The retained payloads from the report, and more, on a real broker: the operator's
    monitor keeps running, prints strict JSON, and shows the good gate next to them."""
    prefix = f"mon{uuid.uuid4().hex[:8]}"
    config = tmp_path / "operator.toml"
    config.write_text(f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\ntopic_prefix = "{prefix}"\n')
    gates = FakeGates(broker)
    retained = [
        (f"{prefix}/s1/nan/health", b'{"outbox": {"depth": NaN}}'),
        (f"{prefix}/s1/inf/health", b'{"outbox": {"depth": 1e999}}'),
        (
            f"{prefix}/s1/digits/health",
            b'{"outbox": {"depth": ' + DIGITS_400 + b'}, "fps": ' + DIGITS_400 + b"}",
        ),
        (f"{prefix}/s1/deep/status", b'{"alarms": ' + DEEP + b"}"),
        (f"{prefix}/s1/types/health", b'{"outbox": "full", "fps": [1], "alarms": 3}'),
        (f"{prefix}/s1/huge/status", json.dumps({"version": HUGE, "alarms": {ESCAPES: 1}}).encode()),
        (f"{prefix}/s1/good/health", json.dumps(HEALTH).encode()),
    ]
    try:
        for topic, payload in retained:
            gates.publish(topic, payload, retain=True)
        mon = MonitorProcess(config, "--count", "1", "--duration", "20", stderr=tmp_path / "err")
        try:
            seen = mon.until(
                lambda lines: (
                    {"nan", "inf", "digits", "deep", "types", "huge", "good"} <= {o["device"] for o in lines}
                )
            )
            gates.publish(f"{prefix}/s1/good/checkin", checkin("s1", "good", 1, "accepted", "ok"))
            code, rest = mon.finish()
        finally:
            mon.kill()
    finally:
        for topic, _ in retained:
            gates.publish(topic, b"", retain=True)
        gates.close()
    err = (tmp_path / "err").read_text()
    assert code == 0 and "Traceback" not in err, err
    assert [o["seq"] for o in rest if o["kind"] == "checkin"] == [1]
    rows = {o["device"]: o for o in seen + rest if o["kind"] == "gate"}
    assert rows["good"]["fps"] == 29.5 and rows["good"]["invalid"] == []
    assert rows["nan"]["outbox_depth"] is None and rows["nan"]["invalid"] == ["outbox_depth"]
    assert rows["deep"]["invalid"] == ["status"]
    assert set(rows["types"]["invalid"]) == {"outbox_depth", "fps", "alarms"}
    for line in mon.raw:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))


# -- site occupancy --------------------------------------------------------------------------


def counter(
    site: str, device: str, day: str, entries: int, exits: int, adjust: int = 0, capacity: int = 3
) -> bytes:
    """A gate's occupancy counter (scanner/schemas/occupancy-1.json)."""
    return json.dumps(
        {
            "schema": "gate-scanner/occupancy/1",
            "site": site,
            "device": device,
            "day": day,
            "version": 1,
            "entries": entries,
            "exits": exits,
            "adjust": adjust,
            "capacity": capacity,
            "stopped": False,
            "ts": "2026-11-29T07:30:00.000Z",
        }
    ).encode()


def test_site_occupancy_sums_the_counters_of_the_latest_day_and_shrugs_off_garbage() -> None:
    mon = Monitor("gate")
    day, next_day = "2026-11-29", "2026-11-30"
    assert mon.handle_site("gate/s1/g1/occupancy", counter("s1", "g1", day, 5, 1)) == SiteRow(
        "s1", day, 4, 3, 1
    )
    assert mon.handle_site("gate/s1/g2/occupancy", counter("s1", "g2", day, 0, 3, adjust=2)) == SiteRow(
        "s1", day, 3, 3, 2
    )
    for garbage in (
        b"not json",
        b"[1]",
        b'{"day": "x"}',
        counter("s1", "g9", day, 5, 1).replace(b"5", b'"5"'),
    ):
        assert mon.handle_site("gate/s1/g9/occupancy", garbage) is None
    assert mon.handle_site("gate/s1/g3/occupancy", counter("s1", "g3", next_day, 1, 0)) == SiteRow(
        "s1", next_day, 1, 3, 1
    )
    assert mon.handle_site("gate/s1/g3/occupancy", b"") == SiteRow("s1", day, 3, 3, 2)  # cleared
    assert (
        mon.handle_site("gate/s1/g2/occupancy", counter("s1", "g2", day, 0, 9, capacity=5)).capacity is None
    )
    assert (
        mon.handle_site("gate/s1/g2/occupancy", counter("s1", "g2", day, 0, 9)).inside == 0
    )  # never below 0
    assert mon.handle("gate/s1/g1/occupancy", counter("s1", "g1", day, 5, 1), True) == (None, None)
    assert "site s1 2026-11-29: 0 inside, cap 3 (2 gates)" in mon.table()


def test_monitor_json_shows_each_sites_occupancy(fleet: Any, tmp_path: Path) -> None:
    gates, prefix, config = fleet
    topic = f"{prefix}/site-a/gate-01/occupancy"
    gates.publish(topic, counter("site-a", "gate-01", "2026-11-29", 7, 2), retain=True)
    mon = MonitorProcess(config, "--duration", "20", stderr=tmp_path / "err")
    try:
        seen = mon.until(lambda lines: any(o["kind"] == "site" for o in lines))
        gates.publish(f"{prefix}/site-a/gate-02/occupancy", counter("site-a", "gate-02", "2026-11-29", 0, 1))
        seen += mon.until(lambda lines: any(o["kind"] == "site" and o["gates"] == 2 for o in lines))
    finally:
        mon.kill()
        gates.publish(topic, b"", retain=True)
    sites = [o for o in seen if o["kind"] == "site"]
    assert sites[0] == {
        "kind": "site",
        "site": "site-a",
        "day": "2026-11-29",
        "inside": 5,
        "capacity": 3,
        "gates": 1,
    }
    assert sites[-1]["inside"] == 4


def test_inside_counts_from_the_gates_and_from_the_collectors_stays_side_by_side() -> None:
    mon = Monitor("gate", site="s1")
    assert "gate/collector/+/status" in mon.topics()  # the collector is not under the site
    mon.handle("gate/s1/g1/status", json.dumps({"occupancy": {"inside": 7}}).encode(), True)
    mon.handle("gate/s1/g2/status", json.dumps({"occupancy": {"inside": 7}}).encode(), True)
    assert mon.gates[("s1", "g1")].inside_stays is None  # no collector heard from yet: unknown
    assert mon.differences() == []
    status = {"schema": "gate-scanner/collector-status/1", "occupancy": [{"site": "s1", "inside": 5}]}
    row, line = mon.handle("gate/collector/c1/status", json.dumps(status).encode(), True)
    assert row is not None and line is None
    assert [(r.inside_gate, r.inside_stays) for r in mon.gates.values()] == [(7, 5), (7, 5)]
    assert mon.differences() == ["site s1: the gates count 7 inside, the stays 5"]
    table = mon.table()
    assert "in:gate" in table and "in:stays" in table and "the gates count 7 inside, the stays 5" in table
    # A site the collector does not name has nobody inside by the stays; agreement is no line.
    mon.handle("gate/collector/c1/status", json.dumps({"occupancy": []}).encode(), True)
    mon.handle("gate/s1/g1/status", json.dumps({"occupancy": {"inside": 0}}).encode(), True)
    mon.handle("gate/s1/g2/status", json.dumps({"occupancy": {"inside": 0}}).encode(), True)
    assert [r.inside_stays for r in mon.gates.values()] == [0, 0] and mon.differences() == []
    # Hostile or old payloads change nothing and break nothing.
    for junk in (b"[]", b'{"occupancy": {"s1": 3}}', b'{"occupancy": [{"site": 1, "inside": "x"}]}'):
        assert mon.handle("gate/collector/c1/status", junk, True) == (None, None)
