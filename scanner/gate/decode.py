"""QR decoding: zxing-cpp on every frame, slower help only where zxing-cpp saw a code it could not read.

Measured on real photos of codes (``gate-scanner bench decode``): zxing-cpp reads more codes
than zbar and costs a fraction of the time, while zbar still reads a few that zxing-cpp only detects. So
the chain is, per frame:

1. zxing-cpp (QR only, its defaults) on the whole frame: most frames end here.
2. When it read nothing: a *probe*, zxing-cpp with its global-histogram binariser, no
   rotate/downscale/invert passes, on a half-size copy. It costs ~10% of step 1 and finds
   codes whose texture (photo art, printing on food) defeats the local binariser; it either
   reads them or reports a candidate that step 3 reads.
3. A QR candidate that no valid symbol covers: zbar on the whole frame.
4. Still uncovered: bounded rescue steps (:data:`RESCUE_STEPS`), each kept because it won
   images on the corpus that the earlier steps lost (figures in ``bench decode``).

Every symbol comes from an engine's own valid, error-corrected decode: the steps only change
what the engines look at, so no step can invent a payload. Payloads are bytes: the engines
disagree on character sets.

Isolation: with ``isolate=True`` the chain runs in a persistent child process,
the frame crosses in one preallocated shared memory block, and each frame has a deadline. A
segfault, abort or hang in native code costs that one frame (no symbols, counted in
:attr:`Decoder.worker_failures`) and a respawn, never the daemon.

The child is a fresh interpreter (no parent threads copied) started with ``subprocess``, not
multiprocessing (a Pi Zero 2 W has 512 MB): multiprocessing's forkserver and spawn
each add a resource-tracker process, and the forkserver a third interpreter that imports the
daemon's entry script; the frame block is a memfd instead of a named ``SharedMemory`` for the
same reason. The child imports numpy, zxing-cpp and this module; OpenCV only if a frame
needs a step that uses it (odd-sized probe, blur, upscaled crop), so most frames never load
it there.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import functools
import json
import logging
import mmap
import multiprocessing.connection
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scanner.console import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE
from scanner.models import Symbol

log = logging.getLogger(__name__)

ENGINES = ("zxing", "zbar")
# In chain order. "probe" is step 2 above; the others run only on an uncovered candidate.
RESCUE_STEPS = ("probe", "zxing-global", "crop-upscale", "blur-global")
DEFAULT_RESCUE = ("probe", "zxing-global", "crop-upscale")
# A frame with many unreadable candidates (a wall of stickers) must not cost unbounded time:
# at most this many candidates get help, and no help starts once this much of the frame's
# time is spent. zbar on a whole 640x480 frame of damaged codes took 230 ms here (700 ms at
# 1280x720), past the isolated decoder's 1 s deadline on a Pi.
MAX_RESCUE_CANDIDATES = 3
RESCUE_BUDGET_S = 0.06
# More failed candidates than this is a crowd of codes (a wall of stickers), not one held up.
CROWDED = 2 * MAX_RESCUE_CANDIDATES
_CROP_MARGIN = 0.25  # of the candidate's larger side: keeps the quiet zone and finder edges

Polygon = tuple[tuple[int, int], ...]
Engine = Callable[[np.ndarray], list[Symbol]]


class WorkerFailed(RuntimeError):
    """The isolated decoder process died or missed its deadline on a frame."""


class Decoder:
    """Finds every QR code in a grayscale frame. Not thread-safe: one per decode thread.

    ``engine`` replaces the whole chain with a callable ``image -> list[Symbol]`` (tests
    inject crashing engines through it; with ``isolate`` it must be picklable).
    """

    def __init__(
        self,
        engines: Sequence[str] = ENGINES,
        *,
        rescue: Sequence[str] = DEFAULT_RESCUE,
        isolate: bool = False,
        deadline_s: float = 1.0,
        engine: Callable[[], Engine] | None = None,
    ) -> None:
        self._chain = _Chain(engines, rescue)
        self.engines = self._chain.engines
        self.isolate = isolate
        self._worker = _Worker(engines, tuple(rescue), deadline_s, engine) if isolate else None
        self._engine = engine() if engine is not None and not isolate else None
        self.worker_failures = 0  # frames lost to a crash or timeout in the isolated decoder
        # Frames lost in a row: a worker that dies on every frame leaves the gate blind while
        # each decode "succeeds" with no symbols; the app alarms and restarts on this.
        self.consecutive_failures = 0

    @property
    def errors(self) -> dict[str, int]:
        """Engine exceptions per engine, for health."""
        return self._chain.errors

    @property
    def fallbacks(self) -> int:
        """Frames on which zbar ran as zxing's fallback."""
        return self._chain.fallbacks

    @property
    def wins(self) -> dict[str, int]:
        """Symbols read by each rescue step: shows whether a step still earns its cost."""
        return self._chain.wins

    def decode(self, image: np.ndarray) -> list[Symbol]:
        if image.ndim != 2 or image.dtype != np.uint8:
            raise ValueError(f"decode needs a grayscale uint8 image, got {image.dtype} {image.shape}")
        if self._worker is None:
            if self._engine is not None:
                return self._engine(image)
            return self._chain.decode(image)
        try:
            symbols, counters = self._worker.decode(image)
        except WorkerFailed as exc:
            self.worker_failures += 1
            self.consecutive_failures += 1
            n = self.worker_failures
            if n == 1 or n % 100 == 0:  # a decoder that keeps crashing must not flood the journal
                log.error("isolated decoder lost a frame (%d so far): %s", n, exc)
            return []
        self.consecutive_failures = 0
        self._chain.add(counters)
        return symbols

    def close(self) -> None:
        """Stop the decoder process, if any; idempotent."""
        if self._worker is not None:
            self._worker.close()

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Chain:
    """The in-process decode chain; the isolated worker runs one of these."""

    def __init__(self, engines: Sequence[str], rescue: Sequence[str]) -> None:
        engines = tuple(engines)
        unknown = [e for e in engines if e not in ENGINES]
        if unknown or not engines:
            raise ValueError(f"decoder engines must be a non-empty subset of {ENGINES}, got {engines}")
        bad_steps = [s for s in rescue if s not in RESCUE_STEPS]
        if bad_steps:
            raise ValueError(f"rescue steps must be among {RESCUE_STEPS}, got {tuple(rescue)}")
        self.engines = engines
        self.rescue = tuple(rescue)
        self.errors: dict[str, int] = dict.fromkeys(ENGINES, 0)
        self.fallbacks = 0
        self.wins: dict[str, int] = dict.fromkeys(RESCUE_STEPS, 0)

    def counters(self) -> dict[str, Any]:
        return {"errors": dict(self.errors), "fallbacks": self.fallbacks, "wins": dict(self.wins)}

    def add(self, delta: dict[str, Any]) -> None:
        for k, v in delta["errors"].items():
            self.errors[k] += v
        self.fallbacks += delta["fallbacks"]
        for k, v in delta["wins"].items():
            self.wins[k] += v

    def decode(self, image: np.ndarray) -> list[Symbol]:
        deadline = time.perf_counter() + RESCUE_BUDGET_S
        symbols: list[Symbol] = []
        candidates: list[Polygon] = []
        zxing_failed = False
        use_zxing = "zxing" in self.engines
        if use_zxing:
            found = self._run("zxing", _zxing, image, None)
            zxing_failed = found is None
            symbols, candidates = (list(found[0]), list(found[1])) if found else ([], [])
            if not zxing_failed and not symbols and "probe" in self.rescue:
                extra, more = self._run("zxing", _probe, image, ([], []))
                self._merge(symbols, extra, "probe")
                candidates = candidates + more
        if "zbar" in self.engines:
            if not use_zxing or zxing_failed:  # a broken zxing leaves zbar to do it all
                self._merge(symbols, self._run("zbar", _zbar, image, []), None)
                return symbols
            pending = self._pending(candidates, symbols, image)
            if pending and len(candidates) <= CROWDED:
                self.fallbacks += 1
                self._merge(symbols, self._run("zbar", _zbar, image, []), None)
            elif pending:
                # A crowd of unreadable codes (a wall of stickers): zbar only where zxing saw
                # the largest few. On the whole frame it cost 230 ms at 640x480 and 700 ms at
                # 1280x720 here, chasing finder patterns across every code in view.
                self.fallbacks += 1
                for polygon in pending:
                    if time.perf_counter() > deadline:
                        break
                    found = self._run("zbar", functools.partial(_zbar_crop, polygon=polygon), image, [])
                    self._merge(symbols, found, None)
        if not use_zxing or zxing_failed:
            return symbols
        for step in self.rescue:
            pending = self._pending(candidates, symbols, image)
            if not pending or time.perf_counter() > deadline:
                break
            if step == "zxing-global":
                self._merge(symbols, self._run("zxing", _zxing_global, image, []), step)
            elif step == "blur-global":
                self._merge(symbols, self._run("zxing", _blur_global, image, []), step)
            elif step == "crop-upscale":
                for polygon in pending:
                    if time.perf_counter() > deadline:
                        break
                    found = self._run("zxing", functools.partial(_crop_upscale, polygon=polygon), image, [])
                    self._merge(symbols, found, step)
        return symbols

    @staticmethod
    def _pending(candidates: list[Polygon], symbols: list[Symbol], image: np.ndarray) -> list[Polygon]:
        # Only candidates that no decoded symbol covers: zxing often reports a failed attempt
        # next to its own successful read of the same code. Largest first (the code held up
        # is the largest in view), bounded; stop looking once there are enough.
        areas = sorted(((_area(c), c) for c in candidates), key=lambda ac: ac[0], reverse=True)
        # In a crowd the typical candidate is a real code; one over twice its size is zxing
        # grouping finder patterns of different codes, and the costliest thing to chase (one
        # zbar pass over such a grouping cost 86 ms, over a single sticker 2-14 ms).
        limit = 2 * areas[len(areas) // 2][0] if len(candidates) > CROWDED else float("inf")
        unique: list[Polygon] = []
        for area, c in areas:
            if area > limit or any(_overlaps(c, s.polygon) for s in symbols):
                continue
            if not any(_overlaps(c, u) for u in unique):
                unique.append(c)
                if len(unique) == MAX_RESCUE_CANDIDATES:
                    break
        return unique

    def _merge(self, symbols: list[Symbol], extra: list[Symbol], step: str | None) -> None:
        seen = {s.payload for s in symbols}
        for s in extra:
            # The same code read again comes back with re-encoded text from zbar (Shift_JIS
            # as EUC-JP), so dedupe by place as well as by bytes.
            if s.payload in seen or any(_overlaps(s.polygon, t.polygon) for t in symbols):
                continue
            seen.add(s.payload)
            symbols.append(s)
            if step is not None:
                self.wins[step] += 1

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


# --------------------------------------------------------------------------- engines and steps


def _zxing(image: np.ndarray, **options: Any) -> tuple[list[Symbol], list[Polygon]]:
    import zxingcpp  # native library: loaded on first decode, not at import

    symbols: list[Symbol] = []
    candidates: list[Polygon] = []
    seen: set[bytes] = set()
    results = zxingcpp.read_barcodes(
        # The stubs ask for BarcodeFormats; one BarcodeFormat is what every zxing-cpp since 2.0 takes.
        image,
        formats=zxingcpp.BarcodeFormat.QRCode,  # type: ignore[arg-type,unused-ignore]
        return_errors=True,
        **options,
    )
    for result in results:
        p = result.position
        corners = (p.top_left, p.top_right, p.bottom_right, p.bottom_left)
        polygon = tuple((int(q.x), int(q.y)) for q in corners)
        if result.valid:
            payload = bytes(result.bytes)
            if payload not in seen:
                seen.add(payload)
                symbols.append(Symbol(payload=payload, engine="zxing", polygon=polygon, text=result.text))
        elif result.format not in (zxingcpp.BarcodeFormat.MicroQRCode, zxingcpp.BarcodeFormat.RMQRCode):
            # zxing-cpp 3's QRCode family includes Micro QR and rMQR, which zbar cannot read:
            # failed candidates of those kinds would only cost useless fallback passes.
            candidates.append(polygon)
    return symbols, candidates


def _global_histogram() -> Any:
    import zxingcpp  # native library: loaded on first decode, not at import

    return zxingcpp.Binarizer.GlobalHistogram


def _probe(image: np.ndarray) -> tuple[list[Symbol], list[Polygon]]:
    # Half size averages away print and fabric texture finer than a module; one binariser
    # pass without the rotate/downscale/invert retries keeps it at ~10% of the main pass.
    small = _half(image)
    symbols, candidates = _zxing(
        small, binarizer=_global_histogram(), try_rotate=False, try_downscale=False, try_invert=False
    )
    return [_moved(s, 2.0, 0, 0) for s in symbols], [_scaled(c, 2.0, 0, 0) for c in candidates]


def _half(image: np.ndarray) -> np.ndarray:
    """Half size by 2×2 box average: on even sizes exactly OpenCV's INTER_AREA, without
    loading OpenCV into the decoder process for the probe that runs on most frames."""
    h, w = image.shape[0] // 2, image.shape[1] // 2
    if image.shape[0] % 2 or image.shape[1] % 2:
        import cv2  # heavy: only an odd-sized frame needs it

        return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    blocks = image.reshape(h, 2, w, 2).astype(np.uint16).sum(axis=(1, 3), dtype=np.uint16)
    half: np.ndarray = ((blocks + 2) >> 2).astype(np.uint8)
    return half


def _zxing_global(image: np.ndarray) -> list[Symbol]:
    # One global threshold survives the uneven local contrast of wrinkled or glossy prints
    # that the local-average binariser breaks into noise.
    return _zxing(image, binarizer=_global_histogram())[0]


def _blur_global(image: np.ndarray) -> list[Symbol]:
    import cv2  # heavy: loaded in the decoder child only when a frame needs this step

    return _zxing(cv2.GaussianBlur(image, (0, 0), 1.0), binarizer=_global_histogram())[0]


def _around(image: np.ndarray, polygon: Polygon) -> tuple[int, int, int, int] | None:
    """The box around a candidate with its quiet zone and finder edges (x0, y0, x1, y1)."""
    xs = [x for x, _ in polygon]
    ys = [y for _, y in polygon]
    margin = _CROP_MARGIN * max(max(xs) - min(xs), max(ys) - min(ys))
    h, w = image.shape
    x0, y0 = max(0, int(min(xs) - margin)), max(0, int(min(ys) - margin))
    x1, y1 = min(w, int(max(xs) + margin) + 1), min(h, int(max(ys) + margin) + 1)
    if x1 - x0 < 8 or y1 - y0 < 8:
        return None
    return x0, y0, x1, y1


def _crop_upscale(image: np.ndarray, polygon: Polygon) -> list[Symbol]:
    # Small codes: zxing samples module centres better at 2x with a smooth interpolation.
    box = _around(image, polygon)
    if box is None:
        return []
    import cv2  # heavy: loaded in the decoder child only when a frame needs this step

    x0, y0, x1, y1 = box
    crop = cv2.resize(image[y0:y1, x0:x1], None, fx=2.0, fy=2.0, interpolation=cv2.INTER_CUBIC)
    return [_moved(s, 0.5, x0, y0) for s in _zxing(crop)[0]]


def _zbar_crop(image: np.ndarray, polygon: Polygon) -> list[Symbol]:
    box = _around(image, polygon)
    if box is None:
        return []
    x0, y0, x1, y1 = box
    return [_moved(s, 1.0, x0, y0) for s in _zbar(np.ascontiguousarray(image[y0:y1, x0:x1]))]


def _scaled(polygon: Polygon, k: float, dx: int, dy: int) -> Polygon:
    return tuple((round(x * k) + dx, round(y * k) + dy) for x, y in polygon)


def _moved(symbol: Symbol, k: float, dx: int, dy: int) -> Symbol:
    return dataclasses.replace(symbol, polygon=_scaled(symbol.polygon, k, dx, dy))


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
    """Inside or on the edge (what OpenCV's pointPolygonTest >= 0 says), in plain Python."""
    px, py = point
    inside = False
    for (x0, y0), (x1, y1) in zip(poly, poly[1:] + poly[:1], strict=True):
        cross = (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0)
        if cross == 0 and min(x0, x1) <= px <= max(x0, x1) and min(y0, y1) <= py <= max(y0, y1):
            return True
        if (y0 > py) != (y1 > py) and px < x0 + (py - y0) * (x1 - x0) / (y1 - y0):
            inside = not inside
    return inside


def _area(poly: Polygon) -> float:
    pairs = zip(poly, poly[1:] + poly[:1], strict=True)
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in pairs)) / 2.0


# --------------------------------------------------------------------------- isolation

_START_TIMEOUT_S = 30.0  # a cold Pi imports numpy and zxing-cpp in the child: seconds
_STOP_TIMEOUT_S = 2.0
_MIN_FRAME_BYTES = 1280 * 720  # so that a typical size change does not mean a new buffer
# The child's whole program: take the parent's import path (so an engine callable pickled by
# a test, or a checkout not installed, resolves the same), then serve. argv: socket fd, memfd.
_CHILD = (
    "import sys\n"
    "from multiprocessing.connection import Connection\n"
    "conn = Connection(int(sys.argv[1]))\n"
    "sys.path[:] = conn.recv()\n"
    f"from {__name__} import _serve\n"  # this module, wherever the package puts it
    "_serve(conn, int(sys.argv[2]))\n"
)


class _Worker:
    """A persistent decoder process fed through one shared-memory frame buffer.

    The socket carries only ``(seq, shape)`` one way and ``(seq, symbols, counters)`` back, so
    a 640×480 frame costs one memcpy into shared memory plus two small pickles.
    """

    def __init__(
        self,
        engines: Sequence[str],
        rescue: tuple[str, ...],
        deadline_s: float,
        engine: Callable[[], Engine] | None,
    ) -> None:
        _Chain(engines, rescue)  # validate here, where the caller can see the error
        self._args = (tuple(engines), rescue, engine)
        self._deadline_s = deadline_s
        self._buf: mmap.mmap | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._seq = 0
        self.restarts = 0

    def decode(self, image: np.ndarray) -> tuple[list[Symbol], dict[str, Any]]:
        if self._proc is None or self._buf is None or len(self._buf) < image.size:
            self._start(image.size)
        assert self._buf is not None and self._conn is not None and self._proc is not None
        view = np.ndarray(image.shape, np.uint8, buffer=self._buf)
        view[...] = image  # also makes a strided picamera2 view contiguous
        del view  # a live export would stop mmap.close()
        self._seq += 1
        try:
            self._conn.send((self._seq, image.shape))
            if not self._conn.poll(self._deadline_s):
                self.restarts += 1
                self._kill()
                raise WorkerFailed(f"no result within {self._deadline_s:.2f} s: killed, will respawn")
            seq, symbols, counters = self._conn.recv()
        except (EOFError, OSError) as exc:
            code = None
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = self._proc.wait(_STOP_TIMEOUT_S)
            self.restarts += 1
            self._kill()
            raise WorkerFailed(f"decoder process died (exit code {code}): {exc!r}") from exc
        if seq != self._seq:  # cannot happen with one request in flight; never trust a stale reply
            self._kill()
            raise WorkerFailed(f"reply for frame {seq} while waiting for {self._seq}")
        return symbols, counters

    def _start(self, size: int) -> None:
        if self._proc is not None:
            self.restarts += 1
        self._kill()
        size = max(size, _MIN_FRAME_BYTES)
        memfd = os.memfd_create("gate-scanner-frame", os.MFD_CLOEXEC)
        parent, child = socket.socketpair()
        try:
            os.ftruncate(memfd, size)
            self._buf = mmap.mmap(memfd, size)
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(child.fileno()), str(memfd)],
                pass_fds=(child.fileno(), memfd),
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            parent.close()
            self._kill()
            raise WorkerFailed(f"cannot start the decoder process: {exc}") from exc
        finally:
            child.close()
            os.close(memfd)
        self._conn = multiprocessing.connection.Connection(parent.detach())
        try:
            self._conn.send(list(sys.path))
            self._conn.send(self._args)
            ready = self._conn.poll(_START_TIMEOUT_S) and self._conn.recv() == "ready"
        except (EOFError, OSError) as exc:
            self._kill()
            raise WorkerFailed("decoder process died while starting") from exc
        if not ready:
            self._kill()
            raise WorkerFailed(f"decoder process not ready within {_START_TIMEOUT_S:.0f} s")

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(_STOP_TIMEOUT_S)
            self._proc = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._buf is not None:
            self._buf.close()
            self._buf = None

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):  # a dead worker cannot hear the polite stop
                self._conn.send(None)
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(_STOP_TIMEOUT_S)
        self._kill()


def _serve(conn: multiprocessing.connection.Connection, memfd: int) -> None:
    """The decoder process: one frame at a time until the socket closes or says stop."""
    engines, rescue, engine = conn.recv()
    buf = mmap.mmap(memfd, 0)
    os.close(memfd)
    chain = _Chain(engines, rescue)
    decode = engine() if engine is not None else chain.decode
    conn.send("ready")
    try:
        while True:
            # The parent owns every deadline; a parent that vanished closes the socket (EOF).
            message = conn.recv()
            if message is None:
                return
            seq, shape = message
            image = np.ndarray(shape, np.uint8, buffer=buf)
            before = chain.counters()
            symbols = decode(image)
            del image
            after = chain.counters()
            delta = {
                "errors": {k: after["errors"][k] - before["errors"][k] for k in after["errors"]},
                "fallbacks": after["fallbacks"] - before["fallbacks"],
                "wins": {k: after["wins"][k] - before["wins"][k] for k in after["wins"]},
            }
            conn.send((seq, symbols, delta))
    except (EOFError, KeyboardInterrupt):
        return
    finally:
        buf.close()


# --------------------------------------------------------------------------- the decode command


def describe_image(path: Path, decoder: Decoder) -> dict[str, Any]:
    """One image as the ``decode`` command's JSON record; ``ms`` is the decode time alone."""
    import cv2  # heavy: the decoder child imports this module and never reads image files

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


# --- gate-scanner decode IMAGE... ------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--engines", default="zxing,zbar", help="comma-separated, default zxing,zbar")


def main(args: argparse.Namespace) -> int:
    engines = tuple(e for e in args.engines.split(",") if e)
    unknown = set(engines) - {"zxing", "zbar"}
    if unknown or not engines:
        print(f"--engines: choose from zxing, zbar (got {','.join(engines)})", file=sys.stderr)
        return EXIT_USAGE
    decoder = Decoder(engines)
    status = EXIT_OK
    for image in args.images:
        line = describe_image(image, decoder)
        if "error" in line:
            status = EXIT_RUNTIME
        print(json.dumps(line, ensure_ascii=False), flush=True)
    return status
