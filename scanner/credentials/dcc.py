"""EU Digital COVID Certificates (``HC1:``): the 2022 Vietnamese vaccine passport uses this format.

Chain: ``HC1:`` prefix → Base45 (RFC 9285) → zlib (uncompressed data is tolerated, as the
hcert spec allows) → COSE_Sign1 (RFC 9052; tag 18, untagged, or wrapped in another tag such
as CWT 61) → signature checked with the signing certificate whose key id matches → CWT
claims: 1 issuing country, 6 ``iat``, 4 ``exp``, -260 ``{1: hcert}``.

Every stage is a function of its own so that ``bench dcc`` can check each stage against the
dgc-testdata expectations; :class:`DccVerifier` chains them. Nothing here raises on input
from a QR code: failures become a :class:`~scanner.models.Credential` with ``problem`` set.

Reasons (the reason codes of the check-in contract):

- ``malformed``: Base45, zlib, CBOR or COSE structure errors, an unsupported algorithm, a
  missing ``exp`` or an hcert without name or a readable v/t/r entry.
- ``unknown_issuer``: no certificate in the trust list has the key id.
- ``bad_signature``: the signature does not verify with any certificate of that key id, or
  the algorithm does not fit the key (ES256 needs P-256: an ES256 signature from a P-384
  key is rejected, even though three upstream test cases expect it to pass).
- ``expired``: ``exp`` is past, the signing certificate's notAfter is past, or the rules
  reject the content as no longer valid (test too old, recovery window over, positive test,
  vaccination older than ``vaccination_max_days``).
- ``not_yet_valid``: ``iat`` is in the future beyond the clock skew, the signing
  certificate is not valid yet, the vaccination series is incomplete or too recent, the
  recovery window has not started.
- ``type_not_accepted``: the rules do not count this kind of certificate (e.g. tests).

Personal data never leaves this module except as the opaque ``identity`` bytes (normalised
transliterated family name, given name and date of birth, so that the same person is the
same subject across their vaccination, test and recovery certificates). ``detail`` strings
are fixed texts and never contain anything read from the certificate body.

Trust list file (JSON, UTF-8)::

    {
      "version": "2022-04-13.1",              # free text, published in status
      "issued": "2022-04-13T10:00:00Z",       # RFC 3339; the list's age is measured from it
      "certificates": [
        {"kid": "base64 key id (8 bytes)",    # optional: default first 8 bytes of SHA-256(DER)
         "country": "VN",                     # ISO 3166 alpha-2 of the issuing state
         "certificate": "base64 DER X.509"}   # the document signer certificate (DSC)
      ]
    }

Public keys are read leniently: if cryptography's X.509 parser rejects a certificate (the FI
test certificates carry malformed extensions), the SubjectPublicKeyInfo and validity are
taken out of the DER with a small walker, since only the key and its dates matter here.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import traceback
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from scanner.config import DccConfig
from scanner.credentials import base45
from scanner.models import Credential, CredentialType, Reason

log = logging.getLogger(__name__)

PREFIX = b"HC1:"
# A version-40 QR code holds at most 4,296 alphanumeric characters; anything longer did not
# come from a QR code and is not worth decoding.
MAX_PAYLOAD = 4400
# Real certificates inflate to 0.3-2 KiB; the bound stops a zlib bomb from eating the Pi's RAM.
MAX_INFLATED = 64 * 1024

# COSE header labels and algorithm ids (RFC 9052/9053, IANA COSE registry).
HDR_ALG, HDR_KID = 1, 4
ES256, ES384, ES512, PS256 = -7, -35, -36, -37
TAG_COSE_SIGN1 = 18
# CWT claim keys (RFC 8392) and the hcert claim of the EU DCC spec.
CLAIM_ISS, CLAIM_EXP, CLAIM_IAT, CLAIM_HCERT = 1, 4, 6, -260

TEST_NOT_DETECTED = "260415000"  # SNOMED CT "not detected" in the DCC value set


_EC_ALGS: Mapping[int, tuple[type[ec.EllipticCurve], hashes.HashAlgorithm, int]] = MappingProxyType(
    {
        # alg: (the only curve we accept for it, hash, bytes per coordinate)
        ES256: (ec.SECP256R1, hashes.SHA256(), 32),
        ES384: (ec.SECP384R1, hashes.SHA384(), 48),
        ES512: (ec.SECP521R1, hashes.SHA512(), 66),
    }
)


class DccError(Exception):
    """A stage failed; ``reason`` is the reason code the gate reports."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# Stages: each takes the previous stage's output and raises DccError (never anything else).


def has_prefix(payload: bytes) -> bool:
    """``HC1:`` in any case: a lower-case prefix is still a health certificate (malformed,
    if its Base45 is lower case too), never a plain code."""
    return payload[: len(PREFIX)].upper() == PREFIX


def unprefix(payload: bytes) -> bytes:
    """The Base45 text after ``HC1:``."""
    if not has_prefix(payload):
        raise DccError(Reason.MALFORMED, "no HC1: prefix")
    return payload[len(PREFIX) :]


def b45decode(text: bytes) -> bytes:
    try:
        return base45.decode(text)
    except ValueError as exc:
        raise DccError(Reason.MALFORMED, str(exc)) from None


def inflate(data: bytes) -> bytes:
    """zlib-decompress, bounded. Raises ``malformed`` when the data is not a complete zlib stream."""
    try:
        inflater = zlib.decompressobj()
        out = inflater.decompress(data, MAX_INFLATED)
        if inflater.unconsumed_tail:
            raise DccError(Reason.MALFORMED, f"zlib: inflates beyond {MAX_INFLATED} bytes")
        if not inflater.eof:
            raise DccError(Reason.MALFORMED, "zlib: truncated stream")
        if inflater.unused_data:
            # Bytes after the stream are outside the signature: a canonical DCC has none, and a
            # verifier that ignores them lets anyone append data to a valid certificate.
            raise DccError(Reason.MALFORMED, "zlib: data after the end of the stream")
    except zlib.error:
        raise DccError(Reason.MALFORMED, "zlib: corrupt stream") from None
    return out


def inflate_lenient(data: bytes) -> bytes:
    """The hcert spec makes compression a SHOULD: data that is not zlib is taken as the COSE bytes.

    A zlib stream starts with CMF 0x78 (deflate, 32 KiB window); a COSE_Sign1 starts with a
    CBOR tag (0xC0-0xDB) or array (0x84). Only data that claims to be zlib must inflate.
    """
    if data[:1] == b"\x78":
        return inflate(data)
    return data


@dataclass(frozen=True, slots=True)
class CoseSign1:
    """A decoded COSE_Sign1: the exact protected bytes are kept because the signature covers them."""

    protected: bytes = field(repr=False)
    alg: int | None
    kid: bytes | None
    payload: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    claims: Mapping[Any, Any] = field(repr=False)  # the CWT claims map

    def to_be_signed(self) -> bytes:
        # Sig_structure (RFC 9052 §4.4) for COSE_Sign1 with no external AAD.
        return cbor2.dumps(["Signature1", self.protected, b"", self.payload])


def decode_cose(data: bytes) -> CoseSign1:
    """COSE_Sign1 → headers, payload and CWT claims; tolerates untagged and double-tagged messages."""
    obj = _cbor(data, "COSE")
    # cbor2 >= 6 hands out tuples and frozendicts inside tags, plain lists and dicts elsewhere:
    # every shape check below takes both.
    # Unwrap any tags (18 COSE_Sign1, 61 CWT, or both). A tag other than 18 directly around the
    # array would be a different COSE message type; those are not signed hcerts.
    depth = 0
    while isinstance(obj, cbor2.CBORTag) and depth < 4:
        if not isinstance(obj.value, cbor2.CBORTag) and obj.tag != TAG_COSE_SIGN1:
            raise DccError(Reason.MALFORMED, "COSE: tagged as a message type other than COSE_Sign1")
        obj, depth = obj.value, depth + 1
    if not isinstance(obj, list | tuple) or len(obj) != 4:
        raise DccError(Reason.MALFORMED, "COSE: not a four-element COSE_Sign1 array")
    protected, unprotected, payload, signature = obj
    if not isinstance(protected, bytes) or not isinstance(unprotected, Mapping):
        raise DccError(Reason.MALFORMED, "COSE: header types")
    if not isinstance(payload, bytes) or not isinstance(signature, bytes):
        raise DccError(Reason.MALFORMED, "COSE: payload or signature is not a byte string")
    # A zero-length protected bstr means an empty map (RFC 9052 §3).
    protected_map = _cbor(protected, "protected header") if protected else {}
    if not isinstance(protected_map, Mapping):
        raise DccError(Reason.MALFORMED, "COSE: protected header is not a map")
    # The protected header wins: only it is covered by the signature. The unprotected one is
    # a fallback some issuers use; a wrong kid or alg there cannot make a forgery verify.
    alg = protected_map.get(HDR_ALG, unprotected.get(HDR_ALG))
    kid = protected_map.get(HDR_KID, unprotected.get(HDR_KID))
    if not isinstance(alg, int) or isinstance(alg, bool):
        alg = None
    if not isinstance(kid, bytes):
        kid = None
    claims = _cbor(payload, "CWT")
    if not isinstance(claims, Mapping):
        raise DccError(Reason.MALFORMED, "CWT: payload is not a claims map")
    return CoseSign1(protected, alg, kid, payload, signature, MappingProxyType(claims))


def hcert_of(cose: CoseSign1) -> Mapping[Any, Any]:
    """The health certificate (claim -260, key 1) or ``malformed``."""
    container = cose.claims.get(CLAIM_HCERT)
    hcert = container.get(1) if isinstance(container, Mapping) else None
    if not isinstance(hcert, Mapping):
        raise DccError(Reason.MALFORMED, "CWT: no hcert claim (-260/1)")
    return hcert


def verify_signature(cose: CoseSign1, key: Any) -> None:
    """Check the signature with one public key; ``bad_signature`` on any mismatch."""
    tbs = cose.to_be_signed()
    try:
        if cose.alg is not None and cose.alg in _EC_ALGS:
            curve, digest, size = _EC_ALGS[cose.alg]
            if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, curve):
                raise DccError(Reason.BAD_SIGNATURE, f"alg {cose.alg} does not match the signer's key")
            if len(cose.signature) != 2 * size:
                raise DccError(Reason.BAD_SIGNATURE, "ECDSA signature has the wrong length")
            r = int.from_bytes(cose.signature[:size], "big")
            s = int.from_bytes(cose.signature[size:], "big")
            key.verify(utils.encode_dss_signature(r, s), tbs, ec.ECDSA(digest))
        elif cose.alg == PS256:
            if not isinstance(key, rsa.RSAPublicKey):
                raise DccError(Reason.BAD_SIGNATURE, "PS256 needs an RSA key")
            # Issuers sign with salt = hash length; PSS.AUTO reads the salt length from the
            # signature, as other verifiers do, so either choice verifies.
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
            key.verify(cose.signature, tbs, pss, hashes.SHA256())
        else:
            raise DccError(Reason.MALFORMED, f"unsupported COSE algorithm {cose.alg}")
    except InvalidSignature:
        raise DccError(Reason.BAD_SIGNATURE, "signature does not verify") from None
    except (ValueError, TypeError):  # e.g. r or s out of range for the curve
        raise DccError(Reason.BAD_SIGNATURE, "signature does not verify") from None


def numeric_date(claims: Mapping[Any, Any], key: int) -> datetime | None:
    """A CWT NumericDate claim as an aware datetime; ``None`` if absent, ``malformed`` if unreadable."""
    value = claims.get(key)
    if value is None:
        return None
    if isinstance(value, datetime) and value.tzinfo is not None:  # tag 1, seen from some encoders
        return value
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            pass
    raise DccError(Reason.MALFORMED, f"CWT: claim {key} is not a date")


def check_times(cose: CoseSign1, signer: DccSigner | None, now: datetime, skew: timedelta) -> datetime:
    """``exp``/``iat`` and the signing certificate's validity at ``now``; returns ``exp``."""
    exp = numeric_date(cose.claims, CLAIM_EXP)
    iat = numeric_date(cose.claims, CLAIM_IAT)
    if exp is None:
        raise DccError(Reason.MALFORMED, "CWT: no expiry (claim 4)")
    if iat is not None and iat > now + skew:
        raise DccError(Reason.NOT_YET_VALID, "issued in the future")
    if now > exp:
        raise DccError(Reason.EXPIRED, "certificate expired")
    if signer is not None:
        if signer.not_before is not None and now < signer.not_before:
            raise DccError(Reason.NOT_YET_VALID, "signing certificate not valid yet")
        if signer.not_after is not None and now > signer.not_after:
            raise DccError(Reason.EXPIRED, "signing certificate expired")
    return exp


# ---------------------------------------------------------------------------------------------
# Trust list


@dataclass(frozen=True, slots=True)
class DccSigner:
    """One document signer: its key id, country, public key and certificate validity."""

    kid: bytes
    country: str
    public_key: Any = field(repr=False)  # EllipticCurvePublicKey | RSAPublicKey
    not_before: datetime | None = None
    not_after: datetime | None = None


class DccTrustError(ValueError):
    """The trust list file cannot be used at all (unreadable, not JSON, wrong shape)."""


@dataclass(frozen=True, slots=True)
class DccTrustList:
    version: str
    issued: datetime | None
    signers: Mapping[bytes, tuple[DccSigner, ...]] = field(repr=False)
    # Entries that could not be used, as "index: why" (never fatal: one bad national
    # certificate must not take every other country's certificates down with it).
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return sum(len(s) for s in self.signers.values())

    def lookup(self, kid: bytes) -> tuple[DccSigner, ...]:
        return self.signers.get(kid, ())

    @classmethod
    def load(cls, path: str | Path) -> DccTrustList:
        path = Path(path)
        try:
            document = json.loads(path.read_bytes())
        except OSError as exc:
            raise DccTrustError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise DccTrustError(f"{path}: not JSON: {exc}") from exc
        try:
            return cls.from_document(document)
        except DccTrustError as exc:
            raise DccTrustError(f"{path}: {exc}") from exc

    @classmethod
    def from_document(cls, document: Any) -> DccTrustList:
        if not isinstance(document, dict) or not isinstance(document.get("certificates"), list):
            raise DccTrustError('expected an object with a "certificates" list')
        issued = None
        if document.get("issued") is not None:
            try:
                issued = _aware(datetime.fromisoformat(str(document["issued"]).replace("Z", "+00:00")))
            except ValueError as exc:
                raise DccTrustError(f"issued: not an RFC 3339 time: {document['issued']!r}") from exc
        entries = []
        skipped = []
        for i, item in enumerate(document["certificates"]):
            try:
                if not isinstance(item, dict):
                    raise ValueError("not an object")
                der = base64.b64decode(item["certificate"], validate=True)
                kid = base64.b64decode(item["kid"], validate=True) if item.get("kid") else None
                entries.append(signer_from_der(der, str(item.get("country", "")), kid))
            except Exception as exc:  # any unusable entry (bad base64, no key, odd key type)
                skipped.append(f"certificates[{i}]: {type(exc).__name__}: {exc}")
        for problem in skipped:
            log.warning("trust list entry skipped: %s", problem)
        if not entries:
            # Installing it would turn every DCC into unknown_issuer at once (a certificate in
            # PEM where base64 DER belongs did exactly that): keep the list in use instead.
            first = f"; first problem: {skipped[0]}" if skipped else ""
            raise DccTrustError(f"no usable signing certificate among {len(skipped)} entries{first}")
        return cls.of(entries, version=str(document.get("version", "")), issued=issued, skipped=skipped)

    @classmethod
    def of(
        cls,
        signers: Iterable[DccSigner],
        *,
        version: str = "",
        issued: datetime | None = None,
        skipped: Iterable[str] = (),
    ) -> DccTrustList:
        by_kid: dict[bytes, tuple[DccSigner, ...]] = {}
        for signer in signers:
            # Key ids are 8 bytes of a hash: collisions are possible, so a kid maps to all
            # certificates that carry it and verification tries each.
            by_kid[signer.kid] = (*by_kid.get(signer.kid, ()), signer)
        return cls(version, issued, MappingProxyType(by_kid), tuple(skipped))


def certificate_kid(der: bytes) -> bytes:
    """The DCC key id of a signing certificate: the first 8 bytes of SHA-256 over its DER."""
    return hashlib.sha256(der).digest()[:8]


def signer_from_der(der: bytes, country: str, kid: bytes | None = None) -> DccSigner:
    """Public key and validity of a DER certificate; ``ValueError`` if no usable key is in it."""
    key: object
    not_before: datetime | None
    not_after: datetime | None
    try:
        cert = x509.load_der_x509_certificate(der)
        key = cert.public_key()
        not_before, not_after = _cert_validity(cert)
    except Exception:  # malformed extensions etc.: read just the parts we need ourselves
        spki, not_before, not_after = _walk_certificate(der)
        key = serialization.load_der_public_key(spki)
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise ValueError(f"unsupported key type {type(key).__name__}")
    return DccSigner(kid or certificate_kid(der), country, key, not_before, not_after)


def _cert_validity(cert: x509.Certificate) -> tuple[datetime, datetime]:
    # cryptography >= 42 has the aware *_utc properties and deprecates the naive ones.
    if hasattr(cert, "not_valid_before_utc"):
        return cert.not_valid_before_utc, cert.not_valid_after_utc  # type: ignore[attr-defined,unused-ignore]
    return _aware(cert.not_valid_before), _aware(cert.not_valid_after)


def _der_read(data: bytes, pos: int) -> tuple[int, int, int]:
    """One DER TLV at ``pos``: (tag, content start, content end)."""
    if pos + 2 > len(data):
        raise ValueError("DER: truncated")
    tag, first = data[pos], data[pos + 1]
    if tag & 0x1F == 0x1F:
        raise ValueError("DER: high tag numbers are not used in certificates")
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise ValueError("DER: bad length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise ValueError("DER: truncated")
    return tag, pos, pos + length


def _walk_certificate(der: bytes) -> tuple[bytes, datetime | None, datetime | None]:
    """SubjectPublicKeyInfo DER, notBefore and notAfter out of an X.509 certificate (RFC 5280 §4.1)."""
    tag, start, _ = _der_read(der, 0)  # Certificate
    if tag != 0x30:
        raise ValueError("DER: certificate is not a SEQUENCE")
    tag, pos, tbs_end = _der_read(der, start)  # tbsCertificate
    if tag != 0x30:
        raise ValueError("DER: tbsCertificate is not a SEQUENCE")
    fields_: list[tuple[int, int, int, int]] = []
    while pos < tbs_end and len(fields_) < 7:
        tag, content, end = _der_read(der, pos)
        fields_.append((tag, pos, content, end))
        pos = end
    if fields_ and fields_[0][0] == 0xA0:  # [0] EXPLICIT version is optional
        fields_ = fields_[1:]
    # serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo
    if len(fields_) < 6 or fields_[3][0] != 0x30 or fields_[5][0] != 0x30:
        raise ValueError("DER: tbsCertificate fields")
    _, _, v_content, v_end = fields_[3]
    not_before = not_after = None
    try:
        t1, c1, e1 = _der_read(der, v_content)
        t2, c2, e2 = _der_read(der, e1)
        if e2 <= v_end:
            not_before, not_after = _der_time(t1, der[c1:e1]), _der_time(t2, der[c2:e2])
    except ValueError:
        pass  # dates unreadable: keep the key, skip the certificate-validity check
    _, spki_start, _, spki_end = fields_[5]
    return der[spki_start:spki_end], not_before, not_after


def _der_time(tag: int, value: bytes) -> datetime:
    text = value.decode("ascii")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ; RFC 5280: YY >= 50 means 19YY
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
        raise ValueError("DER: not a time")
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)


# ---------------------------------------------------------------------------------------------
# Rules on the certificate content


@dataclass(frozen=True, slots=True)
class DccRules:
    """What counts as a valid health certificate at this gate.

    Rule failures use the existing reason codes: content that has run out (test older than
    ``test_max_hours``, recovery window over, vaccination older than ``vaccination_max_days``)
    and a positive test are ``expired``; content that will become valid (series incomplete,
    last dose too recent, recovery window not started) is ``not_yet_valid``; a kind of
    certificate the gate does not count is ``type_not_accepted``.
    """

    vaccination: bool = True
    test: bool = True
    recovery: bool = True
    vaccination_min_days: int = 14
    vaccination_max_days: int | None = None  # None: a complete vaccination does not run out
    test_max_hours: float = 72.0

    @classmethod
    def from_config(cls, config: DccConfig) -> DccRules:
        return cls(
            vaccination=config.vaccination,
            test=config.test,
            recovery=config.recovery,
            vaccination_min_days=config.vaccination_min_days,
            test_max_hours=float(config.test_max_hours),
        )


def apply_rules(hcert: Mapping[Any, Any], rules: DccRules, now: datetime, skew: timedelta) -> datetime | None:
    """Check the v/t/r entries; returns when the content stops counting (None: no end) or raises.

    The spec puts exactly one entry in a certificate; should there be several, the
    certificate counts when any one entry does (every entry is a signed statement).
    """
    groups = [k for k in ("v", "t", "r") if isinstance(hcert.get(k), list | tuple) and hcert[k]]
    if len(groups) != 1:
        raise DccError(Reason.MALFORMED, "hcert: needs exactly one of v, t, r")
    kind = groups[0]
    if not {"v": rules.vaccination, "t": rules.test, "r": rules.recovery}[kind]:
        what = {"v": "vaccination", "t": "test", "r": "recovery"}[kind]
        raise DccError(Reason.TYPE_NOT_ACCEPTED, f"{what} certificates are not accepted here")
    check = {"v": _rule_vaccination, "t": _rule_test, "r": _rule_recovery}[kind]
    failure: DccError | None = None
    for entry in hcert[kind]:
        try:
            if not isinstance(entry, Mapping):
                raise DccError(Reason.MALFORMED, "hcert: entry is not a map")
            return check(entry, rules, now, skew)
        except DccError as exc:
            failure = failure or exc
    assert failure is not None
    raise failure


def _rule_vaccination(
    entry: Mapping[Any, Any], rules: DccRules, now: datetime, _: timedelta
) -> datetime | None:
    dn, sd, dt = entry.get("dn"), entry.get("sd"), _date(entry.get("dt"))
    if not isinstance(dn, int) or not isinstance(sd, int) or dt is None or sd < 1:
        raise DccError(Reason.MALFORMED, "vaccination: unreadable dose or date")
    if dn < sd:
        raise DccError(Reason.NOT_YET_VALID, "vaccination series incomplete")
    start = datetime.combine(dt, datetime.min.time(), UTC)
    if now < start + timedelta(days=rules.vaccination_min_days):
        raise DccError(Reason.NOT_YET_VALID, f"vaccination less than {rules.vaccination_min_days} days ago")
    if rules.vaccination_max_days is None:
        return None
    end = start + timedelta(days=rules.vaccination_max_days)
    if now >= end:
        raise DccError(Reason.EXPIRED, f"vaccination more than {rules.vaccination_max_days} days ago")
    return end


def _rule_test(entry: Mapping[Any, Any], rules: DccRules, now: datetime, skew: timedelta) -> datetime:
    taken = _datetime(entry.get("sc"))
    if taken is None:
        raise DccError(Reason.MALFORMED, "test: unreadable sample time")
    if str(entry.get("tr")) != TEST_NOT_DETECTED:
        raise DccError(Reason.EXPIRED, "test result is not 'not detected'")
    if taken > now + skew:
        raise DccError(Reason.NOT_YET_VALID, "test sample time in the future")
    end = taken + timedelta(hours=rules.test_max_hours)
    if now >= end:
        raise DccError(Reason.EXPIRED, f"test older than {rules.test_max_hours:g} hours")
    return end


def _rule_recovery(entry: Mapping[Any, Any], rules: DccRules, now: datetime, _: timedelta) -> datetime:
    df, du = _date(entry.get("df")), _date(entry.get("du"))
    if df is None or du is None:
        raise DccError(Reason.MALFORMED, "recovery: unreadable validity dates")
    if now.date() < df:
        raise DccError(Reason.NOT_YET_VALID, "recovery not valid yet")
    end = datetime.combine(du + timedelta(days=1), datetime.min.time(), UTC)  # du is inclusive
    if now >= end:
        raise DccError(Reason.EXPIRED, "recovery validity over")
    return end


def _date(value: Any) -> date | None:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value[:10])
        except ValueError:
            return None
    return None


def _datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return _aware(value)
    if isinstance(value, str):
        try:
            return _aware(datetime.fromisoformat(value.strip().replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# ---------------------------------------------------------------------------------------------
# The parser


def certificate_id_of(hcert: Mapping[Any, Any]) -> bytes:
    """The certificate's UVCI (``ci`` of its v, t or r entry), which revocation lists name;
    empty if it has none (such a certificate cannot be revoked by id)."""
    for kind in ("v", "t", "r"):
        entries = hcert.get(kind)
        if isinstance(entries, list | tuple):
            for entry in entries:
                ci = entry.get("ci") if isinstance(entry, Mapping) else None
                if isinstance(ci, str) and 0 < len(ci) <= 80:
                    return ci.strip().encode("utf-8")
    return b""


def identity_of(hcert: Mapping[Any, Any]) -> bytes:
    """Stable identity bytes: transliterated family/given name and date of birth, normalised.

    The ICAO transliterations (``fnt``, ``gnt``) are what every issuer fills the same way;
    ``dob`` may be partial ("1964" or "1964-08") and is kept as written.
    """
    nam = hcert.get("nam")
    fnt = nam.get("fnt") if isinstance(nam, Mapping) else None
    gnt = nam.get("gnt") if isinstance(nam, Mapping) else None
    dob = hcert.get("dob")
    if not isinstance(fnt, str) or not fnt.strip():
        raise DccError(Reason.MALFORMED, "hcert: no transliterated family name")
    parts = [fnt, gnt if isinstance(gnt, str) else "", dob if isinstance(dob, str) else ""]
    return b"dcc\x1f" + "\x1f".join(" ".join(p.upper().split()) for p in parts).encode("utf-8")


class DccVerifier:
    """``parse(payload, now)`` for ``HC1:`` payloads against a trust list and optional content rules.

    ``rules=None`` checks only the signature and validity dates (what ``bench dcc`` measures).
    ``skew`` forgives a gate clock that runs slightly behind the issuer's when checking ``iat``.
    """

    def __init__(
        self,
        trust: DccTrustList,
        rules: DccRules | None = None,
        *,
        skew: timedelta = timedelta(minutes=5),
    ) -> None:
        self.trust = trust
        self.rules = rules
        self.skew = skew

    def parse(self, payload: bytes, now: datetime) -> Credential | None:
        if not has_prefix(payload):
            return None
        issuer = None
        try:
            cose = decode_cose(inflate_lenient(self._base45(payload)))
            signer = self.verify(cose)
            issuer = f"{signer.country or _claim_country(cose)}:{base64.b64encode(signer.kid).decode()}"
            now = _aware(now)
            valid_until = check_times(cose, signer, now, self.skew)
            hcert = hcert_of(cose)
            identity = identity_of(hcert)
            certificate_id = certificate_id_of(hcert)
            if self.rules is not None:
                content_end = apply_rules(hcert, self.rules, now, self.skew)
                if content_end is not None:
                    valid_until = min(valid_until, content_end)
        except DccError as exc:
            return Credential(CredentialType.DCC, b"", issuer=issuer, problem=exc.reason, detail=exc.detail)
        except Exception as exc:  # a bug here must reject the code, never stop the gate
            # Type and place only: an exception message could quote certificate content.
            where = traceback.extract_tb(exc.__traceback__)[-1]
            log.error("DCC verifier error %s at %s:%s", type(exc).__name__, where.filename, where.lineno)
            return Credential(
                CredentialType.DCC,
                b"",
                problem=Reason.MALFORMED,
                detail=f"verifier error: {type(exc).__name__}",
            )
        return Credential(
            CredentialType.DCC, identity, credential_id=certificate_id, issuer=issuer, valid_until=valid_until
        )

    @staticmethod
    def _base45(payload: bytes) -> bytes:
        if len(payload) > MAX_PAYLOAD:
            raise DccError(Reason.MALFORMED, f"longer than any QR code ({len(payload)} bytes)")
        return b45decode(unprefix(payload))

    def verify(self, cose: CoseSign1) -> DccSigner:
        """The trusted signer whose key verifies ``cose``; raises DccError otherwise."""
        if cose.alg is None:
            raise DccError(Reason.MALFORMED, "COSE: no algorithm")
        if cose.kid is None:
            raise DccError(Reason.MALFORMED, "COSE: no key id")
        signers = self.trust.lookup(cose.kid)
        if not signers:
            raise DccError(Reason.UNKNOWN_ISSUER, "key id not in the trust list")
        failure: DccError | None = None
        for signer in signers:
            try:
                verify_signature(cose, signer.public_key)
                return signer
            except DccError as exc:
                failure = failure or exc
        assert failure is not None
        raise failure


def _claim_country(cose: CoseSign1) -> str:
    iss = cose.claims.get(CLAIM_ISS)
    return iss if isinstance(iss, str) and len(iss) <= 3 else "??"


def _refuse_tag(decoder: Any) -> Any:
    raise cbor2.CBORDecodeError("semantic tag not used by health certificates")


# Tags whose cbor2 decoders parse MIME, compile regexes, build sets or share references:
# none occurs in a health certificate, and they run before any signature is checked (a
# 136-character code of MIME tags took 100 ms to decode).
_REFUSED_TAGS = MappingProxyType(
    {tag: _refuse_tag for tag in (4, 5, 25, 28, 29, 30, 35, 36, 37, 256, 258, 260, 261)}
)


def _cbor(data: bytes, what: str) -> Any:
    """One CBOR item that is the whole of ``data``: bytes after it would let one certificate
    travel as many different codes. Duplicate map keys are refused (which alg wins?)."""
    fp = io.BytesIO(data)
    try:
        decoded = cbor2.CBORDecoder(fp, semantic_decoders=_REFUSED_TAGS, allow_duplicate_keys=False).decode()
    except Exception:  # cbor2 raises CBORDecodeError, ValueError, RecursionError, ... on bad input
        raise DccError(Reason.MALFORMED, f"{what}: not valid CBOR") from None
    if fp.tell() != len(data):
        raise DccError(Reason.MALFORMED, f"{what}: {len(data) - fp.tell()} bytes after the CBOR item")
    return decoded
