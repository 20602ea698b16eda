"""The central ingest (`gate-scanner collect`): every gate's check-ins, stored once, acknowledged.

A broker's PUBACK only proves the broker has an event. The gate therefore keeps each event
until this collector says, on the device's ``ack`` topic, that the event is in the store
(README: MQTT). The promise rests on three orderings:

1. an ``ack`` is published only after the batch holding the event has committed;
2. the MQTT PUBACK to the broker (manual acks) is sent only after that commit too, so with
   the persistent session a collector killed mid-batch gets the same messages again from
   the broker when it comes back, instead of the broker having forgotten them;
3. ``upto``/``ranges`` describe what the *store* holds, not what this process saw: after
   each commit the holes below a device's highest seq are looked up in the store, so two
   collectors sharing one store (``$share/collectors/…``) each acknowledge the union.

A message that is no storable check-in is kept as it came in the store's ``rejected`` table;
when it names its device (topic) and seq, that seq is acknowledged like a stored one, so one
bad event neither stays in a gate's outbox for good nor leaves a hole that stalls ``upto``.

Threads: paho's network thread runs the callbacks and only enqueues (paho holds its own
lock there). One worker thread owns the store, every ``publish()`` and every ``ack()``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import math
import queue
import re
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeGuard, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from scanner import __version__
from scanner.central.stays import StayRules
from scanner.central.store import RejectedEvent, Store, StoredEvent, StoreError, open_store
from scanner.config import NAME, Config, load_central
from scanner.console import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, load_or_report, setup_logging, stop_on_signals
from scanner.events import SCHEMA as CHECKIN_SCHEMA
from scanner.events import schema_path, utc_ms
from scanner.mqtt import (
    SHARE_GROUP,
    Ack,
    ConnectFailed,
    ConnectRefused,
    Disconnected,
    SubAck,
    connect_failure,
    secure,
)

log = logging.getLogger(__name__)

STATUS_SCHEMA = "gate-scanner/collector-status/1"
BATCH_MAX = (
    500  # events per commit (a full batch only while behind; 500 measured ~2x faster than 200 on PostgreSQL)
)
BATCH_S = 0.05  # longest a received event waits for its batch to fill
LINGER_S = 0.002  # an empty queue for this long ends the batch early: commit what we have
ACK_RANGES_MAX = 32  # ranges per ack message above ``upto``; more runs go out in further acks
REFRESH_SPAN = 20_000  # seqs above a device's contiguous one re-read from the store per commit
STATUS_EVERY_S = 2.0
# The retained status goes to every operator's monitor every STATUS_EVERY_S: a bound keeps it
# cheap there, and under the broker's Maximum Packet Size (a bigger publish makes mosquitto
# disconnect us: no acks, nothing stored). ~2,700 devices fit; those with gaps come first.
STATUS_MAX_BYTES = 256 * 1024
# PUBLISH header, topic length, packet id and properties around the payload.
PACKET_OVERHEAD = 64
RETENTION_EVERY_S = 86_400.0  # retention runs at start and then daily
RETENTION_RETRY_S = 600.0  # after a store error, try again this much later
RETRY_MIN_S, RETRY_MAX_S = 0.5, 30.0
RECEIVE_MAXIMUM = (
    65535  # MQTT maximum: the broker sends instead of queueing (its queue drops at max_queued_messages)
)

# accepted/rejected, or annulled: a later event saying an accepted one never passed the door.
DECISIONS = ("accepted", "rejected", "annulled")
_UUID7 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
_TS = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
_SUBJECT = re.compile(r"[0-9a-f]{32}")
_REASON = re.compile(r"[a-z_]{1,64}")
# PostgreSQL's text and jsonb take neither; SQLite's driver cannot encode a lone surrogate.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
JSON_DEPTH_MAX = 16  # a check-in nests 2 deep; PostgreSQL's jsonb parser has a stack limit
SEQ_MAX = 2**63 - 1  # BIGINT

ClientFactory = Callable[..., "mqtt.Client"]
_Row = TypeVar("_Row")


# --- validation ----------------------------------------------------------------------------


@functools.cache
def _schema() -> Any:
    return json.loads(schema_path().read_text(encoding="utf-8"))


def _credential_types() -> frozenset[str]:
    """From the shipped JSON Schema, so a type added there (e.g. ``operator``) is accepted here."""
    return frozenset(_schema()["properties"]["credential"]["properties"]["type"]["enum"])


def _decisions() -> frozenset[str]:
    """From the shipped JSON Schema: an ``annulled`` event (the door saw nobody pass) is stored
    like any other, so whoever counts can leave out the entry it names."""
    return frozenset(_schema()["properties"]["decision"]["enum"])


class InvalidEvent(ValueError):
    """Why a payload is not a storable check-in (never contains the payload itself)."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json takes NaN/Infinity; jsonb does not


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _valid_seq(seq: object) -> TypeGuard[int]:
    return isinstance(seq, int) and not isinstance(seq, bool) and 1 <= seq <= SEQ_MAX


def _check_storable(doc: object) -> None:
    """Every key and string free of what a store refuses; nesting bounded.

    A loop, not recursion: json.loads already used most of the stack on a deep document.
    """
    stack: list[tuple[object, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _UNSTORABLE.search(value):
                raise InvalidEvent("a string holds NUL or a lone surrogate")
        elif isinstance(value, dict | list):
            if depth >= JSON_DEPTH_MAX:
                raise InvalidEvent(f"nested deeper than {JSON_DEPTH_MAX}")
            if isinstance(value, dict):
                for key, item in value.items():
                    if _UNSTORABLE.search(key):
                        raise InvalidEvent("a key holds NUL or a lone surrogate")
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)


def parse_event(topic: str, payload: bytes, prefix: str) -> StoredEvent:
    """Validate one check-in against the v1 contract and the topic it came on.

    What passes must also be storable as it is in both stores: one event a store refuses
    would otherwise fail the batch it arrived in.
    """
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != prefix or parts[3] != "checkin":
        raise InvalidEvent("topic is not {prefix}/{site}/{device}/checkin")
    try:
        # Strict UTF-8 first: json.loads(bytes) would also accept UTF-16/32, which the
        # stores' text columns then cannot take as is.
        raw = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidEvent("not UTF-8") from None
    try:
        doc = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError) as exc:
        raise InvalidEvent(f"not JSON ({type(exc).__name__})") from None
    _check_storable(doc)
    if not isinstance(doc, dict):
        raise InvalidEvent("not a JSON object")
    if doc.get("schema") != CHECKIN_SCHEMA:
        raise InvalidEvent("schema is not " + CHECKIN_SCHEMA)

    def text(key: str, pattern: re.Pattern[str] | None = None, choices: Iterable[str] = ()) -> str:
        value = doc.get(key)
        if not isinstance(value, str):
            raise InvalidEvent(f"{key}: missing or not a string")
        if pattern is not None and not pattern.fullmatch(value):
            raise InvalidEvent(f"{key}: bad format")
        if choices and value not in choices:
            raise InvalidEvent(f"{key}: not one of {sorted(choices)}")
        return value

    event_id = text("event_id", _UUID7)
    device = text("device", NAME)
    site = text("site", NAME)
    # A gate may only speak for itself: its ack goes to the topic it published on.
    if (site, device) != (parts[1], parts[2]):
        raise InvalidEvent("site/device differ from the topic")
    direction = text("direction", choices=("in", "out"))
    ts = text("ts", _TS)
    try:
        datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ")  # 2026-13-45 fits the pattern, not timestamptz
    except ValueError:
        raise InvalidEvent("ts: not a valid time") from None
    decision = text("decision", choices=DECISIONS)
    # A code, not free text: a newer gate's new reason still passes, prose does not.
    reason = text("reason", _REASON)
    seq = doc.get("seq")
    if not _valid_seq(seq):
        raise InvalidEvent("seq: missing or not a positive integer")
    if not isinstance(doc.get("clock_synced"), bool):
        raise InvalidEvent("clock_synced: missing or not a boolean")
    credential = doc.get("credential")
    if not isinstance(credential, dict) or credential.get("type") not in _credential_types():
        raise InvalidEvent("credential: missing or unknown type")
    subject = credential.get("subject")
    if subject is not None and not (isinstance(subject, str) and _SUBJECT.fullmatch(subject)):
        raise InvalidEvent("credential.subject: not a 32-hex-digit pseudonym")
    # An annulment names the accepted event it takes back; stays leave that event out.
    annuls = doc.get("annuls")
    if decision == "annulled":
        if not (isinstance(annuls, str) and _UUID7.fullmatch(annuls)):
            raise InvalidEvent("annuls: missing or not an event_id")
    elif annuls is not None:
        raise InvalidEvent("annuls: only an annulled event names one")
    return StoredEvent(
        event_id=event_id,
        device=device,
        site=site,
        direction=direction,
        seq=seq,
        ts=ts,
        subject=subject,
        decision=decision,
        reason=reason,
        credential_type=credential["type"],
        raw=raw,
        annuls=annuls,
    )


def rejected_event(topic: str, payload: bytes, prefix: str, reason: str) -> RejectedEvent:
    """The dead-letter row for a refused message, with the seq the gate needs acknowledged.

    The seq counts only when the topic names a device (its ack goes there) and the payload
    yields one in any encoding json reads: the gate then forgets a row this table now keeps.
    """
    parts = topic.split("/")
    site = device = None
    seq = None
    if len(parts) == 4 and parts[0] == prefix and parts[3] == "checkin":
        site, device = _printable(parts[1]), _printable(parts[2])
        if NAME.fullmatch(parts[1]) and NAME.fullmatch(parts[2]):
            try:
                doc = json.loads(payload)
            except (ValueError, RecursionError):
                doc = None
            candidate = doc.get("seq") if isinstance(doc, dict) else None
            seq = candidate if _valid_seq(candidate) else None
    return RejectedEvent(site=site, device=device, seq=seq, reason=_printable(reason), payload=payload)


def _cause(exc: StoreError) -> str:
    # The error text may quote the refused value, i.e. part of a payload: not for the log.
    return type(exc.__cause__ or exc).__name__


def _printable(text: str, limit: int = 500) -> str:
    # Store error texts may quote the refused value; the reason column must not be refused too.
    escaped = text[:limit].encode("ascii", "backslashreplace").decode("ascii")
    return escaped.replace("\x00", "\\x00")


# --- per-device sequence state -------------------------------------------------------------


@dataclass(slots=True)
class DeviceSeqs:
    """What the store holds of one device: every seq ≤ ``contiguous``, plus ``ranges`` above.

    ``ranges`` are sorted, disjoint, non-adjacent and all start above ``contiguous + 1``.
    """

    contiguous: int = 0
    ranges: list[tuple[int, int]] = field(default_factory=list)

    def add(self, seqs: Iterable[int]) -> None:
        spans = self.ranges + [(s, s) for s in seqs if s > self.contiguous]
        self.add_ranges(spans, replace=True)

    def add_ranges(self, spans: Iterable[tuple[int, int]], *, replace: bool = False) -> None:
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(list(spans) if replace else [*self.ranges, *spans]):
            if merged and lo <= merged[-1][1] + 1:
                if hi > merged[-1][1]:
                    merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        contiguous = self.contiguous
        while merged and merged[0][0] <= contiguous + 1:
            contiguous = max(contiguous, merged.pop(0)[1])
        self.contiguous = contiguous
        self.ranges = merged

    def holes(self, limit: int = 64) -> list[tuple[int, int]]:
        out = []
        below = self.contiguous
        for lo, hi in self.ranges[:limit]:
            out.append((below + 1, lo - 1))
            below = hi
        return out

    @property
    def highest(self) -> int:
        return self.ranges[-1][1] if self.ranges else self.contiguous

    @property
    def missing(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.holes(len(self.ranges)))

    def acks(self, seqs: Iterable[int] = ()) -> list[dict[str, Any]]:
        """What to tell the gate after ``seqs`` were handled: one ack, more past 32 runs.

        The gate removes whatever runs an ack names, so with more runs than one
        ack holds, the runs holding ``seqs`` go first (their rows can go now), in as many
        acks as they need, and the highest others fill the last. Naming the lowest runs
        instead would ack nothing new once a gate has 32 holes.
        """
        runs = self.ranges
        if len(runs) <= ACK_RANGES_MAX:
            return [self._ack_body(runs)]
        starts = [lo for lo, _ in runs]
        wanted = sorted({bisect_right(starts, s) - 1 for s in seqs if s > self.contiguous})
        chunks = [wanted[i : i + ACK_RANGES_MAX] for i in range(0, len(wanted), ACK_RANGES_MAX)] or [[]]
        taken = set(wanted)
        others = (i for i in range(len(runs) - 1, -1, -1) if i not in taken)
        last = chunks[-1]
        last += itertools.islice(others, ACK_RANGES_MAX - len(last))
        return [self._ack_body([runs[i] for i in sorted(chunk)]) for chunk in chunks]

    def _ack_body(self, runs: Iterable[tuple[int, int]]) -> dict[str, Any]:
        return Ack.of(self.contiguous, runs).to_json()


# --- the collector -------------------------------------------------------------------------

# What reaches the worker thread from paho's callbacks (and ``stop``). ``gen`` counts
# connections: a message's mid means something only on the connection it came on.


@dataclass(frozen=True, slots=True)
class _Message:
    topic: str
    payload: bytes
    mid: int
    qos: int
    gen: int


@dataclass(frozen=True, slots=True)
class _Connected:
    session_present: bool
    gen: int
    max_packet: int | None  # the broker's Maximum Packet Size from CONNACK, if it set one


@dataclass(frozen=True, slots=True)
class _Stop:
    pass


_Item = _Message | _Connected | SubAck | Disconnected | ConnectRefused | ConnectFailed | _Stop


class Collector:
    """Subscribes, validates, stores in batches, acknowledges, reports gaps."""

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        client_factory: ClientFactory | None = None,
        batch_max: int = BATCH_MAX,
        batch_s: float = BATCH_S,
    ) -> None:
        self._config = config
        self._store = store
        self._batch_max = batch_max
        self._batch_s = batch_s
        c = config.collector
        self.name = c.name
        self._prefix = config.mqtt.topic_prefix
        self._where = f"{config.mqtt.host}:{config.mqtt.port}"
        self.subscription = f"$share/{SHARE_GROUP}/{self._prefix}/+/+/checkin"
        self._t_status = status_topic(config)

        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards the counters read by stats() from other threads

        self._gen = 0  # paho's thread only
        # Worker thread only.
        self._current_gen = 0
        self._devices: dict[tuple[str, str], DeviceSeqs] = {}
        self._last_status = 0.0
        self._status_limit = STATUS_MAX_BYTES  # payload bytes; lowered by the broker's limit
        self._status_unfit_logged = False
        self._logged_holes: dict[tuple[str, str], tuple[tuple[int, int], ...]] = {}
        self._seen_holes: dict[tuple[str, str], tuple[tuple[int, int], ...]] = {}
        self._started = time.time()
        # Counters (under self._lock).
        self.stored = 0
        self.duplicates = 0
        self.invalid = 0
        self.acks_sent = 0
        self.batches = 0
        self.insert_s = 0.0
        self.insert_events = 0
        self.store_errors = 0
        self.rejected = 0
        self.retention_runs = 0
        # Retention (worker thread only): the cutoff of the run under way, if one is.
        self._expiring: datetime | None = None
        self._expired = 0
        self._next_retention = 0.0

        self._client = self._make_client(client_factory)

    def _make_client(self, factory: ClientFactory | None) -> mqtt.Client:

        factory = factory or mqtt.Client
        client = factory(
            CallbackAPIVersion.VERSION2,
            client_id=client_id(self.name),
            protocol=mqtt.MQTTv5,
            manual_ack=True,  # PUBACK to the broker only after our commit (see module doc)
        )
        secure(client, self._config)
        offline = json.dumps({"schema": STATUS_SCHEMA, "name": self.name, "online": False})
        client.will_set(self._t_status, offline, qos=1, retain=True)
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._cb_connect
        client.on_connect_fail = self._cb_connect_fail
        client.on_disconnect = self._cb_disconnect
        client.on_subscribe = self._cb_subscribe
        client.on_message = self._cb_message
        return client

    # --- public API ------------------------------------------------------------------------

    def start(self) -> Collector:
        if self._thread is not None:
            return self
        if self._store.rules_changed:
            # Before the first batch: a unit derived under the new rules next to stale ones
            # would give a mixed answer. The gates keep their events meanwhile.
            started = time.monotonic()
            log.info(
                "stay rules differ from the store's (%s): deriving every stay again", self._store.rules.key()
            )
            written = self._store.rebuild_stays()
            log.info("stays rebuilt: %d in %.1f s", written, time.monotonic() - started)
        self._load_state()
        self._thread = threading.Thread(target=self._run, name="collector-store", daemon=True)
        self._thread.start()

        m = self._config.mqtt
        props = Properties(PacketTypes.CONNECT)
        # A persistent session: the broker queues check-ins for us while we restart.
        props.SessionExpiryInterval = self._config.collector.session_expiry_s
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        log.info("collector %s connecting to %s, store %s", self.name, self._where, self._store.kind)
        self._client.connect_async(m.host, m.port, m.keepalive_s, clean_start=False, properties=props)
        self._client.loop_start()
        return self

    def wait_subscribed(self, timeout: float) -> bool:
        return self._subscribed.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the batch in hand, publish ``online: false`` status, disconnect."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._queue.put(_Stop())
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("collector worker did not stop within %.1f s", timeout)
        self._client.disconnect()
        self._client.loop_stop()
        log.info("collector %s stopped", self.name)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "stored": self.stored,
                "duplicates": self.duplicates,
                "invalid": self.invalid,
                "rejected": self.rejected,
                "acks_sent": self.acks_sent,
                "batches": self.batches,
                "store_errors": self.store_errors,
                "insert_events": self.insert_events,
                "insert_s": self.insert_s,
                "retention_runs": self.retention_runs,
            }

    def device_state(self, site: str, device: str) -> DeviceSeqs | None:
        """A copy of what the worker believes is stored for one device (tests, status)."""
        with self._lock:
            state = self._devices.get((site, device))
            return None if state is None else DeviceSeqs(state.contiguous, list(state.ranges))

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- paho callbacks (paho's thread: enqueue only) --------------------------------------

    def _cb_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        if rc.is_failure:
            self._queue.put(ConnectRefused(rc))
            return
        self._connected.set()
        self._gen += 1  # paho's thread only: tags the messages of this connection
        max_packet = getattr(props, "MaximumPacketSize", None)
        self._queue.put(
            _Connected(
                bool(getattr(flags, "session_present", False)),
                self._gen,
                max_packet if isinstance(max_packet, int) else None,
            )
        )

    def _cb_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:

        self._queue.put(ConnectFailed(*connect_failure()))

    def _cb_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        self._connected.clear()
        self._queue.put(Disconnected(rc))

    def _cb_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        self._queue.put(SubAck(mid, list(rcs)))

    def _cb_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._queue.put(_Message(msg.topic, bytes(msg.payload), msg.mid, msg.qos, self._gen))

    # --- worker thread ---------------------------------------------------------------------

    def _load_state(self) -> None:
        """Recompute every device's contiguous seq and ranges from the store."""
        for key, runs in self._store.islands().items():
            state = DeviceSeqs()
            state.add_ranges(runs)
            self._devices[key] = state
        if self._devices:
            log.info("store holds %d devices; state recomputed from the table", len(self._devices))

    def _run(self) -> None:
        fail_logged = False
        while not self._stop.is_set():
            try:
                # While retention is under way, a quiet queue means: take the next step now.
                first = self._queue.get(timeout=0.0 if self._expiring else STATUS_EVERY_S / 2)
            except queue.Empty:
                self._maybe_status()
                self._retention_step()
                continue
            items = [first]
            if isinstance(first, _Message):
                deadline = time.monotonic() + self._batch_s
                while len(items) < self._batch_max:
                    try:
                        items.append(self._queue.get_nowait())
                        continue
                    except queue.Empty:
                        pass
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        items.append(self._queue.get(timeout=min(remaining, LINGER_S)))
                    except queue.Empty:
                        break
            messages: list[_Message] = []
            status_due = False
            for item in items:
                match item:
                    case _Message():
                        messages.append(item)
                    case _Connected(session_present, gen, max_packet):
                        fail_logged = False
                        self._current_gen = gen
                        self._status_limit = status_limit(max_packet, self._t_status)
                        log.info("connected to %s (session present: %s)", self._where, session_present)
                        self._client.subscribe(self.subscription, qos=1)
                    case SubAck(_mid, reasons):
                        for rc in reasons:
                            if rc.is_failure:
                                log.error("subscription %s refused: %s", self.subscription, rc)
                            else:
                                log.info("subscribed to %s", self.subscription)
                                self._subscribed.set()
                        status_due = True
                    case Disconnected(reason):
                        self._subscribed.clear()
                        if not self._stop.is_set():
                            log.warning("disconnected from %s: %s", self._where, reason)
                    case ConnectRefused(reason):
                        log.error("broker %s refused the connection: %s", self._where, reason)
                    case ConnectFailed(tls, reason):
                        # Once per outage; TLS does not heal by retrying: an error, not a network blip.
                        level = logging.DEBUG if fail_logged else logging.ERROR if tls else logging.WARNING
                        what = "TLS to %s failed" if tls else "cannot reach broker at %s"
                        log.log(level, f"{what}: %s; retrying", self._where, reason)
                        fail_logged = True
            if messages:
                try:
                    self._process(messages)
                except Exception:
                    # Not acked: the broker redelivers after a reconnect, the gate resends.
                    log.exception("batch of %d messages failed; not acknowledged", len(messages))
            # Only after the batch: the messages that came with a (re)subscription are stored
            # and acknowledged first, whatever becomes of the status.
            if status_due:
                self._publish_status(force=True)
            self._maybe_status()
            self._retention_step()
        if self._connected.is_set():
            self._publish_status(force=True, online=False)

    def _process(self, messages: list[_Message]) -> None:
        events: dict[str, StoredEvent] = {}
        refused: list[RejectedEvent] = []
        for message in messages:
            topic, payload = message.topic, message.payload
            try:
                event = parse_event(topic, payload, self._prefix)
            except InvalidEvent as exc:
                dead = rejected_event(topic, payload, self._prefix, str(exc))
                refused.append(dead)
                # The payload may hold anything, personal data included: never log it.
                log.warning(
                    "invalid check-in on %s (%d bytes, seq %s): %s; kept in the rejected table",
                    topic,
                    len(payload),
                    "unknown, so not acknowledged" if dead.seq is None else dead.seq,
                    exc,
                )
                continue
            events.setdefault(event.event_id, event)
        invalid = len(refused)
        batch = list(events.values())
        outcome = self._insert(batch)
        if outcome is None:
            return  # stopping with the batch uncommitted: no acks; the broker or gate resends
        inserted, unstorable = outcome
        for event, error in unstorable:
            log.warning(
                "store refused check-in seq %d of %s/%s (%s); kept in the rejected table",
                event.seq,
                event.site,
                event.device,
                _cause(error),
            )
            refused.append(
                RejectedEvent(
                    site=event.site,
                    device=event.device,
                    seq=event.seq,
                    reason=_printable(f"store refused it: {error}"),
                    payload=event.raw.encode("utf-8"),  # the bytes that came: raw is their strict decoding
                )
            )
        kept = self._dead_letter(refused)
        if kept is None:
            return
        lost = set() if kept else {event.event_id for event, _exc in unstorable}
        handled = [(e.site, e.device, e.seq) for e in batch if e.event_id not in lost]
        if kept:
            # Kept centrally now: the gate may forget these rows too, or its outbox would hold
            # them (and a hole below everything after them) for good.
            handled += [
                (r.site, r.device, r.seq) for r in refused if r.seq is not None and r.site and r.device
            ]
        acks = self._account(handled)
        # Count before acking: whoever sees an ack (a test, an operator) must find it counted.
        with self._lock:
            self.stored += inserted
            self.duplicates += len(messages) - invalid - inserted - len(unstorable)
            self.invalid += invalid
            self.rejected += len(refused) if kept else 0
            self.acks_sent += sum(len(bodies) for bodies in acks.values())
            self.batches += 1
        for (site, device), bodies in acks.items():
            topic = f"{self._prefix}/{site}/{device}/ack"
            for body in bodies:
                self._client.publish(topic, json.dumps(body, separators=(",", ":")), qos=1, retain=False)
        # Only now tell the broker it may forget these messages (refused ones included:
        # redelivering them would not make them valid).
        for message in messages:
            # A mid from an earlier connection may name another message now; the broker
            # redelivers the old one on its own (a duplicate, which the store absorbs).
            if message.qos > 0 and message.gen == self._current_gen:
                self._client.ack(message.mid, message.qos)

    def _insert(self, batch: list[StoredEvent]) -> tuple[int, list[tuple[StoredEvent, StoreError]]] | None:
        """Commit the batch: how many were new, and the events the store refused; None if stopping."""
        started = time.perf_counter()
        refused: list[tuple[StoredEvent, StoreError]] = []
        try:
            inserted = self._retry(self._store.insert_batch, batch)
        except StoreError as exc:
            # Retrying would fail forever and hold every gate's events behind the one the
            # store refuses: find it by storing the events one at a time.
            log.warning(
                "store refused a batch of %d events (%s); storing them one by one", len(batch), _cause(exc)
            )
            inserted = 0
            for event in batch:
                try:
                    one = self._retry(self._store.insert_batch, [event])
                except StoreError as exc:
                    refused.append((event, exc))
                    continue
                if one is None:
                    return None
                inserted += one
        if inserted is None:
            return None
        with self._lock:
            self.insert_s += time.perf_counter() - started
            self.insert_events += len(batch)
        return inserted, refused

    def _dead_letter(self, refused: list[RejectedEvent]) -> bool | None:
        """Keep the refused messages in the store: True if kept, False if not, None if stopping."""
        if not refused:
            return True
        try:
            return None if self._retry(self._store.insert_rejected, refused) is None else True
        except StoreError as exc:
            # Not kept, so not acknowledged: the gates keep these events and send them again.
            log.error("cannot keep %d refused events in the store (%s)", len(refused), _cause(exc))
            return False

    def _retry(self, write: Callable[[Sequence[_Row]], int], rows: Sequence[_Row]) -> int | None:
        """``write(rows)``, again with backoff while the store is unavailable; None if stopping.

        A StoreError the data causes (not transient) is raised: the same rows would fail again.
        """
        delay = RETRY_MIN_S
        while True:
            try:
                return write(rows)
            except StoreError as exc:
                with self._lock:
                    self.store_errors += 1
                if not exc.transient:
                    raise
                log.error("store: %s; retrying in %.1f s (%d rows held)", exc, delay, len(rows))
                if self._stop.wait(delay):
                    return None
                delay = min(delay * 2, RETRY_MAX_S)

    def _account(self, handled: list[tuple[str, str, int]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """Merge handled seqs into each device's state; return the acks to send per device."""
        by_device: dict[tuple[str, str], list[int]] = {}
        for site, device, seq in handled:
            by_device.setdefault((site, device), []).append(seq)
        acks = {}
        for key, seqs in by_device.items():
            with self._lock:
                state = self._devices.setdefault(key, DeviceSeqs())
                state.add(seqs)
            # Another collector on the same store may have filled our holes, or stored seqs
            # above ours: re-read the runs just above ``contiguous`` (one indexed range scan,
            # usually a handful of rows), so this ack covers the union.
            try:
                low = state.contiguous + 1
                runs = self._store.islands_between(key[0], key[1], low, low + REFRESH_SPAN)
            except StoreError as exc:
                log.warning("store: %s (ranges not refreshed)", exc)
                runs = []
            if runs:
                with self._lock:
                    state.add_ranges(runs)
            acks[key] = state.acks(seqs)
        return acks

    def _retention_step(self) -> None:
        """One bounded step of deleting what is older than ``retention_days``, between two
        batches: a day's deletions are spread over many steps and never hold up ingest."""
        if self._expiring is None:
            if time.monotonic() < self._next_retention:
                return
            self._expiring = datetime.now(UTC) - timedelta(days=self._config.collector.retention_days)
            self._expired = 0
        try:
            removed = self._store.expire_step(self._expiring)
        except StoreError as exc:
            log.warning("retention: %s; trying again in %.0f s", exc, RETENTION_RETRY_S)
            self._expiring, self._next_retention = None, time.monotonic() + RETENTION_RETRY_S
            return
        if removed:
            self._expired += removed
            return
        log.info(
            "retention: deleted what was older than %s (%d rows or partitions)",
            utc_ms(self._expiring),
            self._expired,
        )
        with self._lock:
            self.retention_runs += 1
        self._expiring, self._next_retention = None, time.monotonic() + RETENTION_EVERY_S

    def _occupancy(self) -> list[dict[str, Any]] | None:
        """Per site, who is inside now by the stays; the gates count for themselves too, and
        ``monitor`` shows both (a difference is worth a look)."""
        try:
            counts = self._store.inside(datetime.now(UTC))
        except StoreError as exc:
            log.warning("store: %s (occupancy not in this status)", exc)
            return None
        return [{"site": site, "inside": n} for site, n in sorted(counts.items())]

    def _maybe_status(self) -> None:
        if time.monotonic() - self._last_status >= STATUS_EVERY_S:
            self._publish_status()

    def _publish_status(self, *, force: bool = False, online: bool = True) -> None:
        self._last_status = time.monotonic()
        devices = []
        with self._lock:
            snapshot = {k: (s.contiguous, s.highest, s.missing, s.holes(8)) for k, s in self._devices.items()}
        for (site, device), (contiguous, highest, missing, holes) in snapshot.items():
            devices.append(
                {
                    "site": site,
                    "device": device,
                    "contiguous": contiguous,
                    "highest": highest,
                    "gaps": len(holes),
                    "missing": missing,
                }
            )
            self._log_gap((site, device), tuple(holes), missing)
        stats = self.stats()
        body: dict[str, Any] = {
            "schema": STATUS_SCHEMA,
            "name": self.name,
            "online": online,
            "version": __version__,
            "store": self._store.kind,
            "events_stored": stats["stored"],
            "duplicates": stats["duplicates"],
            "invalid": stats["invalid"],
            "rejected": stats["rejected"],
        }
        occupancy = self._occupancy()
        if occupancy is not None:
            body["occupancy"] = occupancy
        payload = status_payload(body, devices, self._status_limit)
        if payload is None:
            if not self._status_unfit_logged:
                log.error(
                    "status does not fit in %d bytes even without devices: not published", self._status_limit
                )
                self._status_unfit_logged = True
            return
        if self._connected.is_set() or force:
            self._client.publish(self._t_status, payload, qos=1, retain=True)

    def _log_gap(self, key: tuple[str, str], holes: tuple[tuple[int, int], ...], missing: int) -> None:
        # A hole seen at two status ticks in a row is a gap worth a warning; a hole that a
        # second collector fills a moment later is not.
        previous, self._seen_holes[key] = self._seen_holes.get(key), holes
        if holes and holes == previous and self._logged_holes.get(key) != holes:
            shown = ", ".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in holes)
            log.warning("gap: %s/%s is missing seq %s (%d missing in all)", key[0], key[1], shown, missing)
            self._logged_holes[key] = holes
        elif not holes and key in self._logged_holes:
            del self._logged_holes[key]
            log.info("gap closed: %s/%s contiguous again", *key)


def client_id(name: str) -> str:
    return f"gate-scanner-collector-{name}"


def status_topic(config: Config) -> str:
    return f"{config.mqtt.topic_prefix}/collector/{config.collector.name}/status"


def status_limit(max_packet: int | None, topic: str) -> int:
    """Payload bytes a status may take: our bound, or less when the broker allows less."""
    if max_packet is None:
        return STATUS_MAX_BYTES
    return min(STATUS_MAX_BYTES, max_packet - len(topic.encode("utf-8")) - PACKET_OVERHEAD)


def status_payload(body: dict[str, Any], devices: list[dict[str, Any]], limit: int) -> bytes | None:
    """``body`` with as many ``devices`` as fit in ``limit`` bytes; None if not even the body fits.

    Devices with missing events come first (most missing first), then the rest by site and
    device: when a fleet outgrows the bound, the ones an operator must look at stay listed.
    ``devices_total``, ``devices_with_gaps`` and ``missing_total`` always cover all of them.
    """
    devices = sorted(devices, key=lambda d: (-d["missing"], d["site"], d["device"]))
    full = {
        **body,
        "devices_total": len(devices),
        "devices_with_gaps": sum(1 for d in devices if d["missing"]),
        "missing_total": sum(d["missing"] for d in devices),
    }
    # ASCII-only JSON (json's default), so characters are bytes; compact separators.
    size = len(json.dumps({**full, "devices": []}, separators=(",", ":")))
    if size > limit:
        return None
    fit = 0
    for device in devices:
        size += len(json.dumps(device, separators=(",", ":"))) + 1  # and its comma
        if size > limit:
            break
        fit += 1
    return json.dumps({**full, "devices": devices[:fit]}, separators=(",", ":")).encode("ascii")


def run(config: Config, stop: threading.Event) -> int:
    """`gate-scanner collect`: run until ``stop`` is set; 0 on a clean stop, 1 on failure."""

    try:
        c = config.collector
        store = open_store(c.store, StayRules.from_config(c), retention_days=c.retention_days)
    except StoreError as exc:
        log.error("cannot start: %s", exc)
        return 1
    try:
        collector = Collector(config, store).start()
        try:
            while not stop.wait(1.0):
                pass
        finally:
            collector.stop()
    finally:
        store.close()
    return 0


def retire(config: Config, *, timeout: float = 10.0) -> str | None:
    """End this collector's broker session for good; None when done, else why not.

    A persistent session outlives its collector, and the broker goes on handing it its turn
    of the collectors' shared subscription: a collector that is gone for good (retired,
    moved, its certificate replaced) would take its share of every gate's check-ins into a
    queue nobody reads until the session expires. Connecting once with its identity and a
    clean start ends that session and its membership at once; the empty retained message
    clears its last status. Run it before revoking the collector's certificate.
    """
    done = threading.Event()
    outcome: dict[str, str] = {}
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id(config.collector.name), protocol=mqtt.MQTTv5
    )
    secure(client, config)

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            outcome["error"] = f"broker refused the connection: {rc}"
            done.set()
        else:
            c.publish(status_topic(config), b"", qos=1, retain=True)

    def on_publish(_c: mqtt.Client, _u: Any, _mid: int, rc: ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            outcome["error"] = f"session ended, but clearing the status was refused: {rc}"
        done.set()

    def on_connect_fail(_c: mqtt.Client, _u: Any) -> None:
        outcome["error"] = f"cannot connect: {connect_failure()[1]}"
        done.set()

    client.on_connect, client.on_publish, client.on_connect_fail = on_connect, on_publish, on_connect_fail
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0  # and none left behind by this connection either
    m = config.mqtt
    client.connect_async(m.host, m.port, m.keepalive_s, clean_start=True, properties=props)
    client.loop_start()
    try:
        if not done.wait(timeout):
            return f"no answer from {m.host}:{m.port} within {timeout:.0f} s"
    finally:
        client.disconnect()
        client.loop_stop()
    return outcome.get("error")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="reads [mqtt] and [collector]")
    parser.add_argument(
        "--retire",
        action="store_true",
        help="end this collector's broker session for good (its turn of the check-ins goes to the others)",
    )


def main(args: argparse.Namespace) -> int:
    config = load_or_report(args.config, load_central)
    if config is None:
        return EXIT_USAGE
    setup_logging(config.daemon.log_level)
    if args.retire:
        problem = retire(config)
        if problem is not None:
            log.error("collector %s not retired: %s", config.collector.name, problem)
            return EXIT_RUNTIME
        log.info("collector %s retired: its session and status are gone", config.collector.name)
        return EXIT_OK
    return run(config, stop_on_signals())
