"""The image recipe and provisioning: shell is shellcheck-clean, units verify, fragments parse,
and a bundle from `gate-scanner provision` round-trips through the first-boot script."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from scanner import pki
from scanner.cli import main

ROOT = Path(__file__).resolve().parent.parent
FILES = ROOT / "firmware" / "files"
STAGE = ROOT / "firmware" / "stage-gate-scanner"
FIRSTBOOT = FILES / "gate-scanner-firstboot.sh"
CLI = Path(sys.executable).with_name("gate-scanner")


def shell_scripts() -> list[Path]:
    found = []
    for base in (ROOT / "firmware", ROOT / "deploy"):
        for path in sorted(base.rglob("*")):
            if path.is_file() and (path.suffix == ".sh" or path.read_bytes()[:2] == b"#!"):
                found.append(path)
    return [ROOT / "quickstart", ROOT / ".ci" / "run", *found]


def test_shellcheck_every_script() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    scripts = shell_scripts()
    assert FIRSTBOOT in scripts and ROOT / "deploy/provision/update-fleet.sh" in scripts
    result = subprocess.run(
        [shellcheck, "-x", *map(str, scripts)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("unit", ["gate-scanner-firstboot.service", "gate-scanner-datapart.service"])
def test_units_verify(unit: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    stand_in = shutil.which("true") or "/bin/true"
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={stand_in}", (FILES / unit).read_text(), flags=re.M)
    copy = tmp_path / unit
    copy.write_text(text)
    result = subprocess.run(
        [analyze, "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""},
    )
    # Units this one only orders itself against (the daemon, the mount) need not exist here.
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and "gate-scanner.service" not in line and "var-lib-gate" not in line
    ]
    assert problems == []


def test_config_fragments_parse() -> None:
    lines = [ln for ln in (FILES / "config.txt.gate-scanner").read_text().splitlines() if ln.strip()]
    settings = dict(ln.split("=", 1) for ln in lines if not ln.startswith("#"))
    assert all(re.fullmatch(r"[a-z_]+", k) for k in settings)
    assert settings["dtparam"] == "watchdog=on" and settings["camera_auto_detect"] == "1"

    fstab = [
        ln for ln in (FILES / "fstab.gate-scanner").read_text().splitlines() if ln and not ln.startswith("#")
    ]
    assert len(fstab) == 1
    spec, target, fstype, options, dump, passno = fstab[0].split()
    assert (spec, target, fstype, dump, passno) == (
        "LABEL=GATEDATA",
        "/var/lib/gate-scanner",
        "ext4",
        "0",
        "2",
    )
    assert "nofail" in options.split(",")

    for name, section, key, value in (
        ("gate-scanner-watchdog.conf", "Manager", "RuntimeWatchdogSec", "15"),
        ("gate-scanner-data.conf", "Unit", "RequiresMountsFor", "/var/lib/gate-scanner"),
    ):
        ini = configparser.ConfigParser(strict=True)
        ini.optionxform = str  # type: ignore[assignment,method-assign]
        ini.read_string((FILES / name).read_text())
        assert ini[section][key] == value

    # pi-gen gets the shared list appended to its own (firmware/build-image.sh).
    pi_only = set((STAGE / "00-gate-scanner" / "00-packages").read_text().split())
    shared = set((FILES / "gate-scanner-packages.txt").read_text().split())
    assert {"python3-picamera2", "python3-lgpio"} <= pi_only
    assert {"python3-venv", "libzbar0t64", "overlayroot"} <= shared
    chroot = (FILES / "gate-scanner-setup-chroot.sh").read_text()
    assert "venv --system-site-packages /opt/gate-scanner/.venv" in chroot
    assert "-G video,gpio gate-scanner" in chroot
    assert "gate-scanner-setup-chroot.sh" in (STAGE / "00-gate-scanner" / "02-run-chroot.sh").read_text()


def make_bundle(tmp: Path, out: Path) -> None:
    ca = tmp / "pki"
    pki.init_ca(ca)
    (tmp / "subject.key").write_bytes(os.urandom(32))
    (tmp / "trust.json").write_text('{"version": 1, "issued": "2026-01-01T00:00:00Z", "keys": []}\n')
    code = main(
        [
            "provision", "--ca-dir", str(ca), "--id", "gate-7", "--site", "market", "--broker",
            "mqtt.example.org", "--out", str(out), "--subject-key", str(tmp / "subject.key"),
            "--pass-trust", str(tmp / "trust.json"),
        ]
    )  # fmt: skip
    assert code == 0


@pytest.mark.parametrize("form", ["dir", "tar"])
def test_bundle_round_trips_through_first_boot(tmp_path: Path, form: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("the first-boot script sets owners with install -o: needs root")
    root = tmp_path / "root"
    boot = root / "boot" / "firmware"
    boot.mkdir(parents=True)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "gate-scanner-firstboot.service").symlink_to(
        "/etc/systemd/system/gate-scanner-firstboot.service"
    )
    make_bundle(tmp_path, boot / ("gate-scanner" if form == "dir" else "gate-scanner.tar"))

    env = {**os.environ, "GATE_SCANNER": str(CLI), "SCANNER_USER": "root"}
    result = subprocess.run(
        ["bash", str(FIRSTBOOT), "--root", str(root)], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "device gate-7 at market" in result.stderr

    def mode(rel: str) -> int:
        return stat.S_IMODE((root / rel).stat().st_mode)

    assert mode("etc/gate-scanner/gate.toml") == 0o640
    assert mode("etc/gate-scanner/ca.pem") == 0o644
    assert mode("etc/gate-scanner/device.crt") == 0o644
    assert mode("var/lib/gate-scanner") == 0o700
    assert mode("var/lib/gate-scanner/keys/device.key") == 0o600
    assert mode("var/lib/gate-scanner/subject.key") == 0o600
    assert mode("var/lib/gate-scanner/lists/pass-trust.json") == 0o644
    assert (root / "var/lib/gate-scanner/keys/device.key").read_bytes() == (
        tmp_path / "pki/device/gate-7.key"
    ).read_bytes()
    toml = (root / "etc/gate-scanner/gate.toml").read_text()
    assert 'key_file = "/var/lib/gate-scanner/keys/device.key"' in toml
    # The secrets are gone from the boot partition; the log stays for the technician.
    assert sorted(p.name for p in boot.iterdir()) == ["gate-scanner-provision.log"]
    assert "BEGIN" not in (boot / "gate-scanner-provision.log").read_text()
    assert not (wants / "gate-scanner-firstboot.service").exists()

    # A second boot has nothing to do.
    again = subprocess.run(
        ["bash", str(FIRSTBOOT), "--root", str(root)], capture_output=True, text=True, env=env
    )
    assert again.returncode == 0 and "nothing to do" in again.stderr


def test_tampered_bundle_is_refused_and_kept(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    root = tmp_path / "root"
    boot = root / "boot" / "firmware"
    boot.mkdir(parents=True)
    bundle = boot / "gate-scanner"
    make_bundle(tmp_path, bundle)
    (bundle / "gate.toml").write_text((bundle / "gate.toml").read_text() + "\n[bogus]\n")
    env = {**os.environ, "GATE_SCANNER": str(CLI), "SCANNER_USER": "root"}
    result = subprocess.run(
        ["bash", str(FIRSTBOOT), "--root", str(root)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 1 and "SHA256SUMS" in result.stderr
    assert (bundle / "device.key").exists()
    assert not (root / "etc/gate-scanner/gate.toml").exists()


def test_invalid_config_fails_check_config_and_keeps_the_bundle(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    root = tmp_path / "root"
    boot = root / "boot" / "firmware"
    boot.mkdir(parents=True)
    bundle = boot / "gate-scanner"
    make_bundle(tmp_path, bundle)
    (bundle / "gate.toml").write_text((bundle / "gate.toml").read_text().replace("port = 8883", "port = 0"))
    resum = "sha256sum gate.toml ca.pem device.crt device.key subject.key lists/* > SHA256SUMS"
    subprocess.run(["sh", "-c", resum], cwd=bundle, check=True)
    env = {**os.environ, "GATE_SCANNER": str(CLI), "SCANNER_USER": "root"}
    result = subprocess.run(
        ["bash", str(FIRSTBOOT), "--root", str(root)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 1 and "mqtt.port" in result.stderr
    assert (bundle / "device.key").exists()


def test_provision_refuses_to_overwrite_a_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bundle"
    make_bundle(tmp_path, out)
    assert stat.S_IMODE((out / "device.key").stat().st_mode) == 0o600
    code = main(["provision", "--ca-dir", str(tmp_path / "pki"), "--id", "gate-7", "--site", "market",
                 "--broker", "h:1883", "--out", str(out)])  # fmt: skip
    assert code == 2 and "not empty" in capsys.readouterr().err
