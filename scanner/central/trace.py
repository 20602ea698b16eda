"""Contact tracing (`gate-scanner trace`): a subject's visits and who shared them.

The store never holds raw IDs, only keyed pseudonyms, so the raw ID the health authority
asks about is turned into its pseudonym here with the deployment key. The key is only read:
a missing key means this machine cannot trace (a fresh key would match nobody).

The pseudonym covers the credential type as well as the identity (a plain code "123" and a
pass subject "123" are different people), so without ``--type`` every type that carries a
typed-in identity is tried and all their visits are reported.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from scanner import events
from scanner.central.store import Store, StoreError, Visit, open_store
from scanner.config import load_central
from scanner.console import load_or_report
from scanner.events import Pseudonymizer

DEFAULT_TYPES = ("plain", "cccd", "signed")
FORMATS = ("table", "json", "csv")
_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_PSEUDONYM = re.compile(r"[0-9a-f]{32}")


class TraceError(Exception):
    """A usage problem (bad time, missing key): exit 2 with this message."""


@dataclass(frozen=True, slots=True)
class TraceRow:
    kind: str  # "visit" (the subject) or "contact" (someone else at the same site)
    subject: str
    site: str
    device: str
    direction: str
    ts: str
    decision: str
    reason: str
    visit_ts: str  # for a contact: the subject's visit it overlaps; for a visit: its own ts
    delta_s: float  # contact ts - visit ts


def parse_time(text: str) -> datetime:
    """ISO 8601 (``2026-11-29T08:00``, ``…Z``, ``…+07:00``); without an offset, UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise TraceError(f"{text!r} is not an ISO 8601 time (e.g. 2026-11-29T08:00:00Z)") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def parse_duration(text: str) -> timedelta:
    """``15m``, ``90s``, ``1h30m`` or plain seconds."""
    if text.isdigit():
        return timedelta(seconds=int(text))
    match = _DURATION.fullmatch(text)
    if not text or match is None:
        raise TraceError(f"{text!r} is not a duration (e.g. 15m, 90s, 1h30m)")
    h, m, s = (int(g) if g else 0 for g in match.groups())
    return timedelta(hours=h, minutes=m, seconds=s)


def read_key(path: Path) -> bytes:
    """The deployment's pseudonym key, never created here (see module doc)."""
    try:
        return events.read_key(path)
    except FileNotFoundError:
        raise TraceError(
            f"pseudonym key {path} does not exist: copy the deployment's subject.key here "
            "(a new key would match nobody)"
        ) from None
    except OSError as exc:
        raise TraceError(f"cannot read pseudonym key {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise TraceError(str(exc)) from None


def pseudonyms(key: bytes, identity: str, types: Iterable[str] = DEFAULT_TYPES) -> list[str]:
    """Every pseudonym ``identity`` has under ``key`` for the given credential types."""
    p = Pseudonymizer(key)
    raw = identity.strip().encode("utf-8")
    out = []
    for t in types:
        subject = p.subject(t, raw)
        if subject is not None and subject not in out:
            out.append(subject)
    return out


def check_pseudonym(text: str) -> str:
    value = text.strip().lower()
    if not _PSEUDONYM.fullmatch(value):
        raise TraceError(f"--pseudonym: {text!r} is not 32 hex digits")
    return value


def trace(
    store: Store, subjects: Sequence[str], start: datetime, end: datetime, window: timedelta
) -> list[TraceRow]:
    """The subjects' visits in [start, end], each followed by everyone else at that site
    within ± ``window`` of it (by pseudonym; a contact is listed once per visit)."""
    mine = set(subjects)
    rows: list[TraceRow] = []
    visits = store.visits(list(subjects), start, end)
    for visit in visits:
        at = parse_time(visit.ts)
        rows.append(_row("visit", visit, visit.ts, 0.0))
        seen: set[str] = set()
        for other in store.at_site(visit.site, at - window, at + window):
            if other.subject is None or other.subject in mine or other.subject in seen:
                continue
            seen.add(other.subject)
            delta = (parse_time(other.ts) - at).total_seconds()
            rows.append(_row("contact", other, visit.ts, delta))
    return rows


def _row(kind: str, v: Visit, visit_ts: str, delta: float) -> TraceRow:
    return TraceRow(
        kind, v.subject or "", v.site, v.device, v.direction, v.ts, v.decision, v.reason, visit_ts, delta
    )


_FIELDS = (
    "kind",
    "subject",
    "site",
    "device",
    "direction",
    "ts",
    "decision",
    "reason",
    "visit_ts",
    "delta_s",
)


def render(rows: Sequence[TraceRow], fmt: str) -> str:
    if fmt == "json":
        return "".join(json.dumps(asdict(r), separators=(",", ":")) + "\n" for r in rows)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(_FIELDS)
        for r in rows:
            writer.writerow([getattr(r, f) for f in _FIELDS])
        return buf.getvalue()
    if fmt != "table":
        raise TraceError(f"--format: choose from {', '.join(FORMATS)}")
    header = ("", "subject", "site", "device", "dir", "ts", "decision", "Δs")
    table = [header]
    for r in rows:
        lead = "VISIT" if r.kind == "visit" else "  contact"
        delta = "" if r.kind == "visit" else f"{r.delta_s:+.0f}"
        table.append((lead, r.subject, r.site, r.device, r.direction, r.ts, r.decision, delta))
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table
    ]
    visits = sum(1 for r in rows if r.kind == "visit")
    contacts = len({r.subject for r in rows if r.kind == "contact"})
    lines.append(f"{visits} visits, {contacts} distinct contacts")
    return "\n".join(lines) + "\n"


def add_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument("--config", required=True, type=Path, help="reads [collector] and [storage]")
    who = t.add_mutually_exclusive_group(required=True)
    who.add_argument("--subject", help="the raw ID (ID-card number, code, pass subject)")
    who.add_argument("--pseudonym", help="a subject pseudonym (32 hex digits) instead of a raw ID")
    t.add_argument(
        "--type",
        action="append",
        choices=("plain", "cccd", "signed", "dcc"),
        help="credential type of --subject (repeatable; default: plain, cccd and signed)",
    )
    t.add_argument("--from", dest="start", required=True, help="ISO 8601 start (UTC unless an offset)")
    t.add_argument("--to", dest="end", required=True, help="ISO 8601 end")
    t.add_argument("--window", default="15m", help="others within ± this of each visit (default 15m)")
    t.add_argument("--format", choices=FORMATS, default="table")


def main(args: argparse.Namespace) -> int:
    config = load_or_report(args.config, load_central)
    if config is None:
        return 2
    try:
        start, end = parse_time(args.start), parse_time(args.end)
        if end < start:
            raise TraceError("--to is before --from")
        window = parse_duration(args.window)
        if args.pseudonym is not None:
            subjects = [check_pseudonym(args.pseudonym)]
        else:
            key = read_key(config.subject_key_path)
            subjects = pseudonyms(key, args.subject, args.type or DEFAULT_TYPES)
            if not subjects:
                raise TraceError("--subject is empty")
    except TraceError as exc:
        print(f"trace: {exc}", file=sys.stderr)
        return 2
    try:
        store = open_store(config.collector.store)
    except StoreError as exc:
        print(f"trace: {exc}", file=sys.stderr)
        return 1
    try:
        rows = trace(store, subjects, start, end, window)
    except StoreError as exc:
        print(f"trace: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    sys.stdout.write(render(rows, args.format))
    return 0
