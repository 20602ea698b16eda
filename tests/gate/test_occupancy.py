"""The site's shared occupancy: the contract's counting rules, the day, restarts, and gates on a broker.

Unit level: a real Gate (real outbox, mock pins) with an injected clock, fed events through
``Gate._commit`` exactly as every producer of events does. Broker level: two or three gates
(``App`` with their real publishers, replayed frames, mock pins) on one private mosquitto.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from gpiozero.pins.mock import MockFactory

from scanner import config as config_mod
from scanner import events
from scanner.gate import commands, occupancy
from scanner.gate.app import App
from scanner.gate.decode import Decoder
from scanner.gate.occupancy import Counts, Occupancy, counter_json
from scanner.gate.outbox import Outbox
from scanner.gate.pipeline import Alarms, Gate
from scanner.gate.telemetry import ha_discovery
from scanner.models import Frame, Reason
from scanner.sim import synth
from scanner.sim.localbroker import LocalBroker
from tests.helpers import (
    BLANK,
    OPERATOR,
    OPERATOR_KID,
    FakeClock,
    HeldSource,
    OrderCheckingSignals,
    gate_config,
    make_config,
    rising_edges,
    running,
    unique_name,
)
from tests.mqtt_helpers import Subscriber, wait_until

CHECKIN_SCHEMA = json.loads(events.schema_path().read_text())
STATUS_SCHEMA = json.loads(events.schema_path("status").read_text())
HEALTH_SCHEMA = json.loads(events.schema_path("health").read_text())
COUNTER_SCHEMA = json.loads(events.schema_path("occupancy").read_text())
REPLY_SCHEMA = json.loads(events.schema_path("cmd-reply").read_text())

# 10:00 in Vietnam (UTC+7) on 2026-11-29: the site's day 2026-11-29 (it starts at 04:00).
MORNING = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)
DAY = date(2026, 11, 29)
# 03:59 local on 2026-11-30 is still the 29th's day; 04:00 local is 21:00 UTC the day before.
BEFORE_DAY_START = datetime(2026, 11, 29, 20, 59, tzinfo=UTC)


class FlowingClock:
    """Real time that a test can jump: the wall clock by ``jump``, the monotonic one by ``skip``."""

    def __init__(self, wall: datetime | None = None) -> None:
        self._start = time.monotonic()
        self._wall = wall or datetime.now(UTC)
        self._jumped = timedelta(0)
        self._skipped = 0.0

    def now(self) -> datetime:
        return self._wall + timedelta(seconds=time.monotonic() - self._start) + self._jumped

    def monotonic(self) -> float:
        return time.monotonic() + self._skipped

    def jump(self, seconds: float) -> None:
        self._jumped += timedelta(seconds=seconds)

    def skip(self, seconds: float) -> None:
        self._skipped += seconds


# -- unit level: one Gate, its outbox, an injected clock --------------------------------------------


class UnitGate:
    def __init__(self, tmp_path: Path, clock: FakeClock, **sections: dict[str, Any]) -> None:
        self.synced = True
        self.cfg = make_config(
            tmp_path, {"site": {"capacity": 0}, "gpio": {"relay_pulse_s": 0.1}}, **sections
        )
        self.clock = clock
        self.factory = MockFactory()
        self.cfg.storage.dir.mkdir(parents=True)
        self.outbox = Outbox(self.cfg.storage.dir / "outbox.db", 1000)
        # Records each call to accepted() (and how many events were durable then).
        self.signals = OrderCheckingSignals(self.cfg.gpio, pin_factory=self.factory, outbox=self.outbox)
        self.alarms = Alarms()
        self.gate = self.make_gate()
        self._ids = events.Uuid7()

    def make_gate(self) -> Gate:
        return Gate(
            self.cfg,
            decoder=Decoder(("zxing",)),
            outbox=self.outbox,
            signals=self.signals,
            pseudonymizer=events.Pseudonymizer(b"k" * 32),
            clock=self.clock,
            alarms=self.alarms,
            clock_synced=lambda: self.synced,
        )

    def restart(self) -> None:
        """The process dies and comes back: a new outbox connection and a new gate, same files."""
        self.outbox.close()
        self.outbox = Outbox(self.cfg.storage.dir / "outbox.db", 1000)
        self.gate = self.make_gate()

    def commit(self, direction: str, decision: str, reason: str, **extra: Any) -> str:
        """Commit one contract-valid event through Gate._commit; returns its event_id."""
        made: list[str] = []

        def build(seq: int, _created: str) -> bytes:
            at = self.clock.now()
            event_id = extra.pop("event_id", None) or self._ids.new(int(at.timestamp() * 1000))
            made.append(event_id)
            doc = {
                "schema": events.SCHEMA,
                "event_id": event_id,
                "seq": seq,
                "device": self.cfg.device.id,
                "site": self.cfg.device.site,
                "direction": direction,
                "ts": events.utc_ms(at),
                "clock_synced": True,
                "decision": decision,
                "reason": reason,
                "credential": {"type": "plain", "subject": "ab" * 16},
                **extra,
            }
            jsonschema.validate(doc, CHECKIN_SCHEMA)  # every row below is a contract event
            return json.dumps(doc).encode()

        self.gate._commit(build)
        return made[0]

    def scan(self, code: str) -> Reason:
        image = synth.render_scene(code, np.random.default_rng(len(code)))
        outcomes = self.gate.process(Frame(image, 1, time.monotonic()))
        self.gate.process(Frame(BLANK, 2, time.monotonic() + 5))  # the code leaves the view
        assert len(outcomes) == 1
        return outcomes[0].decision.reason

    def close(self) -> None:
        self.signals.close()
        self.outbox.close()
        self.factory.close()


@pytest.fixture
def unit(tmp_path: Path) -> Iterator[Callable[..., UnitGate]]:
    made: list[UnitGate] = []

    def make(clock: FakeClock | None = None, **sections: dict[str, Any]) -> UnitGate:
        g = UnitGate(tmp_path / f"g{len(made)}", clock or FakeClock(MORNING), **sections)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


EXIT_BUTTON = {"credential": {"type": "exit_button"}}
NOBODY = {"credential": {"type": "none"}}


@pytest.mark.parametrize(
    ("direction", "decision", "reason", "extra", "moved"),
    [
        ("in", "accepted", "ok", {}, (1, 0)),
        ("out", "accepted", "ok", {}, (0, 1)),
        ("out", "accepted", "exit_request", EXIT_BUTTON, (0, 1)),
        ("in", "rejected", "forced_passage", NOBODY, (1, 0)),  # in anyway: the honest count has them
        ("out", "rejected", "forced_passage", NOBODY, (0, 1)),
        ("in", "rejected", "denylisted", {}, (0, 0)),
        ("in", "rejected", "capacity_full", {}, (0, 0)),
        ("in", "rejected", "anti_passback", {}, (0, 0)),
        ("out", "rejected", "expired", {}, (0, 0)),
    ],
)
def test_every_kind_of_event_moves_the_count_as_the_contract_table_says(
    unit, direction, decision, reason, extra, moved
) -> None:
    g = unit()
    g.commit("in", "accepted", "ok")  # someone inside, so an exit is a plain exit
    g.commit(direction, decision, reason, **extra)
    own = g.gate.occupancy.own()
    assert (own.entries - 1, own.exits) == moved
    # The counts were stored with the events: a restarted gate has exactly them.
    g.restart()
    assert g.gate.occupancy.own() == own


def test_an_annulled_entry_is_taken_back_unless_it_was_counted_on_a_day_that_is_over(unit) -> None:
    g = unit()
    entry = g.commit("in", "accepted", "ok")
    g.commit("in", "accepted", "ok")
    g.commit("in", "annulled", "no_passage", annuls=entry)
    assert (g.gate.occupancy.own().entries, g.gate.occupancy.inside()) == (1, 1)
    yesterday = events.Uuid7().new(int((MORNING - timedelta(days=1)).timestamp() * 1000))
    g.commit("in", "annulled", "no_passage", annuls=yesterday)
    assert g.gate.occupancy.inside() == 1


def test_a_correction_sets_the_count_and_later_passages_move_it_from_there(unit) -> None:
    g = unit()
    for _ in range(3):
        g.commit("in", "accepted", "ok")
    ok, detail = g.gate.set_occupancy(OPERATOR_KID.hex(), 10)
    assert ok and "was 3" in detail
    assert g.gate.occupancy.inside() == 10
    g.commit("in", "accepted", "ok")
    assert g.gate.occupancy.inside() == 11
    assert g.gate.set_occupancy(OPERATOR_KID.hex(), 0)[0]
    assert g.gate.reasons[Reason.OCCUPANCY_SET] == 2
    g.restart()
    assert g.gate.occupancy.inside() == 0  # the correction is durable too
    (row,) = [p for _s, p in g.outbox.pending(limit=100) if b"occupancy_set" in p][-1:]
    event = json.loads(row)
    jsonschema.validate(event, CHECKIN_SCHEMA)
    assert event["occupancy"] == {"inside": 0}
    assert event["credential"] == {"type": "operator", "issuer": OPERATOR_KID.hex()}
    assert rising_edges([s.state for s in g.factory.pin(g.cfg.gpio.relay_pin).states]) == 0


def test_the_count_never_goes_negative_and_exits_before_any_entry_hide_no_later_entries(unit) -> None:
    g = unit()
    for _ in range(3):  # the night guards leave; nobody was counted in
        g.commit("out", "accepted", "ok")
    assert g.gate.occupancy.inside() == 0
    g.commit("in", "accepted", "ok")
    g.commit("in", "accepted", "ok")
    assert g.gate.occupancy.inside() == 2


def test_at_a_hard_cap_an_entry_gate_rejects_and_the_relay_never_moves_for_it(unit) -> None:
    g = unit(site={"capacity": 1})
    assert g.scan("EMP-0001") is Reason.OK
    assert g.scan("EMP-0002") is Reason.CAPACITY_FULL
    assert g.signals.depth_at_accept == [1]  # the relay was asked to open once, after the commit
    relay = g.factory.pin(g.cfg.gpio.relay_pin)
    assert wait_until(lambda: [s.state for s in relay.states] == [False, True, False], 5)
    event = json.loads(g.outbox.pending(limit=10)[-1][1])
    assert (event["decision"], event["reason"]) == ("rejected", "capacity_full")
    # An operator's open still opens, and the record says the site was full.
    assert g.gate.remote_open(OPERATOR_KID.hex())[0]
    event = json.loads(g.outbox.pending(limit=10)[-1][1])
    jsonschema.validate(event, CHECKIN_SCHEMA)
    assert event["flags"] == ["over_capacity"] and g.gate.occupancy.inside() == 2


@pytest.mark.parametrize(
    ("direction", "capacity", "inside", "flagged"),
    [
        ("in", 0, 3, False),  # no cap: nothing to be over
        ("in", 2, 1, False),  # room left
        ("in", 2, 2, True),  # at the cap: the operator's word beats it, and the record says so
        ("out", 1, 1, False),  # an exit never makes a site fuller
    ],
)
def test_a_remote_open_is_flagged_over_capacity_only_at_a_full_entry_gate(
    unit, direction, capacity, inside, flagged
) -> None:
    g = unit(device={"direction": direction}, site={"capacity": capacity})
    for _ in range(inside):
        g.commit("in", "accepted", "ok")
    assert g.gate.remote_open(OPERATOR_KID.hex())[0]
    event = json.loads(g.outbox.pending(limit=10)[-1][1])
    jsonschema.validate(event, CHECKIN_SCHEMA)
    assert (event["decision"], event["direction"]) == ("accepted", direction)
    assert event.get("flags", []) == (["over_capacity"] if flagged else [])


def test_in_soft_mode_the_entry_is_accepted_and_flagged(unit) -> None:
    g = unit(site={"capacity": 1, "capacity_mode": "soft"})
    assert g.scan("EMP-0001") is Reason.OK
    assert g.scan("EMP-0002") is Reason.OK
    event = json.loads(g.outbox.pending(limit=10)[-1][1])
    jsonschema.validate(event, CHECKIN_SCHEMA)
    assert event["decision"] == "accepted" and event["flags"] == ["over_capacity"]
    assert g.gate.occupancy.inside() == 2


def test_an_exit_gate_opens_for_any_readable_code_even_at_the_cap(tmp_path: Path, unit) -> None:
    deny = tmp_path / "deny.txt"
    deny.write_text("EMP-0666\n")
    g = unit(device={"direction": "out"}, site={"capacity": 1}, policy={"denylist_file": str(deny)})
    g.commit("in", "accepted", "ok")  # the site is full
    for code in ("EMP-0666", "VISITOR-0042", "GP1:ABCDEF"):  # deny-listed, unknown, malformed
        assert g.scan(code) is Reason.OK
    assert g.gate.occupancy.own().exits == 3
    event = json.loads(g.outbox.pending(limit=10)[1][1])
    assert event["direction"] == "out" and event["credential"]["subject"]  # who left is recorded


def test_with_check_exits_an_exit_gate_judges_codes_but_never_by_capacity(tmp_path: Path, unit) -> None:
    deny = tmp_path / "deny.txt"
    deny.write_text("EMP-0666\n")
    g = unit(
        device={"direction": "out"},
        site={"capacity": 1, "check_exits": True},
        policy={"denylist_file": str(deny)},
    )
    g.commit("in", "accepted", "ok")
    assert g.scan("EMP-0666") is Reason.DENYLISTED
    assert g.scan("EMP-0001") is Reason.OK
    assert g.gate.occupancy.own().exits == 1


# -- the day --------------------------------------------------------------------------------------


def test_the_day_starts_again_at_day_start_in_the_site_time_zone(unit) -> None:
    g = unit(FakeClock(BEFORE_DAY_START))  # 03:59 in Vietnam
    g.commit("in", "accepted", "ok")
    g.commit("in", "accepted", "ok")
    assert (g.gate.occupancy.own().day, g.gate.occupancy.inside()) == (DAY, 2)
    g.clock.advance(59)
    g.gate.occupancy.tick()
    assert g.gate.occupancy.own().day == DAY
    g.clock.advance(1)  # 04:00:00 local
    g.gate.occupancy.tick()
    own = g.gate.occupancy.own()
    assert (own.day, own.entries, g.gate.occupancy.inside()) == (DAY + timedelta(days=1), 0, 0)


def test_an_unsynced_clock_never_starts_a_day_and_a_clock_going_back_never_resets(unit) -> None:
    g = unit(FakeClock(BEFORE_DAY_START))
    g.synced = False
    g.commit("in", "accepted", "ok")
    g.clock.advance(3600)  # past 04:00 local, but nothing says the clock is right
    g.commit("in", "accepted", "ok")
    assert (g.gate.occupancy.own().day, g.gate.occupancy.inside()) == (DAY, 2)
    g.clock.wall = datetime(1970, 1, 1, tzinfo=UTC)  # a Pi without RTC after a reboot
    g.restart()
    g.commit("in", "accepted", "ok")
    assert (g.gate.occupancy.own().day, g.gate.occupancy.inside()) == (DAY, 3)
    g.synced = True  # still 1970, now "synced": a day only ever moves forward
    g.gate.occupancy.tick()
    assert g.gate.occupancy.inside() == 3
    g.clock.wall = BEFORE_DAY_START + timedelta(hours=1)  # NTP answers: the real time
    g.gate.occupancy.tick()
    assert (g.gate.occupancy.own().day, g.gate.occupancy.inside()) == (DAY + timedelta(days=1), 0)


def test_an_iana_time_zone_name_works_like_its_offset(unit) -> None:
    pytest.importorskip("zoneinfo").ZoneInfo("Asia/Ho_Chi_Minh")  # needs the time-zone database
    g = unit(FakeClock(BEFORE_DAY_START + timedelta(seconds=60)), site={"timezone": "Asia/Ho_Chi_Minh"})
    assert g.gate.occupancy.own().day == DAY + timedelta(days=1)


# -- counters from the broker, unit level -----------------------------------------------------------


def sibling_counter(
    cfg: config_mod.Config, device: str, *, entries: int = 0, exits: int = 0, **kw: Any
) -> bytes:
    counts = Counts(kw.pop("day", DAY), kw.pop("version", 1), entries, exits, kw.pop("adjust", 0))
    return counter_json(
        counts, site=cfg.device.site, device=device, capacity=cfg.site.capacity, now=MORNING, **kw
    )


def test_a_gate_of_another_site_is_not_counted_where_site_gates_names_the_siblings(unit, caplog) -> None:
    g = unit(device={"id": "g1"}, site={"gates": ["g1", "g2"]})
    occ = g.gate.occupancy
    occ.heard("g2", sibling_counter(g.cfg, "g2", entries=2), retained=True)
    with caplog.at_level(logging.WARNING, logger="scanner.gate.occupancy"):
        occ.heard("intruder", sibling_counter(g.cfg, "intruder", entries=50), retained=True)
    assert occ.inside() == 2
    assert "'intruder': not one of site.gates" in caplog.text


# -- a gate that has not heard the site yet (just started, its siblings' counters on their way) ----

EXIT = json.dumps({"decision": "accepted", "reason": "ok", "direction": "out"}).encode()
ENTRY = json.dumps({"decision": "accepted", "reason": "ok", "direction": "in"}).encode()


class Linked:
    """An Occupancy wired as the daemon wires it (a publisher reports the link and the counters),
    driven by hand in the order the broker delivers, with what it publishes recorded."""

    def __init__(self, tmp_path: Path, clock: FakeClock, saved: bytes | None = None, **site: Any) -> None:
        self.cfg = make_config(tmp_path, device={"id": "out-c", "site": "site-t"}, site=site)
        self.occ = Occupancy(
            self.cfg,
            now=clock.now,
            monotonic=clock.monotonic,
            clock_synced=lambda: True,
            saved=saved,
            linked=True,
        )
        self.sent: list[dict[str, Any]] = []
        self.occ.publish = lambda body: self.sent.append(json.loads(body))
        self.blob: bytes | None = None

    def count(self, event: bytes) -> None:
        """Commit one event as Gate._commit does: stage (the state row to store), then committed."""
        staged = self.occ.stage(event)
        assert staged is not None
        self.blob = staged[1]
        self.occ.committed()

    def sibling(self, device: str, **counts: Any) -> None:
        self.occ.heard(device, sibling_counter(self.cfg, device, **counts), retained=True)

    def echo(self) -> None:
        """This gate's latest counter, back from the broker live."""
        body = json.dumps(self.sent[-1]).encode()
        self.occ.heard("out-c", body, retained=False)


def test_an_exit_decided_before_the_siblings_counters_arrive_still_counts(tmp_path: Path) -> None:
    clock = FakeClock(MORNING)
    g = Linked(tmp_path, clock)
    g.occ.link(True)
    g.count(EXIT)  # the visitor who came in by in-a leaves by this gate, 50 ms after its start
    assert g.occ.inside() == 0
    g.sibling("in-a", entries=1)  # in-a's retained counter, a moment later
    g.echo()  # ...and then our own: the broker has sent all it kept
    assert g.occ.inside() == 0
    assert (g.occ.own().exits, g.occ.own().adjust) == (1, 0)  # the exit counts, nothing held
    assert g.sent[-1]["adjust"] == 0
    g.sibling("in-a", entries=2, version=2)  # the next entry is seen
    assert g.occ.inside() == 1


def test_exits_before_anyone_was_counted_are_held_at_0_once_the_gate_has_heard_the_site(
    tmp_path: Path,
) -> None:
    clock = FakeClock(MORNING)
    g = Linked(tmp_path, clock)
    g.occ.link(True)
    g.count(EXIT)
    g.count(EXIT)  # two night guards leave; in-a counted one person in
    g.sibling("in-a", entries=1)
    assert g.occ.own().adjust == 0  # not yet: more counters may be on their way
    g.echo()
    assert (g.occ.own().exits, g.occ.own().adjust, g.occ.inside()) == (2, 1, 0)
    assert g.sent[-1]["adjust"] == 1  # the siblings learn of the hold at once
    g.sibling("in-a", entries=2, version=2)
    assert g.occ.inside() == 1  # the hold keeps the next entry from being swallowed
    g.count(EXIT)  # heard the site: an exit at 0 is held right away, as before
    g.count(EXIT)
    assert (g.occ.own().adjust, g.occ.inside()) == (2, 0)


def test_with_site_gates_the_gate_waits_for_every_sibling_not_for_its_own_echo(tmp_path: Path) -> None:
    clock = FakeClock(MORNING)
    g = Linked(tmp_path, clock, gates=["in-a", "in-b", "out-c"])
    g.occ.link(True)
    g.count(EXIT)
    g.echo()  # a broker restarted without its store: in-a and in-b resend when they reconnect
    g.sibling("in-a", entries=0)
    assert g.occ.own().adjust == 0
    g.sibling("in-b", entries=1)
    assert (g.occ.own().adjust, g.occ.inside()) == (0, 0)
    g.count(EXIT)  # heard the site: this one is held
    assert (g.occ.own().adjust, g.occ.inside()) == (1, 0)


def test_a_gate_that_cannot_hear_the_site_decides_on_its_view_after_stale_after_s(tmp_path: Path) -> None:
    clock = FakeClock(MORNING)
    g = Linked(tmp_path, clock, stale_after_s=30.0)
    g.count(EXIT)  # no broker yet
    clock.advance(29.5)
    g.occ.tick()
    assert g.occ.own().adjust == 0
    clock.advance(1.0)
    g.occ.tick()
    assert (g.occ.own().adjust, g.occ.inside()) == (1, 0)
    assert g.sent[-1]["adjust"] == 1


def test_exits_not_yet_held_survive_a_restart(tmp_path: Path) -> None:
    clock = FakeClock(MORNING)
    g = Linked(tmp_path, clock)
    g.count(EXIT)  # then the power goes, before the broker answered
    again = Linked(tmp_path, clock, saved=g.blob)
    assert again.occ.own().exits == 1
    again.occ.link(True)
    again.occ.tick()  # the first heartbeat: the counter to echo
    again.echo()  # nobody else on the site
    assert (again.occ.own().adjust, again.occ.inside()) == (1, 0)
    broken = json.loads(g.blob or b"")
    broken["unheld"] = -3
    assert Linked(tmp_path, clock, saved=json.dumps(broken).encode()).occ.own().exits == 0  # unreadable: 0


# -- gates on a broker ------------------------------------------------------------------------------

CODES = {
    name: synth.render_scene(name, np.random.default_rng(i))
    for i, name in enumerate(("EMP-0001", "EMP-0002", "EMP-0003", "EMP-0004", "EMP-0005"))
}


def site_gate(
    broker: LocalBroker, tmp_path: Path, site_name: str, name: str, **sections: dict[str, Any]
) -> config_mod.Config:
    root = tmp_path / name
    root.mkdir(parents=True, exist_ok=True)
    device = {"id": f"{name}-{site_name[-8:]}", "site": site_name, **sections.pop("device", {})}
    return gate_config(
        broker,
        root,
        device=device,
        site={"capacity": 2, **sections.pop("site", {})},
        policy={"anti_passback_s": 0.0},
        **sections,
    )


class Site:
    """Gates of one site, running on mock pins with held frames; entered and stopped together."""

    def __init__(self, broker: LocalBroker, tmp_path: Path, *names: str, **sections: dict[str, Any]) -> None:
        self.name = unique_name("market")
        self.broker = broker
        self.cfgs = {}
        for spec in names:
            name, _, direction = spec.partition(":")
            self.cfgs[name] = site_gate(
                broker, tmp_path, self.name, name, device={"direction": direction or "in"}, **sections
            )
        self.factories = {n: MockFactory() for n in self.cfgs}
        self.sources = {n: HeldSource(period_s=0.05) for n in self.cfgs}
        self.apps: dict[str, App] = {}
        self.relay: dict[str, list[bool]] = {}
        self._stack = contextlib.ExitStack()

    def start(self, name: str, **app_kwargs: Any) -> App:
        app = self._stack.enter_context(
            running(self.cfgs[name], self.factories[name], self.sources[name], **app_kwargs)
        )
        self.apps[name] = app
        return app

    def __enter__(self) -> Site:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        # Whole relay histories, kept past the factories (closing one forgets its pins).
        for name, f in self.factories.items():
            self.relay[name] = [s.state for s in f.pin(self.cfgs[name].gpio.relay_pin).states]
            f.close()

    def occ(self, name: str) -> Occupancy:
        app = self.apps[name]
        assert app.occupancy is not None
        return app.occupancy

    def show(self, name: str, code: str) -> None:
        """Hold a code to a gate's camera until it decided, then take it away."""
        gate = self.apps[name].gate
        assert gate is not None
        before = sum(gate.reasons.values())
        self.sources[name].image = CODES[code]
        assert wait_until(lambda: sum(gate.reasons.values()) > before, 10), f"{name} did not decide on {code}"
        self.sources[name].image = BLANK

    def converge(self, inside: int, *names: str, timeout: float = 15.0) -> None:
        for name in names or self.apps:
            occ = self.occ(name)
            assert occ.wait_for(lambda occ=occ: occ.inside() == inside, timeout), (name, occ.snapshot())

    def see_each_other(self, timeout: float = 15.0) -> None:
        devices = {c.device.id for n, c in self.cfgs.items() if n in self.apps}
        for name in self.apps:
            occ = self.occ(name)
            assert occ.wait_for(lambda occ=occ: devices <= set(occ.snapshot()["gates"]), timeout), (
                occ.snapshot()
            )

    def relay_pulses(self, name: str) -> int:
        history = self.relay[name]
        assert history[0] is False and history[-1] is False  # off at start, off after the stop
        return rising_edges(history)


def checkins(sub: Subscriber) -> list[dict[str, Any]]:
    with sub._cond:
        return [json.loads(m.payload) for m in sub.messages if m.topic.endswith("/checkin")]


def test_entries_at_two_gates_and_exits_at_a_third_move_the_count_every_gate_sees(
    broker, tmp_path, subscribe
) -> None:
    with Site(broker, tmp_path, "in-a", "in-b", "out-c:out") as site:
        sub = subscribe(f"gate/{site.name}/+/checkin", f"gate/{site.name}/+/occupancy")
        for name in site.cfgs:
            site.start(name)
        site.see_each_other()
        site.show("in-a", "EMP-0001")
        site.converge(1)
        site.show("in-b", "EMP-0002")
        site.converge(2)
        site.show("in-a", "EMP-0003")  # the cap is 2: refused at the door
        assert site.apps["in-a"].gate.reasons[Reason.CAPACITY_FULL] == 1
        site.show("out-c", "EMP-0001")  # someone leaves by the exit gate
        site.converge(1)
        site.show("in-b", "EMP-0003")  # now there is room
        site.converge(2)
        for name, app in site.apps.items():
            jsonschema.validate(app.status(), STATUS_SCHEMA)
            jsonschema.validate(app.health(remember=False), HEALTH_SCHEMA)
            assert app.status()["occupancy"]["full"], name
    # Pulses close together merge into one (a queue walks through): at least one each.
    assert all(site.relay_pulses(name) >= 1 for name in site.cfgs)
    received = checkins(sub)
    for event in received:
        jsonschema.validate(event, CHECKIN_SCHEMA)
    by_gate = [(e["device"].split("-")[1], e["direction"], e["reason"]) for e in received]
    assert sorted(by_gate) == sorted(
        [
            ("a", "in", "ok"),
            ("b", "in", "ok"),
            ("a", "in", "capacity_full"),
            ("c", "out", "ok"),
            ("b", "in", "ok"),
        ]
    )
    counters = [m for m in sub.messages if m.topic.endswith("/occupancy")]
    assert counters and all(m.retain is False for m in counters)  # live to a subscriber already there
    for m in counters:
        jsonschema.validate(json.loads(m.payload), COUNTER_SCHEMA)
    # Stopped cleanly: each gate's last counter says its counts are final.
    last = {m.topic: json.loads(m.payload) for m in counters}
    assert len(last) == 3 and all(c["stopped"] for c in last.values())


def test_a_gate_restarted_mid_day_keeps_its_counts_and_a_stopped_gate_is_not_stale(broker, tmp_path) -> None:
    clock = FlowingClock()
    with Site(broker, tmp_path, "in-a", "in-b", site={"stale_after_s": 2.0}) as site:
        site.start("in-b", clock=clock)
        a_cfg, a_factory = site.cfgs["in-a"], site.factories["in-a"]
        with running(a_cfg, a_factory, site.sources["in-a"]) as a:
            site.apps["in-a"] = a
            site.see_each_other()
            site.show("in-a", "EMP-0001")
            site.show("in-b", "EMP-0002")
            site.converge(2)
        b = site.occ("in-b")
        a_id = a_cfg.device.id
        assert b.wait_for(lambda: b.snapshot()["gates"][a_id]["stopped"], 10)
        clock.skip(30)  # far past stale_after_s: a gate that stopped cleanly is not behind
        assert wait_until(lambda: b.snapshot()["stale"] is False, 2)
        assert "occupancy_stale" not in site.apps["in-b"].alarms.snapshot()
        assert b.inside() == 2
        a = site.start("in-a")  # back, mid-day
        assert a.occupancy is not None and a.occupancy.own().entries == 1
        site.converge(2)
        site.show("in-a", "EMP-0003")  # the cap is 2
        assert a.gate.reasons[Reason.CAPACITY_FULL] == 1


def test_a_gate_cut_off_from_the_broker_decides_on_its_last_view_marks_it_stale_and_converges(
    tmp_broker_dir, tmp_path
) -> None:
    broker = LocalBroker(tmp_broker_dir).start()
    clocks = {"in-a": FlowingClock(), "in-b": FlowingClock()}
    try:
        with Site(broker, tmp_path, "in-a", "in-b", site={"capacity": 3, "stale_after_s": 2.0}) as site:
            for name, clock in clocks.items():
                site.start(name, clock=clock)
            site.see_each_other()
            site.show("in-a", "EMP-0001")
            site.show("in-b", "EMP-0002")
            site.converge(2)
            broker.stop()
            assert wait_until(lambda: not site.apps["in-a"]._publisher.connected, 10)
            site.show("in-a", "EMP-0003")  # counted where it happened, unseen by the sibling
            site.converge(3, "in-a")
            clocks["in-a"].skip(5)  # past stale_after_s without the broker
            a = site.apps["in-a"]
            assert wait_until(lambda: "occupancy_stale" in a.alarms.snapshot(), 5), a.alarms.snapshot()
            assert "cut off from the broker" in a.alarms.snapshot()["occupancy_stale"]
            assert a.status()["occupancy"]["stale"] is True
            site.show("in-a", "EMP-0004")  # its last view says the site is full
            assert a.gate.reasons[Reason.CAPACITY_FULL] == 1
            site.show("in-b", "EMP-0005")  # the sibling saw 2 of 3: it lets one in
            assert site.apps["in-b"].gate.reasons[Reason.OK] == 2
            broker.start()  # no persistence: the retained counters are gone, the gates resend
            site.converge(4, timeout=40)  # over the cap by the partition's one, and honest about it
            assert wait_until(lambda: "occupancy_stale" not in a.alarms.snapshot(), 10), a.alarms.snapshot()
    finally:
        broker.stop()


def test_an_exit_gate_started_while_the_broker_is_down_counts_its_exit_once_it_hears_the_site(
    tmp_broker_dir, tmp_path
) -> None:
    # The demo's race, made certain: the exit is decided before the gate has heard anything.
    broker = LocalBroker(tmp_broker_dir, persistence=True).start()
    try:
        with Site(broker, tmp_path, "in-a", "out-c:out") as site:
            site.start("in-a")
            site.show("in-a", "EMP-0001")
            site.converge(1, "in-a")
            a = site.occ("in-a")
            topic = f"gate/{site.name}/{site.cfgs['in-a'].device.id}/occupancy"
            with Subscriber(broker, topic) as sub:  # the broker has it: the store will too
                assert sub.wait_for(lambda ms: any(json.loads(m.payload)["entries"] == 1 for m in ms))
            broker.stop()  # in-a's counter (1 inside) stays in the broker's store
            site.start("out-c", online=False)
            site.show("out-c", "EMP-0001")  # leaves; this gate has seen nobody come in
            assert site.occ("out-c").inside() == 0
            broker.start()
            site.converge(0)  # the exit counts: before, it was held at 0 and the site stayed at 1
            assert site.occ("out-c").own().adjust == 0
            site.show("in-a", "EMP-0002")
            site.converge(1)
            assert a.snapshot()["gates"][site.cfgs["out-c"].device.id]["exits"] == 1
    finally:
        broker.stop()


def test_the_day_rolls_over_at_every_gate_of_the_site(broker, tmp_path, subscribe) -> None:
    clock = FlowingClock(BEFORE_DAY_START)  # 03:59 in Vietnam
    with Site(broker, tmp_path, "in-a", "in-b", site={"capacity": 0}) as site:
        sub = subscribe(f"gate/{site.name}/+/occupancy")
        for name in site.cfgs:
            site.start(name, clock=clock, clock_synced=lambda: True)
        site.see_each_other()
        site.show("in-a", "EMP-0001")
        site.show("in-b", "EMP-0002")
        site.converge(2)
        clock.jump(60)  # 04:00 local: a new day
        new_day = (DAY + timedelta(days=1)).isoformat()
        for name in site.apps:
            occ = site.occ(name)
            assert occ.wait_for(
                lambda occ=occ: {g["day"] for g in occ.snapshot()["gates"].values()} == {new_day}, 10
            ), occ.snapshot()
        site.converge(0)
        site.show("in-a", "EMP-0003")
        site.converge(1)
    days = {json.loads(m.payload)["day"] for m in sub.messages}
    assert days == {DAY.isoformat(), new_day}


def command(sub: Subscriber, cfg: config_mod.Config, envelope: dict[str, Any] | bytes) -> dict[str, Any]:
    """Send one command to the gate and return its reply."""
    topic = cfg.topic("cmd/occupancy")
    before = len(sub.payloads(f"{topic}/reply"))
    body = envelope if isinstance(envelope, bytes) else json.dumps(envelope).encode()
    sub.publish(topic, body)
    assert sub.wait_for(lambda msgs: len([m for m in msgs if m.topic == f"{topic}/reply"]) > before, 10)
    reply = json.loads(sub.payloads(f"{topic}/reply")[-1])
    jsonschema.validate(reply, REPLY_SCHEMA)
    return reply


def test_a_signed_correction_at_one_gate_reaches_every_sibling_and_is_on_the_record(
    broker, tmp_path, subscribe
) -> None:
    with Site(broker, tmp_path, "in-a", "in-b", site={"capacity": 0}) as site:
        b_cfg = site.cfgs["in-b"]
        sub = subscribe(f"gate/{site.name}/+/checkin", b_cfg.topic("cmd/occupancy/reply"))
        for name in site.cfgs:
            site.start(name)
        site.see_each_other()
        site.show("in-a", "EMP-0001")
        site.converge(1)
        envelope = commands.sign(
            OPERATOR, OPERATOR_KID, device=b_cfg.device.id, name="occupancy", args={"inside": 5}
        )
        reply = command(sub, b_cfg, envelope)
        assert reply["ok"] and reply["result"] == {"inside": 5}, reply
        site.converge(5)
        site.show("in-a", "EMP-0002")
        site.converge(6)
        for bad in ({"inside": -1}, {"inside": "5"}, {"inside": True}, {"inside": 5, "also": 1}, {}):
            envelope = commands.sign(
                OPERATOR, OPERATOR_KID, device=b_cfg.device.id, name="occupancy", args=bad
            )
            reply = command(sub, b_cfg, envelope)
            assert not reply["ok"] and reply["reason"] == "malformed", (bad, reply)
        unsigned = {"schema": commands.SCHEMA, "name": "occupancy", "device": b_cfg.device.id}
        assert command(sub, b_cfg, unsigned)["reason"] == "unsigned"
        site.converge(6)
    corrections = [e for e in checkins(sub) if e["reason"] == "occupancy_set"]
    assert len(corrections) == 1
    (event,) = corrections
    jsonschema.validate(event, CHECKIN_SCHEMA)
    assert event["device"] == b_cfg.device.id and event["occupancy"] == {"inside": 5}
    assert event["credential"] == {"type": "operator", "issuer": OPERATOR_KID.hex()}
    assert site.relay_pulses("in-b") == 0


HOSTILE: dict[str, Callable[[str, str], bytes]] = {
    "not-json": lambda site, dev: b"{not json",
    "nested": lambda site, dev: b"[" * 1500 + b"]" * 1500,
    "too-long": lambda site, dev: b'{"pad": "' + b"x" * 4000 + b'"}',
    "nan": lambda site, dev: _counter(site, dev, entries=float("nan")),
    "negative": lambda site, dev: _counter(site, dev, exits=-40),
    "huge": lambda site, dev: _counter(site, dev, entries=10**30),
    "float": lambda site, dev: _counter(site, dev, entries=3.0),
    "bool": lambda site, dev: _counter(site, dev, adjust=True),
    "wrong-day": lambda site, dev: _counter(site, dev, day="2026-11-28", entries=40),
    "bad-day": lambda site, dev: _counter(site, dev, day="tomorrow", entries=40),
    "other-site": lambda site, dev: _counter("another-market", dev, entries=40),
    "not-its-topic": lambda site, dev: _counter(site, "some-other-gate", entries=40),
    "schema": lambda site, dev: _counter(site, dev, schema="gate-scanner/occupancy/9", entries=40),
    "list": lambda site, dev: b"[1, 2, 3]",
}


def _counter(site: str, device: str, **fields: Any) -> bytes:
    body = {
        "schema": occupancy.SCHEMA,
        "site": site,
        "device": device,
        "day": "2026-11-29",
        "version": 1,
        "entries": 0,
        "exits": 0,
        "adjust": 0,
        "capacity": 3,
        "stopped": False,
        "ts": "2026-11-29T03:00:00.000Z",
        **fields,
    }
    return json.dumps(body).encode()  # NaN goes out as the bare word NaN, which Python reads back


def test_hostile_counters_are_ignored_with_a_log_line_never_a_crash_or_a_wrong_cap(
    broker, tmp_path, subscribe, caplog
) -> None:
    clock = FlowingClock(MORNING)  # the counters below are of this day
    with Site(broker, tmp_path, "in-a", site={"capacity": 3}) as site:
        hostile = subscribe(f"gate/{site.name}/#")
        app = site.start("in-a", clock=clock, clock_synced=lambda: True)
        occ = site.occ("in-a")
        with caplog.at_level(logging.WARNING, logger="scanner.gate.occupancy"):
            for kind, make in HOSTILE.items():
                topic = f"gate/{site.name}/evil-{kind}/occupancy"
                hostile.client.publish(
                    topic, make(site.name, f"evil-{kind}"), qos=1, retain=True
                ).wait_for_publish(5)
            # A proper counter after them: the channel works, and only it counts.
            good = _counter(site.name, "good-1", entries=2)
            hostile.client.publish(
                f"gate/{site.name}/good-1/occupancy", good, qos=1, retain=True
            ).wait_for_publish(5)
            assert occ.wait_for(lambda: occ.inside() == 2, 10), occ.snapshot()
        for kind in HOSTILE:
            assert f"ignoring the counter of 'evil-{kind}'" in caplog.text or kind == "wrong-day", kind
        # Another day's counter is kept (it is that gate's latest) but never summed.
        assert occ.snapshot()["gates"]["evil-wrong-day"]["day"] == "2026-11-28"
        site.show("in-a", "EMP-0001")
        assert occ.inside() == 3
        site.show("in-a", "EMP-0002")
        assert app.gate.reasons == {Reason.OK: 1, Reason.CAPACITY_FULL: 1}
        # The same hostile message again costs no second log line (a flood cannot fill the journal).
        lines = caplog.text.count("evil-negative")
        hostile.client.publish(
            f"gate/{site.name}/evil-negative/occupancy",
            HOSTILE["negative"](site.name, "evil-negative"),
            qos=1,
        ).wait_for_publish(5)
        good2 = _counter(site.name, "good-1", entries=1)
        hostile.client.publish(f"gate/{site.name}/good-1/occupancy", good2, qos=1).wait_for_publish(5)
        assert occ.wait_for(lambda: occ.inside() == 2, 10)
        assert caplog.text.count("evil-negative") == lines
        for kind in HOSTILE:  # clear them from the broker's store
            hostile.client.publish(
                f"gate/{site.name}/evil-{kind}/occupancy", b"", qos=1, retain=True
            ).wait_for_publish(5)


def test_a_gate_that_lost_its_state_takes_its_counts_back_from_its_retained_counter(
    broker, tmp_path, caplog
) -> None:
    with Site(broker, tmp_path, "in-a", site={"capacity": 0}) as site:
        cfg = site.cfgs["in-a"]
        with running(cfg, site.factories["in-a"], site.sources["in-a"]) as app:
            site.apps["in-a"] = app
            site.show("in-a", "EMP-0001")
            site.show("in-a", "EMP-0002")
            site.converge(2)
        for name in ("outbox.db", "outbox.db-wal", "outbox.db-shm"):  # a new SD card, say
            (cfg.storage.dir / name).unlink(missing_ok=True)
        with caplog.at_level(logging.WARNING, logger="scanner.gate.occupancy"):
            app = site.start("in-a")
            site.converge(2)
        assert app.occupancy is not None and app.occupancy.own().entries == 2
        assert "taking its counts back" in caplog.text
        site.show("in-a", "EMP-0003")
        site.converge(3)


def test_home_assistant_gets_one_occupancy_sensor_per_site_from_every_gate(tmp_path: Path) -> None:
    configs = [
        make_config(tmp_path, device={"id": dev, "site": "cho-ben-thanh"}, homeassistant={"enabled": True})
        for dev in ("gate-01", "gate-02")
    ]
    sensors = [
        [(t, json.loads(b)) for t, b in ha_discovery(c, v) if "occupancy" in t]
        for c, v in zip(configs, ("1.0", "1.1"), strict=True)
    ]
    assert sensors[0] == sensors[1]  # byte for byte the same config: one entity, whoever publishes
    ((topic, body),) = sensors[0]
    assert topic == "homeassistant/sensor/gate_scanner_site_cho-ben-thanh/occupancy/config"
    assert body["state_topic"] == "gate/cho-ben-thanh/+/health"
    assert body["value_template"] == "{{ value_json.occupancy.inside }}"
