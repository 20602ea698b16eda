"""`gate-scanner bench occupancy`: how fast an entry reaches every sibling, and what the cap costs.

Three real gates (the daemon's App: outbox, publisher, occupancy; mock pins and an idle
camera) of one site on a private mosquitto. Each round makes one accepted entry at one gate
through the commit path every event takes (an operator's ``open``), and times how long until
every sibling's count includes it: from the moment the entry's count is durable and handed to
the publisher, and from the start of the call (the outbox commit included). Then the decision
cost the cap adds: the same decision without a cap, and with one (which reads the site's
count from the sibling view).

mosquitto leaves Nagle's algorithm on unless ``set_tcp_nodelay true`` (``--tcp-nodelay``):
then a small message may wait for the ACK of the previous one on the broker's side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from gpiozero.pins.mock import MockFactory

from scanner import config as config_mod
from scanner import credentials
from scanner.console import EXIT_OK, EXIT_RUNTIME, setup_logging
from scanner.gate import policy
from scanner.gate.app import App
from scanner.gate.lists import TrustData
from scanner.gate.occupancy import Counts, Occupancy, counter_json
from scanner.models import Frame
from scanner.sim.localbroker import LocalBroker

GATES = ("gate-a", "gate-b", "gate-c")
SITE = "bench-site"


class _IdleCamera:
    """A small grey frame ten times a second: the pipeline turns, the decoder has nothing to read."""

    finite = False

    def __init__(self, width: int, height: int) -> None:
        self._image = np.full((height, width), 128, np.uint8)
        self._seq = 0
        self._closed = threading.Event()

    def open(self) -> None:
        self._closed.clear()

    def read(self, timeout: float) -> Frame | None:
        self._closed.wait(min(timeout, 0.1))
        self._seq += 1
        return Frame(self._image, self._seq, time.monotonic())

    def close(self) -> None:
        self._closed.set()


def _percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "p50": round(statistics.median(ordered), 3),
        "p99": round(p99, 3),
        "max": round(ordered[-1], 3),
        "n": len(ordered),
    }


def _config(root: Path, broker: LocalBroker, device: str) -> config_mod.Config:
    return config_mod.from_table(
        {
            "device": {"id": device, "site": SITE},
            "camera": {"source": "dir:unused", "width": 160, "height": 120, "fps": 10.0},
            "decoder": {"engines": ["zxing"], "isolate": False},
            "gpio": {"pin_factory": "mock", "relay_pulse_s": 0.1},
            "site": {"capacity": 1_000_000},
            "mqtt": {"host": broker.host, "port": broker.port},
            "storage": {"dir": str(root / device)},
            "daemon": {"drain_timeout_s": 1.0},
        }
    )


def bench_propagation(entries: int, root: Path, *, tcp_nodelay: bool = False) -> dict[str, Any]:
    """Entries spread over three gates; ms until every sibling's count includes each one."""
    extra = "set_tcp_nodelay true" if tcp_nodelay else ""
    with LocalBroker(root / "broker", extra_config=extra) as broker:
        stop = threading.Event()
        apps, threads, factories = [], [], []
        for device in GATES:
            factory = MockFactory()
            app = App(_config(root, broker, device), pin_factory=factory, source=_IdleCamera(160, 120))
            thread = threading.Thread(target=app.run, args=(stop,), name=f"bench-{device}", daemon=True)
            thread.start()
            apps.append(app)
            threads.append(thread)
            factories.append(factory)
        try:
            views = [_started(app) for app in apps]
            handed: list[float] = []  # when each gate's latest counter went to its publisher
            for view in views:
                view.publish = _timed(view.publish, handed)
            for view in views:  # every gate has heard every other gate's counter
                if not _until(view, lambda v: set(GATES) <= set(v.snapshot()["gates"]), 20):
                    raise RuntimeError(f"gates did not see each other: {view.snapshot()}")
            after_commit, from_call = [], []
            for i in range(entries):
                gate = apps[i % len(apps)].gate
                assert gate is not None
                siblings = [v for j, v in enumerate(views) if j != i % len(apps)]
                handed.clear()
                start = time.perf_counter()
                ok, detail = gate.remote_open("bench")
                if not ok or not handed:
                    raise RuntimeError(detail)
                committed = handed[0]
                for view in siblings:
                    if not _until(view, _inside_at_least(i + 1), 10):
                        raise RuntimeError(f"entry {i + 1} never reached a sibling: {view.snapshot()}")
                done = time.perf_counter()
                after_commit.append((done - committed) * 1000)
                from_call.append((done - start) * 1000)
        finally:
            stop.set()
            for thread in threads:
                thread.join(20)
            for factory in factories:
                factory.close()
    return {
        "gates": len(GATES),
        "broker": "mosquitto on loopback, set_tcp_nodelay " + ("true" if tcp_nodelay else "false (default)"),
        "count_durable_to_every_sibling_ms": _percentiles(after_commit),
        "entry_call_to_every_sibling_ms": _percentiles(from_call),
    }


def _timed(publish: Callable[[bytes], None], handed: list[float]) -> Callable[[bytes], None]:
    def timed(body: bytes) -> None:
        handed.append(time.perf_counter())
        publish(body)

    return timed


def _until(view: Occupancy, check: Callable[[Occupancy], bool], timeout: float) -> bool:
    return view.wait_for(lambda: check(view), timeout)


def _inside_at_least(n: int) -> Callable[[Occupancy], bool]:
    return lambda view: view.inside() >= n


def _started(app: App, timeout: float = 20.0) -> Occupancy:
    deadline = time.monotonic() + timeout
    while app.occupancy is None or app.gate is None:  # built by the app's own thread
        if time.monotonic() > deadline:
            raise RuntimeError("a gate did not start")
        time.sleep(0.01)
    return app.occupancy


def bench_decision(rounds: int) -> dict[str, Any]:
    """µs per decision without a cap, and with one (the site's count read from two siblings)."""
    now = datetime.now(UTC)
    credential = credentials.parse(b"EMP-0001", now)
    trust = TrustData()
    cfg = config_mod.from_table({"device": {"id": GATES[0], "site": SITE}, "site": {"capacity": 1000}})
    view = Occupancy(cfg, now=lambda: now, monotonic=time.monotonic, clock_synced=lambda: True)
    for device in GATES[1:]:
        counts = Counts(view.own().day, 1, entries=5, exits=2)
        view.heard(device, counter_json(counts, site=SITE, device=device, capacity=1000, now=now), False)
    free = policy.Rules(accept=frozenset({credential.type}), site=SITE)
    capped = policy.Rules(accept=free.accept, site=SITE, capacity=1000)
    without, with_cap = [], []
    batch = 1000
    for _ in range(max(1, rounds // batch)):  # interleaved, so both see the same machine load
        start = time.perf_counter()
        for _ in range(batch):
            policy.decide(credential, subject=None, rules=free, trust=trust, now=now)
        middle = time.perf_counter()
        for _ in range(batch):
            policy.decide(credential, subject=None, rules=capped, trust=trust, now=now, inside=view.inside())
        end = time.perf_counter()
        without.append((middle - start) / batch * 1e6)
        with_cap.append((end - middle) / batch * 1e6)
    median_without, median_with = statistics.median(without), statistics.median(with_cap)
    return {
        "decision_us_without_cap": round(median_without, 3),
        "decision_us_with_cap": round(median_with, 3),
        "cap_check_adds_us": round(median_with - median_without, 3),
        "decisions_each": len(without) * batch,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--entries", type=int, default=300, help="entries spread over the three gates")
    parser.add_argument("--decisions", type=int, default=100_000, help="decisions timed each way")
    parser.add_argument(
        "--tcp-nodelay", action="store_true", help="run mosquitto with set_tcp_nodelay true (Nagle off)"
    )


def main(args: argparse.Namespace) -> int:
    setup_logging("warning")
    with tempfile.TemporaryDirectory(prefix="gate-bench-occupancy-") as tmp:
        try:
            figures = bench_propagation(args.entries, Path(tmp), tcp_nodelay=args.tcp_nodelay)
        except RuntimeError as exc:
            print(json.dumps({"error": str(exc)}))
            return EXIT_RUNTIME
    figures["decision"] = bench_decision(args.decisions)
    print(json.dumps(figures, indent=2))
    return EXIT_OK
