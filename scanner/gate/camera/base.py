"""What every frame source is: the protocol the capture thread drives, and its one error."""

from __future__ import annotations

from typing import Protocol

from scanner.models import Frame


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
