"""`gate-scanner bench decode --corpus DIR`: what each engine and the chain read, and at what cost.

DIR holds folders of photos: ``N.png`` with ``N.txt`` holding the expected text; a folder with
no ``.txt`` files holds no codes, so anything read there is a false positive.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from scanner.console import EXIT_OK, EXIT_USAGE, setup_logging
from scanner.gate import decode as decode_mod
from scanner.gate.decode import DEFAULT_RESCUE, Decoder
from scanner.models import Symbol

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".pgm")
# Charsets a QR payload may be written in with no ECI telling the reader (QR's default
# Latin-1, Shift_JIS for Kanji mode, GB2312 for Hanzi mode), plus EUC-JP because zbar
# re-encodes Shift_JIS payloads as EUC-JP. The .txt files hold the text as UTF-8.
_CHARSETS = ("utf-8", "shift_jis", "euc_jp", "gb18030", "iso-8859-1")


def matches(expected: bytes, payload: bytes) -> bool:
    """The payload's bytes are the expected ones, or decode (in some QR charset) to its text."""
    if payload == expected:
        return True
    try:
        want = expected.decode("utf-8")
    except UnicodeDecodeError:
        return False
    for charset in _CHARSETS:
        try:
            if payload.decode(charset) == want:
                return True
        except UnicodeDecodeError:
            continue
    return False


def _zxing_alone(image: np.ndarray) -> list[Symbol]:
    return decode_mod._zxing(image)[0]


def _zbar_alone(image: np.ndarray) -> list[Symbol]:
    return decode_mod._zbar(image)


def _timed(fn: Callable[[np.ndarray], list[Symbol]], image: np.ndarray) -> tuple[list[Symbol], float]:
    start = time.perf_counter()
    symbols = fn(image)
    return symbols, (time.perf_counter() - start) * 1000


def _median(ms: list[float]) -> float | None:
    return round(statistics.median(ms), 3) if ms else None


def bench_decode(
    corpus: Path,
    *,
    engines: Sequence[str] = decode_mod.ENGINES,
    rescue: Sequence[str] = DEFAULT_RESCUE,
    isolate: bool = False,
) -> dict[str, Any]:
    """Per folder and in total: images, passes (or false positives) and median ms per reader."""
    corpus = Path(corpus)
    folders = sorted(p for p in corpus.iterdir() if p.is_dir()) if corpus.is_dir() else []
    if not folders:
        raise FileNotFoundError(f"{corpus}: no folders with images")
    chain = Decoder(engines, rescue=rescue, isolate=isolate)
    readers: dict[str, Callable[[np.ndarray], list[Symbol]]] = {
        "zxing": _zxing_alone,
        "zbar": _zbar_alone,
        "chain": chain.decode,
    }
    per_folder: dict[str, Any] = {}
    total: dict[str, Any] = {"images": 0, "no_qr_images": 0}
    total_ms: dict[str, list[float]] = {name: [] for name in readers}
    for name in readers:
        total[name] = {"passes": 0, "false_positives": 0}
    rescued: dict[str, int] = dict.fromkeys(rescue, 0)
    failed: list[str] = []
    try:
        for folder in folders:
            images = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
            expected = {p: p.with_suffix(".txt") for p in images if p.with_suffix(".txt").is_file()}
            has_text = bool(expected)
            row: dict[str, Any] = {"images": len(expected) if has_text else len(images)}
            if has_text:
                images = [p for p in images if p in expected]
            ms: dict[str, list[float]] = {name: [] for name in readers}
            counts = dict.fromkeys(readers, 0)
            for path in images:
                image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
                if image is None:  # e.g. OpenCV refuses a 1×1 WebP: say so, do not hide it
                    row["unreadable"] = row.get("unreadable", 0) + 1
                    continue
                want = expected[path].read_bytes() if has_text else None
                for name, fn in readers.items():
                    wins_before = dict(chain.wins)
                    symbols, took = _timed(fn, image)
                    ms[name].append(took)
                    if want is None:
                        counts[name] += len(symbols)
                        continue
                    hit = any(matches(want, s.payload) for s in symbols)
                    counts[name] += hit
                    if name == "chain":
                        if not hit:
                            failed.append(f"{folder.name}/{path.stem}")
                        for step, n in chain.wins.items():
                            if hit and n > wins_before[step] and step in rescued:
                                rescued[step] += 1
            key = "passes" if has_text else "false_positives"
            for name in readers:
                row[name] = {key: counts[name], "median_ms": _median(ms[name])}
                total[name][key] += counts[name]
                total_ms[name] += ms[name]
            per_folder[folder.name] = row
            total["images" if has_text else "no_qr_images"] += row["images"]
    finally:
        chain.close()
    for name in readers:
        total[name]["median_ms"] = _median(total_ms[name])
    return {
        "corpus": str(corpus),
        "chain": {"engines": list(chain.engines), "rescue": list(rescue), "isolate": isolate},
        "folders": per_folder,
        "total": total,
        # Images the chain passed with a symbol that a rescue step read (see decode.py).
        "chain_rescued_by_step": rescued,
        "chain_failed": failed,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, type=Path, help="folders of N.png + N.txt expected text")
    parser.add_argument("--isolate", action="store_true", help="run the chain in the decoder process")


def main(args: argparse.Namespace) -> int:
    setup_logging("warning")
    if not args.corpus.is_dir():
        print(f"--corpus: {args.corpus} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(bench_decode(args.corpus, isolate=args.isolate), indent=2))
    return EXIT_OK
