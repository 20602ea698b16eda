"""The entry decision: a pure function of credential, lists, accepted types and the clock."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from scanner.models import Credential, CredentialType, Decision, Reason

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Lists:
    """Allow and deny lists of identities (raw values as printed in the code)."""

    deny: frozenset[bytes] = frozenset()
    allow: frozenset[bytes] | None = None  # None: no allow list, every valid credential may pass

    @classmethod
    def load(cls, allow_file: Path | None, deny_file: Path | None) -> Lists:
        return cls(
            deny=read_list(deny_file) if deny_file else frozenset(),
            allow=read_list(allow_file) if allow_file else None,
        )


def read_list(path: Path) -> frozenset[bytes]:
    """One entry per line; blank lines and lines starting with '#' are ignored."""
    entries = set()
    for line in path.read_bytes().splitlines():
        entry = line.strip()
        if entry and not entry.startswith(b"#"):
            entries.add(entry)
    return frozenset(entries)


def decide(
    credential: Credential,
    *,
    lists: Lists,
    accept: frozenset[CredentialType],
    site: str,
    now: datetime,
) -> Decision:
    def reject(reason: Reason, detail: str = "") -> Decision:
        return Decision(False, reason, credential, detail or credential.detail)

    if credential.problem is not None:
        return reject(credential.problem)
    if credential.type not in accept:
        return reject(Reason.TYPE_NOT_ACCEPTED, f"{credential.type} is not accepted here")
    # Deny beats everything else: a revoked badge must not pass because it is also allowed.
    if credential.identity in lists.deny:
        return reject(Reason.DENYLISTED)
    if lists.allow is not None and credential.identity not in lists.allow:
        return reject(Reason.NOT_ALLOWLISTED)
    if credential.valid_from is not None and now < credential.valid_from:
        return reject(Reason.NOT_YET_VALID)
    if credential.valid_until is not None and now >= credential.valid_until:
        return reject(Reason.EXPIRED)
    if credential.site is not None and credential.site != site:
        return reject(Reason.WRONG_SITE)
    return Decision(True, Reason.OK, credential)
