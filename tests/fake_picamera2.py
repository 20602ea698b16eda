"""A stand-in for ``picamera2.Picamera2``: exactly the calls scanner.gate.camera.picam makes.

Signatures follow raspberrypi/picamera2 (≥ 0.3.17): ``create_video_configuration`` with its
keyword arguments, ``capture_array(name, wait=, signal_function=)`` returning a job when
``wait=False``, ``wait(job, timeout=)`` that raises ``TimeoutError``, ``cancel_all_and_flush``,
``stop``, ``close``. Like the real one it refuses a lores stream larger than main and odd
sizes, and, like the real one, a ``stop()`` queued behind a timed-out capture would hang: the
fake records that as ``stop_blocked`` instead of hanging the test run.

``camera_controls`` is ``{name: (min, max, default)}`` as picamera2 reports it, and like
picamera2's ``Controls`` the fake raises ``RuntimeError`` for a control the camera does not
advertise, whether it comes in the configuration's ``controls`` or through ``set_controls``.
"""

from __future__ import annotations

from concurrent.futures import CancelledError, Future
from typing import Any

import numpy as np

# As picamera2 reports them for an imx708 (Camera Module 3) and an imx219 (Module 2, fixed focus).
MODULE3_CONTROLS: dict[str, tuple] = {
    "AfMode": (0, 2, 0),
    "AfRange": (0, 2, 0),
    "AfSpeed": (0, 1, 0),
    "LensPosition": (0.0, 15.0, 1.0),
    "AeEnable": (False, True, None),
    "AeConstraintMode": (0, 3, 0),
    "AeExposureMode": (0, 3, 0),
    "ExposureValue": (-8.0, 8.0, 0.0),
    "ExposureTime": (26, 1_220_255, None),
    "AnalogueGain": (1.12, 16.0, None),
    "FrameDurationLimits": (33_333, 120_000, None),
}
MODULE2_CONTROLS = {k: v for k, v in MODULE3_CONTROLS.items() if not k.startswith(("Af", "Lens"))}

U_VALUE = 77  # chroma rows: never part of a grayscale frame
PAD_VALUE = 250  # row padding beyond the image width


def y_plane(width: int, height: int, n: int) -> np.ndarray:
    """The Y plane the fake delivers for its n-th frame (a gradient that moves per frame)."""
    yy, xx = np.mgrid[0:height, 0:width]
    return (100 + (xx + 2 * yy + 3 * n) % 60).astype(np.uint8)  # never U_VALUE or PAD_VALUE


class FakeJob:
    def __init__(self) -> None:
        self.future: Future[np.ndarray] = Future()

    def get_result(self, timeout: float | None = None) -> np.ndarray:
        return self.future.result(timeout=timeout)


class FakePicamera2:
    def __init__(
        self,
        camera_num: int = 0,
        *,
        stall_after: int | None = None,
        stride_pad: int = 64,
        fail_start: Exception | None = None,
        fail_stop: Exception | None = None,
        camera_controls: dict[str, tuple] | None = None,
        tuning: dict | None = None,
    ) -> None:
        self.camera_num = camera_num
        self.camera_controls = dict(MODULE3_CONTROLS if camera_controls is None else camera_controls)
        self.tuning = tuning
        self.set_controls_calls: list[dict[str, Any]] = []
        self.stall_after = stall_after  # frames delivered before captures stop completing
        self.stride_pad = stride_pad
        self.fail_start = fail_start
        self.fail_stop = fail_stop
        self.calls: list[str] = []
        self.config: dict[str, Any] | None = None
        self.started = False
        self.closed = False
        self.frames = 0
        self.pending: list[FakeJob] = []
        self.stop_blocked = False
        self.waits: list[float | None] = []

    def create_video_configuration(
        self,
        main: dict | None = None,
        lores: dict | None = None,
        raw: dict | None = None,
        transform: Any = None,
        colour_space: Any = None,
        buffer_count: int = 6,
        controls: dict | None = None,
        display: str | None = "main",
        encode: str | None = "main",
        queue: bool = True,
        sensor: dict | None = None,
        use_case: str = "video",
    ) -> dict[str, Any]:
        self.calls.append("create_video_configuration")
        main = {"format": "XBGR8888", "size": (1280, 720), **(main or {})}
        if lores is not None:
            lores = {"format": "YUV420", "size": main["size"], **lores}
        return {
            "use_case": use_case,
            "transform": transform,
            "colour_space": colour_space,
            "buffer_count": buffer_count,
            "queue": queue,
            "main": main,
            "lores": lores,
            "raw": raw,
            "controls": controls or {},
            "sensor": sensor or {},
            "display": display,
            "encode": encode,
        }

    def configure(self, config: dict[str, Any]) -> None:
        self.calls.append("configure")
        if self.started:
            raise RuntimeError("Camera must be stopped before configuring")
        for name in ("main", "lores"):
            stream = config[name]
            if stream is None:
                continue
            w, h = stream["size"]
            if w % 2 or h % 2:
                raise RuntimeError("width and height should be even")
        if config["lores"] is not None:
            mw, mh = config["main"]["size"]
            lw, lh = config["lores"]["size"]
            if lw > mw or lh > mh:
                raise RuntimeError("lores stream dimensions may not exceed main stream")
        self._check_advertised(config["controls"])
        self.config = config

    def set_controls(self, controls: dict[str, Any]) -> None:
        self.calls.append("set_controls")
        self._check_advertised(controls)
        self.set_controls_calls.append(dict(controls))

    def _check_advertised(self, controls: dict[str, Any]) -> None:
        for name in controls:
            if name not in self.camera_controls:
                raise RuntimeError(f"Control {name} is not advertised by libcamera")

    def start(self) -> None:
        self.calls.append("start")
        if self.fail_start is not None:
            raise self.fail_start
        if self.config is None:
            raise RuntimeError("Camera has not been configured")
        self.started = True

    def capture_array(self, name: str = "main", wait: Any = None, signal_function: Any = None) -> Any:
        self.calls.append(f"capture_array:{name}")
        if wait is not False:
            raise AssertionError("an unbounded capture: a stalled camera would block it forever")
        if not self.started or self.config is None:
            raise RuntimeError("camera not started")
        job = FakeJob()
        if self.stall_after is not None and self.frames >= self.stall_after:
            self.pending.append(job)  # never completes, like a camera whose cable came loose
            return job
        w, h = self.config[name]["size"]
        stride = w + self.stride_pad
        array = np.full((h * 3 // 2, stride), PAD_VALUE, dtype=np.uint8)
        array[:h, :w] = y_plane(w, h, self.frames)
        array[h:, :] = U_VALUE
        self.frames += 1
        job.future.set_result(array)
        return job

    def wait(self, job: FakeJob, timeout: float | None = None) -> np.ndarray:
        self.calls.append("wait")
        self.waits.append(timeout)
        if timeout is None:
            raise AssertionError("wait() without a timeout")
        return job.get_result(timeout=timeout)

    def cancel_all_and_flush(self) -> None:
        self.calls.append("cancel_all_and_flush")
        for job in self.pending:
            job.future.set_exception(CancelledError())
        self.pending = []

    def stop(self) -> None:
        self.calls.append("stop")
        if self.pending:
            self.stop_blocked = True  # the real stop() would queue behind the stuck job
        if self.fail_stop is not None:
            raise self.fail_stop
        self.started = False

    def close(self) -> None:
        self.calls.append("close")
        self.closed = True


class Factory:
    """``factory=`` for Picamera2Source: makes fakes with the given options, remembers them."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.made: list[FakePicamera2] = []

    def __call__(self, camera_num: int, tuning: dict | None = None) -> FakePicamera2:
        cam = FakePicamera2(camera_num, tuning=tuning, **self.options)
        self.made.append(cam)
        return cam
