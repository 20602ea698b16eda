"""Payload → Credential. One module per format; the first that recognises a payload owns it.

A parser returns ``None`` for "not my format" and a Credential (possibly with ``problem``
set) for anything it recognises, so a malformed pass is reported as a malformed pass and
not as an unknown code. Parsers never raise on any input: a QR code is attacker-controlled;
should one raise anyway (a bug), the reader turns it into a ``malformed`` reject.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from scanner.credentials import cccd, dcc, plain, signed
from scanner.credentials.text import trim
from scanner.models import Credential, CredentialType, Reason

log = logging.getLogger(__name__)

ParseFn = Callable[[bytes, datetime], Credential | None]


class CredentialReader:
    def __init__(self, parsers: Sequence[ParseFn]) -> None:
        # Order matters: specific, self-identifying formats first; plain codes are the catch-all.
        self._parsers = tuple(parsers)

    def parse(self, payload: bytes, now: datetime) -> Credential:
        payload = trim(payload)
        for parser in self._parsers:
            try:
                credential = parser(payload, now)
            except Exception as exc:  # a parser bug must become a reject, never a dead gate
                log.exception("credential parser %s failed", getattr(parser, "__qualname__", parser))
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


def parse(payload: bytes, now: datetime | None = None) -> Credential:
    """Every format, with no trust data (tools, tests): signed formats come out ``unknown_issuer``."""
    return reader_for().parse(payload, now or datetime.now(UTC))


def reader_for(
    *,
    pass_trust: signed.TrustStore | None = None,
    dcc_trust: dcc.DccTrustList | None = None,
    dcc_rules: dcc.DccRules | None = None,
) -> CredentialReader:
    """The parsers a gate runs, bound to its current trust data.

    Every format is always recognised, even one this gate does not accept or has no trust
    data for: an EU DCC with no trust list configured is an ``unknown_issuer`` DCC, never a
    plain code that an empty allow list would let through.
    """
    pass_verifier = signed.PassVerifier(
        pass_trust or signed.TrustStore.of([], version=0, issued=datetime(1970, 1, 1, tzinfo=UTC))
    )
    dcc_verifier = dcc.DccVerifier(dcc_trust or dcc.DccTrustList.of([]), dcc_rules or dcc.DccRules())

    def _cccd(payload: bytes, _now: datetime) -> Credential | None:
        return cccd.parse(payload)

    def _plain(payload: bytes, _now: datetime) -> Credential | None:
        return plain.parse(payload)

    return CredentialReader([pass_verifier.parse, dcc_verifier.parse, _cccd, _plain])
