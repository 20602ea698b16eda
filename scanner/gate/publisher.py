"""The broker link: availability with a last will, retained status and health, check-ins from the
outbox, operator commands in and their replies out.

Threads: paho's network thread runs the callbacks; they only put items on a queue (paho
holds its own lock while calling them, so taking any lock there that is also held around
``publish()`` can deadlock). One publisher thread owns every ``publish()`` call, the
mid → seq map and all outbox removals. The caller (pipeline, app) only ever enqueues:
nothing here blocks it on the network.

Delivery bookkeeping, per connection:

- ``cursor``: the highest seq handed to paho on this connection. Rows are published in
  seq order with at most ``window`` in flight.
- ``inflight``: mid → seq awaiting PUBACK. It survives a disconnect on purpose: paho keeps
  unacknowledged QoS 1 messages and resends them itself (with DUP) after reconnecting, and
  their PUBACKs carry the old mids. Forgetting them and republishing as well would send
  every in-flight event twice per reconnect.
- On (re)connect the cursor rewinds to 0: every row still in the outbox is sent again,
  except those paho is already resending. With ``delivery = "collector"`` that is how
  PUBACKed-but-unacknowledged rows get their second chance (never within one connection).
- A PUBACK with a failure reason (MQTT v5, e.g. 0x87 not authorized) keeps the row, raises
  the ``publish_refused`` alarm once per backoff period and holds all publishing for a
  doubling delay (1 s … 60 s) before retrying the refused rows.

Commands (``cmd/+``) are subscribed on every connect with retain-as-published, so a retained
command is recognisable as one whether it was stored before we subscribed or published
while we were; the callback hands each one to ``on_command`` (the app's queue) unparsed.
Health payloads and command replies are built elsewhere and only published here.

The site's occupancy counters: this gate's own goes out retained (the latest one again on
every connect, so siblings catch up after a partition); its siblings' (``{prefix}/{site}/+/
occupancy``, subscribed separately so that a broker refusing it costs nothing else) are
handed to ``on_counter`` from this thread, and ``on_link`` says whether they are flowing.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from scanner import __version__
from scanner.config import Config
from scanner.gate.outbox import Outbox, OutboxError
from scanner.gate.telemetry import ha_discovery
from scanner.mqtt import (
    TLS_ADVICE,
    Ack,
    ConnectFailed,
    ConnectRefused,
    Disconnected,
    SubAck,
    connect_failure,
    secure,
)

log = logging.getLogger(__name__)

WINDOW = 20  # in-flight check-ins; matches mosquitto's default max_inflight_messages
TICK_S = 2.0  # safety-net poll of the outbox in case a wake() was missed
REFUSED_BACKOFF_MIN_S = 1.0
# delivery="collector": how far ahead of the collector's acks a gate may run, and how long
# it waits for ack progress before sending everything unacked again.
UNACKED_MAX = 5000
ACK_TIMEOUT_S = 30.0
RESEND_MAX_S = 600.0
NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT v5 PUBACK reason: accepted, and delivered to nobody
UNHEARD_RESEND_S = 2.0
REFUSED_BACKOFF_MAX_S = 60.0

ClientFactory = Callable[..., mqtt.Client]


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Nagle off: check-ins and occupancy counters are small and wanted now. With it on, the
    second of two quick messages waits for the ACK of the first, which a delayed ACK holds
    back ~40 ms (`bench occupancy` measured the sibling's count at p50 38 ms, 19 ms without)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:
        log.debug("TCP_NODELAY not set: %s", exc)


@dataclass(frozen=True, slots=True)
class Inbound:
    """One command message as it came off the wire (built in paho's callback, nothing parsed)."""

    name: str
    payload: bytes = field(repr=False)
    retain: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None


# What reaches the publisher thread: from paho's callbacks, and from the gate's other threads.


@dataclass(frozen=True, slots=True)
class _Connected:
    session_present: bool
    receive_max: int | None


@dataclass(frozen=True, slots=True)
class _PubAck:
    mid: int
    reason: ReasonCode


@dataclass(frozen=True, slots=True)
class _CounterIn:
    device: str
    payload: bytes
    retained: bool


@dataclass(frozen=True, slots=True)
class _Counter:
    body: bytes


@dataclass(frozen=True, slots=True)
class _AckIn:
    payload: bytes


@dataclass(frozen=True, slots=True)
class _Wake:
    pass


@dataclass(frozen=True, slots=True)
class _StatusDue:
    pass


@dataclass(frozen=True, slots=True)
class _Health:
    body: bytes


@dataclass(frozen=True, slots=True)
class _Reply:
    topic: str
    body: bytes
    correlation_data: bytes | None


@dataclass(frozen=True, slots=True)
class _Stop:
    deadline: float


_Item = (
    _Connected
    | ConnectRefused
    | ConnectFailed
    | Disconnected
    | _PubAck
    | SubAck
    | _CounterIn
    | _Counter
    | _AckIn
    | _Wake
    | _StatusDue
    | _Health
    | _Reply
    | _Stop
)


class Publisher:
    """Publishes the outbox to the broker and keeps ``availability``/``status`` current."""

    def __init__(
        self,
        config: Config,
        outbox: Outbox,
        *,
        status: Callable[[], dict[str, Any]],
        on_alarm: Callable[[str, str], None] | None = None,
        on_alarm_clear: Callable[[str], None] | None = None,
        client_factory: ClientFactory | None = None,
        window: int = WINDOW,
        on_command: Callable[[Inbound], None] | None = None,
        ack_timeout_s: float = ACK_TIMEOUT_S,
        on_counter: Callable[[str, bytes, bool], None] | None = None,
        on_link: Callable[[bool], None] = lambda up: None,
    ) -> None:
        self._config = config
        self._outbox = outbox
        self._status = status
        self._on_alarm = on_alarm
        self._on_alarm_clear = on_alarm_clear
        self._active_alarms: set[str] = set()  # publisher thread only
        self._ack_timeout_s = ack_timeout_s
        self._max_window = window
        self._window = window
        self._collector = config.storage.delivery == "collector"
        self._where = f"{config.mqtt.host}:{config.mqtt.port}"
        self._t_checkin = config.topic("checkin")
        self._t_availability = config.topic("availability")
        self._t_status = config.topic("status")
        self._t_ack = config.topic("ack")
        self._t_cmd = config.topic("cmd/+")
        self._t_health = config.topic("health")
        self._t_occupancy = config.topic("occupancy")
        self._t_counters = f"{config.mqtt.topic_prefix}/{config.device.site}/+/occupancy"
        self._on_command = on_command
        self._on_counter = on_counter
        self._on_link = on_link
        self._v5 = config.mqtt.protocol == "5"
        self.reconnects = 0  # connections after the first (health telemetry); publisher thread writes
        self._connects = 0

        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._connected = threading.Event()
        self._subscribed = threading.Event()  # the broker granted ack (and cmd/+) on this connection
        self._wake_pending = threading.Event()  # coalesces wake() calls into one queue item
        self._drained = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

        # Owned by the publisher thread only.
        self._online = False
        self._cursor = 0
        self._last_ack_progress = time.monotonic()
        self._inflight: dict[int, int] = {}
        self._refused: set[int] = set()
        self._hold_until = 0.0
        self._backoff = REFUSED_BACKOFF_MIN_S
        self._offline_mid: int | None = None
        self._counter: bytes | None = None  # this gate's latest occupancy counter
        self._counter_mid: int | None = None
        self._counter_refused_said = False
        self._counters_sub_mid: int | None = None
        self._outbox_failing = False
        self._fail_logged = False  # said why the broker cannot be reached, this outage
        # The highest seq handed to paho by this process: an ack can only be about what was
        # sent. An ack beyond it (a collector that still holds seqs from before this gate's
        # state was lost, a hostile client) must not delete rows nobody has received.
        self._highest_sent = 0
        # delivery="collector": how long acks may stall before everything unacked is sent
        # again; doubles while the collector stays silent, so a dead collector does not cost
        # a full resend over 3G every ack_timeout_s.
        self._resend_after_s = ack_timeout_s
        # Check-ins the broker PUBACKed with "no matching subscribers": resend those sooner,
        # with their own doubling so that a collector that stays down is no resend storm.
        self._dropped_unheard = False
        self._unheard_resend_s = UNHEARD_RESEND_S

        self._client = self._make_client(client_factory or mqtt.Client)

    def _make_client(self, factory: ClientFactory) -> mqtt.Client:
        m = self._config.mqtt
        protocol = mqtt.MQTTv5 if m.protocol == "5" else mqtt.MQTTv311
        client = factory(CallbackAPIVersion.VERSION2, client_id=self._config.device.id, protocol=protocol)
        secure(client, self._config)
        client.will_set(self._t_availability, "offline", qos=1, retain=True)
        client.reconnect_delay_set(1, 60)
        # paho queues beyond its in-flight limit; leave room for availability/status.
        client.max_inflight_messages_set(self._window + 4)
        client.on_connect = self._cb_connect
        client.on_connect_fail = self._cb_connect_fail
        client.on_disconnect = self._cb_disconnect
        client.on_publish = self._cb_publish
        client.on_subscribe = self._cb_subscribe
        client.on_socket_open = _no_delay
        client.message_callback_add(self._t_ack, self._cb_ack)
        if self._on_command is not None:
            client.message_callback_add(self._t_cmd, self._cb_cmd)
        if self._on_counter is not None:
            client.message_callback_add(self._t_counters, self._cb_counter)
        return client

    # --- public API ------------------------------------------------------------------------

    def start(self) -> Publisher:
        """Start connecting in the background and the publisher thread; returns at once."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name="mqtt-publisher", daemon=True)
        self._thread.start()
        log.info("connecting to %s as %s", self._where, self._config.device.id)
        m = self._config.mqtt
        self._client.connect_async(m.host, m.port, m.keepalive_s)
        self._client.loop_start()
        return self

    def wake(self) -> None:
        """An event was appended: publish it now rather than at the next tick."""
        if not self._wake_pending.is_set():
            self._wake_pending.set()
            self._queue.put(_Wake())

    def publish_status(self) -> None:
        """Re-publish the retained status (from the publisher thread, when connected)."""
        if not self._stopped:
            self._queue.put(_StatusDue())

    def publish_health(self, body: bytes) -> None:
        """Publish a ``health`` payload (retained, QoS 0) from the publisher thread; dropped offline."""
        if not self._stopped:
            self._queue.put(_Health(body))

    def publish_occupancy(self, body: bytes) -> None:
        """Publish this gate's occupancy counter (retained, QoS 1); the latest goes out on connect."""
        if not self._stopped:
            self._queue.put(_Counter(body))

    def publish_reply(self, topic: str, body: bytes, correlation_data: bytes | None = None) -> None:
        """Publish a command reply (QoS 1, never retained), echoing MQTT v5 correlation data."""
        if not self._stopped:
            self._queue.put(_Reply(topic, body, correlation_data))

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def wait_subscribed(self, timeout: float) -> bool:
        """True once this connection's subscriptions (ack, commands) are in place."""
        return self._subscribed.wait(timeout)

    def wait_drained(self, timeout: float) -> bool:
        """True once the outbox is empty; False if it is not within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._drained:
            while True:
                try:
                    if self._outbox.depth() == 0:
                        return True
                except OutboxError:
                    return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                # Bounded slices: removals by an ack are notified, but do not rely on it alone.
                self._drained.wait(min(remaining, 0.25))

    def stop(self, timeout: float = 5.0) -> None:
        """Publish retained ``offline`` (bounded wait), disconnect, stop both threads."""
        if self._stopped:
            return
        self._stopped = True
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._queue.put(_Stop(deadline))
            self._thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
            if self._thread.is_alive():
                log.error("publisher thread did not stop within %.1f s", timeout)
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()
        log.info("mqtt link to %s stopped", self._where)

    def __enter__(self) -> Publisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- paho callbacks (paho's thread: enqueue only) --------------------------------------

    def _cb_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        if reason_code.is_failure:
            self._queue.put(ConnectRefused(reason_code))
            return
        self._connected.set()
        # MQTT v5 brokers may cap unacknowledged QoS 1 publishes (HiveMQ's default is 10);
        # paho does not enforce it, and exceeding it gets the connection closed.
        receive_max = getattr(properties, "ReceiveMaximum", None) if properties is not None else None
        self._queue.put(_Connected(bool(getattr(flags, "session_present", False)), receive_max))

    def _cb_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._queue.put(ConnectFailed(*connect_failure()))

    def _cb_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        self._connected.clear()
        self._subscribed.clear()
        self._queue.put(Disconnected(reason_code))

    def _cb_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Any
    ) -> None:
        self._queue.put(_PubAck(mid, reason_code))

    def _cb_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode], properties: Any
    ) -> None:
        self._queue.put(SubAck(mid, list(reason_codes)))

    def _cb_counter(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        device = message.topic.split("/")[-2]
        self._queue.put(_CounterIn(device, bytes(message.payload), bool(message.retain)))

    def _cb_ack(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._queue.put(_AckIn(bytes(message.payload)))

    def _cb_cmd(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        inbound = Inbound(
            name=message.topic.rsplit("/", 1)[-1],
            payload=bytes(message.payload),
            retain=bool(message.retain),
            response_topic=response_topic or None,
            correlation_data=bytes(correlation) if correlation is not None else None,
        )
        try:
            assert self._on_command is not None
            self._on_command(inbound)  # the app's queue: never blocks
        except Exception:
            log.exception("on_command failed")

    # --- publisher thread ------------------------------------------------------------------

    def _run(self) -> None:
        stop_deadline: float | None = None
        while True:
            now = time.monotonic()
            if stop_deadline is not None:
                timeout = stop_deadline - now
                if self._offline_mid is None or timeout <= 0 or not self._online:
                    break
            elif self._online and self._hold_until > now:
                timeout = min(TICK_S, self._hold_until - now)
            else:
                timeout = TICK_S
            try:
                items = [self._queue.get(timeout=max(timeout, 0.0))]
            except queue.Empty:
                items = []
            while True:  # drain whatever else is waiting, so removals batch into one commit
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            removable: list[int] = []
            for item in items:
                try:
                    stop_deadline = self._handle(item, removable, stop_deadline)
                except Exception:
                    # One bad item (a hostile ack, a bug) must not end the only thread that
                    # publishes: check-ins would pile up unseen behind a healthy-looking gate.
                    log.exception("publisher: handling %s failed; carrying on", type(item).__name__)
            if removable:
                self._remove(removable)
            if stop_deadline is None:
                self._fill()
        log.debug("publisher thread exiting")

    def _handle(self, item: _Item, removable: list[int], stop_deadline: float | None) -> float | None:
        """One queue item, on the publisher thread; returns the (possibly new) stop deadline."""
        match item:
            case _PubAck(mid, reason):
                self._on_puback(mid, reason, removable)
            case _Connected(session_present, receive_max):
                self._fail_logged = False
                self._on_connect(session_present, receive_max)
            case Disconnected(reason):
                self._on_disconnect(reason)
            case ConnectRefused(reason):
                # paho retries with backoff; a refusal (bad password, banned id) needs a human.
                detail = f"broker {self._where} refused the connection: {reason} ({reason.value:#x})"
                log.error("%s", detail)
                self._alarm("connect_refused", detail)
            case ConnectFailed(tls, why):
                self._on_connect_fail(tls, why)
            case SubAck(mid, reasons) if mid == self._counters_sub_mid:
                refused = [rc for rc in reasons if rc.is_failure]
                if refused:
                    log.error("subscription to %s refused: %s", self._t_counters, refused[0])
                self._on_link(not refused)
            case SubAck(_mid, reasons):
                if not any(rc.is_failure for rc in reasons):
                    self._subscribed.set()
                for rc in reasons:
                    if rc.is_failure:
                        log.error("subscription to %s or %s refused: %s", self._t_ack, self._t_cmd, rc)
            case _CounterIn(device, payload, retained):
                if self._on_counter is not None:
                    self._on_counter(device, payload, retained)
            case _Counter(body):
                self._counter = body
                if self._online:
                    self._send_counter()
            case _AckIn(payload):
                self._on_ack(payload)
            case _Wake():
                self._wake_pending.clear()
            case _StatusDue():
                if self._online:
                    self._send_status()
            case _Health(body):
                if self._online:
                    self._client.publish(self._t_health, body, qos=0, retain=True)
            case _Reply(topic, body, correlation_data):
                self._send_reply(topic, body, correlation_data)
            case _Stop(deadline) if stop_deadline is None:
                stop_deadline = deadline
                self._begin_stop()
        return stop_deadline

    def _on_connect_fail(self, tls: bool, reason: str) -> None:
        """Say why the broker cannot be reached, once per outage (paho retries up to every 60 s).

        A TLS failure is an alarm, not just a network blip: an expired certificate or a
        wrong CA does not heal by retrying, and it looks exactly like a dead link otherwise.
        """
        first = not self._fail_logged
        self._fail_logged = True
        if tls:
            detail = f"TLS to {self._where} failed: {reason}"
            if first:
                log.error("%s; %s; retrying", detail, TLS_ADVICE)
            if "tls_failed" not in self._active_alarms:
                self._alarm("tls_failed", detail)
            return
        level = logging.WARNING if first else logging.DEBUG
        log.log(level, "cannot reach broker at %s: %s; retrying", self._where, reason)

    def _on_connect(self, session_present: bool, receive_max: int | None) -> None:
        log.info("connected to %s (session present: %s)", self._where, session_present)
        self._online = True
        self._clear_alarm("connect_refused")
        self._clear_alarm("tls_failed")
        # A broker's Receive Maximum counts every unacknowledged QoS 1 publish, not only the
        # check-ins, and going over it gets the connection closed (0x93). Leave room for what
        # goes out beside them: availability, status and its re-publish, a command reply, the
        # occupancy counter, and the Home Assistant discovery configs sent on connect.
        discovery: list[tuple[str, bytes]] = []
        if self._config.homeassistant.enabled:
            discovery = ha_discovery(self._config, __version__)
        self._window = self._max_window
        if receive_max is not None:
            self._window = max(1, min(self._max_window, receive_max - 5 - len(discovery)))
        # Everything still in the outbox gets another chance on this connection, except the
        # rows paho is resending itself under their old mids.
        self._cursor = 0
        self._last_ack_progress = time.monotonic()
        self._refused.clear()
        self._hold_until = 0.0
        self._connects += 1
        self.reconnects = self._connects - 1
        if self._v5:
            # Retain-as-published: a retained command stays recognisable (and is never run).
            subs: list[tuple[str, Any]] = [(self._t_ack, SubscribeOptions(qos=1))]
            if self._on_command is not None:
                subs.append((self._t_cmd, SubscribeOptions(qos=1, retainAsPublished=True)))
        else:
            subs = [(self._t_ack, 1)] + ([(self._t_cmd, 1)] if self._on_command is not None else [])
        self._client.subscribe(subs)
        if self._on_counter is not None:
            _rc, self._counters_sub_mid = self._client.subscribe(self._t_counters, qos=1)
        self._client.publish(self._t_availability, "online", qos=1, retain=True)
        self._send_status()
        if self._counter is not None:
            self._send_counter()
        for topic, body in discovery:
            self._client.publish(topic, body, qos=1, retain=True)

    def _send_reply(self, topic: str, body: bytes, correlation_data: bytes | None) -> None:
        props = None
        if self._v5 and correlation_data is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = correlation_data
        try:
            self._client.publish(topic, body, qos=1, retain=False, properties=props)
        except ValueError as exc:  # e.g. a response topic with wildcards
            log.warning("cannot publish a command reply on %r: %s", topic, exc)

    def _send_counter(self) -> None:
        assert self._counter is not None
        self._counter_mid = self._client.publish(self._t_occupancy, self._counter, qos=1, retain=True).mid

    def _on_disconnect(self, reason_code: ReasonCode) -> None:
        self._on_link(False)
        if self._online:
            level = logging.INFO if self._stopped else logging.WARNING
            log.log(
                level,
                "disconnected from %s: %s (%d in flight, %d queued in outbox)",
                self._where,
                reason_code,
                len(self._inflight),
                self._safe_depth(),
            )
        self._online = False

    def _send_status(self) -> None:
        try:
            body = json.dumps(self._status(), separators=(",", ":"), sort_keys=True, default=str)
        except Exception:
            log.exception("status() failed; status not published")
            return
        self._client.publish(self._t_status, body, qos=1, retain=True)

    def _on_puback(self, mid: int, reason_code: ReasonCode, removable: list[int]) -> None:
        if mid == self._offline_mid:
            self._offline_mid = None
            return
        if mid == self._counter_mid:
            self._counter_mid = None
            if reason_code.is_failure and not self._counter_refused_said:
                # Once per process: the siblings see this gate's counter go stale, and say so.
                self._counter_refused_said = True
                log.error(
                    "broker %s refused this gate's occupancy counter on %s: %s (%#x); its siblings "
                    "will not count its entries and exits (check the broker ACL)",
                    self._where,
                    self._t_occupancy,
                    reason_code,
                    reason_code.value,
                )
            return
        seq = self._inflight.pop(mid, None)
        if seq is None:
            return  # availability/status, or a stale mid: nothing to account for
        if reason_code.is_failure:
            self._refused.add(seq)
            now = time.monotonic()
            if now >= self._hold_until:  # pragma: no mutate (tie)
                # The alarm detail stays the same from cycle to cycle (no seq, no delay), so
                # the app re-publishes status only when the situation changes.
                detail = (
                    f"broker {self._where} refused check-ins on {self._t_checkin}: "
                    f"{reason_code} ({reason_code.value:#x}); events kept, retrying"
                )
                log.error(
                    "seq %d refused by %s: %s (%#x); retrying in %.0f s",
                    seq,
                    self._where,
                    reason_code,
                    reason_code.value,
                    self._backoff,
                )
                self._alarm("publish_refused", detail)
                self._hold_until = now + self._backoff
                self._backoff = min(self._backoff * 2, REFUSED_BACKOFF_MAX_S)
            return
        self._backoff = REFUSED_BACKOFF_MIN_S
        self._clear_alarm("publish_refused")
        if reason_code.value == NO_MATCHING_SUBSCRIBERS:
            # The broker accepted it and threw it away: nobody subscribes to check-ins (the
            # consumer is down, or subscribes elsewhere). In broker mode PUBACK is the whole
            # proof, so the row goes; the alarm tells operators their events are not arriving.
            # In collector mode the row stays, and this is news worth acting on: after a broker
            # restart the gate is often back before the collector has resubscribed.
            self._dropped_unheard = True
            if "no_subscribers" not in self._active_alarms:
                detail = f"broker {self._where}: no subscriber for {self._t_checkin}, check-ins dropped there"
                log.error('%s (use a persistent subscriber or delivery = "collector")', detail)
                self._alarm("no_subscribers", detail)
        else:
            self._clear_alarm("no_subscribers")
        if not self._collector:
            removable.append(seq)
        # delivery="collector": the row stays until the collector's ack; the cursor is past
        # it, so it is not republished on this connection.

    def _on_ack(self, payload: bytes) -> None:
        try:
            ack = Ack.parse(payload)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            log.warning("ignoring malformed ack on %s (%d bytes): %s", self._t_ack, len(payload), exc)
            return
        upto, ranges = ack.upto, ack.ranges
        sent = self._highest_sent
        if upto > sent or any(last > sent for _, last in ranges):
            log.warning(
                "ack on %s names seqs up to %d, but this gate has sent only up to %d: "
                "acting on the part it sent (did the collector keep seqs from a reinstalled gate?)",
                self._t_ack,
                max([upto, *(last for _, last in ranges)]),
                sent,
            )
        try:
            removed = self._outbox.remove_upto(min(upto, sent)) if upto > 0 else 0
            for first, last in ranges:
                if min(last, sent) >= max(first, 1):
                    removed += self._outbox.remove_range(max(first, 1), min(last, sent))
        except OutboxError as exc:
            self._outbox_problem(exc)
            return
        if removed:
            self._last_ack_progress = time.monotonic()
            self._resend_after_s = self._ack_timeout_s
            self._unheard_resend_s = UNHEARD_RESEND_S
        log.debug("collector ack upto %d, %d ranges: %d rows removed", upto, len(ranges), removed)
        self._notify_drained()

    def _remove(self, seqs: list[int]) -> None:
        try:
            self._outbox.remove(seqs)
        except OutboxError as exc:
            # The rows stay and go out again on the next connection: a duplicate, not a loss.
            self._outbox_problem(exc)
            return
        self._notify_drained()

    def _fill(self) -> None:
        """Hand rows to paho until the in-flight window is full or the outbox is empty."""
        if not self._online or time.monotonic() < self._hold_until:
            return
        try:
            if self._refused:
                retry, self._refused = sorted(self._refused), set()
                for seq in retry:
                    row = self._outbox.pending(after_seq=seq - 1, limit=1)
                    if row and row[0][0] == seq:  # else the collector acked it meanwhile
                        self._publish_row(seq, row[0][1])
            if self._collector and not self._collector_may_send():
                return
            busy = set(self._inflight.values())
            # (`<=` would change nothing: with the window full, pending() is asked for 0 rows.)
            while len(self._inflight) < self._window:  # pragma: no mutate
                rows = self._outbox.pending(after_seq=self._cursor, limit=self._window - len(self._inflight))
                if not rows:
                    break
                for seq, payload in rows:
                    self._cursor = seq
                    if seq not in busy:
                        self._publish_row(seq, payload)
            if self._outbox_failing:
                self._outbox_failing = False
                self._clear_alarm("outbox_error")
        except OutboxError as exc:
            self._outbox_problem(exc)
            self._hold_until = time.monotonic() + REFUSED_BACKOFF_MIN_S

    def _collector_may_send(self) -> bool:
        """Flow control and resend for delivery="collector".

        A broker may PUBACK and then drop (its per-client queue is full, or it restarted
        without persistence), so PUBACK proves nothing here. Two rules keep every event
        moving: never run more than UNACKED_MAX events ahead of the collector's acks, and if
        the acks stall for ``ack_timeout_s``, send everything unacked again from the oldest.
        Duplicates are harmless: the collector stores by event_id.
        """
        oldest = self._outbox.pending(after_seq=0, limit=1)
        if not oldest or oldest[0][0] > self._cursor:
            self._last_ack_progress = time.monotonic()  # nothing is waiting for an ack
            return True
        first = oldest[0][0]
        wait = self._resend_after_s
        if self._dropped_unheard:  # the broker said nobody heard some: do not wait the full time
            wait = min(wait, self._unheard_resend_s)
        if time.monotonic() - self._last_ack_progress > wait and not self._inflight:
            log.warning(
                "no ack from the collector for %.0f s%s: resending from seq %d (%d waiting)",
                wait,
                " (the broker had no subscriber for some)" if self._dropped_unheard else "",
                first,
                self._safe_depth(),
            )
            self._cursor = first - 1
            self._last_ack_progress = time.monotonic()
            if self._dropped_unheard:
                self._unheard_resend_s = min(self._unheard_resend_s * 2, RESEND_MAX_S)
                self._dropped_unheard = False
            else:
                self._resend_after_s = min(self._resend_after_s * 2, RESEND_MAX_S)
            return True
        return self._cursor - first + 1 < UNACKED_MAX

    def _publish_row(self, seq: int, payload: bytes) -> None:
        try:
            info = self._client.publish(self._t_checkin, payload, qos=1, retain=False)
        except ValueError as exc:  # e.g. payload over the MQTT limit: it will never go out
            detail = f"seq {seq} cannot be published: {exc}"
            log.error("%s", detail)
            self._alarm("publish_failed", detail)
            return
        # Only a paho queue bounded by max_queued_messages_set says this, and the gate's own
        # window bounds what is in flight instead: kept for a paho that changes its mind.
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self._refused.add(seq)  # pragma: no mutate (unreachable, see above)
            return
        # MQTT_ERR_NO_CONN (lost between our check and the call) still leaves the message in
        # paho's queue, which sends it after reconnecting: track it like any other.
        self._inflight[info.mid] = seq
        self._highest_sent = max(self._highest_sent, seq)

    def _begin_stop(self) -> None:
        if self._online:
            info = self._client.publish(self._t_availability, "offline", qos=1, retain=True)
            self._offline_mid = info.mid
        else:
            # If the link dropped, the broker has already published the will ("offline").
            log.info("not connected to %s at stop: offline not published by us", self._where)

    def _outbox_problem(self, exc: OutboxError) -> None:
        if not self._outbox_failing:
            log.error("outbox: %s", exc.reason)
            self._alarm("outbox_error", exc.reason)
        self._outbox_failing = True

    def _alarm(self, kind: str, detail: str) -> None:
        self._active_alarms.add(kind)
        if self._on_alarm is None:
            return
        try:
            self._on_alarm(kind, detail)
        except Exception:
            log.exception("on_alarm(%s) failed", kind)

    def _clear_alarm(self, kind: str) -> None:
        if kind not in self._active_alarms:
            return
        self._active_alarms.discard(kind)
        log.info("alarm %s cleared", kind)
        if self._on_alarm_clear is None:
            return
        try:
            self._on_alarm_clear(kind)
        except Exception:
            log.exception("on_alarm_clear(%s) failed", kind)

    def _notify_drained(self) -> None:
        with self._drained:
            self._drained.notify_all()

    def _safe_depth(self) -> int:
        try:
            return self._outbox.depth()
        except OutboxError:
            return -1
