"""Telemetry for operators: the retained ``health`` payload, host facts, Home Assistant discovery.

Everything here is either a pure function or reads one host fact with a bounded cost; the
app gathers the pipeline's counters and calls :meth:`Sampler.sample` from its telemetry
thread, never from the pipeline or the publisher thread (``vcgencmd`` can take a while).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from scanner.config import Config
from scanner.events import utc_ms
from scanner.gate import health

log = logging.getLogger(__name__)

HEALTH_SCHEMA = "gate-scanner/health/1"
STATUS_SCHEMA = "gate-scanner/status/1"
THERMAL_ZONE = Path("/sys/class/thermal/thermal_zone0/temp")
DECODE_RING = 512  # recent decode times kept for p50/p95 (a deque append per frame)
# Outbox fill alarm with hysteresis: raised at 80 % of storage.outbox_max_events, cleared
# below 70 %, so a gate hovering at the threshold does not flap its retained status.
FILL_RAISE = 0.8
FILL_CLEAR = 0.7

# Raspberry Pi firmware ``get_throttled`` bits (documented in the Raspberry Pi vcgencmd page).
# Under-voltage first: it is the one a technician can fix (the power supply), and the cause
# of most "random" SD-card corruption and camera dropouts on a gate.
THROTTLE_BITS: tuple[tuple[int, str], ...] = (
    (0, "under_voltage_now"),
    (1, "freq_capped_now"),
    (2, "throttled_now"),
    (3, "soft_temp_limit_now"),
    (16, "under_voltage_occurred"),
    (17, "freq_capped_occurred"),
    (18, "throttled_occurred"),
    (19, "soft_temp_limit_occurred"),
)
_THROTTLED = re.compile(r"throttled=(0x[0-9a-fA-F]+)")


# -- pure functions -------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def parse_throttled(text: str) -> dict[str, Any] | None:
    """``throttled=0x50005`` → ``{"raw": "0x50005", "under_voltage_now": True, …}``; None if unparseable."""
    match = _THROTTLED.search(text)
    if match is None:
        return None
    value = int(match.group(1), 16)
    flags: dict[str, Any] = {"raw": f"{value:#x}"}
    for bit, name in THROTTLE_BITS:
        flags[name] = bool(value >> bit & 1)
    return flags


def fill_alarm(depth: int, capacity: int, active: bool) -> bool:
    """Whether the ``outbox_filling`` alarm should be active (hysteresis: 80 % on, < 70 % off)."""
    if depth >= FILL_RAISE * capacity:
        return True
    if depth < FILL_CLEAR * capacity:
        return False
    return active


def age_s(created: str | None, now: datetime) -> float | None:
    """Seconds since an outbox ``created`` stamp (RFC 3339); None for an empty outbox or a bad stamp."""
    if created is None:
        return None
    try:
        then = datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        return None
    if then.tzinfo is None:
        return None
    return round(max(0.0, (now - then).total_seconds()), 3)


# -- host facts -----------------------------------------------------------------------------


def cpu_temp_c(path: Path = THERMAL_ZONE) -> float | None:
    """SoC temperature in °C from the kernel's thermal zone (millidegrees); None when absent."""
    try:
        return round(int(path.read_text().strip()) / 1000, 1)
    except (OSError, ValueError):
        return None


def disk_free_bytes(path: Path) -> int | None:
    """Bytes available to the daemon on the file system holding ``path``."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class ThrottleReader:
    """``vcgencmd get_throttled``, cached for ``ttl`` s, each call bounded to ``timeout`` s.

    Off a Pi (or inside a sandbox without ``/dev/vchiq``) the command is missing or fails:
    then the answer is None, and a missing command is not looked for again.
    """

    def __init__(
        self,
        command: Sequence[str] | None = None,
        *,
        ttl: float = 10.0,
        timeout: float = 1.0,
    ) -> None:
        if command is None:
            exe = shutil.which("vcgencmd")
            command = (exe, "get_throttled") if exe else ()
        self._command = tuple(command)
        self._ttl = ttl
        self._timeout = timeout
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, Any] | None] | None = None
        self._warned = False

    def read(self) -> dict[str, Any] | None:
        if not self._command:
            return None
        now = time.monotonic()
        with self._lock:
            if self._cached is not None and now - self._cached[0] < self._ttl:
                return self._cached[1]
            result = self._run()
            self._cached = (now, result)
            return result

    def _run(self) -> dict[str, Any] | None:
        try:
            done = subprocess.run(
                self._command, capture_output=True, text=True, timeout=self._timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            self._warn(f"{' '.join(self._command)}: {exc}")
            return None
        parsed = parse_throttled(done.stdout) if done.returncode == 0 else None
        if parsed is None:
            self._warn(f"{' '.join(self._command)}: exit {done.returncode}, {done.stdout.strip()!r}")
        return parsed

    def _warn(self, detail: str) -> None:
        if not self._warned:  # once: it would repeat every interval
            log.warning("throttling flags unavailable: %s", detail)
            self._warned = True


# -- the health payload ---------------------------------------------------------------------


class Sampler:
    """Builds ``health`` payloads; remembers the previous frame count to turn it into a rate.

    Host readers are seams (arguments) so tests can pin them; the defaults read the real host.
    """

    def __init__(
        self,
        config: Config,
        *,
        cpu_temp: Callable[[], float | None] = cpu_temp_c,
        throttled: Callable[[], dict[str, Any] | None] | None = None,
        clock_synced: Callable[[], bool] | None = None,
        disk_free: Callable[[Path], int | None] = disk_free_bytes,
    ) -> None:

        self._config = config
        self._cpu_temp = cpu_temp
        self._throttled = throttled if throttled is not None else ThrottleReader().read
        self._clock_synced = clock_synced if clock_synced is not None else health.clock_synced
        self._disk_free = disk_free
        self._prev: tuple[float, int] | None = None  # (monotonic, frames)
        self._lock = threading.Lock()

    def sample(
        self,
        *,
        now: datetime,
        mono: float,
        started_mono: float,
        frames: int,
        decode_ms: Sequence[float],
        reasons: Mapping[str, int],
        outbox_depth: int | None,
        outbox_oldest: str | None,
        camera: str,
        worker_failures: int,
        reconnects: int,
        occupancy: dict[str, Any] | None = None,
        door: Mapping[str, int] | None = None,
        remember: bool = True,
    ) -> dict[str, Any]:
        """One payload. ``remember=False`` (an ad-hoc snapshot) leaves the fps window alone."""
        with self._lock:
            since, before = self._prev if self._prev is not None else (started_mono, 0)
            if remember:
                self._prev = (mono, frames)
        elapsed = mono - since
        fps = round((frames - before) / elapsed, 2) if elapsed > 0 else 0.0
        p50, p95 = percentile(decode_ms, 50), percentile(decode_ms, 95)
        return {
            "schema": HEALTH_SCHEMA,
            "ts": utc_ms(now),
            "uptime_s": round(max(0.0, mono - started_mono), 1),
            "fps": max(0.0, fps),
            "decode_ms": {
                "p50": None if p50 is None else round(p50, 3),
                "p95": None if p95 is None else round(p95, 3),
                "samples": len(decode_ms),
            },
            "decisions": {str(k): int(v) for k, v in sorted(reasons.items())},
            "outbox": {
                "depth": outbox_depth,
                "max": self._config.storage.outbox_max_events,
                "oldest_age_s": age_s(outbox_oldest, now),
            },
            "camera": camera,
            "decoder": {"worker_failures": worker_failures},
            "cpu_temp_c": self._cpu_temp(),
            "throttled": self._throttled(),
            "clock_synced": bool(self._clock_synced()),
            "disk_free_bytes": self._disk_free(self._config.storage.dir),
            "mqtt": {"reconnects": reconnects},
            "occupancy": occupancy,
            "door": dict(door) if door is not None else None,
        }


# -- Home Assistant MQTT discovery ----------------------------------------------------------


def ha_discovery(config: Config, version: str) -> list[tuple[str, bytes]]:
    """(topic, retained payload) of every Home Assistant discovery config for this gate.

    Entities: connectivity from ``availability``, an ``event`` entity for check-ins carrying
    only the decision and reason (the template drops the subject pseudonym), and sensors
    for fps, outbox depth and CPU temperature from ``health``. Plus one sensor per site, the
    people inside: every gate of the site publishes the same config (same topic, same
    unique_id), and its state topic is a filter over all their ``health`` (each carries the
    site's count), so it stays current while any of them runs.
    """

    device, prefix = config.device, config.homeassistant.discovery_prefix
    node = re.sub(r"[^A-Za-z0-9_-]", "_", f"gate_scanner_{device.site}_{device.id}")
    availability = config.topic("availability")
    health = config.topic("health")
    ha_device = {
        "identifiers": [node],
        "name": f"Gate {device.id}",
        "manufacturer": "gate-scanner",
        "model": "QR check-in gate",
        "sw_version": version,
        "suggested_area": device.site,
    }
    common = {
        "availability_topic": availability,
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": ha_device,
    }
    entities: list[tuple[str, str, dict[str, Any]]] = [
        (
            "binary_sensor",
            "online",
            {
                "name": "Online",
                "state_topic": availability,
                "payload_on": "online",
                "payload_off": "offline",
                "device_class": "connectivity",
                "entity_category": "diagnostic",
                "device": ha_device,  # its own state is availability: no availability_topic
            },
        ),
        (
            "event",
            "checkin",
            {
                **common,
                "name": "Check-in",
                "state_topic": config.topic("checkin"),
                # annulled: the door saw nobody pass after an accept (scanner/gate/door.py)
                "event_types": ["accepted", "rejected", "annulled"],
                "value_template": (
                    '{{ {"event_type": value_json.decision, "reason": value_json.reason} | tojson }}'
                ),
            },
        ),
        (
            "sensor",
            "fps",
            {
                **common,
                "name": "Frames per second",
                "state_topic": health,
                "value_template": "{{ value_json.fps }}",
                "unit_of_measurement": "fps",
                "state_class": "measurement",
                "entity_category": "diagnostic",
            },
        ),
        (
            "sensor",
            "outbox_depth",
            {
                **common,
                "name": "Unsent check-ins",
                "state_topic": health,
                "value_template": "{{ value_json.outbox.depth }}",
                "state_class": "measurement",
                "entity_category": "diagnostic",
            },
        ),
        (
            "sensor",
            "cpu_temp",
            {
                **common,
                "name": "CPU temperature",
                "state_topic": health,
                "value_template": "{{ value_json.cpu_temp_c }}",
                "unit_of_measurement": "°C",
                "device_class": "temperature",
                "state_class": "measurement",
                "entity_category": "diagnostic",
            },
        ),
    ]
    out = []
    for component, object_id, body in entities:
        body = {**body, "unique_id": f"{node}_{object_id}"}
        topic = f"{prefix}/{component}/{node}/{object_id}/config"
        out.append((topic, json.dumps(body, separators=(",", ":"), sort_keys=True).encode("utf-8")))
    site_node = re.sub(r"[^A-Za-z0-9_-]", "_", f"gate_scanner_site_{device.site}")
    site_sensor = {
        "name": "People inside",
        "unique_id": f"{site_node}_occupancy",
        "state_topic": f"{config.mqtt.topic_prefix}/{device.site}/+/health",
        "value_template": "{{ value_json.occupancy.inside }}",
        "json_attributes_topic": f"{config.mqtt.topic_prefix}/{device.site}/+/health",
        "json_attributes_template": (
            '{{ {"capacity": value_json.occupancy.capacity, "full": value_json.occupancy.full,'
            ' "stale": value_json.occupancy.stale, "day": value_json.occupancy.day} | tojson }}'
        ),
        "state_class": "measurement",
        "unit_of_measurement": "people",
        # No sw_version and no availability: the same bytes from every gate, whatever it runs.
        "device": {
            "identifiers": [site_node],
            "name": f"Site {device.site}",
            "manufacturer": "gate-scanner",
            "model": "site occupancy",
        },
    }
    topic = f"{prefix}/sensor/{site_node}/occupancy/config"
    out.append((topic, json.dumps(site_sensor, separators=(",", ":"), sort_keys=True).encode("utf-8")))
    return out
