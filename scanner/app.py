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

from scanner import __version__, credentials, events, health, policy
from scanner.camera import CameraError, FrameSource, open_source, run_capture
from scanner.camera.slot import LatestFrameSlot
from scanner.config import Config
from scanner.decode import Decoder
from scanner.models import CredentialType, Decision, Frame, Reason
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

    The order inside ``process`` is the safety promise: the event is durable in the outbox
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
        on_committed: Callable[[], None] = lambda: None,
        clock_synced: Callable[[], bool] = health.clock_synced,
    ) -> None:
        self._config = config
        self._decoder = decoder
        self._tracker = PresenceTracker(config.track.gone_after_s)
        self._lists = policy.Lists.load(config.policy.allowlist_file, config.policy.denylist_file)
        self._accept = frozenset(CredentialType(t) for t in config.policy.accept)
        self._outbox = outbox
        self._signals = signals
        self._pseudonymizer = pseudonymizer
        self._clock = clock
        self._alarms = alarms
        self._on_committed = on_committed
        self._clock_synced = clock_synced
        self._ids = events.Uuid7()
        self.reasons: Counter[str] = Counter()

    def process(self, frame: Frame) -> list[Outcome]:
        symbols = self._decoder.decode(frame.image)
        fresh = self._tracker.update((s.payload for s in symbols), frame.captured)
        return [self._scan(payload) for payload in fresh]

    def _scan(self, payload: bytes) -> Outcome:
        scanned_at = self._clock.now()
        credential = credentials.parse(payload)
        decision = policy.decide(
            credential, lists=self._lists, accept=self._accept, site=self._config.device.site, now=scanned_at
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
                pseudonymizer=self._pseudonymizer,
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
        else:
            self._signals.rejected()
        self.reasons[decision.reason] += 1
        log.info(
            "seq=%d %s reason=%s type=%s%s",
            seq,
            decision.outcome,
            decision.reason,
            credential.type,
            f" ({decision.detail})" if decision.detail else "",
        )
        self._on_committed()
        return Outcome(decision, seq)


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
        self._last_tick = 0.0

    def status(self) -> dict[str, Any]:
        return {
            "schema": "gate-scanner/status/1",
            "version": __version__,
            "config_hash": self.config.digest,
            "camera": self.camera_state,
            "alarms": self.alarms.snapshot(),
            "started": events.utc_ms(self.started_at),
        }

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
        publisher = Publisher(
            config, outbox, status=self.status, on_alarm=self.alarms.raise_, on_alarm_clear=self.alarms.clear
        )
        self.alarms.on_change = publisher.publish_status
        self.gate = gate = Gate(
            config,
            decoder=Decoder(config.decoder.engines),
            outbox=outbox,
            signals=signals,
            pseudonymizer=pseudonymizer,
            clock=self._clock,
            alarms=self.alarms,
            on_committed=publisher.wake,
        )
        source = self._source or open_source(config.camera)
        slot = LatestFrameSlot()
        capture_stop = threading.Event()
        publisher.start()
        try:
            source.open()
        except CameraError as exc:
            self._camera_failed(signals, exc)
        capture = threading.Thread(
            target=run_capture,
            args=(source, slot, capture_stop),
            kwargs={
                "on_error": lambda exc: self._camera_failed(signals, exc),
                "read_timeout": config.camera.capture_timeout_s,
            },
            name="capture",
            daemon=True,
        )
        capture.start()
        watchdog = health.WatchdogFeeder(self._notifier, self._alive, stop)
        watchdog.start()
        try:
            finished = self._pipeline(gate, slot, signals, stop)
        finally:
            capture_stop.set()
            self._notifier.stopping()
            capture.join(timeout=config.camera.capture_timeout_s + 1)
            source.close()
            signals.relay_off()
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
            if self.camera_state != "ok":
                self.camera_state = "ok"
                self.alarms.clear("camera")
                self.alarms.on_change()  # the retained status says "starting"/"failed" until now
                if "outbox" not in self.alarms.snapshot():
                    signals.set_fault(False)
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

    def _camera_failed(self, signals: Signals, exc: Exception) -> None:
        self.camera_state = "failed"
        # The gate cannot scan: say so on the device (fault pattern) and to operators.
        signals.set_fault(True)
        self.alarms.raise_("camera", str(exc) or type(exc).__name__)

    def _alive(self) -> bool:
        """Fed to the systemd watchdog: frames arrived recently and the pipeline loop is turning."""
        now = time.monotonic()
        camera = self.config.camera
        frames_ok = now - self._last_frame < max(2 * camera.capture_timeout_s, 3 / camera.fps)
        return frames_ok and now - self._last_tick < 5.0
