"""`gate-scanner monitor`: the operator's live view of every gate and the check-in stream.

Subscribes to ``{prefix}/+/+/{availability,status,health,checkin}`` (or one site's) and keeps
one row per gate. On a terminal it redraws a table at most once a second; otherwise it prints
one line per change, or with ``--json`` one JSON object per line (``kind``: ``gate`` |
``checkin``) for other programs. Subjects are pseudonyms already; only their first 8 hex
characters are shown.

Threads: paho's network thread only puts messages on a queue; the main thread owns the table
and all output.
"""

from __future__ import annotations

import argparse
import json
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
REDRAW_S = 1.0
STREAM_LINES = 15
# `gate-scanner collect` publishes its own status under {prefix}/collector/{name}/: not a gate.
COLLECTOR_SITE = "collector"
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


def _json(payload: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _first(d: dict[str, Any], *paths: str) -> Any:
    """The first present value among dotted ``paths`` (``outbox.depth``), else None."""
    for path in paths:
        value: Any = d
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _alarm_names(value: Any) -> list[str] | None:
    if isinstance(value, dict):
        return sorted(str(k) for k in value)
    if isinstance(value, list):
        return sorted(str(v.get("kind", v)) if isinstance(v, dict) else str(v) for v in value)
    return None


class Monitor:
    """The table and the stream; ``handle()`` takes one message, returns what changed."""

    def __init__(self, prefix: str, site: str | None = None) -> None:
        self.prefix = prefix
        self.site = site
        self.gates: dict[tuple[str, str], GateRow] = {}
        self.stream: deque[CheckinLine] = deque(maxlen=STREAM_LINES)
        self.inside_stays: dict[str, int] | None = None  # per site, from the newest collector status

    def topics(self) -> list[str]:
        topics = [f"{self.prefix}/{self.site or '+'}/+/{leaf}" for leaf in LEAVES]
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
        row = self.gates.setdefault(
            (site, device), GateRow(site=site, device=device, inside_stays=self._stays_at(site))
        )
        if not retained:
            row.last_seen = now_ms()
        line = None
        if leaf == "availability":
            row.availability = payload.decode("utf-8", "replace").strip()[:16] or None
        elif leaf == "status":
            body = _json(payload) or {}
            alarms = _alarm_names(body.get("alarms"))
            if alarms is not None:
                row.alarms = alarms
            version = body.get("version")
            row.version = str(version) if version is not None else row.version
            inside = _number(_first(body, "occupancy.inside"))
            row.inside_gate = int(inside) if inside is not None else row.inside_gate
        elif leaf == "health":
            # scanner/schemas/health-1.json; any field may be missing (older or newer gates).
            body = _json(payload) or {}
            row.fps = _number(body.get("fps"))
            depth = _number(_first(body, "outbox.depth"))
            row.outbox_depth = int(depth) if depth is not None else None
            synced = body.get("clock_synced")
            row.clock_synced = synced if isinstance(synced, bool) else row.clock_synced
            if retained and row.last_seen is None and isinstance(body.get("ts"), str):
                row.last_seen = body["ts"]  # the gate's own sample time: the best we know
            alarms = _alarm_names(body.get("alarms"))
            if alarms is not None:
                row.alarms = alarms
        else:
            line = self._checkin(row, payload)
            if line is None:
                return None, None
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
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("site"), str):
                n = _number(entry.get("inside"))
                if n is not None:
                    counts[entry["site"]] = int(n)
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

    def _checkin(self, row: GateRow, payload: bytes) -> CheckinLine | None:
        body = _json(payload)
        if body is None:
            return None
        raw_credential = body.get("credential")
        credential: dict[str, Any] = raw_credential if isinstance(raw_credential, dict) else {}
        subject = credential.get("subject")
        short = subject[:8] if isinstance(subject, str) and _HEX.fullmatch(subject[:8] or "x") else None
        decision = body.get("decision") if isinstance(body.get("decision"), str) else None
        reason = body.get("reason") if isinstance(body.get("reason"), str) else None
        if decision == "accepted":
            row.accepts += 1
        elif decision == "rejected":
            row.rejects += 1
        row.last_decision, row.last_reason = decision, reason
        synced = body.get("clock_synced")
        if isinstance(synced, bool):
            row.clock_synced = synced
        seq = body.get("seq")
        ctype = credential.get("type")
        line = CheckinLine(
            ts=body.get("ts") if isinstance(body.get("ts"), str) else None,
            site=row.site,
            device=row.device,
            decision=decision,
            reason=reason,
            credential_type=ctype if isinstance(ctype, str) else None,
            subject=short,
            seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
        )
        self.stream.append(line)
        return line

    # --- rendering ---------------------------------------------------------------------------

    def table(self) -> str:
        head: tuple[str, ...] = ("site", "device", "avail", "last seen", "last decision", "acc", "rej")
        head += ("fps", "outbox", "clock", "in:gate", "in:stays", "alarms")
        rows: list[tuple[str, ...]] = [head]
        for (_site, _dev), g in sorted(self.gates.items()):
            decision = f"{g.last_decision or '-'}/{g.last_reason}" if g.last_reason else g.last_decision
            rows.append(
                (
                    g.site,
                    g.device,
                    g.availability or "?",
                    g.last_seen[11:19] if g.last_seen else "-",
                    decision or "-",
                    str(g.accepts),
                    str(g.rejects),
                    f"{g.fps:.1f}" if g.fps is not None else "-",
                    str(g.outbox_depth) if g.outbox_depth is not None else "-",
                    {True: "sync", False: "NOSYNC", None: "?"}[g.clock_synced],
                    _dash(g.inside_gate),
                    _dash(g.inside_stays),
                    ",".join(g.alarms) or "-",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        out = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        out.insert(1, "  ".join("-" * w for w in widths))
        out += self.differences()
        out.append("")
        out.append("last check-ins, newest last (acc/rej: counted since the monitor started):")
        out.extend(text_checkin(line) for line in self.stream)
        return "\n".join(out)


def text_checkin(c: CheckinLine) -> str:
    return (
        f"{c.ts or '-'}  {c.site}/{c.device}  {c.decision or '?'}  {c.reason or '?'}  "
        f"{c.credential_type or '?'}  {c.subject or '-'}"
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
        f"alarms={','.join(g.alarms) or '-'}"
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

    def on_connect_fail(_c: mqtt.Client, _u: Any) -> None:
        inbox.put(("connect_fail", connect_failure()))

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.on_connect_fail = on_connect_fail
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
            elif kind == "connected":
                fail_said = False
                print(f"monitor: connected to {where}", file=err)
            elif kind == "suback":
                refused = [str(rc) for rc in value if rc.is_failure]
                if refused:
                    print(f"monitor: subscriptions refused by {where}: {', '.join(refused)}", file=err)
                else:  # only from here on does the broker route messages to us
                    print(f"monitor: watching {', '.join(mon.topics())}", file=err)
            elif kind == "msg":
                row, line = mon.handle(*value)
                if row is not None:
                    dirty = True
                    if as_json:
                        if line is not None:
                            print(json.dumps({"kind": "checkin", **asdict(line)}), file=out, flush=True)
                        print(json.dumps({"kind": "gate", **asdict(row)}), file=out, flush=True)
                    elif not tty:
                        print(text_checkin(line) if line else text_gate(row), file=out, flush=True)
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
    p.add_argument("--json", action="store_true", help="one JSON object per line: kind gate | checkin")
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
