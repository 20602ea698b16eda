"""Typed configuration: one TOML file, secrets in separate files (README: Configuration).

Each section is a frozen dataclass; the loader walks the TOML table against the dataclass
fields, so unknown keys, wrong types and out-of-range values are all reported together as
``file: section.key: problem`` lines. pydantic would do the same walking, but it costs
~17 MB of RSS and ~200 ms of start-up on a device whose whole budget is 100 MB and 2 s.
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
import types
import typing
import zoneinfo
from dataclasses import MISSING, dataclass, field, fields, replace
from datetime import timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any, Literal

# Device ids, site names, topic prefixes and collector names: safe as an MQTT topic segment
# and client id, and as a file name. Every reader of such a name checks it with this.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_NAME = NAME.pattern
_NAME_DOC = "1-64 letters, digits, '_', '-', '.'"
# A config for the central side (collector, trace, monitor) may leave [device] out.
_CENTRAL_DEVICE = {"id": "central", "site": "central"}


def _opt(default: Any, doc: str, **checks: Any) -> Any:
    return field(default=default, metadata={"doc": doc, **checks})


def _req(doc: str, **checks: Any) -> Any:
    return field(metadata={"doc": doc, **checks})


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    id: str = _req("unique per device: MQTT client id and topic segment", pattern=_NAME)
    site: str = _req("site name: topic segment", pattern=_NAME)
    direction: Literal["in", "out"] = _opt("in", "which way this gate lets people through")


@dataclass(frozen=True, slots=True)
class CameraConfig:
    source: str = _opt("picamera2", "picamera2 | v4l2:/dev/videoN | rtsp://… | file:clip.mp4 | dir:frames/")
    width: int = _opt(640, "frame width in pixels", min=64, max=4096)
    height: int = _opt(480, "frame height in pixels", min=64, max=4096)
    fps: float = _opt(30.0, "capture rate; dir: sources are paced at it", min=0.1, max=120.0)
    capture_timeout_s: float = _opt(
        2.0, "longest wait for one frame before the camera counts as stalled", min=0.1, max=60.0
    )
    camera_num: int = _opt(0, "picamera2 camera index", min=0, max=7)
    # picamera2 controls: each is applied only when the camera advertises it (see camera/picam.py).
    autofocus: Literal["continuous", "manual", "off"] = _opt(
        "continuous",
        "picamera2 focus: continuous AF (Camera Module 3), manual at lens_position, or off (untouched)",
    )
    lens_position: float = _opt(
        3.0, "manual focus in dioptres (1 / distance in m; 3.0 ≈ 33 cm, 0 = infinity)", min=0.0, max=32.0
    )
    exposure_max_us: int = _opt(
        20_000,
        "picamera2: longest shutter the auto exposure may use (0 = up to the frame period)",
        min=0,
        max=1_000_000,
    )
    analogue_gain_max: float = _opt(
        0.0,
        "picamera2: highest analogue gain the auto exposure may use (0 = tuning default)",
        min=0.0,
        max=64.0,
    )
    ev: float = _opt(
        0.0, "picamera2 exposure compensation in stops; negative darkens bright screens", min=-8.0, max=8.0
    )
    ae_constraint: Literal["highlight", "normal"] = _opt(
        "highlight", "picamera2 auto exposure: highlight keeps bright phone screens from burning out"
    )
    # Watchdog (camera/watchdog.py): when the camera counts as failed and how it is reopened.
    stall_timeout_s: float = _opt(
        10.0,
        "no frame for this long (even from a hung driver call) counts as a camera failure",
        min=0.5,
        max=600.0,
    )
    black_level: int = _opt(20, "a frame whose mean brightness is below this counts as black", min=0, max=255)
    black_frames: int = _opt(
        150, "this many black frames in a row count as a camera failure (0 = never)", min=0, max=100_000
    )
    frozen_frames: int = _opt(
        90,
        "this many frames in a row byte-identical to the one before count as a frozen camera (0 = never)",
        min=0,
        max=100_000,
    )
    reopen_backoff_s: float = _opt(
        0.5, "first wait before reopening a failed camera; doubles", min=0.01, max=60.0
    )
    reopen_backoff_max_s: float = _opt(30.0, "longest wait between reopen attempts", min=0.01, max=600.0)
    give_up_after_s: float = _opt(
        120.0,
        "camera down this long: stop feeding the systemd watchdog so the service restarts (0 = at once)",
        min=0.0,
        max=86_400.0,
    )


@dataclass(frozen=True, slots=True)
class DecoderConfig:
    engines: tuple[str, ...] = _opt(
        ("zxing", "zbar"),
        "zxing on every frame; zbar only on a candidate zxing could not read",
        choices=("zxing", "zbar"),
    )
    isolate: bool = _opt(
        True,
        "decode in a child process with a 1 s deadline per frame, so a crash or hang in native"
        " decoder code costs one frame and a respawn, not the daemon (~0.15 ms a frame)",
    )


@dataclass(frozen=True, slots=True)
class TrackConfig:
    gone_after_s: float = _opt(
        1.5, "a code counts as a new scan only after it was out of view this long", min=0.1, max=600.0
    )


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    accept: tuple[str, ...] = _opt(
        ("signed", "dcc", "cccd", "plain"),
        "credential types that may open the gate",
        choices=("signed", "dcc", "cccd", "plain"),
    )
    allowlist_file: Path | None = _opt(
        None,
        "one identity per line (raw value or pseudonym); when set, only listed ones pass",
        must_exist=True,
    )
    denylist_file: Path | None = _opt(
        None,
        "one identity per line (raw value or pseudonym); listed ones are rejected",
        must_exist=True,
    )
    revocation_file: Path | None = _opt(
        None, "revoked pass ids / DCC certificate ids, one per line (hex or text)", must_exist=True
    )
    pass_trust_file: Path | None = _opt(
        None, "JSON trust store of pass issuer keys (gate-scanner pass keygen)", must_exist=True
    )
    dcc_trust_file: Path | None = _opt(
        None, "JSON trust list of EU DCC signing certificates", must_exist=True
    )
    anti_passback_s: float = _opt(
        60.0,
        "the same credential accepted again at this gate within this time is rejected; 0 = off",
        min=0.0,
        max=86_400.0,
    )
    max_list_age_h: float = _opt(
        0.0,
        "trust, revocation and allow/deny lists older than this are stale; 0 = never",
        min=0.0,
        max=8760.0,
    )
    stale_lists: Literal["reject", "flag"] = _opt(
        "reject", "with a stale list: reject (stale_trust_data) or accept and flag the event"
    )


@dataclass(frozen=True, slots=True)
class DccConfig:
    vaccination: bool = _opt(True, "a completed vaccination counts")
    test: bool = _opt(True, "a negative test counts")
    recovery: bool = _opt(True, "a recovery certificate counts")
    vaccination_min_days: int = _opt(14, "days after the last dose before it counts", min=0, max=365)
    test_max_hours: int = _opt(72, "how old a negative test may be", min=1, max=720)


@dataclass(frozen=True, slots=True)
class GpioConfig:
    pin_factory: Literal["auto", "mock", "lgpio", "rpigpio", "pigpio", "native"] = _opt(
        "auto", "gpiozero pin factory; mock for demos and tests"
    )
    relay_pin: int = _opt(17, "BCM number of the relay driver input", min=0, max=53)
    relay_active_high: bool = _opt(True, "true when a high level energises the relay")
    relay_pulse_s: float = _opt(3.0, "how long the relay is energised on accept", min=0.1, max=30.0)
    relay_max_on_s: float = _opt(
        10.0, "hard ceiling on any single energising of the relay", min=0.1, max=60.0
    )
    green_pin: int = _opt(27, "BCM number of the green LED", min=0, max=53)
    red_pin: int = _opt(22, "BCM number of the red LED", min=0, max=53)
    buzzer_pin: int = _opt(23, "BCM number of the buzzer", min=0, max=53)


@dataclass(frozen=True, slots=True)
class SiteConfig:
    capacity: int = _opt(
        0,
        "most people inside the site at once: at the cap entry gates reject (capacity_full) or, soft,"
        " accept flagged over_capacity; exits are never refused; 0 = no cap",
        min=0,
        max=1_000_000,
    )
    capacity_mode: Literal["hard", "soft"] = _opt(
        "hard", "at the cap: hard rejects entries (capacity_full); soft accepts them flagged over_capacity"
    )
    day_start: str = _opt(
        "04:00",
        "local time (HH:MM in site.timezone) at which the day's counts start again",
        pattern=r"([01][0-9]|2[0-3]):[0-5][0-9]",
        pattern_doc="a time HH:MM from 00:00 to 23:59",
    )
    timezone: str = _opt(
        "+07:00",
        "the site's time zone for day_start: a UTC offset (Vietnam: +07:00, no daylight saving)"
        " or an IANA name such as Asia/Ho_Chi_Minh",
    )
    check_exits: bool = _opt(
        False,
        "exit gates (direction out) check codes like entry gates (a paid area); false: they open for"
        " any readable code and record who left",
    )
    stale_after_s: float = _opt(
        120.0,
        "a sibling gate's counter not refreshed for this long, or this gate cut off from the broker"
        " this long, makes the site's count stale (occupancy_stale alarm when capacity is set)",
        min=2.0,
        max=3600.0,
    )
    gates: tuple[str, ...] = _opt(
        (),
        "device ids of the site's gates; when set, occupancy counters of any other device are ignored"
        " (the shipped broker ACL cannot stop a gate of another site writing under this site); empty:"
        " every device under the site's topic counts",
        pattern=_NAME,
    )

    @property
    def tz(self) -> tzinfo:
        return time_zone(self.timezone)

    @property
    def day_start_offset(self) -> timedelta:
        hours, minutes = self.day_start.split(":")
        return timedelta(hours=int(hours), minutes=int(minutes))


@dataclass(frozen=True, slots=True)
class DoorConfig:
    """The door's inputs (README: The door). Each is off until its pin is set."""

    passage_pin: int | None = _opt(
        None,
        "BCM pin of the door contact or turnstile rotation sensor; set: accepted entries nobody"
        " passes through are annulled, passages nobody was let through are forced",
        min=0,
        max=53,
    )
    passage_contact: Literal["nc", "no"] = _opt(
        "nc",
        "nc: the contact is closed while the door is shut (a reed contact); no: it closes while"
        " someone passes (a turnstile's rotation contact)",
    )
    exit_pin: int | None = _opt(None, "BCM pin of the request-to-exit button", min=0, max=53)
    exit_contact: Literal["no", "nc"] = _opt("no", "no: the button closes its contact when pressed")
    fire_pin: int | None = _opt(
        None,
        "BCM pin of the fire panel's alarm contact, always normally closed: open (fire, or a cut"
        " wire) holds the door released",
        min=0,
        max=53,
    )
    tamper_pin: int | None = _opt(None, "BCM pin of the enclosure's tamper switch", min=0, max=53)
    tamper_contact: Literal["nc", "no"] = _opt(
        "nc", "nc: the switch is closed while the enclosure is shut, so a cut wire reads as tamper"
    )
    pull_up: bool = _opt(
        True,
        "true: contacts switch to GND, internal pull-up; false: contacts switch to 3.3 V, internal pull-down",
    )
    debounce_s: float = _opt(
        0.02,
        "a change acts at once; further changes within this time are contact bounce, and the"
        " level is read again when it ends",
        min=0.0,
        max=1.0,
    )
    passage_timeout_s: float = _opt(
        10.0,
        "an accepted entry not followed by a passage within this time is annulled",
        min=0.5,
        max=600.0,
    )
    door_held_open_s: float = _opt(
        30.0,
        "the passage input active longer than this raises door_held_open (0 = never)",
        min=0.0,
        max=86_400.0,
    )

    def pins(self) -> dict[str, int]:
        """Configured input name → BCM pin."""
        named = {
            "passage_pin": self.passage_pin,
            "exit_pin": self.exit_pin,
            "fire_pin": self.fire_pin,
            "tamper_pin": self.tamper_pin,
        }
        return {name: pin for name, pin in named.items() if pin is not None}


@dataclass(frozen=True, slots=True)
class MqttConfig:
    host: str = _opt("localhost", "broker host name or address")
    port: int = _opt(1883, "broker port", min=1, max=65535)
    topic_prefix: str = _opt("gate", "first topic segment", pattern=_NAME)
    protocol: Literal["5", "3.1.1"] = _opt("5", "MQTT protocol version")
    # mosquitto refuses MQTT 3.1.1 clients above its max_keepalive (300 in deploy/).
    keepalive_s: int = _opt(
        30, "MQTT keepalive; at most 300, the shipped broker's max_keepalive", min=5, max=300
    )
    tls: bool = _opt(False, "connect with TLS; needs ca_file")
    ca_file: Path | None = _opt(None, "CA bundle that signed the broker certificate", must_exist=True)
    cert_file: Path | None = _opt(None, "client certificate (PEM)", must_exist=True)
    key_file: Path | None = _opt(None, "client private key (PEM)", must_exist=True)
    username: str | None = _opt(None, "MQTT user name")
    password_file: Path | None = _opt(None, "file holding the MQTT password", must_exist=True)


@dataclass(frozen=True, slots=True)
class StorageConfig:
    dir: Path = _opt(Path("/var/lib/gate-scanner"), "state directory: outbox, keys")
    delivery: Literal["collector", "broker"] = _opt(
        "broker", "forget an event on the collector's ack, or on the broker's PUBACK"
    )
    outbox_max_events: int = _opt(
        200_000, "bound on unsent events; at the bound the gate fails secure", min=10, max=10_000_000
    )
    subject_key_file: Path | None = _opt(
        None, "HMAC key for subject pseudonyms (default: <dir>/subject.key, made on first run)"
    )


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    drain_timeout_s: float = _opt(
        10.0, "how long a finite run waits for the outbox to empty before exiting", min=0.0, max=3600.0
    )
    log_level: Literal["debug", "info", "warning", "error"] = _opt("info", "log verbosity")


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    interval_s: float = _opt(30.0, "seconds between retained health publications", min=0.2, max=3600.0)


@dataclass(frozen=True, slots=True)
class CommandsConfig:
    operator_keys_file: Path | None = _opt(
        None,
        "JSON store of operator Ed25519 keys (pass trust store format) that may sign open, reload"
        " and lists; unset: those commands are refused",
        must_exist=True,
    )
    max_age_s: float = _opt(
        60.0,
        "a signed command whose ts is further than this from the gate's clock is stale",
        min=1.0,
        max=3600.0,
    )


@dataclass(frozen=True, slots=True)
class HomeAssistantConfig:
    enabled: bool = _opt(False, "publish retained Home Assistant MQTT discovery configs on connect")
    discovery_prefix: str = _opt("homeassistant", "Home Assistant discovery topic prefix", pattern=_NAME)


@dataclass(frozen=True, slots=True)
class CollectorConfig:
    store: str = _opt("sqlite:/var/lib/gate-scanner/collector.db", "sqlite:PATH or postgresql://…")
    name: str = _opt(
        "collector",
        "unique per collector: MQTT client id and status topic segment (several may share one store)",
        pattern=_NAME,
    )
    session_expiry_s: int = _opt(
        3600,
        "how long the broker queues check-ins for this collector while it is down",
        min=0,
        max=604_800,
    )
    retention_days: int = _opt(
        28,
        "check-ins, stays and rejected messages older than this are deleted, every day: tracing needs"
        " the 14 days before a case fell ill plus the days until the case is reported, and nothing else",
        min=1,
        max=3650,
    )
    max_stay_h: float = _opt(
        12.0,
        "an entry with no exit is closed after this long (or at the day end, if sooner)",
        min=0.25,
        max=24.0,
    )
    default_stay_min: float = _opt(
        30.0, "at a site with no exit gates, a stay lasts this long from the entry scan", min=1.0, max=1440.0
    )
    day_start: str = _opt(
        "04:00",
        "local time at which the sites' day ends and the next begins (entries with no exit close then)",
        pattern=r"([01][0-9]|2[0-3]):[0-5][0-9]",
    )
    timezone: str = _opt(
        "Asia/Ho_Chi_Minh", "the sites' time zone for day_start: an IANA name or a fixed offset like +07:00"
    )


@dataclass(frozen=True, slots=True)
class Config:
    device: DeviceConfig
    camera: CameraConfig = field(default_factory=CameraConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    dcc: DccConfig = field(default_factory=DccConfig)
    gpio: GpioConfig = field(default_factory=GpioConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    door: DoorConfig = field(default_factory=DoorConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    commands: CommandsConfig = field(default_factory=CommandsConfig)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    # Not TOML keys: derived at load time.
    path: Path = field(default=Path("<memory>"), metadata={"derived": True})
    digest: str = field(default="", metadata={"derived": True})
    mqtt_password: str | None = field(default=None, repr=False, metadata={"derived": True})

    @property
    def subject_key_path(self) -> Path:
        return self.storage.subject_key_file or self.storage.dir / "subject.key"

    def topic(self, leaf: str) -> str:
        return f"{self.mqtt.topic_prefix}/{self.device.site}/{self.device.id}/{leaf}"


_OFFSET = re.compile(r"(?:UTC)?([+-])([0-9]{1,2})(?::?([0-9]{2}))?")


def time_zone(text: str) -> tzinfo:
    """An IANA zone name (``Asia/Ho_Chi_Minh``) or a fixed offset (``+07:00``, ``UTC+7``).

    A fixed offset needs no tz database, which a minimal server image may lack; Vietnam has
    kept UTC+7 without daylight saving since 1975, so both spell the same rule there.
    """
    match = _OFFSET.fullmatch(text)
    if match is not None:
        sign, hours, minutes = match.groups()
        offset = timedelta(hours=int(hours), minutes=int(minutes or 0))
        if offset > timedelta(hours=14):
            raise ValueError(f"{text!r}: offsets run from -14:00 to +14:00")
        return timezone(-offset if sign == "-" else offset)
    try:
        return zoneinfo.ZoneInfo(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{text!r} is neither a known IANA time zone nor an offset like +07:00") from None


class ConfigError(Exception):
    """All problems found in one config file, one ``file: key: problem`` line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def load(path: str | Path, *, device_optional: bool = False) -> Config:
    """Read and check one config file; ConfigError lists every problem.

    ``device_optional``: the central side (collector, trace, monitor) is not a gate, so its
    file may leave ``[device]`` out; a placeholder fills it and nothing there reads it.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    try:
        table = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: TOML syntax: {exc}"]) from exc
    except RecursionError:
        raise ConfigError([f"{path}: TOML nested too deep"]) from None
    if device_optional:
        table.setdefault("device", dict(_CENTRAL_DEVICE))
    return from_table(table, path=path, digest=hashlib.sha256(raw).hexdigest())


def load_central(path: Path) -> Config:
    """:func:`load` for the collector, ``trace`` and ``monitor``: ``[device]`` may be left out."""
    return load(path, device_optional=True)


def from_table(table: dict[str, Any], *, path: Path = Path("<memory>"), digest: str = "") -> Config:
    problems: list[str] = []
    base = path.parent if path.name != "<memory>" else Path.cwd()
    values = _build(Config, table, "", problems, base)
    if values is None:
        raise ConfigError([f"{path}: {p}" for p in problems])
    config = Config(**values, path=path, digest=digest)
    problems += _cross_checks(config)
    password = None
    if not problems and config.mqtt.password_file is not None:
        try:
            password = config.mqtt.password_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"mqtt.password_file: cannot read: {exc}")
    if problems:
        raise ConfigError([f"{path}: {p}" for p in problems])
    if password is not None:
        config = _replace(config, mqtt_password=password)
    return config


def _replace(config: Config, **changes: Any) -> Config:

    return replace(config, **changes)


def _cross_checks(c: Config) -> list[str]:
    problems = []
    if c.gpio.relay_pulse_s > c.gpio.relay_max_on_s:
        problems.append(
            f"gpio.relay_pulse_s: {c.gpio.relay_pulse_s} exceeds gpio.relay_max_on_s {c.gpio.relay_max_on_s}"
        )
    pins = {
        "gpio.relay_pin": c.gpio.relay_pin,
        "gpio.green_pin": c.gpio.green_pin,
        "gpio.red_pin": c.gpio.red_pin,
        "gpio.buzzer_pin": c.gpio.buzzer_pin,
        **{f"door.{name}": pin for name, pin in c.door.pins().items()},
    }
    seen: dict[int, str] = {}
    for name, pin in pins.items():
        if pin in seen:
            problems.append(f"{name}: pin {pin} is already used by {seen[pin]}")
        seen.setdefault(pin, name)
    if c.door.passage_pin is not None and c.door.passage_timeout_s < c.gpio.relay_pulse_s:
        problems.append(
            f"door.passage_timeout_s: {c.door.passage_timeout_s} is shorter than gpio.relay_pulse_s "
            f"{c.gpio.relay_pulse_s}: entries would be annulled while the door is still open for them"
        )
    if c.mqtt.tls and c.mqtt.ca_file is None:
        problems.append("mqtt.ca_file: required when mqtt.tls = true (verification is never skipped)")
    if (c.mqtt.cert_file is None) != (c.mqtt.key_file is None):
        problems.append("mqtt.cert_file: cert_file and key_file go together")
    if (c.mqtt.cert_file is not None or c.mqtt.ca_file is not None) and not c.mqtt.tls:
        problems.append("mqtt.tls: certificate files are set but tls = false")
    if c.mqtt.password_file is not None and c.mqtt.username is None:
        problems.append("mqtt.username: required when mqtt.password_file is set")
    if not c.decoder.engines:
        problems.append("decoder.engines: needs at least one engine")
    if not c.policy.accept:
        problems.append("policy.accept: empty: this gate would reject everyone")
    if c.camera.reopen_backoff_s > c.camera.reopen_backoff_max_s:
        problems.append(
            f"camera.reopen_backoff_s: {c.camera.reopen_backoff_s} exceeds camera.reopen_backoff_max_s "
            f"{c.camera.reopen_backoff_max_s}"
        )
    if c.camera.stall_timeout_s < c.camera.capture_timeout_s:
        problems.append(
            f"camera.stall_timeout_s: {c.camera.stall_timeout_s} is shorter than camera.capture_timeout_s "
            f"{c.camera.capture_timeout_s}: a slow but working read would count as a stall"
        )
    try:
        time_zone(c.site.timezone)
    except ValueError as exc:
        problems.append(f"site.timezone: {exc}")
    if c.site.gates and c.device.id not in c.site.gates:
        problems.append(f"site.gates: lists the site's gates but not this one ({c.device.id!r})")
    try:
        time_zone(c.collector.timezone)
    except ValueError as exc:
        problems.append(f"collector.timezone: {exc}")
    source = c.camera.source
    if not (source == "picamera2" or source.startswith(("dir:", "file:", "v4l2:", "rtsp://", "rtsps://"))):
        problems.append(f"camera.source: {source!r} is not picamera2, dir:, file:, v4l2: or rtsp://")
    return problems


def _build(cls: type, table: Any, prefix: str, problems: list[str], base: Path) -> dict[str, Any] | None:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(table, dict):
        problems.append(f"{where}: expected a table, got {_tname(table)}")
        return None
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    known = set()
    start = len(problems)
    for f in fields(cls):
        if f.metadata.get("derived"):
            continue
        known.add(f.name)
        key = prefix + f.name
        if f.name not in table:
            if f.default is MISSING and f.default_factory is MISSING:
                problems.append(f"{key}: required")
            continue
        hint = hints[f.name]
        if isinstance(hint, type) and hasattr(hint, "__dataclass_fields__"):
            sub = _build(hint, table[f.name], key + ".", problems, base)
            if sub is not None:
                out[f.name] = hint(**sub)
            continue
        ok, value = _convert(hint, table[f.name], key, f.metadata, problems, base)
        if ok:
            out[f.name] = value
    for name in table:
        if name not in known:
            problems.append(f"{prefix}{name}: unknown key")
    return None if len(problems) > start else out


def _convert(hint: Any, value: Any, key: str, meta: Any, problems: list[str], base: Path) -> tuple[bool, Any]:
    def bad(why: str) -> tuple[bool, Any]:
        problems.append(f"{key}: {why}")
        return False, None

    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key, meta, problems, base)
    if origin is Literal:
        if value not in args:
            return bad(f"must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return True, value
    if hint is bool:
        if not isinstance(value, bool):
            return bad(f"expected true or false, got {_tname(value)} {value!r}")
        return True, value
    if hint is int or hint is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (hint is int and isinstance(value, float))
        ):
            return bad(
                f"expected {'an integer' if hint is int else 'a number'}, got {_tname(value)} {value!r}"
            )
        if not math.isfinite(value):
            # TOML has nan and inf; every comparison with nan is false, so a range check alone
            # lets it through (anti_passback_s = nan would turn anti-passback off silently).
            return bad(f"must be a finite number, got {value}")
        lo, hi = meta.get("min"), meta.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return bad(f"{value} is out of range {lo}..{hi}")
        return True, hint(value)
    if hint is str:
        if not isinstance(value, str):
            return bad(f"expected a string, got {_tname(value)} {value!r}")
        if "pattern" in meta and not re.fullmatch(meta["pattern"], value):
            return bad(f"{value!r} must be {meta.get('pattern_doc', _NAME_DOC)}")
        return True, value
    if hint is Path:
        if not isinstance(value, str) or not value:
            return bad(f"expected a path string, got {_tname(value)} {value!r}")
        path = Path(value)
        if not path.is_absolute():
            path = base / path
        if meta.get("must_exist"):
            why = _unreadable(path)
            if why:
                return bad(f"file {str(path)!r} {why}")
        return True, path
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return bad(f"expected a list of strings, got {_tname(value)} {value!r}")
        choices = meta.get("choices")
        unknown = [v for v in value if choices and v not in choices]
        if unknown:
            return bad(f"unknown {', '.join(map(repr, unknown))}; choose from {', '.join(choices)}")
        if "pattern" in meta:
            wrong = [v for v in value if not re.fullmatch(meta["pattern"], v)]
            if wrong:
                return bad(f"{', '.join(map(repr, wrong))}: each must be {_NAME_DOC}")
        if len(set(value)) != len(value):
            return bad("lists a value twice")
        return True, tuple(value)
    raise TypeError(f"config field {key} has unsupported type {hint!r}")  # a bug in this module


def _unreadable(path: Path) -> str:
    """Why the daemon could not read ``path`` ("" when it can): checked here, because the
    daemon finding out at start is a gate that does not start."""
    try:
        with path.open("rb"):
            return ""
    except FileNotFoundError:
        return "does not exist"
    except IsADirectoryError:
        return "is a directory, not a file"
    except OSError as exc:  # EACCES on the file or a directory on its way, ELOOP, ...
        return f"cannot be read: {exc.strerror or exc}"


def _tname(value: Any) -> str:
    return {
        dict: "a table",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__)


def describe() -> list[tuple[str, str, str]]:
    """(key, default as TOML, doc) rows: the README's configuration reference is checked against it."""
    rows = []
    hints = typing.get_type_hints(Config)
    for section in fields(Config):
        if section.metadata.get("derived"):
            continue
        for f in fields(hints[section.name]):
            if f.default is MISSING and f.default_factory is MISSING:
                default = "required"
            else:
                default = _toml_value(f.default if f.default_factory is MISSING else f.default_factory())
            rows.append((f"{section.name}.{f.name}", default, f.metadata.get("doc", "")))
    return rows


def _toml_value(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)
