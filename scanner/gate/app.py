"""Composition root: builds every part from the config, starts them in order, stops in reverse.

This is the only module that picks backends. Hardware and time seams (pin factory, frame
source, clock, systemd notifier) are arguments, so tests and the demo run the same code as
a gate with a real camera and relay.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np

from scanner import __version__, events
from scanner.config import Config
from scanner.credentials.signed import TrustError
from scanner.gate import commands, health, lists, preflight, telemetry
from scanner.gate.camera import FrameSource, open_source
from scanner.gate.camera.slot import LatestFrameSlot
from scanner.gate.camera.watchdog import CameraSupervisor
from scanner.gate.decode import Decoder
from scanner.gate.door import Door
from scanner.gate.occupancy import STATE_KEY, Occupancy
from scanner.gate.outbox import Outbox, OutboxError
from scanner.gate.pipeline import Alarms, Clock, Gate, SystemClock, show_fault
from scanner.gate.publisher import Inbound, Publisher
from scanner.gate.signals import Signals, make_pin_factory
from scanner.gate.timefloor import FLOOR_FILE, FlooredClock

log = logging.getLogger(__name__)

# A pipeline that throws on this many frames in a row is broken, not unlucky: exit non-zero
# so systemd restarts the whole process instead of a gate that silently never scans.
_MAX_CONSECUTIVE_ERRORS = 50
# Frames in a row the isolated decoder may lose before the gate says it is blind (alarm and
# fault pattern), and before it gives up and exits so that systemd restarts it whole.
DECODER_ALARM_AFTER = 10
DECODER_GIVE_UP_AFTER = 100
# Operator commands waiting for the commands thread, by count and by bytes: a flood on cmd/
# (anyone the broker lets publish there) costs dropped commands, never memory or frames.
_COMMAND_QUEUE = 64
_COMMAND_QUEUE_BYTES = 2 * commands.MAX_PAYLOAD


class App:
    def __init__(
        self,
        config: Config,
        *,
        pin_factory: Any = None,
        source: FrameSource | None = None,
        clock: Clock | None = None,
        notifier: health.SystemdNotifier | None = None,
        sampler: telemetry.Sampler | None = None,
        clock_synced: Callable[[], bool] = health.clock_synced,
    ) -> None:
        self.config = config
        self._clock_synced = clock_synced
        self._pin_factory = pin_factory
        self._source = source
        # Validity, event times and the day are judged on a clock that a Pi without an RTC,
        # booted with its time set back, cannot wind back past what it has already seen.
        self._clock = FlooredClock(
            clock or SystemClock(), config.storage.dir / FLOOR_FILE, synced=clock_synced
        )
        self._notifier = notifier or health.SystemdNotifier()
        self.alarms = Alarms()
        self.camera_state = "starting"
        self.started_at = datetime.now(UTC)
        self.gate: Gate | None = None
        self.door: Door | None = None
        self._last_frame = 0.0
        self._camera_down_since: float | None = None  # monotonic; first failure of the current outage
        self._last_tick = 0.0
        self._started_mono = time.monotonic()
        self._sampler = sampler or telemetry.Sampler(config)
        # Commands from paho's thread, drained on the commands thread (never run in the callback).
        self._commands: queue.Queue[Inbound] = queue.Queue(maxsize=_COMMAND_QUEUE)
        self._commands_bytes = 0  # payload bytes waiting in _commands (under _commands_lock)
        self._commands_lock = threading.Lock()
        self._commands_dropped = 0
        self._handler: commands.CommandHandler | None = None
        self._verifier: commands.Verifier | None = None
        self._outbox: Outbox | None = None
        self._decoder: Decoder | None = None
        self._reload_lock = threading.Lock()
        self._decoder_alarm = False  # the "decoder" alarm is up (pipeline thread only)
        self._publisher: Publisher | None = None
        self.occupancy: Occupancy | None = None
        self._status_occupancy: tuple[Any, ...] | None = None  # what the last status said

    def status(self) -> dict[str, Any]:
        occupancy = self.occupancy.snapshot() if self.occupancy is not None else None
        if occupancy is not None:
            self._status_occupancy = _headline(occupancy)
        return {
            "schema": telemetry.STATUS_SCHEMA,
            "version": __version__,
            "config_hash": self.config.digest,
            "camera": self.camera_state,
            "alarms": self.alarms.snapshot(),
            "started": events.utc_ms(self.started_at),
            "lists": self.gate.trust.ages(self._clock.now()) if self.gate is not None else {},
            "outbox": {"depth": self._outbox_depth(), "max": self.config.storage.outbox_max_events},
            "selftest": health.load_selftest(self.config.storage.dir),  # `gate-scanner selftest` writes it
            "occupancy": occupancy,
        }

    def health(self, *, remember: bool = True) -> dict[str, Any]:
        """The ``health`` payload (telemetry thread; ``remember=False`` for an ad-hoc snapshot)."""
        gate, outbox = self.gate, self._outbox
        oldest = None
        if outbox is not None:
            with contextlib.suppress(OutboxError):
                oldest = outbox.oldest_created()
        return self._sampler.sample(
            now=self._clock.now(),
            mono=time.monotonic(),
            started_mono=self._started_mono,
            frames=gate.frames if gate is not None else 0,
            decode_ms=list(gate.decode_ms) if gate is not None else [],
            reasons=dict(gate.reasons) if gate is not None else {},
            outbox_depth=self._outbox_depth(),
            outbox_oldest=oldest,
            camera=self.camera_state,
            worker_failures=self._decoder.worker_failures if self._decoder is not None else 0,
            reconnects=self._publisher.reconnects if self._publisher is not None else 0,
            occupancy=self.occupancy.snapshot() if self.occupancy is not None else None,
            door=self.door.counters() if self.door is not None else None,
            remember=remember,
        )

    def _outbox_depth(self) -> int | None:
        if self._outbox is None:
            return None
        try:
            return self._outbox.depth()
        except OutboxError:
            return None

    def _check_outbox_fill(self) -> None:
        """Raise ``outbox_filling`` at 80 % of the bound, clear it below 70 % (cheap: a cached count)."""
        depth = self._outbox_depth()
        if depth is None:
            return
        capacity = self.config.storage.outbox_max_events
        active = "outbox_filling" in self.alarms.snapshot()
        want = telemetry.fill_alarm(depth, capacity, active)
        if want and not active:
            self.alarms.raise_(
                "outbox_filling",
                f"unsent check-ins at {int(telemetry.FILL_RAISE * 100)}% or more of "
                f"storage.outbox_max_events ({capacity}); at the bound the gate fails secure",
            )
        elif active and not want:
            self.alarms.clear("outbox_filling")

    def request_reload(self) -> None:
        """Reload every list (SIGHUP). Loads in a thread and swaps at once: no frame waits for disk."""
        threading.Thread(target=self._reload, name="reload", daemon=True).start()

    def _reload(self) -> tuple[bool, str]:
        """Reload lists and operator keys; (ok, what happened) for a command's reply.

        One reload at a time, from SIGHUP or a command: loading happens under the lock, so a
        load that began earlier (old files) can never be swapped in after a later one.
        """
        with self._reload_lock:
            return self._reload_now()

    def _reload_now(self) -> tuple[bool, str]:
        gate = self.gate
        if gate is None:
            return False, "the gate is not running"
        try:
            trust = lists.load(self.config)
        except lists.ListError as exc:
            # Keep deciding with the lists we have: an empty deny list would let banned people in.
            self.alarms.raise_("lists", f"reload failed, previous lists kept: {exc}")
            return False, f"previous lists kept: {exc}"
        gate.set_trust(trust)
        loaded = ", ".join(f"{i.name} v{i.version}" for i in trust.infos) or "none"
        log.info("lists reloaded: %s", loaded)
        self.alarms.clear("lists")
        self.alarms.on_change()
        if self._verifier is not None:
            try:
                self._verifier.set_keys(commands.load_operator_keys(self.config.commands.operator_keys_file))
            except TrustError as exc:
                self.alarms.raise_("operator_keys", f"reload failed, previous operator keys kept: {exc}")
                return False, f"lists reloaded ({loaded}); operator keys kept: {exc}"
            self.alarms.clear("operator_keys")
        return True, f"lists reloaded: {loaded}"

    def run(self, stop: threading.Event) -> int:
        """Run until ``stop`` is set (exit 0) or a finite source ends (drain, exit 0)."""
        config = self.config
        pin_factory = self._pin_factory or make_pin_factory(config.gpio.pin_factory)
        try:
            # Signals first: constructing them drives the relay off before anything else can fail.
            with Signals(config.gpio, pin_factory=pin_factory) as signals:
                # The door next, before anything slow: the exit button and the fire input work
                # while the lists load and the decoder starts, and whatever else fails.
                if config.door.pins():
                    self.door = Door(
                        config.door, signals=signals, alarms=self.alarms, pin_factory=pin_factory
                    )
                try:
                    # Check-ins are personal data: the state directory is readable by the daemon alone.
                    config.storage.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                    outbox = Outbox(config.storage.dir / "outbox.db", config.storage.outbox_max_events)
                    if outbox.quarantined is not None:
                        # The gate runs on a fresh outbox; the lost events show as a seq gap at the collector.
                        self.alarms.raise_(
                            "outbox_quarantined",
                            f"the outbox was corrupt and moved to {outbox.quarantined.name}; "
                            "its unsent check-ins are lost (a seq gap at the collector)",
                        )
                    try:
                        return self._run_with(signals, outbox, stop)
                    finally:
                        signals.relay_off()
                        self._close_door()  # before the outbox it records into
                        outbox.close()
                finally:
                    self._close_door()  # also when the outbox could not be opened
        finally:
            if self._pin_factory is None:  # ours to close; an injected factory belongs to the caller
                pin_factory.close()

    def _close_door(self) -> None:
        if self.door is not None:
            self.door.close()

    def _run_with(self, signals: Signals, outbox: Outbox, stop: threading.Event) -> int:
        config = self.config
        ready = preflight.check(config, create_key=True)  # CannotStart: the gate stays shut
        assert ready.subject_key is not None  # made when missing
        pseudonymizer = events.Pseudonymizer(ready.subject_key)
        trust, operator_keys = ready.trust, ready.operator_keys
        self._outbox = outbox
        occupancy = Occupancy(
            config,
            now=self._clock.now,
            monotonic=self._clock.monotonic,
            clock_synced=self._clock_synced,
            saved=outbox.saved_state(STATE_KEY),
            alarms=self.alarms,
            linked=True,
        )
        self.occupancy = occupancy
        publisher = Publisher(
            config,
            outbox,
            status=self.status,
            on_alarm=self.alarms.raise_,
            on_alarm_clear=self.alarms.clear,
            on_command=self._enqueue_command,
            on_counter=occupancy.heard,
            on_link=occupancy.link,
        )
        self._publisher = publisher
        self.alarms.on_change = publisher.publish_status
        occupancy.publish = publisher.publish_occupancy
        occupancy.on_change = publisher.publish_status  # the site became full, or not
        # A crash or hang in native decoder code costs one frame and a respawn, not the gate.
        decoder = Decoder(config.decoder.engines, isolate=config.decoder.isolate)
        self._decoder = decoder
        self.gate = gate = Gate(
            config,
            decoder=decoder,
            outbox=outbox,
            signals=signals,
            pseudonymizer=pseudonymizer,
            clock=self._clock,
            alarms=self.alarms,
            trust=trust,
            on_committed=lambda: self._committed(publisher),
            clock_synced=self._clock_synced,
            occupancy=occupancy,
            on_admitted=self.door.admitted if self.door is not None else lambda _admission: None,
        )
        if self.door is not None:
            self.door.attach(gate)
        self._verifier = commands.Verifier(config, operator_keys, started=self._clock.now())
        self._handler = commands.CommandHandler(
            config,
            self._verifier,
            now=self._clock.now,
            publish=publisher.publish_reply,
            open_gate=gate.remote_open,
            reload=self._reload,
            snapshot=lambda: self.health(remember=False),
            set_occupancy=gate.set_occupancy,
        )
        self._check_outbox_fill()  # a gate restarting with a full outbox says so at once
        # Start the decoder (its worker process, when isolated) before the first frame: on a
        # slow board that takes seconds, and the first person at the gate must not wait for it.
        decoder.decode(np.zeros((config.camera.height, config.camera.width), np.uint8))
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
        telemetry_thread = threading.Thread(
            target=self._telemetry, args=(publisher, capture_stop), name="telemetry", daemon=True
        )
        telemetry_thread.start()
        commands_thread = threading.Thread(
            target=self._serve_commands, args=(capture_stop,), name="commands", daemon=True
        )
        commands_thread.start()
        try:
            finished = self._pipeline(gate, slot, signals, stop)
        finally:
            signals.relay_off()  # first: what follows may take seconds (joins, camera close)
            self._close_door()  # no exit press or fire edge energises it again
            capture_stop.set()
            telemetry_thread.join(timeout=2)
            commands_thread.join(timeout=2)
            self._notifier.stopping()
            supervisor.join(config.camera.capture_timeout_s + 1)
            source.close()
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
        occupancy.stopping()  # before offline: siblings then know these counts are final
        publisher.stop()
        watchdog.join(timeout=2)
        self._clock.save()
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
            gate.occupancy.tick()  # the day's start, the counter's heartbeat, staleness
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
            if not self._decoder_healthy(signals):
                return None
        return False

    def _decoder_healthy(self, signals: Signals) -> bool:
        """Alarm while the isolated decoder loses frame after frame; False once it is hopeless.

        Each lost frame is a respawn and an empty result, not an exception, so without this a
        decoder that dies on every frame would leave a blind gate that looks healthy.
        """
        lost = self._decoder.consecutive_failures if self._decoder is not None else 0
        if lost == 0 and not self._decoder_alarm:
            return True  # every frame of a healthy gate: nothing to look up
        if lost >= DECODER_ALARM_AFTER and not self._decoder_alarm:
            self._decoder_alarm = True
            self.alarms.raise_("decoder", f"the isolated decoder lost {lost} frames in a row: not scanning")
            show_fault(signals, self.alarms)
        elif lost == 0 and self._decoder_alarm:
            self._decoder_alarm = False
            self.alarms.clear("decoder")
            show_fault(signals, self.alarms)
        if lost >= DECODER_GIVE_UP_AFTER:
            log.critical(
                "the decoder lost %d frames in a row; exiting so the service manager restarts it", lost
            )
            return False
        return True

    def _committed(self, publisher: Publisher) -> None:
        """A check-in is durable: send it now, and say so if the outbox is filling up."""
        publisher.wake()
        self._check_outbox_fill()

    def _enqueue_command(self, inbound: Inbound) -> None:
        """Publisher's on_command (paho's thread): enqueue or drop, never block."""
        size = len(inbound.payload)
        with self._commands_lock:
            room = self._commands_bytes + size <= _COMMAND_QUEUE_BYTES
            if room:
                try:
                    self._commands.put_nowait(inbound)
                    self._commands_bytes += size
                except queue.Full:
                    room = False
            if not room:
                self._commands_dropped += 1
                dropped = self._commands_dropped
        if not room and (dropped in (1, 10, 100) or dropped % 1000 == 0):
            log.warning("command queue full: %d commands dropped unanswered", dropped)

    def _serve_commands(self, stop: threading.Event) -> None:
        """Operator commands, one at a time, on their own thread: parsing and verifying a
        command (up to a 4 MiB lists payload) never costs the pipeline a frame. ``open``
        commits and pulses through the Gate like a scan; list writes go to a worker."""
        while not stop.is_set():
            try:
                inbound = self._commands.get(timeout=0.25)
            except queue.Empty:
                continue
            with self._commands_lock:
                self._commands_bytes -= len(inbound.payload)
            handler = self._handler
            if handler is None:
                continue
            try:
                handler.handle(inbound)
            except Exception:
                log.exception("command %r failed", inbound.name)

    def _telemetry(self, publisher: Publisher, stop: threading.Event) -> None:
        """Every ``telemetry.interval_s``: the outbox fill alarm, then a retained ``health``."""
        interval = self.config.telemetry.interval_s
        # The first sample soon after the start: an operator watching a gate come back should
        # not wait a whole interval to see how it is.
        wait = min(interval, 5.0)
        while not stop.wait(wait):
            wait = interval
            try:
                self._clock.maybe_save()
                self._check_outbox_fill()
                body = json.dumps(self.health(), separators=(",", ":"), sort_keys=True)
                publisher.publish_health(body.encode("utf-8"))
                occupancy = self.occupancy
                # The retained status's count follows within an interval, not on every passage.
                if occupancy is not None and _headline(occupancy.snapshot()) != self._status_occupancy:
                    publisher.publish_status()
            except Exception:
                log.exception("telemetry sample failed")

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
        show_fault(signals, self.alarms)

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


def _headline(occupancy: dict[str, Any]) -> tuple[Any, ...]:
    return (occupancy["day"], occupancy["inside"], occupancy["full"], occupancy["stale"])
