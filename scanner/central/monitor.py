"""`gate-scanner monitor`: the operator's live view of every gate and the check-in stream.

Subscribes to ``{prefix}/+/+/{availability,status,health,checkin}`` (or one site's) and keeps
one row per gate, and to the gates' occupancy counters for one row per site (people inside and
the cap, summed from the counters as the gates sum them). On a terminal it redraws a table at
most once a second; otherwise it prints one line per change, or with ``--json`` one JSON object
per line (``kind``: ``gate`` | ``checkin`` | ``site``) for other programs. Subjects are
pseudonyms already; only their first 8 hex characters are shown.

Threads: paho's network thread only puts messages on a queue; the main thread owns the table
and all output.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import re
import socket
import sys
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from scanner.config import NAME, Config, load_central
from scanner.console import load_or_report
from scanner.events import now_ms
from scanner.mqtt import connect_failure, secure

LEAVES = ("availability", "status", "health", "checkin")
OCCUPANCY = "occupancy"
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
REDRAW_S = 1.0
SESSION_TAKEN_OVER = 0x8E  # MQTT v5 DISCONNECT reason
STREAM_LINES = 15
# `gate-scanner collect` publishes its own status under {prefix}/collector/{name}/: not a gate.
COLLECTOR_SITE = "collector"
STATUS_SITES_MAX = 10_000  # sites read from one collector status; a bigger list is cut there
_HEX = re.compile(r"[0-9a-fA-F]+")


@dataclass(slots=True)
class GateRow:
    """What the monitor knows about one gate; missing figures stay None."""

    site: str
    device: str
    availability: str | None = None
    # UTC RFC 3339: when a live (not retained) message arrived, else a retained health's ts
    last_seen: str | None = None
    last_decision: str | None = None
    last_reason: str | None = None
    accepts: int = 0  # since the monitor started
    rejects: int = 0
    fps: float | None = None
    outbox_depth: int | None = None
    clock_synced: bool | None = None
    version: str | None = None
    alarms: list[str] = field(default_factory=list)
    # Fields whose latest value could not be shown (NaN, out of range, wrong type, too long,
    # control characters), and "health"/"status"/"checkin" for a message with nothing readable.
    invalid: list[str] = field(default_factory=list)
    # Who is inside the gate's site: by the gate's own count (``status.occupancy.inside``,
    # from gates that count), and by the collector's stays for the site. They should agree.
    inside_gate: int | None = None
    inside_stays: int | None = None


@dataclass(frozen=True, slots=True)
class CheckinLine:
    ts: str | None
    site: str
    device: str
    decision: str | None
    reason: str | None
    credential_type: str | None
    subject: str | None  # first 8 hex characters of the pseudonym
    seq: int | None
    invalid: list[str] = field(default_factory=list)  # as GateRow.invalid, for this check-in


# --- reading what a gate sent --------------------------------------------------------------------
# A gate's payload is untrusted: a stolen or broken gate may send anything the broker lets
# through. Every value is checked for what it claims to be before it is shown; one that is
# not becomes None and its field is named in ``invalid``, so the operator sees that something
# came and what, instead of nothing or a traceback.

PAYLOAD_MAX = 256 * 1024  # bigger than any status, health or check-in a gate sends
TEXT_MAX = 64  # a code, a version, an alarm name: anything longer is not one
TS_MAX = 40
ALARMS_MAX = 32
FPS_MAX = 10_000.0
COUNT_MAX = 2**63 - 1
_DIGITS_MAX = 19  # int() of a 5,000-digit number raises, of a 400-digit one is no count either


class _Unusable:
    """What json gives for NaN, ±Infinity, 1e999 and integers past 19 digits: never shown."""

    def __repr__(self) -> str:
        return "<unusable>"


UNUSABLE = _Unusable()


def _int(text: str) -> int | _Unusable:
    return int(text) if len(text.lstrip("-")) <= _DIGITS_MAX else UNUSABLE


def _float(text: str) -> float | _Unusable:
    value = float(text)
    return value if math.isfinite(value) else UNUSABLE


@dataclass(frozen=True, slots=True)
class SiteRow:
    """A site's occupancy: its gates' counters of the latest day they report, summed."""

    site: str
    day: str | None
    inside: int | None  # entries - exits + adjust over those counters, never below 0
    capacity: int | None  # 0 = no cap; None when the gates are not configured alike
    gates: int  # counters summed


def _json(payload: bytes) -> dict[str, Any] | None:
    """The payload's JSON object, or None when there is none to read (or it is absurdly big)."""
    if len(payload) > PAYLOAD_MAX:
        return None
    try:
        value = json.loads(payload, parse_int=_int, parse_float=_float, parse_constant=lambda _c: UNUSABLE)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return value if isinstance(value, dict) else None


# Each reader: (the value to show or None, whether a value was there but unusable).
Read = tuple[Any, bool]


def _at(body: dict[str, Any], *path: str) -> Read:
    value: Any = body
    for key in path:
        if value is None:
            return None, False
        if not isinstance(value, dict):
            return None, True  # e.g. "outbox": [4]: there was something, not an object
        value = value.get(key)
    return value, False


def _count(value: Any, low: int = 0) -> Read:
    if value is None:
        return None, False
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= COUNT_MAX:
        return value, False
    return None, True


def _rate(value: Any) -> Read:
    if value is None:
        return None, False
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= FPS_MAX:
        return float(value), False
    return None, True


def _flag(value: Any) -> Read:
    return (value, False) if value is None or isinstance(value, bool) else (None, True)


def _text(value: Any, limit: int = TEXT_MAX) -> Read:
    """Short printable text: no terminal escapes, no bidi overrides, nothing to flood a cell."""
    if value is None:
        return None, False
    if isinstance(value, str) and 0 < len(value) <= limit and value.isprintable():
        return value, False
    return None, True


def _pseudonym(value: Any) -> Read:
    """The first 8 hex digits of a subject pseudonym (all an operator needs to tell two apart)."""
    if value is None:
        return None, False
    if isinstance(value, str) and 8 <= len(value) <= 64 and _HEX.fullmatch(value):
        return value[:8], False
    return None, True


def _alarm_names(value: Any) -> Read:
    if value is None:
        return None, False
    if isinstance(value, dict):
        raw = list(value)
    elif isinstance(value, list):
        raw = [v.get("kind") if isinstance(v, dict) else v for v in value]
    else:
        return None, True
    names = [name for name in (_text(n)[0] for n in raw) if name is not None]
    return sorted(set(names))[:ALARMS_MAX], len(names) != len(raw) or len(set(names)) > ALARMS_MAX


def _label(segment: str) -> str:
    """A topic segment as shown: as it is when it is a valid name, else escaped and cut short."""
    if NAME.fullmatch(segment):
        return segment
    escaped = segment.encode("unicode_escape").decode("ascii")
    return "!" + (escaped if len(escaped) <= TEXT_MAX else escaped[: TEXT_MAX - 1] + "~")


class Monitor:
    """The table and the stream; ``handle()`` takes one message, returns what changed."""

    def __init__(self, prefix: str, site: str | None = None) -> None:
        self.prefix = prefix
        self.site = site
        self.gates: dict[tuple[str, str], GateRow] = {}
        self.stream: deque[CheckinLine] = deque(maxlen=STREAM_LINES)
        # Per gate and leaf: the fields its latest message of that leaf could not fill.
        self._marks: dict[tuple[str, str], dict[str, set[str]]] = {}
        self.counters: dict[str, dict[str, tuple[str, int, int]]] = {}  # site → device → (day, net, cap)
        self.inside_stays: dict[str, int] | None = None  # per site, from the newest collector status

    def topics(self) -> list[str]:
        topics = [f"{self.prefix}/{self.site or '+'}/+/{leaf}" for leaf in (*LEAVES, OCCUPANCY)]
        if self.site is not None:  # with every site, the status subscription already covers it
            topics.append(f"{self.prefix}/{COLLECTOR_SITE}/+/status")
        return topics

    def handle(self, topic: str, payload: bytes, retained: bool) -> tuple[GateRow | None, CheckinLine | None]:
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != self.prefix or parts[3] not in LEAVES:
            return None, None
        _, site, device, leaf = parts
        if site == COLLECTOR_SITE:
            return (self._collector_status(payload), None) if leaf == "status" else (None, None)
        if self.site is not None and site != self.site:
            return None, None
        key = (site, device)
        row = self.gates.setdefault(
            key, GateRow(site=_label(site), device=_label(device), inside_stays=self._stays_at(site))
        )
        if not retained:
            row.last_seen = now_ms()
        line = None
        if not payload and leaf != "availability":
            marks: set[str] = set()  # a retained message being cleared: nothing to show, nothing wrong
        elif leaf == "availability":
            text = payload[:TEXT_MAX].decode("utf-8", "replace").strip()
            row.availability, bad = _text(text or None, 16)
            marks = {"availability"} if bad or len(payload) > TEXT_MAX else set()
        elif leaf == "status":
            marks = self._status(row, payload)
        elif leaf == "health":
            marks = self._health(row, payload, retained)
        else:
            line, marks = self._checkin(row, payload)
        self._marks.setdefault(key, {})[leaf] = marks
        row.invalid = sorted(set().union(*self._marks[key].values()))
        return row, line

    def _stays_at(self, site: str) -> int | None:
        return None if self.inside_stays is None else self.inside_stays.get(site, 0)

    def _collector_status(self, payload: bytes) -> GateRow | None:
        """A collector's count of who is inside each site, set on every gate row of the site.

        A site the status does not name has nobody inside by the stays. Returns one changed
        row (the table redraws whole), or None when no gate row changed."""
        body = _json(payload) or {}
        entries = body.get("occupancy")
        if not isinstance(entries, list):
            return None
        counts: dict[str, int] = {}
        for entry in entries[:STATUS_SITES_MAX]:
            if isinstance(entry, dict) and isinstance(entry.get("site"), str):
                n, _bad = _count(entry.get("inside"))
                if n is not None:
                    counts[entry["site"]] = n
        self.inside_stays = counts
        changed = None
        for (site, _device), row in sorted(self.gates.items()):
            if row.inside_stays != counts.get(site, 0):
                row.inside_stays = counts.get(site, 0)
                changed = row
        return changed

    def differences(self) -> list[str]:
        """One line per site where the gates' own count and the stays' count differ."""
        out = []
        for site in sorted({site for site, _ in self.gates}):
            rows = [r for (s, _), r in self.gates.items() if s == site]
            counts = sorted({r.inside_gate for r in rows if r.inside_gate is not None})
            stays = rows[0].inside_stays
            if counts and stays is not None and counts != [stays]:
                out.append(
                    f"site {site}: the gates count {'/'.join(map(str, counts))} inside, the stays {stays}"
                )
        return out

    def _status(self, row: GateRow, payload: bytes) -> set[str]:
        body = _json(payload)
        if body is None:
            return {"status"}
        marks = set()
        alarms, bad = _alarm_names(body.get("alarms"))
        if alarms is not None or bad:
            row.alarms = alarms or []
        if bad:
            marks.add("alarms")
        version = body.get("version")
        if isinstance(version, int | float) and not isinstance(version, bool):
            version = str(version)  # a finite number: UNUSABLE is neither
        shown, bad = _text(version)
        if shown is not None:
            row.version = shown
        if bad:
            marks.add("version")
        inside, bad = _at(body, "occupancy", "inside")
        inside, bad_inside = _count(inside)
        if inside is not None:
            row.inside_gate = inside
        if bad or bad_inside:
            marks.add("inside_gate")
        return marks

    def _health(self, row: GateRow, payload: bytes, retained: bool) -> set[str]:
        # scanner/schemas/health-1.json; any field may be missing (older or newer gates).
        body = _json(payload)
        if body is None:
            return {"health"}  # the last readable figures stay, marked
        marks = set()
        row.fps, bad = _rate(body.get("fps"))
        if bad:
            marks.add("fps")
        depth, bad = _at(body, "outbox", "depth")
        row.outbox_depth, bad_depth = _count(depth)
        if bad or bad_depth:
            marks.add("outbox_depth")
        synced, bad = _flag(body.get("clock_synced"))
        if synced is not None:
            row.clock_synced = synced
        if bad:
            marks.add("clock_synced")
        ts, bad = _text(body.get("ts"), TS_MAX)
        if bad:
            marks.add("last_seen")
        elif retained and row.last_seen is None and ts is not None:
            row.last_seen = ts  # the gate's own sample time: the best we know
        alarms, bad = _alarm_names(body.get("alarms"))
        if alarms is not None or bad:
            row.alarms = alarms or []
        if bad:
            marks.add("alarms")
        return marks

    def _checkin(self, row: GateRow, payload: bytes) -> tuple[CheckinLine | None, set[str]]:
        body = _json(payload)
        if body is None:
            return None, {"checkin"}
        invalid: set[str] = set()

        def read(name: str, got: Read) -> Any:
            if got[1]:
                invalid.add(name)
            return got[0]

        decision = read("decision", _text(body.get("decision")))
        reason = read("reason", _text(body.get("reason")))
        ts = read("ts", _text(body.get("ts"), TS_MAX))
        seq = read("seq", _count(body.get("seq"), low=1))
        synced = read("clock_synced", _flag(body.get("clock_synced")))
        ctype = read("credential_type", _at(body, "credential", "type"))
        ctype = read("credential_type", _text(ctype, 32))
        subject = read("subject", _at(body, "credential", "subject"))
        subject = read("subject", _pseudonym(subject))
        if decision == "accepted":
            row.accepts += 1
        elif decision == "rejected":
            row.rejects += 1
        row.last_decision, row.last_reason = decision, reason
        if synced is not None:
            row.clock_synced = synced
        line = CheckinLine(
            ts=ts,
            site=row.site,
            device=row.device,
            decision=decision,
            reason=reason,
            credential_type=ctype,
            subject=subject,
            seq=seq,
            invalid=sorted(invalid),
        )
        self.stream.append(line)
        return line, set()

    def handle_site(self, topic: str, payload: bytes) -> SiteRow | None:
        """An occupancy counter (scanner/schemas/occupancy-1.json): the site's row, or None."""
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != self.prefix or parts[3] != OCCUPANCY:
            return None
        _, site, device, _ = parts
        if self.site is not None and site != self.site:
            return None
        counters = self.counters.setdefault(site, {})
        body = _json(payload)
        figures = [
            _integer(body.get(k)) if body else None for k in ("entries", "exits", "adjust", "capacity")
        ]
        day = body.get("day") if body else None
        if not payload:
            counters.pop(device, None)  # cleared: that gate no longer counts
        elif isinstance(day, str) and _DAY.fullmatch(day) and None not in figures and len(counters) < 256:
            entries, exits, adjust, capacity = (f or 0 for f in figures)
            counters[device] = (day, entries - exits + adjust, capacity)
        else:
            return None  # not a counter: a gate ignores it too
        return self.site_row(site)

    def site_row(self, site: str) -> SiteRow:
        counters = self.counters.get(site, {})
        if not counters:
            return SiteRow(site, None, None, None, 0)
        day = max(d for d, _n, _c in counters.values())
        today = [(net, cap) for d, net, cap in counters.values() if d == day]
        caps = {cap for _n, cap in today}
        capacity = caps.pop() if len(caps) == 1 else None
        return SiteRow(site, day, max(0, sum(n for n, _c in today)), capacity, len(today))

    # --- rendering ---------------------------------------------------------------------------

    def table(self) -> str:
        head: tuple[str, ...] = ("site", "device", "avail", "last seen", "last decision", "acc", "rej")
        head += ("fps", "outbox", "clock", "in:gate", "in:stays", "alarms", "unreadable")
        rows: list[tuple[str, ...]] = [head]
        for (_site, _dev), g in sorted(self.gates.items()):
            decision = f"{g.last_decision or '-'}/{g.last_reason}" if g.last_reason else g.last_decision
            bad = set(g.invalid)

            def cell(name: str, shown: str, bad: set[str] = bad) -> str:
                return "!" if name in bad else shown

            alarms = ",".join(g.alarms) + (",!" if "alarms" in bad else "")
            rows.append(
                (
                    g.site,
                    g.device,
                    cell("availability", g.availability or "?"),
                    cell("last_seen", g.last_seen[11:19] if g.last_seen else "-"),
                    decision or "-",
                    str(g.accepts),
                    str(g.rejects),
                    cell("fps", f"{g.fps:.1f}" if g.fps is not None else "-"),
                    cell("outbox_depth", str(g.outbox_depth) if g.outbox_depth is not None else "-"),
                    cell("clock_synced", {True: "sync", False: "NOSYNC", None: "?"}[g.clock_synced]),
                    cell("inside_gate", _dash(g.inside_gate)),
                    _dash(g.inside_stays),
                    alarms.lstrip(",") or "-",
                    ",".join(g.invalid) or "-",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        out = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        out.insert(1, "  ".join("-" * w for w in widths))
        out.extend(self.sites_table())
        out += self.differences()
        out.append("")
        out.append("last check-ins, newest last (acc/rej: since the monitor started; !: unreadable):")
        out.extend(text_checkin(line) for line in self.stream)
        return "\n".join(out)

    def sites_table(self) -> list[str]:
        if not self.counters:
            return []
        out = ["", "site occupancy (the gates' counters of the latest day they report):"]
        for site in sorted(self.counters):
            out.append(text_site(self.site_row(site)))
        return out


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**9 else None


def text_site(r: SiteRow) -> str:
    cap = {0: "no cap", None: "caps differ between its gates"}.get(r.capacity, f"cap {r.capacity}")
    inside = "-" if r.inside is None else str(r.inside)
    return f"site {r.site} {r.day or '-'}: {inside} inside, {cap} ({r.gates} gates)"


def text_checkin(c: CheckinLine) -> str:
    def shown(name: str, value: str | None, missing: str) -> str:
        return "!" if name in c.invalid else value or missing

    return (
        f"{shown('ts', c.ts, '-')}  {c.site}/{c.device}  {shown('decision', c.decision, '?')}  "
        f"{shown('reason', c.reason, '?')}  {shown('credential_type', c.credential_type, '?')}  "
        f"{shown('subject', c.subject, '-')}"
    )


def _dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def text_gate(g: GateRow) -> str:
    return (
        f"gate {g.site}/{g.device} {g.availability or '?'} fps={g.fps if g.fps is not None else '-'} "
        f"outbox={g.outbox_depth if g.outbox_depth is not None else '-'} "
        f"clock={'?' if g.clock_synced is None else ('sync' if g.clock_synced else 'NOSYNC')} "
        f"acc={g.accepts} rej={g.rejects} "
        f"inside={_dash(g.inside_gate)}/{_dash(g.inside_stays)} "
        f"alarms={','.join(g.alarms) or '-'}" + (f" unreadable={','.join(g.invalid)}" if g.invalid else "")
    )


# --- MQTT ----------------------------------------------------------------------------------------


def _make_client(config: Config) -> mqtt.Client:
    m = config.mqtt
    protocol = mqtt.MQTTv5 if m.protocol == "5" else mqtt.MQTTv311
    # Never the gate's own id: a second client with it would take over the gate's session.
    client_id = f"monitor-{socket.gethostname()[:20]}-{uuid.uuid4().hex[:8]}"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    secure(client, config)
    client.reconnect_delay_set(1, 30)
    return client


def run(
    config: Config,
    *,
    site: str | None,
    as_json: bool,
    duration: float | None,
    count: int | None,
    out: TextIO,
    err: TextIO,
) -> int:
    mon = Monitor(config.mqtt.topic_prefix, site)
    tty = not as_json and out.isatty()
    inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    client = _make_client(config)
    where = f"{config.mqtt.host}:{config.mqtt.port}"

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            inbox.put(("refused", rc))
            return
        c.subscribe([(t, 1) for t in mon.topics()])
        inbox.put(("connected", None))

    def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, rcs: Any, _p: Any) -> None:
        inbox.put(("suback", rcs))

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        inbox.put(("msg", (msg.topic, bytes(msg.payload), bool(msg.retain))))

    def on_disconnect(_c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        inbox.put(("disconnected", rc))

    def on_connect_fail(_c: mqtt.Client, _u: Any) -> None:
        inbox.put(("connect_fail", connect_failure()))

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.on_connect_fail = on_connect_fail
    client.on_disconnect = on_disconnect
    client.connect_async(config.mqtt.host, config.mqtt.port, config.mqtt.keepalive_s)
    client.loop_start()

    deadline = time.monotonic() + duration if duration is not None else None
    shown = 0
    status = 0
    dirty = False
    last_draw = 0.0
    fail_said = False
    try:
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            wait = 0.25 if deadline is None else min(0.25, deadline - now)
            try:
                kind, value = inbox.get(timeout=max(wait, 0.0))
            except queue.Empty:
                kind, value = "tick", None
            if kind == "refused":
                print(f"monitor: broker {where} refused the connection: {value}", file=err)
                status = 1
                break
            if kind == "connect_fail" and not fail_said:
                tls, reason = value
                what = "TLS failed" if tls else "cannot reach broker"
                print(f"monitor: {what} at {where}: {reason}; retrying", file=err)
                fail_said = True
            elif kind == "disconnected":
                # With the shipped broker the certificate's CN is the client id: a second tool
                # under the same certificate (a `cmd send`, another monitor) throws this one off
                # (mosquitto 2.0 says so only by closing; newer brokers send 0x8E).
                hint = ""
                if getattr(value, "value", None) == SESSION_TAKEN_OVER:
                    hint = " (another client uses this certificate: one per tool running at once)"
                print(f"monitor: disconnected from {where}: {value}{hint}; reconnecting", file=err)
            elif kind == "connected":
                fail_said = False
                print(f"monitor: connected to {where}", file=err)
            elif kind == "suback":
                refused = [str(rc) for rc in value if rc.is_failure]
                if refused:
                    print(f"monitor: subscriptions refused by {where}: {', '.join(refused)}", file=err)
                else:  # only from here on does the broker route messages to us
                    print(f"monitor: watching {', '.join(mon.topics())}", file=err)
            elif kind == "msg" and (site_row := mon.handle_site(value[0], value[1])) is not None:
                dirty = True
                if as_json:
                    print(json.dumps({"kind": "site", **asdict(site_row)}), file=out, flush=True)
                elif not tty:
                    print(text_site(site_row), file=out, flush=True)
            elif kind == "msg":
                try:
                    row, line = mon.handle(*value)
                    if row is not None:
                        dirty = True
                        if as_json:  # strict JSON for other programs: no NaN, no Infinity
                            if line is not None:
                                print(
                                    json.dumps({"kind": "checkin", **asdict(line)}, allow_nan=False), file=out
                                )
                            print(json.dumps({"kind": "gate", **asdict(row)}, allow_nan=False), file=out)
                            out.flush()
                        elif not tty:
                            print(text_checkin(line) if line else text_gate(row), file=out, flush=True)
                except Exception as exc:
                    # handle() checks every value a gate sends; should one still get through, a
                    # gate's message must not end the operator's view of every other gate.
                    row, line = None, None
                    print(f"monitor: skipped a message on {value[0]!a}: {type(exc).__name__}", file=err)
                if line is not None:
                    shown += 1
            if tty and dirty and time.monotonic() - last_draw >= REDRAW_S:
                out.write("\x1b[H\x1b[2J" + mon.table() + "\n")
                out.flush()
                dirty, last_draw = False, time.monotonic()
            if count is not None and shown >= count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
        client.loop_stop()
    if tty:
        out.write("\x1b[H\x1b[2J" + mon.table() + "\n")
        out.flush()
    return status


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="TOML file with an [mqtt] section")
    p.add_argument("--site", help="only this site")
    p.add_argument("--json", action="store_true", help="one JSON object per line: kind gate | checkin | site")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--count", type=int, help="stop after this many check-ins")


def main(args: argparse.Namespace) -> int:
    config = load_or_report(args.config, load_central)
    if config is None:
        return 2
    if args.site is not None and not NAME.fullmatch(args.site):
        print(f"--site {args.site!r}: not a valid site name", file=sys.stderr)
        return 2
    return run(
        config,
        site=args.site,
        as_json=args.json,
        duration=args.duration,
        count=args.count,
        out=sys.stdout,
        err=sys.stderr,
    )
