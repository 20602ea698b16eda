from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scanner.config import Config, from_table
from scanner.gate.outbox import Outbox, OutboxError
from scanner.gate.publisher import Publisher, connect_failure
from scanner.sim.localbroker import LocalBroker
from tests.helpers import REPO, make_config, unique_name
from tests.mqtt_helpers import Subscriber, wait_until


def publisher_config(
    broker: LocalBroker, tmp_path: Path, *, delivery: str = "broker", protocol: str = "5"
) -> Config:
    return make_config(
        tmp_path,
        device={"id": unique_name("gate"), "site": unique_name("site")},
        mqtt={"host": broker.host, "port": broker.port, "protocol": protocol, "keepalive_s": 5},
        storage={"dir": str(tmp_path), "delivery": delivery},
    )


def event(seq: int, created: str) -> bytes:
    return json.dumps({"schema": "test/1", "seq": seq, "created": created}).encode()


def seqs(sub: Subscriber, topic: str) -> list[int]:
    return [json.loads(p)["seq"] for p in sub.payloads(topic)]


class Alarms:
    def __init__(self) -> None:
        self.raised: list[tuple[str, str]] = []
        self.at: list[float] = []  # monotonic time of each
        self.event = threading.Event()

    def __call__(self, kind: str, detail: str) -> None:
        self.raised.append((kind, detail))
        self.at.append(time.monotonic())
        self.event.set()


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Callable[..., tuple[Publisher, Outbox, Config]]]:
    """Factory for a started Publisher over a fresh outbox; stopped and closed at teardown."""
    made: list[tuple[Publisher, Outbox]] = []

    def make(
        broker: LocalBroker,
        *,
        delivery: str = "broker",
        protocol: str = "5",
        on_alarm: Callable[[str, str], None] | None = None,
        status: Callable[[], dict[str, Any]] | None = None,
        preload: int = 0,
        config: Config | None = None,
        ack_timeout_s: float = 30.0,
    ) -> tuple[Publisher, Outbox, Config]:
        config = config or publisher_config(broker, tmp_path, delivery=delivery, protocol=protocol)
        outbox = Outbox(tmp_path / f"{config.device.id}.db", max_events=10_000)
        for _ in range(preload):
            outbox.append(event)
        pub = Publisher(
            config,
            outbox,
            status=status or (lambda: {"version": "test"}),
            on_alarm=on_alarm,
            ack_timeout_s=ack_timeout_s,
        )
        made.append((pub, outbox))
        pub.start()
        return pub, outbox, config

    yield make
    for pub, outbox in made:
        pub.stop(timeout=2.0)
        outbox.close()


def test_delivers_in_seq_order(broker: LocalBroker, tmp_path: Path, gate: Any, subscribe: Any) -> None:
    config = publisher_config(broker, tmp_path)
    topic = config.topic("checkin")
    sub = subscribe(topic)
    # 30 waiting in the outbox from before the start, then 50 appended while connected.
    pub, outbox, _ = gate(broker, preload=30, config=config)
    assert pub.wait_connected(5)
    for _ in range(50):
        outbox.append(event)
        pub.wake()
    assert sub.wait_for(lambda msgs: len(msgs) >= 80, timeout=10), seqs(sub, topic)
    assert seqs(sub, topic) == list(range(1, 81))
    assert all(not m.retain for m in sub.messages)
    assert pub.wait_drained(5)
    assert outbox.depth() == 0


def test_v311_delivers(broker: LocalBroker, gate: Any, subscribe: Any) -> None:
    pub, outbox, config = gate(broker, protocol="3.1.1")
    sub = subscribe(config.topic("checkin"))
    assert pub.wait_connected(5)
    for _ in range(10):
        outbox.append(event)
    pub.wake()
    assert sub.wait_for(lambda msgs: len(msgs) >= 10, timeout=10)
    assert seqs(sub, config.topic("checkin")) == list(range(1, 11))
    assert pub.wait_drained(5)


def test_availability_and_status(broker: LocalBroker, tmp_path: Path, subscribe: Any) -> None:
    config = publisher_config(broker, tmp_path)
    outbox = Outbox(tmp_path / "o.db", max_events=100)
    avail, status_topic = config.topic("availability"), config.topic("status")
    sub = subscribe(avail, status_topic)
    state = {"version": "test", "n": 1}
    pub = Publisher(config, outbox, status=lambda: dict(state)).start()
    try:
        assert sub.wait_payload(avail, b"online")
        assert sub.wait_for(lambda msgs: any(m.topic == status_topic for m in msgs))
        assert json.loads(sub.payloads(status_topic)[-1]) == {"version": "test", "n": 1}
        state["n"] = 2
        pub.publish_status()
        assert sub.wait_payload(status_topic, b'{"n":2,"version":"test"}')
    finally:
        pub.stop()
        outbox.close()
    assert sub.wait_payload(avail, b"offline")
    assert not pub.connected
    # Retained: a client arriving later learns the gate is offline and its last status.
    late = subscribe(avail, status_topic)
    assert late.wait_payload(avail, b"offline")
    assert late.wait_for(lambda msgs: any(m.topic == status_topic and m.retain for m in msgs))


CHILD = """
import json, sys, time
from pathlib import Path
from scanner.config import from_table
from scanner.gate.publisher import Publisher
from scanner.gate.outbox import Outbox
config = from_table(json.loads(sys.argv[1]))
pub = Publisher(config, Outbox(Path(sys.argv[2]), max_events=100), status=lambda: {}).start()
if not pub.wait_connected(10):
    sys.exit(1)
print("ready", flush=True)
time.sleep(60)  # killed by the test long before this
"""


def test_last_will_when_process_killed(broker: LocalBroker, tmp_path: Path, subscribe: Any) -> None:
    table = {
        "device": {"id": unique_name("gate"), "site": unique_name("site")},
        "mqtt": {"host": broker.host, "port": broker.port},
        "storage": {"dir": str(tmp_path)},
    }
    avail = f"gate/{table['device']['site']}/{table['device']['id']}/availability"
    sub = subscribe(avail)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(table), str(tmp_path / "o.db")],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"  # EOF (b"") if the child failed
        assert sub.wait_payload(avail, b"online")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert sub.wait_payload(avail, b"offline", timeout=10)
    assert sub.payloads(avail) == [b"online", b"offline"]


@pytest.fixture
def own_broker(tmp_broker_dir: Path) -> Iterator[LocalBroker]:
    """A broker this test may stop and restart. Persistence keeps the test subscriber's
    session across the restart, so 'every event arrives' does not depend on who reconnects
    first; the gate itself gets no help from it."""
    b = LocalBroker(tmp_broker_dir, persistence=True)
    b.start()
    try:
        yield b
    finally:
        b.stop()


def test_broker_restart_mid_run(own_broker: LocalBroker, gate: Any, subscribe: Any) -> None:
    pub, outbox, config = gate(own_broker)
    topic = config.topic("checkin")
    sub = subscribe(topic, on=own_broker, persistent=True)
    assert pub.wait_connected(5)
    stop_scanning = threading.Event()

    def scanner() -> None:
        # A steady stream of scans, as from a busy gate, spanning the outage: the test says
        # when it ends, so a slow machine cannot run out of scans before the outage.
        while not stop_scanning.is_set():
            outbox.append(event)
            pub.wake()
            stop_scanning.wait(0.005)

    producer = threading.Thread(target=scanner, name="test-producer")
    producer.start()
    try:
        assert sub.wait_for(lambda msgs: len(msgs) >= 20, timeout=10)
        own_broker.stop()
        assert wait_until(lambda: not pub.connected, timeout=5)
        down_at = outbox.next_seq
        assert wait_until(lambda: outbox.next_seq > down_at + 10, timeout=5)  # scans while down
        own_broker.start()
        assert pub.wait_connected(10)
        up_at = outbox.next_seq
        assert wait_until(lambda: outbox.next_seq > up_at + 10, timeout=5)  # and after
    finally:
        stop_scanning.set()
        producer.join(timeout=10)
    total = outbox.next_seq - 1
    # Duplicates are allowed (at-least-once); gaps are not.
    assert sub.wait_for(lambda msgs: len({json.loads(m.payload)["seq"] for m in msgs}) >= total, 20), sorted(
        set(range(1, total + 1)) - set(seqs(sub, topic))
    )
    assert set(seqs(sub, topic)) == set(range(1, total + 1))
    assert pub.wait_drained(5)
    assert outbox.depth() == 0


def test_stop_without_broker_is_bounded(tmp_path: Path) -> None:
    dead = LocalBroker(tmp_path / "never-started")  # a free port nobody listens on
    config = publisher_config(dead, tmp_path)
    outbox = Outbox(tmp_path / "o.db", max_events=100)
    pub = Publisher(config, outbox, status=lambda: {}).start()
    try:
        outbox.append(event)
        pub.wake()
        assert not pub.wait_connected(0.3)
        assert not pub.wait_drained(0.2)
    finally:
        started = time.monotonic()
        pub.stop(timeout=1.0)
        assert time.monotonic() - started < 4.0
    assert outbox.depth() == 1  # kept for the next run, never dropped
    outbox.close()


def test_appended_while_broker_down(own_broker: LocalBroker, gate: Any, subscribe: Any) -> None:
    pub, outbox, config = gate(own_broker)
    topic = config.topic("checkin")
    sub = subscribe(topic, on=own_broker, persistent=True)
    assert pub.wait_connected(5)
    own_broker.stop()
    assert wait_until(lambda: not pub.connected, timeout=5)
    for _ in range(5):
        outbox.append(event)
        pub.wake()
    assert outbox.depth() == 5  # nothing dropped, nothing lost while offline
    own_broker.start()
    assert pub.wait_connected(10)
    assert sub.wait_for(lambda msgs: len(msgs) >= 5, timeout=10)
    assert seqs(sub, topic) == [1, 2, 3, 4, 5]
    assert pub.wait_drained(5)


def test_collector_delivery_keeps_rows_until_ack(broker: LocalBroker, gate: Any, subscribe: Any) -> None:
    pub, outbox, config = gate(broker, delivery="collector")
    topic, ack = config.topic("checkin"), config.topic("ack")
    sub = subscribe(topic, ack)
    assert pub.wait_connected(5)
    for _ in range(10):
        outbox.append(event)
    pub.wake()
    assert sub.wait_for(lambda msgs: len(msgs) >= 10, timeout=10)
    assert not pub.wait_drained(0.5)  # PUBACKed, but no collector has confirmed storage
    assert outbox.depth() == 10
    assert seqs(sub, topic) == list(range(1, 11))  # and not republished on this connection

    sub.publish(ack, b"not json")
    sub.publish(ack, json.dumps({"schema": "other/1", "upto": 10}))
    sub.publish(ack, json.dumps({"schema": "gate-scanner/ack/1", "upto": "10"}))
    sub.publish(ack, json.dumps({"schema": "gate-scanner/ack/1", "upto": 4, "ranges": [[6, 7], [9, 9]]}))
    # The valid ack was published last, so once it took effect the malformed ones were seen too.
    assert wait_until(lambda: outbox.depth() == 3, timeout=5), outbox.depth()
    assert [s for s, _ in outbox.pending()] == [5, 8, 10]
    sub.publish(ack, json.dumps({"schema": "gate-scanner/ack/1", "upto": 10, "ranges": []}))
    assert pub.wait_drained(5)


def test_collector_delivery_resends_unacked_rows_when_acks_stall(
    broker: LocalBroker, gate: Any, subscribe: Any
) -> None:
    # A broker may PUBACK and then drop (a full per-client queue, a restart without
    # persistence): without acks, the gate must send again on the same connection.
    pub, outbox, config = gate(broker, delivery="collector", ack_timeout_s=1.0)
    topic, ack = config.topic("checkin"), config.topic("ack")
    sub = subscribe(topic, ack)
    assert pub.wait_connected(5)
    for _ in range(3):
        outbox.append(event)
    pub.wake()
    assert sub.wait_for(lambda msgs: len(msgs) >= 6, timeout=15), seqs(sub, topic)
    assert seqs(sub, topic)[:6] == [1, 2, 3, 1, 2, 3]
    # While the collector stays silent the wait doubles (1 s, then 2 s, ...): a dead
    # collector must not cost a full resend over 3G every ack_timeout_s. Measured between
    # paho's receipt times of each resend's last message, not when this thread looked.
    assert sub.wait_for(lambda msgs: len(msgs) >= 9, timeout=15), seqs(sub, topic)
    on_topic = [m for m in sub.messages if m.topic == topic]
    assert on_topic[8].timestamp - on_topic[5].timestamp >= 1.5
    sub.publish(ack, json.dumps({"schema": "gate-scanner/ack/1", "upto": 3, "ranges": []}))
    assert pub.wait_drained(5)


ACL = """\
topic read #
topic readwrite gate/+/+/availability
topic readwrite gate/+/+/status
"""


def test_acl_denied_publish_keeps_row_and_alarms(
    tmp_broker_dir: Path, tmp_path: Path, subscribe: Any
) -> None:
    acl = tmp_broker_dir / "acl"
    acl.write_text(ACL)
    # Persistence and a persistent subscriber session: after the restart the gate may
    # reconnect and publish before the subscriber is back; the broker must queue it.
    with LocalBroker(tmp_broker_dir, persistence=True, extra_config=f"acl_file {acl}") as denying:
        config = publisher_config(denying, tmp_path)
        outbox = Outbox(tmp_path / "o.db", max_events=100)
        alarms, cleared = Alarms(), threading.Event()
        pub = Publisher(
            config,
            outbox,
            status=lambda: {},
            on_alarm=alarms,
            on_alarm_clear=lambda kind: cleared.set() if kind == "publish_refused" else None,
        )
        pub.start()
        try:
            sub = subscribe(config.topic("checkin"), on=denying, persistent=True)
            assert pub.wait_connected(5)
            outbox.append(event)
            pub.wake()
            assert alarms.event.wait(5), "no alarm for a refused publish"
            kind, detail = alarms.raised[0]
            assert kind == "publish_refused"
            assert "0x87" in detail
            assert [s for s, _ in outbox.pending()] == [1]  # kept, not dropped
            # Backoff, not a hot loop: each retry waits at least the first hold (1 s).
            assert not cleared.is_set()
            assert wait_until(lambda: len(alarms.at) >= 2, 5), "the refused row was not retried"
            assert all(b - a >= 0.9 for a, b in itertools.pairwise(alarms.at)), alarms.at
            # The operator fixes the ACL; the broker comes back on the same port.
            denying.extra_config = ""
            denying.restart()
            assert cleared.wait(10), "alarm not cleared after the broker accepted the event"
            assert pub.wait_drained(5)
            assert sub.wait_for(lambda msgs: len(msgs) >= 1, timeout=10)
            assert seqs(sub, config.topic("checkin")) == [1]
        finally:
            pub.stop(timeout=2.0)
            outbox.close()


class CuttableProxy:
    """TCP proxy between the gate and the broker that can swallow the broker's replies and
    then cut the connection: PUBACKs never arrive, so events are in flight at the cut."""

    def __init__(self, target: LocalBroker) -> None:
        self._target = (target.host, target.port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.host, self.port = "127.0.0.1", self._listener.getsockname()[1]
        self.swallow = threading.Event()
        self._closed = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._accepter = threading.Thread(target=self._accept, name="test-proxy", daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                down, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            up = socket.create_connection(self._target, timeout=5)
            with self._lock:
                self._conns += [down, up]
            threading.Thread(target=self._pump, args=(down, up, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_broker: bool) -> None:
        try:
            while data := src.recv(65536):
                if not (from_broker and self.swallow.is_set()):
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._listener.close()
        self._accepter.join(timeout=2)


def test_in_flight_at_disconnect_are_resent_once(
    broker: LocalBroker, gate: Any, subscribe: Any, tmp_path: Path
) -> None:
    proxy = CuttableProxy(broker)
    try:
        config = publisher_config(broker, tmp_path)
        config = dataclasses.replace(config, mqtt=dataclasses.replace(config.mqtt, port=proxy.port))
        topic = config.topic("checkin")
        sub = subscribe(topic)
        pub, outbox, _ = gate(broker, config=config)
        assert pub.wait_connected(5)
        proxy.swallow.set()
        for _ in range(10):
            outbox.append(event)
        pub.wake()
        assert sub.wait_for(lambda msgs: len(msgs) >= 10, timeout=10)  # the broker has them...
        assert outbox.depth() == 10  # ...but no PUBACK came back: all ten in flight
        proxy.cut()
        proxy.swallow.clear()
        assert wait_until(lambda: not pub.connected, timeout=5)
        assert pub.wait_connected(10)
        assert pub.wait_drained(10)
        pub.stop()  # while the proxy still forwards, so "offline" gets out
        got = seqs(sub, topic)
        assert set(got) == set(range(1, 11))
        # paho resends what was in flight; the publisher must not send it a third time.
        assert max(got.count(s) for s in range(1, 11)) <= 2, got
    finally:
        proxy.close()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.mark.skipif(
    not shutil.which("openssl") or not shutil.which("mosquitto_passwd"),
    reason="needs openssl and mosquitto_passwd",
)
def test_tls_with_client_certificate_and_password(tmp_broker_dir: Path, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        cwd=pki,
    )
    for name, san in (("server", "IP:127.0.0.1"), ("client", "DNS:gate")):
        _openssl(
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=pki,
        )
        (pki / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            cwd=pki,
        )
    passwd = tmp_broker_dir / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwd), "gate", "s3cret"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    (tmp_path / "password").write_text("s3cret\n")
    tls_listener = (
        f"cafile {pki / 'ca.crt'}\ncertfile {pki / 'server.crt'}\nkeyfile {pki / 'server.key'}\n"
        f"require_certificate true\npassword_file {passwd}\n"
    )
    # allow_anonymous true is in the base config; the password file still checks a given name.
    (tmp_path / "wrong").write_text("guess\n")
    with LocalBroker(tmp_broker_dir, extra_config=tls_listener) as tls_broker:

        def tls_config(password_file: str) -> Config:
            return from_table(
                {
                    "device": {"id": unique_name("gate"), "site": unique_name("site")},
                    "mqtt": {
                        "host": tls_broker.host,
                        "port": tls_broker.port,
                        "tls": True,
                        "ca_file": str(pki / "ca.crt"),
                        "cert_file": str(pki / "client.crt"),
                        "key_file": str(pki / "client.key"),
                        "username": "gate",
                        "password_file": str(tmp_path / password_file),
                    },
                    "storage": {"dir": str(tmp_path)},
                }
            )

        outbox = Outbox(tmp_path / "o.db", max_events=100)
        outbox.append(event)
        wrong = Publisher(tls_config("wrong"), outbox, status=lambda: {}).start()
        try:
            assert not wrong.wait_connected(0.5)  # CONNACK refused: never counts as connected
        finally:
            wrong.stop(timeout=1.0)
        pub = Publisher(tls_config("password"), outbox, status=lambda: {}).start()
        try:
            assert pub.wait_connected(10), tls_broker.log_tail()
            assert pub.wait_drained(5)
        finally:
            pub.stop()
            outbox.close()


def test_connect_failure_reads_the_cause_paho_does_not_pass(tmp_path: Path) -> None:
    # paho calls on_connect_fail inside its `except OSError`: the cause is the exception
    # being handled. Exercised through a real socket, as paho's reconnect would fail.
    reasons: list[tuple[bool, str]] = []
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # bound, never listening: refused
        try:
            socket.create_connection(("127.0.0.1", closed_port), timeout=2)
        except OSError:
            reasons.append(connect_failure())
    assert reasons == [(False, "[Errno 111] Connection refused")]
    assert connect_failure() == (False, "no reason given")  # called outside an except


def ack(upto: int, ranges: list[list[int]] | None = None) -> str:
    return json.dumps({"schema": "gate-scanner/ack/1", "upto": upto, "ranges": ranges or []})


def test_hostile_acks_neither_stop_publishing_nor_wedge_the_outbox(
    broker: LocalBroker, gate: Any, subscribe: Any
) -> None:
    pub, outbox, config = gate(broker, delivery="collector")
    topic, ack_topic = config.topic("checkin"), config.topic("ack")
    sub = subscribe(topic)
    assert pub.wait_connected(5)
    outbox.append(event)
    pub.wake()
    assert sub.wait_for(lambda msgs: len(msgs) >= 1, timeout=5)
    # Too large for SQLite to bind, nested past Python's recursion limit, ranges beyond 2**63:
    # once, the first left a write transaction open and killed the publisher thread.
    for hostile in (ack(2**63), "[" * 100_000, ack(0, [[1, 2**70]])):
        sub.publish(ack_topic, hostile)
    sub.publish(ack_topic, ack(1))  # a real ack after them still works ...
    assert wait_until(lambda: outbox.depth() == 0, 5), outbox.depth()
    outbox.append(event)  # ... the pipeline can still commit (no transaction left open) ...
    pub.wake()
    assert sub.wait_for(lambda msgs: len(msgs) >= 2, timeout=5)  # ... and the publisher lives
    assert seqs(sub, topic) == [1, 2]


def test_an_ack_beyond_what_this_gate_sent_deletes_only_what_it_sent(tmp_path: Path) -> None:
    # A reinstalled gate starts again at seq 1 while the collector still holds seqs 1..N of
    # its earlier life and acks "upto N": rows this gate has not sent yet must stay.
    # White-box: the publisher is not started, so nothing is sent and the ack is fed directly.
    dead = LocalBroker(tmp_path / "never-started")
    outbox = Outbox(tmp_path / "o.db", max_events=100)
    for _ in range(5):
        outbox.append(event)
    pub = Publisher(publisher_config(dead, tmp_path, delivery="collector"), outbox, status=lambda: {})
    pub._on_ack(ack(1000).encode())
    assert outbox.depth() == 5
    pub._highest_sent = 3  # as if rows 1..3 had gone out on this connection
    pub._on_ack(ack(1000, [[5, 9]]).encode())
    assert [seq for seq, _ in outbox.pending()] == [4, 5]
    outbox.close()


def test_a_broker_with_no_subscriber_is_an_alarm_in_broker_mode(
    broker: LocalBroker, gate: Any, subscribe: Any
) -> None:
    # MQTT v5 PUBACK 0x10: accepted and delivered to nobody. PUBACK is broker mode's proof, so
    # the row goes, but operators must learn that their check-ins are not arriving.
    alarms = Alarms()
    pub, outbox, config = gate(broker, on_alarm=alarms)
    assert pub.wait_connected(5)
    outbox.append(event)
    pub.wake()
    assert alarms.event.wait(5), "no alarm for a check-in nobody received"
    assert alarms.raised[0][0] == "no_subscribers"
    assert pub.wait_drained(5)
    subscribe(config.topic("checkin"))  # the consumer is back: the next check-in clears it
    cleared = threading.Event()
    pub._on_alarm_clear = lambda kind: cleared.set() if kind == "no_subscribers" else None
    outbox.append(event)
    pub.wake()
    assert cleared.wait(5)


def test_the_check_in_window_leaves_room_under_the_brokers_receive_maximum(
    tmp_broker_dir: Path, tmp_path: Path, subscribe: Any
) -> None:
    # mosquitto announces max_inflight_messages as its v5 Receive Maximum. Brokers that
    # enforce it (HiveMQ: 10) close the connection when it is exceeded, and availability,
    # status and the Home Assistant configs count too.
    from scanner.gate.telemetry import ha_discovery

    with LocalBroker(tmp_broker_dir, extra_config="max_inflight_messages 10") as small:
        base = publisher_config(small, tmp_path)
        config = dataclasses.replace(
            base, homeassistant=dataclasses.replace(base.homeassistant, enabled=True)
        )
        sub = subscribe(config.topic("checkin"), on=small)
        outbox = Outbox(tmp_path / "o.db", max_events=100)
        for _ in range(30):
            outbox.append(event)
        pub = Publisher(config, outbox, status=lambda: {}).start()
        try:
            assert sub.wait_for(lambda msgs: len(msgs) >= 30, timeout=10), seqs(sub, config.topic("checkin"))
            discovery = len(ha_discovery(config, "test"))
            assert pub._window == max(1, 10 - 4 - discovery)
            assert pub.reconnects == 0
        finally:
            pub.stop(timeout=2.0)
            outbox.close()


def test_collector_mode_resends_soon_what_the_broker_delivered_to_nobody(
    broker: LocalBroker, gate: Any, subscribe: Any
) -> None:
    # After a broker restart without persistence the gate is often back before the collector
    # has resubscribed: the broker PUBACKs those check-ins with 0x10 and drops them. The gate
    # resends in seconds, not after the 30 s ack timeout.
    pub, outbox, config = gate(broker, delivery="collector", ack_timeout_s=30.0)
    assert pub.wait_connected(5)
    for _ in range(3):
        outbox.append(event)
    pub.wake()
    assert wait_until(lambda: "no_subscribers" in pub._active_alarms, 5)
    collector = subscribe(config.topic("checkin"))  # the collector is back
    started = time.monotonic()
    topic = config.topic("checkin")
    # A seq published after the subscription may arrive before the resend: at least once.
    assert collector.wait_for(
        lambda msgs: {json.loads(m.payload)["seq"] for m in msgs} >= {1, 2, 3}, timeout=15
    ), seqs(collector, topic)
    assert time.monotonic() - started < 10  # well before the ack timeout
    assert outbox.depth() == 3  # still waiting for the collector's ack


# --- the collector's ack and the resend clock, white-box (the publisher is not started) ---------


@pytest.fixture
def idle(tmp_path: Path) -> Iterator[tuple[Publisher, Outbox, Alarms]]:
    """A collector-mode publisher that is never started, over an outbox holding seqs 1..5 of
    which 1..5 count as sent: acks and resend decisions are fed to it directly."""
    outbox = Outbox(tmp_path / "o.db", max_events=100)
    for _ in range(5):
        outbox.append(event)
    alarms = Alarms()
    config = publisher_config(LocalBroker(tmp_path / "never-started"), tmp_path, delivery="collector")
    pub = Publisher(config, outbox, status=lambda: {}, on_alarm=alarms, ack_timeout_s=30.0)
    pub._highest_sent = 5
    pub._cursor = 5
    try:
        yield pub, outbox, alarms
    finally:
        outbox.close()


def left(outbox: Outbox) -> list[int]:
    return [seq for seq, _ in outbox.pending()]


def stalled(pub: Publisher, seconds: float) -> None:
    """As if the last ack (or resend) was ``seconds`` ago."""
    pub._last_ack_progress = time.monotonic() - seconds


def test_an_ack_removes_exactly_what_it_names(idle: tuple[Publisher, Outbox, Alarms]) -> None:
    pub, outbox, _ = idle
    pub._on_ack(ack(0, [[0, 1]]).encode())  # a range from 0: seqs start at 1
    assert left(outbox) == [2, 3, 4, 5]
    pub._on_ack(ack(2).encode())
    assert left(outbox) == [3, 4, 5]
    pub._on_ack(ack(0, [[3, 3], [5, 5]]).encode())
    assert left(outbox) == [4]


def test_only_an_ack_that_removed_rows_counts_as_progress(idle: tuple[Publisher, Outbox, Alarms]) -> None:
    # Acks that name nothing new (a repeat, upto 0) must not hold back the resend of rows the
    # collector still lacks; one that removed rows restarts both resend clocks.
    pub, outbox, _ = idle
    pub._resend_after_s, pub._unheard_resend_s = 240.0, 16.0
    stalled(pub, 100)
    pub._on_ack(ack(0).encode())
    pub._on_ack(ack(0, [[9, 9]]).encode())  # beyond what was sent: nothing to remove
    assert time.monotonic() - pub._last_ack_progress >= 100
    assert (pub._resend_after_s, pub._unheard_resend_s) == (240.0, 16.0)
    # Row 1 by upto, 3 by a range, and a last range naming what is already gone: as many
    # rows by ranges as by upto, so a count that subtracted them would come to 0.
    pub._on_ack(ack(1, [[3, 3], [1, 1]]).encode())
    assert time.monotonic() - pub._last_ack_progress < 10
    assert (pub._resend_after_s, pub._unheard_resend_s) == (30.0, 2.0)
    assert left(outbox) == [2, 4, 5]


@pytest.mark.parametrize(
    ("upto", "ranges", "warned"),
    [(5, [], False), (0, [[4, 5]], False), (6, [], True), (2, [[4, 6]], True), (9, [[1, 2]], True)],
)
def test_an_ack_beyond_what_was_sent_is_logged(
    idle: tuple[Publisher, Outbox, Alarms], caplog: pytest.LogCaptureFixture, upto, ranges, warned
) -> None:
    pub, _, _ = idle
    with caplog.at_level("WARNING", logger="scanner.gate.publisher"):
        pub._on_ack(ack(upto, ranges).encode())
    assert ("this gate has sent only up to 5" in caplog.text) is warned, caplog.text


def test_an_ack_the_outbox_cannot_act_on_raises_the_outbox_alarm(
    idle: tuple[Publisher, Outbox, Alarms],
) -> None:
    pub, outbox, alarms = idle
    outbox.close()
    pub._on_ack(ack(2).encode())
    assert alarms.raised == [("outbox_error", "closed")]


def test_one_unacked_row_is_sent_again_when_acks_stall(idle: tuple[Publisher, Outbox, Alarms]) -> None:
    pub, outbox, _ = idle
    outbox.remove_upto(4)  # the collector has 1..4; 5 was sent last and is the only one waiting
    stalled(pub, 29)
    assert pub._collector_may_send() and pub._cursor == 5  # not yet
    stalled(pub, 31)
    assert pub._collector_may_send() and pub._cursor == 4  # from seq 5 again
    assert pub._resend_after_s == 60.0  # the collector stays silent: the next wait doubles


def test_a_resend_for_check_ins_nobody_heard_comes_soon_and_once(
    idle: tuple[Publisher, Outbox, Alarms],
) -> None:
    # The broker said "no subscriber" for some: resend after 2 s, not 30; then that shortcut is
    # spent, and its own wait doubles for the next time it is needed.
    pub, _, _ = idle
    pub._dropped_unheard = True
    stalled(pub, 2.5)
    assert pub._collector_may_send() and pub._cursor == 0
    assert pub._unheard_resend_s == 4.0 and pub._resend_after_s == 30.0
    pub._cursor = 5
    stalled(pub, 5)  # past 4 s, short of 30 s: only another "no subscriber" would resend now
    assert pub._collector_may_send() and pub._cursor == 5
    pub._dropped_unheard = True
    assert pub._collector_may_send() and pub._cursor == 0
    assert pub._unheard_resend_s == 8.0


def test_rows_the_outbox_cannot_remove_raise_the_outbox_alarm(idle: tuple[Publisher, Outbox, Alarms]) -> None:
    pub, outbox, alarms = idle
    outbox.close()
    pub._remove([1, 2])  # PUBACKed in broker mode: the rows stay (a duplicate later, not a loss)
    assert alarms.raised == [("outbox_error", "closed")]


def test_a_check_in_that_can_never_be_published_is_an_alarm(idle: tuple[Publisher, Outbox, Alarms]) -> None:
    # Over MQTT's 256 MiB limit: paho refuses it outright. Operators must hear of it.
    pub, _, alarms = idle
    pub._publish_row(7, bytes(268_435_456))
    assert alarms.raised == [("publish_failed", "seq 7 cannot be published: Payload too large.")]
    assert pub._inflight == {}


def test_a_gate_runs_at_most_unacked_max_events_ahead_of_the_collector(
    idle: tuple[Publisher, Outbox, Alarms], monkeypatch: pytest.MonkeyPatch
) -> None:
    from scanner.gate import publisher

    pub, _, _ = idle
    monkeypatch.setattr(publisher, "UNACKED_MAX", 5)  # five rows (1..5) stand for 5000
    stalled(pub, 0)
    pub._cursor = 4  # 1..4 sent, none acked: one more may go
    assert pub._collector_may_send()
    pub._cursor = 5  # 1..5 sent: the window is full until the collector acks
    stalled(pub, 0)
    assert not pub._collector_may_send()


def test_check_ins_are_never_retained(broker: LocalBroker, gate: Any, subscribe: Any) -> None:
    # A retained check-in would be handed to every later subscriber as if it had just happened.
    pub, outbox, config = gate(broker)
    live = subscribe(config.topic("checkin"))
    assert pub.wait_connected(5)
    outbox.append(event)
    pub.wake()
    assert live.wait_for(lambda msgs: len(msgs) == 1)
    assert pub.wait_drained(5)
    # One SUBSCRIBE for both: the broker hands over retained messages filter by filter, so once
    # the (retained) status is here, a retained check-in would have come before it.
    late = subscribe(config.topic("checkin"), config.topic("status"))
    assert late.wait_for(lambda msgs: any(m.topic == config.topic("status") for m in msgs))
    assert late.payloads(config.topic("checkin")) == []


def test_refused_check_ins_back_off_doubling_to_a_minute_and_start_over_after_a_success(
    idle: tuple[Publisher, Outbox, Alarms],
) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    pub, _, alarms = idle
    refused = ReasonCode(PacketTypes.PUBACK, "Not authorized")
    holds = []
    for mid in range(1, 9):
        pub._inflight[mid] = mid
        pub._hold_until = 0.0  # the previous hold is over: this refusal starts the next one
        pub._on_puback(mid, refused, [])
        holds.append(round(pub._hold_until - time.monotonic()))
    assert holds == [1, 2, 4, 8, 16, 32, 60, 60]
    assert pub._refused == set(range(1, 9))  # kept for a retry, never removed
    assert {kind for kind, _ in alarms.raised} == {"publish_refused"}
    pub._inflight[9] = 9
    pub._on_puback(9, ReasonCode(PacketTypes.PUBACK, "Success"), [])
    assert pub._backoff == 1.0


def test_an_unheard_check_in_raises_no_subscribers_once(idle: tuple[Publisher, Outbox, Alarms]) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    pub, _, alarms = idle
    unheard = ReasonCode(PacketTypes.PUBACK, "No matching subscribers")
    for mid in (1, 2, 3):
        pub._inflight[mid] = mid
        pub._on_puback(mid, unheard, [])
    where, topic = pub._where, pub._t_checkin
    assert alarms.raised == [
        ("no_subscribers", f"broker {where}: no subscriber for {topic}, check-ins dropped there")
    ]


def test_pubacks_for_what_is_not_a_check_in_are_ignored(idle: tuple[Publisher, Outbox, Alarms]) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    pub, _, alarms = idle
    ok = ReasonCode(PacketTypes.PUBACK, "Success")
    removable: list[int] = []
    pub._on_puback(42, ok, removable)  # status, availability, a reply: no row behind it
    pub._offline_mid = 7
    pub._on_puback(7, ok, removable)  # the stop's "offline": the stop waits for exactly this
    assert pub._offline_mid is None and removable == [] and alarms.raised == []


def test_an_ack_up_to_the_first_seq_removes_it(idle: tuple[Publisher, Outbox, Alarms]) -> None:
    pub, outbox, _ = idle
    pub._on_ack(ack(1).encode())
    assert left(outbox) == [2, 3, 4, 5]


def test_an_outbox_that_cannot_be_read_is_never_reported_drained(
    idle: tuple[Publisher, Outbox, Alarms],
) -> None:
    # The stop path asks before it gives up on delivery: a broken outbox must not say "all sent".
    pub, outbox, _ = idle
    outbox.close()
    assert not pub.wait_drained(0.1)


def test_a_refused_occupancy_counter_is_logged_once_and_a_success_not_at_all(
    idle: tuple[Publisher, Outbox, Alarms], caplog: pytest.LogCaptureFixture
) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    pub, _, alarms = idle
    caplog.set_level(logging.ERROR, logger="scanner.gate.publisher")
    ok = ReasonCode(PacketTypes.PUBACK, "Success")
    refused = ReasonCode(PacketTypes.PUBACK, "Not authorized")
    pub._counter_mid = 3
    pub._on_puback(3, ok, [])
    assert pub._counter_mid is None and not caplog.records
    for mid in (4, 5):
        pub._counter_mid = mid
        pub._on_puback(mid, refused, [])
        assert pub._counter_mid is None
    assert [r.getMessage().split(": ")[0] for r in caplog.records] == [
        f"broker {pub._where} refused this gate's occupancy counter on {pub._t_occupancy}"
    ]
    assert alarms.raised == []  # a counter is not a check-in: no publish_refused alarm


@dataclasses.dataclass
class _Info:
    mid: int
    rc: int = 0


class RecordingClient:
    """paho's publish as the publisher uses it: the seqs of the check-ins handed to it, in order."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, **_kw: Any) -> _Info:
        self.sent.append(json.loads(payload)["seq"])
        return _Info(mid=len(self.sent) + 100)


def online_to(pub: Publisher) -> RecordingClient:
    """The idle publisher as if connected, handing its check-ins to a RecordingClient."""
    client = RecordingClient()
    pub._client = client  # type: ignore[assignment]
    pub._online = True
    return client


def test_nothing_is_handed_to_paho_while_offline_or_in_a_refusal_backoff(
    idle: tuple[Publisher, Outbox, Alarms],
) -> None:
    pub, _, _ = idle
    client = online_to(pub)
    pub._cursor, pub._highest_sent = 0, 0  # nothing sent yet
    pub._online = False
    pub._fill()
    assert client.sent == []
    pub._online = True
    pub._hold_until = time.monotonic() + 60  # the broker refused a check-in: back off first
    pub._fill()
    assert client.sent == []
    pub._hold_until = 0.0
    pub._fill()
    assert client.sent == [1, 2, 3, 4, 5]


def test_after_a_backoff_each_refused_check_in_still_waiting_is_sent_again(
    idle: tuple[Publisher, Outbox, Alarms],
) -> None:
    pub, outbox, _ = idle
    client = online_to(pub)
    outbox.remove([3])  # acked meanwhile by the collector: not sent again
    pub._refused = {2, 3, 4}
    pub._fill()
    assert client.sent == [2, 4]
    assert pub._refused == set() and sorted(pub._inflight.values()) == [2, 4]


def test_wait_drained_waits_its_whole_timeout_for_rows_that_go_late(
    idle: tuple[Publisher, Outbox, Alarms],
) -> None:
    # Nobody notifies here (the rows go behind the publisher's back): the bounded slices of the
    # wait must still see it, and the wait must not give up before its timeout.
    pub, outbox, _ = idle
    remover = threading.Timer(1.2, outbox.remove_upto, args=(5,))
    remover.start()
    try:
        started = time.monotonic()
        assert pub.wait_drained(2.5)
        assert 1.2 <= time.monotonic() - started < 2.5
    finally:
        remover.join()
    outbox.append(event)
    started = time.monotonic()
    assert not pub.wait_drained(0.3)  # a row that stays: False once the timeout is over, not before
    assert time.monotonic() - started >= 0.3


def test_fill_keeps_at_most_the_window_in_flight(idle: tuple[Publisher, Outbox, Alarms]) -> None:
    # The window stays under the broker's Receive Maximum: one more and the broker may close
    # the connection (0x93), so it is exact, not approximate.
    pub, _, _ = idle
    client = online_to(pub)
    pub._cursor, pub._highest_sent, pub._window = 0, 0, 2
    pub._fill()
    assert client.sent == [1, 2]
    pub._inflight.pop(min(pub._inflight))  # seq 1 acknowledged by the broker
    pub._fill()
    assert client.sent == [1, 2, 3] and len(pub._inflight) == 2


def test_an_outbox_error_in_fill_is_one_alarm_a_pause_and_cleared_by_the_next_good_fill(
    idle: tuple[Publisher, Outbox, Alarms],
) -> None:
    pub, outbox, alarms = idle
    cleared: list[str] = []
    pub._on_alarm_clear = cleared.append
    client = online_to(pub)
    real_pending = outbox.pending

    def failing(*_a: Any, **_kw: Any) -> list[tuple[int, bytes]]:
        raise OutboxError("disk I/O error")

    outbox.pending = failing  # type: ignore[method-assign]
    pub._fill()
    assert alarms.raised == [("outbox_error", "disk I/O error")]
    assert pub._hold_until - time.monotonic() > 0.5  # not straight back at a failing disk
    pub._fill()  # inside the pause: nothing tried, nothing said again
    assert alarms.raised == [("outbox_error", "disk I/O error")]
    outbox.pending = real_pending  # type: ignore[method-assign]
    pub._hold_until = 0.0
    pub._fill()  # the disk is back; nothing new to send
    assert client.sent == [] and cleared == ["outbox_error"] and pub._outbox_failing is False
