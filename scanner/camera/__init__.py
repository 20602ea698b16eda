"""Frame sources and the capture thread body.

A source delivers grayscale frames; the capture thread puts them into a
:class:`~scanner.camera.slot.LatestFrameSlot`, from which the decoder takes only the newest.
Backends are imported lazily inside :func:`open_source` so that importing this package
never pulls in picamera2 (Pi-only) or starts any work.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from scanner.models import Frame

if TYPE_CHECKING:
    from scanner.camera.slot import LatestFrameSlot
    from scanner.config import CameraConfig

__all__ = ["CameraError", "FrameSource", "open_source", "run_capture"]

log = logging.getLogger(__name__)


class CameraError(Exception):
    """The camera could not be opened, failed, or delivered no frame in time."""


class FrameSource(Protocol):
    # True for dir:/file: replays, which end; live cameras never end on their own.
    finite: bool

    def open(self) -> None:
        """Acquire the device or files; raises CameraError when that is impossible."""
        ...

    def read(self, timeout: float) -> Frame | None:
        """Next frame. None only when a finite source has ended; CameraError on failure or timeout."""
        ...

    def close(self) -> None:
        """Release the device. Idempotent; from another thread it interrupts a pacing wait and
        otherwise returns once a read in progress has ended (reads are bounded)."""
        ...


def open_source(cfg: CameraConfig) -> FrameSource:
    """Build (but do not open) the source named by ``cfg.source``."""
    source = cfg.source
    if source == "picamera2":
        from scanner.camera.picam import Picamera2Source

        return Picamera2Source(cfg)
    if source.startswith("dir:"):
        from scanner.camera.replay import ReplaySource

        return ReplaySource(cfg, _target(source, "dir:"))
    if source.startswith("file:"):
        from scanner.camera.opencv import OpenCvSource

        return OpenCvSource(cfg, "file", _target(source, "file:"))
    if source.startswith("v4l2:"):
        from scanner.camera.opencv import OpenCvSource

        return OpenCvSource(cfg, "v4l2", _target(source, "v4l2:"))
    if source.startswith(("rtsp://", "rtsps://")):
        from scanner.camera.opencv import OpenCvSource

        return OpenCvSource(cfg, "rtsp", source)
    raise CameraError(f"camera.source: {source!r} is not picamera2, dir:, file:, v4l2: or rtsp://")


def _target(source: str, prefix: str) -> str:
    target = source[len(prefix) :]
    if not target:
        raise CameraError(f"camera.source: {source!r} names no path after {prefix!r}")
    return target


def run_capture(
    source: FrameSource,
    slot: LatestFrameSlot,
    stop: threading.Event,
    on_error: Callable[[Exception], None] | None = None,
    *,
    read_timeout: float = 2.0,
    backoff_s: float = 0.1,
    max_backoff_s: float = 5.0,
    finite_retries: int = 3,
) -> None:
    """Body of a plain capture thread: read → slot.put until ``stop`` is set or a finite source ends.

    The source should already be open (if opening failed, the first read fails and the loop
    reopens it). Errors only, no frame checks and no stall monitor: the daemon runs
    :class:`~scanner.camera.watchdog.CameraSupervisor` itself, which this wraps. On any error a
    live source is reopened after a backoff that doubles up to ``max_backoff_s``; a finite source
    gets ``finite_retries`` more attempts in a row. Every error reaches ``on_error`` and the log.
    The slot is closed on the way out.
    """
    from scanner.camera.watchdog import CameraSupervisor

    CameraSupervisor(
        source,
        slot,
        on_error=on_error,
        read_timeout=read_timeout,
        backoff_s=backoff_s,
        max_backoff_s=max_backoff_s,
        finite_retries=finite_retries,
        open_first=False,
    ).run(stop)
