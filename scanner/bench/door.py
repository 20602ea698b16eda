"""`gate-scanner bench door`: exit button → relay on, and fire input → relay held, while the
pipeline is busy decoding.

The real daemon (:class:`scanner.gate.app.App`) runs on gpiozero mock pins with an exit button,
a door contact and a fire input, fed by a camera stand-in that hands over 640×480 frames with
a code as fast as the pipeline takes them, so it decodes back to back the whole time. Another
thread moves the contacts, as the pin factory's edge thread does on a Pi: it sleeps until the
planned moment of the edge and then, like lgpio's thread woken by the kernel, must first get
the interpreter back from the busy pipeline. Every relay pin change is stamped with
``time.perf_counter()``: the figure is from the planned edge to the relay pin, as a scope
would measure it. Each exit press is followed by a walk through the door, which
ends the pulse; each fire is cleared again. Both decoders are measured: in the daemon's
process (native code competing for the interpreter) and isolated in a child process.

What it does not measure: the pin factory's own delay from the wire to the callback
(lgpio's alert thread on a Pi, sub-millisecond by its documentation), the relay's mechanical
closing time (5-15 ms for a typical coil relay), and the lock's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from gpiozero.pins.mock import MockFactory, MockPin

from scanner import config as config_mod
from scanner.console import EXIT_OK, setup_logging
from scanner.gate.app import App
from scanner.gate.health import SystemdNotifier
from scanner.models import Frame
from scanner.sim import synth
from scanner.sim.contact import SimulatedContact

GOAL_P99_MS = 20.0
EXIT, PASSAGE, FIRE = 19, 5, 6
_WAIT_S = 2.0


class _StampedPin(MockPin):
    """A mock pin that stamps each change with perf_counter() and wakes whoever waits on it."""

    def __init__(self, factory: Any, info: Any) -> None:
        self.changed = threading.Condition()
        self.stamp = (False, 0.0)
        super().__init__(factory, info)

    def _change_state(self, value: bool) -> bool:
        changed: bool = super()._change_state(value)
        if changed:
            with self.changed:
                self.stamp = (bool(value), time.perf_counter())
                self.changed.notify_all()
        return changed

    def wait_state(self, value: bool, timeout: float = _WAIT_S) -> float | None:
        """The perf_counter() time the pin reached ``value``, or None after ``timeout``."""
        with self.changed:
            if not self.changed.wait_for(lambda: self.stamp[0] == value, timeout):
                return None
            return self.stamp[1]


class _BusyCamera:
    """Frames with a code, one after another as fast as they are taken (two renders in turn,
    so the frozen-camera check sees a live camera)."""

    finite = False

    def __init__(self) -> None:
        rng = np.random.default_rng(12)
        self._images = [synth.render_scene("BENCH-DOOR", rng) for _ in range(2)]
        self._seq = 0

    def open(self) -> None:
        pass

    def read(self, timeout: float) -> Frame:
        time.sleep(0.001)  # a camera hands frames over; it does not spin
        self._seq += 1
        return Frame(self._images[self._seq % 2], self._seq, time.monotonic())

    def close(self) -> None:
        pass


def _percentiles(samples_ms: list[float]) -> dict[str, float | int] | None:
    if not samples_ms:
        return None
    ordered = sorted(samples_ms)

    def rank(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 3)

    return {"p50": rank(0.5), "p99": rank(0.99), "max": round(ordered[-1], 3), "n": len(ordered)}


def bench_door(samples: int = 200, *, isolate: bool, workdir: Path) -> dict[str, Any]:
    cfg = config_mod.from_table(
        {
            "device": {"id": "bench-door", "site": "bench"},
            "camera": {"source": "dir:unused", "fps": 30.0, "frozen_frames": 0, "black_frames": 0},
            "decoder": {"isolate": isolate},
            "gpio": {"pin_factory": "mock", "relay_pulse_s": 3.0},
            "door": {"exit_pin": EXIT, "passage_pin": PASSAGE, "fire_pin": FIRE},
            "policy": {"accept": ["signed"]},  # the code is read and refused: no pulse of its own
            "mqtt": {"host": "127.0.0.1", "port": 9},  # no broker: the door must not care
            "storage": {"dir": str(workdir / "state")},
            "daemon": {"drain_timeout_s": 0.0},
            "telemetry": {"interval_s": 3600.0},
        }
    )
    factory = MockFactory(pin_class=_StampedPin)
    door = cfg.door
    # Put the contacts at rest before the daemon reads them: a shut door, a closed fire loop.
    contacts = {
        pin: SimulatedContact(factory.pin(pin), pull_up=door.pull_up, normally_closed=nc)
        for pin, nc in ((EXIT, False), (PASSAGE, True), (FIRE, True))
    }
    relay: _StampedPin = factory.pin(cfg.gpio.relay_pin)
    app = App(cfg, pin_factory=factory, source=_BusyCamera(), notifier=SystemdNotifier({}))
    stop = threading.Event()
    runner = threading.Thread(target=app.run, args=(stop,), name="bench-app", daemon=True)
    # The pins are set to their pulls when the daemon claims them: rest them as soon as it has.
    runner.start()
    exit_ms: list[float] = []
    fire_ms: list[float] = []
    misses = 0
    try:
        deadline = time.monotonic() + 60
        while (app.door is None or app.gate is None or app.gate.frames < 20) and time.monotonic() < deadline:
            time.sleep(0.05)
        if app.door is None or app.gate is None:
            raise RuntimeError("the daemon did not start within 60 s")
        for contact in contacts.values():
            contact.rest()
        time.sleep(0.2)  # the door settles on the rested contacts
        frames_before, started = app.gate.frames, time.monotonic()
        jitter = random.Random(7)
        for i in range(samples):
            # Out of step with the frame cadence, and past every debounce window.
            edge = time.perf_counter() + door.debounce_s + 0.01 + jitter.random() * 0.02
            time.sleep(edge - time.perf_counter())
            if i % 2 == 0:
                contacts[EXIT].activate()
                on = relay.wait_state(True)
                contacts[EXIT].rest()
                time.sleep(door.debounce_s + 0.005)
                contacts[PASSAGE].activate()  # the person walks out: the pulse ends
                time.sleep(door.debounce_s + 0.005)
                contacts[PASSAGE].rest()
                target = exit_ms
            else:
                contacts[FIRE].activate()
                on = relay.wait_state(True)
                time.sleep(door.debounce_s + 0.005)
                contacts[FIRE].rest()
                target = fire_ms
            if on is None:
                misses += 1
            else:
                target.append((on - edge) * 1000)
            if relay.wait_state(False) is None:
                misses += 1
        busy_s = time.monotonic() - started
        frames = app.gate.frames - frames_before
    finally:
        stop.set()
        runner.join(30)
        factory.close()
    return {
        "decoder": "isolated" if isolate else "in_process",
        "pipeline_fps_while_measuring": round(frames / busy_s, 1),
        "exit_button_to_relay_on_ms": _percentiles(exit_ms),
        "fire_to_relay_held_ms": _percentiles(fire_ms),
        "relay_missed": misses,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--samples", type=int, default=400, help="edges per decoder variant (half exit, half fire)"
    )


def main(args: argparse.Namespace) -> int:
    setup_logging("critical")  # every fire edge is an alarm in the log: thousands of lines
    figures: dict[str, Any] = {
        "what": "edge on a mock input → the relay's mock pin, while the daemon decodes 640x480 frames",
        "goal_p99_ms": GOAL_P99_MS,
        # The tail is the scheduler's: on a shared machine, read it next to the load.
        "host": {"cpus": os.cpu_count(), "load_1m_before": round(os.getloadavg()[0], 2)},
    }
    with tempfile.TemporaryDirectory(prefix="gate-bench-door-") as tmp:
        for isolate in (False, True):
            workdir = Path(tmp) / ("isolated" if isolate else "in_process")
            figures[workdir.name] = bench_door(args.samples, isolate=isolate, workdir=workdir)
    figures["host"]["load_1m_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(figures, indent=2))
    return EXIT_OK
