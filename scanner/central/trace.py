"""Contact tracing (`gate-scanner trace`): a subject's stays and who was inside with them.

Contacts are overlapping stays (``scanner.central.stays``): everyone else whose stay at the
same site overlaps one of the subject's by at least ``--min-overlap``, after widening the
subject's stays by ``--margin`` on both sides (the 2021 one-hour rule is ``--margin 1h``).
Stays that only touch (one leaves as the other enters) count when the minimum is 0: they
passed each other in the door.

The store never holds raw IDs, only keyed pseudonyms, so the raw ID the health authority
asks about is turned into its pseudonym here with the deployment key. The key is only read:
a missing key means this machine cannot trace (a fresh key would match nobody).

The pseudonym covers the credential type as well as the identity (a plain code "123" and a
pass subject "123" are different people), so without ``--type`` every type that carries a
typed-in identity is tried and all their stays are reported.
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
from scanner.central.stays import Stay, StayRules
from scanner.central.store import Store, StoreError, open_store
from scanner.central.timeline import draw
from scanner.config import load_central
from scanner.console import load_or_report
from scanner.events import Pseudonymizer, utc_ms

DEFAULT_TYPES = ("plain", "cccd", "signed")
FORMATS = ("table", "json", "csv")
_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_PSEUDONYM = re.compile(r"[0-9a-f]{32}")


class TraceError(Exception):
    """A usage problem (bad time, missing key): exit 2 with this message."""


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One line of the answer: a stay of the subject, or a contact's stay that overlaps one."""

    kind: str  # "stay" (the subject's) or "contact" (someone else's, overlapping the stay above it)
    subject: str
    site: str
    start: str  # this row's stay, UTC RFC 3339
    end: str
    stay: str  # how the stay is known: paired | inferred | open_start | entry_only
    of_stay: str  # a contact: the start of the subject's stay it overlaps; a stay: its own start
    overlap_start: str  # a contact: where the overlap (with the margin) begins; a stay: ""
    overlap_end: str
    overlap_s: float  # a contact: how long; a stay: its own length


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
    store: Store,
    subjects: Sequence[str],
    start: datetime,
    end: datetime,
    *,
    margin: timedelta = timedelta(0),
    min_overlap: timedelta = timedelta(0),
) -> list[TraceRow]:
    """The subjects' stays that overlap [start, end], each followed by the other subjects'
    stays at that site that overlap it (widened by ``margin``) by at least ``min_overlap``."""
    mine = set(subjects)
    rows: list[TraceRow] = []
    for own in store.stays_of(list(subjects), start, end):
        rows.append(_row("stay", own, own, "", "", own.seconds))
        lo, hi = own.start - margin, own.end + margin
        contacts = []
        for other in store.stays_near(own.site, lo, hi):
            if other.subject in mine:
                continue
            begins, ends = max(lo, other.start), min(hi, other.end)
            if ends < begins or ends - begins < min_overlap:
                continue
            contacts.append(
                _row("contact", other, own, utc_ms(begins), utc_ms(ends), (ends - begins).total_seconds())
            )
        rows += sorted(contacts, key=lambda r: (r.overlap_start, r.subject, r.start))
    return rows


def _row(kind: str, s: Stay, own: Stay, begins: str, ends: str, seconds: float) -> TraceRow:
    return TraceRow(
        kind,
        s.subject,
        s.site,
        utc_ms(s.start),
        utc_ms(s.end),
        s.kind,
        utc_ms(own.start),
        begins,
        ends,
        seconds,
    )


_FIELDS = tuple(TraceRow.__dataclass_fields__)


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
    header = ("", "subject", "site", "from", "to", "stay", "overlap", "for")
    table = [header]
    for r in rows:
        lead = "STAY" if r.kind == "stay" else "  contact"
        span = "" if r.kind == "stay" else f"{r.overlap_start[11:19]}-{r.overlap_end[11:19]}"
        table.append((lead, r.subject, r.site, r.start[:19], r.end[:19], r.stay, span, _minutes(r.overlap_s)))
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table
    ]
    stays = sum(1 for r in rows if r.kind == "stay")
    contacts = len({r.subject for r in rows if r.kind == "contact"})
    lines.append(f"{stays} stays, {contacts} distinct contacts (times UTC)")
    return "\n".join(lines) + "\n"


def _minutes(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


def retention_note(start: datetime, end: datetime, retention_days: int, now: datetime) -> str | None:
    """What a period reaching past retention cannot show, in plain words; None if nothing."""
    cutoff = now - timedelta(days=retention_days)
    if start >= cutoff:
        return None
    kept = f"check-ins and stays are deleted after {retention_days} days (collector.retention_days)"
    if end < cutoff:
        return f"the whole period ends before {utc_ms(cutoff)}: {kept}, so nothing of it can be shown"
    return f"the period starts before {utc_ms(cutoff)}: {kept}, so only what came after that is shown"


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
    t.add_argument(
        "--margin",
        "--window",  # the point-in-time window of earlier versions: the nearest thing now
        dest="margin",
        default="0",
        help="widen the subject's stays by this on both sides (the one-hour rule: 1h; default 0)",
    )
    t.add_argument("--min-overlap", default="0", help="shortest overlap that counts (e.g. 15m; default 0)")
    t.add_argument("--format", choices=FORMATS, default="table")
    t.add_argument("--plot", type=Path, help="also draw a timeline to FILE.svg or FILE.png")


def main(args: argparse.Namespace) -> int:
    config = load_or_report(args.config, load_central)
    if config is None:
        return 2
    try:
        start, end = parse_time(args.start), parse_time(args.end)
        if end < start:
            raise TraceError("--to is before --from")
        margin, min_overlap = parse_duration(args.margin), parse_duration(args.min_overlap)
        if args.plot is not None and args.plot.suffix.lower() not in (".svg", ".png"):
            raise TraceError(f"--plot {args.plot}: the file must end in .svg or .png")
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
    rules = StayRules.from_config(config.collector)
    try:
        store = open_store(config.collector.store, rules, retention_days=config.collector.retention_days)
    except StoreError as exc:
        print(f"trace: {exc}", file=sys.stderr)
        return 1
    try:
        if store.rules_changed:
            print(
                "trace: the stays in the store were derived with other rules than this config's "
                "[collector] day_start/timezone/max_stay_h/default_stay_min; they are rebuilt when "
                "`collect` starts with this config",
                file=sys.stderr,
            )
        rows = trace(store, subjects, start, end, margin=margin, min_overlap=min_overlap)
    except StoreError as exc:
        print(f"trace: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    note = retention_note(start, end, config.collector.retention_days, datetime.now(UTC))
    if note is not None:
        print(f"trace: {note}", file=sys.stderr)
    text = render(rows, args.format)
    if note is not None and args.format == "table":
        text += f"note: {note}\n"
    sys.stdout.write(text)
    if args.plot is not None:
        try:
            draw(
                rows,
                args.plot,
                subjects=subjects,
                period=(start, end),
                margin=margin,
                zone=rules.zone,
                zone_name=rules.zone_name,
            )
        except (ImportError, OSError) as exc:
            print(f"trace: --plot {args.plot}: {exc}", file=sys.stderr)
            return 1
        print(f"trace: timeline written to {args.plot}", file=sys.stderr)
    return 0
