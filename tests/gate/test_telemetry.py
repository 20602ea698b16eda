"""Health telemetry, the richer status, the outbox fill alarm and Home Assistant discovery."""

from __future__ import annotations

import json
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest
from gpiozero.pins.mock import MockFactory

from scanner import events
from scanner.gate import telemetry
from scanner.gate.app import App
from scanner.gate.outbox import Outbox
from scanner.gate.publisher import Publisher
from tests.helpers import HeldSource, gate_config, make_config, running, unique_name
from tests.mqtt_helpers import wait_until

HEALTH = json.loads(events.schema_path("health").read_text())
STATUS = json.loads(events.schema_path("status").read_text())


# -- pure functions ---------------------------------------------------------------------------


def test_percentile_is_nearest_rank():
    assert telemetry.percentile([], 50) is None
    assert telemetry.percentile([3.0], 95) == 3.0
    values = [float(v) for v in range(1, 101)]
    assert telemetry.percentile(values, 50) == 50.0
    assert telemetry.percentile(values, 95) == 95.0


def test_throttled_bits_become_named_flags():
    flags = telemetry.parse_throttled("throttled=0x50005\n")
    assert flags is not None and flags["raw"] == "0x50005"
    assert flags["under_voltage_now"] and flags["throttled_now"]
    assert flags["under_voltage_occurred"] and flags["throttled_occurred"]
    assert not flags["freq_capped_now"] and not flags["soft_temp_limit_occurred"]
    assert telemetry.parse_throttled('error=1 error_msg="no vchiq"') is None


def test_throttle_reader_is_bounded_cached_and_null_off_a_pi():
    script = "import sys; print('throttled=0x1')"
    reader = telemetry.ThrottleReader([sys.executable, "-c", script], ttl=60)
    first = reader.read()
    assert first is not None and first["under_voltage_now"]
    assert reader.read() is first  # cached
    hang = telemetry.ThrottleReader([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.3)
    assert hang.read() is None  # killed at the timeout, not waited for
    assert telemetry.ThrottleReader([]).read() is None
    assert telemetry.ThrottleReader(["/nonexistent/vcgencmd", "get_throttled"]).read() is None


def test_cpu_temperature_from_the_thermal_zone(tmp_path):
    zone = tmp_path / "temp"
    zone.write_text("48312\n")
    assert telemetry.cpu_temp_c(zone) == 48.3
    assert telemetry.cpu_temp_c(tmp_path / "missing") is None


def test_outbox_fill_alarm_has_hysteresis():
    states = []
    active = False
    for depth in (0, 79, 80, 75, 70, 69, 75):
        active = telemetry.fill_alarm(depth, 100, active)
        states.append(active)
    assert states == [False, False, True, True, True, False, False]


def test_a_sample_is_schema_valid_with_and_without_host_facts(tmp_path):
    cfg = make_config(tmp_path)
    for cpu, throttled in ((None, None), (51.2, telemetry.parse_throttled("throttled=0x0"))):
        sampler = telemetry.Sampler(
            cfg, cpu_temp=lambda c=cpu: c, throttled=lambda t=throttled: t, clock_synced=lambda: True
        )
        body = sampler.sample(
            now=datetime(2026, 11, 29, 8, 0, 10, tzinfo=UTC),
            mono=110.0,
            started_mono=100.0,
            frames=300,
            decode_ms=[0.4, 0.5, 3.0],
            reasons={"ok": 2, "denylisted": 1},
            outbox_depth=3,
            outbox_oldest="2026-11-29T08:00:00.000Z",
            camera="ok",
            worker_failures=0,
            reconnects=1,
        )
        jsonschema.validate(body, HEALTH)
        assert body["fps"] == 30.0 and body["outbox"]["oldest_age_s"] == 10.0
        assert body["decode_ms"]["p50"] == 0.5


# -- the running gate ------------------------------------------------------------------------


def test_health_and_status_are_published_retained_and_schema_valid(broker, tmp_path, subscribe):
    cfg = gate_config(broker, tmp_path, telemetry={"interval_s": 0.3})
    health_topic, status_topic = cfg.topic("health"), cfg.topic("status")
    sub = subscribe(health_topic, status_topic)
    factory = MockFactory()
    try:
        with running(cfg, factory, HeldSource()):

            def flowing(msgs) -> bool:
                bodies = [json.loads(m.payload) for m in msgs if m.topic == health_topic]
                return any(b["fps"] > 0 and b["decode_ms"]["samples"] > 0 for b in bodies)

            assert sub.wait_for(flowing, 15)
            assert sub.wait_for(
                lambda msgs: any(m.topic == status_topic and b'"camera":"ok"' in m.payload for m in msgs), 10
            )
            for payload in sub.payloads(health_topic):
                jsonschema.validate(json.loads(payload), HEALTH)
            for payload in sub.payloads(status_topic):
                status = json.loads(payload)
                jsonschema.validate(status, STATUS)
                assert status["outbox"]["max"] == cfg.storage.outbox_max_events
                assert status["selftest"] is None
            late = subscribe(health_topic)
            assert late.wait_for(lambda msgs: bool(msgs), 10)
            assert late.messages[0].retain
    finally:
        factory.close()


def test_a_nearly_full_outbox_raises_outbox_filling_in_status(tmp_path):
    # no broker: nothing drains; 8 of 10 is the 80 % at which the alarm is raised
    cfg = make_config(tmp_path, telemetry={"interval_s": 0.2}, storage={"outbox_max_events": 10})
    (tmp_path / "state").mkdir()
    with Outbox(tmp_path / "state" / "outbox.db", 10) as outbox:
        for _ in range(8):
            outbox.append(lambda seq, created: b"{}")
    factory = MockFactory()
    app = App(cfg, pin_factory=factory, source=HeldSource())
    stop = threading.Event()
    runner = threading.Thread(target=app.run, args=(stop,), daemon=True)
    runner.start()
    try:
        assert wait_until(lambda: "outbox_filling" in app.alarms.snapshot(), 10)
        status = app.status()
        jsonschema.validate(status, STATUS)
        assert status["outbox"] == {"depth": 8, "max": 10}
        health = app.health(remember=False)
        jsonschema.validate(health, HEALTH)
        assert health["outbox"]["depth"] == 8 and health["outbox"]["oldest_age_s"] is not None
    finally:
        stop.set()
        runner.join(15)
        factory.close()
    assert not runner.is_alive()


@pytest.mark.parametrize("enabled", [True, False])
def test_home_assistant_discovery_only_when_enabled(broker, tmp_path: Path, subscribe, enabled):
    prefix = unique_name("ha")
    cfg = gate_config(broker, tmp_path, homeassistant={"enabled": enabled, "discovery_prefix": prefix})
    sub = subscribe(f"{prefix}/#", cfg.topic("availability"))
    outbox = Outbox(tmp_path / "o.db", 100)
    pub = Publisher(cfg, outbox, status=lambda: {"version": "test"}).start()
    try:
        assert sub.wait_payload(cfg.topic("availability"), b"online")
        if not enabled:
            assert pub.wait_subscribed(5)
            assert sub.payloads() == [b"online"]
            return
        assert sub.wait_for(lambda msgs: len([m for m in msgs if m.topic.startswith(prefix)]) >= 6, 10)
        configs = {m.topic: json.loads(m.payload) for m in sub.messages if m.topic.startswith(prefix)}
        # The site's "people inside" sensor: one per site, the same config from each of its gates.
        site_sensor = configs.pop(f"{prefix}/sensor/gate_scanner_site_{cfg.device.site}/occupancy/config")
        assert site_sensor["state_topic"] == f"gate/{cfg.device.site}/+/health"
        components = sorted(t.split("/")[1] for t in configs)
        assert components == ["binary_sensor", "event", "sensor", "sensor", "sensor"]
        event = next(c for t, c in configs.items() if "/event/" in t)
        assert event["state_topic"] == cfg.topic("checkin")
        assert event["event_types"] == ["accepted", "rejected", "annulled"]
        assert "subject" not in event["value_template"]  # no personal data, not even the pseudonym
        sensors = [c for t, c in configs.items() if "/sensor/" in t]
        assert all(c["state_topic"] == cfg.topic("health") for c in sensors)
        assert len({c["unique_id"] for c in configs.values()}) == 5
        late = subscribe(f"{prefix}/#")
        assert late.wait_for(lambda msgs: len(msgs) >= 6, 10) and all(m.retain for m in late.messages)
    finally:
        pub.stop(timeout=2)
        outbox.close()
