"""An independent MQTT subscriber for tests: what an operator's system would receive."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from scanner.sim.localbroker import LocalBroker


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll a cheap local predicate (e.g. outbox depth) until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class Subscriber:
    """An independent paho client collecting every message on ``topics`` into a list.

    ``persistent=True`` keeps an MQTT v5 session (clean_start=False, 5 min expiry) so that,
    on a broker with persistence, messages published while this client is reconnecting
    after a broker restart are queued for it instead of lost.
    """

    def __init__(self, broker: LocalBroker, *topics: str, persistent: bool = False, timeout: float = 5.0):
        self.messages: list[mqtt.MQTTMessage] = []
        self._topics = topics
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._persistent = persistent
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"test-sub-{uuid.uuid4().hex[:10]}", protocol=mqtt.MQTTv5
        )
        # Reconnect fast after a broker restart (the gate under test uses 1..60 s).
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        props = None
        if persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 300
        self.client.connect(
            broker.host, broker.port, keepalive=10, clean_start=not persistent, properties=props
        )
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            self.close()
            raise TimeoutError(f"subscriber not subscribed to {topics} within {timeout} s")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            return
        client.subscribe([(t, 1) for t in self._topics])

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def payloads(self, topic: str | None = None) -> list[bytes]:
        with self._cond:
            return [bytes(m.payload) for m in self.messages if topic is None or m.topic == topic]

    def wait_for(self, predicate: Callable[[list[mqtt.MQTTMessage]], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate(messages)`` holds; a Condition, so no message is missed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.messages):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def wait_payload(self, topic: str, payload: bytes, timeout: float = 10.0) -> bool:
        """Wait until the LAST message on ``topic`` is ``payload``."""

        def last_is(msgs: list[mqtt.MQTTMessage]) -> bool:
            on_topic = [m for m in msgs if m.topic == topic]
            return bool(on_topic) and bytes(on_topic[-1].payload) == payload

        return self.wait_for(last_is, timeout)

    def publish(self, topic: str, payload: bytes | str, timeout: float = 5.0) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise TimeoutError(f"test publish to {topic} not acknowledged within {timeout} s")

    def close(self) -> None:
        if self._persistent and self.client.is_connected():
            # End the session: a v5 DISCONNECT may lower the expiry interval to 0.
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
            self.client.disconnect(properties=props)
        else:
            self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
