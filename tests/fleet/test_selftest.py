"""`gate-scanner selftest`: simulated run passes; a dead broker and a blank camera FAIL with advice."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from scanner import config as config_mod
from scanner.cli import main
from scanner.fleet import selftest
from scanner.sim import synth
from scanner.sim.localbroker import free_port
from tests.helpers import ContactFactory

STATUSES = ("PASS", "WARN", "FAIL")


def check_lines(text: str) -> dict[str, str]:
    """name → status of every check line."""
    out = {}
    for line in text.splitlines():
        status, _, rest = line.partition("  ")
        if status in STATUSES:
            out[rest.split("  ", 1)[0]] = status
    return out


def write_config(tmp: Path, *, source: str = "picamera2", port: int | None = None, extra: str = "") -> Path:
    config = tmp / "gate.toml"
    config.write_text(
        f"""[device]
id = "gate-1"
site = "market"
[camera]
source = "{source}"
fps = 10.0
[gpio]
pin_factory = "mock"
[mqtt]
host = "127.0.0.1"
port = {port or free_port()}
[storage]
dir = "{tmp / "state"}"
{extra}"""
    )
    return config


def test_simulate_passes_or_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["selftest", "--config", str(write_config(tmp_path)), "--simulate"])
    out = capsys.readouterr().out
    checks = check_lines(out)
    assert code == 0, out
    assert set(checks) >= {
        "camera",
        "decode",
        "signals",
        "broker",
        "clock",
        "disk",
        "outbox",
        "temperature",
        "power",
    }
    assert all(s in ("PASS", "WARN") for s in checks.values()), out
    assert checks["decode"] == "PASS" and checks["broker"] == "PASS" and checks["signals"] == "PASS"


DOOR = "[door]\nexit_pin = 19\npassage_pin = 5\nfire_pin = 6\ntamper_pin = 13\n"


def test_simulate_trips_every_configured_door_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["selftest", "--config", str(write_config(tmp_path, extra=DOOR)), "--simulate"])
    captured = capsys.readouterr()
    checks = check_lines(captured.out)
    assert code == 0, captured.out
    for name in ("exit button", "passage", "tamper", "fire"):
        assert checks[name] == "PASS", captured.out
    # The technician was asked for each, in turn.
    for ask in ("press the exit button", "open the door", "open the enclosure", "trip the fire input"):
        assert f"door: {ask}" in captured.err


def test_door_inputs_pass_on_the_technicians_edge_and_fail_with_advice(tmp_path: Path) -> None:
    cfg = config_mod.from_table(
        {
            "device": {"id": "g", "site": "s"},
            "door": {"exit_pin": 19, "passage_pin": 5, "fire_pin": 6, "tamper_pin": 13},
        }
    )
    factory = ContactFactory()
    door, tamper = factory.contact(5), factory.contact(13)
    door.close_contact()  # shut
    tamper.close_contact()  # the technician has the enclosure closed
    # The fire loop is left open: a cut wire. The exit button is never pressed.
    technician = {"open the door": door.open_contact, "open the enclosure": tamper.open_contact}
    asked: list[str] = []

    def say(text: str) -> None:
        asked.append(text)
        for ask, act in technician.items():
            if ask in text:
                act()

    try:
        checks = {c.name: c for c in selftest.check_door(cfg, factory, say=say, timeout=0.5)}
    finally:
        factory.close()
    assert checks["passage"].status == "PASS" and checks["tamper"].status == "PASS"
    assert checks["fire"].status == "FAIL" and "cut wire" in checks["fire"].detail
    assert checks["exit button"].status == "FAIL"
    assert "pin 19" in checks["exit button"].advice and "door.exit_contact" in checks["exit button"].advice
    assert not any("trip the fire input" in text for text in asked)  # it failed before asking


def blank_frames(tmp: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(3)
    frames = tmp / "frames"
    frames.mkdir()
    for i in range(n):
        cv2.imwrite(str(frames / f"{i:05d}.png"), synth.render_background(rng, (640, 480)))
    return frames


def test_broker_down_and_blank_camera_fail_with_advice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, source=f"dir:{blank_frames(tmp_path)}")
    code = main(["selftest", "--config", str(config)])
    out = capsys.readouterr().out
    checks = check_lines(out)
    assert code == 1, out
    assert checks["camera"] in ("PASS", "WARN")
    assert checks["decode"] == "FAIL" and checks["broker"] == "FAIL", out
    broker_line = next(line for line in out.splitlines() if line.startswith("FAIL  broker"))
    assert "cannot reach 127.0.0.1:" in broker_line and " — check the network" in broker_line
    decode_line = next(line for line in out.splitlines() if line.startswith("FAIL  decode"))
    assert " — hold the self-test card" in decode_line


def test_printed_card_decodes_and_verifies_with_its_key(tmp_path: Path, broker, capsys) -> None:
    card = tmp_path / "card.png"
    assert main(["selftest", "--config", "unused", "--card", str(card)]) == 0
    pub = tmp_path / "card.pub.json"
    assert json.loads(pub.read_text())["kid"]
    frames = tmp_path / "frames"
    frames.mkdir()
    page = cv2.imread(str(card), cv2.IMREAD_GRAYSCALE)
    h = page.shape[0] * 640 // page.shape[1]
    scaled = cv2.resize(page, (640, h), interpolation=cv2.INTER_AREA)[:480]
    for i in range(5):
        cv2.imwrite(str(frames / f"{i:05d}.png"), scaled)
    config = write_config(tmp_path, source=f"dir:{frames}", port=broker.port)
    capsys.readouterr()
    main(["selftest", "--config", str(config), "--card-key", str(pub)])
    checks = check_lines(capsys.readouterr().out)
    assert checks["decode"] == "PASS" and checks["broker"] == "PASS"
    # Without the card's key the card is read but not trusted: it is not an accepted pass.
    main(["selftest", "--config", str(config)])
    out = capsys.readouterr().out
    assert check_lines(out)["decode"] == "FAIL" and "no trusted key" in out


@pytest.mark.parametrize(
    ("flags", "status"),
    [
        ({"raw": "0x0"}, "PASS"),
        ({"raw": "0x50000", "under_voltage_occurred": True}, "WARN"),
        ({"raw": "0x50005", "under_voltage_now": True, "under_voltage_occurred": True}, "FAIL"),
        (None, "WARN"),
    ],
)
def test_power_check(flags: dict[str, object] | None, status: str) -> None:
    assert selftest.check_power(flags).status == status


def test_disk_thresholds_and_corrupt_outbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for free, status in ((10 * 2**20, "FAIL"), (100 * 2**20, "WARN"), (2**30, "PASS")):
        monkeypatch.setattr(selftest, "disk_free_bytes", lambda _p, free=free: free)
        assert selftest.check_disk(tmp_path).status == status
    bad = tmp_path / "outbox.db"
    bad.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    check = selftest.check_outbox(bad)
    assert check.status == "FAIL" and "move outbox.db aside" in check.line()


def test_certificate_expiry_warns_within_30_days(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from scanner.config import from_table
    from scanner.fleet import pki

    pki.init_ca(tmp_path / "ca")
    issued = pki.issue_client(tmp_path / "ca", "device", "gate-1", days=20)
    config = from_table(
        {
            "device": {"id": "gate-1", "site": "s"},
            "mqtt": {
                "tls": True,
                "ca_file": str(tmp_path / "ca/ca.crt"),
                "cert_file": str(issued.cert),
                "key_file": str(issued.key),
            },
        }
    )
    assert selftest.check_certificate(config).status == "WARN"
    later = datetime.now(UTC) + timedelta(days=40)
    assert selftest.check_certificate(config, now=later).status == "FAIL"


def test_certificate_for_another_site_fails(tmp_path: Path) -> None:
    from scanner.config import from_table
    from scanner.fleet import pki

    pki.init_ca(tmp_path / "ca")
    issued = pki.issue_client(tmp_path / "ca", "device", "gate-1", site="market")

    def config(site: str):
        mqtt = {"tls": True, "ca_file": str(tmp_path / "ca/ca.crt"), "cert_file": str(issued.cert)}
        return from_table(
            {"device": {"id": "gate-1", "site": site}, "mqtt": {**mqtt, "key_file": str(issued.key)}}
        )

    assert selftest.check_certificate(config("market")).status == "PASS"
    check = selftest.check_certificate(config("station"))
    assert check.status == "FAIL" and "certified for site market" in check.line()
    assert "device.site = 'market'" in check.line()


def test_the_last_result_is_kept_for_the_daemons_retained_status(tmp_path):
    from scanner import config as config_mod
    from scanner.fleet.selftest import Check, save_result
    from scanner.gate.app import App

    cfg = config_mod.from_table({"device": {"id": "g", "site": "s"}, "storage": {"dir": str(tmp_path)}})
    assert App(cfg).status()["selftest"] is None
    save_result(tmp_path, [Check("PASS", "camera", "ok"), Check("FAIL", "broker", "refused")])
    result = App(cfg).status()["selftest"]
    assert result["passed"] is False
    assert [c["name"] for c in result["checks"]] == ["camera", "broker"]
