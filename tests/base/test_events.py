import json
import stat
import uuid
from datetime import UTC, datetime

import jsonschema
import pytest

from scanner import credentials, events
from scanner.gate import policy
from scanner.gate.lists import TrustData
from scanner.models import CredentialType

SCHEMA = json.loads(events.schema_path().read_text())


def make(payload: bytes, seq: int = 1, key: bytes = b"k" * 32) -> dict:
    credential = credentials.parse(payload)
    decision = policy.decide(
        credential,
        subject=None,
        rules=policy.Rules(accept=frozenset(CredentialType), site="s"),
        trust=TrustData(),
        now=datetime.now(UTC),
    )

    event = events.build_event(
        decision,
        seq=seq,
        event_id=events.Uuid7().new(),
        device="gate-01",
        site="s",
        direction="in",
        scanned_at=datetime(2026, 11, 29, 1, 2, 3, 456789, tzinfo=UTC),
        clock_synced=True,
        subject=events.Pseudonymizer(key).subject(str(credential.type), credential.identity),
    )
    return json.loads(events.to_json(event))


@pytest.mark.parametrize("payload", [b"EMP-0001", b"\xff\x00", b"A" * 400, b"HC1:xx"])
def test_events_are_schema_valid(payload):
    jsonschema.validate(make(payload), SCHEMA)


def test_event_fields():
    event = make(b"EMP-0001", seq=7)
    assert event["ts"] == "2026-11-29T01:02:03.456Z"
    assert event["seq"] == 7 and event["decision"] == "accepted" and event["reason"] == "ok"
    assert "EMP-0001" not in json.dumps(event)  # only the pseudonym travels
    assert event["credential"]["subject"] == make(b"EMP-0001")["credential"]["subject"]
    assert event["credential"]["subject"] != make(b"EMP-0001", key=b"x" * 32)["credential"]["subject"]


def test_uuid7_is_version_7_unique_and_time_ordered():
    gen = events.Uuid7()
    ids = [gen.new(unix_ms=1_800_000_000_000) for _ in range(5000)] + [gen.new() for _ in range(100)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(uuid.UUID(i).version == 7 for i in ids)


def test_key_is_created_0600_once(tmp_path):
    path = tmp_path / "var" / "state" / "subject.key"  # two levels that do not exist yet
    key = events.load_or_create_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert events.load_or_create_key(path) == key
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="at least 16"):
        events.load_or_create_key(path)


def test_pseudonyms_are_pinned_to_their_derivation():
    # Lists and the collector hold pseudonyms made elsewhere (pki, passes, other gates of the
    # fleet): the derivation HMAC-SHA256(key, type NUL identity)[:16] can never change silently.
    p = events.Pseudonymizer(bytes(range(32)))
    assert p.subject("plain", b"EMP-0001") == "16ce50881bba287404291281fcda83fd"
    assert p.subject("cccd", b"079190001234") == "42f4324948037d5c14245312a272cc8a"
    assert p.subject("plain", b"") is None
