"""``dir:`` source: replays a folder of still images as if they came from a camera.

Used for demos, tests and benchmarks against the real photo corpus. Frames are paced at
``camera.fps`` on a monotonic deadline schedule so that a replay exercises the same
frame-dropping path as a live camera.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from scanner.config import CameraConfig
from scanner.gate.camera.base import CameraError
from scanner.models import Frame

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".webp"})


class Pacer:
    """Releases one frame per period on a fixed schedule ``start + k * period``.

    Deadlines are computed from the schedule, not from when the last frame went out, so
    time spent reading and decoding images does not accumulate into drift. When the reader
    falls more than a period behind (a slow disk, a paused process), the schedule restarts
    from now instead of bursting out the frames it missed.
    """

    def __init__(
        self,
        fps: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], bool],
    ) -> None:
        self.period = 1.0 / fps
        self._clock = clock
        self._wait = wait  # returns True when interrupted (the source is closing)
        self._due: float | None = None

    def reset(self) -> None:
        self._due = None

    def pace(self) -> bool:
        """Wait until the next frame is due; False when interrupted."""
        now = self._clock()
        if self._due is None or now - self._due > self.period:
            self._due = now
        delay = self._due - now
        if delay > 0 and self._wait(delay):
            return False
        self._due += self.period
        return True


class ReplaySource:
    """Image files of a directory, in name order, as grayscale frames."""

    finite = True

    def __init__(
        self,
        cfg: CameraConfig,
        directory: str | Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], bool] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self._clock = clock
        self._closing = threading.Event()
        self._pacer = Pacer(cfg.fps, clock=clock, wait=wait or self._closing.wait)
        self._files: list[Path] = []
        self._index = 0
        self._seq = 0
        self._open = False

    def open(self) -> None:
        try:
            files = sorted(
                p for p in self.directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
        except OSError as exc:
            raise CameraError(f"dir:{self.directory}: cannot list: {exc.strerror or exc}") from exc
        if not files:
            raise CameraError(f"dir:{self.directory}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self._files = files
        self._index = 0
        self._pacer.reset()
        self._closing.clear()
        self._open = True

    def read(self, timeout: float) -> Frame | None:
        # timeout is unused: reading a local file either works or fails at once, and the
        # pacing wait is this source's own schedule, not a stall.
        if not self._open:
            raise CameraError(f"dir:{self.directory}: not open")
        while self._index < len(self._files):
            path = self._files[self._index]
            self._index += 1
            image = _imread_gray(path)
            if image is None:
                log.warning("dir: skipping unreadable image %s", path)
                continue
            if not self._pacer.pace():
                return None  # closed while waiting
            frame = Frame(image=image, seq=self._seq, captured=self._clock())
            self._seq += 1
            return frame
        return None

    def close(self) -> None:
        self._open = False
        self._closing.set()


def _imread_gray(path: Path) -> np.ndarray | None:
    try:
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    except cv2.error:
        return None
    if image is None or image.size == 0:
        return None
    return image
