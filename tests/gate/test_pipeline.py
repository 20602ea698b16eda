"""The scan path on its own (Gate): decision → committed event → signals, with a clock held still.

The daemon-level promises (the order of commit and relay, failing secure) are in test_app.py;
these pin down what each committed event says.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from gpiozero.pins.mock import MockFactory

from scanner import events
from scanner.gate.decode import Decoder
from scanner.gate.outbox import Outbox
from scanner.gate.pipeline import Alarms, Gate
from scanner.gate.signals import Signals
from scanner.models import Frame, Reason
from tests.helpers import FakeClock, make_config

# Far from the machine's clock: an event that took its time from anywhere else shows it.
SCANNED = datetime(2031, 5, 6, 7, 8, 9, 345_000, tzinfo=UTC)


@contextmanager
def built_gate(tmp_path: Path, anti_passback_s: float) -> Iterator[tuple[Gate, Outbox, FakeClock]]:
    cfg = make_config(tmp_path, gpio={"relay_pulse_s": 0.2}, policy={"anti_passback_s": anti_passback_s})
    (tmp_path / "state").mkdir()
    outbox = Outbox(tmp_path / "state" / "outbox.db", 100)
    factory = MockFactory()
    clock = FakeClock(SCANNED)
    try:
        with Signals(cfg.gpio, pin_factory=factory) as signals:
            yield (
                Gate(
                    cfg,
                    decoder=Decoder(("zxing",)),
                    outbox=outbox,
                    signals=signals,
                    pseudonymizer=events.Pseudonymizer(b"k" * 32),
                    clock=clock,
                    alarms=Alarms(),
                    clock_synced=lambda: True,
                ),
                outbox,
                clock,
            )
    finally:
        outbox.close()
        factory.close()


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[tuple[Gate, Outbox, FakeClock]]:
    with built_gate(tmp_path, anti_passback_s=60.0) as built:
        yield built


def committed(outbox: Outbox) -> list[dict[str, object]]:
    return [json.loads(payload) for _seq, payload in outbox.pending()]


def uuid7_ms(event_id: str) -> int:
    return uuid.UUID(event_id).int >> 80


def test_every_event_id_carries_the_time_of_its_event(gate: tuple[Gate, Outbox, FakeClock]) -> None:
    # UUIDv7 ids sort by time: the time in the id is the scan's (or the open's), as in ``ts``,
    # not the moment the id was made, so ids and times agree whatever the clock did meanwhile.
    g, outbox, _clock = gate
    assert g.remote_open("1a2b3c4d")[0]
    g._scan(b"EMP-0001")
    opened, scan = committed(outbox)
    expected = int(SCANNED.timestamp() * 1000)
    assert scan["ts"] == opened["ts"] == "2031-05-06T07:08:09.345Z"
    assert uuid7_ms(str(scan["event_id"])) == uuid7_ms(str(opened["event_id"])) == expected
    assert opened["credential"] == {"type": "operator", "issuer": "1a2b3c4d"}
    assert opened["decision"] == "accepted" and opened["reason"] == "ok" and opened["clock_synced"] is True


def test_every_decision_is_counted_by_its_reason(gate: tuple[Gate, Outbox, FakeClock]) -> None:
    # The counters behind ``health.decisions``: every open and every scan, once each.
    g, outbox, clock = gate
    assert g.remote_open("1a2b3c4d")[0]
    assert g.remote_open("")[0]
    g._scan(b"EMP-0001")
    g._scan(b"EMP-0001")  # the same badge again at once: anti-passback
    clock.mono += 61.0  # past policy.anti_passback_s
    g._scan(b"EMP-0001")
    g._scan(b"\x00\x01")
    assert dict(g.reasons) == {Reason.OK: 4, Reason.ANTI_PASSBACK: 1, Reason.UNKNOWN_FORMAT: 1}
    assert [e["seq"] for e in committed(outbox)] == [1, 2, 3, 4, 5, 6]
    assert committed(outbox)[1]["credential"] == {"type": "operator"}  # no key id: no issuer


class SlowDecoder:
    """Takes a known time per frame (on the counter the pipeline times it by) and finds nothing."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.counter = 1000.0

    def perf_counter(self) -> float:
        return self.counter

    def decode(self, image: object) -> list[object]:
        self.counter += self.seconds
        return []


def test_each_frame_is_counted_and_its_decode_time_kept_in_ms(
    gate: tuple[Gate, Outbox, FakeClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    # health's fps and decode_ms come from these: a wrong unit or count misleads the operator.
    g, _outbox, _clock = gate
    decoder = SlowDecoder(0.02)
    g._decoder = decoder  # type: ignore[assignment]
    monkeypatch.setattr(time, "perf_counter", decoder.perf_counter)
    image = np.zeros((48, 64), np.uint8)
    for seq in range(3):
        assert g.process(Frame(image, seq, time.monotonic())) == []
    monkeypatch.undo()
    assert g.frames == 3
    assert g.decode_ms == pytest.approx([20.0, 20.0, 20.0])


def test_anti_passback_holds_for_a_window_of_a_second(tmp_path: Path) -> None:
    with built_gate(tmp_path, anti_passback_s=1.0) as (g, _outbox, clock):
        assert g._scan(b"EMP-0001").decision.reason == Reason.OK
        clock.mono += 0.5
        assert g._scan(b"EMP-0001").decision.reason == Reason.ANTI_PASSBACK
        clock.mono += 0.6
        assert g._scan(b"EMP-0001").decision.reason == Reason.OK


def test_a_busy_day_forgets_only_accepts_past_the_window(gate: tuple[Gate, Outbox, FakeClock]) -> None:
    # Past 4,096 remembered accepts the memory is pruned: what is older than the window goes,
    # a badge accepted a moment ago must still be refused.
    g, _outbox, clock = gate
    for n in range(4096):
        assert g._remember_accept(f"OLD-{n}".encode(), clock.mono)
    clock.mono += 61.0  # the old ones are past policy.anti_passback_s
    assert g._scan(b"EMP-0001").decision.reason == Reason.OK  # the 4,097th: pruning runs
    assert len(g._last_accept) == 1
    clock.mono += 1.0
    assert g._scan(b"EMP-0001").decision.reason == Reason.ANTI_PASSBACK


def test_the_outbox_recovering_keeps_the_fault_pattern_while_the_camera_is_still_down(
    gate: tuple[Gate, Outbox, FakeClock],
) -> None:
    g, _outbox, _clock = gate
    g._alarms.raise_("camera", "no frames for 5 s")
    g._alarms.raise_("outbox", "cannot record check-ins: disk full")
    g._signals.set_fault(True)
    g._scan(b"EMP-0001")  # recorded: the outbox works again
    assert "outbox" not in g._alarms.snapshot()
    assert g._signals.faulty  # one cause cleared, the other still shows
    g._alarms.clear("camera")
    g._alarms.raise_("outbox", "cannot record check-ins: disk full")
    g._scan(b"EMP-0002")
    assert not g._signals.faulty  # and with the last cause gone, the pattern goes
