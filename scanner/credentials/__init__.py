"""Payload → Credential. One module per format; the first that recognises a payload owns it.

A parser returns ``None`` for "not my format" and a Credential (possibly with ``problem``
set) for anything it recognises, so a malformed pass is reported as a malformed pass and
not as an unknown code. Parsers never raise on any input: a QR code is attacker-controlled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from scanner.credentials import plain
from scanner.models import Credential, CredentialType, Reason

log = logging.getLogger(__name__)

Parser = Callable[[bytes], Credential | None]

# Order matters: specific, self-identifying formats first; plain codes are the catch-all.
PARSERS: tuple[Parser, ...] = (plain.parse,)


def parse(payload: bytes) -> Credential:
    for parser in PARSERS:
        try:
            credential = parser(payload)
        except Exception as exc:  # a parser bug must become a reject, never a dead gate
            log.exception("credential parser %s failed", parser.__module__)
            return Credential(
                CredentialType.UNKNOWN,
                b"",
                problem=Reason.MALFORMED,
                detail=f"parser error: {type(exc).__name__}",
            )
        if credential is not None:
            return credential
    return Credential(
        CredentialType.UNKNOWN, b"", problem=Reason.UNKNOWN_FORMAT, detail="no parser recognised it"
    )
