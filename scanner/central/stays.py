"""Stays: who was inside a site, from when to when, derived from the site's check-ins.

Contact tracing asks who was inside at the same time as a case, so the collector turns each
subject's entries and exits at a site into stays:

- ``paired``: an accepted entry closed by that subject's next accepted exit at the site;
- ``inferred``: an entry with no exit, closed at the site's day end or after ``max_stay_h``,
  whichever comes first (or at the subject's next entry, which proves they left);
- ``open_start``: an exit with no entry before it; it starts at the day start, ``max_stay_h``
  before the exit, or the end of the subject's previous stay, whichever is latest;
- ``entry_only``: at a site that had no exit gate yet, ``default_stay_min`` from the scan.

An annulled entry (or exit) counts as if it never happened; rejected scans, and events with no
subject (the exit button, a forced door, an operator's correction), make no stay.

A stay never crosses the site's day end (``day_start`` in the sites' time zone, 04:00 so
that a night belongs to the evening before), so a *unit* — one subject at one site on one site
day — can be derived from that unit's check-ins alone. That makes stays rebuildable (derive
every unit again and get the same rows) and a late event cheap to honour: the store derives
again just the units the event touches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, tzinfo

from scanner.config import CollectorConfig, time_zone
from scanner.events import parse_utc

KINDS = ("paired", "inferred", "open_start", "entry_only")
# A scan and the annulment of it (the door never saw anyone pass) are seconds apart; one that
# lands just after the day end still annuls the entry before it when it comes within this.
ANNUL_GRACE = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class StayRules:
    """What the derivation depends on: change any of it and every stay is derived again."""

    max_stay: timedelta
    default_stay: timedelta
    day_start: time
    zone: tzinfo
    zone_name: str

    @classmethod
    def from_config(cls, c: CollectorConfig) -> StayRules:
        hours, minutes = (int(part) for part in c.day_start.split(":"))
        return cls(
            max_stay=timedelta(hours=c.max_stay_h),
            default_stay=timedelta(minutes=c.default_stay_min),
            day_start=time(hours, minutes),
            zone=time_zone(c.timezone),
            zone_name=c.timezone,
        )

    @property
    def longest(self) -> timedelta:
        """No stay is longer: an upper bound that lets an overlap query use a range scan."""
        return max(self.max_stay, self.default_stay)

    def key(self) -> str:
        """How these rules are recorded in the store, to notice when they change."""
        stay, default = self.max_stay.total_seconds(), self.default_stay.total_seconds()
        start = f"{self.day_start:%H:%M}"
        return f"max_stay={stay:g}s default_stay={default:g}s day_start={start} zone={self.zone_name}"

    def day_of(self, moment: datetime) -> date:
        """The site day a moment belongs to (a day starts at ``day_start`` local time)."""
        local = moment.astimezone(self.zone)
        return local.date() - timedelta(days=1) if local.time() < self.day_start else local.date()

    def bounds(self, day: date) -> tuple[datetime, datetime]:
        """Start and end of a site day, as aware datetimes."""
        start = datetime.combine(day, self.day_start, self.zone)
        end = datetime.combine(day + timedelta(days=1), self.day_start, self.zone)
        return start, end


@dataclass(frozen=True, slots=True)
class UnitEvent:
    """The fields of one check-in that stays are made of."""

    event_id: str
    direction: str
    decision: str
    ts: str  # RFC 3339 UTC with milliseconds
    annuls: str | None


@dataclass(frozen=True, slots=True)
class Stay:
    site: str
    subject: str
    day: date
    start: datetime
    end: datetime
    kind: str  # one of KINDS
    entry_id: str | None
    exit_id: str | None

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()


def derive(
    site: str,
    subject: str,
    day: date,
    events: Iterable[UnitEvent],
    rules: StayRules,
    *,
    entry_only: bool,
) -> list[Stay]:
    """The stays of one unit, from that unit's events (extra events outside the day are ignored,
    except annulments, which count whenever they come)."""
    day_start, day_end = rules.bounds(day)
    annulled = {e.annuls for e in events if e.decision == "annulled" and e.annuls}
    moves = sorted(
        (
            (parse_utc(e.ts), e.event_id, e.direction)
            for e in events
            if e.decision == "accepted" and e.event_id not in annulled
        ),
    )
    stays: list[Stay] = []

    def add(start: datetime, end: datetime, kind: str, entry: str | None, exit_: str | None) -> None:
        stays.append(Stay(site, subject, day, start, end, kind, entry, exit_))

    open_at: tuple[datetime, str] | None = None
    for at, event_id, direction in moves:
        if not day_start <= at < day_end:
            continue
        if entry_only:
            if direction == "in":
                add(at, at + rules.default_stay, "entry_only", event_id, None)
            continue
        if open_at is not None:
            started, entry_id = open_at
            closes = min(day_end, started + rules.max_stay)
            if direction == "out" and at <= closes:
                add(started, at, "paired", entry_id, event_id)
                open_at = None
                continue
            # A second entry proves they left before it; an exit too late for this entry is
            # an exit of its own (below).
            add(started, min(closes, at), "inferred", entry_id, None)
            open_at = None
        if direction == "in":
            open_at = (at, event_id)
        else:
            floor = max(day_start, at - rules.max_stay, stays[-1].end if stays else day_start)
            add(min(floor, at), at, "open_start", None, event_id)
    if open_at is not None:
        started, entry_id = open_at
        add(started, min(day_end, started + rules.max_stay), "inferred", entry_id, None)
    return stays


def units_of(
    rows: Sequence[tuple[str, str | None, str, str]], rules: StayRules
) -> set[tuple[str, str, date]]:
    """The units (site, subject, day) that events touch, from (site, subject, ts, decision).

    An annulment just after a day end may annul an entry of the day before: both days."""
    units: set[tuple[str, str, date]] = set()
    for site, subject, ts, decision in rows:
        if subject is None:
            continue
        at = parse_utc(ts)
        day = rules.day_of(at)
        units.add((site, subject, day))
        if decision == "annulled" and rules.day_of(at - ANNUL_GRACE) != day:
            units.add((site, subject, day - timedelta(days=1)))
    return units
