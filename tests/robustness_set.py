"""Synthetic robustness set: QR codes as a gate camera sees them, one kind of trouble at a time.

Generated on demand from fixed seeds (no committed images): codes of versions 1, 4, 10 and 20
at two module sizes each, under one of: nothing special, defocus blur, strong rotation,
strong perspective, a thumb over part of the data area, a glare spot, low light, heavy
sensor noise. ``python -m tests.robustness_set`` prints the pass rate per kind for each
engine alone, the chain, and the chain without each rescue step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import segno

from scanner.models import Symbol
from scanner.sim import synth

KINDS = ("clean", "blur", "rotation", "perspective", "cover", "glare", "low_light", "noise")
# Byte-mode payload lengths that give versions 1, 4, 10 and 20 at error level M.
_LENGTHS = {1: 9, 4: 50, 10: 200, 20: 640}
# Module sizes (px at 640×480) per version: the larger fills ~half the frame height, the
# smaller is near the edge of what zxing-cpp reads on a clean frame.
_MODULE_PX = {1: (3.0, 6.0), 4: (2.6, 5.0), 10: (2.4, 4.0), 20: (2.2, 3.2)}
SIZE = (640, 480)


@dataclass(frozen=True, slots=True)
class Case:
    kind: str
    version: int
    module_px: float
    seed: int
    payload: bytes
    image: np.ndarray

    @property
    def name(self) -> str:
        return f"{self.kind}/v{self.version}/m{self.module_px:g}/s{self.seed}"


def _payload(version: int, seed: int) -> bytes:
    rng = np.random.default_rng(1000 * version + seed)
    alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789-/:."
    # Lower case keeps segno in byte mode, so the length fixes the version.
    data = bytes(alphabet[int(i)] for i in rng.integers(0, len(alphabet), _LENGTHS[version]))
    made = segno.make_qr(data, error="m", boost_error=False).version
    assert made == version, (version, made)
    return data


def _covered(payload: bytes, module_px: float, rng: np.random.Generator) -> np.ndarray:
    """A code with a thumb over part of the data area (finder patterns left clear), in a scene.

    The blob covers ~4-6% of the symbol: within what error level M (15%) can correct, as a
    thumb holding a card usually does.
    """
    mp = max(1, round(module_px))
    code = synth.render_qr(payload, module_px=mp).astype(np.float32)
    side = code.shape[0]
    quiet = 4 * mp
    n = (side - 2 * quiet) / mp  # modules
    # Thumb comes in from the right or bottom edge, between the finders.
    thumb = np.zeros(code.shape, np.uint8)
    r_major, r_minor = 0.22 * n * mp, 0.12 * n * mp
    if rng.random() < 0.5:
        centre = (round(side - quiet - 0.05 * n * mp), round(quiet + rng.uniform(0.55, 0.8) * n * mp))
        angle = rng.uniform(-20, 20)
    else:
        centre = (round(quiet + rng.uniform(0.55, 0.8) * n * mp), round(side - quiet - 0.05 * n * mp))
        angle = 90 + rng.uniform(-20, 20)
    cv2.ellipse(thumb, centre, (round(r_major), round(r_minor)), angle, 0, 360, 255, -1)
    alpha = cv2.GaussianBlur(thumb.astype(np.float32) / 255, (0, 0), max(1.0, 0.6 * mp))
    skin = float(rng.uniform(110, 170))
    code = code * (1 - alpha) + skin * alpha
    # Onto a scene, slightly turned, then the camera's blur and noise.
    w, h = SIZE
    frame = synth.render_background(rng, SIZE).astype(np.float32)
    x0 = int(rng.integers(0, w - side)) if side < w else 0
    y0 = int(rng.integers(0, h - side)) if side < h else 0
    patch = code[: h - y0, : w - x0]
    frame[y0 : y0 + patch.shape[0], x0 : x0 + patch.shape[1]] = patch
    turn = cv2.getRotationMatrix2D((x0 + side / 2, y0 + side / 2), float(rng.uniform(-15, 15)), 1.0)
    frame = cv2.warpAffine(frame, turn, SIZE, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    frame = cv2.GaussianBlur(frame, (0, 0), 0.7) + rng.normal(0, 3, frame.shape).astype(np.float32)
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8)


def _render(kind: str, payload: bytes, module_px: float, rng: np.random.Generator) -> np.ndarray:
    if kind == "cover":
        return _covered(payload, module_px, rng)
    base: dict[str, object] = {"module_px": module_px, "angle_deg": 0.0, "perspective": 0.0}
    if kind == "clean":
        extra: dict[str, object] = {"blur": 0.3, "noise": 2.0, "brightness": 1.0}
    elif kind == "blur":
        extra = {"blur": 0.45 * module_px}  # defocus grows with the code: the same code, missed focus
    elif kind == "rotation":
        extra = {"angle_deg": float(rng.choice([-1, 1]) * rng.uniform(30, 45))}
    elif kind == "perspective":
        extra = {"perspective": float(rng.uniform(40, 50)), "angle_deg": float(rng.uniform(-15, 15))}
    elif kind == "glare":
        extra = {"glare": True, "screen": bool(rng.random() < 0.5)}
    elif kind == "low_light":
        extra = {"brightness": float(rng.uniform(0.2, 0.3)), "noise": 5.0}
    elif kind == "noise":
        extra = {"noise": float(rng.uniform(12, 16))}
    else:
        raise ValueError(kind)
    return synth.render_scene(payload, rng, size=SIZE, **{**base, **extra})  # type: ignore[arg-type]


def cases(kinds: tuple[str, ...] = KINDS, seeds: int = 2) -> Iterator[Case]:
    """Every (kind, version, module size, seed) case, deterministic."""
    for k, kind in enumerate(kinds):
        for version, sizes in _MODULE_PX.items():
            for module_px in sizes:
                for seed in range(seeds):
                    payload = _payload(version, seed)
                    rng = np.random.default_rng([k, version, round(module_px * 10), seed])
                    yield Case(
                        kind, version, module_px, seed, payload, _render(kind, payload, module_px, rng)
                    )


def pass_rates(
    decode: Callable[[np.ndarray], list[Symbol]], all_cases: list[Case]
) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Fraction of cases per kind where ``decode`` returns the payload; and the failures."""
    passed: dict[str, int] = {}
    total: dict[str, int] = {}
    failed: dict[str, list[str]] = {}
    for case in all_cases:
        total[case.kind] = total.get(case.kind, 0) + 1
        if any(s.payload == case.payload for s in decode(case.image)):
            passed[case.kind] = passed.get(case.kind, 0) + 1
        else:
            failed.setdefault(case.kind, []).append(case.name)
    return {k: passed.get(k, 0) / total[k] for k in total}, failed


def _main() -> None:
    from scanner.gate import decode as decode_mod
    from scanner.gate.decode import DEFAULT_RESCUE, RESCUE_STEPS, Decoder

    all_cases = list(cases(seeds=4))
    readers: dict[str, Callable[[np.ndarray], list[Symbol]]] = {
        "zxing": lambda im: decode_mod._zxing(im)[0],
        "zbar": decode_mod._zbar,
        "zxing+zbar": Decoder(rescue=()).decode,
        "chain": Decoder().decode,
        "chain+all": Decoder(rescue=RESCUE_STEPS).decode,
    }
    for step in DEFAULT_RESCUE:
        readers[f"chain-{step}"] = Decoder(rescue=tuple(s for s in DEFAULT_RESCUE if s != step)).decode
    print("cases per kind:", len(all_cases) // len(KINDS))
    for name, fn in readers.items():
        rates, _ = pass_rates(fn, all_cases)
        mean = sum(rates.values()) / len(rates)
        cells = " ".join(f"{k}={math.floor(v * 100)}" for k, v in rates.items())
        print(f"{name:>20}: mean {mean * 100:.1f}%  {cells}")


if __name__ == "__main__":
    _main()
