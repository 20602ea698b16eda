"""Decision → CheckinEvent → JSON, with time-ordered ids and keyed pseudonyms.

Check-ins are contact-tracing data: the event carries who (as a pseudonym), where, when and
the outcome, and nothing that names a person. The pseudonym is HMAC-SHA256 under a
per-deployment key: the same person gets the same subject at every gate of the deployment
(so tracing works), and nobody without the key can link a subject to an ID number.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from scanner.models import CheckinEvent, CredentialType, Decision

SCHEMA = "gate-scanner/checkin/1"
KEY_BYTES = 32
MIN_KEY_BYTES = 16  # HMAC-SHA256 under a shorter key could be searched for


class Uuid7:
    """RFC 9562 UUIDv7 with a 12-bit counter in rand_a, so ids made in the same millisecond
    still sort in creation order (the outbox may commit several per ms)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._counter = 0

    def new(self, unix_ms: int | None = None) -> str:
        with self._lock:
            ms = time.time_ns() // 1_000_000 if unix_ms is None else unix_ms
            if ms <= self._last_ms:
                self._counter += 1
                if self._counter > 0xFFF:  # 4096 ids in one ms: borrow the next millisecond
                    self._last_ms += 1
                    self._counter = 0
                ms = self._last_ms
            else:
                self._last_ms = ms
                self._counter = secrets.randbits(10)  # random start, leaves room to count up
            value = (ms & ((1 << 48) - 1)) << 80
            value |= 0x7 << 76
            value |= self._counter << 64
            value |= 0b10 << 62
            value |= secrets.randbits(62)
        return str(uuid.UUID(int=value))


def read_key(path: Path) -> bytes:
    """An existing pseudonym key; OSError when unreadable, ValueError when too short."""
    key = path.read_bytes()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{path}: {len(key)} bytes; a pseudonym key needs at least {MIN_KEY_BYTES}")
    return key


def load_or_create_key(path: Path) -> bytes:
    """Read the pseudonym key, creating it (0600, in a 0700 directory) on first run."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_key(path)
    key = secrets.token_bytes(KEY_BYTES)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


class Pseudonymizer:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def subject(self, credential_type: str, identity: bytes) -> str | None:
        if not identity:
            return None
        # The type is part of the message: a plain code "123" and a pass id "123" are different people.
        mac = hmac.new(self._key, credential_type.encode() + b"\x00" + identity, hashlib.sha256)
        return mac.hexdigest()[:32]


def utc_ms(moment: datetime) -> str:
    """The one time format on the wire and on disk: UTC, RFC 3339, milliseconds, ``Z``.

    A naive datetime is taken as UTC (SQLite hands them back that way)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_ms() -> str:
    return utc_ms(datetime.now(UTC))


def parse_utc(text: str) -> datetime:
    """An RFC 3339 time with an offset (``Z`` or ``+07:00``), as UTC; ValueError otherwise.

    A time without an offset is refused rather than guessed: on a gate in UTC+7 a guess is
    seven hours wrong in one direction or the other."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset")
    return moment.astimezone(UTC)


def build_event(
    decision: Decision,
    *,
    seq: int,
    event_id: str,
    device: str,
    site: str,
    direction: str,
    scanned_at: datetime,
    clock_synced: bool,
    subject: str | None,
) -> CheckinEvent:
    credential = decision.credential
    # A health certificate's validity end comes from its health content (a test's sample time
    # plus 72 h, a recovery's end date): published with a trackable pseudonym it would say who
    # tested when, or who had COVID. Policy still judges it; no record carries it.
    shown_until = None if credential.type is CredentialType.DCC else credential.valid_until
    return CheckinEvent(
        event_id=event_id,
        seq=seq,
        device=device,
        site=site,
        direction=direction,
        ts=utc_ms(scanned_at),
        clock_synced=clock_synced,
        decision=decision.outcome,
        reason=str(decision.reason),
        credential_type=str(credential.type),
        subject=subject,
        issuer=credential.issuer,
        valid_until=utc_ms(shown_until) if shown_until else None,
        flags=decision.flags,
    )


def to_json(event: CheckinEvent) -> bytes:
    fields = asdict(event)
    flags = fields.pop("flags")
    occupancy = fields.pop("occupancy")
    annuls = fields.pop("annuls")
    credential = {
        "type": fields.pop("credential_type"),
        "subject": fields.pop("subject"),
        "issuer": fields.pop("issuer"),
        "valid_until": fields.pop("valid_until"),
    }
    document = {
        "schema": SCHEMA,
        **fields,
        "credential": {k: v for k, v in credential.items() if v is not None},
    }
    if flags:
        document["flags"] = list(flags)
    if occupancy is not None:
        document["occupancy"] = {"inside": occupancy}
    if annuls is not None:
        document["annuls"] = annuls
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def schema_path(name: str = "checkin") -> Path:
    """The JSON Schema shipped for a payload: ``checkin``, ``status``, ``health``, ``cmd-reply``,
    ``occupancy``."""
    return Path(__file__).with_name("schemas") / f"{name}-1.json"
