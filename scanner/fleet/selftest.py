"""`gate-scanner selftest`: one line per check, for the technician standing at the gate.

Each line is ``STATUS  name  detail — what to do``; STATUS is PASS, WARN or FAIL and the
exit code is 0 only when nothing FAILed. The daemon must be stopped first (``sudo systemctl
stop gate-scanner``): it owns the camera and the GPIO pins, and a second owner gets "busy".

The test card is a signed gate pass whose subject is ``SELFTEST``. ``--card OUT.png`` prints
one, signed by ``--key`` (an issuer key from ``gate-scanner pass keygen``) or by a throwaway
key whose public entry is written beside the card as ``OUT.pub.json``. A throwaway key is
the safe default: it is in no gate's trust store, so the card can never open a gate, and the
self-test still verifies it when given ``--card-key OUT.pub.json``. The decode check never
runs the card through the gate's policy: a read card never drives the relay.

Each configured door input (``[door]``) asks the technician to press the exit button, open
the door, trip the tamper switch and the fire input, and PASSes on the edge it waits for; a
fire input that already reads fire (the panel in alarm, or a cut wire) FAILs at once.

``--simulate`` replaces the hardware with replayed frames (a test card scene rendered by
:mod:`scanner.sim.synth`), gpiozero mock pins (the door's contacts driven by the self-test
itself) and, when the configured broker is unreachable, a private mosquitto, so the same code
runs on any machine (the arm64 proof runs it).

Not done here: publishing the result in the retained ``status`` topic; the daemon owns that
topic, and the self-test runs while the daemon is stopped.
"""

from __future__ import annotations

import argparse
import json
import secrets
import socket
import sqlite3
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from gpiozero.pins.mock import MockFactory
from paho.mqtt.enums import CallbackAPIVersion

from scanner.config import Config
from scanner.console import load_or_report, setup_logging
from scanner.credentials.signed import (
    PassIssuer,
    PassVerifier,
    TrustedKey,
    TrustError,
    TrustStore,
    trusted_key_from_json,
)
from scanner.fleet import pki
from scanner.fleet.passes import PUB_FILE, default_kid
from scanner.gate import health
from scanner.gate.camera import CameraError, open_source
from scanner.gate.decode import Decoder
from scanner.gate.door import Input
from scanner.gate.health import clock_synced
from scanner.gate.signals import PinFactoryError, Signals, make_pin_factory
from scanner.gate.telemetry import ThrottleReader, cpu_temp_c, disk_free_bytes
from scanner.mqtt import secure
from scanner.sim import synth
from scanner.sim.contact import SimulatedContact
from scanner.sim.localbroker import BrokerError, LocalBroker

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SUBJECT = b"SELFTEST"
CAMERA_S = 2.0  # long enough for a stable rate, short enough that nobody waits
MIN_FPS = 5.0  # below this a walking person is seen in too few frames to read a code
MIN_SHARPNESS = 60.0  # variance of the Laplacian; a code held at 30 cm in focus scores hundreds
DISK_WARN, DISK_FAIL = 500 * 2**20, 50 * 2**20
CERT_WARN_DAYS = 30
TEMP_WARN_C, TEMP_FAIL_C = 80.0, 85.0  # the Pi firmware starts capping the clock at 80 °C
BROKER_TIMEOUT_S = 8.0
DOOR_TIMEOUT_S = 30.0  # per input: time to walk to the door, the button or the panel
CARD_YEARS = 5

Status = Literal["PASS", "WARN", "FAIL"]


@dataclass(frozen=True, slots=True)
class Check:
    status: Status
    name: str
    detail: str
    advice: str = ""

    def line(self) -> str:
        tail = f" — {self.advice}" if self.advice and self.status != "PASS" else ""
        return f"{self.status}  {self.name}  {self.detail}{tail}"


# -- the test card ------------------------------------------------------------------------


def card_issuer(key_path: Path | None) -> tuple[Any, bytes, dict[str, Any]]:
    """(private key, kid, trust entry) from an issuer key file, or a fresh throwaway key."""

    if key_path is None:
        key = Ed25519PrivateKey.generate()
        kid = default_kid(key.public_key())
        return key, kid, TrustedKey(kid, key.public_key(), "self-test card (throwaway)").entry()
    loaded = load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError(f"{key_path}: not an Ed25519 issuer key")
    key = loaded
    pub = key_path.with_name(PUB_FILE)
    if pub.exists():
        entry = json.loads(pub.read_text(encoding="utf-8"))
        kid = trusted_key_from_json(entry, where=str(pub)).kid
    else:
        kid = default_kid(key.public_key())
        entry = TrustedKey(kid, key.public_key(), "self-test card").entry()
    return key, kid, entry


def issue_card_text(key: Any, kid: bytes, *, now: datetime | None = None) -> str:

    now = now or datetime.now(UTC)
    return PassIssuer(key, kid).issue(
        SUBJECT, now - timedelta(days=1), now + timedelta(days=365 * CARD_YEARS)
    )


def write_card(out: Path, key_path: Path | None) -> Path | None:
    """Write the printable card PNG; returns the path of the trust entry written beside it (throwaway key)."""

    key, kid, entry = card_issuer(key_path)
    text = issue_card_text(key, kid)
    code = synth.render_qr(text, module_px=12, border=4)
    # A4 at ~150 dpi is 1240 px wide; the code is ~8 cm across, what a gate reads at 20-40 cm.
    width = max(1240, code.shape[1] + 200)
    lines = [
        "gate-scanner SELF-TEST CARD",
        "1. sudo systemctl stop gate-scanner",
        "2. sudo gate-scanner selftest --config /etc/gate-scanner/gate.toml"
        + ("" if key_path else " --card-key " + out.with_suffix(".pub.json").name),
        "3. hold this card 20-40 cm in front of the camera while the camera check runs",
        "4. sudo systemctl start gate-scanner",
        f"subject SELFTEST, key {kid.hex()}, valid until {CARD_YEARS} years after printing",
        "This card cannot open a gate unless its key is in the gate's trust store.",
    ]
    height = 120 + code.shape[0] + 60 * len(lines) + 80
    page = np.full((height, width), 255, np.uint8)
    x = (width - code.shape[1]) // 2
    page[100 : 100 + code.shape[0], x : x + code.shape[1]] = code
    y = 100 + code.shape[0] + 70
    for i, line in enumerate(lines):
        scale = 1.3 if i == 0 else 0.9
        cv2.putText(page, line, (60, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 0, 2, cv2.LINE_AA)
        y += 60
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), page):
        raise OSError(f"could not write {out}")
    if key_path is not None:
        return None
    pub = out.with_suffix(".pub.json")
    pub.write_text(json.dumps(entry, indent=2) + "\n", encoding="utf-8")
    return pub


# -- checks ---------------------------------------------------------------------------------


@dataclass(slots=True)
class CameraResult:
    frames: list[Any]
    check: Check


def check_camera(config: Config, source: Any, *, duration: float = CAMERA_S) -> CameraResult:

    advice = (
        "check the ribbon cable (contacts towards the board), `rpicam-hello --list-cameras`, camera.source"
    )
    frames: list[Any] = []
    try:
        source.open()
    except CameraError as exc:
        return CameraResult([], Check("FAIL", "camera", f"cannot open {config.camera.source}: {exc}", advice))
    start = time.monotonic()
    try:
        while time.monotonic() - start < duration:
            try:
                frame = source.read(timeout=config.camera.capture_timeout_s)
            except CameraError as exc:
                if not frames:
                    return CameraResult([], Check("FAIL", "camera", f"no frame: {exc}", advice))
                break
            if frame is None:  # a replay ended
                break
            frames.append(frame.image)
    finally:
        source.close()
    elapsed = max(time.monotonic() - start, 1e-3)
    if not frames:
        return CameraResult([], Check("FAIL", "camera", "no frames delivered", advice))
    fps = len(frames) / elapsed
    sharpness = max(float(cv2.Laplacian(f, cv2.CV_64F).var()) for f in frames[-10:])
    h, w = frames[-1].shape[:2]
    detail = f"{len(frames)} frames in {elapsed:.1f} s ({fps:.1f} fps, {w}x{h}), sharpness {sharpness:.0f}"
    if fps < MIN_FPS:
        return CameraResult(
            frames, Check("WARN", "camera", detail, "low frame rate: lower camera.width/height")
        )
    if sharpness < MIN_SHARPNESS:
        return CameraResult(
            frames,
            Check(
                "WARN",
                "camera",
                detail,
                "blurred: hold the card at 20-40 cm, clean the lens, set camera.autofocus",
            ),
        )
    return CameraResult(frames, Check("PASS", "camera", detail))


def check_decode(config: Config, frames: list[Any], extra_trust: list[dict[str, Any]]) -> Check:

    keys = [trusted_key_from_json(e, where="self-test card key") for e in extra_trust]
    if config.policy.pass_trust_file is not None:
        store = TrustStore.load(config.policy.pass_trust_file)
        keys += [k for k in store.keys.values() if k.kid not in {x.kid for x in keys}]
    verifier = PassVerifier(TrustStore.of(keys, version=0, issued=datetime.now(UTC)))
    if not frames:
        return Check("FAIL", "decode", "no frames to decode", "fix the camera check first")
    seen_codes = 0
    problem = ""
    with Decoder(config.decoder.engines) as decoder:
        # Newest first: the technician is most likely holding the card up by the end.
        for image in reversed(frames[-40:]):
            for symbol in decoder.decode(image):
                seen_codes += 1
                credential = verifier.parse(symbol.payload, datetime.now(UTC))
                if credential is None:
                    problem = "a QR code was read but it is not a gate pass"
                elif credential.problem is not None:
                    problem = f"a gate pass was read but {credential.detail}"
                elif credential.identity != SUBJECT:
                    problem = "a valid gate pass was read, but not the self-test card"
                else:
                    return Check(
                        "PASS", "decode", f"self-test card read and verified (key {credential.issuer})"
                    )
    if seen_codes == 0:
        return Check(
            "FAIL",
            "decode",
            f"no QR code in {min(len(frames), 40)} frames",
            "hold the self-test card (selftest --card) 20-40 cm in front of the camera and run again",
        )
    return Check(
        "FAIL",
        "decode",
        problem,
        "use a card signed by a key in policy.pass_trust_file, or pass --card-key CARD.pub.json",
    )


def check_signals(config: Config, pin_factory: Any, *, say: Callable[[str], None]) -> Check:

    # A short pulse: the technician only needs to hear the click.
    gpio = replace(config.gpio, relay_pulse_s=min(config.gpio.relay_pulse_s, 1.0))
    say(
        f"signals: watch and listen now: relay clicks ON for {gpio.relay_pulse_s:.1f} s with the GREEN LED "
        "and ONE beep; then the RED LED for 1 s with THREE beeps; the relay stays off during the red."
    )
    try:
        with Signals(gpio, pin_factory=pin_factory) as signals:
            signals.accepted()
            on = _wait(lambda: signals.relay_active, 1.0)
            _wait(lambda: not signals.relay_active, gpio.relay_pulse_s + 1.0)
            signals.rejected()
            time.sleep(Signals.REJECT_RED_S + 0.2)
            off_at_end = not signals.relay_active
    except Exception as exc:  # busy pins, missing permission, no factory: all say the same to the technician
        return Check(
            "FAIL",
            "signals",
            f"cannot drive the pins: {type(exc).__name__}: {exc}",
            "stop the daemon (sudo systemctl stop gate-scanner), run as root or in group gpio,"
            " check gpio.*_pin",
        )
    if not on or not off_at_end:
        return Check(
            "FAIL", "signals", "the relay output did not follow the sequence", "check gpio.relay_pin wiring"
        )
    return Check(
        "PASS",
        "signals",
        f"relay pin {gpio.relay_pin} pulsed, green {gpio.green_pin}, red {gpio.red_pin},"
        f" buzzer {gpio.buzzer_pin} driven (if you did not see/hear it: check wiring, relay_active_high)",
    )


@dataclass(frozen=True, slots=True)
class DoorInput:
    """How the self-test names, asks for and explains one door input."""

    key: str  # door.<key>_pin
    name: str
    ask: str  # what the technician does to make it active
    seen: str  # what the PASS line says was seen
    rest: str  # what puts it back at rest
    contact: str  # the door.*_contact key, or "" (fire: always normally closed)


DOOR_INPUTS = (
    DoorInput("exit", "exit button", "press the exit button", "pressed", "release it", "exit_contact"),
    DoorInput(
        "passage",
        "passage",
        "open the door (or turn the turnstile)",
        "door opened (turnstile turned)",
        "shut the door",
        "passage_contact",
    ),
    DoorInput(
        "tamper",
        "tamper",
        "open the enclosure (trip the tamper switch)",
        "tamper switch tripped",
        "shut the enclosure",
        "tamper_contact",
    ),
    DoorInput(
        "fire",
        "fire",
        "trip the fire input (the panel's test, or open its loop)",
        "fire input tripped",
        "reset the panel",
        "",
    ),
)


def check_door(
    config: Config,
    pin_factory: Any,
    *,
    say: Callable[[str], None],
    simulate: bool = False,
    timeout: float = DOOR_TIMEOUT_S,
) -> Iterator[Check]:
    """One check per configured door input, as each ends: PASS when it goes active (the edge
    the technician makes), FAIL otherwise.

    With ``simulate`` the pins are mock pins and the self-test moves the contacts itself."""
    for spec in DOOR_INPUTS:
        pin = getattr(config.door, f"{spec.key}_pin")
        if pin is not None:
            yield _check_input(config, spec, pin, pin_factory, say, simulate, timeout)


def _check_input(
    config: Config,
    spec: DoorInput,
    pin: int,
    pin_factory: Any,
    say: Callable[[str], None],
    simulate: bool,
    timeout: float,
) -> Check:
    door = config.door
    nc = spec.contact == "" or getattr(door, spec.contact) == "nc"
    wiring = (
        f"check the wires from pin {pin} to the contact and {'GND' if door.pull_up else '3.3 V'},"
        " door.pull_up" + (f" and door.{spec.contact}" if spec.contact else "")
    )
    changed = threading.Condition()

    def on_change(_input: Input, _active: bool, _at: float) -> None:
        with changed:
            changed.notify_all()

    try:
        made = Input(
            spec.name,
            pin,
            normally_closed=nc,
            pull_up=door.pull_up,
            debounce_s=door.debounce_s,
            pin_factory=pin_factory,
            on_change=on_change,
        )
    except Exception as exc:  # busy pin, no permission: the same advice as for the outputs
        return Check("FAIL", spec.name, f"cannot read pin {pin}: {type(exc).__name__}: {exc}", wiring)
    try:
        contact = None
        if simulate:
            contact = SimulatedContact(pin_factory.pin(pin), pull_up=door.pull_up, normally_closed=nc)
        if contact is not None:
            contact.rest()
        if made.active and spec.key == "fire":
            return Check(
                "FAIL",
                spec.name,
                f"pin {pin} reads fire now: the panel is in alarm or its loop is open (a cut wire)",
                "the panel's contact must be closed while there is no fire; " + wiring,
            )
        if made.active:
            say(f"door: {spec.name} (pin {pin}) is active now: {spec.rest} first")
            _wait_level(made, changed, False, timeout)
        say(f"door: {spec.ask} now (within {timeout:.0f} s)")
        if contact is not None:
            contact.activate()
        seen = _wait_level(made, changed, True, timeout)
        if contact is not None:
            contact.rest()
    finally:
        made.close()
    if not seen:
        return Check("FAIL", spec.name, f"pin {pin}: no change within {timeout:.0f} s", wiring)
    return Check("PASS", spec.name, f"pin {pin}: {spec.seen}")


def _wait_level(made: Input, changed: threading.Condition, active: bool, timeout: float) -> bool:
    """Wait for the input to read ``active``, reading it again at the end of each debounce
    window as the daemon's door thread does."""
    deadline = time.monotonic() + timeout
    with changed:
        while made.active != active:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            changed.wait(min(left, 0.05))
            made.recheck(time.monotonic())
    return True


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def check_certificate(config: Config, *, now: datetime | None = None) -> Check | None:

    path = config.mqtt.cert_file
    if path is None:
        return None
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        return Check("FAIL", "certificate", f"{path}: {exc}", "re-provision the device bundle")
    now = now or datetime.now(UTC)
    # not_valid_after_utc only from cryptography 42; Debian 12's is older (naive UTC).
    expires = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after.replace(tzinfo=UTC)
    days = (expires - now).total_seconds() / 86400
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    name = str(cn[0].value) if cn else "?"
    detail = f"CN={name}, expires {expires:%Y-%m-%d} ({days:.0f} days)"
    renew = f"renew: gate-scanner pki device --renew --id {config.device.id}, then re-provision"
    if days < 0:
        return Check("FAIL", "certificate", detail, renew)
    if name != config.device.id:
        return Check(
            "FAIL",
            "certificate",
            detail + f", but device.id is {config.device.id}",
            "the broker's rules key on CN: re-provision",
        )
    site = pki.site_of(cert)
    if site is not None and site != config.device.site:
        # The shipped broker lets this identity write only under the site its certificate names.
        return Check(
            "FAIL",
            "certificate",
            detail + f", certified for site {site}, but device.site is {config.device.site}",
            f"the broker refuses every publish under another site: set device.site = {site!r}, or if "
            f"the gate moved, pki device --renew --id {config.device.id} --site {config.device.site} "
            "and re-provision",
        )
    if days < CERT_WARN_DAYS:
        return Check("WARN", "certificate", detail, renew)
    return Check("PASS", "certificate", detail)


def check_broker(config: Config, *, timeout: float = BROKER_TIMEOUT_S, label: str = "") -> Check:
    """Connect as this device (TLS as configured), publish a nonce on its own ``cmd/selftest/reply``
    and wait for it to come back. That topic is one the broker ACL lets a gate both write
    (``cmd/+/reply``) and read (``cmd/#``), and the daemon's ``cmd/+`` does not match it."""

    m = config.mqtt
    where = f"{m.host}:{m.port}{' (TLS)' if m.tls else ''}{label}"
    topic = config.topic("cmd/selftest/reply")
    nonce = secrets.token_hex(8).encode()
    connected, echoed = threading.Event(), threading.Event()
    state: dict[str, Any] = {}
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"{config.device.id}-selftest",  # never the daemon's id: that would kick it off
        protocol=mqtt.MQTTv5 if m.protocol == "5" else mqtt.MQTTv311,
    )
    secure(client, config)

    def on_connect(c: Any, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
        state["connack"] = str(reason)
        if not reason.is_failure:
            c.subscribe(topic, qos=1)

    def on_subscribe(c: Any, _u: Any, _mid: Any, reasons: Any, _p: Any = None) -> None:
        state["suback"] = [str(r) for r in reasons]
        if all(not r.is_failure for r in reasons):
            connected.set()
            state["sent"] = time.monotonic()
            c.publish(topic, nonce, qos=1, retain=False)

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        if message.payload == nonce:
            state["rtt"] = time.monotonic() - state.get("sent", time.monotonic())
            echoed.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    advice_net = f"check the network, DNS and firewall (TCP {m.port}) and mqtt.host"
    try:
        client.connect(m.host, m.port, keepalive=30)
    except ssl.SSLError as exc:
        return Check(
            "FAIL",
            "broker",
            f"TLS to {where} failed: {exc}",
            "check the clock, ca.pem and the device certificate",
        )
    except (OSError, ValueError) as exc:
        return Check("FAIL", "broker", f"cannot reach {where}: {exc}", advice_net)
    client.loop_start()
    try:
        echoed.wait(timeout)
    finally:
        client.loop_stop()
        with suppress(Exception):  # already gone
            client.disconnect()
    if echoed.is_set():
        return Check("PASS", "broker", f"round trip via {where} on {topic} in {state['rtt'] * 1000:.0f} ms")
    if "connack" not in state:
        return Check("FAIL", "broker", f"{where}: no CONNACK in {timeout:.0f} s", advice_net)
    if not connected.is_set():
        return Check(
            "FAIL",
            "broker",
            f"{where}: connect {state['connack']}, subscribe {state.get('suback')}",
            "the broker refused this identity: check the certificate (CN = device.id, its site = "
            "device.site) and the broker's rules (pki dynsec)",
        )
    return Check(
        "FAIL", "broker", f"{where}: published on {topic} but it never came back", "check the broker's rules"
    )


def _reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def check_clock(synced: bool) -> Check:
    if synced:
        return Check("PASS", "clock", "synchronised (NTP)")
    return Check(
        "WARN",
        "clock",
        "not synchronised: pass validity and event times may be wrong",
        "timedatectl set-ntp true; allow UDP 123 out; a Pi without an RTC needs NTP after every boot",
    )


def check_disk(path: Path) -> Check:

    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = disk_free_bytes(probe)
    if free is None:
        return Check("FAIL", "disk", f"cannot stat {path}", "is the data partition mounted?")
    detail = f"{free / 2**20:.0f} MB free on {probe}"
    advice = "the outbox needs room: deliver queued events (broker link) or use a larger card"
    if free < DISK_FAIL:
        return Check("FAIL", "disk", detail, advice)
    if free < DISK_WARN:
        return Check("WARN", "disk", detail, advice)
    return Check("PASS", "disk", detail)


def check_outbox(path: Path) -> Check:
    if not path.exists():
        return Check("PASS", "outbox", f"{path} not created yet (made on the daemon's first start)")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        try:
            result = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
            depth = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return Check(
            "FAIL",
            "outbox",
            f"{path}: {exc}",
            "stop the daemon, move outbox.db aside (sqlite3 .recover saves what it can), start again",
        )
    if result != ["ok"]:
        return Check(
            "FAIL",
            "outbox",
            f"{path}: quick_check: {'; '.join(result[:3])}",
            "stop the daemon, move outbox.db aside (sqlite3 .recover saves what it can); check the power",
        )
    return Check("PASS", "outbox", f"{path}: integrity ok ({depth} schema objects)")


def check_temperature(temp_c: float | None) -> Check:
    if temp_c is None:
        return Check(
            "WARN", "temperature", "CPU temperature unavailable", "not a Raspberry Pi? (no thermal zone)"
        )
    advice = "add a heatsink, ventilate the enclosure, keep it out of direct sun"
    if temp_c >= TEMP_FAIL_C:
        return Check("FAIL", "temperature", f"CPU {temp_c:.1f} °C", advice)
    if temp_c >= TEMP_WARN_C:
        return Check("WARN", "temperature", f"CPU {temp_c:.1f} °C", advice)
    return Check("PASS", "temperature", f"CPU {temp_c:.1f} °C")


def check_power(flags: dict[str, Any] | None) -> Check:
    advice = "use the official 5.1 V supply and a short, thick cable; under-voltage corrupts SD cards"
    if flags is None:
        return Check(
            "WARN", "power", "throttling flags unavailable (vcgencmd get_throttled)", "not a Raspberry Pi?"
        )
    raw = flags.get("raw", "?")
    if flags.get("under_voltage_now"):
        return Check("FAIL", "power", f"under-voltage NOW (throttled={raw})", advice)
    if flags.get("under_voltage_occurred"):
        return Check("WARN", "power", f"under-voltage has occurred since boot (throttled={raw})", advice)
    if flags.get("throttled_occurred") or flags.get("soft_temp_limit_occurred"):
        return Check("WARN", "power", f"CPU was throttled since boot (throttled={raw})", "check cooling")
    return Check("PASS", "power", f"no under-voltage since boot (throttled={raw})")


# -- simulation -----------------------------------------------------------------------------


def simulated_frames(directory: Path, card_text: str, *, n: int = 20) -> Path:
    """Write a replay of the card held up to the gate: ``n`` frames, a few distinct renders."""

    rng = np.random.default_rng(11)
    directory.mkdir(parents=True, exist_ok=True)
    renders = [
        synth.render_scene(
            card_text, rng, module_px=4.0, angle_deg=5.0, perspective=5.0, blur=0.5, noise=2.0, brightness=1.0
        )
        for _ in range(3)
    ]
    for i in range(n):
        cv2.imwrite(str(directory / f"{i:05d}.png"), renders[i % len(renders)])
    return directory


@contextmanager
def _simulation(
    config: Config, work: Path, key_path: Path | None
) -> Iterator[tuple[Config, Any, list[dict[str, Any]], str]]:
    """(config with replay source and mock pins, pin factory, card trust, broker note)."""

    key, kid, entry = card_issuer(key_path)
    frames = simulated_frames(work / "frames", issue_card_text(key, kid))
    camera = replace(config.camera, source=f"dir:{frames}", fps=10.0)
    gpio = replace(config.gpio, pin_factory="mock")
    config = replace(config, camera=camera, gpio=gpio)
    note = ""
    broker = None
    if not _reachable(config.mqtt.host, config.mqtt.port):
        try:
            broker = LocalBroker(work / "broker").start()
        except BrokerError as exc:
            note = f"no broker: {exc}".splitlines()[0]
        else:
            mqtt = replace(
                config.mqtt,
                host=broker.host,
                port=broker.port,
                tls=False,
                ca_file=None,
                cert_file=None,
                key_file=None,
                username=None,
            )
            config = replace(config, mqtt=mqtt)
            note = " [simulated: private mosquitto]"
    factory = MockFactory()
    try:
        yield config, factory, [entry], note
    finally:
        factory.close()
        if broker is not None:
            broker.stop()


# -- the run --------------------------------------------------------------------------------


def run_selftest(
    config: Config,
    *,
    simulate: bool = False,
    card_keys: list[dict[str, Any]] | None = None,
    key_path: Path | None = None,
    out: Callable[[str], None] = print,
    say: Callable[[str], None] | None = None,
    camera_s: float = CAMERA_S,
    unattended: bool = False,
    door_timeout_s: float = DOOR_TIMEOUT_S,
) -> list[Check]:

    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    checks: list[Check] = []

    def record(check: Check | None) -> None:
        if check is not None:
            checks.append(check)
            out(check.line())

    with ExitStack() as stack:
        trust = list(card_keys or [])
        broker_note = ""
        if simulate:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gate-selftest-")))
            config, factory, sim_trust, broker_note = stack.enter_context(_simulation(config, work, key_path))
            trust += sim_trust
        else:
            try:
                factory = make_pin_factory(config.gpio.pin_factory)
            except PinFactoryError as exc:
                factory = None
                pin_error = str(exc)
            else:
                stack.callback(factory.close)
        say("camera: hold the self-test card 20-40 cm in front of the camera now")
        camera = check_camera(config, open_source(config.camera), duration=camera_s)
        record(camera.check)
        if unattended:
            # Nobody holds a card up, and a relay pulse would open the gate with nobody there.
            record(Check("WARN", "decode", "skipped (--unattended)", "run it at the gate with the card"))
            record(
                Check("WARN", "signals", "skipped (--unattended)", "run it at the gate to see and hear them")
            )
            if config.door.pins():
                record(
                    Check("WARN", "door", "skipped (--unattended)", "run it at the gate to trip each input")
                )
        elif factory is None:
            record(check_decode(config, camera.frames, trust))
            record(Check("FAIL", "signals", pin_error, "run on the Pi, or set gpio.pin_factory"))
        else:
            record(check_decode(config, camera.frames, trust))
            record(check_signals(config, factory, say=say))
            for check in check_door(config, factory, say=say, simulate=simulate, timeout=door_timeout_s):
                record(check)
        if broker_note.startswith("no broker"):
            record(Check("WARN", "broker", broker_note, "install mosquitto to simulate the broker"))
        else:
            record(check_broker(config, label=broker_note))
        record(check_certificate(config))
        record(check_clock(clock_synced()))
        record(check_disk(config.storage.dir))
        record(check_outbox(config.storage.dir / "outbox.db"))
        record(check_temperature(cpu_temp_c()))
        record(check_power(ThrottleReader().read()))
    return checks


def save_result(state_dir: Path, checks: list[Check], now: datetime | None = None) -> Path:
    """Keep the result beside the outbox: the daemon publishes it in its retained ``status``."""
    return health.save_selftest(
        state_dir,
        passed=not any(c.status == "FAIL" for c in checks),
        checks=[{"name": c.name, "status": c.status, "detail": c.detail} for c in checks],
        now=now or datetime.now(UTC),
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path)
    p.add_argument(
        "--simulate", action="store_true", help="replayed frames, mock pins, private broker if none"
    )
    p.add_argument(
        "--unattended",
        action="store_true",
        help="nobody at the gate: skip the card and the relay (fleet updates)",
    )
    p.add_argument("--card", type=Path, help="write a printable self-test card PNG here and exit")
    p.add_argument("--key", type=Path, help="issuer key (pass keygen) to sign the card; default: throwaway")
    p.add_argument(
        "--card-key",
        type=Path,
        action="append",
        default=[],
        help="trust entry (issuer.pub.json / CARD.pub.json) the card may be signed with",
    )


def main(args: argparse.Namespace) -> int:
    setup_logging("warning")
    if args.card is not None:
        try:
            pub = write_card(args.card, args.key)
        except (OSError, ValueError) as exc:
            print(f"selftest --card: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"wrote {args.card}" + (f" and its key entry {pub} (use --card-key {pub})" if pub else ""))
        return EXIT_OK
    config = load_or_report(args.config)
    if config is None:
        return EXIT_USAGE

    keys = []
    try:
        for path in args.card_key:
            entry = json.loads(path.read_text(encoding="utf-8"))
            trusted_key_from_json(entry, where=str(path))
            keys.append(entry)
    except (OSError, ValueError, TrustError) as exc:
        print(f"selftest --card-key: {exc}", file=sys.stderr)
        return EXIT_USAGE
    checks = run_selftest(
        config, simulate=args.simulate, card_keys=keys, key_path=args.key, unattended=args.unattended
    )
    failed = [c.name for c in checks if c.status == "FAIL"]
    if not args.simulate:
        try:
            save_result(config.storage.dir, checks)
        except OSError as exc:
            print(f"selftest: result not saved for status ({exc})", file=sys.stderr)
    print(
        f"selftest: {len(checks) - len(failed)} of {len(checks)} checks passed or warned"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""),
        flush=True,
    )
    return EXIT_FAILED if failed else EXIT_OK
