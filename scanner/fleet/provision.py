"""`gate-scanner provision`: one device bundle for the first-boot script (firmware/README.md).

The bundle is a directory (or, with ``--out NAME.tar``, a tar of the same files) that a
technician copies to the SD card's boot partition as ``gate-scanner/`` (or
``gate-scanner.tar``). ``firmware/files/gate-scanner-firstboot.sh`` installs it; the layout
below is the contract between the two, and tests/fleet/test_firmware.py round-trips it::

    gate.toml              → /etc/gate-scanner/gate.toml            0640 root:gate-scanner
    ca.pem                 → /etc/gate-scanner/ca.pem               0644
    device.crt             → /etc/gate-scanner/device.crt           0644
    device.key             → /var/lib/gate-scanner/keys/device.key  0600 gate-scanner   (secret)
    subject.key            → /var/lib/gate-scanner/subject.key      0600 gate-scanner   (secret, optional)
    lists/*                → /var/lib/gate-scanner/lists/*          0644 gate-scanner   (optional)
    SHA256SUMS             sha256sum -c list of every file above

Keys and lists go to the writable data partition (the root file system is read-only once
provisioned); ``gate.toml`` names the installed paths. The device certificate comes from the
fleet CA via :mod:`scanner.fleet.pki` (CN = device id, L = site: the broker's rules bind the
gate to both).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tarfile
import tomllib
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from scanner.config import ConfigError, from_table
from scanner.fleet import pki

ETC = "/etc/gate-scanner"
STATE = "/var/lib/gate-scanner"
SECRETS = ("device.key", "subject.key")
LISTS = {  # option → (file name in lists/, config key)
    "pass_trust": ("pass-trust.json", ("policy", "pass_trust_file")),
    "dcc_trust": ("dcc-trust.json", ("policy", "dcc_trust_file")),
    "revocation": ("revocation.txt", ("policy", "revocation_file")),
    "allowlist": ("allow.txt", ("policy", "allowlist_file")),
    "denylist": ("deny.txt", ("policy", "denylist_file")),
    "operator_keys": ("operator-keys.json", ("commands", "operator_keys_file")),
}


class ProvisionError(Exception):
    """Bad arguments or inputs: exit 2 with this message."""


def parse_broker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, 8883
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ProvisionError(f"--broker {text!r}: port must be 1-65535")
    return host, int(port)


def render_config(
    device: str,
    site: str,
    host: str,
    port: int,
    *,
    direction: str,
    lists: dict[str, str],
    subject_key: bool,
    delivery: str,
) -> str:
    sections: dict[str, list[str]] = {
        "device": [f'id = "{device}"', f'site = "{site}"', f'direction = "{direction}"'],
        "policy": [],
        "mqtt": [
            f'host = "{host}"',
            f"port = {port}",
            "tls = true",
            f'ca_file = "{ETC}/ca.pem"',
            f'cert_file = "{ETC}/device.crt"',
            f'key_file = "{STATE}/keys/device.key"',
        ],
        "storage": [f'dir = "{STATE}"', f'delivery = "{delivery}"'],
        "commands": [],
    }
    if subject_key:
        sections["storage"].append(f'subject_key_file = "{STATE}/subject.key"')
    for option, name in lists.items():
        section, key = LISTS[option][1]
        sections[section].append(f'{key} = "{STATE}/lists/{name}"')
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ")
    out = [f"# gate-scanner provision {stamp}: device {device} at site {site}. Installed by first boot."]
    for section, lines in sections.items():
        if lines:
            out += ["", f"[{section}]", *lines]
    return "\n".join(out) + "\n"


def make_bundle(
    ca_dir: Path,
    device: str,
    site: str,
    broker: str,
    out: Path,
    *,
    direction: str = "in",
    subject_key: Path | None = None,
    lists: dict[str, Path] | None = None,
    days: int = pki.DEFAULT_LEAF_DAYS,
    delivery: str = "collector",
) -> Path:
    """Write the bundle; returns its path. Reuses the device's key and certificate if the CA
    directory already holds them (re-provisioning a replaced SD card), else issues them."""

    host, port = parse_broker(broker)
    lists = {k: v for k, v in (lists or {}).items() if v is not None}
    for path in [*lists.values(), *([subject_key] if subject_key else [])]:
        if not path.is_file():
            raise ProvisionError(f"{path}: no such file")
    crt = ca_dir / "device" / f"{device}.crt"
    key = ca_dir / "device" / f"{device}.key"
    try:
        if not (crt.is_file() and key.is_file()):
            pki.issue_client(ca_dir, "device", device, site=site, days=days)
    except pki.PkiError as exc:
        raise ProvisionError(str(exc)) from None
    # The broker lets the gate write only under the site its certificate names: a bundle
    # for another site would give a gate whose every publish is refused.
    certified = pki.site_of(x509.load_pem_x509_certificate(crt.read_bytes()))
    if certified != site:
        what = f"is certified for site {certified!r}" if certified else "names no site"
        raise ProvisionError(
            f"{crt} {what}, not {site!r}: if the gate is at {site!r} now, "
            f"`gate-scanner pki device --dir {ca_dir} --id {device} --site {site} --renew`, "
            "then `pki dynsec` and restart the broker"
        )
    names = {option: LISTS[option][0] for option in lists}
    text = render_config(
        device,
        site,
        host,
        port,
        direction=direction,
        lists=names,
        subject_key=subject_key is not None,
        delivery=delivery,
    )
    # Validate what can be validated here: everything but the installed files' existence.

    table = tomllib.loads(text)
    for section, key_name in (
        ("mqtt", "ca_file"),
        ("mqtt", "cert_file"),
        ("mqtt", "key_file"),
        *[LISTS[o][1] for o in lists],
        ("storage", "subject_key_file"),
    ):
        table.get(section, {}).pop(key_name, None)
    table["mqtt"]["tls"] = False
    try:
        from_table(table)
    except ConfigError as exc:
        raise ProvisionError("; ".join(exc.problems)) from None
    files: dict[str, tuple[bytes, int]] = {
        "gate.toml": (text.encode(), 0o640),
        "ca.pem": ((ca_dir / "ca.crt").read_bytes(), 0o644),
        "device.crt": (crt.read_bytes(), 0o644),
        "device.key": (key.read_bytes(), 0o600),
    }
    if subject_key is not None:
        files["subject.key"] = (subject_key.read_bytes(), 0o600)
    for option, path in lists.items():
        files[f"lists/{names[option]}"] = (path.read_bytes(), 0o644)
    sums = "".join(
        f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, (data, _) in sorted(files.items())
    )
    files["SHA256SUMS"] = (sums.encode(), 0o644)
    if out.suffix == ".tar":
        _write_tar(out, files)
    else:
        _write_dir(out, files)
    return out


def _write_dir(out: Path, files: dict[str, tuple[bytes, int]]) -> None:
    if out.exists() and any(out.iterdir()):
        raise ProvisionError(f"{out} exists and is not empty: not mixing two bundles")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, (data, mode) in files.items():
        path = out / name
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, min(mode, 0o600))
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def _write_tar(out: Path, files: dict[str, tuple[bytes, int]]) -> None:
    if out.exists():
        raise ProvisionError(f"{out} exists: not overwriting a bundle")
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ca-dir", required=True, type=Path, help="fleet PKI directory (gate-scanner pki init-ca)"
    )
    p.add_argument("--id", required=True, help="device.id: also the certificate CN")
    p.add_argument("--site", required=True)
    p.add_argument("--broker", required=True, help="HOST[:PORT] the gate connects to (default port 8883)")
    p.add_argument("--out", required=True, type=Path, help="bundle directory, or NAME.tar")
    p.add_argument("--direction", choices=("in", "out"), default="in")
    p.add_argument("--subject-key", type=Path, help="the deployment's pseudonym key (same on every gate)")
    p.add_argument("--pass-trust", type=Path, help="pass trust store JSON")
    p.add_argument("--dcc-trust", type=Path, help="EU DCC trust list JSON")
    p.add_argument("--revocation", type=Path, help="revocation list")
    p.add_argument("--allowlist", type=Path)
    p.add_argument("--denylist", type=Path)
    p.add_argument("--operator-keys", type=Path, help="operator keys that may sign commands")
    p.add_argument("--days", type=int, default=pki.DEFAULT_LEAF_DAYS, help="certificate validity if issued")


def main(args: argparse.Namespace) -> int:
    lists = {option: getattr(args, option) for option in LISTS}
    try:
        out = make_bundle(
            args.ca_dir,
            args.id,
            args.site,
            args.broker,
            args.out,
            direction=args.direction,
            subject_key=args.subject_key,
            lists=lists,
            days=args.days,
        )
    except (ProvisionError, OSError) as exc:
        print(f"gate-scanner provision: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {out}: copy it to the SD card's boot partition as "
        f"gate-scanner{'.tar' if out.suffix == '.tar' else '/'} (it holds the device key: delete it after)"
    )
    if args.subject_key is None:
        print("note: no --subject-key: this gate makes its own, so its pseudonyms differ from other gates'")
    return 0


__all__ = ["SECRETS", "make_bundle"]
