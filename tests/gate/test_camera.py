"""Frame sources, the latest-frame slot and the capture loop, without a Pi or a camera."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from scanner.config import CameraConfig
from scanner.gate.camera import CameraError, open_source, run_capture
from scanner.gate.camera.opencv import OpenCvSource
from scanner.gate.camera.picam import Picamera2Source
from scanner.gate.camera.replay import ReplaySource
from scanner.gate.camera.slot import LatestFrameSlot
from scanner.models import Frame
from tests.fake_picamera2 import MODULE2_CONTROLS, PAD_VALUE, U_VALUE, Factory, y_plane

WAIT = 5.0  # generous bound for thread hand-offs; tests never sleep-and-hope


def frame(seq: int, value: int = 0) -> Frame:
    return Frame(image=np.full((4, 4), value, np.uint8), seq=seq, captured=float(seq))


def in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def body() -> None:
        try:
            out["result"] = fn(*args, **kwargs)
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, out


# --- latest-frame slot ----------------------------------------------------------------------


def test_slot_keeps_only_the_newest_frame_and_counts_the_dropped() -> None:
    slot = LatestFrameSlot()
    for seq in range(3):
        slot.put(frame(seq))
    assert slot.get(0.0).seq == 2
    assert slot.dropped == 2
    slot.put(frame(3))  # the previous frame was taken: nothing dropped
    assert slot.get(0.0, after_seq=2).seq == 3
    assert slot.dropped == 2


def test_slot_get_times_out_without_a_newer_frame() -> None:
    slot = LatestFrameSlot()
    assert slot.get(0.01) is None
    slot.put(frame(0))
    assert slot.get(0.01, after_seq=-1).seq == 0
    assert slot.get(0.01, after_seq=0) is None  # already seen


def test_slot_put_wakes_a_waiting_reader() -> None:
    slot = LatestFrameSlot()
    waiting, out = in_thread(slot.get, 60.0, 4)
    slot.put(frame(5))
    waiting.join(WAIT)
    assert not waiting.is_alive()
    assert out["result"].seq == 5


def test_slot_close_wakes_a_waiting_reader() -> None:
    slot = LatestFrameSlot()
    waiting, out = in_thread(slot.get, 60.0)
    slot.close()
    waiting.join(WAIT)
    assert not waiting.is_alive()
    assert out["result"] is None


def test_slot_closed_only_after_the_last_frame_is_taken() -> None:
    slot = LatestFrameSlot()
    slot.put(frame(0))
    slot.close()
    assert not slot.closed
    slot.put(frame(1))  # after close: ignored
    assert slot.get(0.0).seq == 0
    assert slot.closed
    assert slot.get(0.0, after_seq=0) is None


# --- dir: replay ----------------------------------------------------------------------------


def cfg(source: str = "dir:x", **kw) -> CameraConfig:
    return CameraConfig(source=source, **kw)


def write_frames(folder: Path, values: list[int], size: tuple[int, int] = (32, 24)) -> None:
    folder.mkdir(exist_ok=True)
    w, h = size
    for i, v in enumerate(values):
        suffix = (".png", ".bmp", ".jpg", ".pgm")[i % 4]
        assert cv2.imwrite(str(folder / f"{i:03d}{suffix}"), np.full((h, w), v, np.uint8))


def test_dir_source_replays_images_in_name_order(tmp_path: Path) -> None:
    values = [10, 40, 70, 100, 130, 160]
    write_frames(tmp_path, values)
    (tmp_path / "notes.txt").write_text("not an image")
    source = open_source(cfg(f"dir:{tmp_path}", fps=120.0))
    assert isinstance(source, ReplaySource) and source.finite
    source.open()
    frames = []
    while (f := source.read(1.0)) is not None:
        frames.append(f)
    source.close()
    assert [f.seq for f in frames] == list(range(len(values)))
    assert [round(float(f.image.mean())) for f in frames] == pytest.approx(values, abs=2)
    assert all(f.image.ndim == 2 and f.image.dtype == np.uint8 for f in frames)


def test_dir_source_skips_an_unreadable_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_frames(tmp_path, [50, 150])
    (tmp_path / "000b.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    source = ReplaySource(cfg(fps=120.0), tmp_path)
    source.open()
    with caplog.at_level(logging.WARNING):
        frames = [source.read(1.0), source.read(1.0), source.read(1.0)]
    assert [f.seq for f in frames[:2]] == [0, 1]
    assert frames[2] is None
    assert "000b.png" in caplog.text


def test_dir_source_paces_on_a_fixed_deadline_schedule(tmp_path: Path) -> None:
    write_frames(tmp_path, [0] * 5)
    now = [100.0]
    waits: list[float] = []

    def wait(delay: float) -> bool:
        waits.append(delay)
        now[0] += delay
        return False

    source = ReplaySource(cfg(fps=10.0), tmp_path, clock=lambda: now[0], wait=wait)
    source.open()
    captured = []
    for _ in range(4):
        captured.append(source.read(1.0).captured)
        now[0] += 0.03  # the decoder's time between reads must not push the schedule back
    assert captured == pytest.approx([100.0, 100.1, 100.2, 100.3])
    assert waits == pytest.approx([0.07, 0.07, 0.07])
    now[0] += 5.0  # far behind (a paused process): restart the schedule, no burst of frames
    assert source.read(1.0).captured == pytest.approx(now[0])


def test_dir_source_close_interrupts_the_pacing_wait(tmp_path: Path) -> None:
    write_frames(tmp_path, [0, 0])
    source = ReplaySource(cfg(fps=0.1), tmp_path)  # ten seconds between frames
    source.open()
    assert source.read(1.0).seq == 0
    reader, out = in_thread(source.read, 1.0)
    source.close()
    reader.join(WAIT)
    assert not reader.is_alive()
    assert out["result"] is None


@pytest.mark.parametrize("make", ["empty", "missing", "only-text"])
def test_dir_source_without_images_fails_at_open(tmp_path: Path, make: str) -> None:
    folder = tmp_path / "frames"
    if make != "missing":
        folder.mkdir()
    if make == "only-text":
        (folder / "a.txt").write_text("x")
    source = open_source(cfg(f"dir:{folder}"))
    with pytest.raises(CameraError, match="frames"):
        source.open()


def test_read_before_open_is_a_camera_error(tmp_path: Path) -> None:
    with pytest.raises(CameraError):
        ReplaySource(cfg(), tmp_path).read(0.1)


def test_open_source_rejects_an_unknown_scheme() -> None:
    with pytest.raises(CameraError):
        open_source(cfg("http://camera/stream"))


# --- capture loop ---------------------------------------------------------------------------


def test_run_capture_delivers_a_replay_and_closes_the_slot_at_its_end(tmp_path: Path) -> None:
    write_frames(tmp_path, list(range(0, 240, 20)))
    source = open_source(cfg(f"dir:{tmp_path}", fps=120.0))
    source.open()
    slot, stop = LatestFrameSlot(), threading.Event()
    capture, out = in_thread(run_capture, source, slot, stop)
    seqs = []
    while (f := slot.get(WAIT, after_seq=seqs[-1] if seqs else -1)) is not None:
        seqs.append(f.seq)
    capture.join(WAIT)
    assert not capture.is_alive() and "error" not in out
    assert seqs == sorted(set(seqs)) and seqs[-1] == 11  # newest-only, but never the last lost
    assert slot.closed
    source.close()


class ScriptedSource:
    """A live source that plays a script: frames, exceptions, then (optionally) stalls."""

    def __init__(self, script: list, *, finite: bool = False) -> None:
        self.script = list(script)
        self.finite = finite
        self.opens = 0
        self.closes = 0
        self.seq = 0

    def open(self) -> None:
        self.opens += 1

    def read(self, timeout: float) -> Frame | None:
        step = self.script.pop(0) if self.script else "end"
        if isinstance(step, Exception):
            raise step
        if step == "end":
            return None
        self.seq += 1
        return frame(self.seq)

    def close(self) -> None:
        self.closes += 1


def test_run_capture_reports_errors_backs_off_reopens_and_carries_on() -> None:
    source = ScriptedSource([CameraError("stall"), RuntimeError("bug"), "frame", "frame", "end"])
    slot, stop, errors = LatestFrameSlot(), threading.Event(), []
    run_capture(source, slot, stop, errors.append, backoff_s=0.001, max_backoff_s=0.002)
    assert [type(e) for e in errors] == [CameraError, RuntimeError]
    assert source.opens == 2 and source.closes == 2  # a live source is reopened after each error
    assert slot.get(0.0).seq == 2
    assert slot.closed


def test_run_capture_stops_on_the_stop_event_even_while_failing() -> None:
    source = ScriptedSource([CameraError("gone")] * 1000)
    slot, stop, errors = LatestFrameSlot(), threading.Event(), []

    def on_error(exc: Exception) -> None:
        errors.append(exc)
        if len(errors) == 3:
            stop.set()  # the stop comes while the camera is failing

    capture, out = in_thread(run_capture, source, slot, stop, on_error, backoff_s=0.001, max_backoff_s=0.01)
    capture.join(WAIT)
    assert not capture.is_alive() and "error" not in out
    assert slot.closed
    # Not one read after the stop. (How the waits between reopenings grow is asserted exactly,
    # on an injected clock, in test_camera_watchdog.py.)
    assert len(errors) == 3 and len(source.script) == 997


def test_run_capture_gives_up_on_a_finite_source_that_keeps_failing(tmp_path: Path) -> None:
    source = ScriptedSource([CameraError("broken clip")] * 10, finite=True)
    slot, errors = LatestFrameSlot(), []
    run_capture(source, slot, threading.Event(), errors.append, backoff_s=0.001, finite_retries=2)
    assert len(errors) == 3
    assert slot.closed

    empty = ReplaySource(cfg(), tmp_path)  # open() failed (or was never called): retried, then ended
    errors.clear()
    run_capture(empty, LatestFrameSlot(), threading.Event(), errors.append, backoff_s=0.001)
    assert errors and all(isinstance(e, CameraError) for e in errors)


def test_run_capture_does_not_restart_a_replay_after_an_error() -> None:
    source = ScriptedSource(["frame", CameraError("glitch"), "frame", "end"], finite=True)
    slot = LatestFrameSlot()
    run_capture(source, slot, threading.Event(), backoff_s=0.001)
    assert source.opens == 0
    assert slot.get(0.0).seq == 2


def test_run_capture_survives_a_failing_error_callback() -> None:
    def bad_callback(exc: Exception) -> None:
        raise ValueError("callback bug")

    source = ScriptedSource([CameraError("x"), "frame", "end"])
    slot = LatestFrameSlot()
    run_capture(source, slot, threading.Event(), bad_callback, backoff_s=0.001)
    assert slot.get(0.0).seq == 1


# --- file: and live OpenCV sources ----------------------------------------------------------


def test_file_source_reads_a_video_to_its_end(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    w, h, values = 64, 48, [20, 60, 100, 140, 180, 220]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (w, h))
    assert writer.isOpened()
    for v in values:
        writer.write(np.full((h, w, 3), v, np.uint8))
    writer.release()
    source = open_source(cfg(f"file:{path}", fps=120.0))
    assert isinstance(source, OpenCvSource) and source.finite
    source.open()
    frames = []
    while (f := source.read(1.0)) is not None:
        frames.append(f)
    assert source.read(1.0) is None
    source.close()
    source.close()
    assert [f.seq for f in frames] == list(range(len(values)))
    assert all(f.image.shape == (h, w) and f.image.dtype == np.uint8 for f in frames)
    assert [f.image.mean() for f in frames] == pytest.approx(values, abs=6)


def test_file_source_missing_file_fails_at_open(tmp_path: Path) -> None:
    with pytest.raises(CameraError, match="cannot open"):
        open_source(cfg(f"file:{tmp_path / 'nope.mp4'}")).open()


class FakeCapture:
    def __init__(self, target: str, api: int, params: list[int] | None = None) -> None:
        self.target, self.api, self.params = target, api, params
        self.props: dict[int, float] = {}
        self.frames = [np.full((48, 64, 3), 90, np.uint8)]
        self.released = False

    def isOpened(self) -> bool:  # OpenCV's name
        return True

    def set(self, prop: int, value: float) -> bool:
        self.props[prop] = value
        return True

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.frames:
            return True, self.frames.pop(0)
        return False, None

    def release(self) -> None:
        self.released = True


@pytest.mark.parametrize(
    ("source", "api"), [("v4l2:/dev/video0", cv2.CAP_V4L2), ("rtsp://cam.local/stream", cv2.CAP_FFMPEG)]
)
def test_live_opencv_source_asks_for_one_buffer_and_fails_loudly(source: str, api: int) -> None:
    made: list[FakeCapture] = []

    def factory(*args):
        made.append(FakeCapture(*args))
        return made[-1]

    live = OpenCvSource(
        cfg(source, width=320, height=240, fps=15.0),
        source.split(":")[0],
        source.removeprefix("v4l2:"),
        capture_factory=factory,
    )
    assert not live.finite
    live.open()
    cap = made[0]
    assert cap.api == api
    assert cap.props[cv2.CAP_PROP_BUFFERSIZE] == 1
    assert (cap.props[cv2.CAP_PROP_FRAME_WIDTH], cap.props[cv2.CAP_PROP_FRAME_HEIGHT]) == (320, 240)
    assert cap.props[cv2.CAP_PROP_FPS] == 15.0
    assert cv2.CAP_PROP_READ_TIMEOUT_MSEC in cap.params
    first = live.read(1.0)
    assert first.image.shape == (48, 64) and int(first.image[0, 0]) == 90
    with pytest.raises(CameraError):
        live.read(1.0)  # a live source never "ends"
    live.close()
    assert cap.released


# --- picamera2 ------------------------------------------------------------------------------


def test_open_source_does_not_import_picamera2() -> None:
    source = open_source(cfg("picamera2"))
    assert isinstance(source, Picamera2Source)
    assert "picamera2" not in sys.modules


def test_picamera2_takes_the_y_plane_of_a_lores_yuv420_stream() -> None:
    factory = Factory(stride_pad=64)
    source = Picamera2Source(
        cfg("picamera2", width=64, height=48, fps=25.0, capture_timeout_s=0.5), factory=factory
    )
    source.open()
    frames = [source.read(1.0), source.read(1.0)]
    source.close()
    cam = factory.made[0]
    lores, main = cam.config["lores"], cam.config["main"]
    assert lores["format"] == "YUV420" and lores["size"] == (64, 48)
    assert main["size"][0] >= 64 and main["size"][1] >= 48
    assert cam.config["buffer_count"] <= 4
    assert cam.config["controls"]["FrameDurationLimits"] == (40_000, 40_000)
    for n, f in enumerate(frames):
        assert f.seq == n
        assert f.image.shape == (48, 64) and f.image.dtype == np.uint8
        np.testing.assert_array_equal(f.image, y_plane(64, 48, n))
        assert U_VALUE not in f.image and PAD_VALUE not in f.image
    assert all(t is not None and t <= 0.5 for t in cam.waits)
    assert cam.calls[-2:] == ["stop", "close"]


def test_picamera2_rounds_odd_sizes_down_to_even() -> None:
    factory = Factory()
    source = Picamera2Source(cfg("picamera2", width=65, height=49), factory=factory)
    source.open()
    assert source.read(1.0).image.shape == (48, 64)
    source.close()


def test_picamera2_stalled_capture_raises_within_the_timeout_and_close_still_works() -> None:
    factory = Factory(stall_after=1)
    source = Picamera2Source(cfg("picamera2", width=64, height=48, capture_timeout_s=0.1), factory=factory)
    source.open()
    assert source.read(1.0).seq == 0
    reader, out = in_thread(source.read, 1.0)
    reader.join(WAIT)  # the capture is bounded by 0.1 s; WAIT only keeps a broken build from hanging
    assert not reader.is_alive()
    assert isinstance(out.get("error"), CameraError)
    source.close()
    cam = factory.made[0]
    assert cam.closed and not cam.stop_blocked
    assert cam.calls.index("cancel_all_and_flush") < cam.calls.index("stop") < cam.calls.index("close")
    calls = len(cam.calls)
    source.close()  # idempotent
    assert len(cam.calls) == calls


def test_picamera2_close_closes_even_when_start_or_stop_fail() -> None:
    factory = Factory(fail_start=RuntimeError("no camera"))
    with pytest.raises(CameraError, match="no camera"):
        Picamera2Source(cfg("picamera2"), factory=factory).open()
    assert factory.made[0].closed

    factory = Factory(fail_stop=RuntimeError("already stopped"))
    source = Picamera2Source(cfg("picamera2"), factory=factory)
    source.open()
    source.close()
    assert factory.made[0].closed


def test_picamera2_factory_failure_is_a_camera_error() -> None:
    def factory(num: int, tuning: dict | None):
        raise RuntimeError("Camera __init__ sequence did not complete.")

    with pytest.raises(CameraError, match="did not complete"):
        Picamera2Source(cfg("picamera2"), factory=factory).open()
    with pytest.raises(CameraError):
        Picamera2Source(cfg("picamera2"), factory=factory).read(0.1)


def test_run_capture_reopens_a_stalled_picamera2() -> None:
    factory = Factory(stall_after=1)
    source = Picamera2Source(cfg("picamera2", width=64, height=48, capture_timeout_s=0.05), factory=factory)
    source.open()
    slot, stop, errors = LatestFrameSlot(), threading.Event(), []
    reopened = threading.Event()

    def on_error(exc: Exception) -> None:
        errors.append(exc)
        if len(factory.made) >= 3:
            reopened.set()

    capture, _ = in_thread(
        run_capture, source, slot, stop, on_error, read_timeout=1.0, backoff_s=0.001, max_backoff_s=0.01
    )
    assert reopened.wait(WAIT)
    stop.set()
    capture.join(WAIT)
    source.close()
    assert not capture.is_alive()
    assert all(isinstance(e, CameraError) for e in errors)
    assert all(cam.closed and not cam.stop_blocked for cam in factory.made)
    seqs = [slot.get(0.0).seq]
    assert seqs[0] >= 1  # frame numbers keep rising across reopenings


# --- picamera2 controls ---------------------------------------------------------------------


def tuning_v2() -> dict:
    """The shape of a Raspberry Pi tuning file (format 2, multi-channel AGC), AGC part only."""
    modes = {
        "normal": {"shutter": [100, 10000, 30000, 60000, 66666], "gain": [1.0, 2.0, 4.0, 6.0, 8.0]},
        "short": {"shutter": [100, 5000, 10000, 20000, 60000], "gain": [1.0, 2.0, 4.0, 6.0, 8.0]},
    }
    return {
        "version": 2.0,
        "algorithms": [{"rpi.black_level": {}}, {"rpi.agc": {"channels": [{"exposure_modes": modes}]}}],
    }


def test_picamera2_module3_gets_continuous_autofocus_and_highlight_exposure() -> None:
    factory = Factory()
    source = Picamera2Source(cfg("picamera2", fps=25.0, ev=-0.5), factory=factory, tuning_loader=lambda n: {})
    source.open()
    controls = factory.made[0].config["controls"]
    source.close()
    assert controls == {
        "FrameDurationLimits": (40_000, 40_000),
        "AfMode": 2,  # continuous
        "AeConstraintMode": 1,  # highlight: a bright phone screen is not burnt out
        "ExposureValue": -0.5,
    }
    assert source.skipped_controls == []


def test_picamera2_sets_only_the_controls_the_camera_advertises(caplog: pytest.LogCaptureFixture) -> None:
    # The fake, like picamera2, raises on a control the camera does not advertise: opening works
    # only because the source leaves AfMode out on a fixed-focus Camera Module 2.
    factory = Factory(camera_controls=MODULE2_CONTROLS)
    source = Picamera2Source(
        cfg("picamera2", autofocus="manual"), factory=factory, tuning_loader=lambda n: {}
    )
    with caplog.at_level(logging.INFO, logger="scanner.gate.camera.picam"):
        source.open()
    assert source.read(1.0) is not None
    source.close()
    controls = factory.made[0].config["controls"]
    assert "AfMode" not in controls and "LensPosition" not in controls
    assert controls["AeConstraintMode"] == 1
    assert source.skipped_controls == ["AfMode", "LensPosition"]
    assert "AfMode, LensPosition" in caplog.text
    with pytest.raises(RuntimeError, match="not advertised"):
        factory.made[0].set_controls({"AfMode": 2})


def test_picamera2_manual_focus_is_clamped_to_the_lens_range() -> None:
    factory = Factory()
    source = Picamera2Source(
        cfg("picamera2", autofocus="manual", lens_position=20.0, ae_constraint="normal"),
        factory=factory,
        tuning_loader=lambda n: {},
    )
    source.open()
    source.close()
    controls = factory.made[0].config["controls"]
    assert controls["AfMode"] == 0 and controls["LensPosition"] == 15.0  # the fake lens stops at 15 dioptres
    assert controls["AeConstraintMode"] == 0 and "ExposureValue" not in controls


def test_picamera2_autofocus_off_leaves_focus_alone() -> None:
    factory = Factory()
    source = Picamera2Source(cfg("picamera2", autofocus="off"), factory=factory, tuning_loader=lambda n: {})
    source.open()
    source.close()
    assert not {"AfMode", "LensPosition"} & set(factory.made[0].config["controls"])


def test_picamera2_exposure_caps_clamp_a_copy_of_the_sensor_tuning() -> None:
    original = tuning_v2()
    loaded: list[int] = []

    def loader(camera_num: int) -> dict:
        loaded.append(camera_num)
        return original

    factory = Factory()
    source = Picamera2Source(
        cfg("picamera2", camera_num=1, exposure_max_us=12_000, analogue_gain_max=4.0),
        factory=factory,
        tuning_loader=loader,
    )
    source.open()
    source.close()
    assert loaded == [1]
    (channel,) = factory.made[0].tuning["algorithms"][1]["rpi.agc"]["channels"]
    assert channel["exposure_modes"]["normal"] == {
        "shutter": [100, 10000, 12000, 12000, 12000],
        "gain": [1.0, 2.0, 4.0, 4.0, 4.0],
    }
    assert channel["exposure_modes"]["short"]["shutter"] == [100, 5000, 10000, 12000, 12000]
    assert original == tuning_v2()  # the loader's dict is not modified


def test_picamera2_exposure_caps_in_a_version_1_tuning() -> None:
    factory = Factory()
    v1 = {"rpi.agc": {"exposure_modes": {"normal": {"shutter": [100, 30000], "gain": [1.0, 8.0]}}}}
    source = Picamera2Source(
        cfg("picamera2", exposure_max_us=8_000), factory=factory, tuning_loader=lambda n: v1
    )
    source.open()
    source.close()
    assert factory.made[0].tuning["rpi.agc"]["exposure_modes"]["normal"] == {
        "shutter": [100, 8000],
        "gain": [1.0, 8.0],
    }


@pytest.mark.parametrize("loaded", [RuntimeError("no tuning file"), {"version": 2.0, "algorithms": []}])
def test_picamera2_without_a_usable_tuning_opens_without_caps(
    loaded, caplog: pytest.LogCaptureFixture
) -> None:
    def loader(camera_num: int) -> dict:
        if isinstance(loaded, Exception):
            raise loaded
        return loaded

    factory = Factory()
    source = Picamera2Source(cfg("picamera2", exposure_max_us=10_000), factory=factory, tuning_loader=loader)
    with caplog.at_level(logging.WARNING):
        source.open()
    assert source.read(1.0) is not None
    source.close()
    assert factory.made[0].tuning is None
    assert "exposure caps not applied" in caplog.text


def test_picamera2_no_caps_means_no_tuning_is_loaded() -> None:
    def loader(camera_num: int) -> dict:
        raise AssertionError("tuning loaded without caps")

    factory = Factory()
    source = Picamera2Source(cfg("picamera2", exposure_max_us=0), factory=factory, tuning_loader=loader)
    source.open()
    source.close()
    assert factory.made[0].tuning is None
