"""The shipped central-broker setup: deploy/mosquitto/{gate-scanner.conf,acl} with `scanner.fleet.pki` certs.

mosquitto runs with the shipped configuration file itself; the test only rewrites the
listener port and the file paths into a temp dir (text substitution of those lines, each
checked to have matched once), so the TLS and ACL settings under test are the shipped ones.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from scanner.config import Config, from_table
from scanner.fleet import pki
from scanner.gate.occupancy import Occupancy
from scanner.gate.outbox import Outbox
from scanner.gate.publisher import Publisher
from scanner.sim.localbroker import LocalBroker
from tests.helpers import REPO
from tests.mqtt_helpers import wait_until

SHIPPED_CONF = REPO / "deploy" / "mosquitto" / "gate-scanner.conf"
SHIPPED_ACL = REPO / "deploy" / "mosquitto" / "acl"
NOT_AUTHORIZED = 0x87
SITE = "site-a"


class DeployedBroker(LocalBroker):
    """LocalBroker's process handling, but the configuration is the shipped file."""

    def __init__(
        self,
        workdir: Path,
        certs: Path,
        *,
        acl_text: str | None = None,
        server_certs: Path | None = None,
        crl: bool = False,
    ) -> None:
        super().__init__(workdir)
        self.certs = certs
        self.server_certs = server_certs or certs
        self.crl = crl
        self.acl_text = acl_text if acl_text is not None else SHIPPED_ACL.read_text()

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        acl = self.workdir / "acl"
        acl.write_text(self.acl_text)
        (self.workdir / "data").mkdir(exist_ok=True)
        text = SHIPPED_CONF.read_text()
        for directive, value in {
            "pid_file": self.workdir / "mosquitto.pid",
            "listener": f"{self.port} {self.host}",
            "cafile": self.certs / "ca.crt",
            "certfile": self.server_certs / "server" / "localhost.crt",
            "keyfile": self.server_certs / "server" / "localhost.key",
            "acl_file": acl,
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
    for gate in ("gate-01", "gate-02"):
        pki.issue_client(root, "device", gate, days=2)
    pki.issue_client(root, "operator", "operator", days=2)
    pki.issue_client(root, "collector", "collector", days=2)
    return root


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA with a server certificate for the same name and a client cert CN=gate-01."""
    root = tmp_path_factory.mktemp("rogue") / "pki"
    pki.init_ca(root, name="not the fleet CA", days=2)
    pki.issue_server(root, "localhost", ips=("127.0.0.1",), days=2)
    pki.issue_client(root, "device", "gate-01", days=2)
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
    issued = pki.issue_client(root, "device", "gate-07", days=2)
    for key in (root / "ca.key", issued.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gate-07"
    key_before = issued.key.read_bytes()
    with pytest.raises(pki.PkiError, match="not overwriting"):
        pki.issue_client(root, "device", "gate-07", days=2)
    with pytest.raises(pki.PkiError, match="not overwriting"):
        pki.init_ca(root)
    renewed = pki.issue_client(root, "device", "gate-07", days=2, renew=True)
    assert not renewed.key_created and issued.key.read_bytes() == key_before
    assert x509.load_pem_x509_certificate(renewed.cert.read_bytes()).serial_number != cert.serial_number
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
            client_id=f"test-{identity.replace('/', '-')}-{uuid.uuid4().hex[:6]}",
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
        self.client.connect("localhost", broker.port, keepalive=10)
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


def gate_config(broker: LocalBroker, certs: Path, tmp_path: Path, device: str = "gate-01") -> Config:
    """gate-01's (or ``device``'s) config for the shipped broker: TLS with its fleet certificate."""
    return from_table(
        {
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
    )


def checkin(seq: int, created: str) -> bytes:
    return json.dumps({"schema": "gate-scanner/checkin/1", "seq": seq, "device": "gate-01"}).encode()


# --- the gate on the production configuration --------------------------------------------------


def test_gate_publishes_checkins_and_receives_its_commands(
    central: DeployedBroker, certs: Path, tmp_path: Path, clients: list[TlsClient]
) -> None:
    operator = TlsClient(central, certs, "operator/operator", "gate/#")
    snoop = TlsClient(central, certs, "device/gate-02", "gate/#")  # another gate, listening to all
    clients += [operator, snoop]
    config = gate_config(central, certs, tmp_path)
    outbox = Outbox(tmp_path / "outbox.db", max_events=100)
    pub = Publisher(config, outbox, status=lambda: {"schema": "gate-scanner/status/1"}).start()
    try:
        assert pub.wait_connected(10), central.log_tail()
        for _ in range(3):
            outbox.append(checkin)
        pub.wake()
        got = operator.wait_for(config.topic("checkin"), 3)
        assert [json.loads(p)["seq"] for p in got] == [1, 2, 3]
        assert pub.wait_drained(5)
        assert operator.wait_for(config.topic("availability")) == [b"online"]

        # A command from the operator reaches the gate's identity on its own cmd/ topic.
        listener = TlsClient(central, certs, "device/gate-01", config.topic("cmd/#"))
        clients.append(listener)
        assert operator.publish(config.topic("cmd/open"), b'{"nonce": "n1"}') == 0
        assert listener.wait_for(config.topic("cmd/open")) == [b'{"nonce": "n1"}']
        assert listener.publish(config.topic("cmd/open/reply"), b'{"ok": true}') == 0
        assert operator.wait_for(config.topic("cmd/open/reply")) == [b'{"ok": true}']
        # Replies come only from the gate: an operator cannot forge one.
        assert operator.publish(config.topic("cmd/open/reply"), b'{"ok": false}') == NOT_AUTHORIZED
    finally:
        pub.stop(timeout=2.0)
        outbox.close()
    # gate-02 subscribed to everything, and saw none of gate-01's topics.
    assert snoop.on(f"gate/+/{config.device.id}/#") == []


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
    assert gate.publish(f"gate/{SITE}/gate-01/checkin", b'{"seq": 1}') == 0
    assert operator.wait_for(f"gate/{SITE}/gate-01/checkin") == [b'{"seq": 1}']
    assert operator.on(f"gate/{SITE}/gate-02/#") == []


def test_collector_reads_checkins_by_shared_subscription_and_acks(
    central: DeployedBroker, certs: Path, clients: list[TlsClient]
) -> None:
    collector = TlsClient(central, certs, "collector/collector", "$share/ingest/gate/+/+/checkin")
    gate = TlsClient(central, certs, "device/gate-02", f"gate/{SITE}/gate-02/ack")
    clients += [collector, gate]
    assert [rc.is_failure for rc in collector.suback] == [False]
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
    """A deliberately wrong ACL (the gate's checkin rule missing): the denial is detected."""
    shipped = SHIPPED_ACL.read_text()
    rule = "pattern write gate/+/%u/checkin\n"
    assert rule in shipped
    alarms: list[tuple[str, str]] = []
    raised, cleared = threading.Event(), threading.Event()

    def on_alarm(kind: str, detail: str) -> None:
        alarms.append((kind, detail))
        raised.set()

    with DeployedBroker(tmp_path / "broker", certs, acl_text=shipped.replace(rule, "")) as broker:
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
            broker.acl_text = shipped  # the operator fixes the ACL and restarts the broker
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
    pki.issue_client(root, "device", "gate-01", days=2)
    serial = format(
        x509.load_pem_x509_certificate(
            pki.issue_client(root, "device", "gate-02", days=2).cert.read_bytes()
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
        pki.issue_client(root, "device", "gate-02", days=2)
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
    site = f"mon-{uuid.uuid4().hex[:6]}"
    mon = MonitorProcess(config, "--site", site, "--count", "1", "--duration", "20", stderr=tmp_path / "err")
    try:
        assert wait_until(lambda: "monitor: watching" in (tmp_path / "err").read_text(), 10)
        # "watching" comes after the SUBACK: the broker routes this to the monitor.
        assert gate.publish(f"gate/{site}/gate-01/availability", b"online") == 0
        mon.until(lambda lines: any(o.get("availability") == "online" for o in lines))
        body = {"decision": "accepted", "reason": "ok", "credential": {"type": "plain", "subject": "ab" * 16}}
        assert gate.publish(f"gate/{site}/gate-01/checkin", json.dumps(body)) == 0
        code, rest = mon.finish()
    finally:
        mon.kill()
    assert code == 0, (tmp_path / "err").read_text()
    assert [(o["device"], o["subject"]) for o in rest if o["kind"] == "checkin"] == [("gate-01", "abababab")]


# --- the site's shared occupancy -------------------------------------------------------------


def test_gates_share_their_occupancy_counters_and_nothing_more(
    central: DeployedBroker, certs: Path, tmp_path: Path, clients: list[TlsClient]
) -> None:
    counters = f"gate/{SITE}/+/occupancy"
    watcher = TlsClient(central, certs, "device/gate-02", "gate/#")  # gate-02 listening to everything
    clients.append(watcher)
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
        # A gate writes only its own counter; the refusal is the broker's, not the gate's manners.
        intruder = TlsClient(central, certs, "device/gate-01")
        clients.append(intruder)
        assert intruder.publish(f"gate/{SITE}/gate-02/occupancy", b"{}") == NOT_AUTHORIZED
        assert intruder.publish(f"gate/{SITE}/gate-01/occupancy", b"") == 0  # its own: allowed
        assert occ2.wait_for(lambda: occ2.inside() == 0, 10)  # cleared: gate-01 no longer counts
        assert pub1.wait_drained(1)
        # What gate-02 received of gate-01: its occupancy counters, nothing else.
        assert intruder.publish(f"gate/{SITE}/gate-01/status", b"{}") == 0
        got = {m.topic for m in watcher.messages if m.topic.startswith(f"gate/{SITE}/gate-01/")}
        assert got == {f"gate/{SITE}/gate-01/occupancy"}
        assert watcher.wait_for(counters) and all(mqtt.topic_matches_sub(counters, t) for t in got)
    finally:
        for _cfg, _occ, outbox, pub in sides:
            pub.stop(timeout=2.0)
            outbox.close()
        cleaner = TlsClient(central, certs, "device/gate-02")
        cleaner.publish(f"gate/{SITE}/gate-02/occupancy", b"")
        cleaner.close()
