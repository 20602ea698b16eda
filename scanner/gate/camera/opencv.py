"""``file:``, ``v4l2:`` and ``rtsp://`` sources through OpenCV's VideoCapture.

For USB webcams and IP cameras where picamera2 does not apply, and for replaying recorded
clips. Live sources keep a one-frame driver buffer so that a slow decoder reads the newest
frame rather than one from seconds ago.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal

import cv2
import numpy as np

from scanner.config import CameraConfig
from scanner.gate.camera.base import CameraError
from scanner.gate.camera.replay import Pacer
from scanner.models import Frame

Kind = Literal["file", "v4l2", "rtsp"]


class OpenCvSource:
    def __init__(
        self,
        cfg: CameraConfig,
        kind: Kind,
        target: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        capture_factory: Callable[..., cv2.VideoCapture] = cv2.VideoCapture,
    ) -> None:
        self.cfg = cfg
        self.kind = kind
        self.target = target
        self.finite = kind == "file"
        self._clock = clock
        self._factory = capture_factory
        self._closing = threading.Event()
        self._pacer = Pacer(cfg.fps, clock=clock, wait=self._closing.wait) if self.finite else None
        self._cap: cv2.VideoCapture | None = None
        self._lock = threading.Lock()  # close() may come from another thread
        self._seq = 0  # not reset on reopen: readers use seq to tell new frames from old

    @property
    def name(self) -> str:
        return self.target if self.kind == "rtsp" else f"{self.kind}:{self.target}"

    def open(self) -> None:
        self._closing.clear()
        ms = int(self.cfg.capture_timeout_s * 1000)
        if self.kind == "v4l2":
            # Open/read timeouts are honoured by the V4L2 and FFmpeg backends of OpenCV ≥ 4.6;
            # without them a stalled device blocks read() for the driver's own 10 s or more.
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
            cap = self._factory(self.target, cv2.CAP_V4L2, params)
        elif self.kind == "rtsp":
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
            cap = self._factory(self.target, cv2.CAP_FFMPEG, params)
        else:
            cap = self._factory(self.target, cv2.CAP_FFMPEG)
        if not cap.isOpened():
            cap.release()
            raise CameraError(f"{self.name}: cannot open")
        if not self.finite:
            # Requests, not guarantees: drivers round to what the sensor offers.
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.cfg.width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.cfg.height)
            cap.set(cv2.CAP_PROP_FPS, self.cfg.fps)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        if self._pacer is not None:
            self._pacer.reset()
        with self._lock:
            self._cap = cap

    def read(self, timeout: float) -> Frame | None:
        # timeout: the capture's own read timeout was set at open() from capture_timeout_s;
        # VideoCapture.read() offers no per-call bound.
        # Held across read(): releasing a VideoCapture while another thread is inside its
        # read() can crash the FFmpeg backend, so close() waits for the read to end.
        with self._lock:
            cap = self._cap
            if cap is None:
                raise CameraError(f"{self.name}: not open")
            try:
                ok, image = cap.read()
            except cv2.error as exc:
                raise CameraError(f"{self.name}: read failed: {exc}") from exc
        if not ok or image is None:
            if self.finite:
                return None
            raise CameraError(f"{self.name}: no frame (device gone or stream stalled)")
        gray = _to_gray(image)
        if self._pacer is not None and not self._pacer.pace():
            return None
        frame = Frame(image=gray, seq=self._seq, captured=self._clock())
        self._seq += 1
        return frame

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()


def _to_gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
