"""Command line: `gate-scanner COMMAND` (also `python -m scanner`). Exit 0 ok, 1 runtime, 2 usage/config."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from scanner import __version__
from scanner.config import Config, ConfigError, load

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gate-scanner", description="Unattended QR check-in gate.")
    parser.add_argument("--version", action="version", version=f"gate-scanner {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gate daemon")
    run.add_argument("--config", required=True, type=Path)

    check = sub.add_parser("check-config", help="validate a config file (exit 2 on error)")
    check.add_argument("file", type=Path)

    decode = sub.add_parser("decode", help="decode QR codes in image files, one JSON line each")
    decode.add_argument("images", nargs="+", type=Path)
    decode.add_argument("--engines", default="zxing,zbar", help="comma-separated, default zxing,zbar")

    off = sub.add_parser("relay-off", help="drive the relay off (systemd ExecStopPost)")
    off.add_argument("--config", required=True, type=Path)

    demo = sub.add_parser("demo", help="run the real daemon on built-in replayed frames with mock pins")
    demo.add_argument("--workdir", type=Path, help="keep the demo's files here instead of a temp dir")

    from scanner.passes import add_pass_commands

    add_pass_commands(sub)

    from scanner.commands import add_cmd_commands

    add_cmd_commands(sub)

    from scanner.monitor import add_monitor_command
    from scanner.pki import add_pki_commands

    add_pki_commands(sub)
    add_monitor_command(sub)

    from scanner.provision import add_provision_command
    from scanner.selftest import add_selftest_command

    add_selftest_command(sub)
    add_provision_command(sub)

    bench = sub.add_parser("bench", help="print benchmark figures as JSON")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    pipeline = bench_sub.add_parser("pipeline", help="decode, frame-to-relay latency, outbox, RSS, READY")
    pipeline.add_argument("--frames", type=int, default=200)
    fuzz = bench_sub.add_parser("fuzz", help="random and mutated payloads through the decision path")
    fuzz.add_argument("--n", type=int, default=100_000, help="how many payloads")
    fuzz.add_argument("--seed", type=int, default=1)
    dcc = bench_sub.add_parser("dcc", help="EU DCC stages against a dgc-testdata tree")
    dcc.add_argument("--testdata", required=True, type=Path, help="dgc-testdata checkout (or a subfolder)")
    corpus = bench_sub.add_parser("decode", help="passes and ms per engine and chain over a photo corpus")
    corpus.add_argument("--corpus", required=True, type=Path, help="folders of N.png + N.txt expected text")
    corpus.add_argument("--isolate", action="store_true", help="run the chain in the decoder process")
    frames = bench_sub.add_parser("frames", help="ms per synthetic frame per engine and chain")
    frames.add_argument("--frames", type=int, default=40, help="distinct frames per size and kind")
    from scanner.collector import add_collect_command
    from scanner.outboxbench import add_bench_outbox
    from scanner.soakbench import add_bench_soak
    from scanner.trace import add_trace_command

    add_bench_outbox(bench_sub)
    add_bench_soak(bench_sub)
    add_collect_command(sub)
    add_trace_command(sub)
    return parser


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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command
    if command == "check-config":
        config = load_or_report(args.file)
        if config is None:
            return EXIT_USAGE
        print(f"{args.file}: ok (device {config.device.id} at {config.device.site})")
        return EXIT_OK
    if command == "decode":
        return _decode(args.images, tuple(e for e in args.engines.split(",") if e))
    if command == "run":
        return _run(args.config)
    if command == "relay-off":
        return _relay_off(args.config)
    if command == "pass":
        from scanner.passes import run_pass_command

        return run_pass_command(args)
    if command == "cmd":
        from scanner.commands import run_cmd_command

        return run_cmd_command(args)
    if command == "pki":
        from scanner.pki import run_pki_command

        return run_pki_command(args)
    if command == "selftest":
        from scanner.selftest import run_selftest_command

        setup_logging("warning")
        return run_selftest_command(args)
    if command == "provision":
        from scanner.provision import run_provision_command

        return run_provision_command(args)
    if command == "monitor":
        from scanner.monitor import run_monitor_command

        return run_monitor_command(args)
    if command == "demo":
        from scanner.demo import run_demo

        setup_logging()
        return run_demo(args.workdir)
    if command == "bench" and args.bench == "fuzz":
        from scanner.fuzzbench import bench_fuzz

        figures = bench_fuzz(args.n, args.seed)
        print(json.dumps(figures, indent=2))
        return EXIT_OK if figures["exceptions"] == 0 else EXIT_RUNTIME
    if command == "bench" and args.bench == "dcc":
        from scanner.dccbench import bench_dcc

        if not args.testdata.is_dir():
            print(f"--testdata: {args.testdata} is not a directory", file=sys.stderr)
            return EXIT_USAGE
        print(json.dumps(bench_dcc(args.testdata), indent=2))
        return EXIT_OK
    if command == "bench" and args.bench in ("decode", "frames"):
        from scanner.decodebench import bench_decode, bench_frames

        setup_logging("warning")
        if args.bench == "frames":
            print(json.dumps(bench_frames(frames=args.frames), indent=2))
            return EXIT_OK
        if not args.corpus.is_dir():
            print(f"--corpus: {args.corpus} is not a directory", file=sys.stderr)
            return EXIT_USAGE
        print(json.dumps(bench_decode(args.corpus, isolate=args.isolate), indent=2))
        return EXIT_OK
    if command == "collect":
        from scanner.collector import run_collect_command

        return run_collect_command(args)
    if command == "trace":
        from scanner.trace import run_trace_command

        return run_trace_command(args)
    if command == "bench" and args.bench == "soak":
        from scanner.soakbench import run_bench_soak

        return run_bench_soak(args)
    if command == "bench" and args.bench == "outbox":
        from scanner.outboxbench import run_bench_outbox

        return run_bench_outbox(args)
    if command == "bench":
        from scanner.bench import bench_pipeline

        setup_logging("warning")
        print(json.dumps(bench_pipeline(frames=args.frames), indent=2))
        return EXIT_OK
    raise AssertionError(command)


def _decode(images: list[Path], engines: tuple[str, ...]) -> int:
    from scanner.decode import Decoder, describe_image

    unknown = set(engines) - {"zxing", "zbar"}
    if unknown or not engines:
        print(f"--engines: choose from zxing, zbar (got {','.join(engines)})", file=sys.stderr)
        return EXIT_USAGE
    decoder = Decoder(engines)
    status = EXIT_OK
    for image in images:
        line = describe_image(image, decoder)
        if "error" in line:
            status = EXIT_RUNTIME
        print(json.dumps(line, ensure_ascii=False), flush=True)
    return status


def _run(config_path: Path) -> int:
    config = load_or_report(config_path)
    if config is None:
        return EXIT_USAGE
    setup_logging(config.daemon.log_level)
    from scanner.app import App
    from scanner.lists import ListError

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logging.getLogger("scanner").info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    app = App(config)
    signal.signal(signal.SIGHUP, lambda _s, _f: app.request_reload())
    try:
        return app.run(stop)
    except ListError as exc:
        logging.getLogger("scanner").error("cannot start: %s", exc)
        return EXIT_RUNTIME
    except Exception:
        # App.run has already driven the relay off on its way out (context managers).
        logging.getLogger("scanner").exception("gate stopped by an unexpected error")
        return EXIT_RUNTIME


def _relay_off(config_path: Path) -> int:
    config = load_or_report(config_path)
    if config is None:
        return EXIT_USAGE
    setup_logging(config.daemon.log_level)
    from scanner.signals import force_relay_off, make_pin_factory

    factory = make_pin_factory(config.gpio.pin_factory)
    try:
        force_relay_off(config.gpio, factory)
    finally:
        factory.close()
    return EXIT_OK
