"""Relay, LEDs and buzzer via gpiozero: what a person at the gate sees, hears and walks through.

Wiring (BCM numbers come from ``[gpio]``):

- **Relay**: the GPIO drives the *input of a relay driver* (a transistor or opto-isolated relay
  board), never the coil: a coil draws 70-100 mA and kicks back when released, far beyond what
  a 3.3 V GPIO (16 mA max) survives. The driver input must have a pull resistor that holds it
  *off* when the pin floats (pull-down for active-high boards; the usual active-low opto
  boards are off when floating). The pin floats while the Pi boots, while no process owns it,
  and after gpiozero releases it (lgpio resets a released pin to an input without bias), so
  that resistor is what keeps the lock shut across boot, crash and restart.
- **Green and red LEDs**: GPIO → series resistor (330 Ω-1 kΩ) → LED → GND; active high.
- **Buzzer**: an *active* buzzer (it has its own oscillator, so a level makes a tone) through
  a transistor if it draws more than a few mA; active high.

Relay rules (README: Relay, LEDs and buzzer):

- Off first: the relay is the first device constructed, with ``initial_value=False``, so the
  first thing this process does to any GPIO is drive the relay off.
- A pulse is non-blocking and starts in the caller's thread: the relay is energised before
  :meth:`Signals.accepted` returns, so the exit button's path to the relay waits for no other
  thread. A second accept during a pulse restarts it (people in a queue); a passage ends it.
- No single energising lasts longer than ``relay_max_on_s``. Restarts are clamped to that
  ceiling; when it is reached the relay drops for at least :attr:`Signals.RELAY_GAP_S` (so the
  lock really relatches and a solenoid cools) and a still-pending pulse then continues as a
  new energising with its own ceiling. An independent guard thread that shares no lock with the
  pulse logic forces the relay off at the ceiling even if the pulse logic is stuck.
- Fire release (:meth:`Signals.set_fire`) holds the relay energised for as long as the fire
  input is active: the ceiling and its guard yield to it (README: The door says which locks
  may be used on such a door). :meth:`Signals.relay_off` ends the hold too: a stopping daemon
  holds nothing, and the fire panel's own release must never depend on this process.
- Off on ``close()`` (first, before anything else is released) and on any exception leaving a
  ``with Signals(...)`` block; :func:`force_relay_off` covers a crash or SIGKILL via systemd's
  ``ExecStopPost``; on power loss the coil simply has no power.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from types import TracebackType
from typing import Final

from gpiozero import LED, Buzzer, Factory, OutputDevice
from gpiozero.pins.mock import MockFactory

from scanner.config import GpioConfig

log = logging.getLogger(__name__)

# name → (module, class). Imported only when asked for: each pulls in a C library that exists
# only on a Pi, and importing this module must not touch hardware.
_FACTORIES: Final[dict[str, tuple[str, str]]] = {
    "lgpio": ("gpiozero.pins.lgpio", "LGPIOFactory"),
    "rpigpio": ("gpiozero.pins.rpigpio", "RPiGPIOFactory"),
    "pigpio": ("gpiozero.pins.pigpio", "PiGPIOFactory"),
    "native": ("gpiozero.pins.native", "NativeFactory"),
}
# lgpio uses the kernel's gpiochip interface (the only one that works on a Pi 5); RPi.GPIO
# for older images; native (register banging) as a last resort. pigpio needs a daemon, so it
# is only used when asked for by name.
_AUTO_ORDER: Final = ("lgpio", "rpigpio", "native")
# A monotonic time before every reading: a deadline set to it has passed ("until never").
_NEVER: Final = float("-inf")


class PinFactoryError(RuntimeError):
    """No usable gpiozero pin factory: names every factory tried and why it failed."""


def make_pin_factory(name: str) -> Factory:
    """Build the gpiozero pin factory named in ``gpio.pin_factory``.

    Never sets the class-wide ``Device.pin_factory``: the factory is passed down explicitly.
    """
    if name == "mock":
        return MockFactory()
    if name in _FACTORIES:
        try:
            return _load_factory(name)
        except Exception as exc:
            raise PinFactoryError(f"gpio pin factory {name!r} does not work here: {exc}") from exc
    if name != "auto":
        raise PinFactoryError(
            f"unknown gpio pin factory {name!r}; choose auto, mock, {', '.join(_FACTORIES)}"
        )
    failures = []
    for candidate in _AUTO_ORDER:
        try:
            factory = _load_factory(candidate)
        except Exception as exc:
            failures.append(f"{candidate} ({type(exc).__name__}: {exc})")
            continue
        log.info("gpio pin factory: %s (auto)", candidate)
        return factory
    raise PinFactoryError(
        "no gpio pin factory works here; tried "
        + ", ".join(failures)
        + '. Not a Raspberry Pi? Use gpio.pin_factory = "mock".'
    )


def _load_factory(name: str) -> Factory:
    module_name, class_name = _FACTORIES[name]
    module = importlib.import_module(module_name)
    factory: Factory = getattr(module, class_name)()
    return factory


class Signals:
    """Relay, green LED, red LED and buzzer of one gate.

    Wiring: the relay pin drives the input of a transistor or opto-isolated relay driver board
    (never the coil), with a pull resistor holding that input off while the pin floats; each
    LED through a 330 Ω-1 kΩ series resistor to GND (active high); an *active* buzzer (its own
    oscillator, so a level makes the tone), through a transistor if it draws more than a few mA.
    The module docstring gives the reasons and the relay rules.

    Every method returns at once; pulses and patterns run on background threads. Safe to call
    from any thread. A context manager: leaving the block (also by an exception) closes it, and
    closing drives the relay off before anything else.
    """

    # Pattern timings (seconds). Class attributes so that tests (and odd hardware) can subclass.
    BEEP_S: float = 0.1
    BEEP_GAP_S: float = 0.1
    REJECT_RED_S: float = 1.0
    FAULT_ON_S: float = 0.5
    FAULT_OFF_S: float = 1.5
    # Fire: green and red flash together, a pattern nothing else uses.
    FIRE_ON_S: float = 0.25
    FIRE_OFF_S: float = 0.25
    # Shortest off time after an energising was cut at relay_max_on_s: long enough for a
    # strike/maglock to really relatch before a queued pulse energises it again.
    RELAY_GAP_S: float = 0.5
    # The pulse logic stops this much before the ceiling so that the guard, which acts exactly
    # at the ceiling, only ever fires when the pulse logic has failed.
    GUARD_MARGIN_S: float = 0.02

    def __init__(self, gpio: GpioConfig, *, pin_factory: Factory):
        self._pulse_s = gpio.relay_pulse_s
        self._max_on_s = gpio.relay_max_on_s
        self._ceiling_s = max(self._max_on_s - min(self.GUARD_MARGIN_S, self._max_on_s / 10), 0.0)
        self._cond = threading.Condition()
        self._closed = False
        self._close_lock = threading.Lock()
        # Relay state, guarded by _cond (the pulse logic).
        self._want_until = _NEVER  # monotonic time until which accepts want the relay energised
        self._on_since: float | None = None
        self._hold_off_until = _NEVER
        # Published for the guard without a lock (a float or None assignment is atomic).
        self._energised_at: float | None = None
        self._guard_kick = threading.Event()
        self._guard_stop = threading.Event()
        self.guard_trips = 0
        # Fire release: read by the guard without a lock (a bool assignment is atomic).
        self._fire = False
        # Indicator state, guarded by _cond.
        self._fault = False
        self._red_busy_until = _NEVER  # a reject pattern owns the red LED until then
        self._restore_timer: threading.Timer | None = None

        # The relay first, driven off, before any other pin is claimed: if anything below
        # fails, the relay is already in its safe state.
        self._relay = OutputDevice(
            gpio.relay_pin,
            active_high=gpio.relay_active_high,
            initial_value=False,
            pin_factory=pin_factory,
        )
        self._green: LED | None = None
        self._red: LED | None = None
        self._buzzer: Buzzer | None = None
        try:
            self._green = LED(gpio.green_pin, initial_value=False, pin_factory=pin_factory)
            self._red = LED(gpio.red_pin, initial_value=False, pin_factory=pin_factory)
            self._buzzer = Buzzer(gpio.buzzer_pin, initial_value=False, pin_factory=pin_factory)
        except BaseException:
            self._close_devices()
            raise
        self._controller = threading.Thread(target=self._run_relay, name="relay", daemon=True)
        self._guard = threading.Thread(target=self._run_guard, name="relay-guard", daemon=True)
        self._guard.start()
        self._controller.start()

    # -- public API ---------------------------------------------------------------------------

    @property
    def relay_active(self) -> bool:
        return bool(self._relay.is_active) if not self._relay.closed else False

    @property
    def faulty(self) -> bool:
        return self._fault

    @property
    def fire(self) -> bool:
        return self._fire

    def accepted(self) -> None:
        """Open: relay pulse of ``relay_pulse_s`` (restarted if one is running), green LED, one beep.

        The relay is energised here, in the caller's thread, unless it must first stay off for
        :attr:`RELAY_GAP_S` after a cut at the ceiling (then the pulse logic energises it).
        """
        with self._cond:
            if self._closed:
                return
            now = time.monotonic()
            self._want_until = now + self._pulse_s
            if self._fire:
                pass  # already held released; the pulse continues if the fire clears first
            elif self._on_since is not None:
                log.info("relay pulse restarted (%.1f s)", self._pulse_s)
            elif now >= self._hold_off_until:  # pragma: no mutate (tie)
                self._on_since = now
                self._relay_write(True, reason=f" (pulse {min(self._pulse_s, self._ceiling_s):.1f} s)")
            self._cond.notify_all()
            if self._fire:
                self._beep(1)  # the fire pattern keeps the LEDs
                return
            self._show_green(self._pulse_s)
            if self._red_busy_until > now:  # pragma: no mutate (tie)
                # The previous person's red light must not stay on while this one walks through.
                self._red_busy_until = _NEVER
                if self._restore_timer is not None:
                    self._restore_timer.cancel()
                    self._restore_timer = None
                self._red_idle()
            self._beep(1)

    def rejected(self) -> None:
        """Refuse: red LED for ~1 s and three short beeps. Never touches the relay.

        A pulse already running for the previous person continues: cutting it would shut
        the gate on someone who was let in.
        """
        with self._cond:
            if self._closed:
                return
            assert self._green is not None and self._red is not None
            if self._fire:
                self._beep(3)  # the fire pattern keeps the LEDs
                return
            self._green.off()
            self._red.blink(on_time=self.REJECT_RED_S, off_time=0, n=1)
            self._red_busy_until = time.monotonic() + self.REJECT_RED_S
            self._schedule_red_restore(self.REJECT_RED_S)
            self._beep(3)

    def set_fault(self, on: bool) -> None:
        """Show (or clear) the fault pattern: a slow red blink while the gate cannot work."""
        with self._cond:
            if self._closed or on == self._fault:
                return
            self._fault = on
            log.warning("fault indication %s", "on" if on else "off")
            if self._fire:
                return  # the fire pattern owns the LEDs; its end shows the fault
            if self._red_busy_until <= time.monotonic():  # pragma: no mutate (tie)
                self._red_idle()
            # else: a reject pattern owns the red LED; its restore timer applies the new state.

    def passage_seen(self) -> None:
        """Someone went through: end the pulse now, so nobody follows on the same opening."""
        with self._cond:
            if self._closed:
                return
            self._want_until = _NEVER
            if self._fire:
                return
            if self._on_since is not None:
                self._on_since = None
                self._relay_write(False, reason=" (passage seen)")
            assert self._green is not None
            self._green.off()
            self._cond.notify_all()

    def set_fire(self, on: bool) -> None:
        """Fire release: hold the relay energised while ``on``, whatever ``relay_max_on_s`` says,
        with green and red flashing together; back to normal when it ends."""
        with self._cond:
            if self._closed or on == self._fire:
                return
            assert self._green is not None and self._red is not None
            if on:
                self._fire = True  # before energising: the guard must never cut the hold
                self._on_since = None
                self._relay_write(True, reason=" (fire: door held released)")
                self._green.blink(on_time=self.FIRE_ON_S, off_time=self.FIRE_OFF_S)
                self._red.blink(on_time=self.FIRE_ON_S, off_time=self.FIRE_OFF_S)
            else:
                now = time.monotonic()
                if now < self._want_until:  # pragma: no mutate (tie)
                    # An accept during the fire still wants the door: a fresh energising, with
                    # its own ceiling counted from now.
                    self._on_since = now
                    self._relay_write(True)
                else:
                    self._on_since = None
                    self._relay_write(False, reason=" (fire cleared)")
                self._fire = False
                self._guard_kick.set()
                self._green.off()
                self._red_busy_until = _NEVER
                self._red_idle()
            self._cond.notify_all()

    def relay_off(self) -> None:
        """Drop the relay now, cancel any pending pulse and end a fire hold."""
        with self._cond:
            self._want_until = _NEVER
            self._fire = False
            self._cond.notify_all()
        self._relay_write(False)  # also immediately, in case the pulse logic is stuck

    def close(self) -> None:
        """Relay off first, then stop the pulse logic and release every pin. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._relay_write(False)
        finally:
            got = self._cond.acquire(timeout=1.0)
            try:
                if self._restore_timer is not None:
                    self._restore_timer.cancel()
                if got:
                    self._cond.notify_all()
            finally:
                if got:
                    self._cond.release()
            self._guard_stop.set()
            self._guard_kick.set()
            for thread in (self._controller, self._guard):
                if thread.is_alive() and thread is not threading.current_thread():
                    thread.join(timeout=1.0)
            self._close_devices()

    def __enter__(self) -> Signals:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- relay --------------------------------------------------------------------------------

    def _relay_write(self, on: bool, *, reason: str = "") -> None:
        """Drive the relay; the log says so (with ``reason``) only when its state changes."""
        if self._relay.closed:
            return
        was = self._relay.is_active
        if on:
            # Publish before energising so that the guard can never miss an energising.
            now = time.monotonic()
            self._energised_at = now
            self._guard_kick.set()
            self._relay.on()
        else:
            self._relay.off()
            self._energised_at = None
        if bool(was) != on:
            log.info("relay %s%s", "on" if on else "off", reason)

    def _run_relay(self) -> None:
        """Pulse logic: energise while accepts want it, within the ceiling, with the gap after it."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                if self._fire:
                    # Held; set_fire(False) takes it back.
                    self._cond.wait(timeout=1.0)  # pragma: no mutate (notified)
                    continue
                if self._on_since is not None:
                    ceiling = self._on_since + self._ceiling_s
                    if now >= self._want_until or now >= ceiling:
                        cut = now < self._want_until
                        self._relay_write(False, reason=" (max on-time reached)" if cut else "")
                        self._on_since = None
                        if cut:
                            # From when the relay really dropped: on a loaded board the write
                            # can land well after ``now``, and the lock needs the whole gap.
                            self._hold_off_until = time.monotonic() + self.RELAY_GAP_S
                        continue
                    self._cond.wait(timeout=min(self._want_until, ceiling) - now)
                elif now < self._want_until:  # pragma: no mutate (tie)
                    if now < self._hold_off_until:  # pragma: no mutate (tie)
                        self._cond.wait(timeout=self._hold_off_until - now)
                        continue
                    pulse = min(self._want_until - now, self._ceiling_s)
                    self._on_since = now
                    self._relay_write(True, reason=f" (pulse {pulse:.1f} s)")
                else:  # idle
                    self._cond.wait(timeout=1.0)  # pragma: no mutate (notified)
            # Ends a pulse this thread began just as close() wrote the relay off (close() takes
            # the lock only after that write). _close_devices writes it off once more before
            # releasing the pin, so no single change here shows on the pin.
            if self._on_since is not None:  # pragma: no mutate
                self._relay_write(False)

    def _run_guard(self) -> None:
        """Hard ceiling, independent of the pulse logic: shares no lock with it."""
        handled: float | None = None  # pragma: no mutate (only compared with floats)
        while not self._guard_stop.is_set():
            since = self._energised_at
            if since is None or since == handled or self._fire:
                self._guard_kick.wait(timeout=1.0)  # pragma: no mutate (notified)
                self._guard_kick.clear()
                continue
            remaining = since + self._max_on_s - time.monotonic()
            if remaining > 0:
                self._guard_kick.wait(timeout=remaining)
                self._guard_kick.clear()
                continue
            if self._energised_at != since or self._fire:
                continue  # switched off (and maybe on again) meanwhile, or a fire hold began
            try:
                self._relay.off()
            except Exception:
                log.exception("relay guard could not drive the relay off")
                continue
            handled = since
            self.guard_trips += 1
            log.error(
                "relay off: forced by the %.1f s max on-time guard (pulse logic stuck?)", self._max_on_s
            )

    # -- indicators (called with _cond held) --------------------------------------------------

    def _show_green(self, seconds: float) -> None:
        assert self._green is not None
        self._green.blink(on_time=seconds, off_time=0, n=1)

    def _beep(self, n: int) -> None:
        assert self._buzzer is not None
        self._buzzer.beep(on_time=self.BEEP_S, off_time=self.BEEP_GAP_S, n=n)

    def _red_idle(self) -> None:
        """The red LED's resting state: the fault pattern, or off."""
        assert self._red is not None
        if self._fault:
            self._red.blink(on_time=self.FAULT_ON_S, off_time=self.FAULT_OFF_S)
        else:
            self._red.off()

    def _schedule_red_restore(self, delay: float) -> None:
        if self._restore_timer is not None:
            self._restore_timer.cancel()
        timer = threading.Timer(delay, self._restore_red)
        timer.name = "red-restore"
        timer.daemon = True
        self._restore_timer = timer
        timer.start()

    def _restore_red(self) -> None:
        with self._cond:
            if self._closed or threading.current_thread() is not self._restore_timer:
                return
            self._restore_timer = None
            self._red_busy_until = _NEVER
            if not self._fire:
                self._red_idle()

    def _close_devices(self) -> None:
        # Relay first: it is the only output that can hurt anyone.
        for device in (self._relay, self._green, self._red, self._buzzer):
            if device is None:
                # Made in order and the first failure leaves the rest unmade, so `break` would
                # do the same.
                continue  # pragma: no mutate
            try:
                # The second of two: close() wrote the relay off first and the relay thread's
                # last act ended any pulse it had begun since (a failed constructor never
                # energised it), so no single change here shows on the pin.
                if device is self._relay and not device.closed:  # pragma: no mutate
                    device.off()
                device.close()
            except Exception:
                log.exception("closing %r failed", device)


def force_relay_off(gpio: GpioConfig, pin_factory: Factory) -> None:
    """Claim only the relay pin, drive it off, release it (systemd ``ExecStopPost``).

    Runs after the daemon has gone, however it went (crash, SIGKILL, watchdog): the daemon
    may have died with the relay energised and its guard thread with it. Touches no other pin
    so that it cannot disturb anything else wired to the header.
    """
    relay = OutputDevice(
        gpio.relay_pin,
        active_high=gpio.relay_active_high,
        initial_value=False,
        pin_factory=pin_factory,
    )
    try:
        relay.off()
        log.info("relay off (relay-off command, pin %d)", gpio.relay_pin)
    finally:
        relay.close()
