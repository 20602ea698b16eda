"""The built-in demo: the real daemon on replayed frames, mock pins and a private broker.

It shows what a technician would see at a real gate: every decision and relay pulse as the
daemon logs it, and every event as an independent MQTT subscriber received it. The site has
an entry gate and an exit gate and room for two people: the entry gate runs its scenes until
a visitor is turned away (``capacity_full``), someone leaves by the exit gate, and the entry
gate, started again, lets the visitor in. The gates run one after the other (each a finite
replay), so the story does not depend on how fast a machine starts two daemons; the count
goes between them through the broker's retained counters alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from scanner.console import setup_logging
from scanner.credentials.signed import PassIssuer, TrustedKey, TrustStore
from scanner.sim import synth
from scanner.sim.localbroker import LocalBroker

DEVICE, SITE = "demo-gate", "demo-site"
EXIT_DEVICE = "demo-exit"
CAPACITY = 2  # the demo site's room: the third person in is turned away
ALLOWED = ("EMP-0001", "EMP-0002", "EMP-0003")  # EMP-0003 holds the demo's signed pass
DENIED = ("EMP-0666",)

# (what a person holds up, payload). Each is held in view for ~1 s, then the view is empty.
# Signed passes are issued at demo time by a throw-away issuer key (see demo_passes).
SCENES: tuple[tuple[str, bytes | str], ...] = (
    ("allow-listed badge", "EMP-0001"),
    ("deny-listed badge", "EMP-0666"),
    ("unknown visitor code", "VISITOR-0042"),
    ("garbage bytes", bytes([0xFF, 0xFE, 0x00, 0x9C, 0x81, 0x7F, 0xC3]) * 3),
    ("signed pass on a phone", "{valid_pass}"),
    ("expired signed pass", "{expired_pass}"),
    ("allow-listed badge again", "EMP-0002"),  # with the demo's cap of 2: turned away, the site is full
)
EXIT_SCENES: tuple[tuple[str, bytes | str], ...] = (("the first badge leaves by the exit gate", "EMP-0001"),)
RETRY_SCENES: tuple[tuple[str, bytes | str], ...] = (("the visitor turned away tries again", "EMP-0002"),)
PASS_SUBJECT = "EMP-0003"  # on the allow list: a pass proves who, the list says who may enter


def demo_passes(workdir: Path) -> dict[str, str]:
    """A throw-away issuer key, its trust store, and the demo's passes (valid and expired)."""
    key = Ed25519PrivateKey.generate()
    kid = bytes.fromhex("de0de0de")
    now = datetime.now(UTC)
    trust = TrustStore.of([TrustedKey(kid, key.public_key(), "demo issuer")], version=1, issued=now)
    (workdir / "pass-trust.json").write_text(json.dumps(trust.to_json(), indent=1))
    issuer = PassIssuer(key, kid)
    subject = PASS_SUBJECT.encode()
    return {
        "valid_pass": issuer.issue(subject, now - timedelta(hours=1), now + timedelta(days=1)),
        "expired_pass": issuer.issue(subject, now - timedelta(days=2), now - timedelta(days=1)),
    }


def write_demo_files(
    workdir: Path,
    *,
    broker_port: int,
    scenes: Sequence[tuple[str, bytes | str]] = SCENES,
    fps: float = 10.0,
    capacity: int = 0,
) -> Path:
    """Frames, lists and a config for the demo's entry gate; returns the config path."""
    passes = demo_passes(workdir)
    scenes = [(name, p.format(**passes) if isinstance(p, str) else p) for name, p in scenes]
    render_frames(workdir / "frames", scenes, fps=fps)
    (workdir / "allow.txt").write_text("# codes allowed through the demo gate\n" + "\n".join(ALLOWED) + "\n")
    (workdir / "deny.txt").write_text("# codes never allowed\n" + "\n".join(DENIED) + "\n")
    return _gate_config(workdir, "gate", DEVICE, "in", broker_port=broker_port, fps=fps, capacity=capacity)


def write_exit_gate(
    workdir: Path,
    *,
    broker_port: int,
    scenes: Sequence[tuple[str, bytes | str]] = EXIT_SCENES,
    fps: float = 10.0,
    capacity: int = 0,
) -> Path:
    """Frames and a config for the demo's exit gate, beside the entry gate's lists."""
    render_frames(workdir / "frames-exit", scenes, fps=fps)
    return _gate_config(
        workdir, "exit", EXIT_DEVICE, "out", broker_port=broker_port, fps=fps, capacity=capacity
    )


def render_frames(
    frames: Path, scenes: Sequence[tuple[str, bytes | str]], *, fps: float, lead_s: float = 0.0
) -> None:
    """The scenes as the camera will see them, replacing whatever that folder held."""
    if frames.exists():
        for old in frames.glob("*.png"):
            old.unlink()
    synth.demo_frames(frames, scenes, fps=fps, lead_s=lead_s)


def _gate_config(
    workdir: Path, name: str, device: str, direction: str, *, broker_port: int, fps: float, capacity: int
) -> Path:
    suffix = "" if name == "gate" else f"-{name}"
    config = workdir / f"{name}.toml"
    config.write_text(
        f"""# Demo {name}: replayed frames, mock GPIO pins, private local broker.
[device]
id = "{device}"
site = "{SITE}"
direction = "{direction}"

[camera]
source = "dir:{workdir / f"frames{suffix}"}"
fps = {fps}

[policy]
accept = ["signed", "plain"]
pass_trust_file = "{workdir / "pass-trust.json"}"
allowlist_file = "{workdir / "allow.txt"}"
denylist_file = "{workdir / "deny.txt"}"

[site]
capacity = {capacity}

[gpio]
pin_factory = "mock"
relay_pulse_s = 0.5

[mqtt]
host = "127.0.0.1"
port = {broker_port}

[storage]
dir = "{workdir / f"state{suffix}"}"
delivery = "broker"
# One pseudonym key for the site's gates: an entry and its exit name the same subject.
subject_key_file = "{workdir / "subject.key"}"

[daemon]
drain_timeout_s = 10.0
"""
    )
    return config


class Subscriber:
    """An independent MQTT client, as an operator's system would be."""

    def __init__(self, host: str, port: int, topic: str, on_line: Callable[[str], None]) -> None:
        self.checkins: list[dict[str, object]] = []
        self.counters: dict[str, tuple[str, int]] = {}  # device → (day, entries - exits + adjust)
        self._on_line = on_line
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="demo-subscriber", protocol=mqtt.MQTTv5
        )
        self._client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._message
        self._client.connect(host, port)
        self._client.loop_start()

    def wait_subscribed(self, timeout: float) -> bool:
        return self._subscribed.wait(timeout)

    def _message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        leaf = message.topic.rsplit("/", 1)[-1]
        text = message.payload.decode("utf-8", errors="replace")
        if leaf == "checkin":
            event = json.loads(text)
            self.checkins.append(event)
            cred = event["credential"]
            self._on_line(
                f"subscriber ← checkin seq={event['seq']} {event['decision']} reason={event['reason']} "
                f"type={cred['type']} subject={cred.get('subject', '-')} ts={event['ts']}"
            )
        elif leaf == "status":
            status = json.loads(text)
            view = status.get("occupancy") or {}
            seen = f" sees {view.get('inside')} inside of {view.get('capacity')}" if view else ""
            self._on_line(f"subscriber ← status (retained) camera={status.get('camera')}{seen}")
        elif leaf == "occupancy" and text:
            c = json.loads(text)
            figures = (c["day"], c["entries"] - c["exits"] + c["adjust"])
            if self.counters.get(c["device"]) == figures:
                return  # the same counts again (connect, stop): nothing new to show
            self.counters[c["device"]] = figures
            self._on_line(
                f"subscriber ← occupancy {c['device']}: in {c['entries']} out {c['exits']}"
                f" adjust {c['adjust']} → the site has {self.inside()} inside (cap {c['capacity']})"
            )
        else:
            self._on_line(f"subscriber ← {leaf} = {text}")

    def inside(self) -> int:
        """The site's count as the gates sum it: their counters of the latest day."""
        day = max(d for d, _ in self.counters.values())
        return max(0, sum(n for d, n in self.counters.values() if d == day))

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, help="keep the demo's files here instead of a temp dir")


def main(args: argparse.Namespace) -> int:
    setup_logging()
    return run_demo(args.workdir)


def run_demo(workdir: Path | None = None) -> int:
    with tempfile.TemporaryDirectory(prefix="gate-demo-") as tmp:
        root = workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        return _demo(root.resolve())


def _demo(root: Path) -> int:
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            print(line, flush=True)

    broker = LocalBroker(root / "broker")
    broker.start()
    try:
        say(f"demo: private mosquitto on 127.0.0.1:{broker.port} (log {root / 'broker'})")
        entry = write_demo_files(root, broker_port=broker.port, capacity=CAPACITY)
        exit_ = write_exit_gate(root, broker_port=broker.port, capacity=CAPACITY)
        total = len(SCENES) + len(EXIT_SCENES) + len(RETRY_SCENES)
        say(f"demo: {total} scenes rendered; entry gate {entry}, exit gate {exit_}; room for {CAPACITY}")
        subscriber = Subscriber("127.0.0.1", broker.port, f"gate/{SITE}/#", say)
        if not subscriber.wait_subscribed(10):
            say("demo: the subscriber could not subscribe to the broker")
            return 1
        try:
            say(f"demo: the entry gate {DEVICE} runs its {len(SCENES)} scenes")
            codes = [_run(entry, say)]
            say(f"demo: someone leaves by the exit gate {EXIT_DEVICE} (it opens for any readable code)")
            codes.append(_run(exit_, say))
            # The visitor comes a few seconds after the start: a gate that has just started decides
            # on the counts it last stored until the broker's counters reach it (milliseconds; a
            # loaded machine can take seconds to connect a starting daemon, hence the lead).
            render_frames(root / "frames", RETRY_SCENES, fps=10.0, lead_s=8.0)
            say(f"demo: the entry gate {DEVICE} starts again, its counts kept; the visitor tries again")
            codes.append(_run(entry, say))
            received = _wait_for(lambda: len(subscriber.checkins) >= total, 10)
        finally:
            subscriber.close()
        outcomes = ", ".join(f"{e['direction']} {e['decision']}/{e['reason']}" for e in subscriber.checkins)
        say(
            f"demo: the daemon runs exited {', '.join(map(str, codes))}; the subscriber received "
            f"{len(subscriber.checkins)} of {total} check-ins: {outcomes}"
        )
        return 0 if codes == [0, 0, 0] and received else 1
    finally:
        broker.stop()


def _run(config: Path, say: Callable[[str], None]) -> int:
    """``gate-scanner run`` on a finite replay: its log, line by line, until it exits."""
    name = config.stem
    daemon = subprocess.Popen(
        [sys.executable, "-m", "scanner", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert daemon.stdout is not None
    for line in daemon.stdout:
        say(f"{name} │ " + line.rstrip())
    return daemon.wait(timeout=30)


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    done = threading.Event()
    for _ in range(int(timeout * 20)):
        if predicate():
            return True
        done.wait(0.05)
    return bool(predicate())
