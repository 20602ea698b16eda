"""`gate-scanner bench pipeline`: the figures behind the pipeline's speed and size goals.

Prints (as JSON): decode time alone and frame-in → relay-on latency for 640×480 frames with
one code (outbox commit included), outbox commits per second, and, over a real demo run of
the daemon, its peak RSS and its time from start to READY=1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from gpiozero.pins.mock import MockFactory

from scanner import config as config_mod
from scanner import events
from scanner.bench.fuzz import bench_decisions
from scanner.console import EXIT_OK, setup_logging
from scanner.gate.decode import Decoder
from scanner.gate.outbox import Outbox, bench_commits
from scanner.gate.pipeline import Alarms, Gate, SystemClock
from scanner.gate.signals import Signals
from scanner.models import Frame
from scanner.sim import synth
from scanner.sim.demo import write_demo_files
from scanner.sim.localbroker import LocalBroker


def _percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 3), "p99": round(p99, 3), "n": len(ordered)}


def bench_pipeline(frames: int = 200) -> dict[str, Any]:
    rng = np.random.default_rng(42)
    images = [synth.render_scene(f"BENCH-{i:05d}", rng) for i in range(frames)]
    figures: dict[str, Any] = {"frame": "640x480 with one code"}
    with tempfile.TemporaryDirectory(prefix="gate-bench-") as tmp:
        root = Path(tmp)
        for name, isolate in (("in_process", False), ("isolated", True)):
            with Decoder(("zxing", "zbar"), isolate=isolate) as decoder:
                figures[name] = _frame_to_relay(images, decoder, root / name)
        figures["decision_ms_by_type"] = bench_decisions()
        figures["outbox_commits_per_s"] = round(bench_commits(root / "commits.db", 2000))
        figures["daemon"] = _daemon_run(root / "demo")
    return figures


def _frame_to_relay(images: list[np.ndarray], decoder: Decoder, root: Path) -> dict[str, Any]:
    """Decode time alone, then frame-in → relay-pin-high through the real Gate (outbox commit included)."""
    decode_ms = []
    for image in images:
        start = time.perf_counter()
        decoder.decode(image)
        decode_ms.append((time.perf_counter() - start) * 1000)
    cfg = config_mod.from_table(
        {
            "device": {"id": "bench", "site": "bench"},
            "gpio": {"pin_factory": "mock", "relay_pulse_s": 0.1},
            "storage": {"dir": str(root / "state")},
        }
    )
    factory = MockFactory()
    (root / "state").mkdir(parents=True)
    latency_ms = []
    with (
        Outbox(root / "state" / "outbox.db", cfg.storage.outbox_max_events) as outbox,
        Signals(cfg.gpio, pin_factory=factory) as signals,
    ):
        relay = factory.pin(cfg.gpio.relay_pin)
        gate = Gate(
            cfg,
            decoder=decoder,
            outbox=outbox,
            signals=signals,
            pseudonymizer=events.Pseudonymizer(b"k" * 32),
            clock=SystemClock(),
            alarms=Alarms(),
        )
        for i, image in enumerate(images):
            # Distinct codes far apart in time: every frame is a new scan that opens the relay.
            frame = Frame(image, i, time.perf_counter())
            outcomes = gate.process(frame)
            if outcomes and outcomes[0].decision.accepted:
                # The relay thread energises the pin; watch the pin itself, as a scope would.
                deadline = time.perf_counter() + 1.0
                while not relay.state and time.perf_counter() < deadline:
                    time.sleep(0.00005)
                if relay.state:
                    latency_ms.append((time.perf_counter() - frame.captured) * 1000)
            signals.relay_off()
    factory.close()
    return {
        "decode_ms": _percentiles(decode_ms),
        "frame_to_relay_on_ms": _percentiles(latency_ms) if latency_ms else None,
        "relay_opened_on": f"{len(latency_ms)}/{len(images)}",
    }


def _daemon_run(workdir: Path) -> dict[str, Any]:
    """Run the real daemon on the demo frames; measure time to READY=1 and peak RSS.

    Peak RSS is the kernel's high-water mark (VmHWM) read from /proc while the daemon runs:
    wait4's ru_maxrss would include the memory of this (large) process at fork time.
    """

    workdir.mkdir(parents=True)
    notify_path = workdir / "notify.sock"
    with (
        LocalBroker(workdir / "broker") as broker,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
    ):
        notify.bind(str(notify_path))
        notify.settimeout(0.02)
        config = write_demo_files(workdir, broker_port=broker.port)
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "scanner", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
        )
        ready_s = None
        peak_kb = 0
        peak_tree_kb = 0
        deadline = start + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if ready_s is None and "READY=1" in notify.recv(4096).decode().split("\n"):
                    ready_s = time.monotonic() - start
            except TimeoutError:
                pass
            peak_kb = max(peak_kb, _vm_kb(proc.pid, "VmHWM"))
            # The isolated decoder runs in a forkserver child: count the whole process tree too.
            tree_kb = sum(_vm_kb(pid, "VmRSS") for pid in _descendants(proc.pid))
            peak_tree_kb = max(peak_tree_kb, _vm_kb(proc.pid, "VmRSS") + tree_kb)
        if proc.poll() is None:
            proc.kill()
        code = proc.wait(10)
    return {
        "ready_s": round(ready_s, 3) if ready_s is not None else None,
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "peak_rss_with_decoder_process_mb": round(peak_tree_kb / 1024, 1),
        "exit_code": code,
    }


def _vm_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as children:
                kids = [int(k) for k in children.read().split()]
        except (OSError, ValueError):
            kids = []
        found += kids
        frontier += kids
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=200)


def main(args: argparse.Namespace) -> int:
    setup_logging("warning")
    print(json.dumps(bench_pipeline(frames=args.frames), indent=2))
    return EXIT_OK
