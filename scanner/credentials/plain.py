"""Plain codes: a ticket number, an employee badge, a visitor code printed by the venue.

Anything that is short printable text and not one of the self-identifying formats, which
the reader tries first (so "HC1:…" is always judged as an EU DCC, never as a plain code). Its identity
is the text itself; it proves nothing, so gates that need proof use an allow list.
"""

from __future__ import annotations

import re

from scanner.credentials.text import invisible
from scanner.models import Credential, CredentialType, Reason

MAX_BYTES = 256  # badge and ticket codes are short; longer text is not a plain code
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f-\x9f]+")


def parse(payload: bytes) -> Credential | None:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return Credential(CredentialType.UNKNOWN, b"", problem=Reason.UNKNOWN_FORMAT, detail="binary payload")
    if not text.strip() or not _PRINTABLE.fullmatch(text):
        return Credential(
            CredentialType.UNKNOWN, b"", problem=Reason.UNKNOWN_FORMAT, detail="empty or control characters"
        )
    if any(invisible(c) and c != " " for c in text):
        # "EMP-\u200b0666" looks like a deny-listed badge and matches no list entry: the only
        # use of a zero-width character inside a code is to slip past a list.
        return Credential(
            CredentialType.PLAIN, b"", problem=Reason.MALFORMED, detail="invisible characters in a plain code"
        )
    if len(payload) > MAX_BYTES:
        return Credential(
            CredentialType.PLAIN,
            b"",
            problem=Reason.MALFORMED,
            detail=f"{len(payload)} bytes is longer than a plain code ({MAX_BYTES})",
        )
    return Credential(CredentialType.PLAIN, text.strip().encode("utf-8"))
