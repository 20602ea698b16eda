"""Operator commands on ``cmd/{name}``: verify, refuse or execute; reply on ``cmd/{name}/reply``.

Commands that open the gate, change what it trusts or correct the site's count (``open``,
``reload``, ``lists``, ``occupancy``) must arrive in a signed envelope::

    {"schema": "gate-scanner/cmd/1", "name": "open", "device": "gate-01",
     "ts": "2026-11-29T07:31:02.114Z", "nonce": "<32 hex>", "args": {}, "kid": "<8 hex>",
     "sig": "<base64 Ed25519 signature>"}

The signature covers ``CONTEXT`` followed by the UTF-8 JSON of the envelope without ``sig``,
keys sorted, no spaces (:func:`canonical`). The context string keeps a command signature
from ever being valid as a pass signature (and the other way round) even if an operator key
were also a pass issuer key. A command is refused when it is retained, unsigned, signed by a
key not in ``commands.operator_keys_file``, badly signed, for another device, older or newer
than ``commands.max_age_s``, signed before this process started, a nonce already executed, or
older than an executed command allows (:class:`ReplayGuard`). Executed nonces and that floor
are kept in ``<storage.dir>/cmd-replay.json``, written before the command runs: a gate without
a real-time clock boots with its clock set back, and an in-memory cache alone would let a
command captured before the reboot run again. ``selftest`` is read-only and needs no signature.

Threads: paho's callback only enqueues an :class:`Inbound`; the app drains that queue on
the pipeline thread and calls :meth:`CommandHandler.handle`. Verification (for a signed
command one small synced write of the replay file) and ``open`` (one outbox commit, then the
relay) run there; ``reload`` and ``lists`` write more and run on a worker thread, so no frame
waits for them.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeGuard

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from scanner import durable
from scanner.config import Config
from scanner.credentials.dcc import DccTrustList
from scanner.credentials.signed import KID_BYTES, TrustStore
from scanner.events import parse_utc, utc_ms
from scanner.gate import lists
from scanner.gate.publisher import Inbound

log = logging.getLogger(__name__)

SCHEMA = "gate-scanner/cmd/1"
REPLY_SCHEMA = "gate-scanner/cmd-reply/1"
CONTEXT = b"gate-scanner/cmd/1\x00"
SIGNED = frozenset({"open", "reload", "lists", "occupancy"})
KNOWN = SIGNED | {"selftest"}
# ``lists`` argument name → the [policy] key holding that list's path.
LIST_KEYS = {
    "allowlist": "allowlist_file",
    "denylist": "denylist_file",
    "revocation": "revocation_file",
    "pass_trust": "pass_trust_file",
    "dcc_trust": "dcc_trust_file",
}
NONCE_CACHE_MAX = 4096
REPLAY_FILE = "cmd-replay.json"  # in storage.dir
REPLAY_SCHEMA = "gate-scanner/cmd-replay/1"
_NONCE = re.compile(r"[0-9a-f]{16,64}")
_ENVELOPE_KEYS = {"schema", "name", "device", "ts", "nonce", "args", "kid", "sig"}
_START_GRACE = timedelta(seconds=2)
MAX_PAYLOAD = 4 * 1024 * 1024  # lists of a large site fit; anything bigger is refused unread
MAX_INSIDE = 1_000_000  # the contract's bound on a count (checkin schema: occupancy.inside)
# Every command but ``lists`` is an envelope of a few hundred bytes: refusing a bigger one
# before parsing keeps a flood of 4 MiB "open" messages from costing anything but their size.
MAX_SMALL_PAYLOAD = 16 * 1024


def payload_limit(name: str) -> int:
    return MAX_PAYLOAD if name == "lists" else MAX_SMALL_PAYLOAD


@dataclass(frozen=True, slots=True)
class Envelope:
    name: str
    device: str
    ts: datetime
    nonce: str
    args: dict[str, Any]
    kid: str | None


class Refused(Exception):
    """A command not executed; ``reason`` is the reply's reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# -- signing --------------------------------------------------------------------------------


def canonical(envelope: dict[str, Any]) -> bytes:
    """The signed bytes: CONTEXT + JSON of the envelope without ``sig``, sorted keys, no spaces."""
    body = {k: v for k, v in envelope.items() if k != "sig"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return CONTEXT + text.encode("utf-8")


def sign(
    key: Ed25519PrivateKey,
    kid: bytes,
    *,
    device: str,
    name: str,
    args: dict[str, Any] | None = None,
    now: datetime | None = None,
    nonce: str | None = None,
) -> dict[str, Any]:
    """A signed command envelope (what ``gate-scanner cmd sign`` prints)."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    envelope: dict[str, Any] = {
        "schema": SCHEMA,
        "name": name,
        "device": device,
        "ts": utc_ms(moment),
        "nonce": nonce or secrets.token_hex(16),
        "args": args or {},
        "kid": kid.hex(),
    }
    envelope["sig"] = base64.b64encode(key.sign(canonical(envelope))).decode("ascii")
    return envelope


def load_operator_keys(path: Path | None) -> TrustStore | None:
    """The operator key store (pass trust store format), or None when not configured."""
    if path is None:
        return None
    return TrustStore.load(path)


# -- replay protection ----------------------------------------------------------------------


class ReplayGuard:
    """Which signed commands may still run, kept on disk so a restart does not forget it.

    Refuses a nonce already executed and any ts before ``floor``; ``floor`` trails the highest
    executed ts by ``max_age`` (older ones would be stale to the operator who sent that one), so
    only nonces at or above it need keeping. Pruning against the floor rather than the wall
    clock keeps this right when the clock is wound back. Bounded: when full of live nonces a new
    command is refused ("busy") rather than an old nonce forgotten.
    """

    def __init__(
        self, path: Path, max_age: float, *, now: datetime, max_entries: int = NONCE_CACHE_MAX
    ) -> None:
        self._path = path
        self._max_age = timedelta(seconds=max_age)
        self._max = max_entries
        self.floor: datetime | None = None
        self.highest: datetime | None = None
        self.nonces: dict[str, datetime] = {}  # nonce → its command's ts
        self._load(now)

    def __len__(self) -> int:
        return len(self.nonces)

    def _load(self, now: datetime) -> None:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return  # first start: only the started barrier applies, as it always did
        except OSError as exc:
            self._fall_back(now, f"cannot read it: {exc}")
            return
        try:
            document = json.loads(raw.decode("utf-8"))
            if not isinstance(document, dict) or document.get("schema") != REPLAY_SCHEMA:
                raise ValueError(f"schema is not {REPLAY_SCHEMA!r}")
            floor, highest, nonces = document["floor"], document["highest"], document["nonces"]
            if not isinstance(nonces, dict) or not all(_NONCE.fullmatch(n) for n in nonces):
                raise ValueError("nonces must map hex nonces to times")
            self.floor = None if floor is None else _stored_time(floor)
            self.highest = None if highest is None else _stored_time(highest)
            self.nonces = {n: _stored_time(t) for n, t in nonces.items()}
            if self.highest is not None:
                # max_age_s may have grown since: nonces below the old floor are gone, keep refusing them.
                self._raise_floor(self.highest - self._max_age)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, OverflowError) as exc:
            self.floor, self.highest, self.nonces = None, None, {}
            self._fall_back(now, f"corrupt: {exc}")

    def _fall_back(self, now: datetime, why: str) -> None:
        # The executed nonces are lost. Every command executed so far was within max_age of the
        # gate's clock when the file was last written, i.e. its ts is at most mtime + max_age:
        # refusing ts up to there refuses them all, and the gate takes commands again once its
        # clock has passed that (not never). Without an mtime the start time is all there is; a
        # file that cannot be read is seldom in a directory that can be written, and the first
        # command then fails closed when its nonce cannot be recorded.
        try:
            mtime = datetime.fromtimestamp(self._path.stat().st_mtime, UTC)
            self._raise_floor(mtime + self._max_age + _START_GRACE)
        except (OSError, OverflowError, ValueError):
            self._raise_floor(now)
        log.warning(
            "%s is %s; refusing signed commands with ts before %s (it is rewritten by the next one)",
            self._path,
            why,
            self.floor.isoformat() if self.floor else "-",
        )

    def _raise_floor(self, floor: datetime) -> None:
        if self.floor is None or floor > self.floor:
            self.floor = floor

    def admit(self, nonce: str, ts: datetime) -> None:
        """Record the command as executed, durably; raises Refused if it may not run."""
        if self.floor is not None and ts < self.floor:
            raise Refused(
                "replayed", f"ts is older than an executed command allows ({self.floor.isoformat()})"
            )
        if nonce in self.nonces:
            raise Refused("replayed", "nonce already used")
        highest = ts if self.highest is None or ts > self.highest else self.highest
        floor = highest - self._max_age
        if self.floor is not None and self.floor > floor:
            floor = self.floor
        nonces = {n: t for n, t in self.nonces.items() if t >= floor}
        if len(nonces) >= self._max:
            raise Refused("busy", "too many recent commands; try again later")
        nonces[nonce] = ts
        document = {
            "schema": REPLAY_SCHEMA,
            "floor": floor.isoformat(),
            "highest": highest.isoformat(),
            "nonces": {n: t.isoformat() for n, t in nonces.items()},
        }
        data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")
        try:
            durable.replace_file(self._path, data)
        except OSError as exc:
            # Executing without the record would make this command replayable after a reboot.
            raise Refused("failed", f"cannot record the command's nonce in {self._path}: {exc}") from None
        self.floor, self.highest, self.nonces = floor, highest, nonces


def _stored_time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError("times must be strings")
    return parse_utc(value)


# -- verifying ------------------------------------------------------------------------------


def parse_time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise Refused("malformed", "ts must be an RFC 3339 string")
    try:
        return parse_utc(value)
    except ValueError as exc:
        raise Refused("malformed", f"ts is not an RFC 3339 time with an offset: {exc}") from None


def load_document(inbound: Inbound) -> dict[str, Any]:
    """The payload as a JSON object (an empty payload is an empty object)."""
    limit = payload_limit(inbound.name)
    if len(inbound.payload) > limit:
        raise Refused("malformed", f"payload over {limit} bytes")
    try:
        document = json.loads(inbound.payload.decode("utf-8")) if inbound.payload.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Refused("malformed", f"not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise Refused("malformed", "JSON nested too deep") from None
    if not isinstance(document, dict):
        raise Refused("malformed", "expected a JSON object")
    return document


def parse(inbound: Inbound, document: dict[str, Any]) -> Envelope:
    """Structure only (no keys, no clock): the typed view of an envelope."""
    unknown = set(document) - _ENVELOPE_KEYS
    if unknown:
        raise Refused("malformed", f"unknown fields {sorted(unknown)}")
    if document.get("schema") != SCHEMA:
        raise Refused("malformed", f"schema must be {SCHEMA!r}")
    if document.get("name") != inbound.name:
        raise Refused("malformed", f"name {document.get('name')!r} is not the topic's {inbound.name!r}")
    device = document.get("device")
    if not isinstance(device, str):
        raise Refused("malformed", "device must be a string")
    nonce = document.get("nonce")
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        raise Refused("malformed", "nonce must be 16-64 lowercase hex digits")
    args = document.get("args", {})
    if not isinstance(args, dict):
        raise Refused("malformed", "args must be an object")
    kid = document.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise Refused("malformed", "kid must be a hex string")
    return Envelope(inbound.name, device, parse_time(document.get("ts")), nonce, args, kid)


class Verifier:
    """Checks signature, device, age and nonce of signed commands. Pipeline thread only."""

    def __init__(
        self,
        config: Config,
        keys: TrustStore | None,
        *,
        started: datetime,
        max_nonces: int = NONCE_CACHE_MAX,
    ) -> None:
        self._device = config.device.id
        self._max_age = config.commands.max_age_s
        # MQTT 3.1.1 clears the retain flag on live delivery, so a retained command published
        # while we are connected would look like any other: signed commands need v5.
        self._v5 = config.mqtt.protocol == "5"
        self._keys = keys
        self._started = started
        self._replay = ReplayGuard(
            config.storage.dir / REPLAY_FILE, self._max_age, now=started, max_entries=max_nonces
        )

    def set_keys(self, keys: TrustStore | None) -> None:
        self._keys = keys

    def verify(self, inbound: Inbound, now: datetime) -> Envelope:
        if inbound.name not in KNOWN:
            known = ", ".join(sorted(KNOWN))
            raise Refused("unknown_command", f"no command {inbound.name!r}; known: {known}")
        # What can be refused without reading the payload is refused first: its size, and a
        # gate that takes no signed commands at all.
        signed = inbound.name in SIGNED
        keys = self._keys
        if signed and keys is None:
            raise Refused("not_configured", "commands.operator_keys_file is not set: signed commands are off")
        if signed and not self._v5:
            raise Refused("not_configured", 'signed commands need mqtt.protocol = "5" (3.1.1 hides retain)')
        document = load_document(inbound)
        if not signed:
            # Read-only: no signature needed, and an empty payload will do.
            if not document:
                return Envelope(inbound.name, "", now, "", {}, None)
            return parse(inbound, document)
        if "sig" not in document or "kid" not in document:
            raise Refused("unsigned", f"{inbound.name} must be signed by an operator key")
        envelope = parse(inbound, document)
        try:
            kid = bytes.fromhex(envelope.kid or "")
            signature = base64.b64decode(document["sig"], validate=True)
        except (ValueError, TypeError, binascii.Error):
            raise Refused("malformed", "kid must be hex and sig base64") from None
        if len(kid) != KID_BYTES:
            raise Refused("malformed", f"kid must be {KID_BYTES} bytes")
        assert keys is not None  # signed, so checked above
        trusted = keys.key(kid)
        if trusted is None:
            raise Refused("unknown_key", f"kid {kid.hex()} is not an operator key of this gate")
        try:
            trusted.public_key.verify(signature, canonical(document))
        except (InvalidSignature, ValueError):
            raise Refused("bad_signature", f"signature does not verify under kid {kid.hex()}") from None
        if envelope.device != self._device:
            raise Refused("wrong_device", f"command is for {envelope.device!r}, this is {self._device!r}")
        skew = (now - envelope.ts).total_seconds()
        if abs(skew) > self._max_age:
            raise Refused("stale", f"ts is {skew:+.0f} s from the gate's clock (limit {self._max_age:.0f} s)")
        # Kept although the nonces now survive a restart: it is the only barrier on a first start
        # or after the replay file was lost (2 s for clock granularity and skew).
        if envelope.ts < self._started - _START_GRACE:
            raise Refused("stale", "signed before this gate started")
        self._replay.admit(envelope.nonce, envelope.ts)
        return envelope


# -- lists ----------------------------------------------------------------------------------


def write_lists(config: Config, args: dict[str, Any]) -> list[str]:
    """Validate every list in ``args``, then replace each file atomically (temp, fsync, rename).

    All are validated before any is replaced, so a bad deny list cannot leave a new allow list
    next to an old deny list. Returns the names written. Raises Refused.
    """
    if not args:
        raise Refused("malformed", f"args must name at least one of {', '.join(LIST_KEYS)}")
    unknown = set(args) - set(LIST_KEYS)
    if unknown:
        raise Refused("malformed", f"unknown lists {sorted(unknown)}; known: {', '.join(LIST_KEYS)}")
    staged: list[tuple[str, Path, Path]] = []
    try:
        for name, value in args.items():
            path = getattr(config.policy, LIST_KEYS[name])
            if path is None:
                raise Refused("not_configured", f"policy.{LIST_KEYS[name]} is not set: no place for {name}")
            if isinstance(value, dict) and name in ("pass_trust", "dcc_trust"):
                value = json.dumps(value, indent=2) + "\n"
            if not isinstance(value, str):
                raise Refused("malformed", f"{name}: expected the file's text")
            try:
                tmp = durable.write_temp(path, value.encode("utf-8"))
            except OSError as exc:
                raise Refused("failed", f"{name}: cannot write {path}, the old list is kept: {exc}") from None
            staged.append((name, tmp, path))
            try:
                if name == "pass_trust":
                    TrustStore.load(tmp)
                elif name == "dcc_trust":
                    DccTrustList.load(tmp)
                else:
                    lists.read_text_list(name, tmp)
            except Exception as exc:
                raise Refused("malformed", f"{name}: {exc}") from None
        for _name, tmp, path in staged:
            os.replace(tmp, path)
        for directory in {path.parent for _n, _t, path in staged}:
            durable.fsync_dir(directory)
    except OSError as exc:
        raise Refused("failed", f"cannot write lists: {exc}") from None
    finally:
        for _name, tmp, _path in staged:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return [name for name, _t, _p in staged]


# -- executing ------------------------------------------------------------------------------


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INSIDE


def reply_body(
    name: str, device: str, *, ok: bool, reason: str, detail: str = "", result: Any = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema": REPLY_SCHEMA,
        "name": name,
        "device": device,
        "ok": ok,
        "reason": reason,
        "detail": detail,
    }
    if result is not None:
        body["result"] = result
    return body


Publish = Callable[[str, bytes, bytes | None], None]  # (topic, payload, correlation data)


class CommandHandler:
    """Runs verified commands; every command gets exactly one reply (unless it was a retained delete).

    ``open_gate(kid) -> (ok, detail)`` commits an event and pulses the relay and
    ``set_occupancy(kid, inside) -> (ok, detail)`` commits a correction (pipeline thread);
    ``reload() -> (ok, detail)`` and the list writes run on a worker thread.
    """

    def __init__(
        self,
        config: Config,
        verifier: Verifier,
        *,
        now: Callable[[], datetime],
        publish: Publish,
        open_gate: Callable[[str], tuple[bool, str]],
        reload: Callable[[], tuple[bool, str]],
        snapshot: Callable[[], dict[str, Any]],
        set_occupancy: Callable[[str, int], tuple[bool, str]],
    ) -> None:
        self._config = config
        self._verifier = verifier
        self._now = now
        self._publish = publish
        self._open_gate = open_gate
        self._reload = reload
        self._snapshot = snapshot
        self._set_occupancy = set_occupancy
        self._disk_lock = threading.Lock()  # one reload or list write at a time
        self.executed: list[str] = []  # names, for tests and logs

    def handle(self, inbound: Inbound) -> None:
        name = inbound.name
        if inbound.retain:
            if not inbound.payload:
                return  # someone clearing a retained command: nothing to answer
            log.warning("refused retained command %r: commands are never retained", name)
            self._reply(inbound, ok=False, reason="retained", detail="a retained command is never executed")
            return
        try:
            envelope = self._verifier.verify(inbound, self._now())
        except Refused as refusal:
            log.warning("refused command %r: %s (%s)", name, refusal.reason, refusal.detail)
            self._reply(inbound, ok=False, reason=refusal.reason, detail=refusal.detail)
            return
        log.info("command %s (kid %s)", name, envelope.kid or "-")
        if name == "open":
            if envelope.args:
                self._reply(inbound, ok=False, reason="malformed", detail="open takes no args")
                return
            ok, detail = self._open_gate(envelope.kid or "")
            self._done(inbound, ok, "ok" if ok else "failed", detail)
        elif name == "occupancy":
            inside = envelope.args.get("inside")
            if set(envelope.args) != {"inside"} or not _count(inside):
                detail = f'occupancy takes {{"inside": N}} with N a whole number 0..{MAX_INSIDE}'
                self._reply(inbound, ok=False, reason="malformed", detail=detail)
                return
            ok, detail = self._set_occupancy(envelope.kid or "", inside)
            self._done(inbound, ok, "ok" if ok else "failed", detail, {"inside": inside} if ok else None)
        elif name == "selftest":
            self._done(inbound, True, "ok", "placeholder: a health snapshot", self._snapshot())
        elif name == "reload":
            self._in_worker(inbound, self._reload)
        elif name == "lists":

            def replace() -> tuple[bool, str]:
                written = write_lists(self._config, envelope.args)
                ok, detail = self._reload()
                return ok, f"replaced {', '.join(written)}; {detail}"

            self._in_worker(inbound, replace)

    def _in_worker(self, inbound: Inbound, work: Callable[[], tuple[bool, str]]) -> None:
        def run() -> None:
            with self._disk_lock:
                try:
                    ok, detail = work()
                except Refused as refusal:
                    log.warning("command %s failed: %s (%s)", inbound.name, refusal.reason, refusal.detail)
                    self._reply(inbound, ok=False, reason=refusal.reason, detail=refusal.detail)
                    return
                except Exception as exc:
                    log.exception("command %s failed", inbound.name)
                    self._reply(inbound, ok=False, reason="failed", detail=str(exc))
                    return
            self._done(inbound, ok, "ok" if ok else "failed", detail)

        threading.Thread(target=run, name=f"cmd-{inbound.name}", daemon=True).start()

    def _done(self, inbound: Inbound, ok: bool, reason: str, detail: str, result: Any = None) -> None:
        if ok:
            self.executed.append(inbound.name)
        self._reply(inbound, ok=ok, reason=reason, detail=detail, result=result)

    def _reply(self, inbound: Inbound, *, ok: bool, reason: str, detail: str, result: Any = None) -> None:
        device = self._config.device.id
        body = reply_body(inbound.name, device, ok=ok, reason=reason, detail=detail, result=result)
        topic = self._config.topic(f"cmd/{inbound.name}/reply")
        if inbound.response_topic and inbound.response_topic != topic:
            # A sender must not steer the gate's publish onto another topic (its own checkin or
            # status are writable for it, and the fleet ACL allows no other reply topic).
            log.warning("command %s asked for replies on another topic; replying on %s", inbound.name, topic)
        payload = json.dumps(body, separators=(",", ":"), sort_keys=True, default=str).encode("utf-8")
        self._publish(topic, payload, inbound.correlation_data)
