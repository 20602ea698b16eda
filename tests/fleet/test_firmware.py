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
from cryptography import x509

from scanner.cli import main
from scanner.fleet import pki
from tests.helpers import REPO

ROOT = REPO
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


@pytest.mark.parametrize(
    "unit",
    [
        FILES / "gate-scanner-firstboot.service",
        FILES / "gate-scanner-datapart.service",
        FILES / "gate-scanner-lower-ro.service",
        ROOT / "firmware/debian/gate-scanner-sshkeys.service",
    ],
    ids=lambda p: p.name,
)
def test_units_verify(unit: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    stand_in = shutil.which("true") or "/bin/true"
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={stand_in}", unit.read_text(), flags=re.M)
    copy = tmp_path / unit.name
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


def test_provision_certifies_the_gate_for_its_site_and_refuses_another(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_bundle(tmp_path, tmp_path / "first")
    cert = x509.load_pem_x509_certificate((tmp_path / "first" / "device.crt").read_bytes())
    assert pki.site_of(cert) == "market"  # the broker's rules bind gate-7 to it
    again = ["provision", "--ca-dir", str(tmp_path / "pki"), "--id", "gate-7", "--broker", "h"]
    assert main([*again, "--site", "market", "--out", str(tmp_path / "again")]) == 0  # a new SD card
    assert (tmp_path / "again" / "device.crt").read_bytes() == (
        tmp_path / "first" / "device.crt"
    ).read_bytes()
    capsys.readouterr()
    assert main([*again, "--site", "station", "--out", str(tmp_path / "moved")]) == 2
    err = capsys.readouterr().err
    assert "certified for site 'market', not 'station'" in err and "--site station --renew" in err
    assert not (tmp_path / "moved").exists()


# --- the image's file tree, without building an image ---------------------------------------

BUILD = ROOT / "firmware" / "build-image.sh"
READONLY = FILES / "gate-scanner-readonly.sh"
# What raspi-firmware's kernel hook writes into cmdline.txt for this recipe's settings (read
# off a build); the Pi firmware passes it to the kernel as it is.
HOOK_CMDLINE = (
    "console=tty0 console=ttyS1,115200 root=LABEL=RASPIROOT rw fsck.repair=yes net.ifnames=0 "
    "cma=64M rootwait \n"
)


def lay_tree(root: Path) -> None:
    result = subprocess.run(
        ["bash", str(BUILD), "--tree", str(root)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def fstab_entries(root: Path) -> dict[str, list[str]]:
    lines = [ln.split() for ln in (root / "etc/fstab").read_text().splitlines() if ln.strip()]
    entries = [ln for ln in lines if not ln[0].startswith("#")]
    assert len({e[1] for e in entries}) == len(entries), entries  # one line per mount point
    return {e[1]: e for e in entries}


def test_the_debian_recipe_lays_a_complete_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    lay_tree(root)
    lay_tree(root)  # a second run (a rebuild on the same root) must not duplicate lines

    sysd = root / "etc/systemd/system"
    for unit in ("gate-scanner.service", "gate-scanner-firstboot.service", "gate-scanner-datapart.service",
                 "gate-scanner-lower-ro.service", "gate-scanner-sshkeys.service",
                 "gate-scanner.service.d/data.conf"):  # fmt: skip
        assert (sysd / unit).is_file(), unit
    assert (sysd / "gate-scanner.service").read_bytes() == (
        ROOT / "systemd/gate-scanner.service"
    ).read_bytes()
    for script in ("gate-scanner-firstboot.sh", "gate-scanner-datapart.sh", "gate-scanner-readonly.sh"):
        path = root / "usr/local/sbin" / script
        assert path.read_bytes() == (FILES / script).read_bytes()
        assert stat.S_IMODE(path.stat().st_mode) == 0o755
    data = (sysd / "gate-scanner.service.d/data.conf").read_text()
    assert "RequiresMountsFor=/var/lib/gate-scanner" in data
    assert "ConditionPathExists=/etc/gate-scanner/gate.toml" in data
    assert (
        "RuntimeWatchdogSec=15" in (root / "etc/systemd/system.conf.d/gate-scanner-watchdog.conf").read_text()
    )
    journald = (root / "etc/systemd/journald.conf.d/gate-scanner.conf").read_text()
    assert "Storage=volatile" in journald and "MaxRetentionSec=28day" in journald
    assert 'GROUP="gpio"' in (root / "etc/udev/rules.d/99-gate-scanner-gpio.rules").read_text()
    assert "DHCP=yes" in (root / "etc/systemd/network/50-gate-scanner.network").read_text()

    fstab = fstab_entries(root)
    assert fstab["/"][:3] == ["LABEL=RASPIROOT", "/", "ext4"]
    assert fstab["/boot/firmware"][:3] == ["LABEL=RASPIFIRM", "/boot/firmware", "vfat"]
    assert fstab["/var/lib/gate-scanner"][:3] == ["LABEL=GATEDATA", "/var/lib/gate-scanner", "ext4"]
    assert "nofail" in fstab["/var/lib/gate-scanner"][3].split(",")

    # The boot partition's settings come from raspi-firmware's defaults files, which it reads
    # again on every kernel update: the root by label, our config.txt lines.
    defaults = (root / "etc/default/raspi-firmware").read_text()
    assert "\nROOTPART=LABEL=RASPIROOT\n" in "\n" + defaults
    assert '\nCONSOLES="tty0 ttyS1,115200"\n' in "\n" + defaults
    custom = (root / "etc/default/raspi-firmware-custom").read_text()
    assert custom == (FILES / "config.txt.gate-scanner").read_text()
    assert "dtparam=watchdog=on" in custom
    assert (root / "boot/firmware/config.txt").read_text().count("# gate-scanner") == 1
    assert (root / "etc/hostname").read_text() == "gate\n"


def test_both_recipes_lay_the_same_gate_files(tmp_path: Path) -> None:
    debian = tmp_path / "debian"
    lay_tree(debian)
    # pi-gen runs 01-run.sh in the stage directory, with firmware/files copied to ./files
    # by build-image.sh; do the same, on a root that looks like Raspberry Pi OS's.
    stage = tmp_path / "stage"
    shutil.copytree(STAGE / "00-gate-scanner", stage)
    shutil.copytree(FILES, stage / "files")
    shutil.copy(ROOT / "systemd/gate-scanner.service", stage / "files")
    shutil.copy(ROOT / "firmware/README.md", stage / "files")
    (stage / "files/wheelhouse").mkdir()
    pi = tmp_path / "pi"
    (pi / "boot/firmware").mkdir(parents=True)
    (pi / "opt").mkdir()
    (pi / "tmp").mkdir()
    (pi / "boot/firmware/cmdline.txt").write_text(
        "console=serial0,115200 console=tty1 root=PARTUUID=1234-02 rootfstype=ext4 fsck.repair=yes "
        "rootwait quiet init=/usr/lib/raspberrypi-sys-mods/firstboot\n"
    )
    (pi / "etc").mkdir()
    (pi / "etc/fstab").write_text("proc /proc proc defaults 0 0\n")
    result = subprocess.run(["bash", "01-run.sh"], cwd=stage, env={**os.environ, "ROOTFS_DIR": str(pi)},
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "init=" not in (pi / "boot/firmware/cmdline.txt").read_text()  # the data partition needs the room
    assert (pi / "tmp/gate-scanner-wheelhouse/gate-scanner-setup-chroot.sh").is_file()

    def gate_files(root: Path) -> dict[str, bytes]:
        found = {}
        for base in ("etc/systemd/system", "usr/local/sbin", "etc/systemd/system.conf.d",
                     "etc/systemd/journald.conf.d"):  # fmt: skip
            for path in (root / base).rglob("*"):
                if path.is_file() and "gate-scanner" in str(path.relative_to(root)):
                    found[str(path.relative_to(root))] = path.read_bytes()
        return found

    pi_files, debian_files = gate_files(pi), gate_files(debian)
    # Debian adds only what Raspberry Pi OS already has: SSH host keys made at first boot.
    assert set(debian_files) - set(pi_files) == {"etc/systemd/system/gate-scanner-sshkeys.service"}
    assert all(debian_files[name] == data for name, data in pi_files.items())
    assert fstab_entries(pi)["/var/lib/gate-scanner"] == fstab_entries(debian)["/var/lib/gate-scanner"]


def test_the_read_only_switch_edits_the_command_line_once(tmp_path: Path) -> None:
    boot = tmp_path / "boot/firmware"
    boot.mkdir(parents=True)
    (boot / "cmdline.txt").write_text(HOOK_CMDLINE)
    hooks = tmp_path / "etc/kernel/postinst.d"
    hooks.mkdir(parents=True)
    (hooks / "z50-raspi-firmware").write_text("")
    (tmp_path / "etc/default").mkdir()
    env = {**os.environ, "ROOT": str(tmp_path)}

    def switch(what: str) -> None:
        result = subprocess.run(["bash", str(READONLY), what], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr

    switch("enable")
    switch("enable")
    line = (boot / "cmdline.txt").read_text()
    assert line.count("\n") == 1 and line.split().count("overlayroot=tmpfs:recurse=0") == 1
    assert line.split()[:-1] == HOOK_CMDLINE.split()  # nothing else touched
    # raspi-firmware rebuilds cmdline.txt on a kernel update with this file's line appended.
    assert (tmp_path / "etc/default/raspi-extra-cmdline").read_text() == "overlayroot=tmpfs:recurse=0\n"
    switch("disable")
    assert (boot / "cmdline.txt").read_text().split() == HOOK_CMDLINE.split()
    assert (tmp_path / "etc/default/raspi-extra-cmdline").read_text().split() == []


def test_first_boot_installs_the_technicians_ssh_keys(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    root = tmp_path / "root"
    boot = root / "boot" / "firmware"
    boot.mkdir(parents=True)
    bundle = boot / "gate-scanner"
    make_bundle(tmp_path, bundle)
    (bundle / "authorized_keys").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFake technician\n")
    resum = (
        "sha256sum gate.toml ca.pem device.crt device.key subject.key authorized_keys lists/* > SHA256SUMS"
    )
    subprocess.run(["sh", "-c", resum], cwd=bundle, check=True)
    env = {**os.environ, "GATE_SCANNER": str(CLI), "SCANNER_USER": "root", "TECHNICIAN": "root"}
    result = subprocess.run(
        ["bash", str(FIRSTBOOT), "--root", str(root)], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    keys = root / "root/.ssh/authorized_keys"
    assert keys.read_text().startswith("ssh-ed25519 ") and stat.S_IMODE(keys.stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "root/.ssh").stat().st_mode) == 0o700


def test_the_data_partition_goes_after_the_root_not_before_the_boot_partition(tmp_path: Path) -> None:
    # /usr/sbin is not on a Debian user's PATH, and sfdisk lives there.
    sfdisk = shutil.which("sfdisk") or shutil.which("sfdisk", path="/usr/sbin:/sbin")
    if sfdisk is None:
        pytest.skip("sfdisk is not installed")
    # The layout of both images: 4 MiB free before the boot partition, then boot and root.
    card = tmp_path / "card.img"
    with card.open("wb") as f:
        f.truncate(64 * 2**20)
    layout = "label: dos\nstart=8192, size=16384, type=c\nstart=24576, size=32768, type=83\n"
    subprocess.run([sfdisk, "--quiet", str(card)], input=layout, text=True, check=True)
    env = {**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    result = subprocess.run(
        ["bash", str(FILES / "gate-scanner-datapart.sh"), "--dry-run", str(card)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    # 64 MiB card - 28 MiB used = 36 MiB at 28 MiB: below the 256 MiB minimum, so refused...
    assert result.returncode == 1 and "only 36 MiB free" in result.stderr
    with card.open("r+b") as f:
        f.truncate(512 * 2**20)
    result = subprocess.run(
        ["bash", str(FILES / "gate-scanner-datapart.sh"), "--dry-run", str(card)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    # ...and on a larger card it takes everything after the root, on a MiB boundary.
    assert result.returncode == 0, result.stderr
    assert "creating GATEDATA (484 MiB at sector 57344)" in result.stdout
