"""Frame sources and the capture thread body.

A source delivers grayscale frames; the capture thread puts them into a
:class:`~scanner.gate.camera.slot.LatestFrameSlot`, from which the decoder takes only the
newest. Importing this package starts no work and never loads picamera2: the picamera2
backend imports it (Pi-only, libcamera bindings) only when a camera opens.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from scanner.config import CameraConfig
from scanner.gate.camera.base import CameraError, FrameSource
from scanner.gate.camera.opencv import OpenCvSource
from scanner.gate.camera.picam import Picamera2Source
from scanner.gate.camera.replay import ReplaySource
from scanner.gate.camera.slot import LatestFrameSlot
from scanner.gate.camera.watchdog import CameraSupervisor

__all__ = ["CameraError", "FrameSource", "open_source", "run_capture"]

log = logging.getLogger(__name__)


def open_source(cfg: CameraConfig) -> FrameSource:
    """Build (but do not open) the source named by ``cfg.source``."""
    source = cfg.source
    if source == "picamera2":
        return Picamera2Source(cfg)
    if source.startswith("dir:"):
        return ReplaySource(cfg, _target(source, "dir:"))
    if source.startswith("file:"):
        return OpenCvSource(cfg, "file", _target(source, "file:"))
    if source.startswith("v4l2:"):
        return OpenCvSource(cfg, "v4l2", _target(source, "v4l2:"))
    if source.startswith(("rtsp://", "rtsps://")):
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
    :class:`~scanner.gate.camera.watchdog.CameraSupervisor` itself, which this wraps. On any error a
    live source is reopened after a backoff that doubles up to ``max_backoff_s``; a finite source
    gets ``finite_retries`` more attempts in a row. Every error reaches ``on_error`` and the log.
    The slot is closed on the way out.
    """
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
