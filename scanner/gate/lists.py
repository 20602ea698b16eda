"""Everything the gate trusts or distrusts, loaded from files, with a version and an issue time.

Allow, deny and revocation lists are text files, one entry per line, with optional header
comments that say which version this is and when it was issued:

    # version: 2026-11-29.1
    # issued: 2026-11-29T06:00:00Z
    EMP-0001
    3f1c9a0d5e2b47a8c1d0e9f8a7b6c5d4      <- a subject pseudonym works too

Issuer trust stores (signed passes) and DCC trust lists are JSON with ``version`` and
``issued`` at the top. A gate offline for a week still decides, but it must know (and say in
``status``) how old its lists are: past ``policy.max_list_age_h`` a list is stale.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scanner.config import Config
from scanner.credentials.dcc import DccTrustList
from scanner.credentials.signed import TrustStore
from scanner.events import parse_utc

log = logging.getLogger(__name__)

_HEADER = re.compile(rb"#\s*(version|issued)\s*:\s*(.+?)\s*$", re.I)


class ListError(Exception):
    """A list file could not be loaded; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class ListInfo:
    name: str
    path: Path
    version: str | None
    issued: datetime | None
    entries: int

    def age_s(self, now: datetime) -> float | None:
        return None if self.issued is None else (now - self.issued).total_seconds()


# A subject pseudonym as events carry it (events.Pseudonymizer): 32 hex digits. A list entry
# of that shape matches only a credential's pseudonym, never its raw text: pseudonyms are
# published in every event, and a plain code that spells one must not pass for its holder.
_PSEUDONYM = re.compile(rb"[0-9a-fA-F]{32}")


def id_key(raw: bytes) -> bytes:
    """How revocation entries and credential ids compare: case-insensitive, and a DCC's
    UVCI with or without its ``URN:UVCI:`` prefix."""
    return raw.strip().upper().removeprefix(b"URN:UVCI:")


# "cccd:079190001234", "plain:EMP-0001": an entry that names the one type it stands for.
_TYPED = re.compile(rb"(signed|dcc|cccd|plain):(.+)")


@dataclass(frozen=True, slots=True)
class TextList:
    entries: frozenset[bytes]
    info: ListInfo
    raw: frozenset[bytes] = field(init=False)  # untyped, compared with a credential's identity
    typed: frozenset[tuple[str, bytes]] = field(init=False)  # (type, identity)
    pseudonyms: frozenset[bytes] = field(init=False)  # lower-case hex, compared with its subject
    ids: frozenset[bytes] = field(init=False)  # id_key() of each entry, for revocation

    def __post_init__(self) -> None:
        pseudonyms = {e for e in self.entries if _PSEUDONYM.fullmatch(e)}
        typed = {(m.group(1).decode(), m.group(2)) for e in self.entries if (m := _TYPED.fullmatch(e))}
        object.__setattr__(self, "typed", frozenset(typed))
        object.__setattr__(self, "raw", self.entries - pseudonyms - {f"{t}:".encode() + i for t, i in typed})
        object.__setattr__(self, "pseudonyms", frozenset(e.lower() for e in pseudonyms))
        object.__setattr__(self, "ids", frozenset(id_key(e) for e in self.entries))

    def matches(self, kind: str, identity: bytes, subject: str | None, *, untyped: bool = True) -> bool:
        """Is this credential listed: by its pseudonym, by ``kind:identity``, or (when
        ``untyped``) by its bare identity?"""
        if subject is not None and subject.lower().encode() in self.pseudonyms:
            return True
        return (kind, identity) in self.typed or (untyped and identity in self.raw)


def read_text_list(name: str, path: Path) -> TextList:
    try:
        # Windows editors save a BOM: left in, it would glue itself to the first entry or
        # hide the '# issued:' header.
        lines = path.read_bytes().removeprefix(b"\xef\xbb\xbf").splitlines()
    except OSError as exc:
        raise ListError(f"{path}: cannot read {name}: {exc.strerror or exc}") from exc
    meta: dict[str, str] = {}
    entries = set()
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith(b"#"):
            header = _HEADER.match(line)
            if header:
                meta[header.group(1).decode().lower()] = header.group(2).decode("utf-8", "replace")
            continue
        if len(line) > 1024:
            raise ListError(f"{path}:{number}: entry longer than 1024 bytes")
        entries.add(line)
    issued = None
    if "issued" in meta:
        try:
            issued = parse_utc(meta["issued"])
        except ValueError as exc:
            raise ListError(f"{path}: '# issued:' is not an RFC 3339 time: {exc}") from exc
    info = ListInfo(name, path, meta.get("version"), issued, len(entries))
    return TextList(frozenset(entries), info)


@dataclass(frozen=True, slots=True)
class TrustData:
    """One consistent snapshot of every list; replaced whole on reload (never mutated)."""

    allow: TextList | None = None
    deny: TextList | None = None
    revoked: TextList | None = None
    pass_trust: TrustStore | None = None
    dcc_trust: DccTrustList | None = None
    infos: tuple[ListInfo, ...] = field(default=())

    def ages(self, now: datetime) -> dict[str, dict[str, Any]]:
        """For the retained ``status``: version, issue time and age of each list."""
        return {
            info.name: {
                "version": info.version,
                "issued": None if info.issued is None else info.issued.isoformat().replace("+00:00", "Z"),
                "age_s": None if info.issued is None else round(info.age_s(now) or 0.0),
                "entries": info.entries,
            }
            for info in self.infos
        }

    def stale(self, now: datetime, max_age_s: float, names: frozenset[str]) -> list[str]:
        """Names of the lists among ``names`` older than ``max_age_s`` (0: nothing is ever stale).

        A list that does not say when it was issued counts as stale: its age is unknown, and
        a gate that must not trust old lists cannot assume it is new.
        """
        if max_age_s <= 0:
            return []
        return [
            info.name
            for info in self.infos
            if info.name in names and (info.issued is None or (now - info.issued).total_seconds() > max_age_s)
        ]


def load(config: Config) -> TrustData:
    """Load every configured list; raise ListError naming the file on any problem."""
    policy = config.policy
    infos: list[ListInfo] = []

    def text(name: str, path: Path | None) -> TextList | None:
        if path is None:
            return None
        loaded = read_text_list(name, path)
        infos.append(loaded.info)
        return loaded

    allow = text("allowlist", policy.allowlist_file)
    deny = text("denylist", policy.denylist_file)
    revoked = text("revocation", policy.revocation_file)
    pass_trust = dcc_trust = None
    if policy.pass_trust_file is not None:
        pass_trust = _load_json_store("pass_trust", policy.pass_trust_file, TrustStore.load, infos)
    if policy.dcc_trust_file is not None:
        dcc_trust = _load_json_store("dcc_trust", policy.dcc_trust_file, DccTrustList.load, infos)
    return TrustData(allow, deny, revoked, pass_trust, dcc_trust, tuple(infos))


def _load_json_store(name: str, path: Path, loader: Any, infos: list[ListInfo]) -> Any:
    """Load a JSON trust store; its loader checks the format, we record version and age."""
    try:
        store = loader(path)
    except Exception as exc:  # each store raises its own error type; name the file here
        raise ListError(f"{path}: cannot load {name}: {exc}") from exc
    issued = store.issued.astimezone(UTC) if store.issued is not None else None
    entries = len(store.keys) if hasattr(store, "keys") else len(store)
    infos.append(ListInfo(name, path, str(store.version), issued, entries))
    return store
