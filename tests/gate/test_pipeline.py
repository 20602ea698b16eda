"""The scan path on its own (Gate): decision → committed event → signals, with a clock held still.

The daemon-level promises (the order of commit and relay, failing secure) are in test_app.py;
these pin down what each committed event says.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from gpiozero.pins.mock import MockFactory

from scanner import events
from scanner.gate.decode import Decoder
from scanner.gate.outbox import Outbox
from scanner.gate.pipeline import Alarms, Gate
from scanner.gate.signals import Signals
from scanner.models import Reason
from tests.helpers import make_config

# Far from the machine's clock: an event that took its time from anywhere else shows it.
SCANNED = datetime(2031, 5, 6, 7, 8, 9, 345_000, tzinfo=UTC)


class HeldClock:
    def __init__(self, now: datetime) -> None:
        self.wall = now
        self.mono = 1000.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[tuple[Gate, Outbox, HeldClock]]:
    cfg = make_config(tmp_path, gpio={"relay_pulse_s": 0.2}, policy={"anti_passback_s": 60.0})
    (tmp_path / "state").mkdir()
    outbox = Outbox(tmp_path / "state" / "outbox.db", 100)
    factory = MockFactory()
    clock = HeldClock(SCANNED)
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


def committed(outbox: Outbox) -> list[dict[str, object]]:
    return [json.loads(payload) for _seq, payload in outbox.pending()]


def uuid7_ms(event_id: str) -> int:
    return uuid.UUID(event_id).int >> 80


def test_every_event_id_carries_the_time_of_its_event(gate: tuple[Gate, Outbox, HeldClock]) -> None:
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


def test_every_decision_is_counted_by_its_reason(gate: tuple[Gate, Outbox, HeldClock]) -> None:
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
