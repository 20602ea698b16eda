"""``gate-scanner check-config FILE``: every problem in a gate's config, one
``file: key: problem`` line each, exit 2; or one ``ok`` line, exit 0.

Beyond the file itself it loads what ``run`` loads before its first frame (lists, operator
keys, the pseudonym key, the TLS files), so a config that passes here also starts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scanner.console import EXIT_OK, EXIT_USAGE, load_or_report
from scanner.gate import preflight


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path)


def main(args: argparse.Namespace) -> int:
    config = load_or_report(args.file)
    if config is None:
        return EXIT_USAGE
    try:
        preflight.check(config, create_key=False)
    except preflight.CannotStart as exc:
        for problem in exc.problems:
            print(f"{args.file}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.file}: ok (device {config.device.id} at {config.device.site})")
    return EXIT_OK
