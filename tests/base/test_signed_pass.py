"""Signed gate passes: format, size budget, verification, tampering, trust store and CLI."""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import pytest
import segno
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from scanner.credentials import signed
from scanner.credentials.base45 import ALPHABET as B45_ALPHABET
from scanner.credentials.base45 import encode as b45encode
from scanner.credentials.signed import (
    CONTEXT,
    MAX_SUBJECT_AND_SITE,
    PREFIX,
    PassIssuer,
    PassVerifier,
    TrustedKey,
    TrustError,
    TrustStore,
    b45decode,
)
from scanner.gate.decode import Decoder
from scanner.models import CredentialType, Reason
from tests.helpers import REPO

ROOT = REPO
NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
KID = bytes.fromhex("0a0b0c0d")
PASS_ID = bytes.fromhex("0102030405060708")
# One fixed key, so that failures reproduce; the seed is not a secret of anything real.
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def store_of(*keys: TrustedKey) -> TrustStore:
    return TrustStore.of(list(keys), version=7, issued=NOW - timedelta(hours=1))


ISSUER = PassIssuer(KEY, KID)
VERIFIER = PassVerifier(store_of(TrustedKey(KID, KEY.public_key(), "test issuer")))


def issue(
    subject: bytes = b"NV-0042",
    *,
    start: datetime = NOW - timedelta(days=1),
    end: datetime = NOW + timedelta(days=30),
    site: str | None = None,
    issuer: PassIssuer = ISSUER,
) -> str:
    return issuer.issue(subject, start, end, site=site, pass_id=PASS_ID)


def raw_pass(signed_body: bytes, key: Ed25519PrivateKey = KEY) -> bytes:
    """A pass with an arbitrary (even nonsensical) body, properly signed: tests the checks
    that run after the signature, which an issuer bug or a leaked key could reach."""
    return (PREFIX + b45encode(signed_body + key.sign(CONTEXT + signed_body))).encode()


def header(subject_len: int, start: int = 29_000_000, end: int = 30_000_000) -> bytes:
    return struct.pack(">4s8sIIB", KID, PASS_ID, start, end, subject_len)


# -- base45 -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"AB", "BB8"),
        (b"Hello!!", "%69 VD92EX0"),
        (b"base-45", "UJCLQE7W581"),
        (b"ietf!", "QED8WEX0"),
        (b"", ""),
    ],
)
def test_base45_matches_rfc_9285_examples(raw: bytes, text: str) -> None:
    assert b45encode(raw) == text
    assert b45decode(text.encode()) == raw


@pytest.mark.parametrize("text", [b"A", b"GGW", b"::", b"ab", b"AB\n", b"\xc3\x80AA"])
def test_base45_rejects_non_canonical_text(text: bytes) -> None:
    # "GGW" = 65536 and "::" = 2024 overflow their groups; lowercase is outside the alphabet.
    assert b45decode(text) is None


@given(st.binary(max_size=200))
def test_base45_round_trips(data: bytes) -> None:
    assert b45decode(b45encode(data).encode()) == data


def test_base45_alphabet_is_qr_alphanumeric() -> None:
    assert segno.make_qr(B45_ALPHABET, error="m", boost_error=False).mode == "alphanumeric"


# -- accept --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "site"),
    [
        (b"NV-0042", None),
        (b"NV-0042", "bxmd"),
        (bytes(range(15)), None),  # opaque binary subject
        (b"x", "s" * 14),
        ("Nguyễn".encode(), "g-1.a_b"),
    ],
)
def test_valid_pass_yields_signed_credential(subject: bytes, site: str | None) -> None:
    text = issue(subject, site=site)
    credential = VERIFIER.parse(text.encode(), NOW)
    assert credential is not None
    assert credential.problem is None, credential.detail
    assert credential.type is CredentialType.SIGNED
    assert credential.identity == subject
    assert credential.credential_id == PASS_ID.hex().encode()  # printable, as revocation lists name it
    assert credential.issuer == KID.hex()
    assert credential.valid_from == NOW - timedelta(days=1)
    assert credential.valid_until == NOW + timedelta(days=30)
    assert credential.site == site
    assert subject.hex() not in repr(credential) and repr(subject) not in repr(credential)
    assert PASS_ID.hex() not in repr(credential)


def test_window_is_left_to_policy() -> None:
    # An expired pass still parses: expiry is policy's reason code, not the parser's.
    text = issue(start=NOW - timedelta(days=9), end=NOW - timedelta(days=1))
    credential = VERIFIER.parse(text.encode(), NOW)
    assert credential is not None and credential.problem is None
    assert credential.valid_until == NOW - timedelta(days=1)


def test_random_pass_ids_differ() -> None:
    texts = {ISSUER.issue(b"s", NOW, NOW + timedelta(hours=1)) for _ in range(20)}
    ids = {VERIFIER.parse(t.encode(), NOW).credential_id for t in texts}  # type: ignore[union-attr]
    assert len(ids) == 20 and all(len(bytes.fromhex(i.decode())) == signed.PASS_ID_BYTES for i in ids)


def test_window_is_rounded_inwards_to_whole_minutes() -> None:
    start = NOW + timedelta(seconds=30)
    end = NOW + timedelta(hours=1, seconds=59)
    credential = VERIFIER.parse(ISSUER.issue(b"s", start, end).encode(), NOW)
    assert credential is not None
    assert credential.valid_from == NOW + timedelta(minutes=1)
    assert credential.valid_until == NOW + timedelta(hours=1)


def test_timezone_offsets_are_honoured() -> None:
    hanoi = datetime.fromisoformat("2026-12-01T14:00+07:00")
    credential = VERIFIER.parse(ISSUER.issue(b"s", NOW, hanoi).encode(), NOW)
    assert credential is not None and credential.valid_until == datetime(2026, 12, 1, 7, 0, tzinfo=UTC)


# -- size budget --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject_len", "site_len"),
    [(MAX_SUBJECT_AND_SITE, 0), (1, MAX_SUBJECT_AND_SITE - 1), (8, MAX_SUBJECT_AND_SITE - 8)],
)
def test_largest_pass_fits_qr_version_6_at_ecc_m(subject_len: int, site_len: int) -> None:
    site = "S" * site_len or None
    text = ISSUER.issue(b"\xff" * subject_len, NOW, datetime(2100, 1, 1, tzinfo=UTC), site=site)
    assert len(text) == 154
    assert text.isascii() and text.startswith(PREFIX)
    qr = segno.make_qr(text, error="m", boost_error=False)
    assert qr.mode == "alphanumeric"
    assert qr.version <= 6


@pytest.mark.parametrize(
    ("subject", "site"), [(b"x" * 16, None), (b"x" * 8, "s" * 8), (b"", None), (b"x", "s" * 15)]
)
def test_issue_refuses_what_would_not_fit(subject: bytes, site: str | None) -> None:
    with pytest.raises(ValueError):
        ISSUER.issue(subject, NOW, NOW + timedelta(days=1), site=site)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"valid_from": datetime(2026, 1, 1), "valid_until": NOW},  # naive
        {"valid_from": NOW, "valid_until": NOW},
        {"valid_from": NOW, "valid_until": NOW + timedelta(seconds=59)},  # rounds to empty
        {"valid_from": NOW + timedelta(days=1), "valid_until": NOW},
        {"valid_from": datetime(1969, 1, 1, tzinfo=UTC), "valid_until": NOW},
        {"valid_from": NOW, "valid_until": NOW + timedelta(days=1), "site": "has space"},
        {"valid_from": NOW, "valid_until": NOW + timedelta(days=1), "site": "-lead"},
        {"valid_from": NOW, "valid_until": NOW + timedelta(days=1), "site": "bến-xe"},
        {"valid_from": NOW, "valid_until": NOW + timedelta(days=1), "pass_id": b"short"},
    ],
)
def test_issue_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ISSUER.issue(b"s", **kwargs)


def test_issuer_needs_a_four_byte_kid() -> None:
    with pytest.raises(ValueError):
        PassIssuer(KEY, b"\x01\x02")


# -- reject ----------------------------------------------------------------------------------

GOOD = issue(site="bxmd")
LARGEST = issue(b"x" * MAX_SUBJECT_AND_SITE)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (issue(issuer=PassIssuer(KEY, b"\xde\xad\xbe\xef")).encode(), Reason.UNKNOWN_ISSUER),
        (issue(issuer=PassIssuer(OTHER_KEY, KID)).encode(), Reason.BAD_SIGNATURE),  # forged under our kid
        (GOOD.lower().encode(), Reason.MALFORMED),
        (("gp1:" + GOOD[4:]).encode(), Reason.MALFORMED),
        (("GP2:" + GOOD[4:]).encode(), Reason.MALFORMED),
        (b"GP1:", Reason.MALFORMED),
        (GOOD[:-1].encode(), Reason.MALFORMED),  # dangling base45 character
        (GOOD[:-3].encode(), Reason.BAD_SIGNATURE),  # a whole group fewer: signature shifts
        (GOOD[:60].encode(), Reason.MALFORMED),  # shorter than any pass
        ((LARGEST + "000").encode(), Reason.MALFORMED),  # longer than the budget
        ((GOOD + "0" * 5000).encode(), Reason.MALFORMED),
        ((GOOD[:20] + "a" + GOOD[21:]).encode(), Reason.MALFORMED),  # lowercase inside
        ((GOOD + "\n").encode(), Reason.MALFORMED),
        ((" " + GOOD).encode(), None),  # not a pass at all: the prefix is not at the start
        (raw_pass(header(0)), Reason.MALFORMED),  # empty subject
        (raw_pass(header(40) + b"x" * 10), Reason.MALFORMED),  # subject longer than the body
        (raw_pass(header(1, start=5, end=5) + b"x"), Reason.MALFORMED),  # empty window
        (raw_pass(header(1) + b"x" + b"bad site"), Reason.MALFORMED),
        (raw_pass(header(1) + b"x" + b"\xff\xfe"), Reason.MALFORMED),
    ],
    ids=lambda v: v.decode(errors="replace")[:12] if isinstance(v, bytes) else str(v),
)
def test_rejects(payload: bytes, reason: Reason | None) -> None:
    credential = VERIFIER.parse(payload, NOW)
    if reason is None:
        assert credential is None
        return
    assert credential is not None
    assert credential.type is CredentialType.SIGNED
    assert credential.problem is reason, credential.detail
    assert credential.identity == b"" and credential.credential_id == b""
    assert b"NV-0042" not in credential.detail.encode()


def test_unknown_issuer_names_the_kid() -> None:
    credential = VERIFIER.parse(issue(issuer=PassIssuer(KEY, b"\xde\xad\xbe\xef")).encode(), NOW)
    assert credential is not None and credential.issuer == "deadbeef"


@pytest.mark.parametrize(
    "payload", [b"", b"hello", b"HC1:NCFOXN", b"GP1", b"GPX:ABC", b"001099012345|x|y", bytes(range(256))]
)
def test_other_formats_are_not_mine(payload: bytes) -> None:
    assert VERIFIER.parse(payload, NOW) is None


def test_empty_trust_store_knows_no_issuer() -> None:
    credential = PassVerifier(store_of()).parse(GOOD.encode(), NOW)
    assert credential is not None and credential.problem is Reason.UNKNOWN_ISSUER


def test_every_single_character_change_is_rejected() -> None:
    # base45 is strict (a bijection), so any changed character is either undecodable or
    # different bytes, and any different byte breaks the signature or the structure.
    text = GOOD
    substitutes = B45_ALPHABET + "a#\x00é"
    changed = 0
    for position in range(len(text)):
        for char in substitutes:
            if char == text[position]:
                continue
            tampered = (text[:position] + char + text[position + 1 :]).encode()
            credential = VERIFIER.parse(tampered, NOW)
            assert credential is None or credential.problem is not None, (position, char)
            changed += 1
    assert changed > 150 * 44


def test_a_pass_cannot_be_replayed_under_another_context() -> None:
    # A signature over the bare body (no context string) must not verify.
    body = header(1) + b"x"
    forged = (PREFIX + b45encode(body + KEY.sign(body))).encode()
    credential = VERIFIER.parse(forged, NOW)
    assert credential is not None and credential.problem is Reason.BAD_SIGNATURE


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_parse_never_raises_on_arbitrary_bytes(payload: bytes) -> None:
    credential = VERIFIER.parse(payload, NOW)
    assert credential is None or credential.type is CredentialType.SIGNED


@settings(max_examples=500)
@given(st.text(alphabet=B45_ALPHABET, max_size=200))
def test_parse_never_raises_on_base45_bodies(body: str) -> None:
    credential = VERIFIER.parse((PREFIX + body).encode(), NOW)
    assert credential is not None
    assert credential.problem in (Reason.MALFORMED, Reason.UNKNOWN_ISSUER, Reason.BAD_SIGNATURE)


@settings(max_examples=300)
@given(st.data())
def test_parse_never_raises_on_mutated_passes(data: st.DataObject) -> None:
    raw = bytearray(b45decode(GOOD[4:].encode()))  # type: ignore[arg-type]
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] ^= data.draw(st.integers(1, 255))
    credential = VERIFIER.parse((PREFIX + b45encode(bytes(raw))).encode(), NOW)
    assert credential is not None and credential.problem is not None


# -- trust store ---------------------------------------------------------------------------


def test_trust_store_round_trips_through_its_file(tmp_path: Path) -> None:
    store = store_of(
        TrustedKey(KID, KEY.public_key(), "HR office"), TrustedKey(b"\1\2\3\4", OTHER_KEY.public_key(), "")
    )
    path = tmp_path / "trust.json"
    path.write_text(json.dumps(store.to_json()))
    loaded = TrustStore.load(path)
    assert loaded.version == 7 and loaded.issued == NOW - timedelta(hours=1)
    assert set(loaded.keys) == {KID, b"\1\2\3\4"}
    assert loaded.key(KID).name == "HR office"  # type: ignore[union-attr]
    assert PassVerifier(loaded).parse(GOOD.encode(), NOW).problem is None  # type: ignore[union-attr]


ENTRY = TrustedKey(KID, KEY.public_key(), "x").entry()


@pytest.mark.parametrize(
    "document",
    [
        [],
        {"version": 1, "issued": "2026-11-29T00:00:00Z"},
        {"version": "1", "issued": "2026-11-29T00:00:00Z", "keys": []},
        {"version": 1, "issued": "2026-11-29T00:00:00", "keys": []},  # no offset
        {"version": 1, "issued": "yesterday", "keys": []},
        {"version": 1, "issued": "2026-11-29T00:00:00Z", "keys": [], "extra": 1},
        {"version": 1, "issued": "2026-11-29T00:00:00Z", "keys": [ENTRY, ENTRY]},
        {"version": 1, "issued": "2026-11-29T00:00:00Z", "keys": [{**ENTRY, "kid": "0a0b"}]},
        {"version": 1, "issued": "2026-11-29T00:00:00Z", "keys": [{**ENTRY, "kid": "zz0b0c0d"}]},
        {"version": 1, "issued": "2026-11-29T00:00:00Z", "keys": [{**ENTRY, "public_key": "AAAA"}]},
        {"version": 1, "issued": "2026-11-29T00:00:00Z", "keys": [{**ENTRY, "public_key": "!!"}]},
        {"version": 1, "issued": "2026-11-29T00:00:00Z", "keys": [{**ENTRY, "comment": "x"}]},
        {"version": 1, "issued": "2026-11-29T00:00:00Z", "keys": ["0a0b0c0d"]},
    ],
)
def test_trust_store_rejects_bad_documents(document: object) -> None:
    with pytest.raises(TrustError):
        TrustStore.from_json(document, source="t.json")


def test_trust_store_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{")
    with pytest.raises(TrustError, match=r"broken\.json"):
        TrustStore.load(path)


# -- command line ---------------------------------------------------------------------------


def cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "scanner", "pass", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_round_trip(tmp_path: Path) -> None:
    keygen = cli("keygen", "--out", "keys", "--name", "HR office", cwd=tmp_path)
    assert keygen.returncode == 0, keygen.stderr
    kid = keygen.stdout.strip()
    key_file = tmp_path / "keys" / "issuer.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    entry = json.loads((tmp_path / "keys" / "issuer.pub.json").read_text())
    assert entry["kid"] == kid and entry["name"] == "HR office"

    again = cli("keygen", "--out", "keys", cwd=tmp_path)
    assert again.returncode == 2 and "not overwriting" in again.stderr

    trust = cli("trust", "--out", "trust.json", "--version", "5", "keys/issuer.pub.json", cwd=tmp_path)
    assert trust.returncode == 0, trust.stderr
    assert TrustStore.load(tmp_path / "trust.json").version == 5

    issued = cli(
        "issue",
        "--key",
        "keys/issuer.key",
        "--subject",
        "NV-0042",
        "--valid-from",
        "2026-11-29T08:00+07:00",
        "--valid-until",
        "2099-12-31T23:59+07:00",
        "--site",
        "bxmd",
        "--out",
        "pass1",
        "--terminal",
        cwd=tmp_path,
    )
    assert issued.returncode == 0, issued.stderr
    text = issued.stdout.splitlines()[0]
    assert text.startswith("GP1:") and len(text) <= 154
    assert len(issued.stdout.splitlines()) > 10  # the terminal QR code
    assert (tmp_path / "pass1.svg").read_text().lstrip().startswith("<?xml")

    # The written PNG decodes back to exactly the printed text.
    image = cv2.imread(str(tmp_path / "pass1.png"), cv2.IMREAD_GRAYSCALE)
    assert [s.payload for s in Decoder().decode(image)] == [text.encode()]

    for how in ([text], ["--image", "pass1.png"]):
        verified = cli("verify", "--trust", "trust.json", *how, cwd=tmp_path)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        result = json.loads(verified.stdout)
        assert result["valid"] is True and result["reason"] == "ok"
        assert result["issuer"] == kid and result["site"] == "bxmd"
        assert result["valid_from"] == "2026-11-29T01:00:00Z"
        assert "NV-0042" not in verified.stdout

    shown = cli("verify", "--trust", "trust.json", "--show-subject", text, cwd=tmp_path)
    assert json.loads(shown.stdout)["subject"] == "NV-0042"

    expired = cli("verify", "--trust", "trust.json", "--now", "2100-01-01T00:00Z", text, cwd=tmp_path)
    assert expired.returncode == 1 and json.loads(expired.stdout)["reason"] == "expired"
    early = cli("verify", "--trust", "trust.json", "--now", "2026-11-28T00:00Z", text, cwd=tmp_path)
    assert early.returncode == 1 and json.loads(early.stdout)["reason"] == "not_yet_valid"
    elsewhere = cli("verify", "--trust", "trust.json", "--site", "other", text, cwd=tmp_path)
    assert elsewhere.returncode == 1 and json.loads(elsewhere.stdout)["reason"] == "wrong_site"
    tampered = text[:-5] + ("0" if text[-5] != "0" else "1") + text[-4:]
    bad = cli("verify", "--trust", "trust.json", tampered, cwd=tmp_path)
    assert bad.returncode == 1 and json.loads(bad.stdout)["reason"] in ("bad_signature", "malformed")

    show = cli("show", text, cwd=tmp_path)
    assert show.returncode == 0, show.stderr
    fields = json.loads(show.stdout)
    assert fields["kid"] == kid and fields["verified"] is False and "subject" not in fields
    assert fields["valid_until"] == "2099-12-31T16:59:00Z" and fields["subject_bytes"] == 7
    assert json.loads(cli("show", "--show-subject", text, cwd=tmp_path).stdout)["subject"] == "NV-0042"


@pytest.mark.parametrize(
    "args",
    [
        ("issue", "--key", "missing.key", "--subject", "s", "--valid-until", "2099-01-01T00:00Z"),
        ("verify", "--trust", "missing.json", "GP1:AAA"),
        ("issue",),
        ("keygen", "--out", "k", "--kid", "xyz"),
    ],
)
def test_cli_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_cli_issue_needs_an_offset_and_a_matching_kid(tmp_path: Path) -> None:
    assert cli("keygen", "--out", "a", "--kid", "01020304", cwd=tmp_path).stdout.strip() == "01020304"
    assert cli("keygen", "--out", "b", cwd=tmp_path).returncode == 0
    naive = cli(
        "issue", "--key", "a/issuer.key", "--subject", "s", "--valid-until", "2099-01-01T00:00", cwd=tmp_path
    )
    assert naive.returncode == 2 and "offset" in naive.stderr
    # A public entry beside the key that belongs to another key must not lend it its kid.
    (tmp_path / "a" / "issuer.pub.json").write_bytes((tmp_path / "b" / "issuer.pub.json").read_bytes())
    mixed = cli(
        "issue", "--key", "a/issuer.key", "--subject", "s", "--valid-until", "2099-01-01T00:00Z", cwd=tmp_path
    )
    assert mixed.returncode == 2 and "different key" in mixed.stderr


def test_times_beyond_the_calendar_are_malformed() -> None:
    credential = VERIFIER.parse(raw_pass(header(1, start=0, end=0xFFFFFFFF) + b"x"), NOW)
    assert credential is not None and credential.problem is Reason.MALFORMED


def test_decoded_body_repr_hides_the_subject() -> None:
    body = signed.decode_pass(issue(b"NV-0042").encode())
    assert body.subject == b"NV-0042" and "NV-0042" not in repr(body)


def test_cli_show_reports_a_malformed_pass(tmp_path: Path) -> None:
    result = cli("show", "GP1:AB", cwd=tmp_path)
    assert result.returncode == 1 and json.loads(result.stdout)["valid_format"] is False


@pytest.mark.parametrize("wrapping", [(b"", b"\r\n"), (b"", b"\n"), (b"\xef\xbb\xbf", b"")])
def test_a_line_ending_or_bom_around_a_pass_does_not_spoil_it(wrapping: tuple[bytes, bytes]) -> None:
    from scanner.credentials import CredentialReader

    before, after = wrapping
    credential = CredentialReader([VERIFIER.parse]).parse(before + issue().encode() + after, NOW)
    assert credential.type == CredentialType.SIGNED and credential.problem is None, credential.detail
