"""What every MQTT client of this package shares: TLS and credentials, why a connect
failed, the records paho's callbacks hand on, and the collector's ``ack`` message.

The gate's publisher, the collector, ``monitor``, ``cmd send`` and ``selftest`` all connect
with :func:`secure`, so no client can talk to a broker with less verification than another.
"""

from __future__ import annotations

import json
import ssl
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from paho.mqtt.reasoncodes import ReasonCode

from scanner.config import Config

if TYPE_CHECKING:  # the type only: this module makes no client, callers bring their own
    import paho.mqtt.client as mqtt

ACK_SCHEMA = "gate-scanner/ack/1"
# The collectors' shared-subscription group: `collect` joins it, and the broker's rules
# (`pki dynsec`) let collector identities, and nobody else, join it.
SHARE_GROUP = "collectors"
ACK_MAX_BYTES = 64 * 1024  # 32 ranges of two 19-digit seqs fit a hundred times over
TLS_ADVICE = "check the clock, ca_file and the device certificate"


def secure(client: mqtt.Client, config: Config) -> None:
    """TLS and credentials from ``[mqtt]``, the same for every client this package makes.

    Verification is never optional: a client that talks to any broker leaks check-ins.
    """
    m = config.mqtt
    if m.tls:
        client.tls_set(
            ca_certs=str(m.ca_file) if m.ca_file else None,
            certfile=str(m.cert_file) if m.cert_file else None,
            keyfile=str(m.key_file) if m.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
        client.tls_insecure_set(False)
    if m.username is not None:
        client.username_pw_set(m.username, config.mqtt_password)


def connect_failure() -> tuple[bool, str]:
    """``(is_tls, reason)`` for the connection attempt that just failed.

    Call it only from paho's ``on_connect_fail``: paho passes that callback no reason but
    calls it from inside its ``except OSError``, so the exception being handled says why
    (refused, timed out, name not resolved, certificate expired, wrong CA).
    """
    exc = sys.exc_info()[1]
    if isinstance(exc, ssl.SSLError):
        return True, getattr(exc, "verify_message", None) or exc.reason or str(exc)
    return False, str(exc) if exc is not None else "no reason given"


@dataclass(frozen=True, slots=True)
class Ack:
    """The collector's word that every seq ≤ ``upto`` and in ``ranges`` is in its store."""

    upto: int
    ranges: tuple[tuple[int, int], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"schema": ACK_SCHEMA, "upto": self.upto, "ranges": [[lo, hi] for lo, hi in self.ranges]}

    @classmethod
    def of(cls, upto: int, ranges: Iterable[tuple[int, int]]) -> Ack:
        return cls(upto, tuple(ranges))

    @classmethod
    def parse(cls, payload: bytes) -> Ack:
        """The ack in ``payload``; ValueError (never anything else) when it is not one.

        Anyone who may publish on a gate's ``ack`` topic can send anything there, so every
        field is checked before the gate deletes a single row on its word.
        """
        if len(payload) > ACK_MAX_BYTES:
            raise ValueError("longer than any ack")
        try:
            msg = json.loads(payload)
        except RecursionError:
            raise ValueError("nested too deep") from None
        if not isinstance(msg, dict) or msg.get("schema") != ACK_SCHEMA:
            raise ValueError("wrong schema")
        upto = msg.get("upto", 0)
        ranges = msg.get("ranges", [])
        if isinstance(upto, bool) or not isinstance(upto, int) or upto < 0:
            raise ValueError("upto is not a non-negative integer")
        if not isinstance(ranges, list) or not all(
            isinstance(r, list)
            and len(r) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in r)
            and r[0] <= r[1]
            for r in ranges
        ):
            raise ValueError("ranges is not a list of [a, b] with a <= b")
        return cls(upto, tuple((lo, hi) for lo, hi in ranges))


# What paho's callbacks hand to the one thread that owns a client (the gate's publisher, the
# collector's worker): paho holds its own lock while calling them, so they only enqueue these.


@dataclass(frozen=True, slots=True)
class ConnectRefused:
    reason: ReasonCode


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    tls: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Disconnected:
    reason: ReasonCode


@dataclass(frozen=True, slots=True)
class SubAck:
    mid: int  # which SUBSCRIBE it answers: a client may have several in flight
    reasons: list[ReasonCode]
