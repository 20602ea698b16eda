"""Composition root: builds every part from the config, starts them in order, stops in reverse.

This is the only module that picks backends. Hardware and time seams (pin factory, frame
source, clock, systemd notifier) are arguments, so tests and the demo run the same code as
a gate with a real camera and relay.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from scanner import __version__, credentials, events, health, lists, policy
from scanner.camera import FrameSource, open_source
from scanner.camera.slot import LatestFrameSlot
from scanner.camera.watchdog import CameraSupervisor
from scanner.config import Config
from scanner.decode import Decoder
from scanner.models import Decision, Frame, Reason
from scanner.mqtt import Publisher
from scanner.outbox import Outbox, OutboxError
from scanner.signals import Signals, make_pin_factory
from scanner.track import PresenceTracker

log = logging.getLogger(__name__)

# A pipeline that throws on this many frames in a row is broken, not unlucky: exit non-zero
# so systemd restarts the whole process instead of a gate that silently never scans.
_MAX_CONSECUTIVE_ERRORS = 50


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
        clock_synced: Callable[[], bool] = health.clock_synced,
    ) -> None:
        self._config = config
        self._decoder = decoder
        self._tracker = PresenceTracker(config.track.gone_after_s)
        self._rules = policy.Rules.from_config(config)
        self._outbox = outbox
        self._signals = signals
        self._pseudonymizer = pseudonymizer
        self._clock = clock
        self._alarms = alarms
        self._on_committed = on_committed
        self._clock_synced = clock_synced
        self._ids = events.Uuid7()
        self._last_accept: dict[tuple[str, bytes], float] = {}
        self.reasons: Counter[str] = Counter()
        self.set_trust(trust if trust is not None else lists.load(config))

    @property
    def trust(self) -> lists.TrustData:
        return self._state[0]

    def set_trust(self, trust: lists.TrustData) -> None:
        """Swap in new lists. One attribute assignment: a scan sees the old or the new set, never a mix."""
        self._state = (trust, credentials.reader_for(trust, self._config))

    def process(self, frame: Frame) -> list[Outcome]:
        symbols = self._decoder.decode(frame.image)
        fresh = self._tracker.update((s.payload for s in symbols), frame.captured)
        return [self._scan(payload) for payload in fresh]

    def _scan(self, payload: bytes) -> Outcome:
        trust, reader = self._state
        scanned_at = self._clock.now()
        credential = reader.parse(payload, scanned_at)
        subject = self._pseudonymizer.subject(str(credential.type), credential.identity)
        passback_key = (str(credential.type), credential.credential_id or credential.identity)
        now_mono = self._clock.monotonic()
        last = self._last_accept.get(passback_key) if credential.identity else None
        decision = policy.decide(
            credential,
            subject=subject,
            rules=self._rules,
            trust=trust,
            now=scanned_at,
            since_last_accept_s=None if last is None else now_mono - last,
        )
        synced = self._clock_synced()
        device = self._config.device

        def build(seq: int, _created: str) -> bytes:
            event = events.build_event(
                decision,
                seq=seq,
                event_id=self._ids.new(int(scanned_at.timestamp() * 1000)),
                device=device.id,
                site=device.site,
                direction=device.direction,
                scanned_at=scanned_at,
                clock_synced=synced,
                subject=subject,
            )
            return events.to_json(event)

        try:
            seq = self._outbox.append(build)
        except OutboxError as exc:
            self._signals.rejected()
            self._signals.set_fault(True)
            self._alarms.raise_("outbox", f"cannot record check-ins: {exc}")
            self.reasons["device_fault"] += 1
            log.error("scan rejected: the check-in could not be recorded (%s); gate fails secure", exc)
            return Outcome(Decision(False, Reason.DEVICE_FAULT, credential, str(exc)), None)
        if "outbox" in self._alarms.snapshot():
            self._alarms.clear("outbox")
            self._signals.set_fault(False)
        # Only now, with the record durable, may the door open.
        if decision.accepted:
            self._signals.accepted()
            self._remember_accept(passback_key, now_mono)
        else:
            self._signals.rejected()
        self.reasons[decision.reason] += 1
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

    def _remember_accept(self, key: tuple[str, bytes], now_mono: float) -> None:
        window = self._rules.anti_passback_s
        if window <= 0:
            return
        self._last_accept[key] = now_mono
        if len(self._last_accept) > 4096:  # a busy day: forget what is past the window
            self._last_accept = {k: t for k, t in self._last_accept.items() if now_mono - t < window}


class App:
    def __init__(
        self,
        config: Config,
        *,
        pin_factory: Any = None,
        source: FrameSource | None = None,
        clock: Clock | None = None,
        notifier: health.SystemdNotifier | None = None,
    ) -> None:
        self.config = config
        self._pin_factory = pin_factory
        self._source = source
        self._clock = clock or SystemClock()
        self._notifier = notifier or health.SystemdNotifier()
        self.alarms = Alarms()
        self.camera_state = "starting"
        self.started_at = datetime.now(UTC)
        self.gate: Gate | None = None
        self._last_frame = 0.0
        self._camera_down_since: float | None = None  # monotonic; first failure of the current outage
        self._last_tick = 0.0

    def status(self) -> dict[str, Any]:
        return {
            "schema": "gate-scanner/status/1",
            "version": __version__,
            "config_hash": self.config.digest,
            "camera": self.camera_state,
            "alarms": self.alarms.snapshot(),
            "started": events.utc_ms(self.started_at),
            "lists": self.gate.trust.ages(self._clock.now()) if self.gate is not None else {},
        }

    def request_reload(self) -> None:
        """Reload every list (SIGHUP). Loads in a thread and swaps at once: no frame waits for disk."""
        threading.Thread(target=self._reload, name="reload", daemon=True).start()

    def _reload(self) -> None:
        gate = self.gate
        if gate is None:
            return
        try:
            trust = lists.load(self.config)
        except lists.ListError as exc:
            # Keep deciding with the lists we have: an empty deny list would let banned people in.
            self.alarms.raise_("lists", f"reload failed, previous lists kept: {exc}")
            return
        gate.set_trust(trust)
        log.info("lists reloaded: %s", ", ".join(f"{i.name} v{i.version}" for i in trust.infos) or "none")
        self.alarms.clear("lists")
        self.alarms.on_change()

    def run(self, stop: threading.Event) -> int:
        """Run until ``stop`` is set (exit 0) or a finite source ends (drain, exit 0)."""
        config = self.config
        pin_factory = self._pin_factory or make_pin_factory(config.gpio.pin_factory)
        try:
            # Signals first: constructing them drives the relay off before anything else can fail.
            with Signals(config.gpio, pin_factory=pin_factory) as signals:
                # Check-ins are personal data: the state directory is readable by the daemon alone.
                config.storage.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                outbox = Outbox(config.storage.dir / "outbox.db", config.storage.outbox_max_events)
                try:
                    return self._run_with(signals, outbox, stop)
                finally:
                    signals.relay_off()
                    outbox.close()
        finally:
            if self._pin_factory is None:  # ours to close; an injected factory belongs to the caller
                pin_factory.close()

    def _run_with(self, signals: Signals, outbox: Outbox, stop: threading.Event) -> int:
        config = self.config
        pseudonymizer = events.Pseudonymizer(events.load_or_create_key(config.subject_key_path))
        trust = lists.load(config)  # a broken list stops the start: deciding without it is unsafe
        publisher = Publisher(
            config, outbox, status=self.status, on_alarm=self.alarms.raise_, on_alarm_clear=self.alarms.clear
        )
        self.alarms.on_change = publisher.publish_status
        # A crash or hang in native decoder code costs one frame and a respawn, not the gate.
        decoder = Decoder(config.decoder.engines, isolate=config.decoder.isolate)
        self.gate = gate = Gate(
            config,
            decoder=decoder,
            outbox=outbox,
            signals=signals,
            pseudonymizer=pseudonymizer,
            clock=self._clock,
            alarms=self.alarms,
            trust=trust,
            on_committed=publisher.wake,
        )
        source = self._source or open_source(config.camera)
        slot = LatestFrameSlot()
        capture_stop = threading.Event()
        publisher.start()
        # The supervisor opens the source in its own thread (a missing camera must not hold up
        # the start), reopens it with backoff after any failure and reports each state change.
        supervisor = CameraSupervisor.from_config(
            source,
            slot,
            config.camera,
            on_state=lambda state, reason: self._camera_state_changed(signals, state, reason),
        )
        supervisor.start(capture_stop)
        watchdog = health.WatchdogFeeder(self._notifier, self._alive, stop)
        watchdog.start()
        try:
            finished = self._pipeline(gate, slot, signals, stop)
        finally:
            capture_stop.set()
            self._notifier.stopping()
            supervisor.join(config.camera.capture_timeout_s + 1)
            source.close()
            signals.relay_off()
            decoder.close()
        # Flush what we can before saying offline. A stop request gets a short wait (systemd's
        # stop timeout is 20 s); a finished replay waits the configured time. Unsent rows are
        # not lost either way: they stay in the outbox for the next start.
        drain_s = config.daemon.drain_timeout_s if finished else min(config.daemon.drain_timeout_s, 5.0)
        if not publisher.wait_drained(drain_s):
            log.warning(
                "%d check-ins still unsent after %.0f s: they stay in the outbox for the next run",
                outbox.depth(),
                drain_s,
            )
        exit_code = 0
        if finished is None:
            exit_code = 1
        elif finished and self.camera_state == "failed":
            log.error("the frame source failed and gave up: %s", self.alarms.snapshot().get("camera"))
            exit_code = 1
        stop.set()
        publisher.stop()
        watchdog.join(timeout=2)
        return exit_code

    def _pipeline(
        self, gate: Gate, slot: LatestFrameSlot, signals: Signals, stop: threading.Event
    ) -> bool | None:
        """Returns True when a finite source ended, False on stop, None when the pipeline broke."""
        last_seq = -1
        errors = 0
        ready = False
        while not stop.is_set():
            self._last_tick = time.monotonic()
            frame = slot.get(timeout=0.25, after_seq=last_seq)
            if frame is None:
                if slot.closed:
                    log.info("frame source ended")
                    return True
                continue
            last_seq = frame.seq
            self._last_frame = time.monotonic()
            if not ready:
                ready = True
                self._notifier.ready()
                log.info("frames flowing (%dx%d); ready", frame.image.shape[1], frame.image.shape[0])
            try:
                gate.process(frame)
                errors = 0
            except Exception:
                errors += 1
                log.exception("pipeline failed on frame %d (%d in a row)", frame.seq, errors)
                if errors >= _MAX_CONSECUTIVE_ERRORS:
                    log.critical("pipeline keeps failing; exiting so the service manager restarts it")
                    return None
        return False

    def _camera_state_changed(self, signals: Signals, state: str, reason: str) -> None:
        """CameraSupervisor's on_state (capture or camera-watchdog thread)."""
        if state == "failed":
            if self._camera_down_since is None:
                self._camera_down_since = time.monotonic()
            self.camera_state = "failed"
            # The gate cannot scan: say so on the device (fault pattern) and to operators.
            signals.set_fault(True)
            self.alarms.raise_("camera", reason)  # re-publishes status when the reason changed
            return
        self._camera_down_since = None
        self.camera_state = state
        if "camera" in self.alarms.snapshot():
            self.alarms.clear("camera")  # re-publishes status, now with the camera ok
        else:
            self.alarms.on_change()  # the retained status says "starting" until now
        if "outbox" not in self.alarms.snapshot():
            signals.set_fault(False)

    def _alive(self) -> bool:
        """Fed to the systemd watchdog: the pipeline loop is turning, and frames arrived recently or
        the camera is down but still being reopened. A camera that stays down past
        ``camera.give_up_after_s`` stops the feeding, so systemd restarts the process: a driver
        wedged in the kernel or a hung native call is fixed by a restart, not by reopening."""
        now = time.monotonic()
        if now - self._last_tick >= 5.0:
            return False
        camera = self.config.camera
        down_since = self._camera_down_since
        if down_since is not None:
            return now - down_since < camera.give_up_after_s
        # Not reported down: reads fail within capture_timeout_s, and one that hangs in the driver
        # is reported by the supervisor's stall check after stall_timeout_s (checked every second).
        return now - self._last_frame < max(
            2 * camera.capture_timeout_s, 3 / camera.fps, camera.stall_timeout_s + 1
        )
