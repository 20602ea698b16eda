"""The collector against a real mosquitto, the real gate publisher and both stores.

Pass criterion throughout: every event the gate committed is stored exactly once, and the
gate's outbox empties only through the collector's acks.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from scanner import events
from scanner.collector import Collector, DeviceSeqs, InvalidEvent, parse_event
from scanner.config import Config, from_table
from scanner.localbroker import LocalBroker
from scanner.models import CheckinEvent
from scanner.mqtt import Publisher
from scanner.outbox import Outbox
from scanner.outboxbench import fill_outbox
from scanner.store import Store, StoredEvent, open_store
from tests import pg
from tests.conftest import unique_name
from tests.mqtt_helpers import Subscriber, wait_until

SITE = "site-1"
STORES = ["sqlite", "postgresql"]


@pytest.fixture(params=STORES)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return pg.store_url(request.param, tmp_path)


def gate_config(tmp_path: Path, broker: LocalBroker, prefix: str, device: str = "gate-a") -> Config:
    (tmp_path / device).mkdir(exist_ok=True)
    return from_table(
        {
            "device": {"id": device, "site": SITE},
            "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": prefix},
            "storage": {"dir": str(tmp_path / device), "delivery": "collector"},
        }
    )


def collector_table(broker: LocalBroker, prefix: str, url: str, name: str) -> dict:
    return {
        "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": prefix},
        "collector": {"store": url, "name": name},
        "daemon": {"log_level": "info"},
    }


def collector_config(broker: LocalBroker, prefix: str, url: str, name: str = "c1") -> Config:
    table = collector_table(broker, prefix, url, name)
    return from_table({"device": {"id": "collector", "site": "central"}, **table})


class Gate:
    """The real gate side: Outbox + Publisher with delivery = "collector"."""

    def __init__(self, config: Config, backlog: int = 0) -> None:
        path = config.storage.dir / "outbox.db"
        if backlog:
            fill_outbox(path, backlog, device=config.device.id, site=config.device.site)
        self.config = config
        self.outbox = Outbox(path, config.storage.outbox_max_events)
        self.publisher = Publisher(config, self.outbox, status=lambda: {"test": True})

    def start(self) -> Gate:
        self.publisher.start()
        assert self.publisher.wait_connected(10)
        return self

    def close(self) -> None:
        self.publisher.stop()
        self.outbox.close()


@pytest.fixture
def gates() -> Iterator[list[Gate]]:
    made: list[Gate] = []
    yield made
    for gate in made:
        gate.close()


def stored_seqs(url: str, device: str, site: str = SITE) -> list[int]:
    store = open_store(url)
    try:
        return store.seqs_between(site, device, 1, 2**62)
    finally:
        store.close()


def assert_stored_once(url: str, device: str, n: int) -> None:
    seqs = stored_seqs(url, device)
    # One row per event_id (the primary key); one event per seq: each stored exactly once.
    assert seqs == list(range(1, n + 1)), f"{len(seqs)} rows, first missing/duplicate near {_first_bad(seqs)}"


def _first_bad(seqs: list[int]) -> int | None:
    return next((i + 1 for i, s in enumerate(seqs) if s != i + 1), None)


# --- pure parts ----------------------------------------------------------------------------


def test_device_seqs_tracks_contiguous_and_ranges():
    state = DeviceSeqs()
    state.add([1, 2, 4])
    assert (state.contiguous, state.ranges) == (2, [(4, 4)])
    assert state.holes() == [(3, 3)] and state.missing == 1
    assert state.ack() == {"schema": "gate-scanner/ack/1", "upto": 2, "ranges": [[4, 4]]}
    state.add([7, 6, 9, 2])
    assert state.ranges == [(4, 4), (6, 7), (9, 9)] and state.missing == 3
    state.add([3, 5, 8])
    assert (state.contiguous, state.ranges) == (9, [])
    many = DeviceSeqs()
    many.add(range(2, 200, 2))  # 1 never arrives: 99 separate ranges
    assert len(many.ack()["ranges"]) == 32 and many.ack()["upto"] == 0


def _event(**changes: object) -> dict:
    event = CheckinEvent(
        event_id=events.Uuid7().new(),
        seq=1,
        device="gate-a",
        site=SITE,
        direction="in",
        ts="2026-11-29T08:00:00.000Z",
        clock_synced=True,
        decision="accepted",
        reason="ok",
        credential_type="plain",
        subject="0" * 32,
    )
    doc = json.loads(events.to_json(event))
    doc.update(changes)
    return doc


TOPIC = f"gate/{SITE}/gate-a/checkin"


@pytest.mark.parametrize(
    "payload, topic",
    [
        (b"not json", TOPIC),
        (b"[1, 2]", TOPIC),
        (json.dumps(_event(schema="gate-scanner/checkin/0")).encode(), TOPIC),
        (json.dumps(_event(seq=0)).encode(), TOPIC),
        (json.dumps(_event(seq="1")).encode(), TOPIC),
        (json.dumps(_event(event_id="x")).encode(), TOPIC),
        (json.dumps(_event(ts="yesterday")).encode(), TOPIC),
        (json.dumps(_event(credential={"type": "plain", "subject": "079123456789"})).encode(), TOPIC),
        (json.dumps(_event()).encode(), f"gate/{SITE}/gate-b/checkin"),  # speaks for another gate
        (b"\xff\xfe", TOPIC),
    ],
)
def test_invalid_events_are_refused_without_echoing_the_payload(payload: bytes, topic: str):
    with pytest.raises(InvalidEvent) as info:
        parse_event(topic, payload, "gate")
    assert "079123456789" not in str(info.value)


def test_a_gate_event_parses():
    event = parse_event(TOPIC, json.dumps(_event(seq=7)).encode(), "gate")
    assert (event.device, event.site, event.seq, event.subject) == ("gate-a", SITE, 7, "0" * 32)
    # Credential types come from the shipped schema (an operator's remote open is one).
    remote_open = _event(credential={"type": "operator", "issuer": "op-1"})
    assert parse_event(TOPIC, json.dumps(remote_open).encode(), "gate").credential_type == "operator"
    with pytest.raises(InvalidEvent):
        parse_event(TOPIC, json.dumps(_event(credential={"type": "bogus"})).encode(), "gate")


@pytest.mark.parametrize("kind", STORES)
def test_store_is_idempotent_and_recomputes_islands(kind: str, tmp_path: Path):
    store: Store = open_store(pg.store_url(kind, tmp_path))
    try:
        batch = [_stored(seq) for seq in (1, 2, 4)]
        assert store.insert_batch(batch) == 3
        assert store.insert_batch(batch[:2]) == 0  # resends are no-ops
        assert store.islands() == {(SITE, "gate-a"): [(1, 2), (4, 4)]}
        assert store.count() == 3
    finally:
        store.close()
    if kind == "sqlite":
        assert (tmp_path / "collector.db").stat().st_mode & 0o777 == 0o600


def _stored(seq: int, device: str = "gate-a") -> StoredEvent:
    doc = _event(seq=seq, device=device)
    return parse_event(f"gate/{SITE}/{device}/checkin", json.dumps(doc).encode(), "gate")


# --- with a broker, the gate publisher and the collector -----------------------------------


def test_outbox_empties_only_through_acks(broker: LocalBroker, url: str, tmp_path: Path, gates, subscribe):
    prefix = unique_name("t")
    n = 400
    ccfg = collector_config(broker, prefix, url)
    # First start leaves a persistent session (queued for while the collector is down).
    store = open_store(url)
    collector = Collector(ccfg, store).start()
    assert collector.wait_subscribed(10)
    collector.stop()
    store.close()

    sub = subscribe(f"{prefix}/+/+/checkin")
    gate = Gate(gate_config(tmp_path, broker, prefix), backlog=n).start()
    gates.append(gate)
    assert wait_until(lambda: len({json.loads(p)["seq"] for p in sub.payloads()}) >= n, 30)
    # The broker has PUBACKed every event, yet the gate keeps them all: no collector ack yet.
    assert gate.outbox.depth() == n

    store = open_store(url)
    with Collector(ccfg, store) as collector:
        assert wait_until(lambda: gate.outbox.depth() == 0, 30), gate.outbox.depth()
        assert collector.stats()["stored"] == n
    store.close()
    assert_stored_once(url, "gate-a", n)


def _spawn_collector(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "scanner", "collect", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def test_collector_killed_mid_burst_then_broker_restarted(url: str, tmp_path: Path, gates):
    """SIGKILL the collector during a burst and start it again; then, with the collector
    down, commit more events and restart the (non-persistent) broker, losing what it had
    queued for the collector: only the gate's resend after reconnecting can deliver those.
    Every event is stored exactly once."""
    n, more = 3000, 40
    prefix = unique_name("t")
    # mosquitto keeps at most max_queued_messages (default 1000) for an offline client and
    # drops the rest; a collector deployment sizes it for the longest collector outage. With
    # the default, the dropped events wait at the gate until it reconnects (see the report
    # on issue 6: the gate does not yet resend without a reconnect).
    with LocalBroker(tmp_path / "own-broker", extra_config="max_queued_messages 100000") as broker:
        cfg_path = tmp_path / "collector.toml"
        cfg_path.write_text(_toml(collector_table(broker, prefix, url, "killed")))
        log = tmp_path / "collector.log"
        proc = _spawn_collector(cfg_path, log)
        try:
            assert wait_until(lambda: _connected(log), 20), log.read_text()
            gate = Gate(gate_config(tmp_path, broker, prefix), backlog=n).start()
            gates.append(gate)
            assert wait_until(lambda: len(stored_seqs(url, "gate-a")) >= 200, 30), log.read_text()
            _kill(proc)  # mid-burst on this machine; on a much faster one, just after it
            proc = _spawn_collector(cfg_path, log)
            assert wait_until(lambda: gate.outbox.depth() == 0, 60), (
                gate.outbox.depth(),
                log.read_text()[-3000:],
            )
            _kill(proc)

            with Subscriber(broker, f"{prefix}/+/+/checkin") as sub:
                for _ in range(more):
                    gate.outbox.append(_build)
                gate.publisher.wake()
                assert sub.wait_for(lambda msgs: len(msgs) >= more, 20)
            assert gate.outbox.depth() == more  # PUBACKed by the broker, acked by nobody
            broker.restart()  # persistence off: what it queued for the collector is gone
            proc = _spawn_collector(cfg_path, log)
            assert wait_until(lambda: gate.outbox.depth() == 0, 60), (
                gate.outbox.depth(),
                log.read_text()[-3000:],
            )
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0, log.read_text()[-3000:]
        finally:
            _kill(proc)
    assert_stored_once(url, "gate-a", n + more)
    assert "received SIGTERM" in log.read_text()


def _build(seq: int, created: str) -> bytes:
    doc = _event(seq=seq, device="gate-a")
    return json.dumps(doc).encode()


def _connected(log: Path) -> bool:
    return "connected to" in log.read_text()


def test_two_collectors_share_the_work_and_store_each_event_once(
    broker: LocalBroker, url: str, tmp_path: Path, gates
):
    prefix = unique_name("t")
    n = 1500
    stores = [open_store(url), open_store(url)]
    collectors = [
        Collector(collector_config(broker, prefix, url, name), s)
        for name, s in zip("ab", stores, strict=True)
    ]
    try:
        for c in collectors:
            c.start()
            assert c.wait_subscribed(10)
        first = Gate(gate_config(tmp_path, broker, prefix, "gate-a"), backlog=n).start()
        second = Gate(gate_config(tmp_path, broker, prefix, "gate-b"), backlog=n // 3).start()
        gates += [first, second]
        assert wait_until(lambda: first.outbox.depth() == 0 and second.outbox.depth() == 0, 60), (
            first.outbox.depth(),
            second.outbox.depth(),
        )
        shares = [c.stats()["stored"] for c in collectors]
    finally:
        for c in collectors:
            c.stop()
        for s in stores:
            s.close()
    assert_stored_once(url, "gate-a", n)
    assert stored_seqs(url, "gate-b") == list(range(1, n // 3 + 1))
    assert sum(shares) == n + n // 3
    assert all(s > 0 for s in shares), f"the shared subscription gave one collector nothing: {shares}"


def test_gaps_invalid_payloads_and_duplicates(broker: LocalBroker, url: str, subscribe):
    prefix = unique_name("t")
    base = f"{prefix}/{SITE}"
    store = open_store(url)
    collector = Collector(collector_config(broker, prefix, url, "gaps"), store).start()
    try:
        assert collector.wait_subscribed(10)
        sub = subscribe(f"{base}/+/ack", f"{prefix}/collector/gaps/status")
        docs = {seq: _event(seq=seq, device="dev") for seq in (1, 2, 3, 4)}
        for seq in (1, 2, 4):
            sub.publish(f"{base}/dev/checkin", json.dumps(docs[seq]))
        want = {"schema": "gate-scanner/ack/1", "upto": 2, "ranges": [[4, 4]]}
        assert sub.wait_for(lambda _m: want in acks(sub, "dev"), 10), acks(sub, "dev")
        assert sub.wait_for(lambda _m: _status_gaps(sub, prefix, "dev") == (2, 1, 1), 10)

        # Invalid payloads: counted, never stored, never acknowledged.
        bad = [
            b"{",
            json.dumps(_event(seq=1, device="bad", schema="x")),
            json.dumps(_event(seq="2", device="bad")),
        ]
        for payload in bad:
            sub.publish(f"{base}/bad/checkin", payload)
        assert wait_until(lambda: collector.stats()["invalid"] == 3, 10)

        # A resend of seq 1 (same event_id) is a no-op; seq 3 closes the gap.
        sub.publish(f"{base}/dev/checkin", json.dumps(docs[1]))
        sub.publish(f"{base}/dev/checkin", json.dumps(docs[3]))
        done = {"schema": "gate-scanner/ack/1", "upto": 4, "ranges": []}
        assert sub.wait_for(lambda _m: done in acks(sub, "dev"), 10), acks(sub, "dev")
        assert sub.wait_for(lambda _m: _status_gaps(sub, prefix, "dev") == (4, 0, 0), 10)
        stats = collector.stats()
    finally:
        collector.stop()
        store.close()
    # The collector's acks for "dev" went out after the invalid ones were handled: in order.
    assert acks(sub, "bad") == []
    assert stats["duplicates"] == 1 and stats["stored"] == 4
    assert stored_seqs(url, "dev") == [1, 2, 3, 4] and stored_seqs(url, "bad") == []


def acks(sub: Subscriber, device: str) -> list[dict]:
    return [json.loads(m.payload) for m in list(sub.messages) if m.topic.endswith(f"/{device}/ack")]


def _status_gaps(sub: Subscriber, prefix: str, device: str) -> tuple[int, int, int] | None:
    statuses = [
        json.loads(m.payload) for m in list(sub.messages) if m.topic == f"{prefix}/collector/gaps/status"
    ]
    for status in reversed(statuses):
        for d in status.get("devices", []):
            if d["device"] == device:
                return d["contiguous"], d["gaps"], d["missing"]
    return None


def test_collect_refuses_a_bad_config(tmp_path: Path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[collector]\nname = "has space"\nbogus = 1\n')
    result = subprocess.run(
        [sys.executable, "-m", "scanner", "collect", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "collector.name" in result.stderr and "collector.bogus: unknown key" in result.stderr


def _toml(table: dict[str, dict]) -> str:
    lines = []
    for section, values in table.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"
