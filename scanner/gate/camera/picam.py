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
- ``camera_controls`` maps every control the camera advertises to ``(min, max, default)``;
  picamera2's ``Controls`` raises ``RuntimeError("Control X is not advertised by libcamera")``
  for any other name (raspberrypi/picamera2 ``controls.py``; issue #875). So only advertised
  controls are asked for: a Camera Module 2 or HQ has no ``AfMode``/``LensPosition``.

Controls relied on (libcamera ``control_ids_core.yaml``/``control_ids_draft.yaml``; passed as
plain ints so libcamera's enum classes are not needed): ``AfMode`` (0 manual, 2 continuous),
``LensPosition`` (dioptres), ``ExposureValue`` (stops, log2), ``AeConstraintMode`` (1
"highlight": "avoid over-exposing the brightest parts of an image": a phone screen),
``FrameDurationLimits`` (µs; also the longest possible exposure). libcamera has no control
that caps the shutter the auto exposure may choose below the frame period; the Raspberry Pi
AGC takes its shutter and analogue-gain ladder from the tuning file's ``rpi.agc``
``exposure_modes``. ``camera.exposure_max_us``/``analogue_gain_max`` clamp that ladder in a
copy of the sensor's tuning, passed as ``Picamera2(camera_num, tuning=...)`` (the method of
picamera2's ``tests/tuning_file.py``: ``load_tuning_file`` + ``find_tuning_algo(tuning,
"rpi.agc")["exposure_modes"]``; Raspberry Pi camera guide, chapter 5). Newer tuning files
keep the AGC settings in a list of ``channels``; both layouts are handled.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from scanner.config import CameraConfig
from scanner.gate.camera.base import CameraError
from scanner.models import Frame

log = logging.getLogger(__name__)

# Two in flight plus the one picamera2 keeps back (queue=True) for a low-latency capture;
# each extra buffer is CMA memory the Pi Zero 2 does not have to spare.
BUFFER_COUNT = 3


# libcamera enum values (control_ids_draft.yaml AfModeEnum, control_ids_core.yaml AeConstraintModeEnum).
AF_MANUAL, AF_CONTINUOUS = 0, 2
AE_CONSTRAINT = {"normal": 0, "highlight": 1}


def _default_factory(camera_num: int, tuning: dict[str, Any] | None) -> Any:
    from picamera2 import Picamera2  # Pi-only: libcamera bindings

    return Picamera2(camera_num, tuning=tuning)


def _default_tuning(camera_num: int) -> dict[str, Any]:
    from picamera2 import Picamera2  # Pi-only: libcamera bindings

    # global_camera_info() lists cameras without opening them; "Model" names the tuning file
    # (imx708, imx708_wide, imx219, imx477, …); load_tuning_file finds the platform's folder.
    model = Picamera2.global_camera_info()[camera_num]["Model"]
    tuning: dict[str, Any] = Picamera2.load_tuning_file(f"{model}.json")
    return tuning


def wanted_controls(cfg: CameraConfig) -> dict[str, Any]:
    """The libcamera controls ``cfg`` asks for, before checking what the camera advertises."""
    period_us = round(1_000_000 / cfg.fps)
    # FrameDurationLimits is libcamera's own control; picamera2's "FrameRate" shorthand is not
    # accepted by every release (old Controls rejects unknown names).
    controls: dict[str, Any] = {"FrameDurationLimits": (period_us, period_us)}
    if cfg.autofocus == "continuous":
        controls["AfMode"] = AF_CONTINUOUS
    elif cfg.autofocus == "manual":
        controls["AfMode"] = AF_MANUAL
        controls["LensPosition"] = cfg.lens_position
    controls["AeConstraintMode"] = AE_CONSTRAINT[cfg.ae_constraint]
    if cfg.ev != 0.0:
        controls["ExposureValue"] = cfg.ev
    return controls


def advertised_only(
    wanted: Mapping[str, Any], advertised: Mapping[str, tuple[Any, ...]]
) -> tuple[dict[str, Any], list[str]]:
    """(controls the camera advertises, names it does not); numbers clamped into its range."""
    applied: dict[str, Any] = {}
    skipped: list[str] = []
    for name, value in wanted.items():
        limits = advertised.get(name)
        if limits is None:
            skipped.append(name)
            continue
        lo, hi = limits[0], limits[1]
        if isinstance(value, int | float) and isinstance(lo, int | float) and isinstance(hi, int | float):
            clamped = min(max(value, lo), hi)
            if clamped != value:
                log.warning("picamera2: %s = %s is outside %s..%s; using %s", name, value, lo, hi, clamped)
                value = clamped
        applied[name] = value
    return applied, skipped


def cap_exposure(tuning: dict[str, Any], exposure_max_us: int, gain_max: float) -> int:
    """Clamp every AE exposure profile of a Raspberry Pi tuning in place; the number of profiles changed."""
    if "algorithms" in tuning:  # tuning format 2: a list of one-key {name: params} dicts
        agc = next((a["rpi.agc"] for a in tuning["algorithms"] if "rpi.agc" in a), None)
    else:
        agc = tuning.get("rpi.agc")
    if not isinstance(agc, dict):
        return 0
    changed = 0
    for channel in agc.get("channels") or [agc]:
        for mode in (channel.get("exposure_modes") or {}).values():
            if exposure_max_us > 0 and "shutter" in mode:
                mode["shutter"] = [min(s, exposure_max_us) for s in mode["shutter"]]
            if gain_max > 0 and "gain" in mode:
                mode["gain"] = [max(1.0, min(g, gain_max)) for g in mode["gain"]]
            changed += 1
    return changed


class Picamera2Source:
    finite = False

    def __init__(
        self,
        cfg: CameraConfig,
        *,
        factory: Callable[[int, dict[str, Any] | None], Any] | None = None,
        tuning_loader: Callable[[int], dict[str, Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self._factory = factory or _default_factory
        self._tuning_loader = tuning_loader or _default_tuning
        self.applied_controls: dict[str, Any] = {}  # what the last open asked for: selftest, logs
        self.skipped_controls: list[str] = []
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
        tuning = self._capped_tuning()
        try:
            cam = self._factory(self.cfg.camera_num, tuning)
        except Exception as exc:
            raise CameraError(f"picamera2: cannot open camera {self.cfg.camera_num}: {exc}") from exc
        try:
            controls, skipped = advertised_only(wanted_controls(self.cfg), cam.camera_controls)
            if skipped:
                log.info(
                    "picamera2: camera %d does not offer %s; not set", self.cfg.camera_num, ", ".join(skipped)
                )
            self.applied_controls, self.skipped_controls = controls, skipped
            config = cam.create_video_configuration(
                # main must be at least as large as lores; YUV420 keeps its buffers small.
                main={"size": size, "format": "YUV420"},
                lores={"size": size, "format": "YUV420"},
                buffer_count=BUFFER_COUNT,
                # In the configuration, so the first frame already has them (set at start()).
                controls=controls,
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

    def _capped_tuning(self) -> dict[str, Any] | None:
        """The sensor's tuning with the AE ladder clamped, or None (libcamera's own) when not asked
        for or not possible: a camera without the caps still scans, so this never fails open()."""
        cfg = self.cfg
        if cfg.exposure_max_us <= 0 and cfg.analogue_gain_max <= 0:
            return None
        try:
            tuning = copy.deepcopy(self._tuning_loader(cfg.camera_num))
            if cap_exposure(tuning, cfg.exposure_max_us, cfg.analogue_gain_max) == 0:
                log.warning("picamera2: the tuning has no rpi.agc exposure modes; exposure caps not applied")
                return None
        except Exception as exc:
            log.warning("picamera2: cannot load the sensor tuning (%s); exposure caps not applied", exc)
            return None
        return tuning

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
