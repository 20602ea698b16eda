"""``gate-scanner cmd sign|send``: an operator signs a command for one gate and sends it.

The envelope and its signature are the gate's format (:mod:`scanner.gate.commands`); this
is the operator's end of it: load the key, sign, publish on the gate's ``cmd/NAME`` with an
MQTT v5 response topic and correlation data, and print the one reply.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from scanner.console import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, load_or_report
from scanner.credentials.signed import KID_BYTES, TrustError, trusted_key_from_json
from scanner.fleet.passes import PUB_FILE, default_kid
from scanner.gate.commands import KNOWN, SIGNED, sign
from scanner.mqtt import secure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cmd", required=True)
    for verb, text in (
        ("sign", "print a signed command envelope (JSON)"),
        ("send", "sign, publish to the gate's cmd/NAME and print its reply"),
    ):
        p = sub.add_parser(verb, help=text)
        p.add_argument("--key", required=verb == "sign", type=Path, help="operator private key (PEM)")
        p.add_argument("--kid", help="key id (hex); default: from issuer.pub.json beside the key")
        p.add_argument("--device", required=True, help="the gate's device id")
        p.add_argument("--name", required=True, choices=sorted(KNOWN))
        p.add_argument("--args", default="{}", help="JSON object of arguments")
        if verb == "send":
            p.add_argument("--config", required=True, type=Path, help="reads [mqtt] for the broker")
            p.add_argument("--site", required=True, help="the gate's site (topic segment)")
            p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the reply")


def main(args: argparse.Namespace) -> int:
    try:
        arguments = json.loads(args.args)
        if not isinstance(arguments, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        print(f"--args: {exc}", file=sys.stderr)
        return EXIT_USAGE
    envelope: dict[str, Any] | None = None
    if args.key is not None:
        try:
            key, kid = _load_key(args.key, args.kid)
        except (OSError, ValueError, TrustError) as exc:
            print(f"--key: {exc}", file=sys.stderr)
            return EXIT_USAGE
        envelope = sign(key, kid, device=args.device, name=args.name, args=arguments)
    elif args.name in SIGNED:
        print(f"--key: {args.name} must be signed", file=sys.stderr)
        return EXIT_USAGE
    if args.cmd == "sign":
        print(json.dumps(envelope, separators=(",", ":")))
        return EXIT_OK
    return _send(args, envelope)


def _load_key(path: Path, kid_hex: str | None) -> tuple[Ed25519PrivateKey, bytes]:
    key = load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    if kid_hex:
        kid = bytes.fromhex(kid_hex)
    elif (path.parent / PUB_FILE).exists():
        entry = json.loads((path.parent / PUB_FILE).read_text(encoding="utf-8"))
        kid = trusted_key_from_json(entry, where=str(path.parent / PUB_FILE)).kid
    else:
        kid = default_kid(key.public_key())
    if len(kid) != KID_BYTES:
        raise ValueError(f"kid must be {KID_BYTES} bytes")
    return key, kid


def _send(args: argparse.Namespace, envelope: dict[str, Any] | None) -> int:
    config = load_or_report(args.config)
    if config is None:
        return EXIT_USAGE
    m = config.mqtt
    root = f"{m.topic_prefix}/{args.site}/{args.device}"
    reply_topic = f"{root}/cmd/{args.name}/reply"
    correlation = secrets.token_bytes(8)
    got: list[bytes] = []
    done = threading.Event()
    subscribed = threading.Event()
    client_id = f"gate-scanner-cmd-{uuid.uuid4().hex[:8]}"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    secure(client, config)

    def on_connect(c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if not rc.is_failure:
            c.subscribe(reply_topic, qos=1)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        if getattr(msg.properties, "CorrelationData", None) == correlation:
            got.append(bytes(msg.payload))
            done.set()

    client.on_connect = on_connect
    client.on_subscribe = lambda *_a: subscribed.set()
    client.on_message = on_message
    client.connect(m.host, m.port, m.keepalive_s)
    client.loop_start()
    try:
        if not subscribed.wait(args.timeout):
            print(f"cannot subscribe to {reply_topic} at {m.host}:{m.port}", file=sys.stderr)
            return EXIT_RUNTIME
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = correlation
        body = json.dumps(envelope, separators=(",", ":")) if envelope is not None else ""
        client.publish(f"{root}/cmd/{args.name}", body, qos=1, retain=False, properties=props)
        if not done.wait(args.timeout):
            print(f"no reply on {reply_topic} within {args.timeout} s", file=sys.stderr)
            return EXIT_RUNTIME
    finally:
        client.disconnect()
        client.loop_stop()
    print(got[0].decode("utf-8", "replace"))
    return EXIT_OK if json.loads(got[0]).get("ok") else EXIT_RUNTIME
