"""The shipped central-broker setup: deploy/mosquitto/gate-scanner.conf with `scanner.fleet.pki` certs
and the dynamic-security rules `pki dynsec` writes from them.

mosquitto runs with the shipped configuration file itself; the test only rewrites the
listener port and the file paths into a temp dir (text substitution of those lines, each
checked to have matched once), so the TLS and access settings under test are the shipped ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from scanner.bench.outbox import fill_outbox
from scanner.central.collector import Collector, client_id, retire
from scanner.central.store import open_store
from scanner.config import Config, from_table
from scanner.fleet import pki
from scanner.gate.occupancy import Occupancy
from scanner.gate.outbox import Outbox
from scanner.gate.publisher import Inbound, Publisher
from scanner.sim.localbroker import LocalBroker
from tests.helpers import REPO, seed_devices
from tests.mqtt_helpers import wait_until

SHIPPED_CONF = REPO / "deploy" / "mosquitto" / "gate-scanner.conf"
NOT_AUTHORIZED = 0x87
SITE = "site-a"
Rules = dict[str, Any]


class DeployedBroker(LocalBroker):
    """LocalBroker's process handling, but the configuration is the shipped file."""

    def __init__(
        self,
        workdir: Path,
        certs: Path,
        *,
        edit_rules: Callable[[Rules], None] | None = None,
        server_certs: Path | None = None,
        crl: bool = False,
    ) -> None:
        super().__init__(workdir)
        self.certs = certs
        self.server_certs = server_certs or certs
        self.crl = crl
        self.edit_rules = edit_rules

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # As an operator makes them: `gate-scanner pki dynsec` over the fleet's PKI directory.
        rules = self.workdir / "dynamic-security.json"
        pki.write_dynsec(self.certs, rules, prefix="gate")
        if self.edit_rules is not None:
            doc = json.loads(rules.read_text())
            self.edit_rules(doc)
            rules.write_text(json.dumps(doc))
        (self.workdir / "data").mkdir(exist_ok=True)
        text = SHIPPED_CONF.read_text()
        plugin = re.search(r"^plugin (\S+)$", text, flags=re.M)
        assert plugin and Path(plugin[1]).is_file(), f"the shipped plugin line names no file here: {plugin}"
        for directive, value in {
            "pid_file": self.workdir / "mosquitto.pid",
            "listener": f"{self.port} {self.host}",
            "cafile": self.certs / "ca.crt",
            "certfile": self.server_certs / "server" / "localhost.crt",
            "keyfile": self.server_certs / "server" / "localhost.key",
            "plugin_opt_config_file": rules,
            "persistence_location": f"{self.workdir / 'data'}/",
            "log_dest": f"file {self.log_path}",
        }.items():
            text, n = re.subn(rf"^{directive} .*$", f"{directive} {value}", text, flags=re.M)
            assert n == 1, f"{directive}: expected exactly one line in {SHIPPED_CONF}, found {n}"
        if self.crl:  # the shipped, commented-out line, switched on
            text, n = re.subn(r"^#crlfile .*$", f"crlfile {self.certs / 'crl.pem'}", text, flags=re.M)
            assert n == 1
        if os.geteuid() == 0:
            text += "user root\n"  # else mosquitto drops to user mosquitto: no access to tmp
        self.config_path.write_text(text)
        return self.config_path


# --- certificates ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fleet") / "pki"
    pki.init_ca(root, days=2)
    pki.issue_server(root, "localhost", ips=("127.0.0.1",), days=2)
    for gate in ("gate-01", "gate-02", "gate-03"):
        pki.issue_client(root, "device", gate, site=SITE, days=2)
    pki.issue_client(root, "device", "gate-09", site="site-b", days=2)
    for name in ("operator", "operator-2"):
        pki.issue_client(root, "operator", name, days=2)
    for name in ("collector", "collector-2"):
        pki.issue_client(root, "collector", name, days=2)
    return root


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA with a server certificate for the same name and a client cert CN=gate-01."""
    root = tmp_path_factory.mktemp("rogue") / "pki"
    pki.init_ca(root, name="not the fleet CA", days=2)
    pki.issue_server(root, "localhost", ips=("127.0.0.1",), days=2)
    pki.issue_client(root, "device", "gate-01", site=SITE, days=2)
    return root


@pytest.fixture(scope="module")
def central(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[DeployedBroker]:
    b = DeployedBroker(tmp_path_factory.mktemp("central"), certs)
    b.start()
    try:
        yield b
    finally:
        b.stop()


def test_pki_writes_private_keys_0600_and_never_overwrites(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    pki.init_ca(root, days=2)
    issued = pki.issue_client(root, "device", "gate-07", site="market-north", days=2)
    for key in (root / "ca.key", issued.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gate-07"
    assert pki.site_of(cert) == "market-north"
    key_before = issued.key.read_bytes()
    with pytest.raises(pki.PkiError, match="not overwriting"):
        pki.issue_client(root, "device", "gate-07", site="market-north", days=2)
    with pytest.raises(pki.PkiError, match="not overwriting"):
        pki.init_ca(root)
    renewed = pki.issue_client(root, "device", "gate-07", days=2, renew=True)
    assert not renewed.key_created and issued.key.read_bytes() == key_before
    renewed_cert = x509.load_pem_x509_certificate(renewed.cert.read_bytes())
    assert renewed_cert.serial_number != cert.serial_number
    assert pki.site_of(renewed_cert) == "market-north"  # kept: the gate has not moved
    moved = pki.issue_client(root, "device", "gate-07", site="bus-station", days=2, renew=True)
    assert pki.site_of(x509.load_pem_x509_certificate(moved.cert.read_bytes())) == "bus-station"
    with pytest.raises(pki.PkiError, match="reserved for the collectors"):
        pki.issue_client(root, "device", "gate-08", site="collector", days=2)
    with pytest.raises(pki.PkiError, match="letters, digits"):
        pki.issue_client(root, "device", "gate-08", site="site/+", days=2)
    with pytest.raises(pki.PkiError, match="only a device"):
        pki.issue_client(root, "operator", "alice", site="bus-station", days=2)
    with pytest.raises(pki.PkiError, match="reserved"):
        pki.issue_client(root, "device", "collector", days=2)
    with pytest.raises(pki.PkiError, match="already issued as a device"):
        pki.issue_client(root, "operator", "gate-07", days=2)
    with pytest.raises(pki.PkiError, match="letters, digits"):
        pki.issue_client(root, "device", "gate/+", days=2)
    server = pki.issue_server(root, "broker.example", ips=("10.0.0.5",), days=2)
    sans = x509.load_pem_x509_certificate(server.cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert sans.value.get_values_for_type(x509.DNSName) == ["broker.example"]
    assert [str(ip) for ip in sans.value.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]


def test_pki_dynsec_writes_the_rules_and_refuses_a_gate_with_no_site(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    pki.init_ca(root, days=2)

    def pki_cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "scanner", "pki", *argv],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )

    refused = pki_cli("device", "--dir", str(root), "--id", "gate-01")
    assert refused.returncode == 1 and "--site is required" in refused.stderr
    assert pki_cli("device", "--dir", str(root), "--id", "gate-01", "--site", "market").returncode == 0
    assert pki_cli("collector", "--dir", str(root), "--id", "collector").returncode == 0
    assert pki_cli("operator", "--dir", str(root), "--id", "alice").returncode == 0
    pki.issue_client(root, "device", "gate-02", days=2)  # as issued before certificates named sites
    out = tmp_path / "dynamic-security.json"
    old = pki_cli("dynsec", "--dir", str(root), "--out", str(out))
    assert old.returncode == 1 and "gate-02" in old.stderr and "--renew" in old.stderr
    assert not out.exists()  # nothing half-written for the broker to load
    assert (
        pki_cli("device", "--dir", str(root), "--id", "gate-02", "--site", "market", "--renew").returncode
        == 0
    )
    pki.revoke(root, "device", "gate-02", crl_days=2)  # revoked: gone from the rules too
    done = pki_cli("dynsec", "--dir", str(root), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "1 gates at 1 sites, 1 collectors, 1 operators" in done.stdout
    rules = json.loads(out.read_text())
    assert {c["username"]: [r["rolename"] for r in c["roles"]] for c in rules["clients"]} == {
        "gate-01": ["gate:gate-01"],
        "collector": ["gate-scanner-collector"],
        "alice": ["gate-scanner-operator"],
    }
    gate = next(r for r in rules["roles"] if r["rolename"] == "gate:gate-01")
    # Every topic the gate may touch is under its own site and id, or its site's occupancy.
    assert all(
        a["topic"].startswith(("gate/market/gate-01/", "gate/market/+/occupancy")) for a in gate["acls"]
    )
    assert rules["defaultACLAccess"] == {
        "publishClientSend": False,
        "publishClientReceive": False,
        "subscribe": False,
        "unsubscribe": True,
    }


# --- MQTT clients ------------------------------------------------------------------------------


class TlsClient:
    """An MQTT v5 client with one identity from the PKI; records messages and PUBACK codes."""

    def __init__(
        self,
        broker: LocalBroker,
        certs: Path,
        identity: str,
        *topics: str,
        username: str | None = None,
        client_id: str | None = None,
        session_expiry_s: int = 0,
        timeout: float = 10.0,
    ) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.suback: list[ReasonCode] = []
        self._cond = threading.Condition()
        self._pubacks: dict[int, ReasonCode] = {}
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._topics = topics
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{identity.replace('/', '-')}-{uuid.uuid4().hex[:6]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.tls_set(
            ca_certs=str(certs / "ca.crt"),
            certfile=str(certs / f"{identity}.crt"),
            keyfile=str(certs / f"{identity}.key"),
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
        if username is not None:
            self.client.username_pw_set(username, "ignored")
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry_s  # > 0: the session outlives the connection
        self.client.connect(
            "localhost", broker.port, keepalive=10, clean_start=session_expiry_s == 0, properties=props
        )
        self.client.loop_start()
        assert self._connected.wait(timeout), f"{identity} not connected:\n{broker.log_tail()}"
        if topics:
            assert self._subscribed.wait(timeout), f"{identity}: no SUBACK"

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            return
        if self._topics:
            client.subscribe([(t, 1) for t in self._topics])
        self._connected.set()

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, rcs: list[ReasonCode], _p: Any) -> None:
        self.suback = list(rcs)
        self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        with self._cond:
            self._pubacks[mid] = rc
            self._cond.notify_all()

    def publish(self, topic: str, payload: bytes | str, timeout: float = 5.0) -> int:
        """Publish at QoS 1; the PUBACK's reason code (0 = accepted, 0x87 = not authorized)."""
        info = self.client.publish(topic, payload, qos=1)
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self._pubacks, timeout), f"no PUBACK for {topic}"
            return int(self._pubacks.pop(info.mid).value)

    def wait_for(self, topic: str, n: int = 1, timeout: float = 10.0) -> list[bytes]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.on(topic)) >= n, timeout)
            return self.on(topic)

    def on(self, topic: str) -> list[bytes]:
        return [bytes(m.payload) for m in self.messages if mqtt.topic_matches_sub(topic, m.topic)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> Iterator[list[TlsClient]]:
    made: list[TlsClient] = []
    yield made
    for c in made:
        c.close()


def gate_table(broker: LocalBroker, certs: Path, tmp_path: Path, device: str = "gate-01") -> dict[str, Any]:
    return {
        "device": {"id": device, "site": SITE},
        "mqtt": {
            "host": "localhost",
            "port": broker.port,
            "keepalive_s": 5,
            "tls": True,
            "ca_file": str(certs / "ca.crt"),
            "cert_file": str(certs / "device" / f"{device}.crt"),
            "key_file": str(certs / "device" / f"{device}.key"),
        },
        "storage": {"dir": str(tmp_path), "delivery": "broker"},
    }


def gate_config(broker: LocalBroker, certs: Path, tmp_path: Path, device: str = "gate-01") -> Config:
    """gate-01's (or ``device``'s) config for the shipped broker: TLS with its fleet certificate."""
    return from_table(gate_table(broker, certs, tmp_path, device))


def checkin(seq: int, created: str) -> bytes:
    return json.dumps({"schema": "gate-scanner/checkin/1", "seq": seq, "device": "gate-01"}).encode()


# --- the gate on the production configuration --------------------------------------------------


def test_gate_publishes_checkins_and_receives_its_commands(
    central: DeployedBroker, certs: Path, tmp_path: Path, clients: list[TlsClient]
) -> None:
    operator = TlsClient(central, certs, "operator/operator", "gate/#")
    clients.append(operator)
    config = gate_config(central, certs, tmp_path)
    outbox = Outbox(tmp_path / "outbox.db", max_events=100)
    commands: queue.SimpleQueue[Inbound] = queue.SimpleQueue()
    pub = Publisher(
        config, outbox, status=lambda: {"schema": "gate-scanner/status/1"}, on_command=commands.put
    ).start()
    try:
        assert pub.wait_subscribed(10), central.log_tail()
        for _ in range(3):
            outbox.append(checkin)
        pub.wake()
        got = operator.wait_for(config.topic("checkin"), 3)
        assert [json.loads(p)["seq"] for p in got] == [1, 2, 3]
        assert pub.wait_drained(5)
        assert operator.wait_for(config.topic("availability")) == [b"online"]

        # A command from the operator reaches the gate on its own cmd/ topic, and its reply
        # reaches the operator.
        assert operator.publish(config.topic("cmd/open"), b'{"nonce": "n1"}') == 0
        command = commands.get(timeout=10)
        assert (command.name, command.payload) == ("open", b'{"nonce": "n1"}')
        pub.publish_reply(config.topic("cmd/open/reply"), b'{"ok": true}')
        assert operator.wait_for(config.topic("cmd/open/reply")) == [b'{"ok": true}']
        # Replies come only from the gate: an operator cannot forge one.
        assert operator.publish(config.topic("cmd/open/reply"), b'{"ok": false}') == NOT_AUTHORIZED
    finally:
        pub.stop(timeout=2.0)
        outbox.close()


def test_gate_cannot_speak_for_another_gate(
    central: DeployedBroker, certs: Path, clients: list[TlsClient]
) -> None:
    # Claiming gate-02's name in CONNECT changes nothing: the identity is the certificate's CN.
    gate = TlsClient(central, certs, "device/gate-01", username="gate-02")
    operator = TlsClient(central, certs, "operator/operator", "gate/#")
    clients += [gate, operator]
    assert gate.publish(f"gate/{SITE}/gate-02/checkin", b"{}") == NOT_AUTHORIZED
    assert gate.publish(f"gate/{SITE}/gate-02/availability", b"offline") == NOT_AUTHORIZED
    assert gate.publish(f"gate/{SITE}/gate-01/cmd/open", b"{}") == NOT_AUTHORIZED  # no self-command
    assert gate.publish(f"gate/{SITE}/gate-01/ack", b"{}") == NOT_AUTHORIZED  # no self-ack
    assert gate.publish(f"gate/{SITE}/gate-02/cmd/open", b"{}") == NOT_AUTHORIZED
    assert gate.publish(f"gate/{SITE}/gate-02/cmd/open/reply", b"{}") == NOT_AUTHORIZED
    assert gate.publish(f"gate/{SITE}/gate-02/ack", b"{}") == NOT_AUTHORIZED
    assert gate.publish("gate/collector/collector/status", b"{}") == NOT_AUTHORIZED
    assert gate.publish(f"gate/{SITE}/gate-01/checkin", b'{"seq": 1}') == 0
    assert operator.wait_for(f"gate/{SITE}/gate-01/checkin") == [b'{"seq": 1}']
    assert operator.on(f"gate/{SITE}/gate-02/#") == []


GRANTED_QOS1 = 1


def test_a_gate_may_subscribe_only_to_its_own_topics(
    central: DeployedBroker, certs: Path, clients: list[TlsClient]
) -> None:
    own = [
        f"gate/{SITE}/gate-01/ack",
        f"gate/{SITE}/gate-01/cmd/+",
        f"gate/{SITE}/gate-01/cmd/selftest/reply",
    ]
    siblings = [f"gate/{SITE}/+/occupancy"]  # the site's shared inside count
    others = [
        "$share/collectors/gate/+/+/checkin",  # the collectors' group: each check-in in turn
        f"$share/collectors/gate/{SITE}/gate-02/checkin",
        f"$share/g/gate/{SITE}/gate-01/cmd/+",  # even its own topics: no group membership at all
        "gate/+/+/checkin",
        "gate/#",
        "#",
        f"gate/{SITE}/gate-02/cmd/+",
        "gate/site-b/+/occupancy",
        f"$share/g/gate/{SITE}/+/occupancy",
    ]
    gate = TlsClient(central, certs, "device/gate-01", *own, *siblings, *others)
    clients.append(gate)
    assert [rc.value for rc in gate.suback] == [GRANTED_QOS1] * (len(own) + len(siblings)) + [
        NOT_AUTHORIZED
    ] * len(others)
    # Operators read everything, but are no collectors either: no group membership.
    operator = TlsClient(
        central, certs, "operator/operator-2", "gate/#", "$share/collectors/gate/+/+/checkin"
    )
    clients.append(operator)
    assert [rc.value for rc in operator.suback] == [GRANTED_QOS1, NOT_AUTHORIZED]


def test_a_gate_certificate_is_bound_to_its_site(
    central: DeployedBroker, certs: Path, clients: list[TlsClient]
) -> None:
    gate = TlsClient(central, certs, "device/gate-01")
    operator = TlsClient(central, certs, "operator/operator", "gate/#")
    clients += [gate, operator]
    # An invented site would be a new (site, device) row in every collector's status, and a
    # check-in "from" a site the gate is not at.
    for site in ("site-b", "x" * 64, "collector"):
        for leaf in ("checkin", "status", "availability", "health", "occupancy"):
            assert gate.publish(f"gate/{site}/gate-01/{leaf}", b"{}") == NOT_AUTHORIZED, (site, leaf)
    assert gate.publish(f"gate/{SITE}/gate-01/occupancy", b"{}") == 0
    # Another site's gate (gate-09 at site-b) reads nothing of site-a's occupancy.
    neighbour = TlsClient(central, certs, "device/gate-09", f"gate/{SITE}/+/occupancy")
    clients.append(neighbour)
    assert [rc.value for rc in neighbour.suback] == [NOT_AUTHORIZED]


def test_collector_reads_checkins_by_shared_subscription_and_acks(
    central: DeployedBroker, certs: Path, clients: list[TlsClient]
) -> None:
    collector = TlsClient(
        central,
        certs,
        "collector/collector",
        "$share/collectors/gate/+/+/checkin",
        "$share/ingest/gate/+/+/checkin",  # another group would split nothing: refused
        "gate/#",
    )
    gate = TlsClient(central, certs, "device/gate-02", f"gate/{SITE}/gate-02/ack")
    clients += [collector, gate]
    assert [rc.value for rc in collector.suback] == [GRANTED_QOS1, NOT_AUTHORIZED, NOT_AUTHORIZED]
    assert gate.publish(f"gate/{SITE}/gate-02/checkin", b'{"seq": 7}') == 0
    assert collector.wait_for("gate/+/+/checkin") == [b'{"seq": 7}']
    ack = json.dumps({"schema": "gate-scanner/ack/1", "upto": 7}).encode()
    assert collector.publish(f"gate/{SITE}/gate-02/ack", ack) == 0
    assert gate.wait_for(f"gate/{SITE}/gate-02/ack") == [ack]
    # Its own status; 0x10 is "no matching subscribers", still accepted.
    assert collector.publish("gate/collector/collector/status", b"{}") in (0, 0x10)
    assert gate.publish("gate/collector/collector/status", b"{}") == NOT_AUTHORIZED
    assert collector.publish(f"gate/{SITE}/gate-02/checkin", b"{}") == NOT_AUTHORIZED
    assert collector.publish(f"gate/{SITE}/gate-02/cmd/open", b"{}") == NOT_AUTHORIZED


def test_refused_checkins_are_kept_and_alarmed(certs: Path, tmp_path: Path) -> None:
    """Deliberately wrong rules (gate-01's checkin grant missing): the denial is detected."""
    granted = {"acltype": "publishClientSend", "topic": f"gate/{SITE}/gate-01/checkin"}

    def drop_checkin_grant(rules: Rules) -> None:
        role = next(r for r in rules["roles"] if r["rolename"] == "gate:gate-01")
        kept = [a for a in role["acls"] if {k: a[k] for k in granted} != granted]
        assert len(kept) == len(role["acls"]) - 1
        role["acls"] = kept

    alarms: list[tuple[str, str]] = []
    raised, cleared = threading.Event(), threading.Event()

    def on_alarm(kind: str, detail: str) -> None:
        alarms.append((kind, detail))
        raised.set()

    with DeployedBroker(tmp_path / "broker", certs, edit_rules=drop_checkin_grant) as broker:
        config = gate_config(broker, certs, tmp_path)
        outbox = Outbox(tmp_path / "outbox.db", max_events=100)
        pub = Publisher(
            config,
            outbox,
            status=lambda: {},
            on_alarm=on_alarm,
            on_alarm_clear=lambda kind: cleared.set() if kind == "publish_refused" else None,
        ).start()
        try:
            assert pub.wait_connected(10), broker.log_tail()
            outbox.append(checkin)
            pub.wake()
            assert raised.wait(5), "no alarm for a refused check-in"
            assert alarms[0][0] == "publish_refused" and "0x87" in alarms[0][1]
            assert [seq for seq, _ in outbox.pending()] == [1]  # kept, not dropped
            broker.edit_rules = None  # the operator fixes the rules and restarts the broker
            broker.restart()
            assert cleared.wait(15), broker.log_tail()
            assert pub.wait_drained(5)
        finally:
            pub.stop(timeout=2.0)
            outbox.close()


# --- who may not connect -----------------------------------------------------------------------

CONNECT_V5 = bytes([0x10, 16, 0, 4, *b"MQTT", 5, 0x02, 0, 10, 0, 0, 3, *b"abc"])


def tls_attempt(port: int, ctx: ssl.SSLContext) -> str:
    """Handshake and send a CONNECT; 'connack' if the broker answered, else why not."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                # With TLS 1.3 the server checks the client certificate after the client's
                # side of the handshake is done: the refusal arrives as an alert on read.
                tls.sendall(CONNECT_V5)
                data = tls.recv(4)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
            return f"refused: {exc}"
    return "connack" if data[:1] == b"\x20" else f"closed: {data!r}"


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def test_only_fleet_certificates_may_connect(central: DeployedBroker, certs: Path, rogue: Path) -> None:
    fleet_ca = certs / "ca.crt"
    ok = client_context(fleet_ca, certs / "device" / "gate-01.crt", certs / "device" / "gate-01.key")
    assert tls_attempt(central.port, ok) == "connack"

    no_cert = tls_attempt(central.port, client_context(fleet_ca))
    assert no_cert.startswith("refused") or no_cert == "closed: b''", no_cert
    assert wait_until(lambda: "peer did not return a certificate" in central.log_tail(50), 5)

    # Same CN as a real gate, signed by another CA.
    other = client_context(fleet_ca, rogue / "device" / "gate-01.crt", rogue / "device" / "gate-01.key")
    impostor = tls_attempt(central.port, other)
    assert impostor.startswith("refused") or impostor == "closed: b''", impostor
    assert wait_until(lambda: "certificate verify failed" in central.log_tail(50), 5), central.log_tail()


def test_gate_refuses_a_broker_certificate_from_another_ca(certs: Path, rogue: Path, tmp_path: Path) -> None:
    # A broker that accepts our gate's certificate but presents one the fleet CA did not sign.
    with DeployedBroker(tmp_path / "broker", certs, server_certs=rogue) as impostor:
        device = certs / "device"
        ctx = client_context(certs / "ca.crt", device / "gate-01.crt", device / "gate-01.key")
        with (
            pytest.raises(ssl.SSLCertVerificationError),
            socket.create_connection(("127.0.0.1", impostor.port), timeout=5) as raw,
        ):
            ctx.wrap_socket(raw, server_hostname="localhost").close()
        outbox = Outbox(tmp_path / "outbox.db", max_events=100)
        outbox.append(checkin)
        alarms: list[tuple[str, str]] = []
        raised = threading.Event()

        def on_alarm(kind: str, detail: str) -> None:
            alarms.append((kind, detail))
            raised.set()

        pub = Publisher(
            gate_config(impostor, certs, tmp_path), outbox, status=lambda: {}, on_alarm=on_alarm
        ).start()
        try:
            assert not pub.wait_connected(2.0)  # no fallback to an unverified connection
            # Said as what it is, not as a dead link: retrying will not fix a wrong CA.
            assert raised.wait(5), "no alarm for a broker certificate the fleet CA did not sign"
            assert alarms[0][0] == "tls_failed"
            assert "certificate verify failed" in alarms[0][1] or "unable to get local issuer" in alarms[0][1]
            assert f"localhost:{impostor.port}" in alarms[0][1]
        finally:
            pub.stop(timeout=1.0)
        assert [kind for kind, _ in alarms] == ["tls_failed"]  # once, not once per retry
        assert [seq for seq, _ in outbox.pending()] == [1]
        outbox.close()
        assert "New client connected" not in impostor.log_tail(200)


def test_revoked_gate_is_refused_and_its_id_can_be_reissued(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    pki.init_ca(root, days=2)
    pki.issue_server(root, "localhost", ips=("127.0.0.1",), days=2)
    pki.issue_client(root, "device", "gate-01", site=SITE, days=2)
    serial = format(
        x509.load_pem_x509_certificate(
            pki.issue_client(root, "device", "gate-02", site=SITE, days=2).cert.read_bytes()
        ).serial_number,
        "x",
    )
    pki.revoke(root, "device", "gate-02", crl_days=2)
    retired = root / "revoked" / f"device-gate-02-{serial}"
    assert not (root / "device" / "gate-02.key").exists()
    with DeployedBroker(tmp_path / "broker", root, crl=True) as broker:
        ca = root / "ca.crt"
        device = root / "device"
        good = client_context(ca, device / "gate-01.crt", device / "gate-01.key")
        assert tls_attempt(broker.port, good) == "connack"
        stolen = client_context(ca, retired.with_suffix(".crt"), retired.with_suffix(".key"))
        result = tls_attempt(broker.port, stolen)
        assert result.startswith("refused") or result == "closed: b''", result
        # mosquitto logs only "certificate verify failed"; the CRL is why (gate-01 gets in).
        assert wait_until(lambda: "certificate verify failed" in broker.log_tail(50), 5), broker.log_tail()
        crl = x509.load_pem_x509_crl((root / "crl.pem").read_bytes())
        assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None
        # The replacement device gets a fresh key under the same id.
        pki.issue_client(root, "device", "gate-02", site=SITE, days=2)
        fresh = client_context(ca, device / "gate-02.crt", device / "gate-02.key")
        assert tls_attempt(broker.port, fresh) == "connack"


def test_monitor_with_the_operator_certificate(
    central: DeployedBroker, certs: Path, tmp_path: Path, clients: list[TlsClient]
) -> None:
    from tests.helpers import MonitorProcess

    operator = certs / "operator"
    config = tmp_path / "operator.toml"
    config.write_text(
        f'[mqtt]\nhost = "localhost"\nport = {central.port}\ntls = true\n'
        f'ca_file = "{certs / "ca.crt"}"\ncert_file = "{operator / "operator.crt"}"\n'
        f'key_file = "{operator / "operator.key"}"\n'
    )
    gate = TlsClient(central, certs, "device/gate-01")
    clients.append(gate)
    site = SITE  # the only site gate-01's certificate may publish under
    mon = MonitorProcess(config, "--site", site, "--count", "1", "--duration", "20", stderr=tmp_path / "err")
    try:
        assert wait_until(lambda: "monitor: watching" in (tmp_path / "err").read_text(), 10)
        # "watching" comes after the SUBACK: the broker routes this to the monitor.
        assert gate.publish(f"gate/{site}/gate-01/availability", b"online") == 0
        mon.until(lambda lines: any(o.get("availability") == "online" for o in lines))
        # A second tool under the same certificate takes the session (the client id is the CN):
        # the monitor says why, and is back once that tool is gone.
        TlsClient(central, certs, "operator/operator").close()
        err = tmp_path / "err"
        assert wait_until(lambda: "monitor: disconnected from" in err.read_text(), 10), err.read_text()
        assert wait_until(lambda: err.read_text().count("monitor: watching") == 2, 10), err.read_text()
        body = {"decision": "accepted", "reason": "ok", "credential": {"type": "plain", "subject": "ab" * 16}}
        assert gate.publish(f"gate/{site}/gate-01/checkin", json.dumps(body)) == 0
        code, rest = mon.finish()
    finally:
        mon.kill()
    assert code == 0, (tmp_path / "err").read_text()
    assert [(o["device"], o["subject"]) for o in rest if o["kind"] == "checkin"] == [("gate-01", "abababab")]


# --- a stolen gate certificate against the collectors ------------------------------------------
# Each on a broker of its own: collectors' persistent sessions must not leak between tests.


@pytest.fixture
def fresh(certs: Path, tmp_path: Path) -> Iterator[DeployedBroker]:
    with DeployedBroker(tmp_path / "broker", certs) as b:
        yield b


def collector_config(broker: LocalBroker, certs: Path, tmp_path: Path, name: str = "collector") -> Config:
    return from_table(
        {
            "device": {"id": "central", "site": "central"},
            "mqtt": {
                "host": "localhost",
                "port": broker.port,
                "tls": True,
                "ca_file": str(certs / "ca.crt"),
                "cert_file": str(certs / "collector" / f"{name}.crt"),
                "key_file": str(certs / "collector" / f"{name}.key"),
            },
            "collector": {"store": f"sqlite:{tmp_path / f'{name}.db'}", "name": name},
        }
    )


@contextlib.contextmanager
def collecting(
    broker: LocalBroker, certs: Path, tmp_path: Path, name: str = "collector"
) -> Iterator[Collector]:
    config = collector_config(broker, certs, tmp_path, name)
    store = open_store(config.collector.store)
    collector = Collector(config, store).start()
    try:
        assert collector.wait_subscribed(10), broker.log_tail()
        yield collector
    finally:
        collector.stop()
        store.close()


@contextlib.contextmanager
def gate_publishing(
    broker: LocalBroker, certs: Path, tmp_path: Path, device: str, n: int, **storage: Any
) -> Iterator[tuple[Publisher, Outbox]]:
    """The real gate publisher with ``n`` check-ins in its outbox."""
    workdir = tmp_path / device
    workdir.mkdir(exist_ok=True)
    table = gate_table(broker, certs, workdir, device)
    table["storage"].update(storage)
    fill_outbox(workdir / "outbox.db", n, device=device, site=SITE)
    outbox = Outbox(workdir / "outbox.db", max_events=100)
    # ack_timeout_s: how soon a gate in delivery = "collector" resends what no collector acked.
    pub = Publisher(from_table(table), outbox, status=lambda: {}, ack_timeout_s=0.5).start()
    try:
        assert pub.wait_connected(10), broker.log_tail()
        yield pub, outbox
    finally:
        pub.stop(timeout=2.0)
        outbox.close()


def drain_gate(broker: LocalBroker, certs: Path, tmp_path: Path, device: str, n: int) -> None:
    """``n`` check-ins from a gate with delivery = "broker": every one PUBACKed, then forgotten."""
    with gate_publishing(broker, certs, tmp_path, device, n) as (pub, _outbox):
        assert pub.wait_drained(10), "the broker did not PUBACK every check-in"


def stored(collector: Collector, n: int, timeout: float = 10.0) -> int:
    wait_until(lambda: collector.stats()["stored"] >= n, timeout)
    return int(collector.stats()["stored"])


def test_a_gate_certificate_cannot_join_the_collectors_share_group(
    fresh: DeployedBroker, certs: Path, tmp_path: Path
) -> None:
    with collecting(fresh, certs, tmp_path) as collector:
        # gate-01's stolen key joins the collectors' group with a session that outlives it.
        thief = TlsClient(
            fresh, certs, "device/gate-01", "$share/collectors/gate/+/+/checkin", session_expiry_s=3600
        )
        refused = [rc.value for rc in thief.suback]
        thief.close()
        drain_gate(fresh, certs, tmp_path, "gate-02", 20)
        assert stored(collector, 20) == 20, f"lost {20 - collector.stats()['stored']} of 20"
    assert refused == [NOT_AUTHORIZED]


def test_a_gate_certificate_cannot_take_over_the_collectors_session(
    fresh: DeployedBroker, certs: Path, tmp_path: Path, clients: list[TlsClient]
) -> None:
    with collecting(fresh, certs, tmp_path) as collector:
        # The collector's client id, resumed: its persistent session and subscription with it.
        thief = TlsClient(
            fresh, certs, "device/gate-01", client_id=client_id(collector.name), session_expiry_s=3600
        )
        clients.append(thief)
        drain_gate(fresh, certs, tmp_path, "gate-02", 20)
        assert stored(collector, 20) == 20, f"lost {20 - collector.stats()['stored']} of 20"
        # The broker named the thief by its certificate: the collector was never disconnected.
        assert "closing old connection" not in fresh.log_tail(200)


def test_a_stale_collector_session_delays_but_loses_nothing_and_retire_ends_it(
    fresh: DeployedBroker, certs: Path, tmp_path: Path
) -> None:
    # collector-2 ran once and is gone; its persistent session is still a member of the group.
    with collecting(fresh, certs, tmp_path, "collector-2"):
        pass
    with collecting(fresh, certs, tmp_path) as collector:
        # A gate that keeps each event until a collector acks it sends the stale session's
        # turns again (delivery = "collector", the default a gate with a collector should run).
        with gate_publishing(fresh, certs, tmp_path, "gate-01", 20, delivery="collector") as (pub, outbox):
            assert pub.wait_drained(30), f"{outbox.depth()} check-ins never acknowledged"
        assert collector.stats()["stored"] == 20
        # Retired, the stale session is gone: a gate that forgets on PUBACK loses nothing either.
        assert retire(collector_config(fresh, certs, tmp_path, "collector-2")) is None
        drain_gate(fresh, certs, tmp_path, "gate-02", 20)
        assert stored(collector, 40) == 40, f"lost {40 - collector.stats()['stored']} of gate-02's 20"


def test_a_fleet_too_big_for_one_status_packet_still_gets_its_checkins_stored(
    fresh: DeployedBroker, certs: Path, tmp_path: Path, clients: list[TlsClient]
) -> None:
    """50,000 devices in the store: listed whole, the status would pass the shipped 4 MiB limit.

    mosquitto then disconnected the collector on every status publish (the first right after
    each SUBACK), and since the status is rebuilt from the store, a restart did not help.
    """
    store = open_store(collector_config(fresh, certs, tmp_path).collector.store)
    seed_devices(store, 50_000, name_len=24)
    store.close()
    operator = TlsClient(fresh, certs, "operator/operator", "gate/collector/+/status")
    clients.append(operator)
    with collecting(fresh, certs, tmp_path) as collector:
        drain_gate(fresh, certs, tmp_path, "gate-02", 20)
        assert stored(collector, 20) == 20, f"lost {20 - collector.stats()['stored']} of 20"
        topic = "gate/collector/collector/status"
        assert wait_until(
            lambda: [json.loads(p)["devices_total"] for p in operator.on(topic)][-1:] == [50_001], 10
        )
        status = json.loads(operator.on(topic)[-1])
    assert 0 < len(status["devices"]) < 50_001
    assert fresh.log_tail(500).count("as collector (") == 1  # connected once, never thrown off


# --- the site's shared occupancy -------------------------------------------------------------


def test_gates_share_their_occupancy_counters_and_nothing_more(
    central: DeployedBroker, certs: Path, tmp_path: Path, clients: list[TlsClient]
) -> None:
    # Two real gates' occupancy, each behind its real publisher on the shipped broker.
    sides = []
    for device in ("gate-01", "gate-02"):
        cfg = gate_config(central, certs, tmp_path / device, device=device)
        (tmp_path / device).mkdir()
        occ = Occupancy(
            cfg, now=lambda: datetime.now(UTC), monotonic=time.monotonic, clock_synced=lambda: True
        )
        outbox = Outbox(tmp_path / device / "outbox.db", max_events=100)
        pub = Publisher(cfg, outbox, status=lambda: {}, on_counter=occ.heard, on_link=occ.link)
        occ.publish = pub.publish_occupancy
        sides.append((cfg, occ, outbox, pub.start()))
    try:
        (_cfg1, occ1, _o1, pub1), (_cfg2, occ2, _o2, _pub2) = sides
        assert pub1.wait_connected(10), central.log_tail()
        entry = json.dumps({"decision": "accepted", "reason": "ok", "direction": "in"}).encode()
        occ1.stage(entry)
        occ1.committed()
        assert occ2.wait_for(lambda: occ2.inside() == 1, 10), (occ2.snapshot(), central.log_tail())
        assert occ1.wait_for(lambda: "gate-02" in occ1.snapshot()["gates"], 10)
        # A sibling writes only its own counter, a gate of another site none of this site's;
        # the refusal is the broker's, not the gates' manners.
        sibling = TlsClient(central, certs, "device/gate-03")
        stranger = TlsClient(central, certs, "device/gate-09")
        clients.extend([sibling, stranger])
        assert sibling.publish(f"gate/{SITE}/gate-01/occupancy", b"{}") == NOT_AUTHORIZED
        assert stranger.publish(f"gate/{SITE}/gate-09/occupancy", b"{}") == NOT_AUTHORIZED
        assert occ2.inside() == 1  # neither reached gate-02's sum
    finally:
        for _cfg, _occ, outbox, pub in sides:
            pub.stop(timeout=2.0)
            outbox.close()
        cleaner = TlsClient(central, certs, "device/gate-02")
        cleaner.publish(f"gate/{SITE}/gate-02/occupancy", b"")
        cleaner.close()
