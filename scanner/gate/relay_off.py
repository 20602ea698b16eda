"""``gate-scanner relay-off``: what systemd's ``ExecStopPost`` runs, after a clean stop and
after a crash or kill alike, so the door never stays released by a process that is gone."""

from __future__ import annotations

import argparse
from pathlib import Path

from scanner.console import EXIT_OK, EXIT_USAGE, load_or_report, setup_logging
from scanner.gate.signals import force_relay_off, make_pin_factory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path)


def main(args: argparse.Namespace) -> int:
    config = load_or_report(args.config)
    if config is None:
        return EXIT_USAGE
    setup_logging(config.daemon.log_level)
    factory = make_pin_factory(config.gpio.pin_factory)
    try:
        force_relay_off(config.gpio, factory)
    finally:
        factory.close()
    return EXIT_OK
