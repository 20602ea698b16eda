"""The camera watchdog: each way a camera fails, driven through a fake source, and its recovery.

Time is injected: the supervisor's clock and backoff wait are fakes, so a 30 s backoff costs
nothing and the waits can be asserted exactly. Only the App tests at the end run in real time,
on small timeouts, and they wait on conditions, never on sleeps.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from gpiozero.pins.mock import MockFactory

from scanner import config as config_mod
from scanner.config import CameraConfig
from scanner.gate.app import App
from scanner.gate.camera import CameraError
from scanner.gate.camera.opencv import OpenCvSource
from scanner.gate.camera.slot import LatestFrameSlot
from scanner.gate.camera.watchdog import CameraSupervisor, FrameCheck
from scanner.gate.health import SystemdNotifier
from scanner.models import Frame
from scanner.sim.localbroker import LocalBroker
from tests.helpers import make_config, unique_name
from tests.mqtt_helpers import Subscriber, wait_until

WAIT = 5.0  # bound for thread hand-offs; never slept


class FakeTime:
    """A monotonic clock and a backoff wait that advances it instead of sleeping."""

    def __init__(self, stop: threading.Event) -> None:
        self.now = 1000.0
        self.waits: list[float] = []
        self._stop = stop

    def clock(self) -> float:
        return self.now

    def wait(self, delay: float) -> bool:
        self.waits.append(delay)
        self.now += delay
        return self._stop.is_set()


class FakeCamera:
    """A live FrameSource that plays a script, one step per read.

    Steps: ``"frame"`` (a noisy scene, different every time), ``"black"``, ``"same"`` (identical
    to the previous frame), ``"hang"`` (blocks until close()), or an exception to raise.
    ``open_script`` does the same for open(): None succeeds, an exception is raised. When the
    script runs out the source sets ``stop`` and keeps delivering frames.
    """

    def __init__(
        self, script: list, stop: threading.Event, *, open_script: list | None = None, finite: bool = False
    ) -> None:
        self.script = list(script)
        self.open_script = list(open_script or [])
        self.stop = stop
        self.finite = finite
        self.opens = 0
        self.closes = 0
        self.seq = 0
        self.rng = np.random.default_rng(7)
        self.last: np.ndarray | None = None
        self.hanging = threading.Event()
        self._released = threading.Event()

    def open(self) -> None:
        self.opens += 1
        self._released.clear()
        step = self.open_script.pop(0) if self.open_script else None
        if isinstance(step, Exception):
            raise step

    def read(self, timeout: float) -> Frame | None:
        if self.script:
            step = self.script.pop(0)
        else:
            self.stop.set()
            step = "frame"
        if isinstance(step, Exception):
            raise step
        if step == "hang":
            self.hanging.set()
            self._released.wait(WAIT)
            raise CameraError("fake: closed while reading")
        if step == "black":
            image = self.rng.integers(14, 19, (48, 64), dtype=np.uint8)  # limited-range black, with noise
        elif step == "same":
            assert self.last is not None
            image = self.last.copy()
        elif step == "static":  # the same scene, nobody in front of the gate: only sensor noise changes
            image = np.clip(self._scene() + self.rng.integers(-2, 3, (48, 64)), 0, 255).astype(np.uint8)
        else:
            image = self.rng.integers(40, 200, (48, 64), dtype=np.uint8)
        self.last = image
        self.seq += 1
        return Frame(image, self.seq, float(self.seq))

    def _scene(self) -> np.ndarray:
        yy, xx = np.mgrid[0:48, 0:64]
        return (60 + xx + yy).astype(np.int16)

    def close(self) -> None:
        self.closes += 1
        self._released.set()


def supervise(source: FakeCamera, stop: threading.Event, **kwargs) -> tuple[CameraSupervisor, list, FakeTime]:
    fake = FakeTime(stop)
    states: list[tuple[str, str]] = []
    options = {
        "backoff_s": 0.5,
        "max_backoff_s": 30.0,
        "black_level": 20,
        "black_frames": 5,
        "frozen_frames": 5,
    }
    options.update(kwargs)
    sup = CameraSupervisor(
        source,
        LatestFrameSlot(),
        on_state=lambda state, reason: states.append((state, reason)),
        clock=fake.clock,
        wait=fake.wait,
        **options,
    )
    return sup, states, fake


def names(states: list[tuple[str, str]]) -> list[str]:
    out: list[str] = []
    for state, _ in states:
        if not out or out[-1] != state:
            out.append(state)
    return out


# --- failures and recovery, one by one ------------------------------------------------------


def test_an_exception_reopens_the_camera_and_frames_flow_again() -> None:
    stop = threading.Event()
    source = FakeCamera(["frame"] * 3 + [CameraError("v4l2:/dev/video0: no frame")] + ["frame"] * 3, stop)
    sup, states, fake = supervise(source, stop)
    sup.run(stop)
    assert states[0] == ("ok", "")
    assert states[1] == ("failed", "v4l2:/dev/video0: no frame")
    assert names(states) == ["ok", "failed", "ok"]
    assert sup.reopens == 1 and source.opens == 2 and source.closes == 1
    assert fake.waits == [0.5]
    assert sup.state == "ok" and sup.down_since is None
    assert sup.slot.get(0.0).seq > 4  # frames after the recovery reached the slot


def test_an_unexpected_exception_type_is_a_failure_with_its_type_in_the_reason() -> None:
    stop = threading.Event()
    source = FakeCamera(["frame", RuntimeError("libcamera: bug"), "frame", "frame"], stop)
    sup, states, _ = supervise(source, stop)
    sup.run(stop)
    assert ("failed", "RuntimeError: libcamera: bug") in states
    assert names(states) == ["ok", "failed", "ok"]


def test_unplug_then_replug_backs_off_exponentially_then_recovers_and_resets_the_backoff() -> None:
    stop = threading.Event()
    gone = CameraError("v4l2:/dev/video0: cannot open")
    source = FakeCamera(
        ["frame", "frame", CameraError("v4l2:/dev/video0: no frame (device gone)")]
        + ["frame"] * 3
        + [gone]
        + ["frame"] * 2,
        stop,
        # initial open ok; unplugged for four reopen attempts; replugged; later one failed read again
        open_script=[None, gone, gone, gone, gone, None],
    )
    sup, states, fake = supervise(source, stop)
    sup.run(stop)
    assert fake.waits[:5] == [0.5, 1.0, 2.0, 4.0, 8.0]  # one wait before each reopen attempt
    assert fake.waits[5:] == [0.5]  # a recovery resets the backoff
    assert sup.reopens == 6
    assert names(states) == ["ok", "failed", "ok", "failed", "ok"]
    # The reason follows what is wrong now: the read failure first, then the failing reopens.
    assert [r for s, r in states if s == "failed"][:2] == [
        "v4l2:/dev/video0: no frame (device gone)",
        "v4l2:/dev/video0: cannot open",
    ]


def test_the_backoff_is_capped() -> None:
    stop = threading.Event()
    gone = CameraError("gone")
    source = FakeCamera([gone], stop, open_script=[None] + [gone] * 9)
    sup, _, fake = supervise(source, stop, backoff_s=0.5, max_backoff_s=30.0)
    sup.run(stop)
    assert fake.waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]


def test_down_since_marks_the_first_failure_of_an_outage() -> None:
    stop = threading.Event()
    gone = CameraError("gone")
    seen: list[float | None] = []
    source = FakeCamera(["frame", gone, "frame", "frame"], stop, open_script=[None, gone, gone, None])
    sup, _, _ = supervise(source, stop)
    sup._on_state = lambda state, reason: seen.append(sup.down_since)
    sup.run(stop)
    # ok (None); failed at t0 and stays t0 through the failed reopens; ok (None)
    assert seen[0] is None and seen[-1] is None
    failed = [s for s in seen[1:-1]]
    assert failed and all(s == failed[0] == 1000.0 for s in failed)


def test_a_run_of_black_frames_is_a_failure_and_a_short_one_is_not() -> None:
    stop = threading.Event()
    source = FakeCamera(["frame"] + ["black"] * 4 + ["frame"] + ["black"] * 5 + ["frame"] * 3, stop)
    sup, states, fake = supervise(source, stop, black_frames=5)
    sup.run(stop)
    assert names(states) == ["ok", "failed", "ok"]  # four black frames were tolerated, five were not
    (reason,) = {r for s, r in states if s == "failed"}
    assert reason.startswith("black frames: 5 in a row darker than 20")
    assert sup.reopens == 1 and fake.waits == [0.5]


def test_a_run_of_identical_frames_is_frozen_but_a_static_noisy_scene_is_not() -> None:
    stop = threading.Event()
    source = FakeCamera(["static"] * 50 + ["frame"] + ["same"] * 5 + ["frame"] * 3, stop)
    sup, states, _ = supervise(source, stop, frozen_frames=5)
    sup.run(stop)
    assert names(states) == ["ok", "failed", "ok"]
    (reason,) = {r for s, r in states if s == "failed"}
    assert reason.startswith("frozen frames: 5 in a row identical")
    assert sup.reopens == 1


def test_a_camera_that_reopens_into_the_same_fault_stays_failed_and_its_frames_are_held_back() -> None:
    stop = threading.Event()
    # Frozen, reopened, still frozen (the first frame after a reopen proves nothing), reopened, fine.
    source = FakeCamera(["frame"] + ["same"] * 3 + ["frame"] + ["same"] * 3 + ["frame"] * 3, stop)
    sup, states, fake = supervise(source, stop, frozen_frames=3)
    slot_seqs: list[int] = []
    real_put = sup.slot.put
    sup.slot.put = lambda frame: (slot_seqs.append(frame.seq), real_put(frame))  # type: ignore[method-assign]
    sup.run(stop)
    assert names(states) == ["ok", "failed", "ok"]  # no flapping through "ok" in between
    assert sup.reopens == 2 and fake.waits == [0.5, 1.0]
    assert 5 not in slot_seqs  # the frame after the first reopen went nowhere
    assert slot_seqs[0] == 1 and slot_seqs[-1] >= 10


def test_frame_checks_disabled_with_zero() -> None:
    check = FrameCheck(black_level=20, black_frames=0, frozen_frames=0)
    black = np.zeros((48, 64), np.uint8)
    assert all(check.inspect(black) is None for _ in range(1000))


def test_a_replay_is_not_judged_black_or_frozen() -> None:
    stop = threading.Event()
    source = FakeCamera(["frame"] + ["same"] * 20 + ["black"] * 20 + [None], stop, finite=True)
    source.script[-1] = "frame"
    sup, states, _ = supervise(source, stop, frozen_frames=3, black_frames=3)
    sup.run(stop)
    assert names(states) == ["ok"]


# --- a driver call that never returns -------------------------------------------------------


def test_a_hung_read_is_reported_after_stall_timeout_interrupted_and_the_camera_reopened() -> None:
    stop = threading.Event()
    source = FakeCamera(["frame", "frame", "hang", "frame", "frame"], stop)
    sup, states, fake = supervise(source, stop, stall_timeout_s=10.0)
    runner = threading.Thread(target=sup.run, args=(stop,), daemon=True)
    runner.start()
    try:
        assert source.hanging.wait(WAIT)
        fake.now += 9.0
        assert not sup.check_stall()  # not yet
        fake.now += 2.0
        assert sup.check_stall()
        assert not sup.check_stall()  # reported once per stuck call
        runner.join(WAIT)
        assert not runner.is_alive()
    finally:
        stop.set()
        source.close()
    failed = [r for s, r in states if s == "failed"]
    assert failed[0] == "no frame for 11 s: the camera driver's read() has not returned"
    assert names(states) == ["ok", "failed", "ok"]
    assert sup.reopens == 1 and source.closes >= 2  # the interrupt, then the reopen


def test_the_stall_monitor_thread_and_stop() -> None:
    stop = threading.Event()
    source = FakeCamera(["frame", "hang", "frame", "frame"], stop)
    reasons: list[str] = []
    sup = CameraSupervisor(
        source,
        LatestFrameSlot(),
        on_state=lambda state, reason: reasons.append(reason),
        stall_timeout_s=0.5,
        backoff_s=0.01,
        max_backoff_s=0.01,
    )
    sup.start(stop)  # real time: the monitor looks every 0.125 s
    try:
        assert source.hanging.wait(WAIT)
        assert wait_until(lambda: any("has not returned" in r for r in reasons), WAIT)
        assert wait_until(stop.is_set, WAIT)  # interrupted, reopened, and the script played to its end
    finally:
        stop.set()
        source.close()
    assert sup.join(WAIT)


def test_stop_cuts_a_long_backoff_short() -> None:
    stop = threading.Event()
    gone = CameraError("gone")
    source = FakeCamera([gone], stop, open_script=[None] + [gone] * 100)
    sup = CameraSupervisor(source, LatestFrameSlot(), backoff_s=30.0, max_backoff_s=30.0)
    runner = threading.Thread(target=sup.run, args=(stop,), daemon=True)
    runner.start()
    assert wait_until(lambda: sup.state == "failed", WAIT)
    stop.set()
    runner.join(WAIT)
    assert not runner.is_alive() and sup.slot.closed


# --- OpenCV sources: USB unplug, RTSP drop --------------------------------------------------


class UnpluggableCapture:
    """A cv2.VideoCapture stand-in for a USB camera that can be pulled out and plugged back in."""

    plugged = True

    def __init__(self, *args) -> None:
        self.opened = UnpluggableCapture.plugged
        self.n = 0

    def isOpened(self) -> bool:  # OpenCV's name
        return self.opened

    def set(self, prop: int, value: float) -> bool:
        return True

    def read(self) -> tuple[bool, np.ndarray | None]:
        if not UnpluggableCapture.plugged:
            return False, None
        self.n += 1
        return True, np.random.default_rng(self.n).integers(30, 220, (48, 64, 3), dtype=np.uint8)

    def release(self) -> None:
        self.opened = False


@pytest.mark.parametrize("source", ["v4l2:/dev/video0", "rtsp://cam.local/stream"])
def test_an_opencv_camera_unplugged_then_replugged_recovers(source: str) -> None:
    UnpluggableCapture.plugged = True
    kind = source.split(":")[0]
    cam = OpenCvSource(
        CameraConfig(source=source), kind, source.removeprefix("v4l2:"), capture_factory=UnpluggableCapture
    )
    stop = threading.Event()
    fake = FakeTime(stop)
    states: list[tuple[str, str]] = []
    reads = [0]

    def on_state(state: str, reason: str) -> None:
        states.append((state, reason))
        if state == "ok" and len(states) > 1:
            stop.set()

    def wait(delay: float) -> bool:
        # The cable goes back in during the third backoff.
        if len(fake.waits) == 2:
            UnpluggableCapture.plugged = True
        return fake.wait(delay)

    real_read = cam.read

    def read(timeout: float) -> Frame | None:
        reads[0] += 1
        if reads[0] == 3:
            UnpluggableCapture.plugged = False
        return real_read(timeout)

    cam.read = read  # type: ignore[method-assign]
    sup = CameraSupervisor(
        cam, LatestFrameSlot(), on_state=on_state, clock=fake.clock, wait=wait, backoff_s=0.5, frozen_frames=5
    )
    sup.run(stop)
    cam.close()
    assert names(states) == ["ok", "failed", "ok"]
    assert "no frame (device gone or stream stalled)" in states[1][1]
    assert fake.waits == [0.5, 1.0, 2.0] and sup.reopens == 3


# --- the app: fault, status, alarm and the systemd watchdog ---------------------------------


def watchdog_config(tmp_path: Path, broker: LocalBroker, **camera: object) -> config_mod.Config:
    fast = {"fps": 50.0, "capture_timeout_s": 0.2, "reopen_backoff_s": 0.02, "reopen_backoff_max_s": 0.05}
    return make_config(
        tmp_path,
        {"camera": fast, "daemon": {"drain_timeout_s": 0.2}},
        camera=camera,
        device={"id": unique_name("gate"), "site": unique_name("site")},
        mqtt={"host": broker.host, "port": broker.port},
    )


class PluggableSource:
    """A live camera whose cable the test pulls and plugs: unplugged, reads and opens fail."""

    finite = False

    def __init__(self) -> None:
        self.plugged = threading.Event()
        self.plugged.set()
        self.opens = 0
        self.failed_opens = 0
        self.seq = 0
        self.rng = np.random.default_rng(3)

    def open(self) -> None:
        self.opens += 1
        if not self.plugged.is_set():
            self.failed_opens += 1
            raise CameraError("fake: cannot open (unplugged)")

    def read(self, timeout: float) -> Frame | None:
        if not self.plugged.is_set():
            raise CameraError("fake: no frame (unplugged)")
        time.sleep(0.02)  # ~50 fps
        self.seq += 1
        return Frame(self.rng.integers(40, 200, (48, 64), dtype=np.uint8), self.seq, time.monotonic())

    def close(self) -> None:
        pass


@contextlib.contextmanager
def running_app(tmp_path: Path, broker: LocalBroker, source: PluggableSource, **camera: object):
    """The app on a real broker; yields it, its pins, a subscriber to its retained status and a
    counter of the systemd watchdog pings it sent."""
    sock_path = tmp_path / "notify.sock"
    config = watchdog_config(tmp_path, broker, **camera)
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
        Subscriber(broker, config.topic("status")) as status,
    ):
        sock.bind(str(sock_path))
        sock.setblocking(False)
        notifier = SystemdNotifier({"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "100000"})
        factory = MockFactory()
        app = App(config, pin_factory=factory, source=source, notifier=notifier)
        stop = threading.Event()
        runner = threading.Thread(target=app.run, args=(stop,), daemon=True)
        runner.start()
        pings = [0]

        def count_pings() -> int:
            while True:
                try:
                    data = sock.recv(4096).decode()
                except BlockingIOError:
                    return pings[0]
                pings[0] += data.split("\n").count("WATCHDOG=1")

        try:
            yield app, factory, status, count_pings
        finally:
            stop.set()
            runner.join(10)
            factory.close()
        assert not runner.is_alive()


def statuses(messages: list) -> list[dict]:
    return [json.loads(m.payload) for m in messages]


def recovered_after_failure(seen: list[dict]) -> bool:
    failed = next((i for i, s in enumerate(seen) if s["camera"] == "failed"), None)
    return failed is not None and any(
        s["camera"] == "ok" and "camera" not in s["alarms"] for s in seen[failed + 1 :]
    )


def test_app_shows_the_fault_while_the_camera_is_down_keeps_feeding_the_watchdog_and_clears_on_recovery(
    tmp_path: Path, broker: LocalBroker
) -> None:
    source = PluggableSource()
    with running_app(tmp_path, broker, source, give_up_after_s=60.0) as (app, factory, status, pings):
        assert wait_until(lambda: app.camera_state == "ok", WAIT)
        assert wait_until(lambda: pings() > 0, WAIT)
        source.plugged.clear()
        assert wait_until(lambda: app.camera_state == "failed", WAIT)
        # The state changes first and the alarm follows from the same callback: wait for it.
        assert wait_until(lambda: "unplugged" in app.alarms.snapshot().get("camera", ""), WAIT)
        assert app.status()["camera"] == "failed"
        assert app.gate is not None
        # Still being reopened, well within give_up_after_s: systemd keeps getting pings.
        assert wait_until(lambda: source.failed_opens >= 2, WAIT)
        before = pings()
        assert wait_until(lambda: pings() >= before + 3, WAIT)
        red = factory.pin(app.config.gpio.red_pin)
        assert wait_until(lambda: any(s.state for s in red.states), WAIT)  # the slow fault blink
        # Operators were told: a retained status with the camera failed and why.
        assert status.wait_for(
            lambda msgs: any(
                s["camera"] == "failed" and "unplugged" in s["alarms"].get("camera", "")
                for s in statuses(msgs)
            ),
            WAIT,
        ), statuses(status.messages)
        source.plugged.set()
        assert wait_until(lambda: app.camera_state == "ok", WAIT)
        assert "camera" not in app.alarms.snapshot()
        # ... and told again when it came back: a later status says ok, with no camera alarm.
        assert status.wait_for(lambda msgs: recovered_after_failure(statuses(msgs)), WAIT), statuses(
            status.messages
        )
        assert app._alive()
        # It is retained: a control room that connects only now sees the camera ok.
        with Subscriber(broker, app.config.topic("status")) as late:
            assert late.wait_for(lambda msgs: bool(msgs), WAIT)
            (retained,) = statuses(late.messages)
        assert retained["camera"] == "ok" and "camera" not in retained["alarms"]
        assert all(m.retain for m in late.messages)


def test_app_stops_feeding_the_watchdog_when_recovery_keeps_failing_past_give_up(
    tmp_path: Path, broker: LocalBroker
) -> None:
    source = PluggableSource()
    with running_app(tmp_path, broker, source, give_up_after_s=0.5) as (app, _factory, _status, pings):
        assert wait_until(lambda: app.camera_state == "ok", WAIT)
        source.plugged.clear()
        assert wait_until(lambda: app.camera_state == "failed", WAIT)
        # (That it is alive within give_up_after_s is the test above: here it would be a race.)
        assert wait_until(lambda: not app._alive(), WAIT)
        # Past the grace period: no more pings (one may still be in flight from the last check).
        pings()
        settled = pings()
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            assert pings() <= settled + 1
            time.sleep(0.05)
