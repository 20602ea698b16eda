"""Our own signed gate pass: ``GP1:`` + base45(body ‖ Ed25519 signature).

Why this shape: zbar mangles binary payloads, and QR alphanumeric mode (0-9, A-Z, space,
``$%*+-./:``) is exactly the base45 alphabet (RFC 9285), so the whole text stays in the
densest text mode. The budget is QR version 6 at ECC M, whose alphanumeric capacity is 154
characters: 4 for the prefix leaves 150 characters, i.e. 100 bytes, of which the signature
takes 64. The body is a fixed big-endian layout (CBOR would spend bytes we do not have)::

    offset  size  field
    0       4     kid          issuer key id
    4       8     pass_id      random; what a revocation list names
    12      4     valid_from   uint32, unix minutes (inclusive)
    16      4     valid_until  uint32, unix minutes (exclusive)
    20      1     n            subject length, 1..MAX_SUBJECT
    21      n     subject      opaque subject id (one person, many passes)
    21+n    rest  site         optional site scope, ASCII site name; empty = any site

so subject and site share MAX_SUBJECT_AND_SITE bytes. The format version is the digit in
the prefix; it is authenticated because the signature covers a versioned context string
(``gate-scanner/pass/1\\0``) followed by the body, so a body cannot be replayed under another
version or as another signed object of ours.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

# A pass is scoped to a site by the name a gate's config gives it; any other name is a mistake.
from scanner.config import NAME
from scanner.credentials import base45
from scanner.models import Credential, CredentialType, Reason

PREFIX = "GP1:"
CONTEXT = b"gate-scanner/pass/1\x00"
KID_BYTES = 4
PASS_ID_BYTES = 8
SIGNATURE_BYTES = 64
QR_TEXT_BUDGET = 154  # alphanumeric capacity of QR version 6 at ECC level M
_HEADER = struct.Struct(">4s8sIIB")  # kid, pass_id, valid_from, valid_until, subject length
_MAX_BINARY = (QR_TEXT_BUDGET - len(PREFIX)) // 3 * 2  # 100 bytes of body and signature
MAX_SUBJECT_AND_SITE = _MAX_BINARY - SIGNATURE_BYTES - _HEADER.size  # 15
MAX_SUBJECT = MAX_SUBJECT_AND_SITE
MAX_SITE = MAX_SUBJECT_AND_SITE - 1  # a pass always names a subject
_MIN_BINARY = _HEADER.size + 1 + SIGNATURE_BYTES
_MAX_TEXT = len(PREFIX) + _MAX_BINARY // 2 * 3
_MAX_MINUTES = 0xFFFFFFFF
# Any "GP<digit>:" is ours, in any case: reporting it as a malformed pass beats letting it
# fall through to the plain-code parser and open a gate as an unsigned code.
_FAMILY = re.compile(rb"GP\d:", re.IGNORECASE)

TRUST_SCHEMA_VERSION = 1


def b45decode(text: bytes) -> bytes | None:
    try:
        return base45.decode(text)
    except ValueError:
        return None


# -- records ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Body:
    """A pass's fields as decoded, signature not yet checked (``pass show``, the verifier).

    ``subject`` identifies a person: it is kept out of repr."""

    kid: bytes
    pass_id: bytes
    valid_from: datetime
    valid_until: datetime
    subject: bytes
    site: str | None
    signature: bytes
    signed: bytes  # exactly the bytes the signature covers, after the context string

    def __repr__(self) -> str:
        return (
            f"Body(kid={self.kid.hex()}, pass_id={self.pass_id.hex()}, "
            f"valid_from={self.valid_from.isoformat()}, valid_until={self.valid_until.isoformat()}, "
            f"subject=<{len(self.subject)} bytes>, site={self.site!r})"
        )


class PassFormatError(ValueError):
    """Why a text is not a well-formed pass. Messages name fields, never their values."""


def decode_pass(payload: bytes) -> Body:
    """Parse a pass without verifying it. Raises PassFormatError; callers on the QR path use
    PassVerifier.parse, which never raises."""
    prefix = payload[: len(PREFIX)]
    if not _FAMILY.match(prefix):
        raise PassFormatError("not a gate pass")
    if prefix != PREFIX.encode():
        if prefix.upper() == PREFIX.encode():
            raise PassFormatError("pass prefix must be upper case")
        raise PassFormatError(f"unsupported pass version {prefix[2:3].decode()}")
    text = payload[len(PREFIX) :]
    if len(payload) > _MAX_TEXT:
        raise PassFormatError(f"{len(payload)} characters is longer than a pass ({_MAX_TEXT})")
    raw = b45decode(text)
    if raw is None:
        raise PassFormatError("not valid base45")
    if len(raw) < _MIN_BINARY:
        raise PassFormatError(f"{len(raw)} bytes is shorter than a pass ({_MIN_BINARY})")
    signed, signature = raw[:-SIGNATURE_BYTES], raw[-SIGNATURE_BYTES:]
    kid, pass_id, start, end, n = _HEADER.unpack_from(signed)
    if not 1 <= n <= len(signed) - _HEADER.size:
        raise PassFormatError("subject length does not fit the pass")
    subject = signed[_HEADER.size : _HEADER.size + n]
    site_bytes = signed[_HEADER.size + n :]
    site = None
    if site_bytes:
        site = site_bytes.decode("ascii", errors="replace")
        if not NAME.fullmatch(site):
            raise PassFormatError("site is not a site name")
    if end <= start:
        raise PassFormatError("valid_until is not after valid_from")
    return Body(
        kid=kid,
        pass_id=pass_id,
        valid_from=_from_minutes(start),
        valid_until=_from_minutes(end),
        subject=subject,
        site=site,
        signature=signature,
        signed=signed,
    )


def _from_minutes(minutes: int) -> datetime:
    try:
        return datetime.fromtimestamp(minutes * 60, UTC)
    except (ValueError, OverflowError, OSError):  # uint32 minutes reach past the year 9999
        raise PassFormatError("validity time out of range") from None


# -- issuing ------------------------------------------------------------------------------


class PassIssuer:
    """Signs passes with one issuer key. Issuing is not on the QR path: bad arguments raise."""

    def __init__(self, private_key: Ed25519PrivateKey, kid: bytes) -> None:
        if len(kid) != KID_BYTES:
            raise ValueError(f"kid must be {KID_BYTES} bytes, got {len(kid)}")
        self._key = private_key
        self.kid = bytes(kid)

    def issue(
        self,
        subject: bytes,
        valid_from: datetime,
        valid_until: datetime,
        site: str | None = None,
        pass_id: bytes | None = None,
    ) -> str:
        if pass_id is None:
            pass_id = secrets.token_bytes(PASS_ID_BYTES)
        if len(pass_id) != PASS_ID_BYTES:
            raise ValueError(f"pass_id must be {PASS_ID_BYTES} bytes, got {len(pass_id)}")
        if not 1 <= len(subject) <= MAX_SUBJECT:
            raise ValueError(f"subject must be 1..{MAX_SUBJECT} bytes, got {len(subject)}")
        site_bytes = b""
        if site is not None:
            if not NAME.fullmatch(site):
                raise ValueError("site must be a site name: letters, digits and _.- (not first)")
            site_bytes = site.encode("ascii")
        if len(subject) + len(site_bytes) > MAX_SUBJECT_AND_SITE:
            raise ValueError(
                f"subject ({len(subject)} bytes) and site ({len(site_bytes)}) share "
                f"{MAX_SUBJECT_AND_SITE} bytes so that the pass fits QR version 6-M"
            )
        # Whole minutes, rounded inwards: a pass never grants a second more than was asked.
        start = -(-_epoch_seconds(valid_from, "valid_from") // 60)
        end = _epoch_seconds(valid_until, "valid_until") // 60
        if not 0 <= start < end <= _MAX_MINUTES:
            raise ValueError("valid_until must be at least a minute after valid_from (both after 1970)")
        signed = _HEADER.pack(self.kid, pass_id, start, end, len(subject)) + subject + site_bytes
        signature = self._key.sign(CONTEXT + signed)
        return PREFIX + base45.encode(signed + signature)


def _epoch_seconds(moment: datetime, name: str) -> int:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")
    return int(moment.timestamp())


# -- trust --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrustedKey:
    kid: bytes
    public_key: Ed25519PublicKey
    name: str

    def entry(self) -> dict[str, str]:
        """This key as one trust-store entry (the ``keys`` item, also ``issuer.pub.json``)."""
        return {"kid": self.kid.hex(), "public_key": public_key_b64(self.public_key), "name": self.name}


def public_key_b64(key: Ed25519PublicKey) -> str:

    return base64.b64encode(key.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode("ascii")


class TrustError(ValueError):
    """A trust-store file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True, slots=True)
class TrustStore:
    """Issuer public keys by kid, with the store's own version and issue time (freshness).

    File format (JSON)::

        {"version": 3, "issued": "2026-11-29T08:00:00Z",
         "keys": [{"kid": "1a2b3c4d", "public_key": "<base64 of the raw 32 bytes>", "name": "HR office"}]}
    """

    version: int
    issued: datetime
    keys: Mapping[bytes, TrustedKey]

    def key(self, kid: bytes) -> TrustedKey | None:
        return self.keys.get(kid)

    @classmethod
    def of(cls, keys: list[TrustedKey], *, version: int, issued: datetime) -> TrustStore:
        return cls(version, issued, MappingProxyType({k.kid: k for k in keys}))

    @classmethod
    def load(cls, path: Path) -> TrustStore:
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TrustError(f"{path}: {exc}") from exc
        return cls.from_json(document, source=str(path))

    @classmethod
    def from_json(cls, document: Any, *, source: str = "<trust store>") -> TrustStore:
        if not isinstance(document, dict):
            raise TrustError(f"{source}: expected a JSON object")
        unknown = set(document) - {"version", "issued", "keys"}
        if unknown:
            raise TrustError(f"{source}: unknown keys {sorted(unknown)}")
        version = document.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise TrustError(f"{source}: version: expected a non-negative integer")
        issued = _parse_rfc3339(document.get("issued"))
        if issued is None:
            raise TrustError(f"{source}: issued: expected an RFC 3339 time with a UTC offset")
        entries = document.get("keys")
        if not isinstance(entries, list):
            raise TrustError(f"{source}: keys: expected a list")
        keys: dict[bytes, TrustedKey] = {}
        for i, entry in enumerate(entries):
            key = trusted_key_from_json(entry, where=f"{source}: keys[{i}]")
            if key.kid in keys:
                raise TrustError(f"{source}: keys[{i}]: duplicate kid {key.kid.hex()}")
            keys[key.kid] = key
        return cls(version, issued, MappingProxyType(keys))

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "issued": self.issued.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "keys": [k.entry() for k in self.keys.values()],
        }


def trusted_key_from_json(entry: Any, *, where: str) -> TrustedKey:
    if not isinstance(entry, dict):
        raise TrustError(f"{where}: expected an object")
    unknown = set(entry) - {"kid", "public_key", "name"}
    if unknown:
        raise TrustError(f"{where}: unknown keys {sorted(unknown)}")
    try:
        kid = bytes.fromhex(entry["kid"])
        raw = base64.b64decode(entry["public_key"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise TrustError(f"{where}: kid must be hex and public_key base64 ({exc})") from None
    if len(kid) != KID_BYTES:
        raise TrustError(f"{where}: kid must be {KID_BYTES} bytes ({2 * KID_BYTES} hex digits)")
    if len(raw) != 32:
        raise TrustError(f"{where}: public_key must be 32 raw bytes, got {len(raw)}")
    name = entry.get("name", "")
    if not isinstance(name, str):
        raise TrustError(f"{where}: name must be a string")
    return TrustedKey(kid, Ed25519PublicKey.from_public_bytes(raw), name)


def _parse_rfc3339(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        # fromisoformat accepts "Z" only from Python 3.11 on, which is our floor.
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


# -- verifying ----------------------------------------------------------------------------


class PassVerifier:
    """Payload → signed-pass Credential. Validity window and site are left to policy."""

    def __init__(self, trust: TrustStore) -> None:
        self.trust = trust

    def parse(self, payload: bytes, now: datetime) -> Credential | None:
        """None unless the payload is a gate pass; never raises.

        ``now`` is unused: it keeps the reader's one parser shape. The pass's window is
        returned on the Credential and judged by policy, like every other credential's.
        """
        del now
        try:
            return self._parse(payload)
        except Exception as exc:  # attacker-controlled input: a bug here must be a reject
            return Credential(
                CredentialType.SIGNED,
                b"",
                problem=Reason.MALFORMED,
                detail=f"pass error: {type(exc).__name__}",
            )

    def _parse(self, payload: bytes) -> Credential | None:
        if not _FAMILY.match(payload[: len(PREFIX)]):
            return None
        try:
            body = decode_pass(payload)
        except PassFormatError as exc:
            return Credential(CredentialType.SIGNED, b"", problem=Reason.MALFORMED, detail=str(exc))
        issuer = body.kid.hex()
        trusted = self.trust.key(body.kid)
        if trusted is None:
            return Credential(
                CredentialType.SIGNED,
                b"",
                issuer=issuer,
                problem=Reason.UNKNOWN_ISSUER,
                detail=f"no trusted key {issuer}",
            )
        try:
            trusted.public_key.verify(body.signature, CONTEXT + body.signed)
        except InvalidSignature:
            return Credential(
                CredentialType.SIGNED,
                b"",
                issuer=issuer,
                problem=Reason.BAD_SIGNATURE,
                detail=f"signature does not verify under key {issuer}",
            )
        return Credential(
            CredentialType.SIGNED,
            body.subject,
            credential_id=body.pass_id.hex().encode(),
            issuer=issuer,
            valid_from=body.valid_from,
            valid_until=body.valid_until,
            site=body.site,
        )
