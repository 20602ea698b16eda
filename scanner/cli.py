"""The one entry point, ``gate-scanner COMMAND`` (also ``python -m scanner``).

Every command lives in the room of the role that runs it and offers the same pair:
``add_arguments(parser)`` and ``main(args) -> int`` (exit 0 ok, 1 runtime failure, 2 usage or
config error; see :mod:`scanner.console`). This module only lists them. It loads the module of
the command being run and no other: the daemon on a Pi Zero's 512 MB must not carry the
collector, the benchmarks and the fleet tools, and ``relay-off`` (which systemd runs after a
crash) must not first wait for OpenCV to load.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Protocol

from scanner import __version__


class CommandModule(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...
    def main(self, args: argparse.Namespace) -> int: ...


@dataclass(frozen=True, slots=True)
class Command:
    module: str
    help: str


Table = dict[str, "Command | tuple[str, Table]"]

BENCHES: Table = {
    "pipeline": Command("scanner.bench.pipeline", "decode, frame-to-relay latency, outbox, RSS, READY"),
    "fuzz": Command("scanner.bench.fuzz", "random and mutated payloads through the decision path"),
    "dcc": Command("scanner.bench.dcc", "EU DCC stages against a dgc-testdata tree"),
    "decode": Command("scanner.bench.decode", "passes and ms per engine and chain over a photo corpus"),
    "frames": Command("scanner.bench.frames", "ms per synthetic frame per engine and chain"),
    "outbox": Command("scanner.bench.outbox", "a gate's outbox backlog drains into the collector"),
    "occupancy": Command(
        "scanner.bench.occupancy", "3 gates on one broker: an entry to every sibling's count; the cap's cost"
    ),
    "door": Command("scanner.bench.door", "exit button and fire input to the relay while decoding"),
    "trace": Command(
        "scanner.bench.trace", "N check-ins into both stores: load with stays, rebuild, trace p50/p99"
    ),
    "soak": Command(
        "scanner.bench.soak", "random broker/collector/daemon kills for N minutes, then a report"
    ),
}

COMMANDS: Table = {
    # The gate (scanner/gate/)
    "run": Command("scanner.gate.daemon", "run the gate daemon"),
    "check-config": Command("scanner.gate.check_config", "validate a config file (exit 2 on error)"),
    "decode": Command("scanner.gate.decode", "decode QR codes in image files, one JSON line each"),
    "relay-off": Command("scanner.gate.relay_off", "drive the relay off (systemd ExecStopPost)"),
    # Technicians and operators (scanner/fleet/)
    "selftest": Command(
        "scanner.fleet.selftest", "check camera, card decode, signals, broker, clock, disk, power"
    ),
    "provision": Command("scanner.fleet.provision", "make a device bundle for the first-boot script"),
    "pki": Command("scanner.fleet.pki", "fleet CA, broker and per-device TLS certificates"),
    "pass": Command("scanner.fleet.passes", "issuer keys, trust stores and signed gate passes"),
    "cmd": Command("scanner.fleet.cmd", "sign (and send) operator commands to a gate"),
    # The central side (scanner/central/)
    "collect": Command("scanner.central.collector", "central ingest: store every gate's check-ins, ack them"),
    "trace": Command("scanner.central.trace", "contact tracing: a subject's stays and who was inside too"),
    "monitor": Command(
        "scanner.central.monitor", "live table of gates and stream of check-ins from the broker"
    ),
    # The demo (scanner/sim/) and benchmarks (scanner/bench/)
    "demo": Command("scanner.sim.demo", "run the real daemon on built-in replayed frames with mock pins"),
    "bench": ("print benchmark figures as JSON", BENCHES),
}


def load(module: str) -> CommandModule:
    loaded: CommandModule = importlib.import_module(module)
    return loaded


def _add(parser: argparse.ArgumentParser, table: Table, argv: list[str], depth: int) -> None:
    """Subcommands of ``parser``; only the one named in ``argv`` gets its module loaded."""
    sub = parser.add_subparsers(dest=f"command_{depth}", required=True, metavar="COMMAND")
    chosen = argv[0] if argv else None
    for name, entry in table.items():
        if isinstance(entry, Command):
            child = sub.add_parser(name, help=entry.help, description=entry.help)
            if name == chosen:
                module = load(entry.module)
                module.add_arguments(child)
                child.set_defaults(main=module.main)
        else:
            text, nested = entry
            child = sub.add_parser(name, help=text, description=text)
            if name == chosen:
                _add(child, nested, argv[1:], depth + 1)


def parser_for(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gate-scanner", description="Unattended QR check-in gate.")
    parser.add_argument("--version", action="version", version=f"gate-scanner {__version__}")
    _add(parser, COMMANDS, argv, 0)
    return parser


def main(argv: list[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    args = parser_for(words).parse_args(words)
    code: int = args.main(args)
    return code
