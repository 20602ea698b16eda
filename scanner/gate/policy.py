"""The decision at the door: a pure function of the credential, the lists, the rules, the
site's inside count and the clock.

An exit gate never traps anyone: unless ``site.check_exits`` is set it opens for any code it
could read, and it is never refused for capacity. An entry gate at the site's cap rejects
(``capacity_full``) or, in soft mode, accepts with the ``over_capacity`` flag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from scanner.config import Config
from scanner.gate.lists import TrustData, id_key
from scanner.models import Credential, CredentialType, Decision, Reason

STALE_FLAG = "stale_trust_data"
OVER_CAPACITY_FLAG = "over_capacity"
_CARD_NUMBER = re.compile(rb"[0-9]{12}")  # the shape of a CCCD number

# Which lists a decision about each credential type depends on: only those can make it stale.
_LISTS_FOR: dict[CredentialType, frozenset[str]] = {
    CredentialType.SIGNED: frozenset({"pass_trust", "revocation", "allowlist", "denylist"}),
    CredentialType.DCC: frozenset({"dcc_trust", "revocation", "allowlist", "denylist"}),
    CredentialType.CCCD: frozenset({"allowlist", "denylist"}),
    CredentialType.PLAIN: frozenset({"allowlist", "denylist"}),
}


@dataclass(frozen=True, slots=True)
class Rules:
    accept: frozenset[CredentialType]
    site: str
    anti_passback_s: float = 0.0
    max_list_age_s: float = 0.0
    stale_action: str = "reject"  # "reject" | "flag"
    direction: str = "in"  # "in" | "out"
    check_exits: bool = False
    capacity: int = 0  # 0: no cap
    soft_capacity: bool = False

    @classmethod
    def from_config(cls, config: Config) -> Rules:
        policy = config.policy
        return cls(
            accept=frozenset(CredentialType(t) for t in policy.accept),
            site=config.device.site,
            anti_passback_s=policy.anti_passback_s,
            max_list_age_s=policy.max_list_age_h * 3600.0,
            stale_action=policy.stale_lists,
            direction=config.device.direction,
            check_exits=config.site.check_exits,
            capacity=config.site.capacity,
            soft_capacity=config.site.capacity_mode == "soft",
        )


def decide(
    credential: Credential,
    *,
    subject: str | None,
    rules: Rules,
    trust: TrustData,
    now: datetime,
    since_last_accept_s: float | None = None,
    inside: int = 0,
) -> Decision:
    """Accept or reject with a reason.

    ``subject`` is the credential's pseudonym (lists may hold pseudonyms instead of raw IDs,
    so a list file leaks nobody's ID number). ``since_last_accept_s`` is how long ago this
    same credential was last accepted at this gate (anti-passback), measured by the caller
    on a monotonic clock so that a wall-clock jump cannot lock anyone out. ``inside`` is the
    site's count as this gate sees it (read only when there is a cap).
    """
    if rules.direction == "out" and not rules.check_exits:
        # Whoever is inside may leave: a code the camera could read is enough, and it is
        # recorded (its pseudonym, when it has one) so the stay can be closed centrally.
        return Decision(True, Reason.OK, credential)

    def reject(reason: Reason, detail: str = "") -> Decision:
        return Decision(False, reason, credential, detail or credential.detail)

    if credential.problem is not None:
        return reject(credential.problem)
    if credential.type not in rules.accept:
        return reject(Reason.TYPE_NOT_ACCEPTED, f"{credential.type} is not accepted here")
    # Deny beats everything else: a banned badge must not pass because it is also allowed.
    kind = str(credential.type)
    if trust.deny is not None and trust.deny.matches(kind, credential.identity, subject):
        return reject(Reason.DENYLISTED)
    revoked = trust.revoked
    if revoked is not None and credential.credential_id and id_key(credential.credential_id) in revoked.ids:
        return reject(Reason.REVOKED)
    # A plain code proves nothing: one that spells an ID-card number is somebody who knows
    # the number, not the card. It matches an allow entry only where the entry says "plain:".
    untyped = not (credential.type is CredentialType.PLAIN and _CARD_NUMBER.fullmatch(credential.identity))
    if trust.allow is not None and not trust.allow.matches(
        kind, credential.identity, subject, untyped=untyped
    ):
        return reject(Reason.NOT_ALLOWLISTED)
    if credential.valid_from is not None and now < credential.valid_from:
        return reject(Reason.NOT_YET_VALID)
    if credential.valid_until is not None and now >= credential.valid_until:
        return reject(Reason.EXPIRED)
    if credential.site is not None and credential.site != rules.site:
        return reject(Reason.WRONG_SITE)
    flags: tuple[str, ...] = ()
    stale = trust.stale(now, rules.max_list_age_s, _LISTS_FOR.get(credential.type, frozenset()))
    if stale:
        if rules.stale_action == "reject":
            return reject(Reason.STALE_TRUST_DATA, f"stale: {', '.join(stale)}")
        flags = (STALE_FLAG,)
    if (
        since_last_accept_s is not None
        and rules.anti_passback_s > 0
        and since_last_accept_s < rules.anti_passback_s
    ):
        return reject(Reason.ANTI_PASSBACK, f"accepted here {since_last_accept_s:.0f} s ago")
    # Last: a person who may not enter anyway hears why, not that the site is full.
    if rules.capacity > 0 and rules.direction == "in" and inside >= rules.capacity:
        if not rules.soft_capacity:
            return reject(Reason.CAPACITY_FULL, f"{inside} inside, capacity {rules.capacity}")
        flags += (OVER_CAPACITY_FLAG,)
    return Decision(True, Reason.OK, credential, flags=flags)
