import pytest

from scanner.gate.track import PresenceTracker

A, B = b"CODE-A", b"CODE-B"


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        # (time, payloads in that frame) → new scans per frame
        ([(t * 0.5, [A]) for t in range(11)], [[A]] + [[]] * 10),  # held in view for 5 s: one scan
        ([(0.0, [A]), (0.5, []), (1.0, [A])], [[A], [], []]),  # a few unreadable frames: still present
        ([(0.0, [A]), (0.1, []), (2.0, [A])], [[A], [], [A]]),  # left the view for > 1.5 s: new scan
        (
            [(0.0, [A, B]), (0.1, [B]), (1.0, [B]), (2.0, [A, B])],
            [[A, B], [], [], [A]],
        ),  # B stayed, A came back
        ([(0.0, [A, A])], [[A]]),  # both engines reading the same code in one frame
    ],
)
def test_presence_table(frames, expected):
    tracker = PresenceTracker(gone_after_s=1.5)
    assert [tracker.update(payloads, now) for now, payloads in frames] == expected


def test_table_stays_bounded_with_a_wall_of_codes():
    tracker = PresenceTracker(gone_after_s=10)
    for i in range(1000):
        tracker.update([f"code-{i}".encode()], now=i * 0.001)
    assert tracker.present() <= 64
