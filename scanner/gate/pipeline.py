"""The scan path: frame → symbols → new scans → credential → decision → committed event → signals.

:class:`Gate` owns the order that is the gate's safety promise: the event is durable in the
outbox before the relay moves, so nobody enters without a record; when the record cannot be
written the scan is rejected and the gate shows its fault pattern. The one exception is the
exit button, which opens first and records after (:mod:`scanner.gate.door`): nobody is ever
locked in. :class:`Alarms` is the set of named faults the retained ``status`` carries.
Nothing here starts a thread or opens a device: the composition root (:mod:`scanner.gate.app`)
builds these and drives them.

Every event goes through :meth:`Gate._commit`, from the pipeline thread (scans, remote opens)
and from the door thread (exit button, forced passage, annulment), one at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from scanner import credentials, events
from scanner.config import Config
from scanner.credentials.dcc import DccRules
from scanner.gate import health, lists, policy, telemetry
from scanner.gate.decode import Decoder
from scanner.gate.door import Admission
from scanner.gate.occupancy import STATE_KEY, Occupancy
from scanner.gate.outbox import Outbox, OutboxError
from scanner.gate.signals import Signals
from scanner.gate.track import PresenceTracker
from scanner.models import CheckinEvent, CredentialType, Decision, Frame, Reason

log = logging.getLogger(__name__)

# Alarms that mean the gate cannot do its job: the red fault pattern shows while any is active.
FAULT_ALARMS = frozenset({"outbox", "camera", "decoder"})


def show_fault(signals: Signals, alarms: Alarms) -> None:
    """Fault pattern on exactly while a fault alarm is active: one cause clearing must not
    hide another (the camera coming back while the outbox is still full)."""
    signals.set_fault(bool(FAULT_ALARMS & alarms.snapshot().keys()))


class Clock(Protocol):
    def now(self) -> datetime: ...
    def monotonic(self) -> float: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


class Alarms:
    """Named faults shown in retained ``status``; a change re-publishes it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[str, str] = {}
        self.on_change: Callable[[], None] = lambda: None

    def raise_(self, name: str, detail: str) -> None:
        with self._lock:
            changed = self._active.get(name) != detail
            self._active[name] = detail
        if changed:
            log.error("alarm %s: %s", name, detail)
            self.on_change()

    def clear(self, name: str) -> None:
        with self._lock:
            changed = self._active.pop(name, None) is not None
        if changed:
            log.warning("alarm %s cleared", name)
            self.on_change()

    def snapshot(self) -> dict[str, str]:
        with self._lock:
            return dict(self._active)


@dataclass(frozen=True, slots=True)
class Outcome:
    decision: Decision
    seq: int | None  # None when the event could not be committed (gate failed secure)


class Gate:
    """Frame → symbols → new scans → credential → decision → committed event → signals.

    The order inside ``_scan`` is the safety promise: the event is durable in the outbox
    before the relay moves, so nobody enters without a record; if the record cannot be
    written the scan is rejected and the gate shows its fault pattern.
    """

    def __init__(
        self,
        config: Config,
        *,
        decoder: Decoder,
        outbox: Outbox,
        signals: Signals,
        pseudonymizer: events.Pseudonymizer,
        clock: Clock,
        alarms: Alarms,
        trust: lists.TrustData | None = None,
        on_committed: Callable[[], None] = lambda: None,
        on_admitted: Callable[[Admission], None] = lambda _admission: None,
        clock_synced: Callable[[], bool] = health.clock_synced,
        occupancy: Occupancy | None = None,
    ) -> None:
        self._config = config
        self._decoder = decoder
        self._tracker = PresenceTracker(config.track.gone_after_s)
        self._rules = policy.Rules.from_config(config)
        self._dcc_rules = DccRules.from_config(config.dcc)
        self._outbox = outbox
        self._signals = signals
        self._pseudonymizer = pseudonymizer
        self._clock = clock
        self._alarms = alarms
        self._on_committed = on_committed
        self._on_admitted = on_admitted
        self._clock_synced = clock_synced
        self._ids = events.Uuid7()
        # Scans (pipeline thread) and operator commands (commands thread) decide and commit
        # one at a time: each sees the other's anti-passback record and the site's count.
        self._lock = threading.Lock()
        # Every event passes _commit, whatever thread makes it (a scan, a command, the door):
        # one at a time, so the count staged with an event is the count it is committed with,
        # and whatever a commit sets off sees the events in seq order. Taken inside _lock.
        self._commit_lock = threading.Lock()
        self.occupancy = occupancy or Occupancy(
            config,
            now=clock.now,
            monotonic=clock.monotonic,
            clock_synced=clock_synced,
            saved=outbox.saved_state(STATE_KEY),
            alarms=alarms,
        )
        self._last_accept: dict[bytes, float] = {}
        self._passback_lock = threading.Lock()  # the door thread forgets what an annulment undid
        self._count_lock = threading.Lock()
        self.reasons: Counter[str] = Counter()
        # Telemetry, read by the telemetry thread: plain counters and a bounded ring (one
        # append per frame), so measuring costs the pipeline nothing it would notice.
        self.frames = 0
        self.decode_ms: deque[float] = deque(maxlen=telemetry.DECODE_RING)
        self.set_trust(trust if trust is not None else lists.load(config))

    @property
    def trust(self) -> lists.TrustData:
        return self._state[0]

    def set_trust(self, trust: lists.TrustData) -> None:
        """Swap in new lists. One attribute assignment: a scan sees the old or the new set, never a mix."""
        reader = credentials.reader_for(
            pass_trust=trust.pass_trust, dcc_trust=trust.dcc_trust, dcc_rules=self._dcc_rules
        )
        self._state = (trust, reader)

    def process(self, frame: Frame) -> list[Outcome]:
        started = time.perf_counter()
        symbols = self._decoder.decode(frame.image)
        self.decode_ms.append((time.perf_counter() - started) * 1000)
        self.frames += 1
        fresh = self._tracker.update((s.payload for s in symbols), frame.captured)
        return [self._scan(payload) for payload in fresh]

    def _scan(self, payload: bytes) -> Outcome:
        with self._lock:
            return self._scan_locked(payload)

    def _scan_locked(self, payload: bytes) -> Outcome:
        trust, reader = self._state
        scanned_at = self._clock.now()
        credential = reader.parse(payload, scanned_at)
        subject = self._pseudonymizer.subject(str(credential.type), credential.identity)
        # Anti-passback keys on who, not on which code: a card's QR and its number typed as a
        # plain code, or two passes of one subject, are the same person twice.
        passback_key = credential.identity
        now_mono = self._clock.monotonic()
        with self._passback_lock:
            last = self._last_accept.get(passback_key) if credential.identity else None
        decision = policy.decide(
            credential,
            subject=subject,
            rules=self._rules,
            trust=trust,
            now=scanned_at,
            since_last_accept_s=None if last is None else now_mono - last,
            inside=self.occupancy.inside() if self._rules.capacity else 0,
        )
        synced = self._clock_synced()
        device = self._config.device
        made: list[str] = []

        def build(seq: int, _created: str) -> bytes:
            made.append(self._ids.new(int(scanned_at.timestamp() * 1000)))
            event = events.build_event(
                decision,
                seq=seq,
                event_id=made[-1],
                device=device.id,
                site=device.site,
                direction=device.direction,
                scanned_at=scanned_at,
                clock_synced=synced,
                subject=subject,
            )
            return events.to_json(event)

        try:
            seq = self._commit(build)
        except OutboxError as exc:
            self._signals.rejected()
            self._count(Reason.DEVICE_FAULT)
            log.error("scan rejected: the check-in could not be recorded (%s); gate fails secure", exc)
            return Outcome(Decision(False, Reason.DEVICE_FAULT, credential, str(exc)), None)
        # Only now, with the record durable, may the door open.
        if decision.accepted:
            remembered = self._remember_accept(passback_key, now_mono)
            # Before the relay moves: the passage it lets through must find its admission.
            self._on_admitted(
                Admission(
                    made[-1],
                    device.direction,
                    str(credential.type),
                    subject,
                    credential.issuer,
                    passback_key if remembered else None,
                )
            )
            self._signals.accepted()
        else:
            self._signals.rejected()
        self._count(decision.reason)
        log.info(
            "seq=%d %s reason=%s type=%s%s%s",
            seq,
            decision.outcome,
            decision.reason,
            credential.type,
            f" ({decision.detail})" if decision.detail else "",
            f" flags={','.join(decision.flags)}" if decision.flags else "",
        )
        self._on_committed()
        return Outcome(decision, seq)

    def remote_open(self, kid: str) -> tuple[bool, str]:
        """An operator's signed ``open``: an entry without a credential, recorded like any other.

        The event (decision accepted, reason ok, credential type ``operator`` with the
        operator key id as issuer) is committed before the relay moves; if it cannot be
        committed the gate stays shut and shows its fault, exactly as for a scan.
        """
        with self._lock:
            rules = self._rules
            direction = self._config.device.direction
            # The operator's word beats the cap, but the record says the site was full.
            full = rules.capacity > 0 and direction == "in" and self.occupancy.inside() >= rules.capacity
            try:
                seq, event_id = self._record(
                    direction,
                    "accepted",
                    Reason.OK,
                    "operator",
                    issuer=kid or None,
                    flags=(policy.OVER_CAPACITY_FLAG,) if full else (),
                )
            except OutboxError as exc:
                log.error("remote open refused: it could not be recorded (%s); gate stays shut", exc)
                return False, f"the open could not be recorded ({exc}); the gate stays shut"
            self._on_admitted(Admission(event_id, direction, "operator", issuer=kid or None))
            self._signals.accepted()  # only now, with the record durable
        log.info("seq=%d accepted reason=ok type=operator (remote open, kid %s)", seq, kid or "-")
        return True, f"opened; recorded as seq {seq}"

    def set_occupancy(self, kid: str, inside: int) -> tuple[bool, str]:
        """An operator's signed correction: the site has ``inside`` people in it now.

        It is an event like any other (``occupancy_set``, credential ``operator``), so the
        record shows who changed what; counting it makes this gate's counter carry the
        difference, which reaches every sibling. No relay moves.
        """
        with self._lock:
            before = self.occupancy.inside()
            try:
                seq, _ = self._record(
                    self._config.device.direction,
                    "accepted",
                    Reason.OCCUPANCY_SET,
                    "operator",
                    issuer=kid or None,
                    occupancy=inside,
                )
            except OutboxError as exc:
                log.error("occupancy correction refused: it could not be recorded (%s)", exc)
                return False, f"the correction could not be recorded ({exc}); the count is unchanged"
        log.info(
            "seq=%d accepted reason=occupancy_set type=operator (kid %s): %d inside, was %d",
            seq,
            kid or "-",
            inside,
            before,
        )
        return True, f"the site's count is set to {inside} (was {before}); recorded as seq {seq}"

    # -- the door's events (door thread; scanner.gate.door.Recorder) ------------------------------

    def record_exit(self) -> Admission:
        """The exit button opened the door from inside (the relay is already on): an exit, with no
        subject. Raises OutboxError, with the alarm up, when it cannot be recorded."""
        seq, event_id = self._record("out", "accepted", Reason.EXIT_REQUEST, CredentialType.EXIT_BUTTON)
        log.info("seq=%d accepted reason=exit_request type=exit_button", seq)
        return Admission(event_id, "out", str(CredentialType.EXIT_BUTTON))

    def record_forced(self) -> None:
        """A passage nobody was let through: a forced door, or someone following on another's accept."""
        direction = self._config.device.direction
        seq, _ = self._record(direction, "rejected", Reason.FORCED_PASSAGE, CredentialType.NONE)
        log.warning("seq=%d rejected reason=forced_passage type=none", seq)

    def record_annulment(self, admission: Admission) -> None:
        """Nobody passed after ``admission``: a new event names it, so nobody counts that entry."""
        seq, _ = self._record(
            admission.direction,
            "annulled",
            Reason.NO_PASSAGE,
            admission.credential_type,
            subject=admission.subject,
            issuer=admission.issuer,
            annuls=admission.event_id,
        )
        if admission.passback is not None:
            with self._passback_lock:  # the credential did not get anyone in: it may be shown again
                self._last_accept.pop(admission.passback, None)
        log.info(
            "seq=%d annulled reason=no_passage type=%s annuls=%s",
            seq,
            admission.credential_type,
            admission.event_id,
        )

    def _record(
        self,
        direction: str,
        decision: str,
        reason: Reason,
        credential_type: str,
        *,
        subject: str | None = None,
        issuer: str | None = None,
        annuls: str | None = None,
        flags: tuple[str, ...] = (),
        occupancy: int | None = None,
    ) -> tuple[int, str]:
        """Commit an event that no scan produced; (seq, event_id). Raises OutboxError."""
        at = self._clock.now()
        synced = self._clock_synced()
        device = self._config.device
        made: list[str] = []

        def build(seq: int, _created: str) -> bytes:
            made.append(self._ids.new(int(at.timestamp() * 1000)))
            return events.to_json(
                CheckinEvent(
                    event_id=made[-1],
                    seq=seq,
                    device=device.id,
                    site=device.site,
                    direction=direction,
                    ts=events.utc_ms(at),
                    clock_synced=synced,
                    decision=decision,
                    reason=str(reason),
                    credential_type=str(credential_type),
                    subject=subject,
                    issuer=issuer,
                    flags=flags,
                    annuls=annuls,
                    occupancy=occupancy,
                )
            )

        seq = self._commit(build)
        self._count(reason)
        self._on_committed()
        return seq, made[-1]

    def _count(self, reason: str) -> None:
        with self._count_lock:  # two threads count: a bare += can lose one
            self.reasons[reason] += 1

    def _commit(self, build: Callable[[int, str], bytes]) -> int:
        """Append one event durably and return its seq. On OutboxError the ``outbox`` alarm and
        the fault pattern are already up when it reaches the caller, who keeps the door shut.

        The site's count is derived from the committed bytes, in the same transaction, so
        every event counts by the same rule whoever made it."""
        with self._commit_lock:
            try:
                seq = self._outbox.append(build, state=self.occupancy.stage)
            except BaseException as exc:
                self.occupancy.discard()
                if isinstance(exc, OutboxError):
                    self._signals.set_fault(True)
                    self._alarms.raise_("outbox", f"cannot record check-ins: {exc}")
                raise
            self.occupancy.committed()
            if "outbox" in self._alarms.snapshot():
                self._alarms.clear("outbox")
                show_fault(self._signals, self._alarms)
            return seq

    def _remember_accept(self, key: bytes, now_mono: float) -> bool:
        window = self._rules.anti_passback_s
        if window <= 0:
            # With anti-passback off, policy.decide never reads what is remembered, so saying
            # True here (and remembering) would change no decision.
            return False  # pragma: no mutate
        with self._passback_lock:
            self._last_accept[key] = now_mono
            if len(self._last_accept) > 4096:  # a busy day: forget what is past the window
                self._last_accept = {k: t for k, t in self._last_accept.items() if now_mono - t < window}
        return True
