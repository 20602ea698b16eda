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
    """Body of the capture thread: read → slot.put until ``stop`` is set or a finite source ends.

    The source should already be open (if opening failed, the first read fails and the loop
    retries the open). On any error a live source is reopened after a backoff that doubles up
    to ``max_backoff_s``: a dislodged ribbon cable or a dropped RTSP stream must neither spin a
    core nor end the thread silently. A finite source gets ``finite_retries`` more attempts in a
    row, then its run ends. Every error reaches ``on_error`` (the health/watchdog seam) and the
    log. The slot is closed on the way out, so a decoder waiting on it wakes up instead of
    waiting for frames that will never come.
    """
    delay = backoff_s
    delivered = 0
    failures = 0
    try:
        while not stop.is_set():
            try:
                frame = source.read(read_timeout)
            except Exception as exc:  # any failure: a capture thread that dies leaves the gate blind
                _report(exc, on_error)
                failures += 1
                if source.finite and failures > finite_retries:
                    # A replay that keeps failing will not heal; end it (reported) rather than
                    # keep a finite run from ever finishing.
                    log.error("camera: giving up on the finite source after %d errors", failures)
                    break
                if stop.wait(delay):
                    break
                delay = min(delay * 2, max_backoff_s)
                if not source.finite or delivered == 0:  # a replay reopened would restart at the top
                    _reopen(source, on_error)
                continue
            if frame is None:
                log.info("finite frame source ended")
                break
            delay = backoff_s
            failures = 0
            delivered += 1
            slot.put(frame)
    finally:
        slot.close()


def _report(exc: Exception, on_error: Callable[[Exception], None] | None) -> None:
    if isinstance(exc, CameraError):
        log.warning("camera: %s", exc)
    else:
        log.error("camera: unexpected failure", exc_info=exc)
    if on_error is not None:
        try:
            on_error(exc)
        except Exception:
            log.exception("camera: on_error callback failed")


def _reopen(source: FrameSource, on_error: Callable[[Exception], None] | None) -> None:
    # A live device that failed once rarely recovers without being reopened (V4L2 after a
    # USB reset, RTSP after the stream dropped, libcamera after a stall).
    try:
        source.close()
        source.open()
    except Exception as exc:
        _report(exc, on_error)
