"""sd_notify over real AF_UNIX datagram sockets, the watchdog feeder, and the clock check."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from scanner.gate import health
from scanner.gate.health import SystemdNotifier, WatchdogFeeder, clock_synced

WAIT_S = 3.0


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(WAIT_S)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_watchdog_status_stopping_reach_the_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready()
    assert receive(sock) == ["READY=1", "STATUS=running"]
    assert notifier.watchdog()
    assert receive(sock) == ["WATCHDOG=1"]
    assert notifier.status("camera stalled\nretrying")
    assert receive(sock) == ["STATUS=camera stalled retrying"]
    assert notifier.stopping()
    assert receive(sock) == ["STOPPING=1", "STATUS=stopping"]


def test_abstract_socket_name() -> None:
    name = f"gate-scanner-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(WAIT_S)
        notifier = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert receive(sock) == ["READY=1", "STATUS=running"]


def test_not_under_systemd_is_a_silent_no_op() -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval() is None


def test_send_failure_returns_false(tmp_path: Path) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert notifier.notify("READY=1") is False


def test_reads_environment_once_at_construction(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = SystemdNotifier()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notifier.watchdog()
    assert receive(sock) == ["WATCHDOG=1"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "10000000"}, 5.0),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}, 5.0),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert SystemdNotifier({"NOTIFY_SOCKET": "/run/systemd/notify", **env}).watchdog_interval() == expected


class CountingNotifier(SystemdNotifier):
    def __init__(self) -> None:
        super().__init__({})
        self.pings = 0
        self.statuses: list[str] = []
        self.pinged = threading.Condition()

    def notify(self, *lines: str) -> bool:
        with self.pinged:
            if "WATCHDOG=1" in lines:
                self.pings += 1
            self.statuses += [line for line in lines if line.startswith("STATUS=")]
            self.pinged.notify_all()
        return True


def test_feeder_feeds_only_while_alive() -> None:
    notifier = CountingNotifier()
    alive = threading.Event()
    alive.set()
    stop = threading.Event()
    feeder = WatchdogFeeder(notifier, alive.is_set, stop, interval=0.01)
    feeder.start()
    try:
        with notifier.pinged:
            assert notifier.pinged.wait_for(lambda: notifier.pings >= 5, timeout=WAIT_S)
        alive.clear()
        with notifier.pinged:
            assert notifier.pinged.wait_for(
                lambda: any("unhealthy" in s for s in notifier.statuses), timeout=WAIT_S
            )
            stalled_at = notifier.pings
        # Twenty intervals with alive() false: not one more ping.
        assert not stop.wait(0.2)
        assert notifier.pings == stalled_at
        alive.set()
        with notifier.pinged:
            assert notifier.pinged.wait_for(lambda: notifier.pings > stalled_at, timeout=WAIT_S)
    finally:
        stop.set()
        feeder.join(timeout=WAIT_S)
    assert not feeder.is_alive()
    assert feeder.fed == notifier.pings


def test_feeder_treats_a_raising_health_check_as_unhealthy() -> None:
    notifier = CountingNotifier()
    stop = threading.Event()

    def broken() -> bool:
        raise RuntimeError("boom")

    feeder = WatchdogFeeder(notifier, broken, stop, interval=0.01)
    feeder.start()
    with notifier.pinged:
        assert notifier.pinged.wait_for(lambda: bool(notifier.statuses), timeout=WAIT_S)
    stop.set()
    feeder.join(timeout=WAIT_S)
    assert notifier.pings == 0


def test_feeder_over_a_real_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "40000", "WATCHDOG_PID": str(os.getpid())}
    stop = threading.Event()
    feeder = WatchdogFeeder(SystemdNotifier(env), lambda: True, stop)
    assert feeder.interval == pytest.approx(0.02)
    feeder.start()
    try:
        assert receive(sock) == ["WATCHDOG=1"]
        assert receive(sock) == ["WATCHDOG=1"]
    finally:
        stop.set()
        feeder.join(timeout=WAIT_S)


def test_feeder_without_watchdog_returns_at_once() -> None:
    feeder = WatchdogFeeder(SystemdNotifier({}), lambda: True, threading.Event())
    feeder.start()
    feeder.join(timeout=WAIT_S)
    assert not feeder.is_alive()
    assert feeder.fed == 0


def test_clock_synced_returns_a_bool_and_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health, "_clock_cache", None)
    first = clock_synced()
    assert isinstance(first, bool)
    calls = []
    monkeypatch.setattr(health, "_read_clock_synced", lambda: calls.append(1) or not first)
    assert clock_synced() is first  # served from the cache
    assert calls == []


def test_clock_synced_failure_is_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health, "_clock_cache", None)

    def no_libc(*args: object, **kwargs: object) -> None:
        raise OSError("no libc")

    monkeypatch.setattr(health.ctypes, "CDLL", no_libc)
    assert clock_synced() is False


def test_timex_layout_matches_the_kernel() -> None:
    # struct timex is 208 bytes with 64-bit long (x86_64, aarch64), 128 with 32-bit long (armhf).
    import ctypes

    assert ctypes.sizeof(health._Timex) == (208 if ctypes.sizeof(ctypes.c_long) == 8 else 128)
