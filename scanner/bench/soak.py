"""`gate-scanner bench soak --minutes N`: random faults for N minutes, then a delivery report.

The real daemon (``python -m scanner run``, delivery = "collector") replays short scenes of
codes without pause; a private mosquitto (persistence off) and the real collector
(``python -m scanner collect``, SQLite store) take its events. Every few seconds one of the
three is SIGKILLed and restarted. Afterwards the last daemon is stopped, one more daemon run
on a single empty frame (it commits nothing) drains the outbox, and the report compares:

- ``committed``: every seq the gate's outbox allocated (1 .. next_seq-1: each is a commit);
- ``stored``: what the collector's store holds for the gate; ``missing`` / ``extra``;
- ``duplicates_resent``: check-ins an independent subscriber received minus the distinct
  event ids among them (resends after reconnects and ack stalls; the store absorbs them);
- ``max_delay_s``: scan time (``ts``) to stored time (``received``), over all stored events;
- the daemon's RSS and open files (``/proc/PID/fd``) at the start and at the end.

Every wait is bounded; every process started here is killed in ``finally``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from scanner.sim import synth
from scanner.sim.demo import ALLOWED, write_demo_files
from scanner.sim.localbroker import LocalBroker

PREFIX = "soak"
FPS = 30.0
SCENES = 10  # distinct codes per replay loop; the loop is repeated by hard links
FAULT_EVERY_S = (3.0, 8.0)
MAX_MINUTES = 240.0
DRAIN_TIMEOUT_S = 180.0


def _toml(table: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in table.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    return "\n".join(lines) + "\n"


def _wait(predicate: Any, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _proc_figures(pid: int) -> dict[str, Any]:
    figures: dict[str, Any] = {"pid": pid}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                figures["rss_mb"] = round(int(line.split()[1]) / 1024, 1)
        figures["open_files"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        figures["error"] = "process gone"
    return figures


def _parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class _Counter:
    """Independent MQTT v5 subscriber on every gate's checkin topic: counts each delivery."""

    def __init__(self, broker: LocalBroker) -> None:

        self.received = 0
        self.ids: set[str] = set()
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"soak-count-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
        )
        self.client.reconnect_delay_set(1, 2)
        topic = f"{PREFIX}/+/+/checkin"
        self.client.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        self.client.connect_async(broker.host, broker.port, keepalive=10)
        self.client.loop_start()

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        try:
            event_id = str(json.loads(message.payload)["event_id"])
        except (ValueError, KeyError, TypeError):
            return
        with self._lock:
            self.received += 1
            self.ids.add(event_id)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class _Proc:
    """``python -m scanner ARGS`` with its stderr appended to ``log``."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args, self.log = args, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> _Proc:
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scanner", *self.args], stdout=subprocess.DEVNULL, stderr=err
            )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


def _gate_config(workdir: Path, port: int, frames: Path, name: str) -> Path:
    base = workdir / "gate.toml"
    table = tomllib.loads(base.read_text())
    overrides = {
        "camera.source": f"dir:{frames}",
        "storage.delivery": "collector",
        "mqtt.topic_prefix": PREFIX,
        "track.gone_after_s": 0.1,
        "policy.anti_passback_s": 0.0,  # every pass of an allowlisted code is an accept
        "gpio.relay_pulse_s": 0.1,
        "daemon.drain_timeout_s": DRAIN_TIMEOUT_S,
        "daemon.log_level": "warning",
    }
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        table.setdefault(section, {})[key] = value
    path = workdir / name
    path.write_text(_toml(table))
    return path


def _committed(outbox_db: Path) -> int:
    if not outbox_db.exists():
        return 0
    with sqlite3.connect(f"file:{outbox_db}?mode=ro", uri=True, timeout=5) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
    return int(row[0]) - 1 if row else 0


def _stored(db: Path) -> list[tuple[int, str, str]]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return [
                (int(r[0]), str(r[1]), str(r[2]))
                for r in conn.execute("SELECT seq, ts, received FROM checkins")
            ]
    except sqlite3.Error:
        return []


def bench_soak(minutes: float, workdir: Path, seed: int | None = None) -> dict[str, Any]:
    rng = random.Random(seed)
    broker = LocalBroker(workdir / "broker", persistence=False)
    broker.start()
    procs: list[_Proc] = []
    counter: _Counter | None = None
    try:
        write_demo_files(workdir, broker_port=broker.port, scenes=[], fps=FPS)
        loop = workdir / "loop"
        codes = [
            (f"person {i}", ALLOWED[i % len(ALLOWED)] if i % 4 == 0 else f"VISITOR-{i}")
            for i in range(SCENES)
        ]
        originals = synth.demo_frames(loop, codes, fps=FPS, hold_s=0.2, gap_s=0.2)
        frames = workdir / "replay"
        frames.mkdir()
        replay_s = min(minutes * 60.0 + 30.0, 900.0)  # a daemon that reaches the end is restarted
        for i in range(round(replay_s * FPS)):
            os.link(originals[i % len(originals)], frames / f"{i:05d}.png")
        empty = workdir / "empty"
        empty.mkdir()
        os.link(originals[-1], empty / "00000.png")  # the last frame of a scene is a gap frame
        gate = _gate_config(workdir, broker.port, frames, "soak-gate.toml")
        drain = _gate_config(workdir, broker.port, empty, "soak-drain.toml")
        cfg = tomllib.loads(gate.read_text())
        outbox_db = Path(cfg["storage"]["dir"]) / "outbox.db"
        device = cfg["device"]["id"]

        store = workdir / "collector.db"
        ccfg = workdir / "collector.toml"
        ccfg.write_text(
            _toml(
                {
                    "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": PREFIX},
                    "collector": {"store": f"sqlite:{store}", "name": "soak"},
                    "daemon": {"log_level": "warning"},
                }
            )
        )
        collector = _Proc(["collect", "--config", str(ccfg)], workdir / "collector.log").start()
        daemon = _Proc(["run", "--config", str(gate)], workdir / "daemon.log")
        procs += [collector, daemon]
        counter = _Counter(broker)
        time.sleep(2.0)  # the collector subscribes before the gate publishes
        daemon.start()
        if not _wait(lambda: len(_stored(store)) >= 1, 60):
            raise RuntimeError(f"nothing stored within 60 s; see {workdir}")
        assert daemon.proc is not None
        at_start = _proc_figures(daemon.proc.pid)

        faults = {"broker": 0, "collector": 0, "daemon": 0}
        daemon_restarts_after_end = 0
        daemon_failures = 0
        started = time.monotonic()
        end = started + minutes * 60.0
        while time.monotonic() < end:
            time.sleep(min(rng.uniform(*FAULT_EVERY_S), max(0.0, end - time.monotonic())))
            if time.monotonic() >= end:
                break
            if not daemon.alive:  # the replay ended (exit 0) or the daemon failed
                assert daemon.proc is not None
                if daemon.proc.returncode == 0:
                    daemon_restarts_after_end += 1
                else:
                    daemon_failures += 1
                daemon.start()
            kind = rng.choice(sorted(faults))
            faults[kind] += 1
            if kind == "broker":
                broker.kill()
                time.sleep(rng.uniform(0.2, 3.0))
                broker.start()
            elif kind == "collector":
                collector.kill()
                time.sleep(rng.uniform(0.2, 3.0))
                collector.start()
            else:
                daemon.kill()
                time.sleep(rng.uniform(0.0, 1.0))
                daemon.start()
        soak_s = time.monotonic() - started
        if not daemon.alive:
            daemon.start()
            time.sleep(3.0)
        assert daemon.proc is not None
        at_end = _proc_figures(daemon.proc.pid)

        # Stop scanning, then drain: one more run on an empty frame commits nothing and exits
        # once the outbox is empty (acked by the collector) or after DRAIN_TIMEOUT_S.
        if not collector.alive:
            collector.start()
        daemon.terminate(30)
        drain_started = time.monotonic()
        drainer = _Proc(["run", "--config", str(drain)], workdir / "drain.log").start()
        procs.append(drainer)
        assert drainer.proc is not None
        try:
            drain_rc: int | None = drainer.proc.wait(DRAIN_TIMEOUT_S + 30)
        except subprocess.TimeoutExpired:
            drainer.kill()
            drain_rc = None
        committed = _committed(outbox_db)
        _wait(lambda: len(_stored(store)) >= committed, 30)
        drain_s = time.monotonic() - drain_started
        time.sleep(1.0)  # let the subscriber see the last resends
        rows = _stored(store)
        seqs = [seq for seq, _ts, _rcv in rows]
        expected = set(range(1, committed + 1))
        delays = sorted((_parse_ts(rcv) - _parse_ts(ts)).total_seconds() for _seq, ts, rcv in rows)
        with counter._lock:
            received, unique = counter.received, len(counter.ids)
        return {
            "minutes": minutes,
            "soak_s": round(soak_s, 1),
            "device": device,
            "faults": faults,
            "daemon_restarts_after_replay_end": daemon_restarts_after_end,
            "daemon_unexpected_exits": daemon_failures,
            "events_committed": committed,
            "events_stored": len(set(seqs)),
            "missing": len(expected - set(seqs)),
            "missing_seqs_first": sorted(expected - set(seqs))[:20],
            "extra_stored": len(set(seqs) - expected),
            "store_duplicate_seqs": len(seqs) - len(set(seqs)),
            "subscriber_received": received,
            "subscriber_unique": unique,
            "duplicates_resent": received - unique,
            "max_delay_s": round(delays[-1], 2) if delays else None,
            "median_delay_s": round(delays[len(delays) // 2], 2) if delays else None,
            "drain_exit_code": drain_rc,
            "drain_s": round(drain_s, 1),
            "daemon_at_start": at_start,
            "daemon_at_end": at_end,
            "collector_alive": collector.alive,
            "workdir": str(workdir),
        }
    finally:
        if counter is not None:
            counter.stop()
        for proc in procs:
            proc.kill()
        broker.kill()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--minutes", type=float, default=5.0, help=f"how long to inject faults (max {MAX_MINUTES:.0f})"
    )
    p.add_argument("--seed", type=int, default=None, help="fault schedule seed (default random)")
    p.add_argument("--workdir", type=Path, help="keep the soak's files here instead of a temp dir")


def main(args: argparse.Namespace) -> int:
    if not 0 < args.minutes <= MAX_MINUTES:
        print(f"--minutes: between 0 and {MAX_MINUTES:.0f}", file=sys.stderr)
        return 2
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = bench_soak(args.minutes, args.workdir, args.seed)
    else:
        with tempfile.TemporaryDirectory(prefix="gate-soak-") as tmp:
            report = bench_soak(args.minutes, Path(tmp), args.seed)
            report["workdir"] = None
    print(json.dumps(report, indent=2))
    ok = report["missing"] == 0 and report["extra_stored"] == 0 and report["store_duplicate_seqs"] == 0
    return 0 if ok else 1
