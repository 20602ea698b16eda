"""A Pi that boots with its clock set back judges validity against what it has already seen."""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gpiozero.pins.mock import MockFactory

from scanner import events
from scanner.credentials.signed import PassIssuer, TrustedKey, TrustStore
from scanner.gate.app import App
from scanner.gate.decode import Decoder
from scanner.gate.lists import TrustData
from scanner.gate.outbox import Outbox
from scanner.gate.pipeline import Alarms, Gate
from scanner.gate.signals import Signals
from scanner.gate.timefloor import FLOOR_FILE, FlooredClock
from scanner.models import Reason
from scanner.sim import synth
from tests.helpers import FakeClock, make_config

TRUE_NOW = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)


class Sync:
    def __init__(self, synced: bool) -> None:
        self.synced = synced

    def __call__(self) -> bool:
        return self.synced


def test_a_reboot_with_the_clock_set_back_starts_from_the_floor_and_moves_on(tmp_path: Path) -> None:
    path = tmp_path / FLOOR_FILE
    sync = Sync(True)
    running = FakeClock(TRUE_NOW)
    clock = FlooredClock(running, path, synced=sync)
    assert clock.now() == TRUE_NOW and clock.floor is None  # no floor yet: the wall clock
    clock.maybe_save()
    assert json.loads(path.read_text())["floor"] == events.utc_ms(TRUE_NOW)
    # Power cut; the Pi boots with the time it had days ago, and no uplink.
    booted = FakeClock(TRUE_NOW - timedelta(days=3))
    sync.synced = False
    after = FlooredClock(booted, path, synced=sync)
    assert after.now() == TRUE_NOW
    booted.advance(90)
    assert after.now() == TRUE_NOW + timedelta(seconds=90)  # time the gate has run is real
    # Once NTP answers, its time is taken as it is.
    sync.synced = True
    assert after.now() == TRUE_NOW - timedelta(days=3) + timedelta(seconds=90)


def test_an_unsynchronised_clock_ahead_is_used_but_never_written(tmp_path: Path) -> None:
    path = tmp_path / FLOOR_FILE
    sync = Sync(True)
    FlooredClock(FakeClock(TRUE_NOW), path, synced=sync).save()
    sync.synced = False
    ahead = FakeClock(TRUE_NOW + timedelta(days=400))
    clock = FlooredClock(ahead, path, synced=sync)
    assert clock.now() == ahead.wall  # it may be right
    ahead.advance(5)
    clock.save()
    # What is kept is what is known: the floor plus the time run, not a year ahead.
    assert json.loads(path.read_text())["floor"] == events.utc_ms(TRUE_NOW + timedelta(seconds=5))


def test_the_floor_is_written_only_when_due_and_never_lowered(tmp_path: Path) -> None:
    path = tmp_path / FLOOR_FILE
    sync = Sync(True)
    wall = FakeClock(TRUE_NOW)
    clock = FlooredClock(wall, path, synced=sync, save_every_s=600)
    clock.maybe_save()
    first = path.stat().st_mtime_ns
    wall.advance(599)
    clock.maybe_save()
    assert path.stat().st_mtime_ns == first  # not due: no write on an SD card
    wall.advance(2)
    wall.wall -= timedelta(hours=1)  # NTP stepped the clock back meanwhile
    clock.maybe_save()
    assert json.loads(path.read_text())["floor"] == events.utc_ms(TRUE_NOW + timedelta(seconds=601))


def test_a_damaged_floor_falls_back_to_when_it_was_written(tmp_path: Path) -> None:
    path = tmp_path / FLOOR_FILE
    path.write_text('{"schema": "something else"}')
    stamp = TRUE_NOW.timestamp()
    os.utime(path, (stamp, stamp))
    clock = FlooredClock(FakeClock(TRUE_NOW - timedelta(days=30)), path, synced=Sync(False))
    assert clock.now() == TRUE_NOW


def test_a_pass_that_expired_before_the_floor_is_expired_whatever_the_clock_says(tmp_path: Path) -> None:
    key, kid = Ed25519PrivateKey.generate(), bytes.fromhex("0f100f10")
    trust = TrustData(
        pass_trust=TrustStore.of([TrustedKey(kid, key.public_key(), "t")], version=1, issued=TRUE_NOW)
    )
    # Expired an hour before the gate last knew the time; the gate then rebooted a day back.
    expired = PassIssuer(key, kid).issue(
        b"EMP-7", TRUE_NOW - timedelta(days=5), TRUE_NOW - timedelta(hours=1)
    )
    cfg = make_config(tmp_path, policy={"anti_passback_s": 0.0})
    FlooredClock(FakeClock(TRUE_NOW), tmp_path / FLOOR_FILE, synced=Sync(True)).save()
    set_back = FakeClock(TRUE_NOW - timedelta(days=1))
    (tmp_path / "state").mkdir()
    factory = MockFactory()
    outbox = Outbox(tmp_path / "state" / "outbox.db", 100)
    try:
        with Signals(cfg.gpio, pin_factory=factory) as signals:
            for clock, reason in (
                (set_back, Reason.OK),  # what a gate without a floor decided
                (FlooredClock(set_back, tmp_path / FLOOR_FILE, synced=Sync(False)), Reason.EXPIRED),
            ):
                gate = Gate(
                    cfg,
                    decoder=Decoder(("zxing",)),
                    outbox=outbox,
                    signals=signals,
                    pseudonymizer=events.Pseudonymizer(b"k" * 32),
                    clock=clock,
                    alarms=Alarms(),
                    trust=trust,
                    clock_synced=lambda: False,
                )
                outcome = gate._scan(expired.encode())
                assert outcome.decision.reason == reason
    finally:
        outbox.close()
        factory.close()


def test_the_daemon_judges_on_the_floor_after_a_reboot_with_its_clock_set_back(tmp_path: Path) -> None:
    key, kid = Ed25519PrivateKey.generate(), bytes.fromhex("0f100f10")
    store = TrustStore.of([TrustedKey(kid, key.public_key(), "t")], version=1, issued=TRUE_NOW)
    trust_file = tmp_path / "pass-trust.json"
    trust_file.write_text(json.dumps(store.to_json()))
    expired = PassIssuer(key, kid).issue(
        b"EMP-7", TRUE_NOW - timedelta(days=5), TRUE_NOW - timedelta(hours=1)
    )
    frames = tmp_path / "frames"
    frames.mkdir()
    image = synth.render_scene(expired, np.random.default_rng(7))
    for i in range(8):
        cv2.imwrite(str(frames / f"{i:03d}.png"), image)
    cfg = make_config(
        tmp_path,
        camera={"source": f"dir:{frames}", "fps": 20.0},
        decoder={"isolate": False},
        policy={"pass_trust_file": str(trust_file)},
        daemon={"drain_timeout_s": 0.1},
    )
    cfg.storage.dir.mkdir()
    # The gate last knew the true time; now it has rebooted with its clock a day behind.
    FlooredClock(FakeClock(TRUE_NOW), cfg.storage.dir / FLOOR_FILE, synced=Sync(True)).save()
    factory = MockFactory()
    try:
        app = App(
            cfg, pin_factory=factory, clock=FakeClock(TRUE_NOW - timedelta(days=1)), clock_synced=Sync(False)
        )
        assert app.run(threading.Event()) == 0
        relay = [s.state for s in factory.pin(cfg.gpio.relay_pin).states]
    finally:
        factory.close()
    with Outbox(cfg.storage.dir / "outbox.db", 100) as outbox:
        stored = [json.loads(payload) for _seq, payload in outbox.pending(limit=10)]
    assert [(e["decision"], e["reason"], e["clock_synced"]) for e in stored] == [
        ("rejected", "expired", False)
    ]
    assert stored[0]["ts"] >= events.utc_ms(TRUE_NOW)  # the record's time is not a day back either
    assert True not in relay
