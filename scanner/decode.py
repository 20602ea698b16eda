"""QR decoding: zxing-cpp on every frame, zbar only where zxing-cpp found but could not read a code.

Measured on the shared corpus (``data/README.md``): zxing-cpp reads more codes than zbar and
costs a fraction of the time, while zbar still reads a few that zxing-cpp only detects. So
zbar runs only when zxing-cpp reports an undecodable QR candidate that no valid symbol
covers. Payloads are bytes: the engines disagree on character sets.

Every engine call goes through :meth:`Decoder._run`, the seam where issue 3 moves the native
decoders into a child process so that a crash or hang in C code cannot take the daemon down.
Until then an engine exception is logged and counted, never raised; when zxing-cpp itself
fails on a frame, zbar (if enabled) reads that frame alone.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from scanner.models import Symbol

log = logging.getLogger(__name__)

ENGINES = ("zxing", "zbar")

Polygon = tuple[tuple[int, int], ...]


class Decoder:
    """Finds every QR code in a grayscale frame. Not thread-safe: one per decode thread."""

    def __init__(self, engines: Sequence[str] = ENGINES) -> None:
        engines = tuple(engines)
        unknown = [e for e in engines if e not in ENGINES]
        if unknown or not engines:
            raise ValueError(f"decoder engines must be a non-empty subset of {ENGINES}, got {engines}")
        self.engines = engines
        self.errors: dict[str, int] = dict.fromkeys(ENGINES, 0)  # engine exceptions, for health
        self.fallbacks = 0  # frames on which zbar ran as zxing's fallback

    def decode(self, image: np.ndarray) -> list[Symbol]:
        if image.ndim != 2 or image.dtype != np.uint8:
            raise ValueError(f"decode needs a grayscale uint8 image, got {image.dtype} {image.shape}")
        symbols: list[Symbol] = []
        candidates: list[Polygon] = []
        zxing_failed = False
        if "zxing" in self.engines:
            found = self._run("zxing", _zxing, image, None)
            zxing_failed = found is None
            symbols, candidates = found or ([], [])
        if "zbar" not in self.engines:
            return symbols
        if "zxing" in self.engines and not zxing_failed:  # a broken zxing leaves zbar to do it all
            # Only candidates that no decoded symbol covers: zxing often reports a failed
            # attempt next to its own successful read of the same code.
            pending = [c for c in candidates if not any(_overlaps(c, s.polygon) for s in symbols)]
            if not pending:
                return symbols
            self.fallbacks += 1
        seen = {s.payload for s in symbols}
        for extra in self._run("zbar", _zbar, image, []):
            # A code zxing already read comes back from zbar with re-encoded text (Shift_JIS
            # as EUC-JP), so dedupe by place as well as by bytes.
            if extra.payload in seen or any(_overlaps(extra.polygon, s.polygon) for s in symbols):
                continue
            seen.add(extra.payload)
            symbols.append(extra)
        return symbols

    def _run(self, engine: str, fn: Callable[[np.ndarray], Any], image: np.ndarray, empty: Any) -> Any:
        try:
            return fn(image)
        except Exception:
            self.errors[engine] += 1
            n = self.errors[engine]
            if n == 1 or n % 1000 == 0:  # at 30 fps a broken engine must not flood the journal
                log.exception(
                    "decoder %s failed (%d times so far) on a %sx%s frame",
                    engine,
                    n,
                    image.shape[1],
                    image.shape[0],
                )
            return empty


def _zxing(image: np.ndarray) -> tuple[list[Symbol], list[Polygon]]:
    import zxingcpp  # native library: loaded on first decode, not at import

    symbols: list[Symbol] = []
    candidates: list[Polygon] = []
    seen: set[bytes] = set()
    results = zxingcpp.read_barcodes(image, formats=zxingcpp.BarcodeFormat.QRCode, return_errors=True)
    for result in results:
        p = result.position
        corners = (p.top_left, p.top_right, p.bottom_right, p.bottom_left)
        polygon = tuple((int(q.x), int(q.y)) for q in corners)
        if result.valid:
            payload = bytes(result.bytes)
            if payload not in seen:
                seen.add(payload)
                symbols.append(Symbol(payload=payload, engine="zxing", polygon=polygon))
        elif result.format not in (zxingcpp.BarcodeFormat.MicroQRCode, zxingcpp.BarcodeFormat.RMQRCode):
            # zxing-cpp 3's QRCode family includes Micro QR and rMQR, which zbar cannot read:
            # failed candidates of those kinds would only cost a useless zbar pass.
            candidates.append(polygon)
    return symbols, candidates


def _zbar(image: np.ndarray) -> list[Symbol]:
    from pyzbar import pyzbar  # loads libzbar: only when a fallback first needs it

    symbols = []
    for result in pyzbar.decode(image, symbols=[pyzbar.ZBarSymbol.QRCODE]):
        points = [(int(p.x), int(p.y)) for p in result.polygon]
        if len(points) != 4:  # zbar reports the hull it found; keep the contract of four corners
            r = result.rect
            points = [
                (r.left, r.top),
                (r.left + r.width, r.top),
                (r.left + r.width, r.top + r.height),
                (r.left, r.top + r.height),
            ]
        symbols.append(Symbol(payload=bytes(result.data), engine="zbar", polygon=tuple(points)))
    return symbols


def _overlaps(a: Polygon, b: Polygon) -> bool:
    """True when the centre of either quadrilateral lies inside the other."""
    return _inside(_centre(a), b) or _inside(_centre(b), a)


def _centre(poly: Polygon) -> tuple[float, float]:
    return (sum(x for x, _ in poly) / len(poly), sum(y for _, y in poly) / len(poly))


def _inside(point: tuple[float, float], poly: Polygon) -> bool:
    contour = np.asarray(poly, dtype=np.float32).reshape(-1, 1, 2)
    return cv2.pointPolygonTest(contour, point, False) >= 0


def describe_image(path: Path, decoder: Decoder) -> dict[str, Any]:
    """One image as the ``decode`` command's JSON record; ``ms`` is the decode time alone."""
    path = Path(path)
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None or image.size == 0:
        return {"file": str(path), "error": "cannot read image", "symbols": [], "ms": 0}
    start = time.perf_counter()
    symbols = decoder.decode(image)
    ms = round((time.perf_counter() - start) * 1000, 3)
    return {
        "file": str(path),
        "symbols": [
            {
                "text": s.text,
                "bytes_b64": base64.b64encode(s.payload).decode("ascii"),
                "engine": s.engine,
                "polygon": [[x, y] for x, y in s.polygon],
            }
            for s in symbols
        ],
        "ms": ms,
    }
