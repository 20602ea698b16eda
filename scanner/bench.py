"""`gate-scanner bench pipeline`: the figures behind the pipeline's speed and size goals.

Prints (as JSON): decode time alone and frame-in → relay-on latency for 640×480 frames with
one code (outbox commit included), outbox commits per second, and, over a real demo run of
the daemon, its peak RSS and its time from start to READY=1.
"""

from __future__ import annotations

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
from scanner import events, synth
from scanner.app import Alarms, Gate, SystemClock
from scanner.decode import Decoder
from scanner.models import Frame
from scanner.outbox import Outbox, bench_commits
from scanner.signals import Signals


def _percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 3), "p99": round(p99, 3), "n": len(ordered)}


def bench_pipeline(frames: int = 200) -> dict[str, Any]:
    rng = np.random.default_rng(42)
    images = [synth.render_scene(f"BENCH-{i:05d}", rng) for i in range(frames)]
    decoder = Decoder(("zxing", "zbar"))
    decode_ms = []
    for image in images:
        start = time.perf_counter()
        decoder.decode(image)
        decode_ms.append((time.perf_counter() - start) * 1000)

    with tempfile.TemporaryDirectory(prefix="gate-bench-") as tmp:
        root = Path(tmp)
        cfg = config_mod.from_table(
            {
                "device": {"id": "bench", "site": "bench"},
                "gpio": {"pin_factory": "mock", "relay_pulse_s": 0.1},
                "storage": {"dir": str(root / "state")},
            }
        )
        factory = MockFactory()
        outbox = Outbox(root / "state" / "outbox.db", cfg.storage.outbox_max_events)
        latency_ms = []
        with Signals(cfg.gpio, pin_factory=factory) as signals:
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
                relay_on = time.perf_counter()
                if outcomes and outcomes[0].decision.accepted and relay.state:
                    latency_ms.append((relay_on - frame.captured) * 1000)
                signals.relay_off()
        outbox.close()
        commits = bench_commits(root / "commits.db", 2000)
        daemon = _daemon_run(root / "demo")

    return {
        "frame": "640x480 with one code",
        "decode_ms": _percentiles(decode_ms),
        "frame_to_relay_on_ms": _percentiles(latency_ms) if latency_ms else None,
        "relay_opened_on": f"{len(latency_ms)}/{frames}",
        "outbox_commits_per_s": round(commits),
        "daemon": daemon,
    }


def _daemon_run(workdir: Path) -> dict[str, Any]:
    """Run the real daemon on the demo frames; measure time to READY=1 and peak RSS."""
    from scanner.demo import write_demo_files
    from scanner.localbroker import LocalBroker

    workdir.mkdir(parents=True)
    notify_path = workdir / "notify.sock"
    with (
        LocalBroker(workdir / "broker") as broker,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
    ):
        notify.bind(str(notify_path))
        notify.settimeout(30)
        config = write_demo_files(workdir, broker_port=broker.port)
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "scanner", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
        )
        ready_s = None
        try:
            while ready_s is None:
                message = notify.recv(4096).decode()
                if "READY=1" in message.split("\n"):
                    ready_s = time.monotonic() - start
        except TimeoutError:
            pass
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "ready_s": round(ready_s, 3) if ready_s is not None else None,
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "exit_code": proc.returncode,
    }
