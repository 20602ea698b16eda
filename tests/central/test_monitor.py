"""`gate-scanner monitor`: the table logic, and --json as a subprocess against a real broker."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from scanner.central.monitor import Monitor
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
    assert mon.handle("gate/s1/g1/checkin", b"[1, 2]", False) == (None, None)
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
