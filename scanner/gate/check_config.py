"""``gate-scanner check-config FILE``: every problem in a gate's config, one
``file: key: problem`` line each, exit 2; or one ``ok`` line, exit 0."""

from __future__ import annotations

import argparse
from pathlib import Path

from scanner.console import EXIT_OK, EXIT_USAGE, load_or_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path)


def main(args: argparse.Namespace) -> int:
    config = load_or_report(args.file)
    if config is None:
        return EXIT_USAGE
    print(f"{args.file}: ok (device {config.device.id} at {config.device.site})")
    return EXIT_OK
