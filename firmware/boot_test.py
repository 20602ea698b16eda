"""Boots the Debian gate image in qemu-system-aarch64 and checks what a technician relies on.

Run through ``firmware/boot-test.sh OUT.img`` (it checks the tools and picks the Python). No
keyboard input: the test reads the serial console, a TLS mosquitto it starts on a free
127.0.0.1 port, and, once the gate is provisioned, SSH through QEMU's user-mode network.

QEMU's ``virt`` board is not a Pi: there is no VideoCore firmware to read ``config.txt`` and
``cmdline.txt``, so this script plays its part. It reads the kernel and initramfs names from
``config.txt`` on the image's FAT partition, copies those files out and starts them with
``-kernel``/``-initrd`` and the FAT's ``cmdline.txt`` (plus the virt board's serial console),
at every power-on, so the command line first boot writes there takes effect as on a Pi.
The guest reaches the broker at 10.0.2.100:8883 through ``guestfwd`` (one ``socat`` to the
host's 127.0.0.1 per connection) and the test reaches the guest's SSH through ``hostfwd`` on
127.0.0.1; ``restrict=on`` cuts the guest off from everything else.

The bundle is made by ``gate-scanner provision``; for a machine with no camera and no pins the
test then adds ``[camera] source = "dir:…"`` (replayed demo frames it puts on the FAT
partition) and ``[gpio] pin_factory = "mock"`` to its gate.toml, plus the test's throwaway SSH
key as ``authorized_keys``, and re-writes SHA256SUMS. Nothing else is changed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from scanner.fleet import pki
from scanner.sim import synth
from scanner.sim.demo import ALLOWED, DENIED, SCENES, demo_passes
from scanner.sim.localbroker import LocalBroker, free_port

DEVICE, SITE = "gate-qemu", "lab"
GUEST_BROKER = ("10.0.2.100", 8883)
FRAMES_DIR = "gate-scanner-frames"  # on the FAT partition: /boot/firmware/gate-scanner-frames
FPS = 10.0
TAIL_S = 40.0  # empty frames after the scenes: the gate keeps running while it is measured
REPO = Path(__file__).resolve().parent.parent
LOOP = "import time; t = time.perf_counter(); sum(range(3_000_000)); print(time.perf_counter() - t)"
started = time.monotonic()


def say(text: str) -> None:
    print(f"[boot-test {time.monotonic() - started:6.1f}s] {text}", flush=True)


class Failed(AssertionError):
    pass


def check(ok: object, what: str) -> None:
    if not ok:
        raise Failed(what)
    say(f"ok: {what}")


# --------------------------------------------------------------------------- the disk image


class Disk:
    """The image's partitions, read and written with mtools and sfdisk (no loop mounts)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        table = json.loads(
            subprocess.run(["sfdisk", "--json", str(path)], capture_output=True, text=True, check=True).stdout
        )
        parts = table["partitiontable"]["partitions"]
        self.fat_offset = parts[0]["start"] * 512

    @property
    def fat(self) -> str:
        return f"{self.path}@@{self.fat_offset}"

    def mtools(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
        return subprocess.run(args, capture_output=True, text=True, check=check, env=env)

    def read(self, name: str) -> str:
        return self.mtools("mtype", "-i", self.fat, f"::{name}").stdout

    def copy_out(self, name: str, dest: Path) -> None:
        self.mtools("mcopy", "-o", "-n", "-i", self.fat, f"::{name}", str(dest))

    def copy_in(self, src: Path, name: str) -> None:
        self.mtools("mcopy", "-s", "-o", "-i", self.fat, str(src), f"::{name}")

    def remove_tree(self, name: str) -> None:
        self.mtools("mdeltree", "-i", self.fat, f"::{name}", check=False)

    def listing(self) -> list[str]:
        out = self.mtools("mdir", "-b", "-i", self.fat, "::/").stdout
        return sorted(line.rstrip("/").split("/")[-1] for line in out.splitlines() if line.strip())


# --------------------------------------------------------------------------- host side


def make_inputs(work: Path) -> dict[str, Any]:
    """Fleet PKI, lists, passes, replay frames and the bundle from `gate-scanner provision`."""
    ca = work / "fleet-pki"
    pki.init_ca(ca)
    pki.issue_server(ca, "broker.test", ips=(GUEST_BROKER[0], "127.0.0.1"))
    pki.issue_client(ca, "operator", "operator")
    lists = work / "lists"
    lists.mkdir()
    passes = demo_passes(lists)
    (lists / "allow.txt").write_text("# version: 1\n" + "\n".join(ALLOWED) + "\n")
    (lists / "deny.txt").write_text("# version: 1\n" + "\n".join(DENIED) + "\n")
    (work / "subject.key").write_bytes(os.urandom(32))

    frames = work / FRAMES_DIR
    scenes = [(name, p.format(**passes) if isinstance(p, str) else p) for name, p in SCENES]
    paths = synth.demo_frames(frames, scenes, fps=FPS)
    # The tail: the scene's background with nothing held up, as JPEG to keep the FAT small.
    empty = cv2.imread(str(paths[-1]), cv2.IMREAD_GRAYSCALE)
    rng = np.random.default_rng(5)
    for i in range(int(TAIL_S * FPS)):
        noisy = np.clip(empty.astype(np.int16) + rng.integers(-2, 3, empty.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(frames / f"{len(paths) + i:05d}.jpg"), noisy, [cv2.IMWRITE_JPEG_QUALITY, 85])

    bundle = work / "bundle"
    cmd = [
        sys.executable, "-m", "scanner", "provision", "--ca-dir", str(ca), "--id", DEVICE,
        "--site", SITE, "--broker", f"{GUEST_BROKER[0]}:{GUEST_BROKER[1]}", "--out", str(bundle),
        "--subject-key", str(work / "subject.key"), "--pass-trust", str(lists / "pass-trust.json"),
        "--allowlist", str(lists / "allow.txt"), "--denylist", str(lists / "deny.txt"),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    key = work / "ssh" / "id_ed25519"
    key.parent.mkdir(mode=0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    with (bundle / "gate.toml").open("a") as toml:
        toml.write(
            "\n# boot test only: QEMU has no camera and no GPIO\n"
            f'[camera]\nsource = "dir:/boot/firmware/{FRAMES_DIR}"\nfps = {FPS}\n'
            '\n[gpio]\npin_factory = "mock"\nrelay_pulse_s = 0.5\n'
        )
    shutil.copy(key.with_suffix(".pub"), bundle / "authorized_keys")
    resum(bundle)
    tampered = work / "bundle-tampered"
    shutil.copytree(bundle, tampered)
    with (tampered / "gate.toml").open("a") as toml:
        toml.write("# one byte too many\n")
    return {"ca": ca, "bundle": bundle, "tampered": tampered, "frames": frames, "ssh_key": key,
            "scenes": len(scenes)}  # fmt: skip


def resum(bundle: Path) -> None:
    names = sorted(
        str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file() and p.name != "SHA256SUMS"
    )
    sums = subprocess.run(["sha256sum", *names], cwd=bundle, check=True, capture_output=True, text=True)
    (bundle / "SHA256SUMS").write_text(sums.stdout)


class Subscriber:
    """The operator's view: every message under the gate's topics, with the host's time."""

    def __init__(self, ca: Path, port: int) -> None:
        self.messages: list[tuple[float, str, bytes]] = []
        self.lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="boot-test-operator",
                                  protocol=mqtt.MQTTv5)  # fmt: skip
        self.client.tls_set(
            ca_certs=str(ca / "ca.crt"),
            certfile=str(ca / "operator" / "operator.crt"),
            keyfile=str(ca / "operator" / "operator.key"),
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
        self.client.on_connect = lambda c, *_: c.subscribe(f"gate/{SITE}/{DEVICE}/#", qos=1)
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not ready.wait(20):
            raise Failed("the host subscriber could not subscribe to the test broker")

    def _message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((time.monotonic(), message.topic, bytes(message.payload)))

    def checkins(self, since: float = 0.0) -> list[tuple[float, dict[str, Any]]]:
        with self.lock:
            return [
                (t, json.loads(p))
                for t, topic, p in self.messages
                if topic.endswith("/checkin") and t >= since
            ]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# --------------------------------------------------------------------------- the guest


class Guest:
    """One power-on of the image in QEMU, its serial console captured line by line."""

    def __init__(self, disk: Disk, work: Path, name: str, *, mqtt_port: int, ssh_port: int,
                 ssh_key: Path) -> None:  # fmt: skip
        self.disk, self.work, self.name = disk, work, name
        self.ssh_port, self.ssh_key = ssh_port, ssh_key
        self.console_path = work / f"console-{name}.log"
        self.lines: list[tuple[float, str]] = []
        self.partial = ""
        self.lock = threading.Lock()
        kernel, initrd, cmdline = self.boot_files()
        self.cmdline = cmdline
        self.monitor = work / f"monitor-{name}.sock"
        forward = f"cmd:socat - TCP:127.0.0.1:{mqtt_port}"
        netdev = (
            f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{ssh_port}-:22,"
            f"guestfwd=tcp:{GUEST_BROKER[0]}:{GUEST_BROKER[1]}-{forward}"
        )
        self.argv = [
            "qemu-system-aarch64", "-M", "virt", "-cpu", os.environ.get("QEMU_CPU", "cortex-a53"),
            "-smp", os.environ.get("QEMU_SMP", "2"), "-m", "512", "-accel", "tcg,thread=multi",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
            "-drive", f"file={disk.path},format=raw,if=none,id=card,cache=unsafe",
            "-device", "virtio-blk-pci,drive=card",
            "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0",
            "-device", "virtio-rng-pci",
            # The virt board's stand-in for the Pi's SoC watchdog: systemd's RuntimeWatchdogSec
            # arms it, and a hung guest is reset as a Pi would be.
            "-device", "i6300esb", "-action", "watchdog=reset",
            "-serial", "stdio", "-monitor", f"unix:{self.monitor},server,nowait",
        ]  # fmt: skip
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)  # fmt: skip
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        say(f"{name}: qemu started (append: {cmdline})")

    def boot_files(self) -> tuple[Path, Path, str]:
        config = self.disk.read("config.txt")
        kernel = re.search(r"^kernel=(\S+)", config, re.M)
        initrd = re.search(r"^initramfs\s+(\S+)", config, re.M)
        if kernel is None or initrd is None:
            raise Failed(f"config.txt names no kernel= or initramfs line:\n{config}")
        out = self.work / "boot"
        out.mkdir(exist_ok=True)
        self.disk.copy_out(kernel.group(1), out / "kernel")
        self.disk.copy_out(initrd.group(1), out / "initrd")
        cmdline = self.disk.read("cmdline.txt").strip()
        # The virt board's UART is a PL011 (ttyAMA0); the last console= is /dev/console.
        return out / "kernel", out / "initrd", f"{cmdline} console=ttyAMA0,115200"

    def _read(self) -> None:
        # Chunks, not lines: a login prompt ends without a newline and must still be seen.
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        pending = b""
        with self.console_path.open("wb") as log:
            while chunk := os.read(fd, 4096):
                log.write(chunk)
                log.flush()
                pending += chunk
                *done, pending = pending.split(b"\n")
                now = time.monotonic()
                with self.lock:
                    self.lines.extend((now, raw.decode("utf-8", "replace").rstrip()) for raw in done)
                    self.partial = pending.decode("utf-8", "replace")

    def wait_console(self, pattern: str, timeout: float) -> tuple[float, str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            with self.lock:
                new = self.lines[seen:]
                seen = len(self.lines)
            for t, line in new:
                if regex.search(line):
                    return t, line
            with self.lock:
                partial = self.partial
            if partial and regex.search(partial):
                return time.monotonic(), partial
            if self.proc.poll() is not None and seen == len(self.lines):
                break
            time.sleep(0.2)
        raise Failed(f"{self.name}: no console line matching {pattern!r} in {timeout:.0f} s "
                     f"(see {self.console_path})")  # fmt: skip

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise Failed(f"{self.name}: the guest did not power off or reboot in {timeout:.0f} s") from None

    def power_button(self) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.monitor))
            s.sendall(b"system_powerdown\n")
            time.sleep(0.5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def ssh(self, command: str, timeout: float = 300, check: bool = True) -> str:
        argv = [
            "ssh", "-q", "-i", str(self.ssh_key), "-p", str(self.ssh_port), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={self.work / 'known_hosts'}",
            "-o", "ConnectTimeout=20", "technician@127.0.0.1", command,
        ]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise Failed(f"ssh {command!r} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def wait_ssh(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                if self.ssh("true", timeout=60, check=False) == "" and self._ssh_ok():
                    return
            time.sleep(3)
        raise Failed(f"{self.name}: no SSH login within {timeout:.0f} s")

    def _ssh_ok(self) -> bool:
        try:
            return self.ssh("echo up", timeout=60, check=False).strip() == "up"
        except subprocess.TimeoutExpired:
            return False


PROBE = Path(__file__).with_name("boot-test-probe.sh")


def probe(guest: Guest) -> dict[str, Any]:
    # What the test asks the running gate, in one SSH round trip (TCG makes each one slow).
    text = guest.ssh("sudo sh -s <<'PROBE'\n" + PROBE.read_text() + "\nPROBE")
    return json.loads(text)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise Failed(f"timed out after {timeout:.0f} s waiting for {what}")


@contextlib.contextmanager
def broker(work: Path, ca: Path) -> Iterator[LocalBroker]:
    # The production listener settings (deploy/mosquitto): TLS with a client certificate, its CN
    # as the user name and client id, and the fleet's dynamic-security rules as `gate-scanner
    # pki dynsec` writes them from the PKI directory, on a free loopback port.
    rules = work / "dynamic-security.json"
    pki.write_dynsec(ca, rules, prefix="gate")
    shipped = (REPO / "deploy" / "mosquitto" / "gate-scanner.conf").read_text()
    plugin = re.search(r"^plugin (\S+)$", shipped, flags=re.M)
    if plugin is None:
        raise Failed("the shipped broker config names no plugin")
    extra = "\n".join([
        f"cafile {ca / 'ca.crt'}",
        f"certfile {ca / 'server' / 'broker.test.crt'}",
        f"keyfile {ca / 'server' / 'broker.test.key'}",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        f"plugin {plugin[1]}",
        f"plugin_opt_config_file {rules}",
    ])  # fmt: skip
    b = LocalBroker(work / "broker", extra_config=extra).start()
    try:
        yield b
    finally:
        b.stop()


# --------------------------------------------------------------------------- the run


def run(image: Path, work: Path, card_mib: int) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    disk_path = work / "card.img"
    say(f"copying {image} to {disk_path} and growing it to a {card_mib} MiB card")
    subprocess.run(["cp", "--sparse=always", str(image), str(disk_path)], check=True)
    os.truncate(disk_path, max(card_mib * 2**20, disk_path.stat().st_size))
    disk = Disk(disk_path)
    inputs = make_inputs(work)
    disk.copy_in(inputs["frames"], FRAMES_DIR)
    disk.copy_in(inputs["tampered"], "gate-scanner")
    ssh_port = free_port()
    with broker(work, inputs["ca"]) as b:
        subscriber = Subscriber(inputs["ca"], b.port)
        try:
            guest_args = {"mqtt_port": b.port, "ssh_port": ssh_port, "ssh_key": inputs["ssh_key"]}

            # 1. A tampered bundle: refused, kept, and the console says why.
            a = Guest(disk, work, "1-tampered", **guest_args)
            t, line = a.wait_console(r"gate-scanner-firstboot: FAILED: .*SHA256SUMS", 900)
            figures["tampered_refused_s"] = round(t - a.started, 1)
            check(True, f"tampered bundle refused on the console: {line.strip()}")
            a.wait_console(r"gate login:", 600)
            # No login on an unprovisioned gate: the power button (virt's GPIO key, handled
            # by systemd-logind) shuts it down cleanly, as a short press would a Pi's.
            a.power_button()
            a.wait_exit(300)
            listing = disk.listing()
            check("gate-scanner" in listing, "the refused bundle stays on the boot partition")
            check(
                "FAILED" in disk.read("gate-scanner-provision.log"), "the provisioning log names the failure"
            )
            check(not subscriber.checkins(), "an unprovisioned gate published nothing")

            # 2. The technician copies the bundle again: first boot installs it and reboots.
            disk.remove_tree("gate-scanner")
            disk.copy_in(inputs["bundle"], "gate-scanner")
            b2 = Guest(disk, work, "2-first-boot", **guest_args)
            b2.wait_console(r"gate-scanner-firstboot: provisioned; secrets removed", 900)
            b2.wait_exit(600)
            figures["first_boot_s"] = round(time.monotonic() - b2.started, 1)
            listing = disk.listing()
            check("gate-scanner" not in listing and "gate-scanner.tar" not in listing,
                  f"the bundle (device key) is gone from the boot partition: {listing}")  # fmt: skip
            log = disk.read("gate-scanner-provision.log")
            check("BEGIN" not in log and "provisioned" in log, "the provisioning log stays, without secrets")
            check(
                "overlayroot=tmpfs" in disk.read("cmdline.txt"), "cmdline.txt now asks for the read-only root"
            )

            # 3. The provisioned gate: replayed frames, check-ins on the host, then a look inside.
            c = Guest(disk, work, "3-gate", **guest_args)
            wait_for(lambda: len(subscriber.checkins(c.started)) >= 1, 900, "the first check-in")
            first = subscriber.checkins(c.started)[0][0]
            figures["power_on_to_first_checkin_s"] = round(first - c.started, 1)
            figures["first_card_power_on_to_first_checkin_s"] = round(first - b2.started, 1)
            wait_for(
                lambda: len(subscriber.checkins(c.started)) >= inputs["scenes"], 300, "every scene's check-in"
            )
            got = subscriber.checkins(c.started)
            say("check-ins: " + ", ".join(f"seq {e['seq']} {e['decision']}/{e['reason']}" for _, e in got))
            c.wait_ssh(300)
            inside = probe(c)
            say("inside: " + json.dumps(inside))
            check(inside["memory"], "the gate's processes are running while measured")
            figures["tree_rss_mb"] = round(sum(p["rss_kb"] for p in inside["memory"]) / 1024, 1)
            figures["tree_pss_mb"] = round(sum(p["pss_kb"] for p in inside["memory"]) / 1024, 1)
            figures["processes"] = inside["memory"]
            figures["guest_mem_total_mb"] = inside["mem_total_kb"] // 1024
            figures["guest_mem_available_mb"] = inside["mem_available_kb"] // 1024
            check(len(inside["memory"]) == 2, "daemon plus one isolated decoder process, nothing else")
            check(inside["started_line"] == "1", 'systemd saw READY=1 ("Started gate-scanner.service")')
            modes = inside["modes"]
            want = {
                "/etc/gate-scanner/gate.toml": "640 root:gate-scanner",
                "/etc/gate-scanner/ca.pem": "644 root:root",
                "/etc/gate-scanner/device.crt": "644 root:root",
                "/var/lib/gate-scanner": "700 gate-scanner:gate-scanner",
                "/var/lib/gate-scanner/keys/device.key": "600 gate-scanner:gate-scanner",
                "/var/lib/gate-scanner/subject.key": "600 gate-scanner:gate-scanner",
                "/var/lib/gate-scanner/lists/pass-trust.json": "644 gate-scanner:gate-scanner",
            }
            check(modes == want, f"installed with the right modes: {modes}")
            check(inside["firstboot_enabled"] == "disabled", "first boot disabled itself")
            check(inside["root"].startswith("overlay"), f"/ is the RAM overlay: {inside['root']}")
            check(" ro" in " " + inside["lower"].replace(",", " ") and "ext4" in inside["lower"],
                  f"the card's root is mounted read-only underneath: {inside['lower']}")  # fmt: skip
            check(inside["data_label"] == "GATEDATA" and "rw" in inside["data"].split()[-1].split(","),
                  f"the data partition is GATEDATA, read-write: {inside['data']}")  # fmt: skip
            check(
                inside["data_mib"] > (card_mib - 1500),
                f"the data partition fills the card: {inside['data_mib']} MiB",
            )
            wd = inside["watchdog"]
            check(wd["state"] == "active" and wd["runtime"] == "15s",
                  f"systemd feeds the hardware watchdog: {wd}")  # fmt: skip
            c.ssh("echo boot3 | sudo tee /gate-scanner-boot-test-marker >/dev/null")
            wait_for(lambda: "inactive" in c.ssh("systemctl is-active gate-scanner.service", check=False),
                     TAIL_S + 120, "the replay to end")  # fmt: skip
            t0 = time.monotonic()
            selftest = c.ssh("sudo gate-scanner selftest --config /etc/gate-scanner/gate.toml --unattended",
                             check=False, timeout=600)  # fmt: skip
            figures["selftest_s"] = round(time.monotonic() - t0, 1)
            figures["selftest"] = selftest.strip().splitlines()
            say("selftest:\n" + selftest)
            check(
                "FAILED" not in selftest and "checks passed" in selftest,
                "selftest --unattended passes in the guest",
            )
            # How much slower than this host's own x86 core the emulated Cortex-A53 is, for
            # estimating a Pi from these timings (the same pure-Python loop on both).
            guest_s = float(c.ssh(f"python3 -c '{LOOP}'").strip())
            host = subprocess.run([sys.executable, "-c", LOOP], capture_output=True, text=True, check=True)
            host_s = float(host.stdout)
            figures["python_loop_guest_s"] = round(guest_s, 3)
            figures["python_loop_host_s"] = round(host_s, 3)
            seq_before = max(e["seq"] for _, e in subscriber.checkins(c.started))
            ids_before = {e["event_id"] for _, e in subscriber.checkins(c.started)}
            subjects_before = {e["credential"].get("subject") for _, e in subscriber.checkins(c.started)}
            c.ssh("sudo systemctl reboot", check=False, timeout=60)
            c.wait_exit(600)

            # 4. The second boot: nothing provisioned again, outbox and keys kept, root as shipped.
            d = Guest(disk, work, "4-second-boot", **guest_args)
            wait_for(lambda: any(e["seq"] > seq_before for _, e in subscriber.checkins(d.started)), 900,
                     "a check-in after the reboot")  # fmt: skip
            figures["second_boot_power_on_to_first_checkin_s"] = round(
                min(t for t, e in subscriber.checkins(d.started) if e["seq"] > seq_before) - d.started, 1
            )
            d.wait_ssh(300)
            again = probe(d)
            check(again["keys"] == inside["keys"], "the device key and pseudonym key survived the reboot")
            check(again["marker"] == "absent", "a file written to / vanished: the root stayed read-only")
            check(again["firstboot_ran_this_boot"] in ("0", ""), "first boot did not run again")
            check(disk.read("gate-scanner-provision.log").count("provisioned;") == 1,
                  "the provisioning log shows one provisioning")  # fmt: skip
            after = subscriber.checkins(d.started)
            new = [e for _, e in after if e["event_id"] not in ids_before]
            check(new and min(e["seq"] for e in new) > seq_before,
                  "new check-ins continue above the first boot's seq: the outbox state survived")  # fmt: skip
            check({e["credential"].get("subject") for e in new} & subjects_before,
                  "the same codes give the same pseudonyms (subject key kept)")  # fmt: skip
            d.ssh("sudo systemctl poweroff", check=False, timeout=60)
            d.wait_exit(300)
        finally:
            subscriber.close()
            for guest in [g for g in locals().values() if isinstance(g, Guest)]:
                guest.kill()
    return figures


def main() -> int:
    # A stopped test must not leave a guest or a broker behind: SIGTERM unwinds like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/gate-scanner-boot-test"))
    parser.add_argument("--card-mib", type=int, default=4096, help="grow the copy to this card size")
    args = parser.parse_args()
    try:
        figures = run(args.image.resolve(), args.work, args.card_mib)
    except Failed as exc:
        say(f"FAILED: {exc}")
        return 1
    say("figures: " + json.dumps(figures, indent=1))
    (args.work / "figures.json").write_text(json.dumps(figures, indent=1))
    say("boot test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
