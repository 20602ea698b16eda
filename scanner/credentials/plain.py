"""Plain codes: a ticket number, an employee badge, a visitor code printed by the venue.

Anything that is short printable text and not a self-identifying signed format. Its identity
is the text itself; it proves nothing, so gates that need proof use an allow list.
"""

from __future__ import annotations

import re

from scanner.models import Credential, CredentialType, Reason

MAX_BYTES = 256  # badge and ticket codes are short; longer text is not a plain code
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f-\x9f]+")

# Formats this build recognises but cannot verify yet. They must never pass as plain codes:
# an EU DCC or an ID card accepted without its own checks would be an unverified entry.
_UNVERIFIABLE = (
    (re.compile(rb"HC1:"), "EU DCC health certificate (not verifiable by this build)"),
    (re.compile(rb"\d{12}\|"), "CCCD ID-card code (not supported by this build)"),
)


def parse(payload: bytes) -> Credential | None:
    for pattern, what in _UNVERIFIABLE:
        if pattern.match(payload):
            return Credential(CredentialType.UNKNOWN, b"", problem=Reason.UNKNOWN_FORMAT, detail=what)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return Credential(CredentialType.UNKNOWN, b"", problem=Reason.UNKNOWN_FORMAT, detail="binary payload")
    if not text.strip() or not _PRINTABLE.fullmatch(text):
        return Credential(
            CredentialType.UNKNOWN, b"", problem=Reason.UNKNOWN_FORMAT, detail="empty or control characters"
        )
    if len(payload) > MAX_BYTES:
        return Credential(
            CredentialType.PLAIN,
            b"",
            problem=Reason.MALFORMED,
            detail=f"{len(payload)} bytes is longer than a plain code ({MAX_BYTES})",
        )
    return Credential(CredentialType.PLAIN, text.strip().encode("utf-8"))
