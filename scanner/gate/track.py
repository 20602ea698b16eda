"""Presence-based duplicate suppression: a code held in front of the camera is one scan.

A phone held up for five seconds is seen in ~150 frames, and motion blur or glare makes a
few of those frames unreadable. So a code is "present" from its first read until it has not
been read for ``gone_after_s``; only its first read while absent counts as a new scan.
"""

from __future__ import annotations

from collections.abc import Iterable

# A frame full of codes (a poster of codes, a printer's test sheet) must not grow the table
# without bound; 64 codes in view at once is far beyond a real gate.
_MAX_PRESENT = 64


class PresenceTracker:
    def __init__(self, gone_after_s: float) -> None:
        self._gone_after_s = gone_after_s
        self._last_seen: dict[bytes, float] = {}

    def update(self, payloads: Iterable[bytes], now: float) -> list[bytes]:
        """Record the payloads read in one frame (at monotonic time ``now``); return the new scans."""
        self._forget_gone(now)
        fresh: list[bytes] = []
        for payload in payloads:
            if payload not in self._last_seen and payload not in fresh:
                fresh.append(payload)
            self._last_seen[payload] = now
        if len(self._last_seen) > _MAX_PRESENT:
            for payload, _ in sorted(self._last_seen.items(), key=lambda item: item[1])[
                : len(self._last_seen) - _MAX_PRESENT
            ]:
                del self._last_seen[payload]
        return fresh

    def present(self) -> int:
        return len(self._last_seen)

    def _forget_gone(self, now: float) -> None:
        gone = [p for p, seen in self._last_seen.items() if now - seen > self._gone_after_s]
        for payload in gone:
            del self._last_seen[payload]
