"""The built-in demo: the real daemon on replayed frames, mock pins and a private broker.

It shows what a technician would see at a real gate: every decision and relay pulse as the
daemon logs it, and every event as an independent MQTT subscriber received it.
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
    ("allow-listed badge again", "EMP-0002"),
)
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
    workdir: Path, *, broker_port: int, scenes: Sequence[tuple[str, bytes | str]] = SCENES, fps: float = 10.0
) -> Path:
    """Frames, lists and a config for a demo gate; returns the config path."""
    frames = workdir / "frames"
    passes = demo_passes(workdir)
    scenes = [(name, p.format(**passes) if isinstance(p, str) else p) for name, p in scenes]
    synth.demo_frames(frames, scenes, fps=fps)
    (workdir / "allow.txt").write_text("# codes allowed through the demo gate\n" + "\n".join(ALLOWED) + "\n")
    (workdir / "deny.txt").write_text("# codes never allowed\n" + "\n".join(DENIED) + "\n")
    config = workdir / "gate.toml"
    config.write_text(
        f"""# Demo gate: replayed frames, mock GPIO pins, private local broker.
[device]
id = "{DEVICE}"
site = "{SITE}"
direction = "in"

[camera]
source = "dir:{frames}"
fps = {fps}

[policy]
accept = ["signed", "plain"]
pass_trust_file = "{workdir / "pass-trust.json"}"
allowlist_file = "{workdir / "allow.txt"}"
denylist_file = "{workdir / "deny.txt"}"

[gpio]
pin_factory = "mock"
relay_pulse_s = 0.5

[mqtt]
host = "127.0.0.1"
port = {broker_port}

[storage]
dir = "{workdir / "state"}"
delivery = "broker"

[daemon]
drain_timeout_s = 10.0
"""
    )
    return config


class Subscriber:
    """An independent MQTT client, as an operator's system would be."""

    def __init__(self, host: str, port: int, topic: str, on_line: Callable[[str], None]) -> None:
        self.checkins: list[dict[str, object]] = []
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
            self._on_line(f"subscriber ← status (retained) camera={json.loads(text).get('camera')}")
        else:
            self._on_line(f"subscriber ← {leaf} = {text}")

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
        config = write_demo_files(root, broker_port=broker.port)
        say(f"demo: {len(SCENES)} scenes rendered into {root / 'frames'}; config {config}")
        subscriber = Subscriber("127.0.0.1", broker.port, f"gate/{SITE}/{DEVICE}/#", say)
        if not subscriber.wait_subscribed(10):
            say("demo: the subscriber could not subscribe to the broker")
            return 1
        try:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "scanner", "run", "--config", str(config)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            assert daemon.stdout is not None
            for line in daemon.stdout:
                say("gate │ " + line.rstrip())
            code = daemon.wait(timeout=30)
            deadline_ok = _wait_for(lambda: len(subscriber.checkins) >= len(SCENES), 10)
        finally:
            subscriber.close()
        outcomes = ", ".join(f"{e['decision']}/{e['reason']}" for e in subscriber.checkins)
        say(
            f"demo: daemon exited {code}; subscriber received {len(subscriber.checkins)} of "
            f"{len(SCENES)} check-ins: {outcomes}"
        )
        return 0 if code == 0 and deadline_ok else 1
    finally:
        broker.stop()


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    done = threading.Event()
    for _ in range(int(timeout * 20)):
        if predicate():
            return True
        done.wait(0.05)
    return bool(predicate())
