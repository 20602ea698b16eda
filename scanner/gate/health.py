"""systemd integration (sd_notify protocol, watchdog) and host facts (clock synchronisation).

Implemented directly rather than through python-systemd/sdnotify: the notify protocol is one
datagram on a unix socket, and the C bindings would add a build dependency on the Pi.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from scanner import durable
from scanner.events import utc_ms

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends sd_notify(3) messages to the service manager; silent no-op when not under systemd.

    Reads ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` once, at construction
    (``environ`` is a seam for tests). Messages must come from the main process
    (``NotifyAccess=main``); any thread of it may send.
    """

    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` as one datagram. True when sent; False when not under systemd or on error."""
        if self._address is None or not lines:
            return False
        data = "\n".join(lines).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # A datagram to a local socket either goes at once or fails; the timeout only
                # bounds the pathological case of a full receive queue in PID 1.
                sock.settimeout(1.0)
                sock.sendto(data, self._address)
        except OSError as exc:
            if not self._warned:  # once: the watchdog would repeat it every few seconds
                log.warning("sd_notify to %r failed: %s", self._address, exc)
                self._warned = True
            return False
        return True

    def ready(self) -> bool:
        return self.notify("READY=1", "STATUS=running")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> bool:
        # One line: a newline would start a new (unintended) assignment in the datagram.
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of ``WatchdogSec``), or None when no watchdog is set."""
        if self._address is None or not self._watchdog_usec:
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        if self._watchdog_pid:
            try:
                pid = int(self._watchdog_pid)
            except ValueError:
                return None
            if pid != os.getpid():
                return None  # the variables were meant for another process (inherited env)
        return usec / 1_000_000 / 2


def _socket_address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None  # vsock: and other schemes are not for a device daemon


class WatchdogFeeder(threading.Thread):
    """Pings the systemd watchdog every ``interval`` seconds, but only while ``alive()`` is true.

    ``alive`` is the app's judgement of health (frames arrived recently and the pipeline loop
    ticked recently). When it turns false the pings stop and systemd restarts the service after
    ``WatchdogSec``: a camera or decoder wedged inside a native call cannot be fixed from
    inside the process, a restart can.
    """

    def __init__(
        self,
        notifier: SystemdNotifier,
        alive: Callable[[], bool],
        stop: threading.Event,
        *,
        interval: float | None = None,
    ):
        super().__init__(name="watchdog", daemon=True)
        self._notifier = notifier
        self._alive = alive
        self._stop_event = stop
        self.interval = interval if interval is not None else notifier.watchdog_interval()
        self.fed = 0  # pings sent: telemetry and tests

    def run(self) -> None:
        if self.interval is None:
            log.debug("no systemd watchdog configured")
            return
        healthy = True
        while True:
            try:
                ok = bool(self._alive())
            except Exception:
                log.exception("watchdog health check raised; treating as unhealthy")
                ok = False
            if ok:
                if self._notifier.watchdog():
                    self.fed += 1
                if not healthy:
                    log.warning("pipeline healthy again: feeding the systemd watchdog")
                    self._notifier.status("running")
            elif healthy:
                log.error("pipeline unhealthy: no longer feeding the systemd watchdog")
                self._notifier.status("unhealthy: watchdog not fed, systemd will restart")
            healthy = ok
            if self._stop_event.wait(self.interval):
                return


# -- clock ---------------------------------------------------------------------------------

_TIME_ERROR = 5
# systemd's ntp_synced() (behind timedatectl's NTPSynchronized) treats the clock as synchronised
# while the kernel's maximum error is below 16 s; the kernel grows maxerror by 500 µs/s without
# NTP updates and sets STA_UNSYNC at 16 s.
_MAXERROR_LIMIT_US = 16_000_000
_CACHE_S = 10.0


class _Timex(ctypes.Structure):
    # struct timex for the plain ``adjtimex`` symbol: int and long fields. On 32-bit ARM with
    # 64-bit time_t glibc routes C callers to __adjtimex64, but this symbol keeps the long layout.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),
    ]


_clock_lock = threading.Lock()
_clock_cache: tuple[float, bool] | None = None  # (monotonic time of the reading, result)


def clock_synced() -> bool:
    """Whether the kernel clock is NTP-synchronised (as timedatectl's NTPSynchronized), cached ~10 s.

    A read-only ``adjtimex(2)`` (modes = 0): no privilege needed, but the unit's seccomp filter
    must allow it (see systemd/gate-scanner.service). Any failure counts as not synchronised.
    """
    global _clock_cache
    now = time.monotonic()
    with _clock_lock:
        if _clock_cache is not None and now - _clock_cache[0] < _CACHE_S:
            return _clock_cache[1]
        result = _read_clock_synced()
        _clock_cache = (now, result)
        return result


def _read_clock_synced() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        adjtimex = libc.adjtimex
        adjtimex.argtypes = [ctypes.POINTER(_Timex)]
        adjtimex.restype = ctypes.c_int
        tx = _Timex()  # zeroed: modes = 0 reads only
        state = adjtimex(ctypes.byref(tx))
    except Exception as exc:  # no libc symbol, not Linux, …
        log.debug("adjtimex unavailable: %s", exc)
        return False
    if state < 0:
        log.debug("adjtimex failed: %s", os.strerror(ctypes.get_errno()))
        return False
    # TIME_ERROR alone is not trusted: chronyd sets STA_UNSYNC on a synchronised clock to keep
    # the kernel from writing the RTC (which is why systemd ignores it too); maxerror decides.
    if state == _TIME_ERROR:
        log.debug("adjtimex: TIME_ERROR (status %#x, maxerror %d us)", tx.status, tx.maxerror)
    return bool(0 <= tx.maxerror < _MAXERROR_LIMIT_US)


# --- the last self-test, kept beside the outbox --------------------------------------------

SELFTEST_FILE = "selftest.json"


def save_selftest(state_dir: Path, *, passed: bool, checks: list[dict[str, str]], now: datetime) -> Path:
    """What ``gate-scanner selftest`` found, for the daemon's retained ``status``: check names,
    PASS/WARN/FAIL and their hints, never a code or a subject."""
    result = {"ts": utc_ms(now), "passed": passed, "checks": checks}
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / SELFTEST_FILE
    durable.replace_file(path, json.dumps(result, ensure_ascii=False).encode("utf-8"))
    return path


def load_selftest(state_dir: Path) -> dict[str, Any] | None:
    try:
        result = json.loads((state_dir / SELFTEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None
