"""`gate-scanner bench frames`: ms per synthetic gate frame for each engine and the chain, per
size, empty and with one code (the frames come from :mod:`scanner.sim.synth`)."""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from typing import Any

import numpy as np

from scanner.bench.decode import _timed, _zbar_alone, _zxing_alone
from scanner.console import EXIT_OK, setup_logging
from scanner.gate.decode import Decoder
from scanner.models import Symbol
from scanner.sim import synth


def _percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 3), "p99": round(p99, 3), "n": len(ordered)}


def bench_frames(frames: int = 40, repeats: int = 5, isolate: bool = True) -> dict[str, Any]:
    """Median and p99 ms per frame for each reader, per size, empty and with one code."""
    rng = np.random.default_rng(20261129)
    chain = Decoder()
    readers: dict[str, Callable[[np.ndarray], list[Symbol]]] = {
        "zxing": _zxing_alone,
        "zbar": _zbar_alone,
        "chain": chain.decode,
    }
    isolated = Decoder(isolate=True) if isolate else None
    if isolated is not None:
        readers["chain_isolated"] = isolated.decode
    out: dict[str, Any] = {"frames": frames, "repeats": repeats}
    try:
        for size in ((640, 480), (1280, 720)):
            sets = {
                "empty": [synth.render_empty(rng, size) for _ in range(frames)],
                "one_code": [synth.render_scene(f"GATE-{i:05d}", rng, size=size) for i in range(frames)],
                # The worst frame for the fallback: dozens of candidates, none readable.
                "unreadable_crowd": [
                    synth.render_unreadable_crowd(rng, size, codes=30 * size[0] // 640)
                    for _ in range(max(2, frames // 10))
                ],
            }
            for kind, images in sets.items():
                row: dict[str, Any] = {}
                for name, fn in readers.items():
                    fn(images[0])  # load the native library / start the worker outside the timing
                    ms: list[float] = []
                    found = 0
                    # zbar costs ~10 ms a frame: fewer repeats keep the bench under a minute.
                    for _ in range(1 if name == "zbar" else repeats):
                        for image in images:
                            symbols, took = _timed(fn, image)
                            ms.append(took)
                            found += bool(symbols)
                    row[name] = {**_percentiles(ms), "frames_with_symbols": found}
                row["chain_over_zxing_p50"] = round(row["chain"]["p50"] / row["zxing"]["p50"], 3)
                if "chain_isolated" in row:
                    row["isolated_over_zxing_p50"] = round(
                        row["chain_isolated"]["p50"] / row["zxing"]["p50"], 3
                    )
                out[f"{size[0]}x{size[1]}_{kind}"] = row
    finally:
        chain.close()
        if isolated is not None:
            isolated.close()
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=40, help="distinct frames per size and kind")


def main(args: argparse.Namespace) -> int:
    setup_logging("warning")
    print(json.dumps(bench_frames(frames=args.frames), indent=2))
    return EXIT_OK
