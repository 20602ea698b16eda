"""`gate-scanner pass …`: issuer keys, trust stores, issuing, verifying and showing passes.

Exit codes: 0 ok, 1 the pass did not verify, 2 usage (bad arguments, unreadable files).
Subjects are personal data: ``verify`` and ``show`` print them only with ``--show-subject``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from scanner.credentials.signed import (
    KID_BYTES,
    PREFIX,
    Body,
    PassFormatError,
    PassIssuer,
    PassVerifier,
    TrustedKey,
    TrustError,
    TrustStore,
    decode_pass,
    public_key_b64,
    trusted_key_from_json,
)
from scanner.models import Credential, Reason

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
KEY_FILE, PUB_FILE = "issuer.key", "issuer.pub.json"
QR_SCALE, QR_BORDER = 8, 4  # 8 px modules print crisply; 4 modules of quiet zone is the QR minimum


class UsageError(Exception):
    """Bad arguments or unreadable input files: exit 2 with this message."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="pass_command", required=True)

    keygen = sub.add_parser("keygen", help=f"new issuer key: writes {KEY_FILE} (0600) and {PUB_FILE}")
    keygen.add_argument("--out", required=True, type=Path, help="directory for the two files")
    keygen.add_argument("--kid", help=f"key id, {2 * KID_BYTES} hex digits (default: from the public key)")
    keygen.add_argument("--name", default="", help="issuer name recorded in the trust entry")

    trust = sub.add_parser("trust", help=f"build a trust store from {PUB_FILE} entries")
    trust.add_argument("entries", nargs="+", type=Path, help=f"{PUB_FILE} files")
    trust.add_argument("--out", required=True, type=Path)
    trust.add_argument("--version", required=True, type=int, help="store version; raise it on every change")

    issue = sub.add_parser("issue", help="sign a pass; print its text, optionally write PNG/SVG")
    issue.add_argument("--key", required=True, type=Path, help=f"{KEY_FILE}; its kid is read from {PUB_FILE}")
    issue.add_argument("--kid", help=f"key id (default: from the {PUB_FILE} next to the key)")
    issue.add_argument("--subject", required=True, help="opaque subject id (UTF-8)")
    issue.add_argument("--valid-from", help="RFC 3339 time with offset (default: now)")
    issue.add_argument(
        "--valid-until", required=True, help="RFC 3339 time with offset, e.g. 2026-12-31T23:59+07:00"
    )
    issue.add_argument("--site", help="only valid at this site (config [device] site)")
    issue.add_argument("--out", type=Path, help="write BASENAME.png and BASENAME.svg")
    issue.add_argument("--terminal", action="store_true", help="also print the QR code in the terminal")

    verify = sub.add_parser(
        "verify", help="verify a pass against a trust store; JSON result, exit 1 if invalid"
    )
    verify.add_argument("--trust", required=True, type=Path, help="trust store JSON")
    what = verify.add_mutually_exclusive_group(required=True)
    what.add_argument("text", nargs="?", help="the pass text")
    what.add_argument("--image", type=Path, help="read the pass from a QR image")
    verify.add_argument("--now", help="RFC 3339 time to check the validity window at (default: now)")
    verify.add_argument("--site", help="also check the pass's site scope against this site")
    verify.add_argument("--show-subject", action="store_true", help="include the raw subject id")

    show = sub.add_parser("show", help="print a pass's fields without verifying it")
    show.add_argument("text")
    show.add_argument("--show-subject", action="store_true", help="include the raw subject id")


def main(args: argparse.Namespace) -> int:
    handlers = {"keygen": _keygen, "trust": _trust, "issue": _issue, "verify": _verify, "show": _show}
    try:
        return handlers[args.pass_command](args)
    except (UsageError, TrustError) as exc:
        print(f"gate-scanner pass {args.pass_command}: {exc}", file=sys.stderr)
        return EXIT_USAGE


# -- keygen / trust -----------------------------------------------------------------------


def _keygen(args: argparse.Namespace) -> int:

    key = Ed25519PrivateKey.generate()
    kid = _kid_arg(args.kid) if args.kid else default_kid(key.public_key())
    out: Path = args.out
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path, pub_path = out / KEY_FILE, out / PUB_FILE
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    # O_EXCL: overwriting an issuer key would orphan every pass signed with it.
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{key_path} exists; not overwriting an issuer key") from None
    except OSError as exc:
        raise UsageError(f"{key_path}: {exc.strerror}") from None
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    entry = TrustedKey(kid, key.public_key(), args.name).entry()
    pub_path.write_text(json.dumps(entry, indent=2) + "\n", encoding="utf-8")
    print(kid.hex())
    return EXIT_OK


def default_kid(public_key: Any) -> bytes:
    """The first bytes of SHA-256 of the raw public key: stable, and no registry of ids needed."""

    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).digest()[:KID_BYTES]


def _kid_arg(text: str) -> bytes:
    try:
        kid = bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"--kid: not hex: {text!r}") from None
    if len(kid) != KID_BYTES:
        raise UsageError(f"--kid: need {2 * KID_BYTES} hex digits")
    return kid


def _trust(args: argparse.Namespace) -> int:
    keys = []
    for path in args.entries:
        keys.append(trusted_key_from_json(_read_json(path), where=str(path)))
    kids = [k.kid for k in keys]
    if len(set(kids)) != len(kids):
        raise UsageError("two entries have the same kid")
    store = TrustStore.of(keys, version=args.version, issued=datetime.now(UTC).replace(microsecond=0))
    args.out.write_text(json.dumps(store.to_json(), indent=2) + "\n", encoding="utf-8")
    print(f"{args.out}: {len(keys)} key(s), version {args.version}")
    return EXIT_OK


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: {exc}") from None


# -- issue ----------------------------------------------------------------------------------


def _issue(args: argparse.Namespace) -> int:

    try:
        key = load_pem_private_key(args.key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"{args.key}: cannot load the key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{args.key}: not an Ed25519 key")
    kid = _kid_arg(args.kid) if args.kid else _kid_beside(args.key, key)
    valid_from = _time_arg("--valid-from", args.valid_from) if args.valid_from else _this_minute()
    valid_until = _time_arg("--valid-until", args.valid_until)
    try:
        text = PassIssuer(key, kid).issue(
            args.subject.encode("utf-8"), valid_from, valid_until, site=args.site
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(text)
    if args.out or args.terminal:
        import segno  # pure Python, but only rendering needs it

        # boost_error off: the size promise is "version ≤ 6 at M", not whatever segno can reach.
        qr = segno.make_qr(text, error="m", boost_error=False)
        if args.out:
            base: Path = args.out
            qr.save(str(base.with_name(base.name + ".png")), scale=QR_SCALE, border=QR_BORDER)
            qr.save(str(base.with_name(base.name + ".svg")), scale=QR_SCALE, border=QR_BORDER)
        if args.terminal:
            qr.terminal(compact=True)
    return EXIT_OK


def _kid_beside(key_path: Path, key: Any) -> bytes:
    """The kid recorded by keygen next to the key, checked against the key itself."""
    pub_path = key_path.with_name(PUB_FILE)
    if not pub_path.exists():
        raise UsageError(f"no {pub_path} beside the key; give --kid")
    entry = trusted_key_from_json(_read_json(pub_path), where=str(pub_path))
    if public_key_b64(entry.public_key) != public_key_b64(key.public_key()):
        raise UsageError(f"{pub_path} belongs to a different key than {key_path}")
    return entry.kid


def _this_minute() -> datetime:
    # Rounded down here because the issuer rounds valid_from up: "now" must mean now.
    return datetime.now(UTC).replace(second=0, microsecond=0)


def _time_arg(option: str, text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{option}: not an RFC 3339 time: {text!r}") from None
    if moment.tzinfo is None:
        raise UsageError(f"{option}: give a UTC offset, e.g. {text}+07:00 or {text}Z")
    return moment


# -- verify / show --------------------------------------------------------------------------


def _verify(args: argparse.Namespace) -> int:
    store = TrustStore.load(args.trust)
    payload = _image_payload(args.image) if args.image else args.text.encode("utf-8")
    now = _time_arg("--now", args.now) if args.now else datetime.now(UTC)
    credential = PassVerifier(store).parse(payload, now)
    if credential is None:
        result: dict[str, Any] = {
            "valid": False,
            "reason": str(Reason.UNKNOWN_FORMAT),
            "detail": "not a gate pass",
        }
    else:
        reason = _judge(credential, now, args.site)
        result = {
            "valid": reason is Reason.OK,
            "reason": str(reason),
            **_describe(credential, args.show_subject),
        }
    result["trust_version"] = store.version
    print(json.dumps(result, ensure_ascii=False))
    return EXIT_OK if result["valid"] else EXIT_FAILED


def _judge(credential: Credential, now: datetime, site: str | None) -> Reason:
    """The pass's own checks, as the gate's policy applies them (no lists, no passback)."""
    if credential.problem is not None:
        return credential.problem
    if credential.valid_from is not None and now < credential.valid_from:
        return Reason.NOT_YET_VALID
    if credential.valid_until is not None and now >= credential.valid_until:
        return Reason.EXPIRED
    if site is not None and credential.site is not None and credential.site != site:
        return Reason.WRONG_SITE
    return Reason.OK


def _image_payload(path: Path) -> bytes:
    # Heavy (OpenCV, the native decoders): only `pass verify --image` reads an image.
    import cv2

    from scanner.gate.decode import Decoder  # the same: OpenCV and the native decoders

    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None or image.size == 0:
        raise UsageError(f"{path}: cannot read image")
    payloads = [s.payload for s in Decoder().decode(image)]
    if not payloads:
        raise UsageError(f"{path}: no QR code found")
    passes = [p for p in payloads if p[: len(PREFIX)].upper() == PREFIX.encode()]
    return (passes or payloads)[0]


def _describe(credential: Credential, show_subject: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "detail": credential.detail,
        "type": str(credential.type),
        "issuer": credential.issuer,
        "pass_id": credential.credential_id.decode() or None,
        "valid_from": _rfc3339(credential.valid_from),
        "valid_until": _rfc3339(credential.valid_until),
        "site": credential.site,
    }
    if show_subject and credential.identity:
        fields["subject"] = _subject_text(credential.identity)
    return {k: v for k, v in fields.items() if v not in (None, "")}


def _show(args: argparse.Namespace) -> int:
    try:
        body: Body = decode_pass(args.text.encode("utf-8"))
    except PassFormatError as exc:
        print(json.dumps({"valid_format": False, "detail": str(exc)}))
        return EXIT_FAILED
    fields: dict[str, Any] = {
        "valid_format": True,
        "verified": False,
        "kid": body.kid.hex(),
        "pass_id": body.pass_id.hex(),
        "valid_from": _rfc3339(body.valid_from),
        "valid_until": _rfc3339(body.valid_until),
        "site": body.site,
        "subject_bytes": len(body.subject),
        "length": len(args.text),
    }
    if args.show_subject:
        fields["subject"] = _subject_text(body.subject)
    print(json.dumps(fields, ensure_ascii=False))
    return EXIT_OK


def _subject_text(subject: bytes) -> str:
    try:
        text = subject.decode("utf-8")
    except UnicodeDecodeError:
        return "hex:" + subject.hex()
    return text if text.isprintable() else "hex:" + subject.hex()


def _rfc3339(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
