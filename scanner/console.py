"""What every command shares: exit codes, config-or-exit-2, logging, stop on a signal.

Each command module (``scanner/*/…``) offers ``add_arguments(parser)`` and ``main(args) -> int``
and takes what it needs from here; none imports the router in ``scanner/cli.py``.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from scanner.config import Config, ConfigError, load

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


def load_or_report(path: Path, loader: Callable[[Path], Config] = load) -> Config | None:
    """The config, or None after printing every ``file: key: problem`` line (callers exit 2)."""
    try:
        return loader(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def setup_logging(level: str = "info") -> None:
    # journald adds its own timestamps; keep the line short and greppable.
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM (systemd's stop) or SIGINT (Ctrl-C); call from the main thread."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logging.getLogger("scanner").info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop
