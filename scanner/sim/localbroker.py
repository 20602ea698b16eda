"""A private mosquitto on a loopback port, for the demo and the tests.

mosquitto 2.0 gotchas this class exists to get right once: with no ``listener`` line it
binds 1883 (where a system broker may already run); a listener without
``allow_anonymous true`` refuses every client; started as root it drops to user
``mosquitto`` and then cannot read a root-only work directory; its own log on stdout is
lost when it is SIGKILLed, so it logs to a file.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerError(RuntimeError):
    """The broker did not start or stop as asked; the message carries its log tail."""


def find_mosquitto() -> str:
    for candidate in MOSQUITTO_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("mosquitto")
    if found is None:
        raise BrokerError("mosquitto not found (apt install mosquitto)")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just gave out, so nothing else is listening on it right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalBroker:
    """One mosquitto process with its own config, log and port under ``workdir``.

    The port is chosen once and kept across ``restart()``, so clients reconnect to the
    same address as they would to a real broker coming back after an outage.
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        persistence: bool = False,
        extra_config: str = "",
        executable: str | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self.workdir = Path(workdir)
        self._host = "127.0.0.1"
        self._port = port if port is not None else free_port(self._host)
        self.persistence = persistence
        self.extra_config = extra_config
        self.executable = executable
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    # --- addresses -------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{self._host}:{self._port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # --- lifecycle -------------------------------------------------------------------------

    def write_config(self) -> Path:
        lines = [
            f"listener {self._port} {self._host}",
            "allow_anonymous true",
            f"persistence {'true' if self.persistence else 'false'}",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if self.persistence:
            lines.append(f"persistence_location {self.workdir}/")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # Without this, mosquitto started as root switches to user "mosquitto", which
            # cannot read a root-only temp dir (its config, acl file, log).
            lines.append("user root")
        if self.extra_config:
            lines.append(self.extra_config.rstrip("\n"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return self.config_path

    def start(self) -> LocalBroker:
        if self.running:
            return self
        self.write_config()
        exe = self.executable or find_mosquitto()
        # stderr catches what mosquitto says before it has opened its log file (config errors).
        stderr = (self.workdir / "mosquitto.stderr").open("ab")
        try:
            self._proc = subprocess.Popen(
                [exe, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,  # a Ctrl-C in the terminal reaches us, not the broker
            )
        finally:
            stderr.close()
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise BrokerError(f"mosquitto exited with {code} on {self.url}:\n{self.log_tail()}")
            try:
                with socket.create_connection((self._host, self._port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() >= deadline:
                    self.kill()
                    raise BrokerError(
                        f"mosquitto not listening on {self.url} after {self.start_timeout:.0f} s:\n"
                        f"{self.log_tail()}"
                    ) from None
                time.sleep(0.02)
        log.info("mosquitto listening on %s (pid %d)", self.url, self._proc.pid)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate (clean shutdown), then kill if it does not exit within ``timeout``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("mosquitto on %s ignored SIGTERM for %.1f s; killing", self.url, timeout)
                proc.kill()
                proc.wait(timeout=timeout)
        self._proc = None

    def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL: the broker vanishes without sending wills or flushing anything."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
        self._proc = None

    def restart(self) -> LocalBroker:
        self.stop()
        return self.start()

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for path in (self.workdir / "mosquitto.stderr", self.log_path):
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            parts.extend(text.splitlines()[-lines:])
        return "\n".join(parts) or "(no log output)"

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
