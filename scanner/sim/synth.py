"""Synthetic camera frames with QR codes in them, for the built-in demo and for tests.

Everything is procedural and deterministic from a ``numpy.random.Generator``: no image
assets ship with the package, and the same seed always gives byte-identical frames.

A frame is built the way a gate camera sees one: a cluttered, unevenly lit scene; a paper
card or a phone screen carrying the code, held at an angle and tilted away from the lens;
then the camera's own faults (defocus, exposure, sensor noise, glare). The carrier is
rendered and warped at twice the output resolution and area-averaged down, because that is
what a sensor does to a sharp edge: a bilinear warp straight to the output size would alias
module edges into staircase patterns no camera produces.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import segno

log = logging.getLogger(__name__)

__all__ = [
    "demo_frames",
    "payload_bytes",
    "render_background",
    "render_empty",
    "render_qr",
    "render_scene",
]

# Carrier and warp are drawn at this multiple of the output size, then area-averaged down.
_SUPERSAMPLE = 2
# Horizontal field of view of the Pi camera module 3 (standard lens) is ~66°, v2 is ~62°:
# it sets how strongly a tilted card foreshortens.
_HFOV_DEG = 64.0
_QUIET_MODULES = 4

# Words a camera at a Vietnamese bus station or market sees on signs (putText is ASCII only).
_SIGN_WORDS = (
    "BEN XE",
    "LOI RA",
    "LOI VAO",
    "CONG",
    "VE",
    "GIA VE",
    "QUAY",
    "TRAM",
    "CHO",
    "EXIT",
    "GATE",
    "NO",
    "STOP",
    "08:30",
    "14:15",
    "MIEN DONG",
    "SO",
    "KHU A",
    "KHU B",
    "WC",
    "TAXI",
    "XE BUYT",
    "GIU GIN",
    "TRAT TU",
    "CAM",
    "HUT THUOC",
    "24H",
    "HOTLINE",
)


def payload_bytes(payload: bytes | str) -> bytes:
    """The bytes a decoder reports for ``payload`` as rendered here (``str`` → UTF-8)."""
    return payload if isinstance(payload, bytes) else payload.encode("utf-8")


def _segno_data(payload: bytes | str) -> bytes | str:
    # segno encodes a str that fits ISO-8859-1 as Latin-1 bytes, which a decoder then reports
    # as bytes that are not the UTF-8 the rest of the scanner compares against. Handing it
    # UTF-8 bytes for anything non-ASCII keeps "payload bytes" one well-defined thing; pure
    # ASCII stays a str so segno may still pick the denser numeric/alphanumeric modes.
    if isinstance(payload, bytes):
        return payload
    return payload if payload.isascii() else payload.encode("utf-8")


def _qr_matrix(payload: bytes | str, error: str) -> np.ndarray:
    qr = segno.make_qr(_segno_data(payload), error=error, boost_error=False)
    return np.asarray(qr.matrix, dtype=np.uint8)  # 1 = dark module, no quiet zone


def render_qr(payload: bytes | str, *, module_px: int, border: int = 4, error: str = "m") -> np.ndarray:
    """A clean code: dark modules 0, light 255, ``border`` light modules around, ``uint8``.

    ``bytes`` payloads are encoded in byte mode and decode back to exactly those bytes; a
    ``str`` decodes to its UTF-8 encoding (see :func:`payload_bytes`).
    """
    if module_px < 1:
        raise ValueError(f"module_px must be >= 1, got {module_px}")
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    matrix = np.pad(_qr_matrix(payload, error), border)
    img = np.where(matrix == 1, 0, 255).astype(np.uint8)
    return np.repeat(np.repeat(img, module_px, axis=0), module_px, axis=1)


# --------------------------------------------------------------------------- background


def _lighting(rng: np.random.Generator, w: int, h: int, lo: float, hi: float) -> np.ndarray:
    """A smooth gain field in [lo, hi]: one window or lamp off to one side, plus vignetting."""
    # Broadcast a column against a row: full-size coordinate grids cost more than the maths.
    yy = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    xx = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
    theta = rng.uniform(0, 2 * math.pi)
    ramp = xx * math.cos(theta) + yy * math.sin(theta)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    vignette = 1.0 - rng.uniform(0.05, 0.25) * (4 * xx**2 + 4 * yy**2) / 2.0
    return ((lo + (hi - lo) * ramp) * vignette).astype(np.float32)


def _draw_hand(img: np.ndarray, rng: np.random.Generator, center: tuple[float, float], scale: float) -> None:
    """A palm with four fingers and a thumb, in place, as a blurred mid-grey silhouette.

    Skin in the Y plane sits in the middle of the range; what matters for the decoder is a
    large soft-edged blob that is not a code.
    """
    tone = float(rng.uniform(95, 175))
    layer = np.zeros(img.shape[:2], np.uint8)
    cx, cy = center
    rot = rng.uniform(0, 360)
    palm = (round(0.38 * scale), round(0.42 * scale))
    cv2.ellipse(layer, (round(cx), round(cy)), palm, rot, 0, 360, 255, -1)
    rad = math.radians(rot)
    tip_dir = rad - math.pi / 2
    ux, uy = math.cos(tip_dir), math.sin(tip_dir)  # towards the fingertips
    for k, length in enumerate((0.7, 0.85, 0.8, 0.6)):
        off = (k - 1.5) * 0.2 * scale
        bx = cx + off * math.cos(rad) + 0.3 * scale * ux
        by = cy + off * math.sin(rad) + 0.3 * scale * uy
        fx, fy = bx + 0.5 * scale * length * ux, by + 0.5 * scale * length * uy
        cv2.line(layer, (round(bx), round(by)), (round(fx), round(fy)), 255, max(2, round(0.15 * scale)))
    tx = cx + 0.55 * scale * math.cos(rad + 0.4)
    ty = cy + 0.55 * scale * math.sin(rad + 0.4)
    cv2.line(layer, (round(cx), round(cy)), (round(tx), round(ty)), 255, max(2, round(0.17 * scale)))
    alpha = cv2.GaussianBlur(layer.astype(np.float32) / 255.0, (0, 0), max(1.0, 0.015 * scale))
    # Skin is not flat: the palm is shaded towards one side.
    shade = _lighting(rng, img.shape[1], img.shape[0], 0.8, 1.1)
    img[:] = img * (1 - alpha) + tone * shade * alpha


def _put_text(
    img: np.ndarray, text: str, org: tuple[int, int], font: int, scale: float, tone: float, thickness: int
) -> None:
    """Anti-aliased text of grey ``tone`` onto a float image, in place.

    OpenCV 5 draws text only into 8-bit images, so render coverage there and blend.
    """
    layer = np.zeros(img.shape, np.uint8)
    cv2.putText(layer, text, org, font, scale, 255, thickness, cv2.LINE_AA)
    alpha = layer.astype(np.float32) / 255.0
    img[:] = img * (1 - alpha) + tone * alpha


def _random_text(rng: np.random.Generator) -> str:
    n = int(rng.integers(1, 4))
    return " ".join(_SIGN_WORDS[int(i)] for i in rng.integers(0, len(_SIGN_WORDS), n))


def render_background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A plausible scene behind a gate's camera, ``uint8`` of shape ``size[::-1]``.

    Uneven lighting, a counter edge, signs with text, posters, cables, sometimes a hand,
    slightly out of focus (the lens focuses on the code plane, not the wall) with fine
    texture. Nothing in it is square-in-square, so no decoder finds a finder pattern.
    """
    w, h = size
    img: np.ndarray = np.full((h, w), rng.uniform(80, 170), np.float32)

    # A counter or floor edge across the lower part: the darker surface people reach over.
    if rng.random() < 0.7:
        y0 = rng.uniform(0.55, 0.9) * h
        y1 = y0 + rng.uniform(-0.15, 0.15) * h
        poly = np.array([[0, y0], [w, y1], [w, h], [0, h]], np.int32)
        cv2.fillPoly(img, [poly], float(rng.uniform(30, 100)))

    # Posters, panels, signs: flat-toned boxes, some with a thin outline, some with text.
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(-w // 8, w)), int(rng.integers(-h // 8, h))
        bw, bh = int(rng.integers(w // 12, w // 2)), int(rng.integers(h // 14, h // 3))
        tone = float(rng.uniform(20, 235))
        cv2.rectangle(img, (x0, y0), (x0 + bw, y0 + bh), tone, -1)
        if rng.random() < 0.3:
            edge = float(np.clip(tone + rng.choice([-1, 1]) * rng.uniform(30, 90), 0, 255))
            cv2.rectangle(img, (x0, y0), (x0 + bw, y0 + bh), edge, int(rng.integers(1, 3)))
        if rng.random() < 0.6:
            ink = float(np.clip(tone + rng.choice([-1, 1]) * rng.uniform(60, 140), 0, 255))
            scale = float(rng.uniform(0.4, 1.3))
            _put_text(
                img,
                _random_text(rng),
                (x0 + 5, y0 + int(bh * rng.uniform(0.3, 0.9))),
                int(
                    rng.choice([cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX])
                ),
                scale,
                ink,
                int(rng.integers(1, 3)),
            )

    # Loose printed marks: timetables and price tags read as rows of small text.
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        ink = float(rng.uniform(10, 245))
        for row in range(int(rng.integers(1, 5))):
            _put_text(
                img,
                _random_text(rng),
                (x0, y0 + row * int(rng.integers(14, 26))),
                cv2.FONT_HERSHEY_PLAIN,
                float(rng.uniform(0.7, 1.4)),
                ink,
                1,
            )

    # Cables, tile joints, railings.
    for _ in range(int(rng.integers(1, 5))):
        p0 = (int(rng.integers(-w // 4, w + w // 4)), int(rng.integers(-h // 4, h + h // 4)))
        reach = rng.uniform(0.2, 1.2) * w
        heading = rng.uniform(0, 2 * math.pi)
        p1 = (round(p0[0] + reach * math.cos(heading)), round(p0[1] + reach * math.sin(heading)))
        cv2.line(img, p0, p1, float(rng.uniform(0, 255)), int(rng.integers(1, 5)), cv2.LINE_AA)

    if rng.random() < 0.35:
        _draw_hand(
            img, rng, (rng.uniform(0.1, 0.9) * w, rng.uniform(0.5, 1.1) * h), rng.uniform(0.25, 0.5) * h
        )

    img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.8, 1.8)))
    img *= _lighting(rng, w, h, float(rng.uniform(0.55, 0.85)), float(rng.uniform(0.95, 1.15)))
    # Static grain of concrete, plastic and paper, finer than the defocus blur above.
    grain: np.ndarray = cv2.GaussianBlur(
        rng.normal(0, rng.uniform(2, 5), (h, w)).astype(np.float32), (0, 0), 0.7
    )
    img += grain
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- carriers


@dataclass(frozen=True, slots=True)
class _Carrier:
    """Something held up to the camera, drawn flat at supersampled resolution."""

    image: np.ndarray  # float32, tones before scene lighting
    mask: np.ndarray  # float32, 1 where the carrier is
    code_quad: np.ndarray  # (4, 2) symbol-plus-quiet-zone corners, carrier pixels
    code_center: tuple[float, float]
    module_src: int  # carrier pixels per module
    emissive: bool  # a screen makes its own light: scene lighting barely touches it


def _card(rng: np.random.Generator, code: np.ndarray | None, module_src: int, blank_modules: int) -> _Carrier:
    """A printed card or slip: off-white paper, dark (not black) ink, a small margin."""
    paper = float(rng.uniform(205, 245))
    ink = float(rng.uniform(15, 55))
    if code is None:
        side = blank_modules * module_src
        body = np.full((side, side), paper, np.float32)
    else:
        body = np.where(code < 128, ink, paper).astype(np.float32)
    m = module_src
    left, right, top = (round(rng.uniform(0.5, 3) * m) for _ in range(3))
    # The bottom margin sometimes carries a printed line (name, route) below the quiet zone.
    with_text = rng.random() < 0.6
    bottom = round(rng.uniform(3, 6) * m) if with_text else round(rng.uniform(0.5, 3) * m)
    img = cv2.copyMakeBorder(body, top, bottom, left, right, cv2.BORDER_CONSTANT, value=paper)
    if with_text:
        scale = body.shape[1] / 260.0
        _put_text(
            img,
            _random_text(rng),
            (left + m, top + body.shape[0] + round(bottom * 0.7)),
            cv2.FONT_HERSHEY_SIMPLEX,
            max(0.3, scale * 0.7),
            ink,
            max(1, round(scale * 2)),
        )
    # Paper is never uniformly white: a faint fold shading and fibre grain.
    fold = _lighting(rng, img.shape[1], img.shape[0], float(rng.uniform(0.9, 0.98)), 1.0)
    img = img * fold + np.asarray(rng.normal(0, 1.5, img.shape), np.float32)
    return _finish_carrier(img, top, left, body.shape, module_src, emissive=False)


def _screen(
    rng: np.random.Generator, code: np.ndarray | None, module_src: int, blank_modules: int
) -> _Carrier:
    """A phone showing the code: bright app screen, dark bezel, a header bar, maybe moiré."""
    white = float(rng.uniform(215, 250))
    black = float(rng.uniform(8, 40))
    bezel_tone = float(rng.uniform(5, 30))
    if code is None:
        side = blank_modules * module_src
        body = np.full((side, side), white, np.float32)
    else:
        body = np.where(code < 128, black, white).astype(np.float32)
    m = module_src
    side_pad = round(rng.uniform(1, 3) * m)
    top_pad = round(rng.uniform(0.35, 0.6) * body.shape[0])
    bottom_pad = round(rng.uniform(0.25, 0.5) * body.shape[0])
    screen: np.ndarray = cv2.copyMakeBorder(
        body, top_pad, bottom_pad, side_pad, side_pad, cv2.BORDER_CONSTANT, value=white
    )
    # App header: a coloured bar (mid grey in Y) with a title, well clear of the quiet zone.
    bar_h = max(2, round(0.25 * top_pad))
    screen[:bar_h] = float(rng.uniform(70, 150))
    scale = body.shape[1] / 300.0
    _put_text(
        screen,
        "VE DIEN TU",
        (side_pad, round(bar_h * 0.75)),
        cv2.FONT_HERSHEY_SIMPLEX,
        max(0.3, scale * 0.8),
        white,
        max(1, round(scale * 2)),
    )
    _put_text(
        screen,
        _random_text(rng),
        (side_pad, top_pad + body.shape[0] + round(bottom_pad * 0.4)),
        cv2.FONT_HERSHEY_SIMPLEX,
        max(0.3, scale * 0.7),
        black,
        max(1, round(scale * 2)),
    )
    if rng.random() < 0.6:
        # Moiré between the display's pixel grid and the sensor's: faint slanted fringes.
        yy = np.arange(screen.shape[0], dtype=np.float32)[:, None]
        xx = np.arange(screen.shape[1], dtype=np.float32)[None, :]
        phi = rng.uniform(0, math.pi)
        period = rng.uniform(3.0, 8.0) * _SUPERSAMPLE
        fringe = np.sin(2 * math.pi * (xx * math.cos(phi) + yy * math.sin(phi)) / period)
        screen += float(rng.uniform(2, 7)) * fringe
    bezel = round(rng.uniform(0.04, 0.08) * screen.shape[1])
    img = cv2.copyMakeBorder(screen, bezel, bezel, bezel, bezel, cv2.BORDER_CONSTANT, value=bezel_tone)
    # Rounded corners of the phone body, so its outline is not a crisp square.
    mask = np.zeros(img.shape, np.uint8)
    r = 2 * bezel
    hh, ww = img.shape
    cv2.rectangle(mask, (r, 0), (ww - 1 - r, hh - 1), 255, -1)
    cv2.rectangle(mask, (0, r), (ww - 1, hh - 1 - r), 255, -1)
    for cx, cy in ((r, r), (ww - 1 - r, r), (r, hh - 1 - r), (ww - 1 - r, hh - 1 - r)):
        cv2.circle(mask, (cx, cy), r, 255, -1)
    carrier = _finish_carrier(img, top_pad + bezel, side_pad + bezel, body.shape, module_src, emissive=True)
    return replace(carrier, mask=mask.astype(np.float32) / 255.0)


def _finish_carrier(
    img: np.ndarray, top: int, left: int, body_shape: tuple[int, ...], module_src: int, *, emissive: bool
) -> _Carrier:
    bh, bw = body_shape
    quad = np.array([[left, top], [left + bw, top], [left + bw, top + bh], [left, top + bh]], np.float32)
    return _Carrier(
        image=img.astype(np.float32),
        mask=np.ones(img.shape, np.float32),
        code_quad=quad,
        code_center=(left + bw / 2, top + bh / 2),
        module_src=module_src,
        emissive=emissive,
    )


# --------------------------------------------------------------------------- pose and camera


@dataclass(frozen=True, slots=True)
class _Pose:
    center: tuple[float, float]  # where the code's centre lands, output pixels
    module_px: float  # module size at output resolution before tilt
    angle_deg: float  # in-plane rotation
    tilt_deg: float  # rotation of the card plane away from facing the lens
    tilt_dir_deg: float  # axis of that tilt, in the card plane


@dataclass(frozen=True, slots=True)
class _Look:
    blur: float  # Gaussian sigma, output pixels
    motion: tuple[float, float]  # motion blur streak length (pixels) and direction (degrees)
    noise: float  # sensor noise sigma at mid grey, grey levels
    brightness: float  # exposure gain
    contrast: float
    shadow: float  # how dark the held object's shadow falls on the background
    glare: tuple[float, float, float, float, float] | None  # x, y, sx, sy, peak


def _project(carrier: _Carrier, pose: _Pose, size: tuple[int, int]) -> np.ndarray:
    """Homography from carrier pixels to supersampled output pixels."""
    w, _ = size
    s = _SUPERSAMPLE
    k = pose.module_px * s / carrier.module_src
    f = s * 0.5 * w / math.tan(math.radians(_HFOV_DEG / 2))
    a = math.radians(pose.angle_deg)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    d = math.radians(pose.tilt_dir_deg)
    axis = np.array([math.cos(d), math.sin(d), 0.0])
    rt, _ = cv2.Rodrigues(axis * math.radians(pose.tilt_deg))
    rot = rt @ rz
    hh, ww = carrier.image.shape
    src = np.array([[0, 0], [ww, 0], [ww, hh], [0, hh]], np.float64)
    cx0, cy0 = carrier.code_center
    world = np.column_stack([(src[:, 0] - cx0) * k, (src[:, 1] - cy0) * k, np.zeros(4)])
    cam = world @ rot.T
    # The code's plane passes through the focus distance f at its centre; the pinhole model
    # makes the near edge larger than the far one (keystone), as a real tilt does.
    dst = cam[:, :2] * (f / (f + cam[:, 2:3])) + np.array(pose.center) * s
    return cv2.getPerspectiveTransform(src.astype(np.float32), dst.astype(np.float32))


def _code_bbox(carrier: _Carrier, pose: _Pose, size: tuple[int, int]) -> tuple[float, float, float, float]:
    hom = _project(carrier, pose, size)
    pts = cv2.perspectiveTransform(carrier.code_quad.reshape(-1, 1, 2), hom).reshape(-1, 2) / _SUPERSAMPLE
    return float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())


def _place(rng: np.random.Generator, carrier: _Carrier, pose: _Pose, size: tuple[int, int]) -> _Pose:
    """Move the pose to a random spot where the code and its quiet zone are fully in view."""
    w, h = size
    x0, y0, x1, y1 = _code_bbox(carrier, replace(pose, center=(0.0, 0.0)), size)
    margin = 0.02 * min(w, h)
    lo_x, hi_x = margin - x0, w - margin - x1
    lo_y, hi_y = margin - y0, h - margin - y1
    cx = rng.uniform(lo_x, hi_x) if hi_x > lo_x else w / 2 - (x0 + x1) / 2
    cy = rng.uniform(lo_y, hi_y) if hi_y > lo_y else h / 2 - (y0 + y1) / 2
    return replace(pose, center=(float(cx), float(cy)))


def _streak(length: float, angle_deg: float) -> np.ndarray:
    """Normalised line kernel: a hand still moving during the exposure smears along its path."""
    n = 2 * math.ceil(length / 2) + 1
    kernel: np.ndarray = np.zeros((n * 4, n * 4), np.float32)
    c = (n * 4 - 1) / 2
    dx = math.cos(math.radians(angle_deg)) * length * 2
    dy = math.sin(math.radians(angle_deg)) * length * 2
    # Drawn at 4x and area-reduced so that sub-pixel lengths still blur by the right amount.
    cv2.line(kernel, (round(c - dx), round(c - dy)), (round(c + dx), round(c + dy)), 1.0, 4, cv2.LINE_AA)
    kernel = cv2.resize(kernel, (n, n), interpolation=cv2.INTER_AREA)
    return kernel / kernel.sum()


def _composite(
    background: np.ndarray,
    carrier: _Carrier | None,
    pose: _Pose | None,
    look: _Look,
    rng: np.random.Generator,
    scene_light: np.ndarray,
) -> np.ndarray:
    h, w = background.shape
    img: np.ndarray = background.astype(np.float32)
    if carrier is not None and pose is not None:
        s = _SUPERSAMPLE
        hom = _project(carrier, pose, (w, h))
        big = (w * s, h * s)
        warped = cv2.warpPerspective(
            carrier.image, hom, big, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )
        mask = cv2.warpPerspective(
            carrier.mask, hom, big, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )
        warped = cv2.resize(warped, (w, h), interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_AREA)
        if look.shadow > 0:
            # Held objects cast a soft shadow offset away from the main light.
            off = np.array([[1, 0, 0.03 * w], [0, 1, 0.03 * h]], np.float32)
            shadow = cv2.GaussianBlur(cv2.warpAffine(mask, off, (w, h)), (0, 0), 0.02 * w)
            img *= 1 - look.shadow * shadow
        light = 0.85 + 0.15 * scene_light if carrier.emissive else scene_light
        img = img * (1 - mask) + warped * light * mask
    if look.blur > 0.05:
        img = cv2.GaussianBlur(img, (0, 0), look.blur)
    if look.motion[0] >= 1.0:
        img = cv2.filter2D(img, -1, _streak(*look.motion), borderType=cv2.BORDER_REPLICATE)
    img = (img * look.brightness - 128.0) * look.contrast + 128.0
    if look.glare is not None:
        gx, gy, sx, sy, peak = look.glare
        yy = np.arange(h, dtype=np.float32)[:, None]
        xx = np.arange(w, dtype=np.float32)[None, :]
        img += peak * np.exp(-(((xx - gx) / sx) ** 2 + ((yy - gy) / sy) ** 2) / 2)
    if look.noise > 0:
        # Shot noise grows with signal; read noise floors it in the shadows.
        sigma = look.noise * np.sqrt(np.clip(img, 16.0, 255.0) / 128.0)
        img += sigma * rng.standard_normal((h, w), dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _draw_look(
    rng: np.random.Generator,
    size: tuple[int, int],
    *,
    blur: float | None,
    noise: float | None,
    brightness: float | None,
    glare: bool,
    near: tuple[float, float] | None,
    moderate: bool = False,
) -> _Look:
    w, h = size
    glare_spot = None
    if glare:
        # A ceiling light reflected off laminated paper or glass: a bright oval, somewhere
        # near the code, big enough to wash out part of it.
        gx, gy = near if near is not None else (w / 2, h / 2)
        glare_spot = (
            gx + rng.normal(0, 0.12 * w),
            gy + rng.normal(0, 0.12 * h),
            rng.uniform(0.03, 0.08) * w,
            rng.uniform(0.03, 0.08) * h,
            rng.uniform(60, 140),
        )
    return _Look(
        blur=float(blur) if blur is not None else float(rng.uniform(0.0, 0.6 if moderate else 1.2)),
        motion=(float(rng.uniform(0.0, 1.5 if moderate else 3.0)), float(rng.uniform(0, 180))),
        noise=float(noise) if noise is not None else float(rng.uniform(1.5, 4.0 if moderate else 7.0)),
        brightness=float(brightness)
        if brightness is not None
        else float(rng.uniform(0.8 if moderate else 0.55, 1.15 if moderate else 1.35)),
        contrast=float(rng.uniform(0.8 if moderate else 0.6, 1.0)),
        shadow=float(rng.uniform(0.0, 0.35)),
        glare=glare_spot,
    )


def _default_module_px(
    rng: np.random.Generator, n_modules: int, size: tuple[int, int], lo: float = 0.25, hi: float = 0.60
) -> float:
    # A gate frames the code at 25–60% of the frame height. Dense payloads at the small end
    # fall under ~2 px per module, which no decoder reads; a site that issues such codes
    # mounts the camera closer, so keep to at least 2 px rather than render a lost cause.
    return max(2.0, rng.uniform(lo, hi) * size[1] / n_modules)


def _build_carrier(
    rng: np.random.Generator,
    payload: bytes | str | None,
    module_px: float,
    screen: bool,
    blank_modules: int = 25,
) -> _Carrier:
    module_src = max(1, round(module_px * _SUPERSAMPLE))
    code = None if payload is None else render_qr(payload, module_px=module_src, border=_QUIET_MODULES)
    return (_screen if screen else _card)(rng, code, module_src, blank_modules)


def render_scene(
    payload: bytes | str,
    rng: np.random.Generator,
    *,
    size: tuple[int, int] = (640, 480),
    module_px: float | None = None,
    angle_deg: float | None = None,
    perspective: float | None = None,
    blur: float | None = None,
    noise: float | None = None,
    brightness: float | None = None,
    glare: bool = False,
    screen: bool = False,
) -> np.ndarray:
    """One camera frame (``uint8``, shape ``size[::-1]``) with ``payload`` held up to the gate.

    ``size`` is ``(width, height)``. ``module_px`` is the module size in output pixels before
    tilt; ``angle_deg`` the in-plane rotation; ``perspective`` the tilt of the card away from
    facing the lens, in degrees; ``blur`` a Gaussian sigma in pixels; ``noise`` the sensor
    noise sigma at mid grey; ``brightness`` the exposure gain (1 = nominal). ``None`` draws
    each from ``rng`` over what a gate sees: code 25–60% of the frame height, rotation
    mostly within ±25°, tilt up to 35°, blur sigma up to 1.2 px, noise 1.5–7, gain 0.55–1.35;
    a motion streak of up to 3 px and a contrast loss to 60% are always drawn. The code and its
    quiet zone are always fully in frame; the card or phone around it may be cut off.
    """
    n_modules = _qr_matrix(payload, "m").shape[0]
    mp = float(module_px) if module_px is not None else _default_module_px(rng, n_modules, size)
    carrier = _build_carrier(rng, payload, mp, screen)
    pose = _Pose(
        center=(0.0, 0.0),
        module_px=mp,
        angle_deg=float(angle_deg) if angle_deg is not None else float(np.clip(rng.normal(0, 12), -40, 40)),
        tilt_deg=float(perspective) if perspective is not None else float(rng.uniform(0, 35)),
        tilt_dir_deg=float(rng.uniform(0, 360)),
    )
    pose = _place(rng, carrier, pose, size)
    background = render_background(rng, size)
    light = _lighting(rng, size[0], size[1], float(rng.uniform(0.75, 0.95)), 1.0)
    look = _draw_look(rng, size, blur=blur, noise=noise, brightness=brightness, glare=glare, near=pose.center)
    return _composite(background, carrier, pose, look, rng, light)


def render_empty(rng: np.random.Generator, size: tuple[int, int] = (640, 480)) -> np.ndarray:
    """A frame with no code: the bare scene, a blank card or phone, or a hand passing by."""
    background = render_background(rng, size)
    w, h = size
    what = rng.choice(["bare", "card", "phone", "hand"])
    carrier = pose = None
    if what == "hand":
        img = background.astype(np.float32)
        centre = (rng.uniform(0.2, 0.8) * w, rng.uniform(0.3, 0.8) * h)
        _draw_hand(img, rng, centre, rng.uniform(0.4, 0.8) * h)
        background = np.clip(img, 0, 255).astype(np.uint8)
    elif what in ("card", "phone"):
        mp = rng.uniform(0.25, 0.6) * h / 25
        carrier = _build_carrier(rng, None, mp, what == "phone")
        pose = _Pose(
            (0.0, 0.0), mp, float(rng.normal(0, 12)), float(rng.uniform(0, 25)), float(rng.uniform(0, 360))
        )
        pose = _place(rng, carrier, pose, size)
    light = _lighting(rng, w, h, float(rng.uniform(0.75, 0.95)), 1.0)
    look = _draw_look(rng, size, blur=None, noise=None, brightness=None, glare=False, near=None)
    return _composite(background, carrier, pose, look, rng, light)


def demo_frames(
    out_dir: Path,
    scenes: Sequence[tuple[str, bytes | str]],
    *,
    fps: float = 10.0,
    hold_s: float = 1.2,
    gap_s: float = 0.8,
    seed: int = 7,
    size: tuple[int, int] = (640, 480),
    lead_s: float = 0.0,
) -> list[Path]:
    """Write a replayable demo as ``out_dir/%05d.png`` and return the paths in order.

    The camera is fixed, so one background serves the whole run. Each scene is
    ``round(hold_s * fps)`` frames of its code held in view, drifting a little between frames
    as a hand does (same module size), then ``round(gap_s * fps)`` frames with no code; before
    the first, ``round(lead_s * fps)`` frames with no code.
    Settings are kept moderate so that every code frame reads: this drives the demo, not a
    stress test.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    background = render_background(rng, size)
    light = _lighting(rng, size[0], size[1], float(rng.uniform(0.8, 0.95)), 1.0)
    n_hold = max(0, round(hold_s * fps))
    n_gap = max(0, round(gap_s * fps))
    paths: list[Path] = []

    def write(frame: np.ndarray) -> None:
        path = out_dir / f"{len(paths):05d}.png"
        if not cv2.imwrite(str(path), frame):
            raise OSError(f"could not write {path}")
        paths.append(path)

    if lead_s > 0:
        look = _draw_look(
            rng, size, blur=None, noise=None, brightness=None, glare=False, near=None, moderate=True
        )
        for _ in range(round(lead_s * fps)):
            write(_composite(background, None, None, look, rng, light))
    for name, payload in scenes:
        n_modules = _qr_matrix(payload, "m").shape[0]
        mp = max(3.0, _default_module_px(rng, n_modules, size, 0.35, 0.55))
        carrier = _build_carrier(rng, payload, mp, screen=bool(rng.random() < 0.5))
        pose = _Pose(
            (0.0, 0.0), mp, float(rng.normal(0, 8)), float(rng.uniform(0, 12)), float(rng.uniform(0, 360))
        )
        pose = _place(rng, carrier, pose, size)
        look = _draw_look(
            rng, size, blur=None, noise=None, brightness=None, glare=False, near=None, moderate=True
        )
        log.info("demo scene %r: frames %d-%d", name, len(paths), len(paths) + n_hold - 1)
        held = pose
        for _ in range(n_hold):
            # A random walk, pulled back towards where the hand started so it never drifts out.
            dx, dy = rng.normal(0, 1.5, 2)
            cx = held.center[0] + dx + 0.3 * (pose.center[0] - held.center[0])
            cy = held.center[1] + dy + 0.3 * (pose.center[1] - held.center[1])
            angle = held.angle_deg + rng.normal(0, 0.6) + 0.3 * (pose.angle_deg - held.angle_deg)
            tilt = np.clip(held.tilt_deg + rng.normal(0, 0.5), 0, 15)
            held = replace(held, center=(float(cx), float(cy)), angle_deg=float(angle), tilt_deg=float(tilt))
            write(_composite(background, carrier, held, look, rng, light))
        for _ in range(n_gap):
            write(_composite(background, None, None, look, rng, light))
    return paths


def render_unreadable_crowd(
    rng: np.random.Generator, size: tuple[int, int] = (640, 480), codes: int = 30
) -> np.ndarray:
    """A wall of stickers, none readable: small codes with a band of noise through their data.

    Every finder pattern is intact, so the decoder sees dozens of candidates and can read
    none; what this costs per frame is what a gate facing such a wall pays for every frame.
    """
    w, h = size
    img = np.full((h, w), 200, np.uint8)
    for i in range(codes):
        matrix = np.pad(np.array(segno.make(f"STICKER-{i:04d}-{'x' * 40}", error="l").matrix, np.uint8), 2)
        scale = int(rng.integers(2, 4))
        tile = np.where(np.kron(matrix, np.ones((scale, scale))) > 0, 0, 255).astype(np.uint8)
        th, tw = tile.shape
        band = slice(th // 2 - 3 * scale, th // 2 + 3 * scale)
        tile[band, 9 * scale : tw - 9 * scale] = rng.integers(0, 256, (6 * scale, tw - 18 * scale))
        x0, y0 = int(rng.integers(0, w - tw)), int(rng.integers(0, h - th))
        img[y0 : y0 + th, x0 : x0 + tw] = tile
    return img
