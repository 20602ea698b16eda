"""The door's inputs: passage, exit button, fire and tamper (README: The door).

Every input is a dry contact (or an opto-isolator's output) read by a gpiozero
``DigitalInputDevice`` on the pin factory the relay uses. ``door.pull_up`` says which rail the
contacts switch to; each input's ``*_contact`` says whether its contact is normally open or
normally closed, so "active" always means what the input reports (pressed, door open, fire,
enclosure open). The fire contact is always normally closed: a cut wire reads as fire.

Debounce is ours, not the pin factory's (lgpio delays every edge by its debounce time; the
mock factory ignores it): a change acts at once, further edges within ``door.debounce_s`` are
contact bounce, and the level is read again when that window ends, so a bounce can neither
add a press nor hide the final state.

Threads:

- gpiozero's edge callbacks (lgpio's alert thread on a Pi; the driving thread with
  ``MockFactory``) debounce and run the fast path: the exit button energises the relay and the
  fire input holds or releases it right there, waiting for neither the pipeline, the outbox
  nor the door thread. Nobody is ever locked in by a busy decoder or a full disk.
- the ``door`` thread owns everything else: which accepted events still wait for their
  passage, annulments at their deadline, forced passages, the door's alarms and counters, and
  committing the door's events through the gate (:class:`Recorder`).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Protocol

from gpiozero import DigitalInputDevice, Factory

from scanner.config import DoorConfig
from scanner.events import now_ms
from scanner.gate.signals import Signals

log = logging.getLogger(__name__)

# The door's inputs, as named in status, health, logs and the self-test.
PASSAGE: Final = "passage"
EXIT: Final = "exit"
FIRE: Final = "fire"
TAMPER: Final = "tamper"
# Health counters: passages seen and how often each door alarm was raised since start.
COUNTERS: Final = ("passages", "forced_passage", "door_held_open", "tamper", "fire")
# Door events waiting for the gate to be built (the door works from the first moment of a
# start, the gate only once the lists are loaded); bounded like every queue here.
_EARLY_EVENTS = 256


@dataclass(frozen=True, slots=True)
class Admission:
    """An accepted event the door expects someone to pass through, or else it is annulled."""

    event_id: str
    direction: str
    credential_type: str
    subject: str | None = None
    issuer: str | None = None
    # Anti-passback's key for this accept, so an annulment can forget it again.
    passback: bytes | None = field(default=None, repr=False)


class DoorError(RuntimeError):
    """A door input cannot be read (pin in use, no permission): names the key and the pin."""


class Recorder(Protocol):
    """What the door asks the gate to commit (:class:`scanner.gate.pipeline.Gate`).

    Each raises ``OutboxError`` when the event cannot be committed."""

    def record_exit(self) -> Admission: ...
    def record_forced(self) -> None: ...
    def record_annulment(self, admission: Admission) -> None: ...


class AlarmBoard(Protocol):
    def raise_(self, name: str, detail: str) -> None: ...
    def clear(self, name: str) -> None: ...


class Input:
    """One debounced door input: a dry contact between the pin and GND (``pull_up``, the
    internal pull-up holds the pin high while it is open) or 3.3 V (internal pull-down).

    ``on_change(input, active, at)`` runs on every accepted change, under this input's lock,
    so two changes of one input are never reported out of order."""

    def __init__(
        self,
        name: str,
        pin: int,
        *,
        normally_closed: bool,
        pull_up: bool,
        debounce_s: float,
        pin_factory: Factory,
        on_change: Callable[[Input, bool, float], None],
    ) -> None:
        self.name = name
        self.pin = pin
        self._nc = normally_closed
        self._debounce_s = debounce_s
        self._on_change = on_change
        self._lock = threading.Lock()
        self._quiet_until = 0.0
        #: When the level must be read again (the end of a debounce window); None: not needed.
        self.recheck_at: float | None = None
        # gpiozero's "active" is the contact closed (pulled to the other rail); ours follows
        # the contact's sense.
        self._device = DigitalInputDevice(pin, pull_up=pull_up, bounce_time=None, pin_factory=pin_factory)
        self.active = self.read()
        self._device.when_activated = self._contact_closed
        self._device.when_deactivated = self._contact_opened

    def read(self) -> bool:
        return bool(self._device.is_active) != self._nc

    def _contact_closed(self) -> None:
        self._edge(not self._nc)

    def _contact_opened(self) -> None:
        self._edge(self._nc)

    def _edge(self, active: bool) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._quiet_until or active == self.active:
                return  # bounce (read again when the window ends), or no change
            self._change(active, now)

    def recheck(self, now: float) -> None:
        """At the end of a debounce window: the level the contact settled at counts."""
        with self._lock:
            if self.recheck_at is None or now < self.recheck_at:
                return
            self.recheck_at = None
            active = self.read()
            if active != self.active:
                self._change(active, now)

    def _change(self, active: bool, now: float) -> None:
        self.active = active
        self._quiet_until = now + self._debounce_s
        self.recheck_at = self._quiet_until
        self._on_change(self, active, now)

    def close(self) -> None:
        self._device.close()


@dataclass(frozen=True, slots=True)
class _Change:
    name: str
    active: bool
    at: float
    initial: bool = False  # the level found at start, not an edge


@dataclass(frozen=True, slots=True)
class _Attach:
    recorder: Recorder


@dataclass(slots=True)
class _Credit:
    """One accept (or exit-button press) that a passage may use up before ``deadline``."""

    deadline: float
    admission: Admission | None  # None: an exit press whose event could not be committed


def _annul(recorder: Recorder, *, admission: Admission) -> None:
    recorder.record_annulment(admission)


class Door:
    """The door's inputs and what follows from them. A context manager; ``close()`` releases
    the input pins and never touches the relay (the app drives it off first)."""

    def __init__(
        self,
        config: DoorConfig,
        *,
        signals: Signals,
        alarms: AlarmBoard,
        pin_factory: Factory,
    ) -> None:
        self._config = config
        self._signals = signals
        self._alarms = alarms
        # None: stop.
        self._items: queue.SimpleQueue[_Change | Admission | _Attach | None] = queue.SimpleQueue()
        self._recorder: Recorder | None = None
        self._early: deque[Callable[[Recorder], None]] = deque(maxlen=_EARLY_EVENTS)
        self._credits: deque[_Credit] = deque()
        self._held_open_at: float | None = None  # when the open door becomes "held open"
        self._raised: set[str] = set()  # the door's alarms that are up
        self._closed = False
        self._close_lock = threading.Lock()
        # Every key from the start: the telemetry thread copies this dict while we count.
        self._counts = dict.fromkeys(COUNTERS, 0)
        self.inputs: dict[str, Input] = {}
        senses = {
            PASSAGE: (config.passage_pin, config.passage_contact == "nc"),
            EXIT: (config.exit_pin, config.exit_contact == "nc"),
            FIRE: (config.fire_pin, True),
            TAMPER: (config.tamper_pin, config.tamper_contact == "nc"),
        }
        for name, (pin, nc) in senses.items():
            if pin is None:
                continue
            try:
                self.inputs[name] = Input(
                    name,
                    pin,
                    normally_closed=nc,
                    pull_up=config.pull_up,
                    debounce_s=config.debounce_s,
                    pin_factory=pin_factory,
                    on_change=self._changed,
                )
            except Exception as exc:
                for made in self.inputs.values():
                    made.close()
                raise DoorError(
                    f"door.{name}_pin: pin {pin} cannot be read: {type(exc).__name__}: {exc}"
                ) from exc
        now = time.monotonic()
        fire = self.inputs.get(FIRE)
        if fire is not None and fire.active:
            signals.set_fire(True)  # a fire (or a cut fire wire) at start holds the door from the start
        for made in self.inputs.values():
            if made.active:
                self._items.put(_Change(made.name, True, now, initial=True))
        self._thread = threading.Thread(target=self._run, name="door", daemon=True)
        self._thread.start()

    # -- what others call -------------------------------------------------------------------

    def attach(self, recorder: Recorder) -> None:
        """The gate exists: commit through it from now on (and what waited for it)."""
        self._items.put(_Attach(recorder))

    def admitted(self, admission: Admission) -> None:
        """An accepted event is committed and the relay is about to open (any thread)."""
        if PASSAGE in self.inputs:
            self._items.put(admission)

    def counters(self) -> dict[str, int]:
        """Passages and door alarms raised since start (the ``door`` object of ``health``)."""
        return dict(self._counts)

    def close(self) -> None:
        """Stop the door thread and release the input pins. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._items.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        for made in self.inputs.values():
            try:
                made.close()
            except Exception:
                log.exception("closing door input %s failed", made.name)
        if self._early:
            log.error("%d door events were never recorded: the gate did not start", len(self._early))

    def __enter__(self) -> Door:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the fast path (gpiozero's callback thread, under the input's lock) --------------------

    def _changed(self, made: Input, active: bool, at: float) -> None:
        if made.name == EXIT and active:
            self._signals.accepted()  # the relay first; the record follows on the door thread
        elif made.name == FIRE:
            self._signals.set_fire(active)
        self._items.put(_Change(made.name, active, at))

    # -- the door thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item: _Change | Admission | _Attach | None = None
            try:
                item = self._items.get(timeout=self._wait_s())
                if item is None:
                    return
            except queue.Empty:
                pass  # a deadline came
            try:
                if isinstance(item, _Change):
                    self._handle(item)
                elif isinstance(item, Admission):
                    self._credits.append(_Credit(time.monotonic() + self._config.passage_timeout_s, item))
                elif isinstance(item, _Attach):
                    self._attach(item.recorder)
                self._due(time.monotonic())
            except Exception:  # the thread boundary: a bug here must not end the door's work
                log.exception("door: handling %r failed", item)

    def _wait_s(self) -> float:
        """Until the next deadline (an annulment, a debounce window, the door held open)."""
        deadlines = [self._credits[0].deadline] if self._credits else []
        deadlines += [i.recheck_at for i in self.inputs.values() if i.recheck_at is not None]
        held_at = self._held_open_at
        if held_at is not None and "door_held_open" not in self._raised and not self._signals.fire:
            deadlines.append(held_at)
        if not deadlines:
            return 1.0
        return min(1.0, max(0.0, min(deadlines) - time.monotonic()))

    def _handle(self, change: _Change) -> None:
        name, active = change.name, change.active
        if name == EXIT and active and not change.initial:
            self._exit_pressed(change.at)
        elif name == FIRE:
            self._set_alarm(
                FIRE,
                active,
                "fire input active (the panel's alarm, or a cut wire): the door is held released",
            )
        elif name == TAMPER:
            self._set_alarm(TAMPER, active, "the enclosure is open (tamper switch)")
        elif name == PASSAGE:
            if active:
                held = self._config.door_held_open_s
                self._held_open_at = change.at + held if held > 0 else None
                if not change.initial:
                    self._passage()
            else:
                self._held_open_at = None
                self._set_alarm("door_held_open", False, "")

    def _exit_pressed(self, at: float) -> None:
        log.info("exit button: door opened from inside")
        deadline = at + self._config.passage_timeout_s
        credit = _Credit(deadline, None)
        if PASSAGE in self.inputs:
            self._credits.append(credit)  # whatever the record does, the person may walk out

        def record(recorder: Recorder) -> None:
            credit.admission = recorder.record_exit()

        self._with_recorder("exit button", record)

    def _passage(self) -> None:
        self._counts["passages"] += 1
        if self._credits:
            self._credits.popleft()
            self._set_alarm("forced_passage", False, "")
            if not self._credits:
                self._signals.passage_seen()  # nobody else was let in on this opening
            return
        if self._signals.fire:
            return  # the door is released for everyone: an evacuation, not a forced door
        self._counts["forced_passage"] += 1
        log.warning("forced passage: nobody was let through (forced door or tailgating)")
        self._set_alarm(
            "forced_passage",
            True,
            f"a passage nobody was let through at {now_ms()} ({self._counts['forced_passage']} since start)",
            count=False,
        )
        self._with_recorder("forced passage", lambda recorder: recorder.record_forced())

    def _due(self, now: float) -> None:
        for made in self.inputs.values():
            made.recheck(now)
        while self._credits and self._credits[0].deadline <= now:
            admission = self._credits.popleft().admission
            if admission is not None:
                timeout = self._config.passage_timeout_s
                log.info("no passage within %.1f s: annulling %s", timeout, admission.event_id)
                self._with_recorder("annulment", functools.partial(_annul, admission=admission))
        held_open = self._held_open_at is not None and now >= self._held_open_at
        # During a fire the door is released on purpose: an open door is the point.
        if held_open and "door_held_open" not in self._raised and not self._signals.fire:
            limit = self._config.door_held_open_s
            self._set_alarm("door_held_open", True, f"the door has been open for more than {limit} s")

    def _set_alarm(self, name: str, on: bool, detail: str, *, count: bool = True) -> None:
        if on:
            if name not in self._raised and count:
                self._counts[name] += 1
            self._raised.add(name)
            self._alarms.raise_(name, detail)
        elif name in self._raised:
            self._raised.discard(name)
            self._alarms.clear(name)

    def _with_recorder(self, what: str, action: Callable[[Recorder], None]) -> None:
        if self._recorder is None:
            if len(self._early) == self._early.maxlen:
                log.error(
                    "door: %d events wait for the gate to start; the oldest is dropped", len(self._early)
                )
            self._early.append(action)
            return
        self._record(what, action)

    def _record(self, what: str, action: Callable[[Recorder], None]) -> None:
        assert self._recorder is not None
        try:
            action(self._recorder)
        except Exception as exc:  # OutboxError: the gate's outbox alarm is already up
            log.error("door: the %s could not be recorded (%s)", what, exc)

    def _attach(self, recorder: Recorder) -> None:
        self._recorder = recorder
        while self._early:
            self._record("door event from before the gate started", self._early.popleft())
