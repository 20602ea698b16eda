"""App and Gate promises that no single module can keep alone."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from gpiozero.pins.mock import MockFactory

from scanner import config as config_mod
from scanner.gate.app import App
from scanner.gate.camera import CameraError
from scanner.gate.decode import Decoder
from scanner.gate.health import SystemdNotifier
from scanner.gate.outbox import Outbox
from scanner.gate.signals import Signals
from scanner.models import Frame, Reason
from tests.helpers import (
    CODE_FRAME,
    HeldSource,
    OrderCheckingSignals,
    energised_relay,
    make_config,
    make_gate,
    rising_edges,
)
from tests.mqtt_helpers import wait_until

APP = {
    # give_up_after_s = 0: the watchdog stops being fed as soon as the camera fails (the
    # grace period while it is being reopened is tested in test_camera_watchdog.py).
    "camera": {"fps": 50.0, "capture_timeout_s": 0.3, "give_up_after_s": 0.0},
    "gpio": {"relay_pulse_s": 0.2},
    "storage": {"outbox_max_events": 10},
    "daemon": {"drain_timeout_s": 0.5},
}


def app_config(tmp_path: Path, **sections: dict) -> config_mod.Config:
    return make_config(tmp_path, APP, **sections)


class ScriptedSource:
    """A camera that delivers ``frames`` frames, then stalls (every read times out) until stopped."""

    finite = False

    def __init__(self, frames: int, image: np.ndarray = CODE_FRAME) -> None:
        self._left = frames
        self._image = image
        self._seq = 0
        self.stalled = threading.Event()
        self._never = threading.Event()

    def open(self) -> None:
        pass

    def read(self, timeout: float) -> Frame | None:
        if self._left > 0:
            self._left -= 1
            self._seq += 1
            time.sleep(0.02)  # ~50 fps
            return Frame(self._image, self._seq, time.monotonic())
        self.stalled.set()
        self._never.wait(timeout)
        raise CameraError(f"no frame within {timeout} s")

    def close(self) -> None:
        pass


def test_ready_then_watchdog_only_while_frames_flow_and_fault_while_camera_is_down(tmp_path):
    sock_path = tmp_path / "notify.sock"
    received: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(0.05)
        notifier = SystemdNotifier({"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "100000"})
        cfg = app_config(tmp_path)
        factory = MockFactory()
        relay_history = energised_relay(factory, cfg.gpio)
        source = ScriptedSource(frames=60)
        app = App(cfg, pin_factory=factory, source=source, notifier=notifier)
        stop = threading.Event()
        runner = threading.Thread(target=app.run, args=(stop,), daemon=True)
        runner.start()

        def pump() -> None:
            with contextlib.suppress(TimeoutError):
                received.extend(sock.recv(4096).decode().split("\n"))

        try:
            assert wait_until(lambda: (pump(), "READY=1" in received)[1], 10)
            assert source.stalled.wait(10)
            assert wait_until(lambda: (pump(), app.camera_state == "failed")[1], 10)
            # Give the watchdog's alive() time to notice the stall, then count pings.
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                pump()
            pings_at_stall = received.count("WATCHDOG=1")
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                pump()
            assert received.count("WATCHDOG=1") == pings_at_stall, "watchdog fed while no frames flow"
            assert pings_at_stall > 0, "watchdog never fed while frames flowed"
            assert "camera" in app.alarms.snapshot()
            red = [s.state for s in factory.pin(cfg.gpio.red_pin).states]
            assert red.count(True) >= 1  # the slow fault blink has started
        finally:
            stop.set()
            runner.join(15)
            relay = relay_history()
            factory.close()
        assert not runner.is_alive()
        # Left energised, driven off at start, then one code, one pulse, and off at the end.
        assert relay == [True, False, True, False]


def test_the_event_is_durable_before_the_relay_moves(tmp_path):
    cfg = app_config(tmp_path)
    (tmp_path / "state").mkdir()
    outbox = Outbox(tmp_path / "state" / "outbox.db", 100)
    factory = MockFactory()
    try:
        with OrderCheckingSignals(cfg.gpio, pin_factory=factory, outbox=outbox) as signals:
            gate = make_gate(cfg, signals, outbox)
            (outcome,) = gate.process(Frame(CODE_FRAME, 1, 0.0))
            assert outcome.decision.accepted and outcome.seq == 1
            # A second process (another connection) already sees the row when the relay is asked.
            assert signals.depth_at_accept == [1]
    finally:
        outbox.close()
        factory.close()


def test_outbox_full_fails_secure_reject_fault_alarm_and_recovers(tmp_path):
    cfg = app_config(tmp_path)
    (tmp_path / "state").mkdir()
    outbox = Outbox(tmp_path / "state" / "outbox.db", 10)
    for _ in range(10):
        outbox.append(lambda seq, created: b"{}")
    factory = MockFactory()
    try:
        with Signals(cfg.gpio, pin_factory=factory) as signals:
            relay = factory.pin(cfg.gpio.relay_pin)
            buzzer = factory.pin(cfg.gpio.buzzer_pin)
            gate = make_gate(cfg, signals, outbox)
            (outcome,) = gate.process(Frame(CODE_FRAME, 1, 0.0))
            assert not outcome.decision.accepted and outcome.seq is None
            assert outcome.decision.reason == Reason.DEVICE_FAULT
            assert signals.faulty and "outbox" in gate._alarms.snapshot()
            assert gate._alarms.snapshot()["outbox"].startswith("cannot record check-ins: ")  # and why
            # The whole reject pattern (three beeps) plays out: a pulse asked for by the failed
            # scan would have started long before, and would have ended before the next scan,
            # so it cannot hide inside the recorded scan's pulse below.
            assert wait_until(lambda: rising_edges([s.state for s in buzzer.states]) == 3, 5)
            assert wait_until(lambda: not buzzer.state, 5)
            assert [s.state for s in relay.states] == [False], "the door opened without a record"
            # Space comes back (the publisher drained it): the next scan is recorded and the fault clears.
            outbox.remove(range(1, 11))
            (outcome,) = gate.process(Frame(CODE_FRAME, 2, 10.0))
            assert outcome.decision.accepted and outcome.seq == 11
            assert wait_until(lambda: signals.relay_active, 2)
            assert not signals.faulty and "outbox" not in gate._alarms.snapshot()
        # Only the recorded scan opened the door: one pulse, and it ended.
        assert [s.state for s in relay.states] == [False, True, False]
    finally:
        outbox.close()
        factory.close()


class ClosingSource(HeldSource):
    """A camera that notes the relay pin's level at the moment the daemon closes it."""

    def __init__(self, image, relay) -> None:
        super().__init__(image)
        self._relay = relay
        self.relay_at_close: list[bool] = []

    def close(self) -> None:
        self.relay_at_close.append(bool(self._relay.state))


def test_stop_drops_the_relay_before_anything_else_is_shut_down(tmp_path):
    # A long pulse is running when the stop comes. Shutting down takes seconds (threads
    # joined, the camera closed, the outbox drained towards a broker that may be gone): the
    # door must not stay released through all that, so the relay is the first thing to go.
    cfg = app_config(tmp_path, gpio={"relay_pulse_s": 8.0}, daemon={"drain_timeout_s": 2.0})
    factory = MockFactory()
    relay = factory.pin(cfg.gpio.relay_pin)
    source = ClosingSource(CODE_FRAME, relay)
    app = App(cfg, pin_factory=factory, source=source)
    stop = threading.Event()
    runner = threading.Thread(target=app.run, args=(stop,), daemon=True)
    runner.start()
    try:
        assert wait_until(lambda: relay.state, 10), "the accepted code never pulsed the relay"
        stop.set()
        runner.join(20)
        history = [s.state for s in relay.states]
    finally:
        stop.set()
        factory.close()
    assert not runner.is_alive()
    assert source.relay_at_close == [False], "the relay was still energised when the camera was closed"
    assert history == [False, True, False]


@pytest.mark.parametrize("payload", [b"\x00" * 50, b"A" * 1200, "Nguyễn Văn A".encode()])
def test_any_payload_is_a_decision_never_an_exception(tmp_path, payload):
    cfg = app_config(tmp_path)
    (tmp_path / "state").mkdir()
    outbox = Outbox(tmp_path / "state" / "outbox.db", 100)
    factory = MockFactory()
    try:
        with Signals(cfg.gpio, pin_factory=factory) as signals:
            gate = make_gate(cfg, signals, outbox)
            outcome = gate._scan(payload)
            assert outcome.seq == 1 and isinstance(outcome.decision.reason, Reason)
    finally:
        outbox.close()
        factory.close()


def test_a_missing_replay_folder_is_a_clear_runtime_error_not_a_silent_success(tmp_path):
    cfg = app_config(tmp_path, camera={"source": f"dir:{tmp_path / 'no-such-folder'}"})
    factory = MockFactory()
    try:
        code = App(cfg, pin_factory=factory).run(threading.Event())
    finally:
        factory.close()
    assert code == 1


def test_reload_swaps_lists_keeps_old_ones_on_error_and_publishes_ages(tmp_path):
    deny = tmp_path / "deny.txt"
    deny.write_text("# version: 1\n# issued: 2026-11-28T00:00:00Z\n")
    cfg = app_config(tmp_path, policy={"denylist_file": str(deny), "anti_passback_s": 0.0})
    (tmp_path / "state").mkdir()
    outbox = Outbox(tmp_path / "state" / "outbox.db", 100)
    factory = MockFactory()
    try:
        with Signals(cfg.gpio, pin_factory=factory) as signals:
            app = App(cfg, pin_factory=factory)
            app.gate = gate = make_gate(cfg, signals, outbox)
            assert gate._scan(b"EMP-0001").decision.reason == Reason.OK
            deny.write_text("# version: 2\n# issued: 2026-11-29T00:00:00Z\nEMP-0001\n")
            app._reload()
            assert gate._scan(b"EMP-0001").decision.reason == Reason.DENYLISTED
            assert app.status()["lists"]["denylist"]["version"] == "2"
            deny.write_text("# issued: not a time\n")
            app._reload()  # a broken file must not empty the deny list
            assert "lists" in app.alarms.snapshot()
            assert gate._scan(b"EMP-0001").decision.reason == Reason.DENYLISTED
    finally:
        outbox.close()
        factory.close()


def test_a_reload_that_started_earlier_never_puts_older_lists_back(tmp_path, monkeypatch):
    # SIGHUP starts a reload that reads the old files and is slow to finish (big lists, an SD
    # card); meanwhile a `lists` command replaces the files and reloads. The slow, older load
    # must not be swapped in after the newer one.
    from scanner.gate import lists

    deny = tmp_path / "deny.txt"
    deny.write_text("# version: 1\n")
    cfg = app_config(tmp_path, policy={"denylist_file": str(deny), "anti_passback_s": 0.0})
    (tmp_path / "state").mkdir()
    outbox = Outbox(tmp_path / "state" / "outbox.db", 100)
    real_load, first_read, release = lists.load, threading.Event(), threading.Event()

    def slow_first_load(config):
        trust = real_load(config)
        if not first_read.is_set():
            first_read.set()
            release.wait(5)  # the old lists are read; finishing takes a while
        return trust

    factory = MockFactory()
    try:
        with Signals(cfg.gpio, pin_factory=factory) as signals:
            app = App(cfg, pin_factory=factory)
            app.gate = gate = make_gate(cfg, signals, outbox)
            monkeypatch.setattr(lists, "load", slow_first_load)
            sighup = threading.Thread(target=app._reload)
            sighup.start()
            assert first_read.wait(5)
            deny.write_text("# version: 2\nEMP-0001\n")  # the command's new list
            command = threading.Thread(target=app._reload)
            command.start()
            time.sleep(0.2)  # without one-at-a-time, the command's reload finishes here, first
            release.set()
            sighup.join(5)
            command.join(5)
            assert gate.trust.deny is not None and gate.trust.deny.info.version == "2"
            assert gate._scan(b"EMP-0001").decision.reason == Reason.DENYLISTED
    finally:
        outbox.close()
        factory.close()


def test_anti_passback_rejects_a_second_accept_of_the_same_credential(tmp_path):
    cfg = app_config(tmp_path, policy={"anti_passback_s": 60.0})
    (tmp_path / "state").mkdir()
    outbox = Outbox(tmp_path / "state" / "outbox.db", 100)
    factory = MockFactory()
    try:
        with Signals(cfg.gpio, pin_factory=factory) as signals:
            gate = make_gate(cfg, signals, outbox)
            assert gate._scan(b"EMP-0001").decision.accepted
            assert gate._scan(b"EMP-0001").decision.reason == Reason.ANTI_PASSBACK
            assert gate._scan(b"EMP-0002").decision.accepted
            # One person, two encodings: the ID card's QR, then its number as a plain code.
            card = "079190001234|123456789|Nguyễn Văn A|01011990|Nam|Hà Nội|01012021".encode()
            assert gate._scan(card).decision.accepted
            assert gate._scan(b"079190001234").decision.reason == Reason.ANTI_PASSBACK
            assert gate._scan(b" " + card).decision.reason == Reason.ANTI_PASSBACK
    finally:
        outbox.close()
        factory.close()


def test_a_decoder_that_dies_on_every_frame_raises_an_alarm_then_exits_for_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each lost frame is an empty result, not an exception: without counting them the gate
    # would scan nothing while its camera, watchdog and LEDs all said it was fine.
    import scanner.gate.app as app_mod
    from tests import crashing_engine

    monkeypatch.setattr(app_mod, "DECODER_ALARM_AFTER", 3)
    monkeypatch.setattr(app_mod, "DECODER_GIVE_UP_AFTER", 8)
    monkeypatch.setattr(
        app_mod,
        "Decoder",
        lambda engines, isolate: Decoder(engines, isolate=True, engine=crashing_engine.factory),
    )
    factory = MockFactory()
    # Frames keep coming however slowly the worker respawns: identical frames are no frozen
    # camera here, and the source never runs dry before the decoder gives up.
    config = app_config(tmp_path, camera={"frozen_frames": 0})
    app = App(config, pin_factory=factory, source=ScriptedSource(1_000_000))
    stop, result = threading.Event(), []
    runner = threading.Thread(target=lambda: result.append(app.run(stop)), daemon=True)
    try:
        runner.start()
        runner.join(90)
        if runner.is_alive():  # never hang the suite: stop it and fail below
            stop.set()
            runner.join(15)
        relay = [s.state for s in factory.pin(config.gpio.relay_pin).states]
    finally:
        factory.close()
    assert result == [1], "the gate went on with a decoder that loses every frame"  # systemd restarts it
    assert "decoder" in app.alarms.snapshot()
    assert app.gate is not None and sum(app.gate.reasons.values()) == 0  # nothing was scanned
    assert True not in relay
