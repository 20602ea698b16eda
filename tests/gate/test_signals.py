"""Relay, LED and buzzer behaviour on gpiozero MockFactory pins: whole pin histories, not samples."""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory, MockPin

from scanner import cli
from scanner.config import GpioConfig
from scanner.gate import relay_off
from scanner.gate.signals import PinFactoryError, Signals, force_relay_off, make_pin_factory
from tests.helpers import REPO, toml_text

RELAY, GREEN, RED, BUZZER = 17, 27, 22, 23
WAIT_S = 5.0  # upper bound for any wait below; normal runs take a fraction of it
# A thread never wakes early, so a pin may change at most EARLY_S (timer granularity) before
# its time: that bound stays tight. It may wake late by whatever the scheduler adds, and on a
# shared 2-core machine running other builds that has been seen well past 0.25 s, so lateness
# is allowed up to LATE_S. The pulse tests below keep relay_max_on_s far above pulse + LATE_S,
# so a pulse that runs on to the ceiling still fails them.
LATE_S = 0.6
EARLY_S = 0.02


class RecordingPin(MockPin):
    """MockPin that logs every claim/function/state write, in order, across all pins of its factory."""

    def __init__(self, factory: RecordingFactory, info: object) -> None:
        super().__init__(factory, info)
        factory.record(self, "claimed", None)

    def _set_function(self, value: str) -> None:
        self.factory.record(self, "function", value)
        super()._set_function(value)

    def _set_state(self, value: bool) -> None:
        self.factory.record(self, "state", bool(value))
        super()._set_state(value)


class RecordingFactory(MockFactory):
    def __init__(self, pin_class: type[RecordingPin] = RecordingPin) -> None:
        super().__init__(pin_class=pin_class)
        self.events: list[tuple[int, str, object]] = []
        self.changed = threading.Condition()

    def record(self, pin: MockPin, what: str, value: object) -> None:
        with self.changed:
            self.events.append((int(pin.info.name.removeprefix("GPIO")), what, value))
            self.changed.notify_all()

    def wait_until(self, predicate: Callable[[], bool], timeout: float = WAIT_S) -> bool:
        """Wait for a pin write that makes ``predicate`` true (the blink threads write pins)."""
        with self.changed:
            return self.changed.wait_for(predicate, timeout=timeout)

    def states(self, pin: int) -> list[bool]:
        return [s.state for s in self.pin(pin).states]


def assert_timing(pin: MockPin, expected: list[tuple[float, bool]]) -> None:
    """Like MockPin.assert_states_and_times (delays since the previous change), but lateness
    up to LATE_S is scheduling, not a defect; changing early is."""
    states = pin.states
    assert [s.state for s in states] == [v for _, v in expected], states
    for actual, (delay, _) in zip(states, expected, strict=True):
        assert delay - EARLY_S <= actual.timestamp <= delay + LATE_S, states


def change_times(pin: MockPin) -> list[float]:
    """The monotonic time of each entry of ``pin.states`` (MockPin keeps only the gaps)."""
    times = [pin._last_change]
    for state in reversed(pin.states[1:]):
        times.append(times[-1] - state.timestamp)
    return times[::-1]


def assert_pulse(pin: MockPin, first_accept: float, last_accept: float, pulse: float) -> None:
    """The relay's last on-off went on after the first accept and off ``pulse`` after the last.

    The pulse runs from the accept, not from the write that energised the relay: a relay
    thread that woke late shortens the time on, it never moves the end. So the end is timed
    from the accept, and the start only bounded (late by at most LATE_S).
    """
    assert [s.state for s in pin.states[-2:]] == [True, False], pin.states
    on_at, off_at = change_times(pin)[-2:]
    assert first_accept <= on_at <= first_accept + LATE_S, pin.states
    assert pulse - EARLY_S <= off_at - last_accept <= pulse + LATE_S, pin.states


class FastSignals(Signals):
    """Same logic, pattern times shortened so the suite stays quick."""

    # The pulse logic cuts this long before the max on-time guard would. Signals caps it at a
    # tenth of relay_max_on_s, so it is only this wide where that is 3 s or more: then a relay
    # thread that wakes up to 0.3 s late on a loaded machine is still no guard trip.
    GUARD_MARGIN_S = 0.3
    REJECT_RED_S = 0.15
    FAULT_ON_S = 0.05
    FAULT_OFF_S = 0.1
    BEEP_S = 0.02
    BEEP_GAP_S = 0.02
    RELAY_GAP_S = 0.1


@pytest.fixture
def factory() -> Iterator[RecordingFactory]:
    f = RecordingFactory()
    try:
        yield f
    finally:
        f.close()


def gpio(**kw: object) -> GpioConfig:
    # The ceiling far above any pulse here: a pulse that does not end on time runs on to it.
    values: dict[str, object] = {"pin_factory": "mock", "relay_pulse_s": 0.2, "relay_max_on_s": 5.0}
    values.update(kw)
    return GpioConfig(**values)  # type: ignore[arg-type]


def on_durations(pin: MockPin) -> tuple[list[float], list[float]]:
    """(on durations, off gaps between energisings) of an active-high pin's history."""
    ons, gaps = [], []
    states = pin.states
    for i in range(1, len(states) - 1):
        if states[i].state and not states[i + 1].state:
            ons.append(states[i + 1].timestamp)
        if not states[i].state and states[i + 1].state:
            gaps.append(states[i + 1].timestamp)
    return ons, gaps


@pytest.mark.parametrize("active_high", [True, False])
def test_relay_is_driven_off_before_any_other_pin_is_touched(
    factory: RecordingFactory, active_high: bool
) -> None:
    with Signals(gpio(relay_active_high=active_high), pin_factory=factory):
        first_other = next(i for i, e in enumerate(factory.events) if e[0] != RELAY)
        relay_events = factory.events[:first_other]
        off_level = not active_high
        assert relay_events == [
            (RELAY, "claimed", None),
            (RELAY, "function", "output"),
            (RELAY, "state", off_level),
        ]
        # A fresh mock pin reads low, so an active-low relay shows one write: to high (off).
        assert factory.states(RELAY) == ([False] if active_high else [False, True])
        # Then each indicator is claimed and written off too: a pin left high by a killed
        # daemon must not keep a green light (or the buzzer) on at start.
        for pin in (GREEN, RED, BUZZER):
            mine = [(what, value) for p, what, value in factory.events if p == pin]
            assert mine[:3] == [("claimed", None), ("function", "output"), ("state", False)], (pin, mine)
    assert factory.states(RELAY) == ([False] if active_high else [False, True])


@pytest.mark.parametrize("wiring", [{"red_pin": GREEN}, {"green_pin": RELAY}, {"buzzer_pin": RED}])
def test_a_pin_that_cannot_be_claimed_leaves_the_relay_off_and_released_and_says_only_that(
    factory: RecordingFactory, caplog: pytest.LogCaptureFixture, wiring: dict[str, int]
) -> None:
    caplog.set_level(logging.DEBUG, logger="scanner.gate.signals")
    with pytest.raises(Exception, match="in use"):
        Signals(gpio(**wiring), pin_factory=factory)  # two outputs on one pin: a wiring mistake
    assert factory.states(RELAY) == [False]
    assert factory.pin(RELAY).function == "input"  # released: a restarted gate can claim it
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no noise besides the error


def test_accept_is_exactly_one_pulse_with_green_and_one_beep(
    factory: RecordingFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="scanner.gate.signals")
    with FastSignals(gpio(relay_pulse_s=0.2), pin_factory=factory) as signals:
        relay = factory.pin(RELAY)
        relay.clear_states()
        accepted_at = time.monotonic()
        signals.accepted()
        assert factory.wait_until(lambda: len(relay.states) >= 3)
        assert factory.wait_until(lambda: factory.states(BUZZER) == [False, True, False])
        assert factory.wait_until(lambda: factory.states(GREEN) == [False, True, False])
        assert factory.states(RELAY) == [False, True, False]
        assert_pulse(relay, accepted_at, accepted_at, 0.2)
        assert_timing(factory.pin(GREEN), [(0.0, False), (0.0, True), (0.2, False)])
        assert factory.states(RED) == [False]
        assert signals.guard_trips == 0
    messages = [r.getMessage() for r in caplog.records if r.name == "scanner.gate.signals"]
    assert "relay on (pulse 0.2 s)" in messages
    assert "relay off" in messages


def test_reject_never_energises_the_relay(factory: RecordingFactory) -> None:
    with FastSignals(gpio(), pin_factory=factory) as signals:
        signals.rejected()
        assert factory.wait_until(lambda: factory.states(RED) == [False, True, False])
        assert factory.wait_until(lambda: factory.states(BUZZER) == [False] + [True, False] * 3)
        assert_timing(factory.pin(RED), [(0.0, False), (0.0, True), (0.15, False)])
    assert factory.states(RELAY) == [False]
    assert factory.states(GREEN) == [False]


def test_reject_during_a_pulse_lets_the_pulse_finish_but_drops_green(factory: RecordingFactory) -> None:
    with FastSignals(gpio(relay_pulse_s=0.3), pin_factory=factory) as signals:
        accepted_at = time.monotonic()
        signals.accepted()
        assert factory.wait_until(lambda: factory.states(RELAY) == [False, True])
        signals.rejected()
        assert factory.states(GREEN) == [False, True, False]
        assert factory.wait_until(lambda: factory.states(RELAY) == [False, True, False])
        assert_pulse(factory.pin(RELAY), accepted_at, accepted_at, 0.3)


def test_close_during_a_pulse_drops_the_relay_first(factory: RecordingFactory) -> None:
    signals = Signals(gpio(relay_pulse_s=5.0, relay_max_on_s=10.0), pin_factory=factory)
    signals.accepted()
    assert factory.wait_until(lambda: factory.states(RELAY) == [False, True])
    mark = len(factory.events)
    started = time.monotonic()
    signals.close()
    assert time.monotonic() - started < 5.0  # closing did not wait the 5 s pulse out
    assert factory.states(RELAY) == [False, True, False]
    assert factory.events[mark] == (RELAY, "state", False)
    assert factory.pin(RELAY).function == "input"  # released
    signals.close()  # idempotent
    signals.accepted()  # ignored after close, must not raise
    assert factory.states(RELAY) == [False, True, False]


def test_exception_inside_with_block_leaves_relay_off(factory: RecordingFactory) -> None:
    with (
        pytest.raises(RuntimeError, match="camera fell off"),
        Signals(gpio(relay_pulse_s=5.0, relay_max_on_s=10.0), pin_factory=factory) as signals,
    ):
        signals.accepted()
        assert factory.wait_until(lambda: factory.states(RELAY) == [False, True])
        raise RuntimeError("camera fell off")
    assert factory.states(RELAY) == [False, True, False]


def test_repeated_accepts_restart_the_pulse_but_never_exceed_max_on_time(
    factory: RecordingFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # 3 s: the shortest ceiling that leaves FastSignals its full 0.3 s guard margin. Pulses of
    # 1 s, so that only a test thread stalled for a whole second lets one end between accepts.
    max_on = 3.0
    caplog.set_level(logging.INFO, logger="scanner.gate.signals")
    with FastSignals(gpio(relay_pulse_s=1.0, relay_max_on_s=max_on), pin_factory=factory) as signals:
        relay = factory.pin(RELAY)
        relay.clear_states()
        tick = threading.Event()
        # A queue: someone accepted every 50 ms until the relay has been cut at the ceiling
        # and energised again for the next person.
        deadline = time.monotonic() + 3 * max_on
        while time.monotonic() < deadline and not on_durations(relay)[1]:
            signals.accepted()
            tick.wait(0.05)
        ons, gaps = on_durations(relay)
        assert relay.state, relay.states  # the queue kept being served after the cut
        assert signals.guard_trips == 0  # the pulse logic kept the ceiling, not the guard
    assert len(ons) == 1 and len(gaps) == 1, relay.states
    # A user-space thread cannot switch a pin at an exact instant: the ceiling holds up to the
    # scheduler's wake-up delay (the guard test shows the guard holds it when the pulse logic
    # does not). A pulse that ignored the ceiling would have run for the whole queue.
    assert ons[0] <= max_on + LATE_S, ons
    # Restarts did extend the first pulse up to the pulse logic's ceiling (timed from the
    # write that energised it, which a loaded machine can delay: hence LATE_S).
    assert ons[0] >= max_on - FastSignals.GUARD_MARGIN_S - LATE_S, ons
    assert gaps[0] >= FastSignals.RELAY_GAP_S - EARLY_S, gaps
    # What the log says of it: the cut, then the next person's pulse, which is what is left of
    # the last accept's second (not the ceiling: the queue's accepts each want 1 s).
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("relay ")]
    cut = lines.index("relay off (max on-time reached)")
    after = [line for line in lines[cut + 1 :] if line.startswith("relay on")]
    assert after, lines
    pulse = float(after[0].removeprefix("relay on (pulse ").removesuffix(" s)"))
    assert 0.5 <= pulse <= 1.0, after


class SlowOffPin(RecordingPin):
    """A pin whose writes to low land late (a thread descheduled mid-write on a loaded board)."""

    def _set_state(self, value: bool) -> None:
        if not value and self.function == "output":
            time.sleep(0.08)
        super()._set_state(value)


def test_the_gap_after_a_cut_counts_from_when_the_relay_really_dropped() -> None:
    class LongGap(FastSignals):
        RELAY_GAP_S = 0.4

    factory = RecordingFactory(pin_class=SlowOffPin)
    try:
        with LongGap(gpio(relay_pulse_s=0.8, relay_max_on_s=1.0), pin_factory=factory) as signals:
            relay = factory.pin(RELAY)
            relay.clear_states()
            tick = threading.Event()
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and not on_durations(relay)[1]:
                signals.accepted()  # a queue, until the relay was cut and energised again
                tick.wait(0.05)
            ons, gaps = on_durations(relay)
    finally:
        factory.close()
    assert len(ons) == 1 and len(gaps) == 1, relay.states  # one cut, at the ceiling
    assert gaps[0] >= LongGap.RELAY_GAP_S - EARLY_S, gaps


def test_single_restart_extends_pulse_from_the_second_accept(factory: RecordingFactory) -> None:
    with FastSignals(gpio(relay_pulse_s=0.2), pin_factory=factory) as signals:
        relay = factory.pin(RELAY)
        relay.clear_states()
        first = time.monotonic()
        signals.accepted()
        threading.Event().wait(0.1)
        second = time.monotonic()
        signals.accepted()
        assert factory.wait_until(lambda: len(relay.states) >= 3)
        assert factory.states(RELAY) == [False, True, False]  # one pulse, extended
        assert_pulse(relay, first, second, 0.2)


def test_guard_forces_relay_off_when_pulse_logic_is_stuck(
    factory: RecordingFactory, caplog: pytest.LogCaptureFixture
) -> None:
    max_on = 0.3
    with Signals(gpio(relay_pulse_s=max_on, relay_max_on_s=max_on), pin_factory=factory) as signals:
        relay = factory.pin(RELAY)
        relay.clear_states()
        signals.accepted()
        assert factory.wait_until(lambda: relay.state)
        # Hold the pulse logic's lock: its thread can no longer switch the relay off.
        with signals._cond:
            assert factory.wait_until(lambda: not relay.state, timeout=max_on + 1.0)
            assert signals.guard_trips == 1
        assert factory.states(RELAY) == [False, True, False]
        assert_timing(relay, [(0.0, False), (0.0, True), (max_on, False)])
        assert relay.states[2].timestamp <= max_on + LATE_S
        # The guard keeps guarding: it wakes with nothing energised (its wait is a second),
        # the pulse logic works again, and the next stuck pulse is cut too.
        time.sleep(1.2)
        signals.accepted()
        assert factory.wait_until(lambda: relay.state)
        with signals._cond:
            assert factory.wait_until(lambda: not relay.state, timeout=max_on + 1.0)
            assert signals.guard_trips == 2
    assert any("max on-time guard" in r.getMessage() for r in caplog.records)


def test_one_accept_in_the_gap_after_a_cut_opens_once_the_gap_is_over(factory: RecordingFactory) -> None:
    class LongGap(FastSignals):
        RELAY_GAP_S = 0.3

    # 3 s: FastSignals' full 0.3 s guard margin, so a late relay thread is no guard trip.
    with LongGap(gpio(relay_pulse_s=1.0, relay_max_on_s=3.0), pin_factory=factory) as signals:
        relay = factory.pin(RELAY)
        signals.accepted()
        assert factory.wait_until(lambda: relay.state)
        tick = threading.Event()
        deadline = time.monotonic() + 6.0
        while relay.state and time.monotonic() < deadline:
            signals.accepted()  # a queue, until the ceiling cuts the relay
            tick.wait(0.05)
        assert not relay.state
        # Nobody else comes; the last accept still wants the door when the gap is over, and
        # nothing will wake the pulse logic for it: it must wake itself.
        assert factory.wait_until(lambda: relay.state, timeout=LongGap.RELAY_GAP_S + 1.0)
        # And that pulse is the pulse logic's own: it ends with the last accept's pulse (0.7 s
        # from here), long before the guard would cut it (3 s).
        assert factory.wait_until(lambda: not relay.state, timeout=2.0)
        assert signals.guard_trips == 0


def test_fault_pattern_blinks_and_clears(factory: RecordingFactory) -> None:
    with FastSignals(gpio(), pin_factory=factory) as signals:
        red = factory.pin(RED)
        red.clear_states()
        signals.set_fault(True)
        assert signals.faulty
        assert factory.wait_until(lambda: len(red.states) >= 6)
        assert factory.states(RED)[:6] == [False, True, False, True, False, True]
        assert_timing(
            red, [(0.0, False), (0.0, True), (0.05, False), (0.1, True), (0.05, False), (0.1, True)]
        )
        signals.set_fault(False)
        assert factory.wait_until(lambda: not red.state)
        settled = len(red.states)
        threading.Event().wait(0.3)  # two full fault periods: nothing may blink any more
        assert len(red.states) == settled
        assert factory.states(RELAY) == [False]


def test_reject_during_fault_restores_the_fault_pattern(factory: RecordingFactory) -> None:
    with FastSignals(gpio(), pin_factory=factory) as signals:
        red = factory.pin(RED)
        signals.set_fault(True)
        assert factory.wait_until(lambda: len(red.states) >= 3)
        red.clear_states()
        signals.rejected()
        # The reject shows a steady 0.15 s red, then the blink resumes on its own.
        assert factory.wait_until(lambda: len(red.states) >= 6)
        states = red.states
        steady = [s.timestamp for i, s in enumerate(states[1:], 1) if not s.state and states[i - 1].state]
        red_s = FastSignals.REJECT_RED_S
        assert any(red_s - EARLY_S <= t <= red_s + LATE_S for t in steady), states
        # After the steady red the fault blink is back: short flashes, again and again.
        first_steady = next(i for i, s in enumerate(states[1:], 1) if not s.state and states[i - 1].state)
        assert factory.wait_until(lambda: rising_edges_after(red, first_steady) >= 2)
        assert all(d < red_s for d in on_times_after(red, first_steady)), red.states
        # Accepts during a fault leave the red pattern alone: it keeps blinking.
        signals.accepted()
        n = len(red.states)
        assert factory.wait_until(lambda: rising_edges_after(red, n) >= 2)
        assert signals.faulty
    assert factory.states(RELAY) == [False, True, False]


def test_an_accept_right_after_a_reject_puts_the_red_light_out_at_once(factory: RecordingFactory) -> None:
    with FastSignals(gpio(), pin_factory=factory) as signals:
        red = factory.pin(RED)
        signals.rejected()
        assert factory.wait_until(lambda: red.state)  # the previous person's red light
        signals.accepted()
        assert not red.state  # out before accepted() returned: this person walks through on green
        assert factory.wait_until(lambda: factory.pin(GREEN).state)
        # The reject's restore timer was cancelled: nothing writes the red pin when it would
        # have fired (a stale restore would restart a fault pattern shown meanwhile).
        writes = sum(1 for pin, what, _ in factory.events if pin == RED and what == "state")
        time.sleep(FastSignals.REJECT_RED_S + 0.2)
        assert sum(1 for pin, what, _ in factory.events if pin == RED and what == "state") == writes


def test_a_fault_during_a_reject_waits_for_the_steady_red_to_end(factory: RecordingFactory) -> None:
    with FastSignals(gpio(), pin_factory=factory) as signals:
        red = factory.pin(RED)
        signals.rejected()
        assert factory.wait_until(lambda: red.state)
        start = len(red.states) - 1
        signals.set_fault(True)
        # The steady red of the reject first, then the fault blink (short flashes).
        assert factory.wait_until(lambda: rising_edges_after(red, start) >= 2)
        first_on = on_times_after(red, start)[0]
        assert first_on >= FastSignals.REJECT_RED_S - EARLY_S, red.states


def test_a_restore_that_lost_the_race_to_a_newer_reject_leaves_its_red_alone(
    factory: RecordingFactory,
) -> None:
    # The first reject's restore timer fires while a second reject is being shown (it waits for
    # the lock the second holds): it must not cut the second person's red light short.
    with FastSignals(gpio(), pin_factory=factory) as signals:
        red = factory.pin(RED)
        signals.rejected()
        first_timer = signals._restore_timer
        assert first_timer is not None
        with signals._cond:
            assert wait_for_frame(first_timer, "restore_red"), "the first restore never fired"
            signals.rejected()  # the second reject, while the first restore waits for the lock
            start = len(red.states) - 1
        assert factory.wait_until(lambda: len(red.states) > start + 1 and not red.state)
        assert [s.state for s in red.states[start:]][-2:] == [True, False]
        assert on_times_after(red, start)[-1] >= FastSignals.REJECT_RED_S - EARLY_S, red.states


def wait_for_frame(thread: threading.Thread, name: str, timeout: float = WAIT_S) -> bool:
    """Wait until ``thread`` is inside a function whose name contains ``name``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame = sys._current_frames().get(thread.ident or -1)
        while frame is not None:
            if name in frame.f_code.co_name:
                return True
            frame = frame.f_back
        time.sleep(0.005)
    return False


def test_the_pattern_threads_are_named_daemons(factory: RecordingFactory) -> None:
    # Named, so a stack dump or the journal says whose thread it is; daemons, so one that is
    # waiting out a pattern never holds up the process at exit.
    with FastSignals(gpio(), pin_factory=factory) as signals:
        signals.rejected()
        timer = signals._restore_timer
        assert timer is not None and timer.name == "red-restore" and timer.daemon
        threads = {t.name: t.daemon for t in (signals._controller, signals._guard)}
        assert threads == {"relay": True, "relay-guard": True}


def rising_edges_after(pin: MockPin, start: int) -> int:
    states = [s.state for s in pin.states[start:]]
    return sum(1 for a, b in itertools.pairwise(states) if b and not a)


def on_times_after(pin: MockPin, start: int) -> list[float]:
    """How long each completed on-period after ``states[start]`` lasted."""
    states = pin.states[start:]
    return [b.timestamp for a, b in itertools.pairwise(states) if a.state and not b.state]


def test_force_relay_off_drives_a_stuck_high_pin_low_and_touches_nothing_else(
    factory: RecordingFactory,
) -> None:
    pin = factory.pin(RELAY)
    pin.function = "output"
    pin.state = True  # what a SIGKILLed daemon may leave behind
    force_relay_off(gpio(relay_active_high=True), factory)
    assert factory.states(RELAY) == [False, True, False]
    assert pin.function == "input"  # released again
    assert {e[0] for e in factory.events} == {RELAY}


def test_force_relay_off_active_low(factory: RecordingFactory) -> None:
    pin = factory.pin(RELAY)
    pin.function = "output"
    pin.state = True
    pin.state = False  # active-low relay left energised
    force_relay_off(gpio(relay_active_high=False), factory)
    assert factory.states(RELAY) == [False, True, False, True]


def relay_off_config(tmp_path: Path, **gpio_keys: object) -> Path:
    path = tmp_path / "gate.toml"
    table = {
        "device": {"id": "gate-r", "site": "site-r"},
        "gpio": {"pin_factory": "mock", "relay_pin": RELAY, **gpio_keys},
        "storage": {"dir": str(tmp_path / "state")},
    }
    path.write_text(toml_text(table))
    return path


@pytest.mark.parametrize("active_high", [True, False])
def test_the_relay_off_command_drives_a_relay_left_energised_off(
    tmp_path: Path, factory: RecordingFactory, monkeypatch: pytest.MonkeyPatch, active_high: bool
) -> None:
    # What systemd's ExecStopPost runs after a SIGKILL: the daemon is gone, the pin it left
    # energised must be driven off, and no other pin on the header touched.
    pin = factory.pin(RELAY)
    pin.function = "output"
    pin.state = active_high  # energised, as a killed daemon left it
    before = [s.state for s in pin.states]
    # The hardware seam: the command builds its pin factory from the config; hand it ours.
    monkeypatch.setattr(relay_off, "make_pin_factory", lambda name: factory if name == "mock" else None)
    config = relay_off_config(tmp_path, relay_active_high=active_high)
    assert cli.main(["relay-off", "--config", str(config)]) == 0
    assert [s.state for s in pin.states] == [*before, not active_high]
    assert pin.function == "input"  # released again: the pull resistor holds it off from here
    assert {e[0] for e in factory.events} == {RELAY}


def test_the_relay_off_command_never_energises_a_relay_that_is_off(
    tmp_path: Path, factory: RecordingFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It also runs after every clean stop, with the relay already off: not even a glitch.
    pin = factory.pin(RELAY)
    monkeypatch.setattr(relay_off, "make_pin_factory", lambda name: factory)
    assert cli.main(["relay-off", "--config", str(relay_off_config(tmp_path))]) == 0
    assert [s.state for s in pin.states] == [False]
    assert [e[2] for e in factory.events if e[1] == "state"] == [False, False]


def test_the_relay_off_command_as_systemd_runs_it(tmp_path: Path) -> None:
    config = relay_off_config(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "scanner", "relay-off", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"relay off (relay-off command, pin {RELAY})" in done.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[gpio]\nrelay_pin = 'seventeen'\n")
    done = subprocess.run(
        [sys.executable, "-m", "scanner", "relay-off", "--config", str(broken)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "gpio.relay_pin" in done.stderr


def test_make_pin_factory_mock_does_not_set_the_global() -> None:
    before = Device.pin_factory
    f = make_pin_factory("mock")
    try:
        assert isinstance(f, MockFactory)
        assert Device.pin_factory is before
    finally:
        f.close()


def test_make_pin_factory_auto_names_what_it_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    import scanner.gate.signals as signals_module

    def broken(name: str) -> object:
        raise OSError(f"no {name} here")

    monkeypatch.setattr(signals_module, "_load_factory", broken)
    # What a technician reads in the journal of a gate whose GPIO does not work.
    with pytest.raises(PinFactoryError) as info:
        make_pin_factory("auto")
    assert str(info.value) == (
        "no gpio pin factory works here; tried lgpio (OSError: no lgpio here), "
        "rpigpio (OSError: no rpigpio here), native (OSError: no native here). "
        'Not a Raspberry Pi? Use gpio.pin_factory = "mock".'
    )
    with pytest.raises(PinFactoryError) as info:
        make_pin_factory("lgpio")
    assert str(info.value) == "gpio pin factory 'lgpio' does not work here: no lgpio here"
    with pytest.raises(PinFactoryError) as info:
        make_pin_factory("bogus")
    assert str(info.value) == (
        "unknown gpio pin factory 'bogus'; choose auto, mock, lgpio, rpigpio, pigpio, native"
    )


def test_make_pin_factory_imports_the_factory_it_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real loader (the Pi's libraries are not here: gpiozero's mock factory stands in).
    import scanner.gate.signals as signals_module

    monkeypatch.setitem(signals_module._FACTORIES, "lgpio", ("gpiozero.pins.mock", "MockFactory"))
    made = make_pin_factory("lgpio")
    try:
        assert type(made) is MockFactory
    finally:
        made.close()


def test_make_pin_factory_auto_picks_first_that_works(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import scanner.gate.signals as signals_module

    made = MockFactory()

    def fake(name: str) -> object:
        if name == "lgpio":
            raise ImportError("No module named 'lgpio'")
        return made

    monkeypatch.setattr(signals_module, "_load_factory", fake)
    caplog.set_level(logging.INFO, logger="scanner.gate.signals")
    try:
        assert make_pin_factory("auto") is made
        assert "gpio pin factory: rpigpio (auto)" in caplog.text
    finally:
        made.close()


# --- the door's edges: passage seen, fire release ----------------------------------------------


def test_a_passage_drops_the_relay_and_green_at_once_and_only_once(factory: RecordingFactory) -> None:
    with FastSignals(gpio(relay_pulse_s=2.0), pin_factory=factory) as signals:
        signals.accepted()
        assert factory.wait_until(lambda: factory.states(RELAY) == [False, True])
        signals.passage_seen()
        assert factory.states(RELAY) == [False, True, False]  # now, not at the end of the pulse
        assert factory.states(GREEN)[-1] is False
        signals.passage_seen()  # a second person through the same opening changes nothing
        time.sleep(0.1)
        assert factory.states(RELAY) == [False, True, False]
        signals.accepted()  # the next accept opens again
        assert factory.wait_until(lambda: factory.states(RELAY) == [False, True, False, True])


def test_a_passage_with_the_relay_off_writes_nothing(factory: RecordingFactory) -> None:
    with FastSignals(gpio(), pin_factory=factory) as signals:
        signals.passage_seen()
        time.sleep(0.1)
        assert factory.states(RELAY) == [False]


def test_fire_holds_the_relay_flashes_both_leds_and_clears(factory: RecordingFactory) -> None:
    with FastSignals(gpio(relay_max_on_s=1.0), pin_factory=factory) as signals:
        signals.set_fire(True)
        assert factory.states(RELAY) == [False, True]
        signals.set_fire(True)  # the same state again: no new write
        signals.passage_seen()  # people leaving through the released door never drop it
        assert factory.wait_until(lambda: len(factory.states(GREEN)) >= 4 and len(factory.states(RED)) >= 4)
        # Both LEDs flash with the fire pattern (delays since the previous change), together.
        assert_timing(factory.pin(GREEN), [(0.0, False), (0.0, True), (0.25, False), (0.25, True)])
        assert_timing(factory.pin(RED), [(0.0, False), (0.0, True), (0.25, False), (0.25, True)])
        time.sleep(1.2)  # past relay_max_on_s: the hold yields to no ceiling
        assert factory.states(RELAY) == [False, True] and signals.guard_trips == 0
        signals.set_fire(False)
        assert factory.states(RELAY) == [False, True, False]
        signals.set_fire(True)  # a second alarm holds it again
        assert factory.states(RELAY) == [False, True, False, True]


def test_fire_ending_during_an_accept_keeps_the_door_open_for_the_rest_of_its_pulse(
    factory: RecordingFactory,
) -> None:
    with FastSignals(gpio(relay_pulse_s=0.6, relay_max_on_s=5.0), pin_factory=factory) as signals:
        signals.set_fire(True)
        signals.accepted()
        signals.set_fire(False)
        relay = factory.pin(RELAY)
        assert relay.state  # still energised: the accept wants the door
        ended = time.monotonic()
        assert factory.wait_until(lambda: not relay.state)
        assert time.monotonic() - ended >= 0.4  # the pulse ran on, then dropped by itself


def test_relay_off_ends_a_fire_hold_and_a_later_alarm_holds_again(factory: RecordingFactory) -> None:
    with FastSignals(gpio(), pin_factory=factory) as signals:
        signals.set_fire(True)
        signals.relay_off()
        assert factory.states(RELAY) == [False, True, False]
        time.sleep(0.1)
        assert factory.states(RELAY) == [False, True, False]  # nothing energises it again
        signals.set_fire(True)
        assert factory.states(RELAY) == [False, True, False, True]


def test_at_start_no_led_lights_and_the_buzzer_is_silent(factory: RecordingFactory) -> None:
    with FastSignals(gpio(), pin_factory=factory) as signals:
        time.sleep(0.05)
        for pin in (GREEN, RED, BUZZER, RELAY):
            assert factory.states(pin) == [False], pin  # never on, not even for a moment
        assert signals.faulty is False and signals.fire is False and signals.relay_active is False
        writes = len(factory.events)
        signals.set_fault(False)  # what a gate says when its camera is fine: nothing to change
        signals.set_fire(False)  # and when the fire panel reads clear
        time.sleep(0.05)
        assert len(factory.events) == writes


def relay_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("relay ")]


def test_the_log_says_each_relay_change_once_with_its_cause(
    factory: RecordingFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="scanner.gate.signals")
    with FastSignals(gpio(relay_pulse_s=2.0), pin_factory=factory) as signals:
        signals.relay_off()  # already off: nothing changed, nothing to say
        signals.accepted()
        signals.passage_seen()
        signals.set_fire(True)
        signals.set_fire(False)
        signals.accepted()
        signals.relay_off()
        time.sleep(0.1)  # the pulse logic catches up with relay_off: already off, no second line
    assert relay_lines(caplog) == [
        "relay on (pulse 2.0 s)",
        "relay off (passage seen)",
        "relay on (fire: door held released)",
        "relay off (fire cleared)",
        "relay on (pulse 2.0 s)",
        "relay off",
    ]


def test_during_a_fire_an_accept_beeps_once_and_a_reject_three_times_and_the_leds_keep_flashing(
    factory: RecordingFactory,
) -> None:
    with FastSignals(gpio(), pin_factory=factory) as signals:
        signals.set_fire(True)
        buzzer = factory.pin(BUZZER)
        signals.accepted()
        assert factory.wait_until(lambda: len(buzzer.states) >= 3)
        time.sleep(0.2)  # a second beep would have come by now
        assert factory.states(BUZZER) == [False, True, False]
        signals.rejected()
        assert factory.wait_until(lambda: len(buzzer.states) >= 9)
        time.sleep(0.2)
        assert rising_edges_after(buzzer, 0) == 4
        # Green and red still flash together: neither an accept nor a reject took them over.
        green, red = factory.pin(GREEN), factory.pin(RED)
        n_green, n_red = len(green.states), len(red.states)
        assert factory.wait_until(lambda: rising_edges_after(green, n_green) >= 1)
        assert factory.wait_until(lambda: rising_edges_after(red, n_red) >= 1)


def test_a_beep_is_short_and_three_beeps_are_three_short_ones(factory: RecordingFactory) -> None:
    with FastSignals(gpio(), pin_factory=factory) as signals:
        buzzer = factory.pin(BUZZER)
        signals.rejected()
        assert factory.wait_until(lambda: len(buzzer.states) >= 7)
        beep, gap = FastSignals.BEEP_S, FastSignals.BEEP_GAP_S
        assert_timing(
            buzzer,
            [
                (0.0, False),
                (0.0, True),
                (beep, False),
                (gap, True),
                (beep, False),
                (gap, True),
                (beep, False),
            ],
        )


def test_after_a_fire_ends_scans_work_as_before(factory: RecordingFactory) -> None:
    with FastSignals(gpio(relay_pulse_s=0.2), pin_factory=factory) as signals:
        signals.set_fire(True)
        time.sleep(0.1)  # the relay thread sees the hold (and must still be there after it)
        signals.set_fire(False)
        assert signals.fire is False
        signals.set_fire(False)  # the panel says "clear" again: nothing moves
        assert factory.states(RELAY) == [False, True, False]
        accepted = time.monotonic()
        signals.accepted()
        assert factory.wait_until(lambda: factory.states(RELAY) == [False, True, False, True, False])
        assert_pulse(factory.pin(RELAY), accepted, accepted, 0.2)  # ended by the pulse logic
        assert signals.guard_trips == 0
        signals.rejected()
        assert factory.wait_until(lambda: factory.pin(RED).state)
        signals.set_fire(True)
        signals.relay_off()  # the operator's relay-off ends the hold: no fire any more
        assert signals.fire is False
        n = len(factory.states(RELAY))
        signals.set_fire(False)  # the panel's "clear" after that changes nothing
        time.sleep(0.05)
        assert len(factory.states(RELAY)) == n


def test_a_passage_before_the_relay_thread_has_run_still_drops_the_relay(factory: RecordingFactory) -> None:
    # The relay thread cannot run while the test holds the signals' lock: whatever accepted()
    # and set_fire(False) leave for it to do, passage_seen() must find and undo.
    with FastSignals(gpio(relay_pulse_s=2.0), pin_factory=factory) as signals:
        with signals._cond:
            signals.accepted()
            signals.passage_seen()
        time.sleep(0.2)
        assert factory.states(RELAY) == [False, True, False]
        with signals._cond:
            signals.set_fire(True)
            signals.accepted()
            signals.set_fire(False)  # the accept still wants the door: energised afresh
            signals.passage_seen()
        time.sleep(0.2)
        assert factory.states(RELAY) == [False, True, False, True, False]
        assert signals.guard_trips == 0


def test_showing_a_fault_twice_is_one_indication(
    factory: RecordingFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="scanner.gate.signals")
    with FastSignals(gpio(), pin_factory=factory) as signals:
        signals.set_fault(True)
        red = factory.pin(RED)
        assert factory.wait_until(lambda: rising_edges_after(red, 0) >= 1)
        signals.set_fault(True)
        signals.set_fault(False)
        signals.set_fault(False)
    assert [r.getMessage() for r in caplog.records] == ["fault indication on", "fault indication off"]


def test_after_close_every_call_does_nothing_and_raises_nothing(factory: RecordingFactory) -> None:
    signals = FastSignals(gpio(), pin_factory=factory)
    signals.close()
    signals.accepted()
    signals.rejected()
    signals.set_fault(True)
    signals.set_fire(True)
    signals.passage_seen()
    signals.relay_off()
    signals.close()
    assert not signals.relay_active and not signals.faulty and not signals.fire


def test_close_ends_both_relay_threads_before_it_returns() -> None:
    # Slow writes to low: the relay thread's own last write (it leaves with a pulse running)
    # takes long enough that a close that did not wait for it would return first.
    factory = RecordingFactory(pin_class=SlowOffPin)
    try:
        signals = FastSignals(gpio(relay_pulse_s=2.0), pin_factory=factory)
        signals.accepted()
        time.sleep(0.1)  # the relay thread is waiting out the pulse: close must wake it
        signals.close()
        assert not signals._controller.is_alive() and not signals._guard.is_alive()
        assert factory.states(RELAY)[:3] == [False, True, False]
        assert signals._relay.closed and all(
            d is not None and d.closed for d in (signals._green, signals._red)
        )
    finally:
        factory.close()


@pytest.mark.parametrize(
    ("cls", "max_on", "ceiling"),
    [(FastSignals, 1.0, 0.9), (FastSignals, 5.0, 4.7), (Signals, 0.1, 0.09), (Signals, 5.0, 4.98)],
)
def test_the_pulse_logic_stops_a_margin_before_the_guard(
    factory: RecordingFactory, cls: type[Signals], max_on: float, ceiling: float
) -> None:
    # The margin is GUARD_MARGIN_S, or a tenth of relay_max_on_s when that is shorter: the
    # pulse logic must always act before the guard, and never cut a pulse much sooner.
    with cls(gpio(relay_max_on_s=max_on, relay_pulse_s=min(0.2, max_on)), pin_factory=factory) as signals:
        assert signals._ceiling_s == pytest.approx(ceiling)


def test_close_with_the_pulse_logic_stuck_drops_the_relay_at_once_and_still_returns(
    factory: RecordingFactory,
) -> None:
    signals = FastSignals(gpio(relay_pulse_s=2.0), pin_factory=factory)
    signals.accepted()
    stuck, release = threading.Event(), threading.Event()

    def hog() -> None:  # a pulse logic that never lets go of its lock
        with signals._cond:
            stuck.set()
            release.wait(20)

    thread = threading.Thread(target=hog, daemon=True)
    thread.start()
    assert stuck.wait(WAIT_S)
    try:
        start = time.monotonic()
        closer = threading.Thread(target=signals.close, daemon=True)
        closer.start()
        assert factory.wait_until(lambda: factory.states(RELAY) == [False, True, False])
        assert time.monotonic() - start < 0.5  # off first, whatever holds the lock
        # Bounded: a second for the lock, a second per thread (10 s would be a close that
        # waits for the stuck logic, which systemd's stop timeout would then kill).
        closer.join(10)
        assert not closer.is_alive() and time.monotonic() - start < 5.0
    finally:
        release.set()
        thread.join(5)


def test_a_guard_whose_first_cut_fails_tries_again(
    factory: RecordingFactory, caplog: pytest.LogCaptureFixture
) -> None:
    max_on = 0.3
    with Signals(gpio(relay_pulse_s=max_on, relay_max_on_s=max_on), pin_factory=factory) as signals:
        relay = factory.pin(RELAY)
        real_off = signals._relay.off
        failures = [OSError("GPIO write failed")]  # a glitch on the first try only

        def flaky_off() -> None:
            if failures:
                raise failures.pop()
            real_off()

        signals.accepted()
        assert factory.wait_until(lambda: relay.state)
        with signals._cond:  # the pulse logic is stuck: only the guard can cut
            signals._relay.off = flaky_off  # type: ignore[method-assign]
            assert factory.wait_until(lambda: not relay.state, timeout=max_on + 1.0)
            assert signals.guard_trips == 1 and not failures
        signals._relay.off = real_off  # type: ignore[method-assign]
    assert "relay guard could not drive the relay off" in caplog.text
