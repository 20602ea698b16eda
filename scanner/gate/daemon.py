"""``gate-scanner run``: the gate daemon as systemd runs it.

SIGTERM and SIGINT stop it (relay off first, outbox drained for a bounded time); SIGHUP
reloads every list without a restart.
"""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path

from scanner.console import EXIT_RUNTIME, EXIT_USAGE, load_or_report, setup_logging, stop_on_signals
from scanner.gate.app import App
from scanner.gate.door import DoorError
from scanner.gate.preflight import CannotStart

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path)


def main(args: argparse.Namespace) -> int:
    config = load_or_report(args.config)
    if config is None:
        return EXIT_USAGE
    setup_logging(config.daemon.log_level)
    stop = stop_on_signals()
    app = App(config)
    signal.signal(signal.SIGHUP, lambda _s, _f: app.request_reload())
    try:
        return app.run(stop)
    except CannotStart as exc:
        for problem in exc.problems:
            log.error("cannot start: %s", problem)
        return EXIT_RUNTIME
    except DoorError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_RUNTIME
    except Exception:
        # App.run has already driven the relay off on its way out (context managers).
        log.exception("gate stopped by an unexpected error")
        return EXIT_RUNTIME
