"""The latest-frame slot between the capture thread and the decoder.

Shaped like picamera2's ``examples/frame_server.py``: one slot under a Condition. A decoder
slower than the camera skips frames instead of working through a backlog of stale ones, so
the time from a code entering the view to the relay opening never grows with load.
"""

from __future__ import annotations

import threading
import time

from scanner.models import Frame


class LatestFrameSlot:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._taken = False
        self._closed = False
        self.dropped = 0  # frames overwritten before anyone took them

    def put(self, frame: Frame) -> None:
        with self._cond:
            if self._closed:
                return  # the reader has been told the stream ended; a late frame is noise
            if self._frame is not None and not self._taken:
                self.dropped += 1
            self._frame = frame
            self._taken = False
            self._cond.notify_all()

    def get(self, timeout: float, after_seq: int = -1) -> Frame | None:
        """The newest frame with ``seq > after_seq``; None on timeout or when closed and drained."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                frame = self._frame
                if frame is not None and frame.seq > after_seq:
                    self._taken = True
                    return frame
                if self._closed:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def close(self) -> None:
        """End of stream: wakes every waiter; a frame not yet taken can still be taken."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        """True once closed and the last frame (if any) was taken: nothing more will come."""
        with self._cond:
            return self._closed and (self._frame is None or self._taken)
