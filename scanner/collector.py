"""The central ingest (`gate-scanner collect`): every gate's check-ins, stored once, acknowledged.

A broker's PUBACK only proves the broker has an event. The gate therefore keeps each event
until this collector says, on the device's ``ack`` topic, that the event is in the store
(DESIGN §4). The promise rests on three orderings:

1. an ``ack`` is published only after the batch holding the event has committed;
2. the MQTT PUBACK to the broker (manual acks) is sent only after that commit too, so with
   the persistent session a collector killed mid-batch gets the same messages again from
   the broker when it comes back, instead of the broker having forgotten them;
3. ``upto``/``ranges`` describe what the *store* holds, not what this process saw: after
   each commit the holes below a device's highest seq are looked up in the store, so two
   collectors sharing one store (``$share/collectors/…``) each acknowledge the union.

Threads: paho's network thread runs the callbacks and only enqueues (paho holds its own
lock there). One worker thread owns the store, every ``publish()`` and every ``ack()``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import queue
import re
import threading
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scanner import __version__
from scanner.config import Config, ConfigError, from_table
from scanner.events import SCHEMA as CHECKIN_SCHEMA
from scanner.store import Store, StoredEvent, StoreError

if TYPE_CHECKING:  # paho is imported when a collector is built, not when the CLI parses
    import paho.mqtt.client as mqtt
    from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

ACK_SCHEMA = "gate-scanner/ack/1"
STATUS_SCHEMA = "gate-scanner/collector-status/1"
SHARE_GROUP = "collectors"
BATCH_MAX = (
    500  # events per commit (a full batch only while behind; 500 measured ~2x faster than 200 on PostgreSQL)
)
BATCH_S = 0.05  # longest a received event waits for its batch to fill
LINGER_S = 0.002  # an empty queue for this long ends the batch early: commit what we have
ACK_RANGES_MAX = 32  # ranges per ack above ``upto``; the gate drops the rest on the next ack
REFRESH_SPAN = 20_000  # seqs above a device's contiguous one re-read from the store per commit
STATUS_EVERY_S = 2.0
RETRY_MIN_S, RETRY_MAX_S = 0.5, 30.0
RECEIVE_MAXIMUM = (
    65535  # MQTT maximum: the broker sends instead of queueing (its queue drops at max_queued_messages)
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_UUID7 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
_TS = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
_SUBJECT = re.compile(r"[0-9a-f]{32}")

ClientFactory = Callable[..., "mqtt.Client"]


def load_config(path: str | Path) -> Config:
    """The shared config loader, minus the need for a ``[device]`` section.

    A collector is not a gate: its config file may leave ``[device]`` out (a placeholder
    fills it; the collector never uses it). Everything else is checked as usual.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        table = tomllib.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError([f"{path}: TOML syntax: {exc}"]) from exc
    table.setdefault("device", {"id": "collector", "site": "central"})
    return from_table(table, path=path, digest=hashlib.sha256(raw).hexdigest())


# --- validation ----------------------------------------------------------------------------


@functools.cache
def _credential_types() -> frozenset[str]:
    """From the shipped JSON Schema, so a type added there (e.g. ``operator``) is accepted here."""
    from scanner.events import schema_path

    schema = json.loads(schema_path().read_text(encoding="utf-8"))
    return frozenset(schema["properties"]["credential"]["properties"]["type"]["enum"])


class InvalidEvent(ValueError):
    """Why a payload is not a storable check-in (never contains the payload itself)."""


def parse_event(topic: str, payload: bytes, prefix: str) -> StoredEvent:
    """Validate one check-in against the v1 contract and the topic it came on."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != prefix or parts[3] != "checkin":
        raise InvalidEvent("topic is not {prefix}/{site}/{device}/checkin")
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidEvent(f"not JSON ({type(exc).__name__})") from None
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
    device = text("device", _NAME)
    site = text("site", _NAME)
    # A gate may only speak for itself: its ack goes to the topic it published on.
    if (site, device) != (parts[1], parts[2]):
        raise InvalidEvent("site/device differ from the topic")
    direction = text("direction", choices=("in", "out"))
    ts = text("ts", _TS)
    decision = text("decision", choices=("accepted", "rejected"))
    reason = text("reason")
    if not reason or len(reason) > 64:
        raise InvalidEvent("reason: empty or too long")
    seq = doc.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq < 2**63:
        raise InvalidEvent("seq: missing or not a positive integer")
    if not isinstance(doc.get("clock_synced"), bool):
        raise InvalidEvent("clock_synced: missing or not a boolean")
    credential = doc.get("credential")
    if not isinstance(credential, dict) or credential.get("type") not in _credential_types():
        raise InvalidEvent("credential: missing or unknown type")
    subject = credential.get("subject")
    if subject is not None and not (isinstance(subject, str) and _SUBJECT.fullmatch(subject)):
        raise InvalidEvent("credential.subject: not a 32-hex-digit pseudonym")
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
        raw=payload.decode("utf-8"),
    )


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

    def ack(self) -> dict[str, Any]:
        return {
            "schema": ACK_SCHEMA,
            "upto": self.contiguous,
            "ranges": [[lo, hi] for lo, hi in self.ranges[:ACK_RANGES_MAX]],
        }


# --- the collector -------------------------------------------------------------------------


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
        self._t_status = f"{self._prefix}/collector/{self.name}/status"

        self._queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
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

        self._client = self._make_client(client_factory)

    def _make_client(self, factory: ClientFactory | None) -> mqtt.Client:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from scanner.mqtt import secure

        factory = factory or mqtt.Client
        client = factory(
            CallbackAPIVersion.VERSION2,
            client_id=f"gate-scanner-collector-{self.name}",
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
        self._load_state()
        self._thread = threading.Thread(target=self._run, name="collector-store", daemon=True)
        self._thread.start()
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

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
        self._queue.put(("stop",))
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
                "acks_sent": self.acks_sent,
                "batches": self.batches,
                "store_errors": self.store_errors,
                "insert_events": self.insert_events,
                "insert_s": self.insert_s,
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
            self._queue.put(("refused", rc))
            return
        self._connected.set()
        self._gen += 1  # paho's thread only: tags the messages of this connection
        self._queue.put(("connect", bool(getattr(flags, "session_present", False)), self._gen))

    def _cb_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        from scanner.mqtt import connect_failure

        self._queue.put(("connect_fail", *connect_failure()))

    def _cb_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        self._connected.clear()
        self._queue.put(("disconnect", rc))

    def _cb_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        self._queue.put(("suback", rcs))

    def _cb_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._queue.put(("msg", msg.topic, bytes(msg.payload), msg.mid, msg.qos, self._gen))

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
                first = self._queue.get(timeout=STATUS_EVERY_S / 2)
            except queue.Empty:
                self._maybe_status()
                continue
            items = [first]
            if first[0] == "msg":
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
            messages = []
            for item in items:
                kind = item[0]
                if kind == "msg":
                    messages.append(item)
                elif kind == "connect":
                    fail_logged = False
                    self._current_gen = item[2]
                    log.info("connected to %s (session present: %s)", self._where, item[1])
                    self._client.subscribe(self.subscription, qos=1)
                elif kind == "suback":
                    for rc in item[1]:
                        if rc.is_failure:
                            log.error("subscription %s refused: %s", self.subscription, rc)
                        else:
                            log.info("subscribed to %s", self.subscription)
                            self._subscribed.set()
                    self._publish_status(force=True)
                elif kind == "disconnect":
                    self._subscribed.clear()
                    if not self._stop.is_set():
                        log.warning("disconnected from %s: %s", self._where, item[1])
                elif kind == "refused":
                    log.error("broker %s refused the connection: %s", self._where, item[1])
                elif kind == "connect_fail":
                    _, tls, reason = item
                    if tls:  # does not heal by retrying: an error, not a network blip
                        level = logging.DEBUG if fail_logged else logging.ERROR
                        log.log(level, "TLS to %s failed: %s; retrying", self._where, reason)
                    else:
                        level = logging.DEBUG if fail_logged else logging.WARNING
                        log.log(level, "cannot reach broker at %s: %s; retrying", self._where, reason)
                    fail_logged = True
            if messages:
                try:
                    self._process(messages)
                except Exception:
                    # Not acked: the broker redelivers after a reconnect, the gate resends.
                    log.exception("batch of %d messages failed; not acknowledged", len(messages))
            self._maybe_status()
        if self._connected.is_set():
            self._publish_status(force=True, online=False)

    def _process(self, messages: list[tuple[Any, ...]]) -> None:
        events: dict[str, StoredEvent] = {}
        invalid = 0
        for _, topic, payload, _mid, _qos, _gen in messages:
            try:
                event = parse_event(topic, payload, self._prefix)
            except InvalidEvent as exc:
                invalid += 1
                # The payload may hold anything, personal data included: never log it.
                log.warning("invalid check-in on %s (%d bytes): %s", topic, len(payload), exc)
                continue
            events.setdefault(event.event_id, event)
        batch = list(events.values())
        inserted = self._insert(batch)
        if inserted is None:
            return  # stopping with the batch uncommitted: no acks; the broker or gate resends
        acks = self._account(batch)
        # Count before acking: whoever sees an ack (a test, an operator) must find it counted.
        with self._lock:
            self.stored += inserted
            self.duplicates += len(messages) - invalid - inserted
            self.invalid += invalid
            self.acks_sent += len(acks)
            self.batches += 1
        for (site, device), body in acks.items():
            topic = f"{self._prefix}/{site}/{device}/ack"
            self._client.publish(topic, json.dumps(body, separators=(",", ":")), qos=1, retain=False)
        # Only now tell the broker it may forget these messages (invalid ones included:
        # redelivering them would not make them valid).
        for _, _topic, _payload, mid, qos, gen in messages:
            # A mid from an earlier connection may name another message now; the broker
            # redelivers the old one on its own (a duplicate, which the store absorbs).
            if qos > 0 and gen == self._current_gen:
                self._client.ack(mid, qos)

    def _insert(self, batch: list[StoredEvent]) -> int | None:
        """Commit the batch, retrying with backoff while the store fails; None if stopping."""
        delay = RETRY_MIN_S
        while True:
            started = time.perf_counter()
            try:
                inserted = self._store.insert_batch(batch)
            except StoreError as exc:
                with self._lock:
                    self.store_errors += 1
                log.error("store: %s; retrying in %.1f s (%d events held)", exc, delay, len(batch))
                if self._stop.wait(delay):
                    return None
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            with self._lock:
                self.insert_s += time.perf_counter() - started
                self.insert_events += len(batch)
            return inserted

    def _account(self, batch: list[StoredEvent]) -> dict[tuple[str, str], dict[str, Any]]:
        """Merge committed seqs into each device's state; return the ack to send per device."""
        by_device: dict[tuple[str, str], list[int]] = {}
        for event in batch:
            by_device.setdefault((event.site, event.device), []).append(event.seq)
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
            acks[key] = state.ack()
        return acks

    def _maybe_status(self) -> None:
        if time.monotonic() - self._last_status >= STATUS_EVERY_S:
            self._publish_status()

    def _publish_status(self, *, force: bool = False, online: bool = True) -> None:
        self._last_status = time.monotonic()
        devices = []
        with self._lock:
            snapshot = {k: (s.contiguous, s.highest, s.missing, s.holes(8)) for k, s in self._devices.items()}
        for (site, device), (contiguous, highest, missing, holes) in sorted(snapshot.items()):
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
        body = {
            "schema": STATUS_SCHEMA,
            "name": self.name,
            "online": online,
            "version": __version__,
            "store": self._store.kind,
            "events_stored": stats["stored"],
            "duplicates": stats["duplicates"],
            "invalid": stats["invalid"],
            "devices": devices,
        }
        if self._connected.is_set() or force:
            self._client.publish(self._t_status, json.dumps(body, separators=(",", ":")), qos=1, retain=True)

    def _log_gap(self, key: tuple[str, str], holes: tuple[tuple[int, int], ...], missing: int) -> None:
        # A hole seen at two status ticks in a row is a gap worth a warning; a hole that a
        # second collector fills a moment later is not.
        previous, self._seen_holes[key] = self._seen_holes.get(key), holes
        if holes and holes == previous and self._logged_holes.get(key) != holes:
            shown = ", ".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in holes)
            log.warning("gap: %s/%s is missing seq %s (%d missing in all)", key[0], key[1], shown, missing)
            self._logged_holes[key] = holes
        elif not holes and self._logged_holes.pop(key, None):
            log.info("gap closed: %s/%s contiguous again", *key)


def run(config: Config, stop: threading.Event) -> int:
    """`gate-scanner collect`: run until ``stop`` is set; 0 on a clean stop, 1 on failure."""
    from scanner.store import open_store

    try:
        store = open_store(config.collector.store)
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


def add_collect_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    collect = sub.add_parser("collect", help="central ingest: store every gate's check-ins, ack them")
    collect.add_argument("--config", required=True, type=Path, help="reads [mqtt] and [collector]")


def run_collect_command(args: argparse.Namespace) -> int:
    import signal

    from scanner.cli import load_or_report, setup_logging

    config = load_or_report(args.config, load_config)
    if config is None:
        return 2
    setup_logging(config.daemon.log_level)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return run(config, stop)
