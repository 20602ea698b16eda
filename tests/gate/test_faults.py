"""Fault suite (issue 6): the real gate daemon, a private mosquitto and the real collector.

Pass criterion in every case: each event the gate committed is stored exactly once in the
collector's store; nothing crashed; the relay never moved without a committed event.

What "committed" means here: ``Outbox.append`` allocates ``seq`` inside the commit, so the
committed events of one gate are exactly seqs 1 .. next_seq-1 of its outbox (the daemon's
``seq=N`` log lines, written after the commit, are a subset: a SIGKILL can land between the
two). Commit-before-relay is asserted from MockFactory pin histories in the in-process
cases; for subprocess runs it rests on tests/gate/test_app.py and the store contents.

Every loop here is bounded in count and time: waits are ``wait_until`` with a timeout,
subprocesses are waited on with a timeout and killed in ``finally``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from gpiozero.pins.mock import MockFactory

from scanner import config as config_mod
from scanner import events
from scanner.gate.app import App
from scanner.gate.pipeline import Gate
from scanner.models import Frame
from scanner.sim import synth
from scanner.sim.demo import ALLOWED, write_demo_files
from scanner.sim.localbroker import LocalBroker, find_mosquitto
from tests.helpers import BLANK, energised_relay, rising_edges, toml_text, toml_with
from tests.mqtt_helpers import wait_until

FPS = 30.0
HOLD_S = 0.2  # 6 frames of each code ...
GAP_S = 0.2  # ... then 6 empty ones: with gone_after_s 0.1 every scene is a new scan
PREFIX = "faults"
SEQ_LINE = re.compile(rb"seq=(\d+) ")


def scenes(n: int, allowed_every: int = 4) -> list[tuple[str, str]]:
    """``n`` scenes of distinct codes (every ``allowed_every``-th an allowlisted one)."""
    return [
        (f"person {i}", ALLOWED[i % len(ALLOWED)] if i % allowed_every == 0 else f"VISITOR-{i}")
        for i in range(n)
    ]


def make_gate(
    workdir: Path,
    port: int,
    codes: list[tuple[str, str]],
    *,
    hold_s: float = HOLD_S,
    gap_s: float = GAP_S,
    **overrides: object,
) -> Path:
    """A demo gate over short scenes, delivering to the collector; returns its config path."""
    path = write_demo_files(workdir, broker_port=port, scenes=[], fps=FPS)
    synth.demo_frames(workdir / "frames", codes, fps=FPS, hold_s=hold_s, gap_s=gap_s)
    table = toml_with(
        path,
        {
            "storage.delivery": "collector",
            "mqtt.topic_prefix": PREFIX,
            "track.gone_after_s": 0.1,
            # Every restart replays the same frames: with anti-passback off an allowlisted
            # code is accepted on every pass, so restarts add accepts (relay moves) as well
            # as rejects, and no decision depends on which run saw a code first.
            "policy.anti_passback_s": 0.0,
            "gpio.relay_pulse_s": 0.1,
            # Longer than the gate's ack timeout (30 s) plus a tick: after a broker restart
            # the gate may resend before the collector has resubscribed (no persistence, so
            # the broker drops those), and only the ack-timeout resend recovers them.
            "daemon.drain_timeout_s": 60.0,
            **overrides,
        },
    )
    path.write_text(toml_text(table))
    return path


class CollectorProc:
    """``python -m scanner collect`` over a SQLite store, as a subprocess that can be killed."""

    def __init__(self, workdir: Path, broker: LocalBroker | NsBroker, prefix: tuple[str, ...] = ()) -> None:
        self.prefix = list(prefix)
        self.db = workdir / "collector.db"
        self.config = workdir / "collector.toml"
        self.log = workdir / "collector.log"
        self.config.write_text(
            toml_text(
                {
                    "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": PREFIX},
                    "collector": {"store": f"sqlite:{self.db}", "name": "c1"},
                    "daemon": {"log_level": "info"},
                }
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CollectorProc:
        self._connects = self.log.read_bytes().count(b"connected to") if self.log.exists() else 0
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "scanner", "collect", "--config", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        # Connected (it subscribes at once, with a persistent session) before a gate publishes.
        assert wait_until(
            lambda: self.log.read_bytes().count(b"connected to") > self._connects or self._dead(), 30
        ), self.tail()
        assert not self._dead(), self.tail()
        return self

    def _dead(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stored(self, device: str) -> list[int]:
        if not self.db.exists():
            return []
        try:
            with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5) as conn:
                rows = conn.execute("SELECT seq FROM checkins WHERE device = ? ORDER BY seq", (device,))
                return [int(r[0]) for r in rows]
        except sqlite3.Error:  # the collector is still creating it
            return []


@pytest.fixture
def collector_env(tmp_path: Path) -> Iterator[tuple[LocalBroker, CollectorProc]]:
    # Persistence off throughout: a broker restart loses whatever it held, as in the field
    # research; only the gate's keep-until-acked outbox may make up for it.
    with LocalBroker(tmp_path / "broker", persistence=False) as broker:
        collector = CollectorProc(tmp_path, broker)
        try:
            yield broker, collector.start()
        finally:
            collector.kill()


def spawn_daemon(config: Path, log: Path, prefix: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    with open(log, "ab") as err:
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", "scanner", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def extend_replay(workdir: Path, seconds: float) -> None:
    """Repeat the gate's frames (hard links, no new images) until the replay lasts ``seconds``.

    Each repetition is a new burst of scans: anti-passback is off in ``make_gate``."""
    frames = workdir / "frames"
    originals = sorted(frames.glob("*.png"))
    total = round(seconds * FPS)
    for i in range(len(originals), total):
        os.link(originals[i % len(originals)], frames / f"{i:05d}.png")


def watch_commits(daemon: subprocess.Popen[bytes], log: Path, seconds: float) -> list[int]:
    """The gate's commit count once a second for ``seconds`` (bounded), the daemon up throughout."""
    counts = [len(logged_seqs(log))]
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        assert daemon.poll() is None, log.read_text(errors="replace")[-3000:]
        time.sleep(1)
        counts.append(len(logged_seqs(log)))
    return counts


def assert_kept_committing(counts: list[int], window: int = 10) -> None:
    """Commits went on through the whole outage: none of its ``window``-second stretches passed
    without one. Not a rate: a loaded machine decodes fewer of the 2.5 scenes a second the
    replay shows, but only a gate that stopped scanning goes 10 s (25 scenes) without a commit."""
    stalls = [i for i in range(len(counts) - window) if counts[i + window] == counts[i]]
    assert not stalls, f"no commit for {window} s from second {stalls[0]} of the outage: {counts}"


def logged_seqs(log: Path) -> list[int]:
    return [int(m) for m in SEQ_LINE.findall(log.read_bytes())] if log.exists() else []


def committed(cfg: config_mod.Config) -> list[int]:
    """Every seq the gate's outbox ever allocated (each allocation is a commit)."""
    db = cfg.storage.dir / "outbox.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        next_seq = int(conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0])
    return list(range(1, next_seq))


def assert_stored_exactly_once(collector: CollectorProc, cfg: config_mod.Config, logged: list[int]) -> None:
    expected = committed(cfg)
    assert expected, "the gate committed nothing: the test exercised no fault"
    assert set(logged) <= set(expected)
    ok = wait_until(lambda: len(collector.stored(cfg.device.id)) >= len(expected), 30)
    stored = collector.stored(cfg.device.id)
    assert ok, f"stored {len(stored)} of {len(expected)}\n{collector.tail()}"
    assert stored == expected  # each committed seq once: no loss, no duplicate, nothing extra


def run_to_end(config: Path, log: Path, timeout: float = 120) -> None:
    daemon = spawn_daemon(config, log)
    try:
        assert daemon.wait(timeout) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)


def test_daemon_sigkilled_five_times_during_a_burst(tmp_path: Path, collector_env) -> None:
    """SIGKILL the gate 5× mid-burst; each restart replays the same frames (a new burst).

    Restarting on the same frames rather than the remaining ones keeps every run a burst
    from its first frame, and the events are new records either way (new seq, new id).
    """
    broker, collector = collector_env
    path = make_gate(tmp_path, broker.port, scenes(16))
    cfg = config_mod.load(path)
    logs = [tmp_path / f"daemon{i}.log" for i in range(6)]
    for i in range(5):
        daemon = spawn_daemon(path, logs[i])
        try:
            # Mid-burst: a few scans into this run, at a different point each time.
            def mid_burst(
                log: Path = logs[i], n: int = 2 + i, proc: subprocess.Popen[bytes] = daemon
            ) -> bool:
                return len(logged_seqs(log)) >= n or proc.poll() is not None

            assert wait_until(mid_burst, 60)
            assert daemon.poll() is None, logs[i].read_text(errors="replace")[-3000:]
        finally:
            daemon.send_signal(signal.SIGKILL)
            daemon.wait(10)
        assert daemon.returncode == -signal.SIGKILL
    run_to_end(path, logs[5])
    logged = [s for log in logs for s in logged_seqs(log)]
    assert logged == sorted(set(logged))  # seqs rise across restarts, never reused
    assert_stored_exactly_once(collector, cfg, logged)
    assert collector.proc is not None and collector.proc.poll() is None


def test_broker_sigkilled_during_a_burst(tmp_path: Path, collector_env) -> None:
    broker, collector = collector_env
    path = make_gate(tmp_path, broker.port, scenes(20))
    cfg = config_mod.load(path)
    log = tmp_path / "daemon.log"
    daemon = spawn_daemon(path, log)
    try:
        assert wait_until(lambda: len(collector.stored(cfg.device.id)) >= 2, 60), collector.tail()
        broker.kill()  # no persistence: everything it held for the collector is gone
        # The gate keeps scanning and committing while the broker is away.
        before = len(logged_seqs(log))
        assert wait_until(lambda: len(logged_seqs(log)) >= before + 4, 30), log.read_text()[-3000:]
        broker.start()
        assert daemon.wait(120) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
    assert_stored_exactly_once(collector, cfg, logged_seqs(log))


def test_collector_sigkilled_mid_burst_and_restarted(tmp_path: Path, collector_env) -> None:
    broker, collector = collector_env
    path = make_gate(tmp_path, broker.port, scenes(20))
    cfg = config_mod.load(path)
    log = tmp_path / "daemon.log"
    daemon = spawn_daemon(path, log)
    try:
        assert wait_until(lambda: len(collector.stored(cfg.device.id)) >= 2, 60), collector.tail()
        collector.kill()
        before = len(logged_seqs(log))
        assert wait_until(lambda: len(logged_seqs(log)) >= before + 4, 30), log.read_text()[-3000:]
        collector.start()
        assert daemon.wait(120) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
    assert_stored_exactly_once(collector, cfg, logged_seqs(log))


def test_broker_down_for_a_minute(tmp_path: Path, collector_env) -> None:
    """The broker is gone for 60 s while the gate keeps scanning and committing; it comes back
    empty (no persistence) and the gate's outbox makes up for everything."""
    broker, collector = collector_env
    # 75 s of replay: a few s before the outage, 60 s of it, and some scans after it.
    path = make_gate(tmp_path, broker.port, scenes(10), **{"daemon.drain_timeout_s": 90.0})
    extend_replay(tmp_path, 75)
    cfg = config_mod.load(path)
    log = tmp_path / "daemon.log"
    daemon = spawn_daemon(path, log)
    try:
        assert wait_until(lambda: len(collector.stored(cfg.device.id)) >= 2, 60), collector.tail()
        broker.stop()
        commits = watch_commits(daemon, log, 60)
        assert_kept_committing(commits)
        broker.start()
        # paho's reconnect backoff (1 s doubling to 60 s) may add up to a minute here.
        assert daemon.wait(150) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
    assert_stored_exactly_once(collector, cfg, logged_seqs(log))
    assert collector.proc is not None and collector.proc.poll() is None


# --- in-process cases: MockFactory pins and an injected clock --------------------------------


class Run:
    """``App.run`` on a thread named ``gate-pipeline`` (the pipeline runs on the caller's thread)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.result: list[int] = []
        self.thread = threading.Thread(
            target=lambda: self.result.append(app.run(threading.Event())), name="gate-pipeline", daemon=True
        )

    def start(self) -> Run:
        self.thread.start()
        return self

    def join(self, timeout: float = 120) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the daemon did not finish its finite source"
        return self.result[0]

    def reasons(self) -> dict[str, int]:
        gate = self.app.gate
        return dict(gate.reasons) if gate is not None else {}


def fill_outbox_disk(app: App) -> Callable[[], None]:
    """Cap the outbox's database at its current size and fill every free page: from now on
    a commit that needs a new page fails with SQLITE_FULL, exactly as on a full disk.
    Returns the function that gives the space back."""
    outbox = app._outbox
    assert outbox is not None
    conn = outbox._conn
    assert conn is not None
    with outbox._lock:
        conn.execute("CREATE TABLE IF NOT EXISTS ballast (b BLOB)")
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count={pages + 4}")
        for size in (65536, 4096, 1024, 256, 64, 16):  # bounded: six sizes, ≤ 200 rows each
            for _ in range(200):
                try:
                    conn.execute("INSERT INTO ballast VALUES (?)", (os.urandom(size),))
                except sqlite3.Error:
                    break

    def free() -> None:
        with outbox._lock:
            conn.execute("PRAGMA max_page_count=1073741823")
            conn.execute("DROP TABLE ballast")

    return free


def test_disk_full_under_the_outbox_fails_secure_then_recovers(tmp_path: Path, collector_env) -> None:
    broker, collector = collector_env
    # Every other scene allowlisted, so accepts fall into the full window.
    path = make_gate(tmp_path, broker.port, scenes(30, allowed_every=2))
    cfg = config_mod.load(path)
    assert collector.proc is not None
    # Hold acks (the collector is paused, not gone) while the disk is full: acked rows would
    # be deleted and their space reused, and the full window would depend on timing.
    os.kill(collector.proc.pid, signal.SIGSTOP)
    factory = MockFactory()
    relay_history = energised_relay(factory, cfg.gpio)
    try:
        app = App(cfg, pin_factory=factory)
        run = Run(app).start()
        assert wait_until(lambda: app._outbox is not None, 30)
        free = fill_outbox_disk(app)
        assert wait_until(lambda: run.reasons().get("device_fault", 0) >= 3, 60), run.reasons()
        assert "outbox" in app.alarms.snapshot()
        free()
        os.kill(collector.proc.pid, signal.SIGCONT)
        assert run.join() == 0
        relay = relay_history()
        gate = app.gate
        assert gate is not None
    finally:
        os.kill(collector.proc.pid, signal.SIGCONT)
        factory.close()
    assert "outbox" not in app.alarms.snapshot()  # cleared by the first commit after recovery
    assert_stored_exactly_once(collector, cfg, [])
    accepted = _stored_decisions(collector, cfg).count("accepted")
    # One pulse per committed accept: an allowlisted code refused for want of a record never
    # moved the relay.
    # Left energised, driven off at start (its first write), off at the end.
    assert relay[:2] == [True, False] and relay[-1] is False
    assert rising_edges(relay) == accepted
    assert gate.reasons["device_fault"] >= 3
    assert gate.reasons["ok"] == accepted


def _stored_decisions(collector: CollectorProc, cfg: config_mod.Config) -> list[str]:
    with sqlite3.connect(f"file:{collector.db}?mode=ro", uri=True, timeout=5) as conn:
        rows = conn.execute("SELECT decision FROM checkins WHERE device = ? ORDER BY seq", (cfg.device.id,))
        return [str(r[0]) for r in rows]


def _called_from(name: str, depth: int = 4) -> bool:
    """Whether ``name`` is among the callers (the gate's clock wraps this one, so not always next)."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_name == name:
            return True
        frame = frame.f_back
    return False


class JumpingClock:
    """Wall time that jumps +1 day after the first scan and to -1 day after the fourth; the
    monotonic clock is the real one. Counts only the scans' calls (the Gate asks once per
    scan; the pipeline thread's other readers, the site's day among them, see the jumps too)."""

    def __init__(self) -> None:
        self.scans = 0
        self.offset = timedelta(0)

    def now(self) -> datetime:
        if _called_from("_scan_locked"):
            self.scans += 1
            if self.scans == 2:
                self.offset = timedelta(days=1)
            elif self.scans == 5:
                self.offset = -timedelta(days=1)
        return datetime.now(UTC) + self.offset

    def monotonic(self) -> float:
        return time.monotonic()


class LockstepSource:
    """A camera that shows each scene until the gate has judged it, then an empty view until
    the gate has seen the code gone, then the next scene: one scan per scene however slowly
    this machine runs the pipeline (the clock schedule above is per scan, so this test counts
    scans exactly). Frame times are made up, for the presence tracker: a code held up stays at
    one instant however many of its frames the slot drops, and each empty frame is an hour
    later, so the code is gone after one empty frame whatever ``track.gone_after_s`` is."""

    finite = True

    def __init__(self, images: list[np.ndarray], gate: Callable[[], Gate | None]) -> None:
        self._images, self._gate = images, gate
        self._scene = 0
        self._showing = True
        self._frames_at_blank = 0
        self._seq = 0
        self._captured = 0.0

    def _judged(self) -> int:
        gate = self._gate()
        return sum(gate.reasons.values()) if gate is not None else 0

    def _frames(self) -> int:
        gate = self._gate()
        return gate.frames if gate is not None else 0

    def open(self) -> None:
        pass

    def read(self, timeout: float) -> Frame | None:
        time.sleep(0.01)
        if self._showing and self._judged() > self._scene:
            self._showing, self._frames_at_blank = False, self._frames()
        elif not self._showing and self._frames() >= self._frames_at_blank + 3:
            # The slot holds one frame: three processed since the switch include an empty one.
            self._scene += 1
            self._showing = True
        if self._scene == len(self._images):
            return None
        self._seq += 1
        if not self._showing:
            self._captured += 3600.0
        return Frame(self._images[self._scene] if self._showing else BLANK, self._seq, self._captured)

    def close(self) -> None:
        pass


def test_clock_jumps_a_day_forward_and_back(tmp_path: Path, collector_env) -> None:
    broker, collector = collector_env
    allowed = ALLOWED[0]
    codes = [
        ("first", allowed),
        ("v1", "VISITOR-1"),
        ("again after +1 day", allowed),
        ("v2", "VISITOR-2"),
        ("v3", "VISITOR-3"),
        ("again after -1 day", allowed),
        ("v4", "VISITOR-4"),
        ("v5", "VISITOR-5"),
    ]
    # The same code shown for a while is no frozen camera here: the source waits for the gate.
    overrides = {"policy.anti_passback_s": 600.0, "camera.frozen_frames": 0, "camera.black_frames": 0}
    path = make_gate(tmp_path, broker.port, [], **overrides)
    cfg = config_mod.load(path)
    rng = np.random.default_rng(17)
    source = LockstepSource([synth.render_scene(code, rng) for _name, code in codes], lambda: app.gate)
    factory = MockFactory()
    try:
        app = App(cfg, pin_factory=factory, clock=JumpingClock(), source=source)
        assert Run(app).start().join() == 0
        relay = [s.state for s in factory.pin(cfg.gpio.relay_pin).states]
    finally:
        factory.close()
    assert_stored_exactly_once(collector, cfg, [])
    with sqlite3.connect(f"file:{collector.db}?mode=ro", uri=True, timeout=5) as conn:
        rows = conn.execute(
            "SELECT seq, ts, decision, reason, subject FROM checkins WHERE device = ? ORDER BY seq",
            (cfg.device.id,),
        ).fetchall()
    assert [r[0] for r in rows] == list(range(1, len(codes) + 1))  # ordered by seq, whatever ts says
    # Which code each event is about, from its pseudonym: not from its position.
    key = events.load_or_create_key(cfg.subject_key_path)
    pseudonym = events.Pseudonymizer(key).subject("plain", allowed.encode())
    dates = [datetime.fromisoformat(r[1].replace("Z", "+00:00")).date() for r in rows]
    days = [(d - dates[0]).days for d in dates]  # the first scans are on the real clock
    assert days == [0, 1, 1, 1, -1, -1, -1, -1], days  # the clock jumped after scans 1 and 4
    # Anti-passback runs on the monotonic clock: neither a day forward nor a day back lets the
    # same code in again within the window.
    assert [(day, r[2], r[3]) for day, r in zip(days, rows, strict=True) if r[4] == pseudonym] == [
        (0, "accepted", "ok"),
        (1, "rejected", "anti_passback"),
        (-1, "rejected", "anti_passback"),
    ]
    assert rising_edges(relay) == 1


# --- the link blackholed: two network namespaces joined by a veth pair -----------------------


class NsBroker:
    """mosquitto (persistence off) listening on ``host`` inside network namespace ``ns``."""

    def __init__(self, workdir: Path, ns: str, host: str, probe_ns: str) -> None:
        self.workdir, self.ns, self.host, self.probe_ns = workdir, ns, host, probe_ns
        self.port = 1883  # the namespace is ours alone: nothing else listens there
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NsBroker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n"
            f"log_dest file {self.workdir / 'mosquitto.log'}\nuser root\n"
        )
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, find_mosquitto(), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        probe = f"import socket; socket.create_connection(({self.host!r}, {self.port}), 1).close()"

        def listening() -> bool:
            cmd = ["ip", "netns", "exec", self.probe_ns, sys.executable, "-c", probe]
            return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0

        assert wait_until(listening, 15, interval=0.2), "mosquitto did not listen in its namespace"
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


def test_link_blackholed(tmp_path: Path) -> None:
    """Gate in one namespace, broker and collector in another, one veth between them. The
    link then silently drops every packet both ways for 20 s (a ``blackhole`` qdisc on both
    ends: no RST, no ICMP, as when a cable or radio link dies) while the gate keeps
    committing; once it carries traffic again every committed event is stored once."""
    if os.geteuid() != 0:
        pytest.skip("link blackhole: needs root to create network namespaces")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("link blackhole: needs iproute2 (`ip`, `tc`)")
    tag = f"{os.getpid() % 100000}"
    ns_broker, ns_gate = f"gsb{tag}", f"gsg{tag}"
    veth_broker, veth_gate = f"gsvb{tag}", f"gsvg{tag}"
    net = f"10.213.{os.getpid() % 250}"
    broker_ip, gate_ip = f"{net}.1", f"{net}.2"
    created: list[str] = []
    procs: list[subprocess.Popen[bytes]] = []
    broker: NsBroker | None = None
    collector: CollectorProc | None = None
    try:
        for ns in (ns_broker, ns_gate):
            r = _ip("netns", "add", ns)
            if r.returncode != 0:
                pytest.skip(f"link blackhole: `ip netns add` is not allowed here ({r.stderr.strip()})")
            created.append(ns)
        peer = ("peer", "name", veth_gate, "netns", ns_gate)
        steps = [
            ("link", "add", veth_broker, "netns", ns_broker, "type", "veth", *peer),
            ("-n", ns_broker, "addr", "add", f"{broker_ip}/30", "dev", veth_broker),
            ("-n", ns_gate, "addr", "add", f"{gate_ip}/30", "dev", veth_gate),
            ("-n", ns_broker, "link", "set", "lo", "up"),
            ("-n", ns_gate, "link", "set", "lo", "up"),
            ("-n", ns_broker, "link", "set", veth_broker, "up"),
            ("-n", ns_gate, "link", "set", veth_gate, "up"),
        ]
        for step in steps:
            r = _ip(*step)
            if r.returncode != 0:
                pytest.skip(f"link blackhole: `ip {' '.join(step)}` failed ({r.stderr.strip()})")
        ends = ((ns_broker, veth_broker), (ns_gate, veth_gate))

        def tc(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
            return _ip("netns", "exec", ns, "tc", "qdisc", *args)

        # Probe the blackhole qdisc before anything depends on it.
        r = tc(ns_gate, "add", "dev", veth_gate, "root", "blackhole")
        if r.returncode != 0:
            pytest.skip(f"link blackhole: the `blackhole` qdisc is not available ({r.stderr.strip()})")
        assert tc(ns_gate, "del", "dev", veth_gate, "root").returncode == 0

        broker = NsBroker(tmp_path / "broker", ns_broker, broker_ip, probe_ns=ns_gate).start()
        collector = CollectorProc(tmp_path, broker, prefix=("ip", "netns", "exec", ns_broker)).start()
        path = make_gate(
            tmp_path,
            broker.port,
            scenes(10),
            **{"mqtt.host": broker_ip, "mqtt.keepalive_s": 5, "daemon.drain_timeout_s": 90.0},
        )
        extend_replay(tmp_path, 40)
        cfg = config_mod.load(path)
        log = tmp_path / "daemon.log"
        daemon = spawn_daemon(path, log, prefix=("ip", "netns", "exec", ns_gate))
        procs.append(daemon)
        assert wait_until(lambda: len(collector.stored(cfg.device.id)) >= 2, 60), collector.tail()
        for ns, dev in ends:
            assert tc(ns, "add", "dev", dev, "root", "blackhole").returncode == 0
        stored_at_cut = len(collector.stored(cfg.device.id))
        assert_kept_committing(watch_commits(daemon, log, 20))  # bounded: 20 s, whatever happens
        # Nothing crossed the link while it was down (a few in flight at the cut may land).
        assert len(collector.stored(cfg.device.id)) <= stored_at_cut + 25
        for ns, dev in ends:
            assert tc(ns, "del", "dev", dev, "root").returncode == 0
        assert daemon.wait(150) == 0, log.read_text(errors="replace")[-3000:]
        assert_stored_exactly_once(collector, cfg, logged_seqs(log))
        assert collector.proc is not None and collector.proc.poll() is None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if collector is not None:
            collector.kill()
        if broker is not None:
            broker.kill()
        for ns in created:
            _ip("netns", "delete", ns)  # takes its veth end with it; the peer goes too


@pytest.fixture(autouse=True)
def _no_system_notify(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
