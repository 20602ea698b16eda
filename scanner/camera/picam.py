"""picamera2 backend: the Y plane of a small YUV420 ``lores`` stream, every capture bounded.

picamera2 needs libcamera's Python bindings, which exist only on Raspberry Pi OS (apt
``python3-picamera2``), so it is imported when the source opens, never at module import.

API relied on (picamera2 ≥ 0.3.17; checked against raspberrypi/picamera2 ``picamera2.py``
and CHANGELOG):
- ``create_video_configuration(main=, lores=, buffer_count=, controls=, display=, encode=)``;
  ``check_camera_config`` rejects a lores larger than main and odd sizes.
- ``capture_array(name, wait=False)`` returns a ``Job``; ``wait(job, timeout=)`` is
  ``job.get_result(timeout)`` and raises ``TimeoutError`` when no frame completes in time
  (0.3.17: "Timeout support waiting for asynchronous requests to complete"). A plain
  ``capture_array()`` waits forever on a stalled camera.
- A timed-out job stays queued in the camera's job list and would hold up every later job,
  including the one ``stop()`` dispatches; ``cancel_all_and_flush()`` (newer releases,
  "intended for tidying up after an operation has unexpectedly timed out ... so that the
  camera can be closed") clears it. It is called when present.
- A YUV420 array from ``capture_array`` is ``h * 3 / 2`` rows of ``stride`` bytes: Y plane
  first, then U and V; ``[:h, :w]`` is the grayscale image with padding and chroma dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from scanner.camera import CameraError
from scanner.config import CameraConfig
from scanner.models import Frame

log = logging.getLogger(__name__)

# Two in flight plus the one picamera2 keeps back (queue=True) for a low-latency capture;
# each extra buffer is CMA memory the Pi Zero 2 does not have to spare.
BUFFER_COUNT = 3


def _default_factory(camera_num: int) -> Any:
    from picamera2 import Picamera2  # Pi-only: libcamera bindings

    return Picamera2(camera_num)


class Picamera2Source:
    finite = False

    def __init__(
        self,
        cfg: CameraConfig,
        *,
        factory: Callable[[int], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self._factory = factory or _default_factory
        self._clock = clock
        # libcamera wants even sizes; round down rather than fail on a 641-pixel config.
        self.width = cfg.width - cfg.width % 2
        self.height = cfg.height - cfg.height % 2
        self._cam: Any = None
        self._started = False
        self._lock = threading.Lock()
        self._seq = 0  # not reset on reopen: readers use seq to tell new frames from old

    def open(self) -> None:
        size = (self.width, self.height)
        period_us = round(1_000_000 / self.cfg.fps)
        try:
            cam = self._factory(self.cfg.camera_num)
        except Exception as exc:
            raise CameraError(f"picamera2: cannot open camera {self.cfg.camera_num}: {exc}") from exc
        try:
            config = cam.create_video_configuration(
                # main must be at least as large as lores; YUV420 keeps its buffers small.
                main={"size": size, "format": "YUV420"},
                lores={"size": size, "format": "YUV420"},
                buffer_count=BUFFER_COUNT,
                # FrameDurationLimits is libcamera's own control; picamera2's "FrameRate"
                # shorthand is not accepted by every release (old Controls rejects unknown names).
                controls={"FrameDurationLimits": (period_us, period_us)},
                # Nothing is shown or encoded on a headless gate.
                display=None,
                encode=None,
            )
            cam.configure(config)
            cam.start()
        except Exception as exc:
            self._shutdown(cam, started=True)
            raise CameraError(f"picamera2: cannot start camera {self.cfg.camera_num}: {exc}") from exc
        with self._lock:
            self._cam = cam
            self._started = True

    def read(self, timeout: float) -> Frame | None:
        cam = self._cam
        if cam is None:
            raise CameraError("picamera2: not open")
        bound = min(timeout, self.cfg.capture_timeout_s)
        try:
            job = cam.capture_array("lores", wait=False)
            yuv = cam.wait(job, timeout=bound)
        except TimeoutError as exc:
            _flush(cam)
            raise CameraError(f"picamera2: no frame within {bound:g} s (camera stalled?)") from exc
        except Exception as exc:
            _flush(cam)
            raise CameraError(f"picamera2: capture failed: {exc}") from exc
        y = np.asarray(yuv)[: self.height, : self.width]
        if y.shape != (self.height, self.width) or y.dtype != np.uint8:
            raise CameraError(
                f"picamera2: lores frame is {yuv.shape} {yuv.dtype}, "
                f"expected YUV420 of {self.width}x{self.height}"
            )
        frame = Frame(image=y, seq=self._seq, captured=self._clock())
        self._seq += 1
        return frame

    def close(self) -> None:
        with self._lock:
            cam, self._cam = self._cam, None
            started, self._started = self._started, False
        if cam is not None:
            self._shutdown(cam, started=started)

    @staticmethod
    def _shutdown(cam: Any, *, started: bool) -> None:
        # stop() queues a job behind any timed-out capture; flush first or it waits forever.
        _flush(cam)
        if started:
            try:
                cam.stop()
            except Exception:
                log.warning("picamera2: stop failed", exc_info=True)
        try:
            cam.close()
        except Exception:
            log.warning("picamera2: close failed", exc_info=True)


def _flush(cam: Any) -> None:
    flush = getattr(cam, "cancel_all_and_flush", None)
    if flush is None:
        return
    try:
        flush()
    except Exception:
        log.warning("picamera2: cancel_all_and_flush failed", exc_info=True)
