"""End to end: replayed frames → decisions → relay → outbox → a real broker → an independent subscriber."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import cv2
import jsonschema
import numpy as np
import pytest
from gpiozero.pins.mock import MockFactory

from scanner import config as config_mod
from scanner import events
from scanner.gate.app import App
from scanner.sim import synth
from scanner.sim.demo import ALLOWED, DENIED, EXIT_SCENES, RETRY_SCENES, write_demo_files
from scanner.sim.demo import SCENES as DEMO_SCENES
from scanner.sim.localbroker import LocalBroker
from tests.helpers import (
    CCCD_CARD,
    CCCD_PERSONAL,
    energised_relay,
    rising_edges,
    signed_dcc,
    spellings,
    toml_text,
    toml_with,
)
from tests.mqtt_helpers import Subscriber, wait_until

SCHEMA = json.loads(events.schema_path().read_text())
RANDOM_BYTES = bytes(range(0x80, 0xC0))
OVERSIZED = ("OVERSIZED-" * 60).encode()  # 600 bytes: far past a plain code's 256


def configure(workdir: Path, port: int, scenes: Sequence[tuple[str, bytes | str]], **overrides: object):
    """The demo's gate config over these scenes, with ``section.key`` overrides."""
    path = write_demo_files(workdir, broker_port=port, scenes=scenes, fps=40.0)
    path.write_text(toml_text(toml_with(path, overrides)))
    return config_mod.load(path)


def run_app(cfg: config_mod.Config, factory: MockFactory, timeout: float = 60.0) -> tuple[App, int]:
    app = App(cfg, pin_factory=factory)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(app.run(threading.Event())), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the daemon did not finish its finite source"
    return app, result[0]


def spawn_daemon(config: Path, stderr: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "scanner", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )


def checkins(sub: Subscriber) -> list[dict]:
    with sub._cond:
        return [json.loads(m.payload) for m in sub.messages if m.topic.endswith("/checkin")]


def seqs(sub: Subscriber) -> set[int]:
    return {e["seq"] for e in checkins(sub)}


def check_events(received: list[dict]) -> None:
    for event in received:
        jsonschema.validate(event, SCHEMA)
    seqs = [e["seq"] for e in received]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert len({e["event_id"] for e in received}) == len(received)


SCENES = (
    ("allowed", ALLOWED[0]),
    ("denied", DENIED[0]),
    ("unknown", "VISITOR-7"),
    ("random bytes", RANDOM_BYTES),
    ("allowed again", ALLOWED[1]),
)


def test_frames_to_subscriber_with_relay_history(tmp_path):
    with LocalBroker(tmp_path / "broker") as broker, Subscriber(broker, "gate/#") as sub:
        cfg = configure(tmp_path, broker.port, SCENES)
        factory = MockFactory()
        relay_history = energised_relay(factory, cfg.gpio)
        try:
            _, code = run_app(cfg, factory)
            relay_states = relay_history()
        finally:
            factory.close()
        assert code == 0
        assert wait_until(lambda: len(checkins(sub)) >= len(SCENES), 10), checkins(sub)
        # "offline" is the daemon's last word, after the last check-in.
        assert sub.wait_payload(cfg.topic("availability"), b"offline", 10)
    received = checkins(sub)
    check_events(received)
    assert [(e["decision"], e["reason"]) for e in received] == [
        ("accepted", "ok"),
        ("rejected", "denylisted"),
        ("rejected", "not_allowlisted"),
        ("rejected", "unknown_format"),
        ("accepted", "ok"),
    ]
    # Left energised, the relay is driven off at start, pulses exactly once per accept, never
    # on a reject, and ends off.
    assert relay_states == [True, False, True, False, True, False]
    assert rising_edges(relay_states) == 2
    for text in ALLOWED + DENIED + ("VISITOR-7",):
        assert text.encode() not in b"".join(sub.payloads())


def test_hostile_payloads_are_rejected_and_the_gate_keeps_scanning(tmp_path):
    scenes = (
        ("random bytes", RANDOM_BYTES),
        ("oversized", OVERSIZED),
        ("control chars", b"EMP\x00\x1b[2J"),
        ("allowed", ALLOWED[0]),
    )
    with LocalBroker(tmp_path / "broker") as broker, Subscriber(broker, "gate/#") as sub:
        cfg = configure(tmp_path, broker.port, scenes)
        factory = MockFactory()
        try:
            _, code = run_app(cfg, factory)
        finally:
            factory.close()
        assert code == 0
        assert wait_until(lambda: len(checkins(sub)) >= 4, 10), checkins(sub)
    check_events(checkins(sub))
    assert [e["reason"] for e in checkins(sub)] == ["unknown_format", "malformed", "unknown_format", "ok"]


def test_broker_outage_mid_run_loses_nothing(tmp_path):
    scenes = [(f"person {i}", ALLOWED[i % len(ALLOWED)] if i % 2 else f"VISITOR-{i}") for i in range(12)]
    with (
        LocalBroker(tmp_path / "broker", persistence=True) as broker,
        Subscriber(broker, "gate/+/+/checkin", persistent=True) as sub,
    ):
        cfg = configure(tmp_path, broker.port, scenes, **{"daemon.drain_timeout_s": 30.0})
        factory = MockFactory()
        app = App(cfg, pin_factory=factory)
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(app.run(threading.Event())), daemon=True)
        thread.start()
        try:
            assert wait_until(lambda: len(checkins(sub)) >= 2, 20)
            broker.stop()
            # Scans go on while the broker is down: they are committed, not sent.
            assert wait_until(lambda: app.gate is not None and sum(app.gate.reasons.values()) >= 6, 20)
            broker.start()
            thread.join(60)
            assert not thread.is_alive()
        finally:
            factory.close()
        assert result == [0]
        assert wait_until(lambda: len(seqs(sub)) >= len(scenes), 20)
    unique = {e["seq"]: e for e in checkins(sub)}
    assert sorted(unique) == list(range(1, len(scenes) + 1))
    check_events(list(unique.values()))


def test_sigkill_with_unsent_rows_then_restart_delivers_everything(tmp_path):
    scenes = [(f"person {i}", f"VISITOR-{i}") for i in range(5)]
    broker = LocalBroker(tmp_path / "broker", persistence=True)  # not started: the link is down
    cfg = configure(tmp_path, broker.port, scenes)
    db = cfg.storage.dir / "outbox.db"
    log = tmp_path / "daemon1.log"
    with open(log, "wb") as err:
        daemon = spawn_daemon(cfg.path, err)
        try:
            assert wait_until(lambda: _depth_or_zero(db) >= len(scenes), 60), log.read_text()
        finally:
            daemon.send_signal(signal.SIGKILL)
            daemon.wait(10)
    assert daemon.returncode == -signal.SIGKILL
    # After the crash, start the broker and the daemon again on frames with no codes in them.
    empty = tmp_path / "empty-frames"
    empty.mkdir()
    rng = np.random.default_rng(11)
    for i in range(20):
        cv2.imwrite(str(empty / f"{i:03d}.png"), synth.render_empty(rng))
    with broker, Subscriber(broker, "gate/+/+/checkin") as sub:
        path = tmp_path / "restart.toml"
        path.write_text(toml_text(toml_with(cfg.path, {"camera.source": f"dir:{empty}"})))
        result = subprocess.run(
            [sys.executable, "-m", "scanner", "run", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert wait_until(lambda: len(seqs(sub)) >= len(scenes), 20)
    assert sorted(seqs(sub)) == list(range(1, len(scenes) + 1))
    check_events(checkins(sub))
    assert outbox_depth(db) == 0


def test_sigterm_stops_cleanly_with_relay_off_and_offline(tmp_path):
    # One accept with a long pulse, then visitors (2 s a scene): SIGTERM lands while the relay
    # is energised, so the log shows when the stop dropped it (the pins are in the daemon).
    scenes = [("allowed", ALLOWED[0])] + [(f"person {i}", f"V-{i}") for i in range(1, 10)]
    with LocalBroker(tmp_path / "broker") as broker, Subscriber(broker, "gate/#") as sub:
        cfg = configure(tmp_path, broker.port, scenes, **{"gpio.relay_pulse_s": 9.0})
        log = tmp_path / "daemon.log"
        with open(log, "wb") as err:
            daemon = spawn_daemon(cfg.path, err)
            try:
                assert wait_until(lambda: b"relay on" in log.read_bytes(), 30), log.read_text()
                assert wait_until(lambda: len(checkins(sub)) >= 1, 30), log.read_text()
                daemon.send_signal(signal.SIGTERM)
                assert daemon.wait(30) == 0, log.read_text()
            finally:
                if daemon.poll() is None:
                    daemon.kill()
        assert sub.wait_payload(cfg.topic("availability"), b"offline", 10)
    lines = log.read_text().splitlines()

    def first(text: str, after: int = -1) -> int:
        return next((i for i, line in enumerate(lines) if i > after and text in line), len(lines))

    on, stopping = first("relay on"), first("received SIGTERM")
    assert on < stopping < len(lines), "SIGTERM must land while the relay is energised"
    off = first("relay off", after=on)
    # Off first: before the link is closed, and so before the joins, the camera and the drain.
    assert stopping < off < first("mqtt link to", after=stopping), "\n".join(lines[on:])
    # Everything committed before the stop was sent (or stays in the outbox for the next run).
    committed = sum(" seq=" in line for line in lines)
    assert len(seqs(sub)) + outbox_depth(cfg.storage.dir / "outbox.db") == committed


def test_no_personal_data_in_the_log_or_on_mqtt_at_any_level(tmp_path):
    # A CCCD card, a signed DCC and plain codes go through the real daemon (a subprocess, as
    # systemd runs it) with debug logging; neither its output nor anything it publishes may
    # hold a raw code, an ID number, a name, a date of birth or an address.
    health = signed_dcc(tmp_path)
    plain_ok, plain_denied = "BADGE-Q7X4ZK", "BADGE-DENY-9R2W"
    scenes = (
        ("badge", plain_ok),
        ("ID card", CCCD_CARD),
        ("health certificate", health.payload),
        ("banned badge", plain_denied),
        ("random bytes", RANDOM_BYTES),
    )
    with LocalBroker(tmp_path / "broker") as broker, Subscriber(broker, "gate/#") as sub:
        path = write_demo_files(tmp_path, broker_port=broker.port, scenes=scenes, fps=40.0)
        table = toml_with(
            path,
            {
                "policy.accept": ["signed", "dcc", "cccd", "plain"],
                "policy.dcc_trust_file": str(health.trust_file),
                "daemon.log_level": "debug",
            },
        )
        del table["policy"]["allowlist_file"]  # so that every readable code is let in
        (tmp_path / "deny.txt").write_text(f"{plain_denied}\n")
        path.write_text(toml_text(table))
        cfg = config_mod.load(path)
        result = subprocess.run(
            [sys.executable, "-m", "scanner", "run", "--config", str(path)],
            capture_output=True,
            timeout=120,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output.decode(errors="replace")[-3000:]
        assert wait_until(lambda: len(checkins(sub)) >= len(scenes), 10), checkins(sub)
        assert sub.wait_payload(cfg.topic("availability"), b"offline", 10)
    received = checkins(sub)
    check_events(received)
    # Each code was read and judged: the personal data went through the daemon.
    assert [(e["credential"]["type"], e["reason"]) for e in received] == [
        ("plain", "ok"),
        ("cccd", "ok"),
        ("dcc", "ok"),
        ("plain", "denylisted"),
        ("unknown", "unknown_format"),
    ]
    assert all(e["credential"].get("subject") for e in received[:4])
    log_text = output.decode("utf-8", errors="replace")
    assert " DEBUG " in log_text  # the level that would show the most was on
    published = b"".join(sub.payloads()).decode("utf-8", errors="replace")
    personal = (plain_ok, plain_denied, *CCCD_PERSONAL, *health.personal)
    raw_codes = (CCCD_CARD, health.payload, health.payload[4:40], RANDOM_BYTES)
    for secret in personal + raw_codes:
        for form in spellings(secret):
            assert form not in log_text, f"{secret!r} is in the daemon's log as {form!r}"
            assert form not in published, f"{secret!r} was published as {form!r}"


def test_demo_command_runs_end_to_end():
    result = subprocess.run(
        [sys.executable, "-m", "scanner", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    out = result.stdout
    assert "relay on" in out
    assert out.count("subscriber ← checkin") == len(DEMO_SCENES) + len(EXIT_SCENES) + len(RETRY_SCENES)
    for reason in ("denylisted", "not_allowlisted", "unknown_format", "expired"):
        assert f"reason={reason}" in out
    assert "accepted reason=ok type=signed" in out
    # The site holds two: the third is turned away, someone leaves, and then the third gets in.
    checkins = [line for line in out.splitlines() if line.startswith("subscriber ← checkin")]
    turned_away = next(line for line in checkins if "reason=capacity_full" in line)
    subject = turned_away.split("subject=")[1].split()[0]
    later = checkins[checkins.index(turned_away) + 1 :]
    assert [("accepted reason=ok" in line, subject in line) for line in later] == [
        (True, False),
        (True, True),
    ], out[-6000:]
    assert "the site has 1 inside (cap 2)" in out and out.count("the site has 2 inside (cap 2)") >= 2


def outbox_depth(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        return conn.execute("select count(*) from outbox").fetchone()[0]


def _depth_or_zero(db: Path) -> int:
    try:
        return outbox_depth(db)
    except sqlite3.Error:  # the daemon is still creating it
        return 0


@pytest.fixture(autouse=True)
def _no_system_notify(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    _ = os.environ
