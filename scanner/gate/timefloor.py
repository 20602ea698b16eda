"""A clock that, while NTP has not set it, never reads earlier than a time this gate has seen.

A Raspberry Pi has no real-time clock: it boots with the time it shut down at (or 1970) and
keeps it until NTP answers, which at a market with a dead uplink may be never. Judged against
that clock, a pass or a health certificate that expired yesterday is still valid. So the gate
keeps a floor on disk (``<storage.dir>/time-floor.json``): the newest time it has trusted,
written every few minutes. After a reboot the time is at least that floor plus the time the
gate has been running since, whatever the wall clock says; validity, event times and the
day's counts are judged against that.

What is written is only ever a lower bound of the real time: the wall clock while NTP says
it is synchronised, otherwise the floor plus the time elapsed on the monotonic clock. An
unsynchronised clock that runs ahead is used for judging (it may be right) but never
written, so a wrong future time cannot stick across reboots.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from scanner import durable
from scanner.events import parse_utc, utc_ms
from scanner.gate.pipeline import Clock

log = logging.getLogger(__name__)

FLOOR_FILE = "time-floor.json"
SCHEMA = "gate-scanner/time-floor/1"
SAVE_EVERY_S = 600.0  # a power cut loses at most this much of the floor: ~150 small writes a day


class FlooredClock:
    """``now()`` is the later of the wall clock and the floor plus the time run since start."""

    def __init__(
        self,
        inner: Clock,
        path: Path,
        *,
        synced: Callable[[], bool],
        save_every_s: float = SAVE_EVERY_S,
    ) -> None:
        self._inner = inner
        self._path = path
        self._synced = synced
        self._save_every_s = save_every_s
        self._lock = threading.Lock()
        self._floor = self._load()
        self._floor_mono = inner.monotonic()  # when _floor was true
        self._saved_mono = self._floor_mono if self._floor is not None else None

    @property
    def floor(self) -> datetime | None:
        """The lower bound of the real time now (None before the gate has ever trusted one)."""
        if self._floor is None:
            return None
        return self._floor + timedelta(seconds=self._inner.monotonic() - self._floor_mono)

    def monotonic(self) -> float:
        return self._inner.monotonic()

    def now(self) -> datetime:
        wall = self._inner.now()
        if self._synced():
            return wall  # NTP's word: a step back is a correction, not a Pi that lost its time
        floor = self.floor
        return wall if floor is None or wall >= floor else floor

    def save(self) -> None:
        """Write the floor now (at a clean stop: the next start begins from here)."""
        self._save(self._inner.now())

    def maybe_save(self) -> None:
        """Write the floor if it is due (every ``save_every_s``): from a housekeeping thread,
        never from the scan path, which must not wait for an SD card's fsync."""
        if self._saved_mono is None or self._inner.monotonic() - self._saved_mono >= self._save_every_s:
            self._save(self._inner.now())

    def _save(self, wall: datetime) -> None:
        with self._lock:
            trusted = wall if self._synced() else self.floor
            if trusted is None:
                return  # never synchronised and no floor: nothing true to write
            floor = self.floor
            if floor is not None and trusted < floor:
                trusted = floor  # a clock stepped back by NTP never lowers what was known
            self._floor, self._floor_mono = trusted, self._inner.monotonic()
            self._saved_mono = self._floor_mono
            body = json.dumps({"schema": SCHEMA, "floor": utc_ms(trusted)}).encode("utf-8")
            try:
                durable.replace_file(self._path, body)
            except OSError as exc:
                # The floor stays in memory; after a reboot the gate knows less, not something false.
                log.warning("cannot keep the time floor in %s: %s", self._path, exc)

    def _load(self) -> datetime | None:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read the time floor %s: %s", self._path, exc)
            return None
        try:
            document = json.loads(raw)
            if not isinstance(document, dict) or document.get("schema") != SCHEMA:
                raise ValueError(f"schema is not {SCHEMA!r}")
            floor = document["floor"]
            if not isinstance(floor, str):
                raise ValueError("floor is not a time")
            return parse_utc(floor)
        except (ValueError, KeyError, RecursionError) as exc:
            # Written only at trusted times, so its own modification time is one too.
            try:
                fallback = datetime.fromtimestamp(self._path.stat().st_mtime, UTC)
            except (OSError, OverflowError, ValueError):
                fallback = None
            log.warning("time floor %s is damaged (%s); using its modification time", self._path, exc)
            return fallback
