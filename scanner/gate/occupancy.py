"""The site's occupancy, shared by its gates through the broker alone (no server).

Counting comes from committed events, whoever committed them: :meth:`Occupancy.stage` reads
the event's JSON inside the outbox transaction that stores it, so a scan, a remote open, an
operator's correction and the door's events are counted by one rule (README: Entries, exits,
the door and corrections), and the counts are written in that same transaction: after a
power cut the counts and the events never disagree.

Each gate keeps its own counts of the site's local day (entries, exits, and ``adjust``: what
it added that was no passage) and publishes them retained on ``{prefix}/{site}/{device}/
occupancy``. It reads its siblings' counters on ``{prefix}/{site}/+/occupancy``; the site's
inside count is the sum over the counters of the same day of entries − exits + adjust, never
below 0. A correction ("there are N inside") makes the correcting gate's ``adjust`` whatever
brings that sum to N, so it reaches every sibling as one more counter; an exit counted when
the sum is already 0 raises ``adjust`` by one, so people who came in before the day started
cannot make the count go negative and then hide entries. That hold at 0 is only as right as the
gate's view of its siblings, and a gate that just started has none: its siblings' retained
counters are still on their way. So until it has heard the site (every gate of ``site.gates``,
or, without that list, its own counter back from the broker, which comes after everything the
broker kept), it counts exits without the hold and keeps their number; once it has heard the
site it holds at 0 for as many of them as the site's sum is below 0. An exit decided a moment
after a start is then neither lost nor hiding an entry. A gate that cannot hear the site within
``stale_after_s`` of its start decides on the view it has, as a stale gate does.

The day: ``site.day_start`` in ``site.timezone``. It only ever moves forward, and only on a
clock that is NTP-synchronised: a Pi without a real-time clock boots with its clock set back
(or to 1970), and a clock that jumps back must neither reset the counts nor bring back an old
day. Until the clock is synced the gate keeps counting into the last day it knew.

Freshness: a gate re-publishes its counter every quarter of ``site.stale_after_s`` and, on a
clean stop, once more marked ``stopped``. A sibling heard from (for this day) less than
``stale_after_s`` ago, or stopped, is fresh; so is the whole view while this gate is connected.
Otherwise the view is stale: the gate keeps deciding on it, says so in ``status`` and, with a
cap, raises ``occupancy_stale``.

Threads: the pipeline stages and commits (under the gate's commit lock) and ticks; the
publisher thread hands in counters and link changes; telemetry reads snapshots. One lock.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Protocol

from scanner.config import NAME, Config
from scanner.events import parse_utc, utc_ms
from scanner.models import Reason

log = logging.getLogger(__name__)

SCHEMA = "gate-scanner/occupancy/1"
STATE_SCHEMA = "gate-scanner/occupancy-state/1"
STATE_KEY = "occupancy"  # the outbox state row
ALARM = "occupancy_stale"
OVER_CAPACITY = "over_capacity"
# The contract's bound on a count (checkin schema: occupancy.inside); adjust may be twice it.
MAX_COUNT = 1_000_000
MAX_VERSION = 2**53  # what a JSON number holds exactly everywhere
MAX_PAYLOAD = 2048  # a counter is ~250 bytes; anything far bigger is not one
MAX_GATES = 64  # counters kept per site: a flood of invented device ids costs nothing
_LOG_MAX = 1024  # (device, problem) pairs remembered so a flood logs once per pair


class AlarmSink(Protocol):
    def raise_(self, name: str, detail: str) -> None: ...
    def clear(self, name: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Counts:
    """One gate's counts for one local day: what its retained counter says."""

    day: date
    version: int = 0  # +1 on every change; a gate that lost its state takes its counter back by it
    entries: int = 0
    exits: int = 0
    adjust: int = 0  # corrections, and exits counted while the site's count was 0
    stopped: bool = False  # the gate stopped cleanly: these counts are final, not stale

    @property
    def net(self) -> int:
        return self.entries - self.exits + self.adjust


@dataclass(frozen=True, slots=True)
class Movement:
    """What one committed event does to the count."""

    entries: int = 0  # +1, or -1 for an annulled entry
    exits: int = 0
    set_inside: int | None = None  # an operator's correction


@dataclass(slots=True)
class _Sibling:
    counts: Counts
    capacity: int
    heard: float  # monotonic time of its last counter for our day (or a grace start)
    seen: float  # monotonic time of its last counter of any day


class CounterError(ValueError):
    """A counter message that is not one to count (the reason goes to the log)."""


# -- the day ----------------------------------------------------------------------------------


class SiteDay:
    """Which local day a moment belongs to: the date of local time minus ``day_start``."""

    def __init__(self, config: Config) -> None:
        self._tz = config.site.tz
        self._start = config.site.day_start_offset

    def of(self, moment: datetime) -> date:
        return (moment.astimezone(self._tz) - self._start).date()

    def after(self, day: date) -> datetime:
        """The moment (UTC) the day after ``day`` begins."""
        return (datetime.combine(day + timedelta(days=1), time(), tzinfo=self._tz) + self._start).astimezone(
            UTC
        )


# -- what an event does -----------------------------------------------------------------------


def movement(document: dict[str, Any], day_of: Callable[[datetime], date], today: date) -> Movement | None:
    """The README's table, by the event's own fields: the count follows what was recorded."""
    decision, reason, direction = document.get("decision"), document.get("reason"), document.get("direction")
    step_in = direction == "in"
    if decision == "accepted":
        if reason == Reason.OK:
            return Movement(entries=1) if step_in else Movement(exits=1)
        if reason == Reason.EXIT_REQUEST:  # the exit button: someone left
            return Movement(exits=1)
        if reason == Reason.OCCUPANCY_SET:
            correction = document.get("occupancy")
            inside = correction.get("inside") if isinstance(correction, dict) else None
            if isinstance(inside, int) and not isinstance(inside, bool) and 0 <= inside <= MAX_COUNT:
                return Movement(set_inside=inside)
            return None
    elif decision == "rejected" and reason == Reason.FORCED_PASSAGE:
        # Nobody was let in, but someone went through: the honest count includes them.
        return Movement(entries=1) if step_in else Movement(exits=1)
    elif decision == "annulled" and reason == Reason.NO_PASSAGE:
        annulled = _uuid7_time(document.get("annuls"))
        if annulled is not None and day_of(annulled) != today:
            return None  # the entry it takes back was counted on a day that is over
        return Movement(entries=-1) if step_in else Movement(exits=-1)
    return None


def _uuid7_time(value: Any) -> datetime | None:
    try:
        parsed = uuid.UUID(value)
    except (TypeError, ValueError, AttributeError):
        return None
    if parsed.version != 7:
        return None
    return datetime.fromtimestamp((parsed.int >> 80) / 1000, UTC)


def apply(counts: Counts, move: Movement, others: int, *, hold: bool = True) -> Counts:
    """``counts`` after ``move``; ``others`` is the rest of the site's sum (other gates, same day).

    ``hold``: keep the site's sum from going below 0 on an exit (False while the gate has not
    heard the site yet, when ``others`` may not be the site at all)."""
    entries = min(MAX_COUNT, max(0, counts.entries + move.entries))
    exits = min(MAX_COUNT, max(0, counts.exits + move.exits))
    adjust = counts.adjust
    if move.set_inside is not None:
        adjust = move.set_inside - others - (entries - exits)
    elif hold and move.exits > 0 and others + counts.net <= 0:
        # Nobody counted inside, yet someone left (in before the day started, or through a
        # door without a gate): keep 0, so the next entries are not swallowed by a negative sum.
        adjust += move.exits
    adjust = max(-2 * MAX_COUNT, min(2 * MAX_COUNT, adjust))
    return replace(counts, version=counts.version + 1, entries=entries, exits=exits, adjust=adjust)


# -- the counter on the wire --------------------------------------------------------------------


def counter_json(
    counts: Counts, *, site: str, device: str, capacity: int, now: datetime, stopped: bool = False
) -> bytes:
    body = {
        "schema": SCHEMA,
        "site": site,
        "device": device,
        "day": counts.day.isoformat(),
        "version": counts.version,
        "entries": counts.entries,
        "exits": counts.exits,
        "adjust": counts.adjust,
        "capacity": capacity,
        "stopped": stopped,
        "ts": utc_ms(now),
    }
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def parse_counter(payload: bytes, *, site: str, device: str) -> tuple[Counts, int, datetime]:
    """(counts, capacity, ts) of a counter published on ``device``'s topic; CounterError otherwise.

    Anyone the broker lets publish under the site can send anything: every field is checked
    before it can move the count a gate decides on.
    """
    if len(payload) > MAX_PAYLOAD:
        raise CounterError(f"{len(payload)} bytes, longer than any counter")
    try:
        body = json.loads(payload)
    except RecursionError:
        raise CounterError("nested too deep") from None
    except (UnicodeDecodeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise CounterError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise CounterError("not a JSON object")
    if body.get("schema") != SCHEMA:
        raise CounterError(f"schema is not {SCHEMA!r}")
    if body.get("site") != site:
        raise CounterError(f"a counter of site {str(body.get('site'))[:64]!r}, not this site")
    if body.get("device") != device:
        raise CounterError(f"names device {str(body.get('device'))[:64]!r}, not the topic's")
    day_text = body.get("day")
    try:
        if not isinstance(day_text, str) or len(day_text) != 10:
            raise ValueError
        day = date.fromisoformat(day_text)
    except ValueError:
        raise CounterError("day is not a date YYYY-MM-DD") from None
    version = _bounded(body, "version", 0, MAX_VERSION)
    entries = _bounded(body, "entries", 0, MAX_COUNT)
    exits = _bounded(body, "exits", 0, MAX_COUNT)
    adjust = _bounded(body, "adjust", -2 * MAX_COUNT, 2 * MAX_COUNT)
    capacity = _bounded(body, "capacity", 0, MAX_COUNT)
    stopped = body.get("stopped")
    if not isinstance(stopped, bool):
        raise CounterError("stopped is not true or false")
    ts = body.get("ts")
    try:
        if not isinstance(ts, str):
            raise ValueError
        when = parse_utc(ts)
    except (ValueError, OverflowError):
        raise CounterError("ts is not an RFC 3339 time") from None
    return Counts(day, version, entries, exits, adjust, stopped), capacity, when


def _bounded(body: dict[str, Any], key: str, low: int, high: int) -> int:
    value = body.get(key)
    # bool is an int in Python, NaN and 1e9 are floats: none of them is a count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise CounterError(f"{key} is not an integer")
    if not low <= value <= high:
        raise CounterError(f"{key} {value if abs(value) < 10**12 else 'huge'} is outside {low}..{high}")
    return value


# -- the shared count -----------------------------------------------------------------------------


class Occupancy:
    """This gate's counts, its view of its siblings' counters, and the site's inside count."""

    def __init__(
        self,
        config: Config,
        *,
        now: Callable[[], datetime],
        monotonic: Callable[[], float],
        clock_synced: Callable[[], bool],
        saved: bytes | None = None,
        alarms: AlarmSink | None = None,
        linked: bool = False,
    ) -> None:
        """``linked``: a publisher will report the broker link (:meth:`link`) and the site's
        counters (:meth:`heard`); until then this gate has not heard the site. Without one the
        gate is alone with what it has, and has heard all there is to hear."""
        site = config.site
        self._site = config.device.site
        self._device = config.device.id
        self.capacity = site.capacity
        self.soft = site.capacity_mode == "soft"
        self._stale_after = site.stale_after_s
        self._heartbeat = site.stale_after_s / 4
        self._allowed = frozenset(site.gates)
        self._now = now
        self._mono = monotonic
        self._synced = clock_synced
        self._alarms = alarms
        self._day = SiteDay(config)
        self._cond = threading.Condition(threading.RLock())
        start = monotonic()
        self._own, self._siblings, unheld = self._load(saved, start)
        # Exits counted before this gate heard the site, not yet held at 0 (see the module doc).
        self._unheld = unheld
        self._heard_site = not linked
        self._awaited = set(self._allowed) - {self._device}  # site.gates not heard since the start
        self._hear_site_by = start + self._stale_after
        # Kept up to date by _changed(), so a decision reads two numbers, not the whole view.
        self._next_day_at = self._day.after(self._own.day)
        self._others_net = 0
        self._recount()
        self._staged: Movement | None = None
        self._link_up = False
        self._down_since = start  # not connected yet: counts as cut off from the start
        self._published = start - self._heartbeat  # the first tick publishes
        self._stale_detail: str | None = None
        self._full = False
        self._logged: set[tuple[str, str]] = set()
        # Wired by the composition root; harmless defaults for a gate without a broker.
        self.publish: Callable[[bytes], None] = lambda body: None
        self.on_change: Callable[[], None] = lambda: None

    # -- state on disk (the outbox's state row) --------------------------------------------------

    def _load(self, saved: bytes | None, start: float) -> tuple[Counts, dict[str, _Sibling], int]:
        today = self._day.of(self._now())
        if saved is None:
            return Counts(today), {}, 0
        try:
            doc = json.loads(saved)
            if doc.get("schema") != STATE_SCHEMA:
                raise ValueError(f"schema is not {STATE_SCHEMA!r}")
            own = _counts_from(doc["own"])
            siblings = {
                str(dev): _Sibling(_counts_from(c), int(c.get("capacity", 0)), start, start)
                for dev, c in doc.get("siblings", {}).items()
                if NAME.fullmatch(str(dev)) and dev != self._device
            }
            unheld = doc.get("unheld", 0)
            if isinstance(unheld, bool) or not isinstance(unheld, int) or not 0 <= unheld <= MAX_COUNT:
                raise ValueError(f"unheld {unheld!r} is not a count")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Counts only: the events are safe in the outbox. This gate's retained counter puts
            # its counts back when the broker answers (see heard()).
            log.error("occupancy state in the outbox is unreadable (%s): starting from 0", exc)
            return Counts(today), {}, 0
        return own, dict(list(siblings.items())[:MAX_GATES]), unheld

    def _state_blob(self, own: Counts, unheld: int) -> bytes:
        doc = {
            "schema": STATE_SCHEMA,
            "own": _counts_to(own),
            "unheld": unheld,
            "siblings": {
                dev: {**_counts_to(s.counts), "capacity": s.capacity} for dev, s in self._siblings.items()
            },
        }
        return json.dumps(doc, separators=(",", ":")).encode("utf-8")

    # -- the commit path (Gate._commit, under its commit lock) -----------------------------------

    def stage(self, payload: bytes) -> tuple[str, bytes] | None:
        """Inside the outbox transaction: the counts after this event, to store with it.

        Never raises: a counting bug must not stop a gate from recording who came in.
        """
        try:
            document = json.loads(payload)
            with self._cond:
                self._roll()
                move = movement(document, self._day.of, self._own.day) if isinstance(document, dict) else None
                self._staged = move
                if move is None:
                    return None
                own, unheld = self._after(move)
                return STATE_KEY, self._state_blob(own, unheld)
        except Exception:
            log.exception("occupancy: could not count a committed event; the count may be off by one")
            self._staged = None
            return None

    def committed(self) -> None:
        """The staged event is durable: count it and tell the siblings."""
        with self._cond:
            move, self._staged = self._staged, None
            if move is None:
                return
            self._roll()
            self._own, self._unheld = self._after(move)
            body = self._counter_locked()
            self._changed()
        self.publish(body)

    def _after(self, move: Movement) -> tuple[Counts, int]:
        """This gate's counts and unheld exits after ``move`` (caller holds the lock)."""
        own = apply(self._own, move, self._others(), hold=self._heard_site)
        if move.set_inside is not None:
            return own, 0  # the operator said how many are inside: nothing left to hold
        if self._heard_site:
            return own, self._unheld
        return own, min(MAX_COUNT, max(0, self._unheld + move.exits))

    def _hear_site(self) -> bytes | None:
        """This gate has heard the site (caller holds the lock): hold the sum at 0 for the exits
        counted before, as many as it is below 0. The counter to publish if that changed it."""
        self._heard_site = True
        unheld, self._unheld = self._unheld, 0
        held = min(unheld, -(self._own.net + self._others()))
        if held <= 0:
            return None
        log.info("occupancy: %d exit(s) counted before this gate heard the site kept the count at 0", held)
        self._own = replace(self._own, version=self._own.version + 1, adjust=self._own.adjust + held)
        self._changed()
        return self._counter_locked()

    def discard(self) -> None:
        """The event was not recorded: nothing happened."""
        with self._cond:
            self._staged = None

    # -- what decisions read ----------------------------------------------------------------------

    def inside(self) -> int:
        with self._cond:
            self._roll()
            return max(0, self._own.net + self._others())

    def _others(self) -> int:
        return self._others_net

    def _recount(self) -> None:
        day = self._own.day
        self._others_net = sum(s.counts.net for s in self._siblings.values() if s.counts.day == day)

    # -- the broker side (publisher thread) --------------------------------------------------------

    def heard(self, device: str, payload: bytes, retained: bool) -> None:
        """A counter on ``{prefix}/{site}/{device}/occupancy`` (an empty one: cleared)."""
        if not NAME.fullmatch(device):
            self._ignore(device[:64], "the topic's device segment is not a device id")
            return
        if self._allowed and device not in self._allowed:
            self._ignore(device, "not one of site.gates")
            return
        if not payload:
            with self._cond:
                if self._siblings.pop(device, None) is not None:
                    log.info("occupancy: %s's counter was cleared; it no longer counts", device)
                    self._changed()
            return
        try:
            counts, capacity, ts = parse_counter(payload, site=self._site, device=device)
        except CounterError as exc:
            self._ignore(device, str(exc))
            return
        body = None
        with self._cond:
            self._roll()
            if device == self._device:
                if retained:
                    body = self._maybe_adopt(counts)
                elif self._link_up and not self._awaited and not self._heard_site:
                    # Our counter came back live: the broker sent every retained counter before.
                    body = self._hear_site()
            else:
                mono = self._mono()
                if retained:  # from the broker's store: as old as its ts says (never from the future)
                    age = min(max(0.0, (self._now() - ts).total_seconds()), 10 * self._stale_after)
                    mono -= age
                known = self._siblings.get(device)
                if known is None and len(self._siblings) >= MAX_GATES and not self._evict():
                    self._ignore(device, f"more than {MAX_GATES} gates under the site")
                    return
                heard = mono if counts.day == self._own.day else (known.heard if known else mono)
                self._siblings[device] = _Sibling(counts, capacity, heard, mono)
                if capacity != self.capacity and self._first(device, "capacity"):
                    log.warning(
                        "occupancy: %s has site.capacity %d, this gate %d: give a site's gates one [site]",
                        device,
                        capacity,
                        self.capacity,
                    )
                self._changed()
                if self._awaited and not self._heard_site:
                    self._awaited.discard(device)
                    if not self._awaited:
                        body = self._hear_site()
        if body is not None:
            self.publish(body)

    def _maybe_adopt(self, counts: Counts) -> bytes | None:
        # Our own retained counter from the broker. Normally it is what we sent; if it is ahead
        # of us (state lost with a quarantined outbox or a fresh SD card), take it back.
        if counts.day != self._own.day or counts.version <= self._own.version:
            return None
        log.warning(
            "occupancy: this gate's counter of %s on the broker is ahead of its own state (version %d > %d):"
            " taking its counts back (entries %d, exits %d)",
            counts.day,
            counts.version,
            self._own.version,
            counts.entries,
            counts.exits,
        )
        self._own = replace(counts, stopped=False)
        self._changed()
        return self._counter_locked()

    def _evict(self) -> bool:
        """Room for a new device: forget a counter of another day, if any."""
        for dev, s in self._siblings.items():
            if s.counts.day != self._own.day:
                del self._siblings[dev]
                return True
        return False

    def _ignore(self, device: str, why: str) -> None:
        if self._first(device, re.sub(r"-?[0-9]+", "#", why)):  # a line per kind of problem, not per value
            log.warning("occupancy: ignoring the counter of %r: %s", device, why)

    def _first(self, device: str, kind: str) -> bool:
        """True the first time (device, kind) comes up: a flood of bad counters logs once."""
        with self._cond:
            if (device, kind) in self._logged:
                return False
            if len(self._logged) >= _LOG_MAX:
                self._logged.clear()
            self._logged.add((device, kind))
            return True

    def link(self, up: bool) -> None:
        """The publisher's word: connected and subscribed to the site's counters, or not."""
        with self._cond:
            if up == self._link_up:
                return
            self._link_up = up
            if not up:
                self._down_since = self._mono()
        if up:
            self.tick()

    # -- time: the day, heartbeats, staleness (pipeline loop, a few times a second) ---------------

    def tick(self) -> None:
        body = None
        with self._cond:
            self._roll()
            mono = self._mono()
            if not self._heard_site and mono >= self._hear_site_by:
                log.warning(
                    "occupancy: the site's counters not heard %.0f s after the start: deciding on the"
                    " view this gate has",
                    self._stale_after,
                )
                body = self._hear_site()
            if mono - self._published >= self._heartbeat:
                body = self._counter_locked()
            detail = self._stale_reason(mono)
            changed = detail != self._stale_detail
            self._stale_detail = detail
            if changed:
                self._changed()
        if body is not None:
            self.publish(body)
        if changed and self._alarms is not None and self.capacity > 0:
            if detail is None:
                self._alarms.clear(ALARM)
            else:
                self._alarms.raise_(ALARM, detail)

    def stopping(self) -> None:
        """A clean stop: the counter once more, marked final, so siblings do not call it stale."""
        with self._cond:
            body = self._counter_locked(stopped=True)
        self.publish(body)

    def _roll(self) -> None:
        """Start a new day when a synced clock says one began (caller holds the lock)."""
        now = self._now()
        if now < self._next_day_at:
            return  # every decision comes here: one comparison while the day lasts
        today = self._day.of(now)
        if today <= self._own.day or not self._synced():
            return
        log.info("occupancy: a new day (%s) begins at %s; counts start from 0", today, self._own.day)
        self._own = Counts(today, self._own.version + 1)
        self._unheld = 0  # yesterday's exits
        self._next_day_at = self._day.after(today)
        mono = self._mono()
        for s in self._siblings.values():
            s.heard = max(s.heard, mono)  # each gets stale_after_s to start the day too
        self._published = mono - self._heartbeat  # publish the new day at the next tick
        self._changed()

    def _stale_reason(self, mono: float) -> str | None:
        """Why the view may be behind, or None. Worded without running figures: the alarm's
        detail changes (and status is re-published) only when the situation does."""
        if not self._siblings:
            return None  # a gate alone on its site has the whole count
        if not self._link_up and mono - self._down_since >= self._stale_after:
            return (
                f"cut off from the broker for over {self._stale_after:.0f} s: deciding on the site's "
                "count as last seen"
            )
        late = []
        for dev, s in sorted(self._siblings.items()):
            if s.counts.stopped and s.counts.day <= self._own.day:
                continue
            if mono - s.heard >= self._stale_after:
                other = f", it counts {s.counts.day}" if s.counts.day != self._own.day else ""
                late.append(f"{dev} (no count for {self._own.day} in over {self._stale_after:.0f} s{other})")
        if not late:
            return None
        return "siblings' counts may be behind: " + ", ".join(late)

    def _counter_locked(self, stopped: bool = False) -> bytes:
        self._published = self._mono()
        return counter_json(
            self._own,
            site=self._site,
            device=self._device,
            capacity=self.capacity,
            now=self._now(),
            stopped=stopped,
        )

    def _changed(self) -> None:
        """The view changed (caller holds the lock): wake waiters; say when full flips."""
        self._recount()
        self._cond.notify_all()
        full = self.capacity > 0 and max(0, self._own.net + self._others()) >= self.capacity
        if full != self._full:
            self._full = full
            self.on_change()

    # -- what operators see -----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """``occupancy`` in status and health (scanner/schemas/status-1.json)."""
        with self._cond:
            self._roll()
            mono = self._mono()
            inside = max(0, self._own.net + self._others())
            gates: dict[str, Any] = {self._device: {**_figures(self._own), "age_s": 0.0, "stopped": False}}
            for dev, s in sorted(self._siblings.items()):
                gates[dev] = {
                    **_figures(s.counts),
                    "age_s": round(max(0.0, mono - s.seen), 1),
                    "stopped": s.counts.stopped,
                }
            return {
                "day": self._own.day.isoformat(),
                "inside": inside,
                "capacity": self.capacity,
                "mode": "soft" if self.soft else "hard",
                "full": self.capacity > 0 and inside >= self.capacity,
                "stale": self._stale_reason(mono) is not None,
                "gates": gates,
            }

    def own(self) -> Counts:
        with self._cond:
            self._roll()
            return self._own

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` (which may call :meth:`inside`) holds, or ``timeout``."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)


def _figures(c: Counts) -> dict[str, Any]:
    return {"day": c.day.isoformat(), "entries": c.entries, "exits": c.exits, "adjust": c.adjust}


def _counts_to(c: Counts) -> dict[str, Any]:
    return {**_figures(c), "version": c.version, "stopped": c.stopped}


def _counts_from(d: Any) -> Counts:
    if not isinstance(d, dict):
        raise TypeError("counts are not an object")
    version, entries, exits, adjust = d["version"], d["entries"], d["exits"], d["adjust"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (version, entries, exits, adjust)):
        raise TypeError("counts are not integers")
    return Counts(
        date.fromisoformat(d["day"]), version, entries, exits, adjust, bool(d.get("stopped", False))
    )
