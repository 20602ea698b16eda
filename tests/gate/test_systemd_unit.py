"""The shipped systemd unit: it verifies cleanly and its sandbox scores as intended."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO

UNIT = REPO / "systemd" / "gate-scanner.service"
INSTALLED_BINARY = "/opt/gate-scanner/.venv/bin/gate-scanner"
MAX_EXPOSURE = 2.5

ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed on this host")


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""},
    )


def test_unit_runs_the_daemon_and_the_relay_off_hook() -> None:
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_BINARY} run --config /etc/gate-scanner/gate.toml" in text
    assert f"ExecStopPost={INSTALLED_BINARY} relay-off --config /etc/gate-scanner/gate.toml" in text
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=10",
        "Restart=on-failure",
        "StartLimitIntervalSec=0",
        "User=gate-scanner",
        "SupplementaryGroups=video gpio",
        "StateDirectory=gate-scanner",
        "StateDirectoryMode=0700",
    ):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    # ProtectClock=yes would block the read-only adjtimex behind clock_synced().
    assert not re.search(r"^ProtectClock=", text, re.M)
    assert re.search(r"^SystemCallFilter=@system-service adjtimex", text, re.M)


def test_verify_prints_nothing(tmp_path: Path) -> None:
    # verify checks that ExecStart= binaries exist; on a build host the daemon is not installed
    # under /opt, so check a copy whose commands point at an executable that exists here.
    stand_in = shutil.which("true") or "/bin/true"
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(INSTALLED_BINARY, stand_in))
    result = analyze("verify", str(copy))
    assert (result.stdout + result.stderr).strip() == ""
    assert result.returncode == 0


def test_verify_of_the_real_file_only_misses_the_uninstalled_binary() -> None:
    result = analyze("verify", str(UNIT))
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    for line in lines:
        assert f"Command {INSTALLED_BINARY} is not executable" in line, line


def test_security_exposure_is_low() -> None:
    result = analyze("security", "--offline=true", str(UNIT))
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, output
    exposure = float(match.group(1))
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= MAX_EXPOSURE, output
