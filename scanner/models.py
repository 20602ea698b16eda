"""Records that cross module boundaries: Frame → Symbol → Credential → Decision → CheckinEvent.

Every record is frozen: a stage may read what the previous one produced but never change it,
so a frame or a decision can be handed between threads without locks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

import numpy as np


@dataclass(frozen=True, slots=True)
class Frame:
    """One grayscale camera frame (``uint8``, shape ``(height, width)``)."""

    image: np.ndarray
    seq: int
    captured: float  # time.monotonic() when the frame left the camera


@dataclass(frozen=True, slots=True)
class Symbol:
    """One decoded QR code. ``payload`` is authoritative for credentials: the bytes decide.

    ``text`` is the engine's own reading of those bytes for people (``gate-scanner decode``):
    zxing-cpp follows the code's ECI or guesses its character set (Latin-1, Shift_JIS, …),
    where decoding the bytes as UTF-8 would print mojibake. Without one, it is the bytes as
    UTF-8 with replacement characters.
    """

    payload: bytes
    engine: str  # "zxing" | "zbar"
    polygon: tuple[tuple[int, int], ...]  # four corners in image pixels
    text: str = ""

    def __post_init__(self) -> None:
        if not self.text:
            object.__setattr__(self, "text", self.payload.decode("utf-8", errors="replace"))


class CredentialType(StrEnum):
    SIGNED = "signed"
    DCC = "dcc"
    CCCD = "cccd"
    PLAIN = "plain"
    UNKNOWN = "unknown"
    # No payload behind them: the door's own events (README: Entries, exits, the door and corrections).
    EXIT_BUTTON = "exit_button"  # the door opened from inside
    NONE = "none"  # a passage nobody was let through (forced door, tailgating)


class Reason(StrEnum):
    """Reason codes of the check-in event: part of the MQTT contract, never renamed."""

    OK = "ok"
    UNKNOWN_FORMAT = "unknown_format"
    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_ISSUER = "unknown_issuer"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    REVOKED = "revoked"
    DENYLISTED = "denylisted"
    NOT_ALLOWLISTED = "not_allowlisted"
    WRONG_SITE = "wrong_site"
    TYPE_NOT_ACCEPTED = "type_not_accepted"
    ANTI_PASSBACK = "anti_passback"
    CAPACITY_FULL = "capacity_full"
    STALE_TRUST_DATA = "stale_trust_data"
    # Events that are not a scan's decision (README: Entries, exits, the door and corrections).
    NO_PASSAGE = "no_passage"  # decision "annulled": an accepted event nobody passed through
    EXIT_REQUEST = "exit_request"  # the exit button opened the door from inside
    FORCED_PASSAGE = "forced_passage"  # a passage with no accept and no exit button before it
    OCCUPANCY_SET = "occupancy_set"  # an operator set the site's count
    # The gate itself cannot record the check-in (outbox unwritable or full): fail secure.
    DEVICE_FAULT = "device_fault"


@dataclass(frozen=True, slots=True)
class Credential:
    """What a payload claims to be, after parsing (and, for signed formats, verifying).

    ``identity`` is the value a person is known by (a pass id, an ID-card number, a plain code).
    It is personal data: it is only ever turned into a keyed pseudonym and is kept out of
    ``repr`` so that it cannot reach a log line by accident.
    """

    type: CredentialType
    identity: bytes = field(repr=False)
    # The credential itself, as opposed to the person, as printable text (a pass id in hex,
    # a DCC's UVCI): revocation lists name it and anti-passback keys on it. Not personal
    # data, but kept out of logs anyway.
    credential_id: bytes = field(default=b"", repr=False)
    issuer: str | None = None
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    site: str | None = None
    # Set when the payload could not be parsed or verified; policy rejects with this reason.
    problem: Reason | None = None
    detail: str = ""  # human-readable cause for logs; never contains personal data


@dataclass(frozen=True, slots=True)
class Decision:
    accepted: bool
    reason: Reason
    credential: Credential
    detail: str = ""
    # Accepted, but with something operators must know about (e.g. "stale_trust_data").
    flags: tuple[str, ...] = ()

    @property
    def outcome(self) -> str:
        return "accepted" if self.accepted else "rejected"


@dataclass(frozen=True, slots=True)
class CheckinEvent:
    """The check-in record published on ``checkin`` (schema ``gate-scanner/checkin/1``)."""

    event_id: str
    seq: int
    device: str
    site: str
    direction: str
    ts: str  # scan time, UTC RFC 3339 with milliseconds
    clock_synced: bool
    decision: str
    reason: str
    credential_type: str
    subject: str | None  # keyed pseudonym, never the raw identity
    issuer: str | None = None
    valid_until: str | None = None
    flags: tuple[str, ...] = ()
    occupancy: int | None = None  # with reason occupancy_set: the inside count an operator set
    annuls: str | None = None  # with decision "annulled": the event_id of the accepted event it annuls
