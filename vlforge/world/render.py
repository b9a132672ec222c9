"""Scene -> RGB image: numpy textures for the background, supersampled masks for the shapes.

Speed matters (the server renders on request): the background is a few vectorised numpy passes,
and each shape is drawn at 4x only inside its own box, then box-filtered down, which gives
anti-aliased edges for a fraction of the cost of supersampling the whole image.
"""

from __future__ import annotations

import math
from functools import cache

import cv2
import numpy as np
from PIL import Image, ImageDraw

from vlforge.world.scene import COLOUR_RGB, Background, Scene

_SUPER = 4  # supersampling factor for shape edges
MAX_JITTER = 4  # px; the noise field is generated with this margin so a shift reveals no edge


def _normalise(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Scale an outline to fill the unit square exactly, so boxes are tight."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    return tuple(((x - x0) / (x1 - x0), (y - y0) / (y1 - y0)) for x, y in points)


@cache
def outline(shape: str) -> tuple[tuple[float, float], ...]:
    """Polygon of a shape in the unit box (y down); the circle is drawn as an ellipse instead."""
    if shape == "square":
        return ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0))
    if shape == "triangle":
        return ((0.5, 0.0), (1.0, 1.0), (0.0, 1.0))
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.382
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
        return _normalise(pts)
    if shape == "hexagon":
        return _normalise(
            [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]
        )
    if shape == "heart":
        pts = []
        for k in range(72):
            t = 2 * math.pi * k / 72
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x, -y))
        return _normalise(pts)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(bg: Background, width: int, height: int, dx: int, dy: int) -> np.ndarray:
    """H x W x 3 uint8 background; (dx, dy) shifts the pattern with the shapes."""
    x = (np.arange(width, dtype=np.float32) - dx)[None, :]
    y = (np.arange(height, dtype=np.float32) - dy)[:, None]
    base, accent = bg.base, bg.accent
    theta = math.radians(bg.angle)
    if bg.texture == "plain":
        t = np.zeros((height, width), np.float32)
    elif bg.texture == "gradient":
        along = x * math.cos(theta) + y * math.sin(theta)
        t = (along - along.min()) / max(1.0, float(along.max() - along.min()))
    elif bg.texture == "stripes":
        along = x * math.cos(theta) + y * math.sin(theta)
        t = (np.floor(along / bg.period) % 2).astype(np.float32)
    elif bg.texture == "checker":
        t = ((np.floor(x / bg.period) + np.floor(y / bg.period)) % 2).astype(np.float32)
    elif bg.texture == "dots":
        p = float(bg.period)
        u, v = np.mod(x, p) - p / 2, np.mod(y, p) - p / 2
        t = ((u * u + v * v) < (0.3 * p) ** 2).astype(np.float32)
    elif bg.texture == "noise":
        m = MAX_JITTER
        field = np.random.default_rng(bg.seed).random((height + 2 * m, width + 2 * m), np.float32)
        t = field[m - dy : m - dy + height, m - dx : m - dx + width]
        t = (t < 0.25).astype(np.float32) * 0.8 + t * 0.2
    else:
        raise ValueError(f"unknown texture {bg.texture!r}")
    t = np.ascontiguousarray(np.broadcast_to(t, (height, width)), np.float32)
    light = _lighting(bg.seed, width, height, dx, dy)
    # OpenCV does the full-size passes: it is several times faster than numpy here and releases
    # the GIL, so the server's handler threads render in parallel with the crawler under test.
    channels = [
        cv2.addWeighted(t, float(a - b), light, 1.0, float(b), dtype=cv2.CV_8U)  # saturating
        for a, b in zip(accent, base, strict=True)
    ]
    return cv2.merge(channels)


def _lighting(seed: int, width: int, height: int, dx: int, dy: int) -> np.ndarray:
    """Uneven light: a field whose 8x8 lowest DCT coefficients are each +A or -A at random.

    A perceptual hash (pHash) is the sign pattern of exactly those coefficients against their
    median. Plain rendered scenes have most of them near zero, so two scenes can share a hash
    (the crawler would drop one as a near duplicate) and a 1 px shift flips many bits. Giving
    every coefficient a clear, random sign makes hashes of different scenes far apart and a
    re-render with jitter keep its hash.
    """
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0], np.float32), size=(8, 8))
    signs[0, 0] = 0.0  # no change to the mean brightness
    k = np.arange(8, dtype=np.float32)[:, None]
    xs = (np.arange(width, dtype=np.float32) - dx + 0.5)[None, :] / width
    ys = (np.arange(height, dtype=np.float32) - dy + 0.5)[None, :] / height
    basis_x = np.cos(np.pi * k * xs)  # 8 x W
    basis_y = np.cos(np.pi * k * ys)  # 8 x H
    return np.ascontiguousarray(
        (basis_y.T @ (signs * _LIGHT_AMPLITUDE) @ basis_x).astype(np.float32)
    )


_LIGHT_AMPLITUDE = 11.0  # grey levels per coefficient; the field's spread is about 4x this


def _draw_shape(
    image: Image.Image, shape: str, box: tuple[float, ...], colour: str, dx: int, dy: int
) -> None:
    x0, y0, x1, y1 = box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy
    ix0, iy0 = math.floor(x0), math.floor(y0)
    rw, rh = math.ceil(x1) - ix0 + 1, math.ceil(y1) - iy0 + 1
    s = _SUPER
    fill = Image.new("L", (rw * s, rh * s), 0)
    edge = Image.new("L", (rw * s, rh * s), 0)
    fx0, fy0 = (x0 - ix0) * s, (y0 - iy0) * s
    fw, fh = (x1 - x0) * s, (y1 - y0) * s
    # A darker rim keeps a shape visible on a background of similar lightness.
    rim = max(s, round(min(fw, fh) / 28))
    draw_fill, draw_edge = ImageDraw.Draw(fill), ImageDraw.Draw(edge)
    if shape == "circle":
        rect = [fx0, fy0, fx0 + fw, fy0 + fh]
        draw_fill.ellipse(rect, fill=255)
        draw_edge.ellipse(rect, outline=255, width=rim)
    else:
        pts = [(fx0 + u * fw, fy0 + v * fh) for u, v in outline(shape)]
        draw_fill.polygon(pts, fill=255)
        draw_edge.line([*pts, pts[0]], fill=255, width=rim)
    rgb = COLOUR_RGB[colour]
    dark = tuple(int(c * 0.55) for c in rgb)
    region = (ix0, iy0, ix0 + rw, iy0 + rh)
    image.paste(rgb, region, fill.reduce(s))
    # The rim is clipped to the shape so the box stays tight.
    image.paste(
        dark, region, Image.fromarray(np.minimum(np.asarray(edge), np.asarray(fill))).reduce(s)
    )


def render_scene(scene: Scene, jitter: int = 0) -> Image.Image:
    """RGB image of `scene`; `jitter` (|jitter| <= 4) shifts shapes and texture by that many px."""
    if abs(jitter) > MAX_JITTER:
        raise ValueError(f"jitter must be within ±{MAX_JITTER} px, got {jitter}")
    dx = dy = int(jitter)
    pixels = _texture(scene.background, scene.width, scene.height, dx, dy)
    image = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    for obj in scene.objects:
        _draw_shape(image, obj.shape, obj.box, obj.colour, dx, dy)
    return image
