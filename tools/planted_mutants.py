"""Plant the safety bugs listed in docs/mutation.md (and those of the assertions mended with
them), one at a time, in a scratch copy of the repository, and check that the tests named with
each now fail.

mutmut (tools/mutation.sh) only makes small edits inside expressions; these are the bigger
ones a review planted by hand (a call removed, a log line added), kept here so that anyone
can see again that a deliberate bug cannot pass. The work tree is never touched.

    .venv/bin/python tools/planted_mutants.py [NAME...]

Prints one JSON line per mutant (name, tests, caught, first failure line) and exits 1 if any
was not caught.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Planted:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    count: int = 1  # how many times ``old`` occurs (all are replaced)


PLANTED = (
    Planted(
        "stop path without relay_off (both calls)",
        "scanner/gate/app.py",
        "signals.relay_off()",
        "pass  # planted",
        (
            "tests/gate/test_app.py::test_stop_drops_the_relay_before_anything_else_is_shut_down",
            "tests/gate/test_e2e.py::test_sigterm_stops_cleanly_with_relay_off_and_offline",
        ),
        count=2,
    ),
    Planted(
        "relay-off command is a no-op",
        "scanner/gate/relay_off.py",
        "        force_relay_off(config.gpio, factory)\n",
        "        pass  # planted\n",
        ("tests/gate/test_signals.py::test_the_relay_off_command_drives_a_relay_left_energised_off",),
    ),
    Planted(
        "pulse the relay when the outbox append raises",
        "scanner/gate/pipeline.py",
        "        except OutboxError as exc:\n            self._signals.rejected()\n",
        "        except OutboxError as exc:\n            self._signals.accepted()  # planted\n",
        ("tests/gate/test_app.py::test_outbox_full_fails_secure_reject_fault_alarm_and_recovers",),
    ),
    Planted(
        "pulse as well as reject when the outbox append raises",
        "scanner/gate/pipeline.py",
        "        except OutboxError as exc:\n            self._signals.rejected()\n",
        "        except OutboxError as exc:\n            self._signals.rejected()\n"
        "            if decision.accepted:\n                self._signals.accepted()  # planted\n",
        ("tests/gate/test_app.py::test_outbox_full_fails_secure_reject_fault_alarm_and_recovers",),
    ),
    Planted(
        "outbox synchronous=OFF",
        "scanner/gate/outbox.py",
        "PRAGMA synchronous=FULL",
        "PRAGMA synchronous=OFF",
        ("tests/gate/test_outbox.py::test_every_commit_is_synced_before_append_returns",),
    ),
    Planted(
        "outbox synchronous=NORMAL",
        "scanner/gate/outbox.py",
        "PRAGMA synchronous=FULL",
        "PRAGMA synchronous=NORMAL",
        ("tests/gate/test_outbox.py::test_every_commit_is_synced_before_append_returns",),
    ),
    Planted(
        "raw payload logged (debug) in the scan path",
        "scanner/gate/pipeline.py",
        "        credential = reader.parse(payload, scanned_at)\n",
        "        credential = reader.parse(payload, scanned_at)\n"
        "        log.debug('scanned %r', payload)  # planted\n",
        ("tests/gate/test_e2e.py::test_no_personal_data_in_the_log_or_on_mqtt_at_any_level",),
    ),
    Planted(
        "DCC identity (name, date of birth) logged in the scan path",
        "scanner/gate/pipeline.py",
        "        credential = reader.parse(payload, scanned_at)\n",
        "        credential = reader.parse(payload, scanned_at)\n"
        "        log.debug('who: %s', credential.identity.decode(errors='replace'))  # planted\n",
        ("tests/gate/test_e2e.py::test_no_personal_data_in_the_log_or_on_mqtt_at_any_level",),
    ),
    Planted(
        "relay not driven off at start (mended relay[0] assertions)",
        "scanner/gate/signals.py",
        "            active_high=gpio.relay_active_high,\n            initial_value=False,\n"
        "            pin_factory=pin_factory,\n        )\n        self._green",
        "            active_high=gpio.relay_active_high,\n            initial_value=None,  # planted\n"
        "            pin_factory=pin_factory,\n        )\n        self._green",
        (
            "tests/gate/test_app.py::test_ready_then_watchdog_only_while_frames_flow_and_fault_while_camera_is_down",
            "tests/gate/test_e2e.py::test_frames_to_subscriber_with_relay_history",
            "tests/gate/test_commands.py::"
            "test_signed_open_records_one_event_pulses_once_and_replies_with_the_correlation_data",
        ),
    ),
    Planted(
        "fault blink not restored after a reject (mended test_signals assertion)",
        "scanner/gate/signals.py",
        "            if not self._fire:\n                self._red_idle()\n\n    def _close_devices",
        "            if not self._fire:\n"
        "                self._red.off()  # planted\n\n    def _close_devices",
        ("tests/gate/test_signals.py::test_reject_during_fault_restores_the_fault_pattern",),
    ),
    Planted(
        "camera recovery not re-published (mended camera-watchdog assertions)",
        "scanner/gate/app.py",
        '            self.alarms.clear("camera")  # re-publishes status, now with the camera ok',
        '            self.alarms._active.pop("camera", None)  # planted',
        (
            "tests/gate/test_camera_watchdog.py::"
            "test_app_shows_the_fault_while_the_camera_is_down_keeps_feeding_the_watchdog_and_clears_on_recovery",
        ),
    ),
    Planted(
        "a 256-byte plain code is malformed (mended test_policy assertion)",
        "scanner/credentials/plain.py",
        "    if len(payload) > MAX_BYTES:",
        "    if len(payload) >= MAX_BYTES:  # planted",
        (
            "tests/gate/test_policy.py::test_any_random_or_oversized_payload_is_a_reject_with_a_reason_never_an_exception",
        ),
    ),
    Planted(
        "anti-passback on the wall clock (clock-jump test)",
        "scanner/gate/pipeline.py",
        "        now_mono = self._clock.monotonic()\n",
        "        now_mono = scanned_at.timestamp()  # planted\n",
        ("tests/gate/test_faults.py::test_clock_jumps_a_day_forward_and_back",),
    ),
)


def scratch_copy() -> Path:
    """The tracked files and the work tree's edits, without .venv, caches or mutants/."""
    target = Path(tempfile.mkdtemp(prefix="planted-")) / "repo"
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in files:
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def run(planted: Planted, repo: Path) -> dict[str, object]:
    path = repo / planted.path
    original = path.read_text()
    if original.count(planted.old) != planted.count:
        return {"name": planted.name, "error": f"{planted.path}: the code to change is not there as expected"}
    path.write_text(original.replace(planted.old, planted.new))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *planted.tests],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        path.write_text(original)
    failure = next((line for line in done.stdout.splitlines() if line.startswith("E  ")), "")
    return {
        "name": planted.name,
        "file": planted.path,
        "tests": list(planted.tests),
        "caught": done.returncode != 0,
        "first failure": failure.strip()[:200],
    }


def main(names: list[str]) -> int:
    chosen = [p for p in PLANTED if not names or p.name in names]
    repo = scratch_copy()
    try:
        clean = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                *{t for p in chosen for t in p.tests},
            ],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        if clean.returncode != 0:
            print(clean.stdout[-3000:], file=sys.stderr)
            print("the named tests fail without any planted bug: fix that first", file=sys.stderr)
            return 2
        results = [run(p, repo) for p in chosen]
    finally:
        shutil.rmtree(repo.parent, ignore_errors=True)
    for result in results:
        print(json.dumps(result, ensure_ascii=False))
    return 0 if all(r.get("caught") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
