import os
from datetime import UTC, datetime, timedelta

import pytest

from scanner import credentials, policy
from scanner.models import Credential, CredentialType, Reason

NOW = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
ALL = frozenset(CredentialType) - {CredentialType.UNKNOWN}


NO_LISTS = policy.Lists()


def decide(payload: bytes, *, lists=NO_LISTS, accept=ALL):
    return policy.decide(credentials.parse(payload), lists=lists, accept=accept, site="s1", now=NOW)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"EMP-0001", Reason.OK),
        ("Nguyễn-0001".encode(), Reason.OK),
        (b"", Reason.UNKNOWN_FORMAT),
        (b"   ", Reason.UNKNOWN_FORMAT),
        (b"\xff\xfe\x00\x01", Reason.UNKNOWN_FORMAT),
        (b"line\nbreak", Reason.UNKNOWN_FORMAT),
        (b"A" * 257, Reason.MALFORMED),
        (b"HC1:NCFOXN%TS3DH", Reason.UNKNOWN_FORMAT),  # a DCC must never pass as a plain code
        ("001099012345|123456789|Nguyễn Văn A|01011990|Nam|Hà Nội|01012021".encode(), Reason.UNKNOWN_FORMAT),
    ],
)
def test_payload_table(payload, reason):
    assert decide(payload).reason == reason


def test_any_random_or_oversized_payload_is_a_reject_with_a_reason_never_an_exception():
    rng = __import__("random").Random(1)
    for size in [0, 1, 2, 7, 64, 255, 256, 257, 1000, 3000, 7089]:
        for _ in range(30):
            payload = bytes(rng.getrandbits(8) for _ in range(size))
            decision = decide(payload)
            assert isinstance(decision.reason, Reason)
            assert decision.accepted == (decision.reason == Reason.OK)
    assert not decide(os.urandom(3000)).accepted


def test_lists():
    lists = policy.Lists(deny=frozenset({b"EMP-0666"}), allow=frozenset({b"EMP-0001", b"EMP-0666"}))
    assert decide(b"EMP-0001", lists=lists).reason == Reason.OK
    assert decide(b"EMP-0666", lists=lists).reason == Reason.DENYLISTED  # deny beats allow
    assert decide(b"EMP-9999", lists=lists).reason == Reason.NOT_ALLOWLISTED
    assert decide(b"EMP-9999", lists=policy.Lists(deny=frozenset({b"X"}))).reason == Reason.OK


def test_type_not_accepted():
    assert decide(b"EMP-1", accept=frozenset({CredentialType.SIGNED})).reason == Reason.TYPE_NOT_ACCEPTED


def test_validity_window_and_site():
    def cred(**kw):
        return Credential(CredentialType.SIGNED, b"pass-1", **kw)

    def check(c):
        return policy.decide(c, lists=policy.Lists(), accept=ALL, site="s1", now=NOW).reason

    assert check(cred(valid_until=NOW)) == Reason.EXPIRED
    assert check(cred(valid_until=NOW + timedelta(seconds=1))) == Reason.OK
    assert check(cred(valid_from=NOW + timedelta(seconds=1))) == Reason.NOT_YET_VALID
    assert check(cred(site="other")) == Reason.WRONG_SITE
    assert check(cred(site="s1")) == Reason.OK


def test_list_files_ignore_comments_and_blank_lines(tmp_path):
    path = tmp_path / "allow.txt"
    path.write_bytes(b"# staff\nEMP-0001\n\n  EMP-0002  \r\n")
    assert policy.read_list(path) == {b"EMP-0001", b"EMP-0002"}


def test_identity_is_not_in_repr():
    assert b"EMP-0001".decode() not in repr(credentials.parse(b"EMP-0001"))
