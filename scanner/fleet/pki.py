"""`gate-scanner pki`: a small fleet PKI for the central broker and its gates.

One CA signs the broker's server certificate and one client certificate per identity.
mosquitto's ``use_identity_as_username`` takes the client certificate's CN as the MQTT user
name (and ``use_username_as_clientid`` as the client id), so a device certificate's CN is
exactly the device id (``device.id`` in the gate's config). A device certificate also names
the gate's site (subject L = ``device.site``): ``pki dynsec`` turns the certificates in this
directory into the broker's access rules (:mod:`scanner.fleet.dynsec`), and a gate may write
only under its own ``{prefix}/{site}/{device}/``. The directory is the one list of who may
connect and as what; a revoked identity leaves it (to ``revoked/``) and so leaves the rules.

Layout under ``--dir``::

    ca.crt  ca.key                      the fleet CA (keep ca.key offline)
    server/HOST.crt  server/HOST.key    the broker
    device/ID.crt    device/ID.key      one per gate: CN = device id, L = its site
    operator/ID.crt  operator/ID.key    monitor and command senders
    collector/ID.crt collector/ID.key   the central ingest

    revoked.json  crl.pem               revoked identities, and the CRL for mosquitto's crlfile
    revoked/                            their retired certificates and keys

Keys are EC P-256, PEM, created 0600 with O_EXCL: an existing key is never overwritten
(``--renew`` issues a new certificate for the key already on disk).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from scanner.config import NAME
from scanner.fleet import dynsec

# Same rule as device.id in the config: a safe topic segment, and never '+', '#' or '/',
# which would turn a topic in the broker's rules into a wildcard.
CLIENT_ROLES = ("device", "operator", "collector")
# The shipped broker rules give these user names fleet-wide rights: a gate must never be one.
RESERVED_IDS = frozenset({"operator", "collector"})
# `collect` publishes its status under {prefix}/collector/NAME/: a gate's site must not be it,
# or a gate whose id equals a collector's name could write that collector's status.
RESERVED_SITES = frozenset({"collector"})
# A Pi without a real-time clock may boot a little behind; certificates are valid from
# an hour before issue so that a freshly issued one is not "not yet valid" there.
BACKDATE = dt.timedelta(hours=1)
DEFAULT_CA_DAYS = 3650
DEFAULT_LEAF_DAYS = 825
# OpenSSL refuses every client once the CRL is past its next update: long, and refreshed
# with `pki crl` well before (the CA key is offline, so this is a planned chore).
DEFAULT_CRL_DAYS = 365


class PkiError(Exception):
    """A refusal (existing key, name collision, missing CA) with a message for the operator."""


@dataclass(frozen=True, slots=True)
class Issued:
    """What one command wrote: paths, and whether the key is new or was reused."""

    cert: Path
    key: Path
    key_created: bool


def site_of(cert: x509.Certificate) -> str | None:
    """The site a device certificate binds its gate to (subject L), or None (issued before sites)."""
    names = cert.subject.get_attributes_for_oid(NameOID.LOCALITY_NAME)
    return str(names[0].value) if names else None


def _common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # O_EXCL: never replace a key that may already be deployed; 0600 from the first byte.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PkiError(f"{path} already exists: not overwriting a key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tmp.chmod(0o644)
    os.replace(tmp, path)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path}: not an EC private key")
    return key


def _load_ca(root: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    crt, key = root / "ca.crt", root / "ca.key"
    if not crt.is_file() or not key.is_file():
        raise PkiError(f"no CA in {root}: run `gate-scanner pki init-ca --dir {root}` first")
    return x509.load_pem_x509_certificate(crt.read_bytes()), _load_key(key)


def _check_name(name: str, what: str) -> None:
    if not NAME.fullmatch(name):
        raise PkiError(f"{what} {name!r}: use 1-64 letters, digits, '_', '-', '.' (as device.id)")


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise PkiError(f"--days {days}: must be at least 1")
    now = dt.datetime.now(dt.UTC)
    return now - BACKDATE, now + dt.timedelta(days=days)


def init_ca(root: Path, *, name: str = "gate-scanner fleet CA", days: int = DEFAULT_CA_DAYS) -> Issued:
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    crt, key_path = root / "ca.crt", root / "ca.key"
    if key_path.exists() or crt.exists():
        raise PkiError(f"{root} already holds a CA (ca.key/ca.crt): not overwriting it")
    key = _new_key()
    start, end = _validity(days)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    _write_cert(crt, cert)
    return Issued(crt, key_path, True)


def _issue(
    root: Path,
    folder: str,
    name: str,
    *,
    server: bool,
    sans: list[x509.GeneralName],
    days: int,
    renew: bool,
    org_unit: str,
    site: str | None = None,
) -> Issued:
    ca_cert, ca_key = _load_ca(root)
    start, end = _validity(days)
    out = root / folder
    out.mkdir(mode=0o755, exist_ok=True)
    crt, key_path = out / f"{name}.crt", out / f"{name}.key"
    if key_path.exists():
        if not renew:
            raise PkiError(f"{key_path} already exists: not overwriting it (--renew re-certifies that key)")
        key, created = _load_key(key_path), False
    else:
        if renew:
            raise PkiError(f"--renew: no key at {key_path}")
        key, created = _new_key(), True
    subject = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, org_unit)]
    if site is not None:
        subject.append(x509.NameAttribute(NameOID.LOCALITY_NAME, site))
    # The CN last: mosquitto takes the first CN, and tools show it at the end of the line.
    subject.append(x509.NameAttribute(NameOID.COMMON_NAME, name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(start, ca_cert.not_valid_before.replace(tzinfo=dt.UTC)))
        .not_valid_after(min(end, ca_cert.not_valid_after.replace(tzinfo=dt.UTC)))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    if created:
        _write_key(key_path, key)
    _write_cert(crt, cert)
    return Issued(crt, key_path, created)


def issue_server(
    root: Path,
    host: str,
    *,
    ips: tuple[str, ...] = (),
    extra_hosts: tuple[str, ...] = (),
    days: int = DEFAULT_LEAF_DAYS,
    renew: bool = False,
) -> Issued:
    """The broker's certificate: clients check ``host`` (and any ``ips``) against its SANs."""
    _check_name(host, "--host")
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in (host, *extra_hosts)]
    for ip in ips:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise PkiError(f"--ip {ip!r}: not an IP address") from None
    return _issue(
        root, "server", host, server=True, sans=sans, days=days, renew=renew, org_unit="gate-scanner broker"
    )


def issue_client(
    root: Path,
    role: str,
    name: str,
    *,
    site: str | None = None,
    days: int = DEFAULT_LEAF_DAYS,
    renew: bool = False,
) -> Issued:
    """A client certificate with CN = ``name``: the MQTT user name the broker's rules see.

    A device's certificate also names its ``site``; ``renew`` without one keeps the site the
    current certificate names.
    """
    if role not in CLIENT_ROLES:
        raise PkiError(f"unknown role {role!r}")
    _check_name(name, "--id")
    if role == "device" and name in RESERVED_IDS:
        raise PkiError(f"--id {name!r}: reserved for the {name} identity in the broker rules")
    if site is not None:
        if role != "device":
            raise PkiError("--site: only a device (gate) certificate names a site")
        _check_name(site, "--site")
        if site in RESERVED_SITES:
            raise PkiError(f"--site {site!r}: reserved for the collectors' status topics")
    elif role == "device" and renew and (root / role / f"{name}.crt").is_file():
        site = site_of(x509.load_pem_x509_certificate((root / role / f"{name}.crt").read_bytes()))
    # The CN is the whole identity: the same name in two roles would share its broker rights.
    for other in CLIENT_ROLES:
        if other != role and (root / other / f"{name}.crt").exists():
            raise PkiError(f"--id {name!r} is already issued as a {other}; identities must be unique")
    return _issue(
        root,
        role,
        name,
        server=False,
        sans=[],
        days=days,
        renew=renew,
        org_unit=f"gate-scanner {role}",
        site=site,
    )


@dataclass(frozen=True, slots=True)
class Identity:
    """One client certificate in the directory: what the broker's rules are made from."""

    role: str
    name: str
    site: str | None  # devices only; None for a device certificate issued before sites


def identities(root: Path) -> list[Identity]:
    """Every client identity with a certificate in ``root`` (revoked ones have moved out)."""
    found = []
    for role in CLIENT_ROLES:
        for crt in sorted((root / role).glob("*.crt")):
            cert = x509.load_pem_x509_certificate(crt.read_bytes())
            name = _common_name(cert)
            if name != crt.stem:
                raise PkiError(f"{crt}: its CN is {name!r}, not {crt.stem!r}: not issued by this tool")
            found.append(Identity(role, name, site_of(cert) if role == "device" else None))
    return found


def write_dynsec(root: Path, out: Path, *, prefix: str) -> list[Identity]:
    """Write the broker's rules for every identity in ``root`` to ``out``; returns them.

    Refuses (writing nothing) while a device certificate names no site: the broker would
    give that gate no rights at all, and it would stop reporting without a word.
    """
    _check_name(prefix, "--prefix")
    found = identities(root)
    unsited = [i.name for i in found if i.role == "device" and i.site is None]
    if unsited:
        raise PkiError(
            f"device certificates with no site: {', '.join(unsited)}; certify each for its site with "
            f"`gate-scanner pki device --dir {root} --id ID --site SITE --renew`"
        )
    rules = dynsec.rules(
        [(i.name, i.site) for i in found if i.role == "device" and i.site is not None],
        collectors=[i.name for i in found if i.role == "collector"],
        operators=[i.name for i in found if i.role == "operator"],
        prefix=prefix,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(rules, indent=1) + "\n", encoding="utf-8")
    tmp.chmod(0o644)
    os.replace(tmp, out)
    return found


def revoke(root: Path, role: str, name: str, *, crl_days: int = DEFAULT_CRL_DAYS) -> Path:
    """Revoke ``role/name``: record its serial, retire its files, rewrite ``crl.pem``.

    The retired key and certificate move to ``revoked/`` so that the name can be issued
    again with a fresh key (the old one must be presumed stolen).
    """
    if role not in (*CLIENT_ROLES, "server"):
        raise PkiError(f"unknown role {role!r}")
    _check_name(name, "--id")
    crt, key = root / role / f"{name}.crt", root / role / f"{name}.key"
    if not crt.is_file():
        raise PkiError(f"no certificate {crt} to revoke")
    _load_ca(root)  # fail before touching anything if the CA is not here
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    records = _revoked(root)
    records.append(
        {
            "serial": format(cert.serial_number, "x"),
            "role": role,
            "id": name,
            "revoked": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
    )
    retired = root / "revoked"
    retired.mkdir(mode=0o700, exist_ok=True)
    stem = f"{role}-{name}-{cert.serial_number:x}"
    _write_revoked(root, records)
    os.replace(crt, retired / f"{stem}.crt")
    if key.exists():
        os.replace(key, retired / f"{stem}.key")
    return write_crl(root, days=crl_days)


def write_crl(root: Path, *, days: int = DEFAULT_CRL_DAYS) -> Path:
    """(Re)write ``crl.pem`` from ``revoked.json``, valid for ``days``."""
    if days < 1:
        raise PkiError(f"--crl-days {days}: must be at least 1")
    ca_cert, ca_key = _load_ca(root)
    now = dt.datetime.now(dt.UTC)
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - BACKDATE)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(aki, critical=False)
    )
    for record in _revoked(root):
        revoked_at = dt.datetime.fromisoformat(record["revoked"])
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(int(record["serial"], 16))
            .revocation_date(revoked_at)
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    path = root / "crl.pem"
    tmp = path.with_name("crl.pem.tmp")
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    tmp.chmod(0o644)
    os.replace(tmp, path)
    return path


def _revoked(root: Path) -> list[dict[str, str]]:
    path = root / "revoked.json"
    if not path.exists():
        return []
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PkiError(f"{path}: unreadable: {exc}") from exc
    if not isinstance(records, list):
        raise PkiError(f"{path}: expected a list")
    return records


def _write_revoked(root: Path, records: list[dict[str, str]]) -> None:
    path = root / "revoked.json"
    tmp = path.with_name("revoked.json.tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --- command line ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cmds = parser.add_subparsers(dest="pki", required=True)
    ca = cmds.add_parser("init-ca", help="create the fleet CA (EC P-256)")
    ca.add_argument("--dir", required=True, type=Path)
    ca.add_argument("--name", default="gate-scanner fleet CA", help="the CA's common name")
    ca.add_argument("--days", type=int, default=DEFAULT_CA_DAYS)
    server = cmds.add_parser("server", help="the broker's certificate, with its names as SANs")
    server.add_argument("--dir", required=True, type=Path)
    server.add_argument("--host", required=True, help="DNS name the gates connect to (mqtt.host)")
    server.add_argument("--alt-host", action="append", default=[], help="another DNS name (repeatable)")
    server.add_argument("--ip", action="append", default=[], help="an IP address clients use (repeatable)")
    server.add_argument("--days", type=int, default=DEFAULT_LEAF_DAYS)
    server.add_argument("--renew", action="store_true", help="new certificate for the existing key")
    for role, what in (
        ("device", "a gate's client certificate: CN = device id"),
        ("operator", "an operator identity (monitor, commands)"),
        ("collector", "the collector's identity"),
    ):
        p = cmds.add_parser(role, help=what)
        p.add_argument("--dir", required=True, type=Path)
        p.add_argument("--id", required=True, help="device.id of the gate" if role == "device" else "name")
        p.add_argument("--days", type=int, default=DEFAULT_LEAF_DAYS)
        p.add_argument("--renew", action="store_true", help="new certificate for the existing key")
        if role == "device":
            p.add_argument(
                "--site",
                help="device.site of the gate: the broker lets it write only there "
                "(required for a new certificate; --renew keeps the current one unless given)",
            )
    rules = cmds.add_parser(
        "dynsec", help="the broker's access rules for every identity here (mosquitto dynamic-security)"
    )
    rules.add_argument("--dir", required=True, type=Path)
    rules.add_argument("--out", required=True, type=Path, help="e.g. dynamic-security.json")
    rules.add_argument("--prefix", default="gate", help="mqtt.topic_prefix of the fleet")
    rev = cmds.add_parser("revoke", help="revoke an identity and rewrite crl.pem (mosquitto crlfile)")
    rev.add_argument("--dir", required=True, type=Path)
    rev.add_argument("--id", required=True)
    rev.add_argument("--role", choices=(*CLIENT_ROLES, "server"), default="device")
    rev.add_argument("--crl-days", type=int, default=DEFAULT_CRL_DAYS, help="CRL validity")
    crl = cmds.add_parser("crl", help="rewrite crl.pem with a fresh validity (do it before it expires)")
    crl.add_argument("--dir", required=True, type=Path)
    crl.add_argument("--crl-days", type=int, default=DEFAULT_CRL_DAYS, help="CRL validity")


def main(args: argparse.Namespace) -> int:
    try:
        if args.pki == "dynsec":
            found = write_dynsec(args.dir, args.out, prefix=args.prefix)
            gates = [i for i in found if i.role == "device"]
            print(
                f"wrote {args.out}: {len(gates)} gates at {len({i.site for i in gates})} sites, "
                f"{sum(i.role == 'collector' for i in found)} collectors, "
                f"{sum(i.role == 'operator' for i in found)} operators; install it on the broker "
                "and restart mosquitto (deploy/README.md)"
            )
            return 0
        if args.pki in ("revoke", "crl"):
            if args.pki == "revoke":
                path = revoke(args.dir, args.role, args.id, crl_days=args.crl_days)
                print(f"revoked {args.role} {args.id}; retired its files to {args.dir / 'revoked'}")
            else:
                path = write_crl(args.dir, days=args.crl_days)
            print(f"wrote {path} (valid {args.crl_days} days): copy it to the broker, reload mosquitto")
            return 0
        if args.pki == "init-ca":
            issued = init_ca(args.dir, name=args.name, days=args.days)
        elif args.pki == "server":
            issued = issue_server(
                args.dir,
                args.host,
                ips=tuple(args.ip),
                extra_hosts=tuple(args.alt_host),
                days=args.days,
                renew=args.renew,
            )
        else:
            site = getattr(args, "site", None)
            if args.pki == "device" and site is None and not args.renew:
                raise PkiError("--site is required: the broker lets a gate write only under its own site")
            issued = issue_client(args.dir, args.pki, args.id, site=site, days=args.days, renew=args.renew)
    except PkiError as exc:
        print(f"pki {args.pki}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {issued.cert}")
    print(f"{'wrote' if issued.key_created else 'kept '} {issued.key} (0600)")
    if args.pki in CLIENT_ROLES:
        print(f"then: gate-scanner pki dynsec --dir {args.dir} --out dynamic-security.json (broker rules)")
    return 0
