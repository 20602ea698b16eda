"""Operator commands: signed envelopes, every refusal, and execution on a real gate over a real broker."""

from __future__ import annotations

import base64
import errno
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding
from gpiozero.pins.mock import MockFactory
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from scanner import cli, events
from scanner import config as config_mod
from scanner.fleet.passes import default_kid
from scanner.gate import commands
from scanner.gate.app import App
from scanner.gate.commands import Inbound, Refused, Verifier
from scanner.gate.outbox import Outbox
from scanner.gate.signals import Signals
from scanner.models import Reason
from tests.helpers import (
    BIG_DENY,
    CODE_FRAME,
    OPERATOR,
    OPERATOR_KID,
    REPO,
    HeldSource,
    OrderCheckingSignals,
    deny_config,
    energised_relay,
    gate_config,
    make_gate,
    running,
    self_signed,
    write_operator_keys,
)
from tests.mqtt_helpers import Subscriber, wait_until

REPLY_SCHEMA = json.loads(events.schema_path("cmd-reply").read_text())
HEALTH_SCHEMA = json.loads(events.schema_path("health").read_text())
CHECKIN_SCHEMA = json.loads(events.schema_path().read_text())

STRANGER = Ed25519PrivateKey.generate()
STRANGER_KID = default_kid(STRANGER.public_key())


def signed(name: str, device: str, *, key=OPERATOR, kid=OPERATOR_KID, **kw: Any) -> dict[str, Any]:
    return commands.sign(key, kid, device=device, name=name, **kw)


# -- verifier: pure, injected clock -----------------------------------------------------------

NOW = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)


def unit_config(tmp_path: Path, keys: bool = True) -> config_mod.Config:
    table: dict[str, Any] = {"device": {"id": "gate-u", "site": "site-u"}, "storage": {"dir": str(tmp_path)}}
    if keys:
        table["commands"] = {"operator_keys_file": str(write_operator_keys(tmp_path / "ops.json"))}
    return config_mod.from_table(table)


def verifier(cfg: config_mod.Config) -> Verifier:
    return Verifier(cfg, commands.load_operator_keys(cfg.commands.operator_keys_file), started=NOW)


def inbound(envelope: dict[str, Any] | bytes, name: str | None = None) -> Inbound:
    payload = envelope if isinstance(envelope, bytes) else json.dumps(envelope).encode()
    return Inbound(name or (envelope["name"] if isinstance(envelope, dict) else "open"), payload)


def test_a_signed_command_verifies_once_then_is_replayed(tmp_path):
    v = verifier(unit_config(tmp_path))
    env = signed("open", "gate-u", now=NOW)
    assert v.verify(inbound(env), NOW + timedelta(seconds=1)).kid == OPERATOR_KID.hex()
    with pytest.raises(Refused) as refusal:
        v.verify(inbound(env), NOW + timedelta(seconds=2))
    assert refusal.value.reason == "replayed"


def _tampered(env: dict[str, Any]) -> dict[str, Any]:
    return {**env, "nonce": "00" * 16}


@pytest.mark.parametrize(
    ("make", "name", "reason"),
    [
        (lambda: signed("open", "gate-u", now=NOW - timedelta(seconds=61)), None, "stale"),
        (lambda: signed("open", "gate-u", now=NOW + timedelta(seconds=61)), None, "stale"),
        (
            lambda: {k: v for k, v in signed("open", "gate-u", now=NOW).items() if k not in ("sig", "kid")},
            None,
            "unsigned",
        ),
        (lambda: signed("open", "gate-u", now=NOW, key=STRANGER, kid=STRANGER_KID), None, "unknown_key"),
        (lambda: _tampered(signed("open", "gate-u", now=NOW)), None, "bad_signature"),
        (lambda: signed("open", "gate-other", now=NOW), None, "wrong_device"),
        (lambda: signed("open", "gate-u", now=NOW), "lists", "malformed"),  # name is not the topic's
        (lambda: b"not json", "open", "malformed"),
        (lambda: b"", "open", "unsigned"),
        (lambda: signed("open", "gate-u", now=NOW), "explode", "unknown_command"),
    ],
)
def test_every_refusal_has_its_reason(tmp_path, make, name, reason):
    v = verifier(unit_config(tmp_path))
    with pytest.raises(Refused) as refusal:
        v.verify(inbound(make(), name), NOW)
    assert refusal.value.reason == reason


def resigned(env: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """``env`` with ``changes`` (None removes a field), signed again by the operator key."""
    body = {k: v for k, v in {**env, **changes}.items() if v is not None and k != "sig"}
    return {**body, "sig": base64.b64encode(OPERATOR.sign(commands.canonical(body))).decode()}


GOOD = signed("open", "gate-u", now=NOW, nonce="ab" * 16)
OK_KID = OPERATOR_KID.hex()


@pytest.mark.parametrize(
    ("payload", "name", "reason", "detail"),
    [
        (b"[1]", "open", "malformed", "expected a JSON object"),
        (b"\xff", "open", "malformed", "not UTF-8 JSON: "),
        (
            b" " * (commands.MAX_SMALL_PAYLOAD + 1),
            "open",
            "malformed",
            f"payload over {commands.MAX_SMALL_PAYLOAD} bytes",
        ),
        (
            b" " * (commands.MAX_PAYLOAD + 1),
            "lists",
            "malformed",
            f"payload over {commands.MAX_PAYLOAD} bytes",
        ),
        (b"", "reload", "unsigned", "reload must be signed by an operator key"),
        (
            {k: v for k, v in GOOD.items() if k != "sig"},
            "open",
            "unsigned",
            "open must be signed by an operator key",
        ),
        (resigned(GOOD, extra=1), "open", "malformed", "unknown fields ['extra']"),
        (
            resigned(GOOD, schema="gate-scanner/cmd/2"),
            "open",
            "malformed",
            "schema must be 'gate-scanner/cmd/1'",
        ),
        (resigned(GOOD, schema=None), "open", "malformed", "schema must be 'gate-scanner/cmd/1'"),
        (GOOD, "reload", "malformed", "name 'open' is not the topic's 'reload'"),
        (resigned(GOOD, device=7), "open", "malformed", "device must be a string"),
        (resigned(GOOD, nonce="AB" * 16), "open", "malformed", "nonce must be 16-64 lowercase hex digits"),
        (resigned(GOOD, nonce="a" * 15), "open", "malformed", "nonce must be 16-64 lowercase hex digits"),
        (resigned(GOOD, nonce="a" * 65), "open", "malformed", "nonce must be 16-64 lowercase hex digits"),
        (resigned(GOOD, nonce=None), "open", "malformed", "nonce must be 16-64 lowercase hex digits"),
        (resigned(GOOD, args=[]), "open", "malformed", "args must be an object"),
        (resigned(GOOD, kid=12), "open", "malformed", "kid must be a hex string"),
        (resigned(GOOD, ts=1764403200), "open", "malformed", "ts must be an RFC 3339 string"),
        (
            resigned(GOOD, ts="2026-11-29T08:00:00"),
            "open",
            "malformed",
            "ts is not an RFC 3339 time with an offset: ",
        ),
        (resigned(GOOD, ts="yesterday"), "open", "malformed", "ts is not an RFC 3339 time with an offset: "),
        ({**GOOD, "kid": "zz"}, "open", "malformed", "kid must be hex and sig base64"),
        ({**GOOD, "sig": "not base64!"}, "open", "malformed", "kid must be hex and sig base64"),
        ({**GOOD, "sig": 5}, "open", "malformed", "kid must be hex and sig base64"),
        ({**GOOD, "kid": "abcdef"}, "open", "malformed", "kid must be 4 bytes"),
        ({**GOOD, "kid": ""}, "open", "malformed", "kid must be 4 bytes"),
        # A valid signature with a stray character: no decoder may skip it into a valid one.
        (
            {**GOOD, "sig": GOOD["sig"][:10] + "*" + GOOD["sig"][10:]},
            "open",
            "malformed",
            "kid must be hex and sig base64",
        ),
        (b" " * commands.MAX_SMALL_PAYLOAD, "open", "unsigned", "open must be signed by an operator key"),
        (b" " * commands.MAX_PAYLOAD, "lists", "unsigned", "lists must be signed by an operator key"),
        (
            {**GOOD, "kid": "00112233"},
            "open",
            "unknown_key",
            "kid 00112233 is not an operator key of this gate",
        ),
        (
            {**GOOD, "nonce": "cd" * 16},
            "open",
            "bad_signature",
            f"signature does not verify under kid {OK_KID}",
        ),
        (
            signed("open", "gate-x", now=NOW),
            "open",
            "wrong_device",
            "command is for 'gate-x', this is 'gate-u'",
        ),
        (
            signed("open", "gate-u", now=NOW - timedelta(seconds=60, milliseconds=1)),
            "open",
            "stale",
            "ts is +60 s from the gate's clock (limit 60 s)",
        ),
        (
            signed("open", "gate-u", now=NOW + timedelta(seconds=75)),
            "open",
            "stale",
            "ts is -75 s from the gate's clock (limit 60 s)",
        ),
        (
            GOOD,
            "explode",
            "unknown_command",
            "no command 'explode'; known: lists, occupancy, open, reload, selftest",
        ),
        (b"{not json", "selftest", "malformed", "not UTF-8 JSON: "),
    ],
    # Short ids of plain words: mutmut passes each test's id on pytest's command line.
    ids=lambda value: value if isinstance(value, str) and value.isidentifier() else "",
)
def test_every_refusal_says_why(tmp_path, payload, name, reason, detail):
    # The reply's reason is for programs, its detail for the operator reading it: both exact.
    v = verifier(unit_config(tmp_path))
    with pytest.raises(Refused) as refusal:
        v.verify(inbound(payload, name), NOW)
    assert refusal.value.reason == reason
    if detail.endswith(": "):  # the rest is the parser's own words
        assert refusal.value.detail.startswith(detail), refusal.value.detail
    else:
        assert refusal.value.detail == detail
    assert str(refusal.value) == f"{reason}: {refusal.value.detail}"


def test_the_age_limits_are_inclusive(tmp_path):
    # Exactly max_age_s old (or ahead), or exactly the start grace before the start: accepted.
    v = verifier(unit_config(tmp_path))
    assert v.verify(inbound(signed("open", "gate-u", now=NOW - timedelta(seconds=2))), NOW).name == "open"
    (tmp_path / "b").mkdir()
    v = verifier(unit_config(tmp_path / "b"))
    late = NOW + timedelta(seconds=60)
    assert v.verify(inbound(signed("open", "gate-u", now=NOW)), late).name == "open"
    (tmp_path / "c").mkdir()
    v = verifier(unit_config(tmp_path / "c"))
    with pytest.raises(Refused) as refusal:
        v.verify(inbound(signed("open", "gate-u", now=NOW - timedelta(seconds=2, milliseconds=1))), NOW)
    assert (refusal.value.reason, refusal.value.detail) == ("stale", "signed before this gate started")


def test_args_may_be_left_out_of_a_command_that_takes_none(tmp_path):
    v = verifier(unit_config(tmp_path))
    envelope = resigned(GOOD, args=None)
    assert "args" not in envelope
    assert v.verify(inbound(envelope), NOW).args == {}


def test_a_replay_file_that_cannot_even_be_looked_at_still_refuses_what_came_before_the_start(tmp_path):
    # Unreadable, and no modification time to go by either: the guard falls back to the start
    # time, never to no floor at all.
    path = tmp_path / ("r" * 300)  # a name the filesystem refuses: read and stat both fail
    guard = commands.ReplayGuard(path, 60.0, now=NOW)
    assert guard.floor == NOW
    with pytest.raises(Refused) as refusal:
        guard.admit("e" * 16, NOW - timedelta(seconds=1))
    assert refusal.value.reason == "replayed"


def test_a_corrupt_replay_file_whose_time_cannot_be_read_falls_back_to_the_start(tmp_path, monkeypatch):
    path = tmp_path / commands.REPLAY_FILE
    path.write_bytes(b"{not json")
    real_stat = Path.stat

    def no_time(p: Path, *args: Any, **kw: Any) -> os.stat_result:
        if p == path:  # read a moment ago, gone (or unreadable) now
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(p))
        return real_stat(p, *args, **kw)

    monkeypatch.setattr(Path, "stat", no_time)
    guard = commands.ReplayGuard(path, 60.0, now=NOW)
    assert guard.floor == NOW


def test_read_only_selftest_needs_no_signature_but_a_full_envelope_is_still_checked(tmp_path):
    v = verifier(unit_config(tmp_path))
    bare = v.verify(inbound(b"", "selftest"), NOW)
    assert (bare.name, bare.device, bare.ts, bare.nonce, bare.args, bare.kid) == (
        "selftest",
        "",
        NOW,
        "",
        {},
        None,
    )
    envelope = {k: v for k, v in signed("selftest", "gate-u", now=NOW).items() if k not in ("sig", "kid")}
    checked = v.verify(inbound(envelope), NOW + timedelta(seconds=1))
    assert (checked.name, checked.device, checked.ts) == ("selftest", "gate-u", NOW)


def test_the_signed_bytes_are_the_documented_ones():
    # README (MQTT, Commands): the context, then the envelope without sig as UTF-8 JSON with
    # sorted keys and no spaces. Another implementation signs exactly these bytes.
    envelope = {"sig": "x", "ts": "T", "args": {"denylist": "Nguyễn\n", "b": [1, 2]}, "name": "lists"}
    assert commands.canonical(envelope) == (
        b'gate-scanner/cmd/1\x00{"args":{"b":[1,2],"denylist":"Nguy\xe1\xbb\x85n\\n"},"name":"lists","ts":"T"}'
    )
    with pytest.raises(ValueError):
        commands.canonical({"args": {"x": float("nan")}})  # no JSON has it: never signed


def test_signed_commands_are_refused_when_no_operator_keys_are_configured(tmp_path):
    v = verifier(unit_config(tmp_path, keys=False))
    with pytest.raises(Refused) as refusal:
        v.verify(inbound(signed("open", "gate-u", now=NOW)), NOW)
    assert (refusal.value.reason, refusal.value.detail) == (
        "not_configured",
        "commands.operator_keys_file is not set: signed commands are off",
    )
    # selftest is read-only: no signature, no keys needed.
    assert v.verify(Inbound("selftest", b""), NOW).name == "selftest"


def test_signed_commands_need_mqtt_v5_where_a_retained_command_is_visible(tmp_path):
    ops = write_operator_keys(tmp_path / "ops.json")
    cfg = config_mod.from_table(
        {
            "device": {"id": "gate-u", "site": "site-u"},
            "mqtt": {"protocol": "3.1.1"},
            "commands": {"operator_keys_file": str(ops)},
        }
    )
    with pytest.raises(Refused) as refusal:
        verifier(cfg).verify(inbound(signed("open", "gate-u", now=NOW)), NOW)
    assert (refusal.value.reason, refusal.value.detail) == (
        "not_configured",
        'signed commands need mqtt.protocol = "5" (3.1.1 hides retain)',
    )


def test_a_command_signed_before_the_gate_started_is_stale(tmp_path):
    v = verifier(unit_config(tmp_path))
    with pytest.raises(Refused) as refusal:
        v.verify(inbound(signed("open", "gate-u", now=NOW - timedelta(seconds=10))), NOW)
    assert refusal.value.reason == "stale"


def test_the_replay_guard_is_bounded_and_forgets_only_what_its_floor_refuses(tmp_path):
    guard = commands.ReplayGuard(tmp_path / commands.REPLAY_FILE, 60.0, now=NOW, max_entries=2)
    guard.admit("a" * 16, NOW)
    guard.admit("b" * 16, NOW)
    with pytest.raises(Refused) as refusal:
        guard.admit("c" * 16, NOW)  # never forgets a live nonce
    assert (refusal.value.reason, refusal.value.detail) == (
        "busy",
        "too many recent commands; try again later",
    )
    with pytest.raises(Refused) as refusal:
        guard.admit("a" * 16, NOW + timedelta(seconds=30))
    assert refusal.value.reason == "replayed"
    guard.admit("c" * 16, NOW + timedelta(seconds=61))  # a and b are now below the floor
    assert len(guard) == 1
    with pytest.raises(Refused) as refusal:
        guard.admit("d" * 16, NOW)
    assert refusal.value.reason == "replayed"


def test_the_replay_floor_is_inclusive_and_a_nonce_at_it_is_kept(tmp_path):
    # The floor trails the newest executed ts by max_age_s: a command exactly that old may still
    # run (the operator who sent it saw it within max_age_s), and once it has, its nonce stays
    # for as long as its ts is not below the floor, so it cannot run twice.
    guard = commands.ReplayGuard(tmp_path / commands.REPLAY_FILE, 60.0, now=NOW)
    top = NOW + timedelta(seconds=100)
    guard.admit("a" * 16, top)
    assert guard.floor == top - timedelta(seconds=60)
    guard.admit("b" * 16, guard.floor)  # exactly at the floor
    guard.admit("c" * 16, top)  # another at the top: the floor stays, and so does b
    assert set(guard.nonces) == {"a" * 16, "b" * 16, "c" * 16}
    with pytest.raises(Refused) as refusal:
        guard.admit("b" * 16, guard.floor)
    assert (refusal.value.reason, refusal.value.detail) == ("replayed", "nonce already used")
    with pytest.raises(Refused) as refusal:
        guard.admit("d" * 16, guard.floor - timedelta(milliseconds=1))
    assert refusal.value.reason == "replayed"
    assert refusal.value.detail == f"ts is older than an executed command allows ({guard.floor.isoformat()})"
    reread = commands.ReplayGuard(tmp_path / commands.REPLAY_FILE, 60.0, now=NOW)
    assert (reread.floor, reread.highest, reread.nonces) == (guard.floor, guard.highest, guard.nonces)


def _replay_state(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / commands.REPLAY_FILE).read_text())


def test_a_command_run_before_a_reboot_is_refused_after_it_even_with_the_clock_wound_back(tmp_path):
    cfg = unit_config(tmp_path)
    keys = commands.load_operator_keys(cfg.commands.operator_keys_file)
    env = signed("open", "gate-u", now=NOW)
    Verifier(cfg, keys, started=NOW - timedelta(seconds=5)).verify(inbound(env), NOW + timedelta(seconds=1))
    state = tmp_path / commands.REPLAY_FILE
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    # A Pi without a real-time clock reboots to the time fake-hwclock saved, before the
    # command was sent, and has no NTP yet: the captured bytes look fresh again.
    rebooted = Verifier(cfg, keys, started=NOW - timedelta(seconds=3))
    with pytest.raises(Refused) as refusal:
        rebooted.verify(inbound(env), NOW + timedelta(seconds=1))
    assert refusal.value.reason == "replayed"
    # A command captured earlier still, never run here, is older than the one that ran.
    older = signed("open", "gate-u", now=NOW - timedelta(seconds=90))
    rebooted = Verifier(cfg, keys, started=NOW - timedelta(seconds=95))
    with pytest.raises(Refused) as refusal:
        rebooted.verify(inbound(older), NOW - timedelta(seconds=89))
    assert refusal.value.reason == "replayed"
    assert "older than an executed command" in refusal.value.detail
    # Commands within max_age of the newest executed one still run.
    fresh = signed("open", "gate-u", now=NOW - timedelta(seconds=50))
    assert rebooted.verify(inbound(fresh), NOW - timedelta(seconds=50)).nonce == fresh["nonce"]
    document = _replay_state(tmp_path)
    assert document["schema"] == commands.REPLAY_SCHEMA
    assert sorted(document["nonces"]) == sorted([env["nonce"], fresh["nonce"]])
    assert datetime.fromisoformat(document["highest"]) == NOW
    assert sorted(p.name for p in tmp_path.iterdir()) == [commands.REPLAY_FILE, "ops.json"]


def test_the_replay_file_keeps_only_nonces_the_floor_does_not_refuse(tmp_path):
    cfg = unit_config(tmp_path)
    v = verifier(cfg)
    for offset in (0, 30, 200):
        moment = NOW + timedelta(seconds=offset)
        v.verify(inbound(signed("open", "gate-u", now=moment, nonce=f"{offset:016x}")), moment)
    document = _replay_state(tmp_path)
    assert list(document["nonces"]) == [f"{200:016x}"]
    assert datetime.fromisoformat(document["floor"]) == NOW + timedelta(seconds=140)


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (b"{not json", "corrupt: Expecting property name"),
        (b"\xff\xfe", "corrupt: 'utf-8' codec"),
        (b"[1]", "corrupt: schema is not 'gate-scanner/cmd-replay/1'"),
        (
            b'{"schema": "gate-scanner/cmd-replay/2", "floor": null, "highest": null, "nonces": {}}',
            "corrupt: schema",
        ),
        (b'{"schema": "gate-scanner/cmd-replay/1"}', "corrupt: 'floor'"),
        (
            b'{"schema": "gate-scanner/cmd-replay/1", "floor": null, "highest": null, "nonces": []}',
            "corrupt: nonces must map hex nonces to times",
        ),
        (
            b'{"schema": "gate-scanner/cmd-replay/1", "floor": null, "highest": null, "nonces": {"XY": ""}}',
            "corrupt: nonces must map hex nonces to times",
        ),
        (
            b'{"schema": "gate-scanner/cmd-replay/1", "floor": null, "highest": 7, "nonces": {}}',
            "corrupt: times must be strings",
        ),
        (
            b'{"schema":"gate-scanner/cmd-replay/1","floor":null,"highest":"0001-01-01T00:00:00+00:00","nonces":{}}',
            "corrupt: ",
        ),
        (None, "cannot read it: [Errno 13] Permission denied"),
    ],
)
def test_a_damaged_replay_file_refuses_what_it_may_have_held_but_not_forever(
    tmp_path, monkeypatch, caplog, damage, why
):
    cfg = unit_config(tmp_path)
    keys = commands.load_operator_keys(cfg.commands.operator_keys_file)
    state = tmp_path / commands.REPLAY_FILE
    state.write_bytes(damage or b"{}")
    os.utime(state, (NOW.timestamp(), NOW.timestamp()))  # last written at NOW
    if damage is None:
        real_read = Path.read_bytes

        def unreadable(path: Path) -> bytes:
            if path.name == commands.REPLAY_FILE:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_read(path)

        monkeypatch.setattr(Path, "read_bytes", unreadable)
    with caplog.at_level("WARNING", logger="scanner.gate.commands"):
        v = Verifier(cfg, keys, started=NOW - timedelta(seconds=30))
    monkeypatch.undo()
    assert commands.REPLAY_FILE in caplog.text
    assert f" is {why}" in caplog.text, caplog.text  # the operator reads why commands are refused
    # Anything run up to the last write was within max_age of the clock then: all refused...
    late = NOW + timedelta(seconds=60)
    with pytest.raises(Refused) as refusal:
        v.verify(inbound(signed("open", "gate-u", now=late)), late)
    assert refusal.value.reason == "replayed"
    # ...but once the clock is past that, commands run again, and the floor is kept on disk.
    later = NOW + timedelta(seconds=63)
    assert v.verify(inbound(signed("open", "gate-u", now=later)), later).name == "open"
    caplog.clear()
    v = Verifier(cfg, keys, started=NOW - timedelta(seconds=30))
    assert not caplog.records
    with pytest.raises(Refused) as refusal:
        v.verify(inbound(signed("open", "gate-u", now=late)), late)
    assert refusal.value.reason == "replayed"


def test_a_replay_file_with_no_floor_yet_loads_without_a_warning(tmp_path, caplog):
    state = tmp_path / commands.REPLAY_FILE
    state.write_text(
        json.dumps({"schema": commands.REPLAY_SCHEMA, "floor": None, "highest": None, "nonces": {}})
    )
    with caplog.at_level("WARNING", logger="scanner.gate.commands"):
        guard = commands.ReplayGuard(state, 60.0, now=NOW)
    assert not caplog.records
    assert (guard.floor, guard.highest, guard.nonces) == (None, None, {})


def _full_after(room: int) -> Callable[[Callable[[int, Any], int]], Callable[[int, Any], int]]:
    """os.write on a file system with ``room`` bytes left: stores what fits, then ENOSPC."""

    def make(real: Callable[[int, Any], int]) -> Callable[[int, Any], int]:
        left = [room]

        def write(fd: int, data: Any) -> int:
            if left[0] <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written = real(fd, bytes(data[: left[0]]))
            left[0] -= written
            return written

        return write

    return make


def _claims_all(real: Callable[[int, Any], int]) -> Callable[[int, Any], int]:
    def write(fd: int, data: Any) -> int:
        real(fd, bytes(data[: len(data) // 2]))
        return len(data)

    return write


def _in_pieces(real: Callable[[int, Any], int]) -> Callable[[int, Any], int]:
    return lambda fd, data: real(fd, bytes(data[:1000]))


@pytest.mark.parametrize("writer", [_full_after(0), _full_after(100), _claims_all])
def test_a_command_whose_nonce_cannot_be_recorded_is_refused_and_not_used_up(tmp_path, monkeypatch, writer):
    cfg = unit_config(tmp_path)
    v = verifier(cfg)
    env = signed("open", "gate-u", now=NOW)
    monkeypatch.setattr(os, "write", writer(os.write))
    with pytest.raises(Refused) as refusal:
        v.verify(inbound(env), NOW)
    monkeypatch.undo()
    assert refusal.value.reason == "failed" and commands.REPLAY_FILE in refusal.value.detail
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ops.json"]  # no temp file left
    assert v.verify(inbound(env), NOW).nonce == env["nonce"]  # the refusal did not spend it


def test_cli_sign_prints_an_envelope_the_gate_accepts(tmp_path, capsys):
    key_dir = tmp_path / "keys"
    assert cli.main(["pass", "keygen", "--out", str(key_dir), "--name", "ops"]) == 0
    kid = bytes.fromhex(capsys.readouterr().out.strip())
    entry = json.loads((key_dir / "issuer.pub.json").read_text())
    (tmp_path / "ops.json").write_text(
        json.dumps({"version": 1, "issued": "2026-11-29T00:00:00Z", "keys": [entry]})
    )
    cfg = config_mod.from_table(
        {
            "device": {"id": "gate-u", "site": "site-u"},
            "storage": {"dir": str(tmp_path)},
            "commands": {"operator_keys_file": str(tmp_path / "ops.json")},
        }
    )
    args = ["cmd", "sign", "--key", str(key_dir / "issuer.key"), "--device", "gate-u", "--name", "reload"]
    assert cli.main(args) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["kid"] == kid.hex() and env["schema"] == commands.SCHEMA
    now = datetime.now(UTC)
    v = Verifier(
        cfg, commands.load_operator_keys(cfg.commands.operator_keys_file), started=now - timedelta(60)
    )
    assert v.verify(inbound(env), now).name == "reload"


# -- lists: validated, then replaced atomically -----------------------------------------------


def test_write_lists_validates_everything_before_replacing_anything(tmp_path):
    allow, deny = tmp_path / "allow.txt", tmp_path / "deny.txt"
    allow.write_text("OLD-A\n")
    deny.write_text("OLD-D\n")
    cfg = config_mod.from_table(
        {
            "device": {"id": "gate-u", "site": "site-u"},
            "policy": {"allowlist_file": str(allow), "denylist_file": str(deny)},
        }
    )
    with pytest.raises(Refused) as refusal:
        commands.write_lists(cfg, {"allowlist": "NEW-A\n", "denylist": "# issued: not a time\n"})
    assert refusal.value.reason == "malformed"
    assert allow.read_text() == "OLD-A\n" and deny.read_text() == "OLD-D\n"
    with pytest.raises(Refused) as refusal:
        commands.write_lists(cfg, {"revocation": "X\n"})
    assert refusal.value.reason == "not_configured"
    assert commands.write_lists(cfg, {"allowlist": "NEW-A\n", "denylist": "NEW-D\n"}) == [
        "allowlist",
        "denylist",
    ]
    assert allow.read_text() == "NEW-A\n" and deny.read_text() == "NEW-D\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["allow.txt", "deny.txt"]  # no temp files left


def test_a_dcc_trust_list_with_no_usable_certificate_is_refused_and_the_old_one_kept(tmp_path):
    cert, _key = self_signed(tmp_path, "dsc")
    der = base64.b64encode(x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(Encoding.DER))
    trust = tmp_path / "dcc-trust.json"
    old = json.dumps({"version": "1", "certificates": [{"certificate": der.decode(), "country": "VN"}]})
    trust.write_text(old)
    cfg = config_mod.from_table(
        {"device": {"id": "gate-u", "site": "site-u"}, "policy": {"dcc_trust_file": str(trust)}}
    )
    pem_instead_of_der = {
        "version": "2",
        "certificates": [{"certificate": cert.read_text(), "country": "VN"}],
    }
    with pytest.raises(Refused) as refusal:
        commands.write_lists(cfg, {"dcc_trust": pem_instead_of_der})
    assert refusal.value.reason == "malformed"
    assert "no usable signing certificate" in refusal.value.detail
    assert trust.read_text() == old


@pytest.mark.parametrize("writer", [_full_after(4096), _full_after(0), _claims_all])
def test_a_list_cut_off_by_a_full_disk_is_refused_and_the_old_one_kept(tmp_path, monkeypatch, writer):
    cfg, deny = deny_config(tmp_path)
    monkeypatch.setattr(os, "write", writer(os.write))
    with pytest.raises(Refused) as refusal:
        commands.write_lists(cfg, {"denylist": BIG_DENY})
    monkeypatch.undo()
    assert refusal.value.reason == "failed" and "denylist" in refusal.value.detail
    assert deny.read_text() == "# version: 7\nEMP-0001\n"
    assert [p.name for p in tmp_path.iterdir()] == ["deny.txt"]


def test_a_list_the_kernel_takes_in_pieces_is_written_whole(tmp_path, monkeypatch):
    cfg, deny = deny_config(tmp_path)
    monkeypatch.setattr(os, "write", _in_pieces(os.write))
    assert commands.write_lists(cfg, {"denylist": BIG_DENY}) == ["denylist"]
    monkeypatch.undo()
    assert deny.read_text() == BIG_DENY


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE short writes as on Linux")
def test_a_list_over_the_room_left_is_refused_by_the_real_kernel(tmp_path):
    # RLIMIT_FSIZE makes the kernel cut a write short exactly as ENOSPC on a nearly full card
    # does; in a child, so this process keeps writing freely.
    child = textwrap.dedent(
        """
        import json, resource, signal, sys
        from tests.helpers import BIG_DENY, deny_config
        from pathlib import Path
        from scanner.gate import commands
        cfg, deny = deny_config(Path(sys.argv[1]))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.RLIM_INFINITY))
        try:
            commands.write_lists(cfg, {"denylist": BIG_DENY})
        except commands.Refused as refusal:
            print(json.dumps([refusal.reason, refusal.detail]))
        else:
            print(json.dumps(["ok", ""]))
        """
    )
    root = REPO
    done = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    reason, detail = json.loads(done.stdout)
    assert reason == "failed" and "denylist" in detail, detail
    assert (tmp_path / "deny.txt").read_text() == "# version: 7\nEMP-0001\n"
    assert [p.name for p in tmp_path.iterdir()] == ["deny.txt"]


# -- the gate: open is recorded before the relay moves ----------------------------------------


def test_remote_open_commits_the_event_before_the_relay_moves(tmp_path):
    cfg = unit_config(tmp_path)
    outbox = Outbox(tmp_path / "outbox.db", 100)
    factory = MockFactory()
    try:
        with OrderCheckingSignals(cfg.gpio, pin_factory=factory, outbox=outbox) as signals:
            gate = make_gate(cfg, signals, outbox)
            ok, _detail = gate.remote_open(OPERATOR_KID.hex())
            assert ok and signals.depth_at_accept == [1]
            ((_seq, payload),) = outbox.pending()
            event = json.loads(payload)
            jsonschema.validate(event, CHECKIN_SCHEMA)
            assert event["decision"] == "accepted" and event["reason"] == "ok"
            assert event["credential"] == {"type": "operator", "issuer": OPERATOR_KID.hex()}
    finally:
        outbox.close()
        factory.close()


def test_remote_open_with_a_full_outbox_keeps_the_gate_shut(tmp_path):
    cfg = unit_config(tmp_path)
    outbox = Outbox(tmp_path / "outbox.db", 10)
    for _ in range(10):
        outbox.append(lambda seq, created: b"{}")
    factory = MockFactory()
    try:
        with Signals(cfg.gpio, pin_factory=factory) as signals:
            gate = make_gate(cfg, signals, outbox)
            ok, _detail = gate.remote_open(OPERATOR_KID.hex())
            assert not ok and signals.faulty
        assert [s.state for s in factory.pin(cfg.gpio.relay_pin).states].count(True) == 0
    finally:
        outbox.close()
        factory.close()


# -- over a real broker ------------------------------------------------------------------------


def send(
    sub: Subscriber,
    topic: str,
    payload: dict[str, Any] | bytes,
    *,
    retain: bool = False,
    response_topic: str | None = None,
) -> bytes:
    """Publish a command with fresh correlation data; returns it."""
    correlation = uuid.uuid4().bytes
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = correlation
    if response_topic is not None:
        props.ResponseTopic = response_topic
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    info = sub.client.publish(topic, body, qos=1, retain=retain, properties=props)
    info.wait_for_publish(5)
    assert info.is_published()
    return correlation


def reply_to(sub: Subscriber, correlation: bytes, timeout: float = 10.0) -> tuple[str, dict[str, Any]]:
    def match(msgs: list[Any]) -> Any:
        return next((m for m in msgs if getattr(m.properties, "CorrelationData", None) == correlation), None)

    assert sub.wait_for(lambda msgs: match(msgs) is not None, timeout), "no reply"
    msg = match(sub.messages)
    body = json.loads(msg.payload)
    jsonschema.validate(body, REPLY_SCHEMA)
    assert not msg.retain
    return msg.topic, body


def relay_history(factory: MockFactory, cfg: config_mod.Config) -> list[bool]:
    return [s.state for s in factory.pin(cfg.gpio.relay_pin).states]


def test_signed_open_records_one_event_pulses_once_and_replies_with_the_correlation_data(
    broker, tmp_path, subscribe
):
    cfg = gate_config(broker, tmp_path)
    factory = MockFactory()
    history = energised_relay(factory, cfg.gpio)
    # A sender may name a response topic, but the gate only ever replies on its own reply
    # topic: otherwise a command could make it publish onto its checkin or status topics.
    response_topic = f"operators/{uuid.uuid4().hex}/replies"
    sub = subscribe(cfg.topic("checkin"), cfg.topic("cmd/+/reply"), response_topic)
    try:
        with running(cfg, factory, HeldSource()) as app:
            correlation = send(
                sub, cfg.topic("cmd/open"), signed("open", cfg.device.id), response_topic=response_topic
            )
            topic, body = reply_to(sub, correlation)
            assert topic == cfg.topic("cmd/open/reply")
            assert not sub.payloads(response_topic)
            assert body["ok"] and body["reason"] == "ok" and body["name"] == "open"
            assert sub.wait_for(lambda msgs: any(m.topic == cfg.topic("checkin") for m in msgs))
            (event,) = [json.loads(p) for p in sub.payloads(cfg.topic("checkin"))]
            jsonschema.validate(event, CHECKIN_SCHEMA)
            assert event["credential"]["type"] == "operator"
            assert wait_until(lambda: history() == [True, False, True, False], 5), history()
            assert app.gate is not None and app.gate.reasons == {Reason.OK: 1}
        # Left energised, driven off at start, one pulse for the one open, off at the end.
        assert history() == [True, False, True, False]
    finally:
        factory.close()


@pytest.fixture(scope="module")
def refusing_gate(
    broker, tmp_path_factory
) -> Iterator[tuple[App, config_mod.Config, MockFactory, Subscriber]]:
    """One running gate for every refusal case: nothing sent to it may ever open it."""
    tmp_path = tmp_path_factory.mktemp("refusals")
    cfg = gate_config(broker, tmp_path)
    factory = MockFactory()
    sub = Subscriber(broker, cfg.topic("checkin"), cfg.topic("cmd/+/reply"))
    try:
        with running(cfg, factory, HeldSource()) as app:
            yield app, cfg, factory, sub
    finally:
        sub.close()
        factory.close()


REFUSALS = {
    "stale": lambda dev: signed("open", dev, now=datetime.now(UTC) - timedelta(seconds=120)),
    "unsigned": lambda dev: {k: v for k, v in signed("open", dev).items() if k not in ("sig", "kid")},
    "unknown_key": lambda dev: signed("open", dev, key=STRANGER, kid=STRANGER_KID),
    "bad_signature": lambda dev: _tampered(signed("open", dev)),
    "wrong_device": lambda dev: signed("open", "gate-somewhere-else"),
    "malformed": lambda dev: b"{not json",
}


@pytest.mark.parametrize("reason", [*REFUSALS, "retained", "unknown_command"])
def test_refused_commands_never_move_the_relay_nor_record_an_event(refusing_gate, reason):
    app, cfg, factory, sub = refusing_gate
    if reason == "retained":
        topic = cfg.topic("cmd/open")
        correlation = send(sub, topic, signed("open", cfg.device.id), retain=True)
    elif reason == "unknown_command":
        topic = cfg.topic("cmd/explode")
        correlation = send(sub, topic, signed("explode", cfg.device.id))
    else:
        topic = cfg.topic("cmd/open")
        correlation = send(sub, topic, REFUSALS[reason](cfg.device.id))
    try:
        reply_topic, body = reply_to(sub, correlation)
    finally:
        if reason == "retained":  # clear it; the gate ignores the (empty, retained) deletion
            sub.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    assert reply_topic == f"{topic}/reply"
    assert not body["ok"] and body["reason"] == reason, body
    assert relay_history(factory, cfg).count(True) == 0
    assert sub.payloads(cfg.topic("checkin")) == []
    assert app.gate is not None and sum(app.gate.reasons.values()) == 0


def test_a_replayed_reload_is_refused(refusing_gate):
    _app, cfg, _factory, sub = refusing_gate
    envelope = signed("reload", cfg.device.id)
    _topic, first = reply_to(sub, send(sub, cfg.topic("cmd/reload"), envelope))
    assert first["ok"], first
    _topic, second = reply_to(sub, send(sub, cfg.topic("cmd/reload"), envelope))
    assert not second["ok"] and second["reason"] == "replayed"


def test_selftest_needs_no_signature_and_replies_with_a_health_snapshot(refusing_gate):
    _app, cfg, _factory, sub = refusing_gate
    _topic, body = reply_to(sub, send(sub, cfg.topic("cmd/selftest"), b""))
    assert body["ok"] and body["reason"] == "ok"
    jsonschema.validate(body["result"], HEALTH_SCHEMA)


def test_hostile_payloads_get_one_malformed_reply_each_and_run_off_the_pipeline_thread(
    refusing_gate, monkeypatch
):
    _app, cfg, factory, sub = refusing_gate
    threads: list[str] = []
    real_verify = commands.Verifier.verify

    def recording_verify(self, inbound, now):
        threads.append(threading.current_thread().name)
        return real_verify(self, inbound, now)

    monkeypatch.setattr(commands.Verifier, "verify", recording_verify)
    deep = b"[" * 8000 + b"]" * 8000  # under the size limit, past the JSON parser's stack
    big = b'{"pad": "' + b"x" * (4 * 1024 * 1024 - 16) + b'"}'  # 4 MiB: a lists payload's size
    for name, payload, detail in (
        ("open", deep, "JSON nested too deep"),
        ("selftest", deep, "JSON nested too deep"),
        ("open", big, f"payload over {commands.MAX_SMALL_PAYLOAD} bytes"),
        ("selftest", big, f"payload over {commands.MAX_SMALL_PAYLOAD} bytes"),
    ):
        _topic, body = reply_to(sub, send(sub, cfg.topic(f"cmd/{name}"), payload))
        assert not body["ok"] and body["reason"] == "malformed" and body["detail"] == detail, (name, body)
    # Verified on the commands thread: parsing (up to a 4 MiB lists) never holds up a frame.
    assert threads and set(threads) == {"commands"}
    assert not any(relay_history(factory, cfg))


def test_an_oversized_command_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    check = verifier(unit_config(tmp_path))

    def no_parsing(*_args, **_kw):
        raise AssertionError("parsed a payload its size had already refused")

    monkeypatch.setattr(commands.json, "loads", no_parsing)
    big = inbound(b"{" + b" " * commands.MAX_SMALL_PAYLOAD + b"}", name="open")
    with pytest.raises(Refused) as refusal:
        check.verify(big, NOW)
    assert refusal.value.reason == "malformed"


def test_lists_replaces_the_deny_list_and_the_next_scan_is_denylisted(broker, tmp_path, subscribe):
    deny = tmp_path / "deny.txt"
    deny.write_text("# version: 1\n")
    cfg = gate_config(broker, tmp_path, policy={"denylist_file": str(deny), "anti_passback_s": 0.0})
    factory = MockFactory()
    source = HeldSource()
    sub = subscribe(cfg.topic("checkin"), cfg.topic("cmd/+/reply"), cfg.topic("status"))
    try:
        with running(cfg, factory, source) as app:
            new_list = "# version: 2\n# issued: 2026-11-29T06:00:00Z\nEMP-0001\n"
            envelope = signed("lists", cfg.device.id, args={"denylist": new_list})
            _topic, body = reply_to(sub, send(sub, cfg.topic("cmd/lists"), envelope))
            assert body["ok"], body
            assert deny.read_text() == new_list
            assert app.status()["lists"]["denylist"]["version"] == "2"
            source.image = CODE_FRAME
            assert sub.wait_for(lambda msgs: any(m.topic == cfg.topic("checkin") for m in msgs))
            event = json.loads(sub.payloads(cfg.topic("checkin"))[0])
            assert event["decision"] == "rejected" and event["reason"] == "denylisted"
            # A list name without a configured path refuses the whole command.
            envelope = signed("lists", cfg.device.id, args={"allowlist": "EMP-0001\n"})
            _topic, body = reply_to(sub, send(sub, cfg.topic("cmd/lists"), envelope))
            assert not body["ok"] and body["reason"] == "not_configured"
        assert relay_history(factory, cfg).count(True) == 0
    finally:
        factory.close()


def test_cli_send_publishes_and_prints_the_reply(refusing_gate, tmp_path, capsys):
    _app, cfg, _factory, _sub = refusing_gate
    config = tmp_path / "operator.toml"
    config.write_text(
        '[device]\nid = "operator"\nsite = "control"\n'
        f'[mqtt]\nhost = "{cfg.mqtt.host}"\nport = {cfg.mqtt.port}\n'
    )
    argv = ["cmd", "send", "--config", str(config), "--site", cfg.device.site, "--device", cfg.device.id]
    assert cli.main([*argv, "--name", "selftest", "--timeout", "10"]) == 0
    reply = json.loads(capsys.readouterr().out)
    jsonschema.validate(reply, REPLY_SCHEMA)
    assert reply["ok"] and reply["name"] == "selftest"
