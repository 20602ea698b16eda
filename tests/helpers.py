"""Helpers shared by the tests of every room: configs, gates on mock pins, sources, processes.

One place for each: a test file that needs one of these imports it from here, never from
another test file.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import itertools
import json
import queue
import subprocess
import sys
import threading
import time
import tomllib
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from gpiozero.pins.mock import MockFactory, MockPin

from scanner import config as config_mod
from scanner import events
from scanner.central.collector import parse_event
from scanner.central.store import Store, StoredEvent
from scanner.credentials import base45, dcc
from scanner.credentials.signed import TrustedKey, TrustStore
from scanner.fleet.passes import default_kid
from scanner.gate.app import App
from scanner.gate.decode import Decoder
from scanner.gate.outbox import Outbox
from scanner.gate.pipeline import Alarms, Gate, SystemClock
from scanner.gate.signals import Signals
from scanner.models import Frame
from scanner.sim import synth
from scanner.sim.localbroker import LocalBroker
from tests.mqtt_helpers import wait_until

REPO = Path(__file__).resolve().parents[1]


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- configs -------------------------------------------------------------------------------


def merged(*tables: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Config tables laid over each other, section by section (later keys win)."""
    out: dict[str, dict[str, Any]] = {}
    for table in tables:
        for section, values in table.items():
            out.setdefault(section, {}).update(values)
    return out


def make_config(
    tmp_path: Path, *layers: Mapping[str, Mapping[str, Any]], **sections: Mapping[str, Any]
) -> config_mod.Config:
    """A gate config that touches nothing real: replayed frames that are never opened, mock pins,
    a broker port where nothing listens, state under ``tmp_path``. ``layers`` (a test file's own
    defaults) and then ``sections`` are laid over it."""
    base = {
        "device": {"id": "gate-t", "site": "site-t"},
        "camera": {"source": "dir:unused"},
        "gpio": {"pin_factory": "mock"},
        "mqtt": {"host": "127.0.0.1", "port": 9},  # nothing listens: the gate must not care
        "storage": {"dir": str(tmp_path / "state")},
    }
    return config_mod.from_table(merged(base, *layers, sections))


def toml_text(table: dict[str, Any]) -> str:
    """A config table as TOML (flat sections of scalars and lists, all our configs need)."""
    lines = []
    for section, values in table.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def toml_with(path: Path, overrides: dict[str, object]) -> dict[str, Any]:
    """The TOML file at ``path`` as a table, with ``section.key`` overrides."""
    table = tomllib.loads(path.read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        table.setdefault(section, {})[key] = value
    return table


# --- a gate on mock pins ---------------------------------------------------------------------

CODE_FRAME = synth.render_scene("EMP-0001", np.random.default_rng(5))
BLANK = np.full(CODE_FRAME.shape, 128, dtype=np.uint8)


def rising_edges(states: list[bool]) -> int:
    return sum(1 for before, after in itertools.pairwise(states) if after and not before)


def energised_relay(factory: MockFactory, gpio: config_mod.GpioConfig) -> Callable[[], list[bool]]:
    """Leave the relay pin at its energised level, as a daemon killed mid-pulse can leave it.

    A fresh mock pin reads low, which is "off" for an active-high relay: without this, a history
    that starts off proves nothing about the daemon driving it off. Returns a reader of the
    pin's levels from that energised one on, so the daemon's first write is element 1.
    """
    pin = factory.pin(gpio.relay_pin)
    pin.function = "output"
    pin.state = gpio.relay_active_high
    start = len(pin.states) - 1
    return lambda: [s.state for s in pin.states[start:]]


class OrderCheckingSignals(Signals):
    """Real Signals that also record how many events were durable when the relay was asked to open."""

    def __init__(self, *args, outbox: Outbox, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.depth_at_accept: list[int] = []
        self._outbox_for_check = outbox

    def accepted(self) -> None:
        self.depth_at_accept.append(Outbox(self._outbox_for_check.path, 100).depth())
        super().accepted()


def make_gate(cfg, signals, outbox) -> Gate:
    return Gate(
        cfg,
        decoder=Decoder(("zxing",)),
        outbox=outbox,
        signals=signals,
        pseudonymizer=events.Pseudonymizer(b"k" * 32),
        clock=SystemClock(),
        alarms=Alarms(),
    )


class HeldSource:
    """A camera showing whatever ``image`` is set to, ~50 fps (one frame per ``period_s``), until closed."""

    finite = False

    def __init__(self, image: np.ndarray | None = None, period_s: float = 0.02) -> None:
        image = BLANK if image is None else image
        self.image = image
        self._seq = 0
        self._period_s = period_s

    def open(self) -> None:
        pass

    def read(self, timeout: float) -> Frame:
        time.sleep(self._period_s)
        self._seq += 1
        return Frame(self.image, self._seq, time.monotonic())

    def close(self) -> None:
        pass


# --- door inputs on mock pins ----------------------------------------------------------------


class ContactPin(MockPin):
    """A mock input wired to a dry contact: while the contact is closed it holds the pin at the
    rail opposite its pull (GND under a pull-up), whatever the pull says; open, the pull wins.
    A plain MockPin jumps to its pull's level when a device sets the pull, which would make a
    normally-closed input read "open" at start."""

    def __init__(self, factory: MockFactory, info: Any) -> None:
        self.contact_closed = False
        super().__init__(factory, info)

    def _change_state(self, value: bool) -> bool:
        if self.contact_closed and self._function == "input":
            value = self._pull == "down"
        return super()._change_state(value)

    def close_contact(self) -> None:
        self.contact_closed = True
        if self._pull == "down":
            self.drive_high()
        else:
            self.drive_low()

    def open_contact(self) -> None:
        self.contact_closed = False
        if self._pull == "up":
            self.drive_high()
        elif self._pull == "down":
            self.drive_low()

    def set_contact(self, closed: bool) -> None:
        if closed:
            self.close_contact()
        else:
            self.open_contact()


class ContactFactory(MockFactory):
    """MockFactory whose pins are :class:`ContactPin`: ``contact(pin)`` to wire and drive one."""

    def __init__(self) -> None:
        super().__init__(pin_class=ContactPin)

    def contact(self, number: int) -> ContactPin:
        pin: ContactPin = self.pin(number)
        return pin


# --- personal data on a card and in a health certificate ------------------------------------

# An invented CCCD card (the number follows the card rules but belongs to nobody).
CCCD_NUMBER = "079187004321"
CCCD_NAME = "Đoàn Thị Xuân Quỳnh"
CCCD_BORN = "05061987"
CCCD_ADDRESS = "Tổ 9, Khu phố Bình Đức, Phường Lái Thiêu, Thuận An, Bình Dương"
CCCD_CARD = f"{CCCD_NUMBER}|281234567|{CCCD_NAME}|{CCCD_BORN}|Nữ|{CCCD_ADDRESS}|20072021"
CCCD_PERSONAL = (CCCD_NUMBER, "281234567", CCCD_NAME, "Xuân Quỳnh", CCCD_BORN, CCCD_ADDRESS, "Lái Thiêu")


@dataclass(frozen=True)
class SignedDcc:
    """An EU DCC signed by a throw-away issuer, the trust list that verifies it, what in it is personal."""

    payload: str
    trust_file: Path
    personal: tuple[str, ...]


def signed_dcc(workdir: Path, now: datetime | None = None) -> SignedDcc:
    """A completed vaccination (last dose 60 days ago) as an HC1 payload, ES256-signed by a
    throw-away document signer whose certificate is written as the gate's DCC trust list."""
    now = now or datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "DSC test"), x509.NameAttribute(NameOID.COUNTRY_NAME, "VN")]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=365))
        .not_valid_after(now + timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    kid = dcc.certificate_kid(der)
    trust = {
        "version": "1",
        "issued": events.utc_ms(now),
        "certificates": [
            {
                "certificate": base64.b64encode(der).decode(),
                "kid": base64.b64encode(kid).decode(),
                "country": "VN",
            }
        ],
    }
    trust_file = workdir / "dcc-trust.json"
    trust_file.write_text(json.dumps(trust))
    uvci = "URN:UVCI:01:VN:QX7LUU2024"
    hcert = {
        "ver": "1.3.0",
        "nam": {"fn": "Lưu", "fnt": "LUU", "gn": "Thị Hồng Nhung", "gnt": "THI<HONG<NHUNG"},
        "dob": "1987-06-05",
        "v": [
            {
                "tg": "840539006",
                "vp": "1119349007",
                "mp": "EU/1/20/1528",
                "dn": 2,
                "sd": 2,
                "dt": (now - timedelta(days=60)).date().isoformat(),
                "co": "VN",
                "is": "Bo Y te",
                "ci": uvci,
            }
        ],
    }
    protected = cbor2.dumps({1: dcc.ES256, 4: kid})
    claims = cbor2.dumps(
        {
            1: "VN",
            6: int((now - timedelta(days=1)).timestamp()),
            4: int((now + timedelta(days=30)).timestamp()),
            -260: {1: hcert},
        }
    )
    r, s = decode_dss_signature(
        key.sign(cbor2.dumps(["Signature1", protected, b"", claims]), ec.ECDSA(hashes.SHA256()))
    )
    cose = cbor2.dumps(
        cbor2.CBORTag(18, [protected, {}, claims, r.to_bytes(32, "big") + s.to_bytes(32, "big")])
    )
    payload = "HC1:" + base45.encode(zlib.compress(cose, 9))
    personal = ("Lưu", "Thị Hồng Nhung", "Hồng Nhung", "THI<HONG<NHUNG", "HONG", "NHUNG", "1987-06-05", uvci)
    return SignedDcc(payload, trust_file, personal)


def spellings(secret: str | bytes) -> set[str]:
    """``secret`` as it could show up in a log line: as is, and as Python prints str and bytes."""
    raw = secret if isinstance(secret, bytes) else secret.encode("utf-8")
    forms = {repr(raw)[2:-1], raw.hex()}
    if isinstance(secret, str):
        forms |= {secret, repr(secret)[1:-1], secret.encode("unicode_escape").decode("ascii")}
    return forms


# --- operator commands -----------------------------------------------------------------------

OPERATOR = Ed25519PrivateKey.generate()


OPERATOR_KID = default_kid(OPERATOR.public_key())


def write_operator_keys(path: Path) -> Path:
    store = TrustStore.of(
        [TrustedKey(OPERATOR_KID, OPERATOR.public_key(), "control room")], version=1, issued=datetime.now(UTC)
    )
    path.write_text(json.dumps(store.to_json()))
    return path


BIG_DENY = "# version: 8\n" + "".join(f"EMP-{i:04d}\n" for i in range(2000))  # ~20 kB


def deny_config(tmp_path: Path) -> tuple[config_mod.Config, Path]:
    deny = tmp_path / "deny.txt"
    deny.write_text("# version: 7\nEMP-0001\n")
    cfg = config_mod.from_table(
        {"device": {"id": "gate-u", "site": "site-u"}, "policy": {"denylist_file": str(deny)}}
    )
    return cfg, deny


# --- a whole gate on a real broker -------------------------------------------------------------


def gate_config(broker: LocalBroker, tmp_path: Path, **sections: dict[str, Any]) -> config_mod.Config:
    table: dict[str, Any] = {
        "device": {"id": unique_name("gate"), "site": unique_name("site")},
        "camera": {
            "source": "dir:unused",
            "fps": 50.0,
            "capture_timeout_s": 0.5,
            "black_frames": 0,
            "frozen_frames": 0,
        },
        "decoder": {"engines": ["zxing"], "isolate": False},
        "gpio": {"pin_factory": "mock", "relay_pulse_s": 0.2},
        "mqtt": {"host": broker.host, "port": broker.port, "keepalive_s": 5},
        "storage": {"dir": str(tmp_path / "state")},
        "daemon": {"drain_timeout_s": 0.5},
        "commands": {"operator_keys_file": str(write_operator_keys(tmp_path / "ops.json"))},
    }
    return config_mod.from_table(merged(table, sections))


@contextlib.contextmanager
def running(
    cfg: config_mod.Config,
    factory: MockFactory,
    source: HeldSource,
    *,
    online: bool = True,
    **app_kwargs: Any,
) -> Iterator[App]:
    """The daemon's App in a thread until the block ends (``app_kwargs``: clock, clock_synced, ...);
    with ``online``, from the moment it is subscribed on its broker."""
    app = App(cfg, pin_factory=factory, source=source, **app_kwargs)
    stop = threading.Event()
    thread = threading.Thread(target=app.run, args=(stop,), name="test-app", daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: app._publisher is not None and app.gate is not None, 10)
        assert not online or app._publisher.wait_subscribed(10)
        yield app
    finally:
        stop.set()
        thread.join(20)
    assert not thread.is_alive()


# --- a collector's store with a fleet in it -----------------------------------------------------


def seed_devices(store: Store, n: int, *, gaps_every: int = 0, name_len: int = 10) -> None:
    """One check-in (seq 1) from each of ``n`` devices at as many sites, straight into ``store``;
    every ``gaps_every``-th device also has seq 3 and so misses seq 2. Names are ``name_len``
    characters, so a test can make each device's line in the collector's status as long as
    it needs."""
    ids = events.Uuid7()
    rows = []
    for i in range(n):
        site, device = f"s{i:0{name_len - 1}d}", f"g{i:0{name_len - 1}d}"
        for seq in (1, 3) if gaps_every and i % gaps_every == 0 else (1,):
            rows.append(
                StoredEvent(
                    event_id=ids.new(),
                    device=device,
                    site=site,
                    direction="in",
                    seq=seq,
                    ts="2026-11-29T08:00:00.000Z",
                    subject=None,
                    decision="accepted",
                    reason="ok",
                    credential_type="plain",
                    raw="{}",
                )
            )
    for start in range(0, len(rows), 10_000):
        store.insert_batch(rows[start : start + 10_000])


# --- processes --------------------------------------------------------------------------------


class MonitorProcess:
    """`python -m scanner monitor --json ...`, its stdout lines on a queue."""

    def __init__(self, config: Path, *args: str, stderr: Path) -> None:
        self.lines: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.raw: list[str] = []  # every stdout line as printed
        with stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scanner", "monitor", "--config", str(config), "--json", *args],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.raw.append(line)
            self.lines.put(json.loads(line))

    def until(self, predicate: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Collect lines until ``predicate(lines so far)`` holds; fail after ``timeout``."""
        seen: list[dict[str, Any]] = []
        while not predicate(seen):
            try:
                obj = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"monitor printed nothing matching within {timeout} s: {seen}") from None
            seen.append(obj)
        return seen

    def finish(self, timeout: float = 10.0) -> tuple[int, list[dict[str, Any]]]:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout)
        rest = []
        while not self.lines.empty():
            rest.append(self.lines.get_nowait())
        return code, rest

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


# --- certificates ------------------------------------------------------------------------------


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed EC P-256 certificate and its key as PEM files: ``name.crt``, ``name.key``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


# --- check-ins as the collector stores them (tests/central) ---------------------------------


class Checkins:
    """Check-in events for the collector's store, as a gate of the contract would send them
    (exits, annulments, the exit button), each through the collector's own ``parse_event``."""

    def __init__(self, prefix: str = "gate") -> None:
        self.prefix = prefix
        self._ids = events.Uuid7()
        self._seqs: dict[str, int] = {}

    def event(
        self,
        site: str,
        direction: str,
        at: datetime,
        subject: str | None,
        *,
        decision: str = "accepted",
        reason: str = "ok",
        annuls: str | None = None,
        device: str | None = None,
        credential_type: str = "plain",
    ) -> Any:
        device = device or f"{site}-{direction}"
        self._seqs[device] = self._seqs.get(device, 0) + 1
        credential: dict[str, Any] = {"type": credential_type}
        if subject is not None:
            credential["subject"] = subject
        doc: dict[str, Any] = {
            "schema": events.SCHEMA,
            "event_id": self._ids.new(int(at.timestamp() * 1000)),
            "seq": self._seqs[device],
            "device": device,
            "site": site,
            "direction": direction,
            "ts": events.utc_ms(at),
            "clock_synced": True,
            "decision": decision,
            "reason": reason,
            "credential": credential,
        }
        if annuls is not None:
            doc["annuls"] = annuls
        return parse_event(f"{self.prefix}/{site}/{device}/checkin", json.dumps(doc).encode(), self.prefix)

    def annul(self, entry: Any, at: datetime) -> Any:
        """The door never saw ``entry``'s holder pass: the event that takes it back."""
        return self.event(
            entry.site,
            entry.direction,
            at,
            entry.subject,
            decision="annulled",
            reason="no_passage",
            annuls=entry.event_id,
            device=entry.device,
        )


class FakeClock:
    """Wall and monotonic time that move only when a test moves them (the pipeline's Clock)."""

    def __init__(self, wall: dt.datetime) -> None:
        self.wall = wall
        self.mono = 1000.0

    def now(self) -> dt.datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += dt.timedelta(seconds=seconds)
        self.mono += seconds
