import random
import re
import string
import unicodedata
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from scanner import credentials
from scanner.credentials.signed import PassIssuer, TrustedKey, TrustStore
from scanner.gate import lists, policy
from scanner.gate.lists import ListInfo, TextList, TrustData
from scanner.models import Credential, CredentialType, Reason

NOW = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
ALL = frozenset(CredentialType) - {CredentialType.UNKNOWN}
RULES = policy.Rules(accept=ALL, site="s1", anti_passback_s=60.0)
EMPTY = TrustData()


def text_list(name: str, *entries: bytes, issued: datetime | None = None) -> TextList:
    return TextList(frozenset(entries), ListInfo(name, Path(f"{name}.txt"), "1", issued, len(entries)))


def decide(payload: bytes, *, trust=EMPTY, rules=RULES, subject=None, since=None):
    credential = credentials.parse(payload, NOW)
    return policy.decide(
        credential, subject=subject, rules=rules, trust=trust, now=NOW, since_last_accept_s=since
    )


def check(credential: Credential, *, trust=EMPTY, rules=RULES, since=None) -> Reason:
    return policy.decide(
        credential, subject=None, rules=rules, trust=trust, now=NOW, since_last_accept_s=since
    ).reason


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"EMP-0001", Reason.OK),
        ("Nguyễn-0001".encode(), Reason.OK),
        (b"", Reason.UNKNOWN_FORMAT),
        (b"   ", Reason.UNKNOWN_FORMAT),
        (b"\xff\xfe\x00\x01", Reason.UNKNOWN_FORMAT),
        (b"line\nbreak", Reason.UNKNOWN_FORMAT),
        (b"EMP-0001\r\n", Reason.OK),  # a line ending some generators add is not part of it
        (b"\xef\xbb\xbfEMP-0001", Reason.OK),
        (b"\tEMP-0001 \x00", Reason.OK),
        (b"\x16EMP-0001", Reason.UNKNOWN_FORMAT),  # a control character is no padding
        (b"EMP-0001\x1d", Reason.UNKNOWN_FORMAT),
        (b"\xef\xbb\xbfHC1:NCFOXN%TS3DH\n", Reason.MALFORMED),  # still a DCC, never plain
        (b"A" * 257, Reason.MALFORMED),
        (b"HC1:NCFOXN%TS3DH", Reason.MALFORMED),  # always judged as a DCC, never as a plain code
        (b"GP1:ABCDEF", Reason.MALFORMED),
        ("001099012345|123456789|Nguyễn Văn A|01011990|Nam|Hà Nội|01012021".encode(), Reason.OK),
        (b"001099012345|123456789|A|32131990|Nam|X|01012021", Reason.MALFORMED),
    ],
)
def test_payload_table(payload, reason):
    assert decide(payload).reason == reason


def expected_for_random(payload: bytes) -> Reason:
    """What the README promises for a payload with no pass or DCC prefix: one that starts like
    an ID card (a number, then ``|`` and more fields) is judged as one, and random bytes make a
    malformed card; plain text up to 256 bytes is a code (with no lists, let in); longer text
    is malformed; anything else (binary, empty, control characters) is of unknown format."""
    payload = payload.removeprefix(b"\xef\xbb\xbf").strip(b" \t\r\n\x00")
    if re.match(rb"[ \t]*(?:[0-9]{12}[ \t]*\||[0-9]+[ \t]*\|(?:[^|]*\|){4})", payload):
        return Reason.MALFORMED
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return Reason.UNKNOWN_FORMAT
    if not text.strip() or any(unicodedata.category(c) == "Cc" for c in text):
        return Reason.UNKNOWN_FORMAT
    return Reason.MALFORMED if len(payload) > 256 else Reason.OK


def test_any_random_or_oversized_payload_is_a_reject_with_a_reason_never_an_exception():
    rng = random.Random(1)
    text_chars = string.ascii_letters + string.digits + "-_.#/"
    for size in [0, 1, 2, 7, 64, 255, 256, 257, 1000, 3000, 7089]:
        for _ in range(30):
            binary = bytes(rng.getrandbits(8) for _ in range(size))
            text = "".join(rng.choice(text_chars) for _ in range(size)).encode()
            for payload in (binary, text):
                decision = decide(payload)
                assert decision.reason == expected_for_random(payload), payload
                assert decision.accepted == (decision.reason == Reason.OK)
                if not decision.accepted:
                    assert decision.detail, payload  # an operator can see why


def test_allow_and_deny_by_raw_value_or_pseudonym():
    trust = TrustData(
        allow=text_list("allowlist", b"EMP-0001", b"EMP-0666", b"ab" * 16),
        deny=text_list("denylist", b"EMP-0666", b"cd" * 16),
    )
    assert decide(b"EMP-0001", trust=trust).reason == Reason.OK
    assert decide(b"EMP-0666", trust=trust).reason == Reason.DENYLISTED  # deny beats allow
    assert decide(b"EMP-9999", trust=trust).reason == Reason.NOT_ALLOWLISTED
    assert decide(b"EMP-9999", trust=trust, subject="ab" * 16).reason == Reason.OK  # listed by pseudonym
    assert decide(b"EMP-0001", trust=trust, subject="cd" * 16).reason == Reason.DENYLISTED
    assert decide(b"EMP-9999", trust=TrustData(deny=text_list("denylist", b"X"))).reason == Reason.OK


def test_type_not_accepted():
    rules = policy.Rules(accept=frozenset({CredentialType.SIGNED}), site="s1")
    assert decide(b"EMP-1", rules=rules).reason == Reason.TYPE_NOT_ACCEPTED


def signed(**kw) -> Credential:
    return Credential(CredentialType.SIGNED, b"subject-1", credential_id=b"0a0b0c", **kw)


def test_validity_window_and_site():
    assert check(signed(valid_until=NOW)) == Reason.EXPIRED
    assert check(signed(valid_until=NOW + timedelta(seconds=1))) == Reason.OK
    assert check(signed(valid_from=NOW + timedelta(seconds=1))) == Reason.NOT_YET_VALID
    assert check(signed(site="other")) == Reason.WRONG_SITE
    assert check(signed(site="s1")) == Reason.OK


def test_revocation_by_credential_id_in_hex():
    assert check(signed(), trust=TrustData(revoked=text_list("revocation", b"0a0b0c"))) == Reason.REVOKED
    # Hex copied from a spreadsheet is often upper case: it revokes all the same.
    assert check(signed(), trust=TrustData(revoked=text_list("revocation", b"0A0B0C"))) == Reason.REVOKED
    assert check(signed(), trust=TrustData(revoked=text_list("revocation", b"ffffff"))) == Reason.OK


def test_dcc_revocation_by_uvci_with_or_without_its_urn_prefix():
    dcc = Credential(CredentialType.DCC, b"dcc-identity", credential_id=b"URN:UVCI:01:VN:ABC123#X")
    for entry in (b"URN:UVCI:01:VN:ABC123#X", b"01:VN:ABC123#X", b"urn:uvci:01:vn:abc123#x"):
        assert check(dcc, trust=TrustData(revoked=text_list("revocation", entry))) == Reason.REVOKED, entry
    assert check(dcc, trust=TrustData(revoked=text_list("revocation", b"01:VN:OTHER"))) == Reason.OK


def test_a_plain_code_that_spells_a_listed_pseudonym_is_not_its_holder():
    # Pseudonyms are published in every event: printing one as a plain QR must not open the
    # gate for (or dodge the ban of) the person it stands for.
    pseudonym = "c5425260" * 4
    allow = TrustData(allow=text_list("allowlist", pseudonym.encode()))
    assert decide(pseudonym.encode(), trust=allow).reason == Reason.NOT_ALLOWLISTED
    assert decide(b"EMP-1", trust=allow, subject=pseudonym).reason == Reason.OK
    # Listed in upper case, the pseudonym still matches its holder.
    upper = TrustData(deny=text_list("denylist", pseudonym.upper().encode()))
    assert decide(b"EMP-1", trust=upper, subject=pseudonym).reason == Reason.DENYLISTED


def test_a_list_with_no_issue_time_is_stale_when_ages_matter():
    undated = text_list("pass_trust", issued=None)
    trust = TrustData(infos=(undated.info,))
    strict = policy.Rules(accept=ALL, site="s1", max_list_age_s=24 * 3600)
    assert check(signed(), trust=trust, rules=strict) == Reason.STALE_TRUST_DATA
    assert check(signed(), trust=trust) == Reason.OK  # max_list_age_s 0: ages never matter


def test_anti_passback_window():
    assert check(signed(), since=10.0) == Reason.ANTI_PASSBACK
    assert check(signed(), since=61.0) == Reason.OK
    assert (
        check(signed(), since=10.0, rules=policy.Rules(accept=ALL, site="s1", anti_passback_s=0)) == Reason.OK
    )


def test_stale_lists_reject_or_flag_only_for_the_types_that_use_them():
    old = text_list("pass_trust", issued=NOW - timedelta(hours=30))
    trust = TrustData(infos=(old.info,))
    strict = policy.Rules(accept=ALL, site="s1", max_list_age_s=24 * 3600)
    lenient = policy.Rules(accept=ALL, site="s1", max_list_age_s=24 * 3600, stale_action="flag")
    assert check(signed(), trust=trust, rules=strict) == Reason.STALE_TRUST_DATA
    flagged = policy.decide(signed(), subject=None, rules=lenient, trust=trust, now=NOW)
    assert flagged.accepted and flagged.flags == (policy.STALE_FLAG,)
    # A stale pass trust store says nothing about a plain badge.
    assert decide(b"EMP-1", trust=trust, rules=strict).reason == Reason.OK
    assert check(signed(), trust=trust, rules=policy.Rules(accept=ALL, site="s1")) == Reason.OK  # 0 = never


def test_list_files_carry_version_and_issue_time(tmp_path):
    path = tmp_path / "allow.txt"
    path.write_bytes(b"# version: 7\n# issued: 2026-11-28T06:00:00Z\n# staff\nEMP-0001\n\n  EMP-0002  \r\n")
    loaded = lists.read_text_list("allowlist", path)
    assert loaded.entries == {b"EMP-0001", b"EMP-0002"}
    assert loaded.info.version == "7" and loaded.info.issued == datetime(2026, 11, 28, 6, tzinfo=UTC)
    trust = TrustData(allow=loaded, infos=(loaded.info,))
    assert trust.ages(NOW)["allowlist"]["age_s"] == 26 * 3600
    # A byte-order mark (Windows editors) must not hide the header or the first entry.
    path.write_bytes(b"\xef\xbb\xbf# issued: 2026-11-28T06:00:00Z\nEMP-0003\n")
    loaded = lists.read_text_list("allowlist", path)
    assert loaded.entries == {b"EMP-0003"} and loaded.info.issued is not None
    path.write_bytes(b"# issued: yesterday\nX\n")
    with pytest.raises(lists.ListError, match=r"allow\.txt"):
        lists.read_text_list("allowlist", path)


def test_identity_is_not_in_repr():
    assert "EMP-0001" not in repr(credentials.parse(b"EMP-0001"))


# --- what surrounds a code, what hides in one, and which list entries stand for whom --------

ISSUER_KEY = Ed25519PrivateKey.generate()
ISSUER_KID = bytes.fromhex("0badc0de")
PASS_TRUST = TrustStore.of([TrustedKey(ISSUER_KID, ISSUER_KEY.public_key(), "t")], version=1, issued=NOW)
CARD = "079190001234|123456789|Nguyễn Văn A|01011990|Nam|Hà Nội|01012021"
# What apps, generators and phone keyboards put before or after a code's text.
EDGES = [" ", "\t", "\u00a0", "\u3000", "\u200b", "\ufeff", "\u2060", "\u3164", "\r\n"]


def with_pass_trust(payload: bytes, *, rules=RULES, trust: TrustData | None = None):
    trust = trust or TrustData()
    reader = credentials.reader_for(pass_trust=PASS_TRUST)
    return policy.decide(
        reader.parse(payload, NOW),
        subject=None,
        rules=rules,
        trust=TrustData(allow=trust.allow, deny=trust.deny, revoked=trust.revoked, pass_trust=PASS_TRUST),
        now=NOW,
    )


@pytest.mark.parametrize("edge", EDGES)
def test_nothing_around_a_code_changes_what_it_is(edge):
    issuer = PassIssuer(ISSUER_KEY, ISSUER_KID)
    expired = issuer.issue(b"EMP-0042", NOW - timedelta(days=2), NOW - timedelta(days=1))
    valid = issuer.issue(b"EMP-0042", NOW - timedelta(days=1), NOW + timedelta(days=1))
    plain_only = policy.Rules(accept=frozenset({CredentialType.PLAIN}), site="s1")
    for before, after in ((edge, ""), ("", edge), (edge, edge)):

        def around(text: str, before: str = before, after: str = after) -> bytes:
            return f"{before}{text}{after}".encode()

        # An expired pass stays an expired pass: it never falls through to "plain" and "ok".
        assert with_pass_trust(around(expired)).reason == Reason.EXPIRED, repr(edge)
        assert with_pass_trust(around(valid)).reason == Reason.OK, repr(edge)
        # A card stays a card: at a gate for plain codes only it is not accepted.
        assert with_pass_trust(around(CARD), rules=plain_only).reason == Reason.TYPE_NOT_ACCEPTED
        assert with_pass_trust(around("HC1:NCFOXN%TS3DH")).reason == Reason.MALFORMED
        # A deny-listed badge stays deny-listed.
        deny = TrustData(deny=text_list("denylist", b"EMP-0666"))
        assert with_pass_trust(around("EMP-0666"), trust=deny).reason == Reason.DENYLISTED, repr(edge)


@pytest.mark.parametrize("hidden", ["\u200b", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u3164", "\u00a0"])
def test_a_plain_code_with_a_hidden_character_inside_is_refused(hidden):
    deny = TrustData(deny=text_list("denylist", b"EMP-0666"))
    decision = decide(f"EMP-{hidden}0666".encode(), trust=deny)
    assert decision.reason == Reason.MALFORMED and not decision.accepted
    assert decide(b"EMP 0666").reason == Reason.OK  # a plain ASCII space is part of many codes


def test_a_plain_code_spelling_a_card_number_is_not_the_card():
    number = b"079190001234"
    allow = TrustData(allow=text_list("allowlist", number))
    assert decide(CARD.encode(), trust=allow).reason == Reason.OK  # the card itself
    assert decide(number, trust=allow).reason == Reason.NOT_ALLOWLISTED  # someone who knows the number
    # A venue whose own tickets are 12-digit numbers says so in the entry.
    typed = TrustData(allow=text_list("allowlist", b"plain:" + number))
    assert decide(number, trust=typed).reason == Reason.OK
    assert decide(CARD.encode(), trust=typed).reason == Reason.NOT_ALLOWLISTED
    assert decide(CARD.encode(), trust=TrustData(allow=text_list("allowlist", b"cccd:" + number))).reason == (
        Reason.OK
    )
    # Deny entries match the number whatever encodes it: refusing more is the safe side.
    deny = TrustData(deny=text_list("denylist", number))
    assert decide(number, trust=deny).reason == Reason.DENYLISTED
    assert decide(CARD.encode(), trust=deny).reason == Reason.DENYLISTED
    # Untyped badge entries still serve badges and the passes issued for them.
    badges = TrustData(allow=text_list("allowlist", b"EMP-0042"))
    issuer = PassIssuer(ISSUER_KEY, ISSUER_KID)
    assert decide(b"EMP-0042", trust=badges).reason == Reason.OK
    pass_text = issuer.issue(b"EMP-0042", NOW - timedelta(days=1), NOW + timedelta(days=1)).encode()
    assert with_pass_trust(pass_text, trust=badges).reason == Reason.OK


# -- exits and the site's cap -------------------------------------------------------------------

DENY = TrustData(deny=text_list("denylist", b"EMP-0666"))
EXIT = policy.Rules(accept=ALL, site="s1", direction="out", capacity=2)
CAPPED = policy.Rules(accept=ALL, site="s1", capacity=2)
SOFT = policy.Rules(accept=ALL, site="s1", capacity=2, soft_capacity=True)


def site_decide(payload: bytes, rules: policy.Rules, inside: int, trust: TrustData = EMPTY):
    credential = credentials.parse(payload, NOW)
    return policy.decide(credential, subject=None, rules=rules, trust=trust, now=NOW, inside=inside)


@pytest.mark.parametrize("payload", [b"EMP-0666", b"\xff\xfe\x00", b"GP1:ABCDEF", b"A" * 300, b"EMP-0001"])
def test_an_exit_gate_lets_anyone_out_whatever_the_code_or_the_count(payload):
    decision = site_decide(payload, EXIT, inside=99, trust=DENY)
    assert decision.accepted and decision.reason is Reason.OK and decision.flags == ()


def test_a_checked_exit_is_judged_like_an_entry_but_never_by_the_cap():
    checked = policy.Rules(accept=ALL, site="s1", direction="out", capacity=2, check_exits=True)
    assert site_decide(b"EMP-0666", checked, inside=0, trust=DENY).reason is Reason.DENYLISTED
    assert site_decide(b"EMP-0001", checked, inside=99).accepted


@pytest.mark.parametrize(("inside", "reason"), [(0, Reason.OK), (1, Reason.OK), (2, Reason.CAPACITY_FULL)])
def test_the_cap_refuses_entries_from_the_capacity_on(inside, reason):
    assert site_decide(b"EMP-0001", CAPPED, inside=inside).reason is reason


def test_a_soft_cap_flags_instead_and_a_cap_of_zero_is_none():
    decision = site_decide(b"EMP-0001", SOFT, inside=5)
    assert decision.accepted and decision.flags == (policy.OVER_CAPACITY_FLAG,)
    assert site_decide(b"EMP-0001", RULES, inside=10**6).accepted


def test_at_the_cap_a_refusal_for_another_reason_keeps_that_reason():
    assert site_decide(b"EMP-0666", CAPPED, inside=2, trust=DENY).reason is Reason.DENYLISTED
