"""The camera watchdog: notices a camera that stopped working and reopens it with backoff.

A gate camera fails in more ways than raising an error. A USB webcam knocked off the bus makes
every read fail at once; a ribbon cable that lost contact makes libcamera's captures time out; a
driver wedged inside a native call never returns at all; a covered or dead sensor delivers black
frames; a frozen driver hands back the same buffer again and again. :class:`CameraSupervisor`
runs the capture loop, turns each of those into a *failure with a reason*, closes and reopens the
source with a doubling backoff, and reports every change of state through
``on_state(state, reason)`` so the app can show the fault pattern, raise the ``camera`` alarm in
retained ``status`` and decide when to let systemd restart the process.

States: ``starting`` (nothing delivered yet) → ``ok`` (frames flow) ⇄ ``failed`` (reason set;
the source is being reopened). A failed camera counts as recovered only on a frame that is
neither black nor a repeat of the frame before it, so a camera that reopens into the same fault
stays ``failed`` instead of flapping; until then its frames are not handed to the decoder.

Black and frozen runs are only judged on live sources: a replay may legitimately repeat an image.
"Frozen" means byte-identical (checked on every other row): a live sensor's noise changes pixels
in every frame even when nobody stands in front of the gate, a stuck driver does not.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from scanner.config import CameraConfig
from scanner.gate.camera.base import CameraError, FrameSource
from scanner.gate.camera.slot import LatestFrameSlot

__all__ = ["CameraSupervisor", "FrameCheck", "State"]

log = logging.getLogger(__name__)

State = Literal["starting", "ok", "failed"]

# Files either read or they do not: a replay that failed is retried quickly, not on a camera's backoff.
_FINITE_BACKOFF_S = 0.1


class FrameCheck:
    """Counts runs of black and of byte-identical frames; says when a run is long enough to be a fault."""

    def __init__(self, *, black_level: int, black_frames: int, frozen_frames: int) -> None:
        self.black_level = black_level
        self.black_frames = black_frames
        self.frozen_frames = frozen_frames
        self.reset()

    def reset(self) -> None:
        """Forget the previous frame (after a reopen the first frame has nothing to be compared with)."""
        self.black_run = 0
        self.frozen_run = 0
        self._digest: int | None = None
        self.proven = False  # the last frame showed a working camera: not black, not a repeat

    def inspect(self, image: np.ndarray) -> str | None:
        """Account for one frame; the failure reason when a run reached its limit, else None."""
        black = False
        if self.black_frames > 0:
            # Every 4th pixel both ways: 1/16 of the work and the same answer for a whole-frame mean.
            mean = float(image[::4, ::4].mean())
            black = mean < self.black_level
            self.black_run = self.black_run + 1 if black else 0
        repeat = False
        fresh = True
        if self.frozen_frames > 0:
            # Every other row: sensor noise changes far more than that, a stuck buffer changes nothing.
            digest = zlib.crc32(image[::2].tobytes())
            fresh = self._digest is not None
            repeat = digest == self._digest
            self._digest = digest
            self.frozen_run = self.frozen_run + 1 if repeat else 0
        self.proven = not black and fresh and not repeat
        if self.black_frames > 0 and self.black_run >= self.black_frames:
            return f"black frames: {self.black_run} in a row darker than {self.black_level} (lens covered?)"
        if self.frozen_frames > 0 and self.frozen_run >= self.frozen_frames:
            return f"frozen frames: {self.frozen_run} in a row identical to the one before (driver stuck?)"
        return None


class CameraSupervisor:
    """Runs the capture loop over ``source`` into ``slot`` and keeps the camera alive.

    Seams for tests: ``clock`` (monotonic seconds) and ``wait(delay) -> bool`` (the backoff wait;
    True means stop). By default the wait is the stop event's, so a stop request cuts a backoff short.
    """

    def __init__(
        self,
        source: FrameSource,
        slot: LatestFrameSlot,
        *,
        on_state: Callable[[str, str], None] | None = None,
        on_error: Callable[[Exception], None] | None = None,
        read_timeout: float = 2.0,
        stall_timeout_s: float = 10.0,
        black_level: int = 20,
        black_frames: int = 0,
        frozen_frames: int = 0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        finite_retries: int = 3,
        open_first: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], bool] | None = None,
    ) -> None:
        self.source = source
        self.slot = slot
        self._on_state = on_state
        self._on_error = on_error
        self.read_timeout = read_timeout
        self.stall_timeout_s = stall_timeout_s
        self.check = FrameCheck(
            black_level=black_level, black_frames=black_frames, frozen_frames=frozen_frames
        )
        self.backoff_s = min(backoff_s, _FINITE_BACKOFF_S) if source.finite else backoff_s
        self.max_backoff_s = max(max_backoff_s, self.backoff_s)
        self.finite_retries = finite_retries
        self._open_first = open_first
        self._clock = clock
        self._wait = wait
        self._lock = threading.RLock()  # state and its report: one transition (and callback) at a time
        self.state: State = "starting"
        self.reason = ""
        self.down_since: float | None = None  # monotonic time of the first failure of this outage
        self.reopens = 0  # open() attempts after a failure
        self.failures = 0  # failures seen, in total
        self._call: tuple[str, float] | None = None  # ("read" | "open", started) while inside the source
        self._interrupted = False
        self._threads: list[threading.Thread] = []

    @classmethod
    def from_config(
        cls, source: FrameSource, slot: LatestFrameSlot, cfg: CameraConfig, **kwargs: Any
    ) -> CameraSupervisor:
        return cls(
            source,
            slot,
            read_timeout=cfg.capture_timeout_s,
            stall_timeout_s=cfg.stall_timeout_s,
            black_level=cfg.black_level,
            black_frames=cfg.black_frames,
            frozen_frames=cfg.frozen_frames,
            backoff_s=cfg.reopen_backoff_s,
            max_backoff_s=cfg.reopen_backoff_max_s,
            **kwargs,
        )

    # -- threads ------------------------------------------------------------------------------

    def start(self, stop: threading.Event) -> None:
        """Start the capture thread and (for a live source) the stall monitor; both end on ``stop``.

        A replay has no monitor: its reads include its own pacing wait (up to 1 / fps), and a
        local file does not hang in a camera driver."""
        self._threads = [threading.Thread(target=self.run, args=(stop,), name="capture", daemon=True)]
        if not self.source.finite:
            self._threads.append(
                threading.Thread(target=self.monitor, args=(stop,), name="camera-watchdog", daemon=True)
            )
        for t in self._threads:
            t.start()

    def join(self, timeout: float) -> bool:
        """Wait (bounded) for both threads; False if the capture thread is still stuck in the driver."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def monitor(self, stop: threading.Event) -> None:
        """Stall monitor body: a read that never returns cannot report itself, so look from outside."""
        interval = min(1.0, self.stall_timeout_s / 4)
        while not stop.wait(interval):
            self.check_stall()

    # -- the capture loop ---------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Capture until ``stop`` is set or a finite source ends; the slot is closed on the way out,
        so a decoder waiting on it wakes up instead of waiting for frames that will never come."""
        wait = self._wait or stop.wait
        source = self.source
        delay = self.backoff_s
        need_open = self._open_first
        first_open = self._open_first  # else the caller opened it: every open here is a reopen
        delivered = 0
        in_a_row = 0  # failures since the last delivered frame: a finite source gives up on them

        def failed(reason: str, exc: Exception | None) -> bool:
            """Report, back off; True when the loop must end."""
            nonlocal delay, in_a_row
            self._fail(reason, exc)
            in_a_row += 1
            if source.finite and in_a_row > self.finite_retries:
                # A replay that keeps failing will not heal; end it (reported) rather than keep a
                # finite run from ever finishing.
                log.error("camera: giving up on the finite source after %d errors", in_a_row)
                return True
            if wait(delay):
                return True
            delay = min(delay * 2, self.max_backoff_s)
            return False

        try:
            while not stop.is_set():
                if need_open:
                    try:
                        with self._inside("open"):
                            if not first_open:
                                self.reopens += 1
                                source.close()
                            first_open = False
                            source.open()
                    except Exception as exc:
                        if failed(_reason(exc), exc):
                            break
                        continue
                    need_open = False
                    self.check.reset()
                try:
                    with self._inside("read"):
                        frame = source.read(self.read_timeout)
                except Exception as exc:  # any failure: a capture thread that dies leaves the gate blind
                    if failed(_reason(exc), exc):
                        break
                    # A live device that failed once rarely recovers without being reopened (V4L2
                    # after a USB reset, RTSP after the stream dropped, libcamera after a stall). A
                    # replay reopened would restart at the top, so only one that never delivered is.
                    need_open = not source.finite or delivered == 0
                    continue
                if frame is None:
                    log.info("finite frame source ended")
                    break
                if not source.finite:
                    problem = self.check.inspect(frame.image)
                    if problem is not None:
                        if failed(problem, None):
                            break
                        need_open = True
                        continue
                    if self.state == "failed" and not self.check.proven:
                        continue  # a recovering camera proves itself before its frames count
                if self.state != "ok":
                    self._set_state("ok", "")
                delay = self.backoff_s
                in_a_row = 0
                delivered += 1
                self.slot.put(frame)
        finally:
            self.slot.close()

    def check_stall(self) -> bool:
        """True (and the camera reported failed and interrupted) when the capture thread has been
        inside one source call for longer than ``stall_timeout_s``: reads are bounded by
        ``read_timeout``, so such a call is a driver that ignores its own timeout."""
        now = self._clock()
        with self._lock:
            if self._call is None or self._interrupted:
                return False
            what, since = self._call
            stuck = now - since
            if stuck < self.stall_timeout_s:
                return False
            self._interrupted = True
            self._fail(f"no frame for {stuck:.0f} s: the camera driver's {what}() has not returned", None)
        # close() may itself wait for the stuck call (OpenCV holds a lock across read): never here.
        threading.Thread(target=self._interrupt, name="camera-interrupt", daemon=True).start()
        return True

    # -- internals ----------------------------------------------------------------------------

    def _interrupt(self) -> None:
        try:
            self.source.close()  # picamera2: flushes the stuck job, so its wait() raises
        except Exception:
            log.warning("camera: close to interrupt a stuck call failed", exc_info=True)

    def _inside(self, what: str) -> _Call:
        return _Call(self, what)

    def _fail(self, reason: str, exc: Exception | None) -> None:
        if exc is not None:
            if isinstance(exc, CameraError):
                log.warning("camera: %s", reason)
            else:
                log.error("camera: unexpected failure", exc_info=exc)
            if self._on_error is not None:
                try:
                    self._on_error(exc)
                except Exception:
                    log.exception("camera: on_error callback failed")
        else:
            log.warning("camera: %s", reason)
        with self._lock:
            self.failures += 1
            if self.state != "failed":
                self.down_since = self._clock()
            self._set_state("failed", reason)

    def _set_state(self, state: State, reason: str) -> None:
        with self._lock:
            if (state, reason) == (self.state, self.reason):
                return
            previous = self.state
            self.state, self.reason = state, reason
            if state == "ok":
                self.down_since = None
                if previous == "failed":
                    log.warning("camera recovered after %d reopen attempt(s)", self.reopens)
            if self._on_state is not None:
                try:
                    self._on_state(state, reason)
                except Exception:
                    log.exception("camera: on_state callback failed")


class _Call:
    """Marks the capture thread as inside a source call, for the stall monitor."""

    def __init__(self, supervisor: CameraSupervisor, what: str) -> None:
        self._s = supervisor
        self._what = what

    def __enter__(self) -> None:
        with self._s._lock:
            self._s._call = (self._what, self._s._clock())

    def __exit__(self, *exc: object) -> None:
        with self._s._lock:
            self._s._call = None
            self._s._interrupted = False


def _reason(exc: Exception) -> str:
    if isinstance(exc, CameraError):
        return str(exc) or "camera error"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
