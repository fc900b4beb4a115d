"""The synthetic `shapes` world's vocabulary and its pictures: what a scene is and how it is drawn.

A scene is a plain background with 1-3 objects. Each object has a shape, a colour, a size, a position on a 3x3
grid (left/right/top/bottom/center and the four corners), and a fill (solid, outlined, striped). Objects never
share the background's colour and never overlap. Pictures are 32x32 RGB (rendered at 4x and box-filtered for
antialiasing), which keeps the generator's latents at 8x8x4 so the set trains on a CPU.

Held out of every training stream: the colour-shape combinations in `HELD_OUT_COMBOS` (generalisation tests)
and the whole shape `crescent` (learning a new concept from a few pictures). Drawing random scenes, their captions,
free views and the evaluation sets belong to the laboratory (`lab.shapes.world`), which trains and judges the set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SIZE = 32
SUPERSAMPLE = 4

TRAIN_SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
NOVEL_SHAPE = "crescent"
SHAPES = (*TRAIN_SHAPES, NOVEL_SHAPE)

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (130, 50, 180),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
COLOURS = tuple(PALETTE)
SIZES = ("small", "large")
FILLS = ("solid", "outlined", "striped")
# Star arms and the crescent's horn are too thin at 32 px to carry an outline or stripes a viewer could see.
THIN_SHAPES = frozenset({"star", "crescent"})

# Centre of each grid position in pixels of the 32x32 picture; the grid pitch (9 px) keeps a large object
# (14 px) inside the picture in a corner.
GRID_PITCH = 9
POSITION_OFFSETS: dict[str, tuple[int, int]] = {
    "top left": (-1, -1),
    "top": (0, -1),
    "top right": (1, -1),
    "left": (-1, 0),
    "center": (0, 0),
    "right": (1, 0),
    "bottom left": (-1, 1),
    "bottom": (0, 1),
    "bottom right": (1, 1),
}
POSITIONS = tuple(POSITION_OFFSETS)
OBJECT_PIXELS = {"small": 9.0, "large": 14.0}
OUTLINE_PIXELS = 1.25
STRIPE_PERIOD = 4.0

HELD_OUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {("purple", "star"), ("green", "heart"), ("yellow", "square"), ("blue", "cross")}
)
# Backgrounds lean to the neutral ones, as in most pictures people describe; every colour still appears.
BACKGROUND_WEIGHTS = {c: (4.0 if c == "white" else 2.0 if c in ("black", "gray") else 1.0) for c in COLOURS}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str = "large"
    position: str = "center"
    fill: str = "solid"

    @property
    def centre(self) -> tuple[float, float]:
        dx, dy = POSITION_OFFSETS[self.position]
        return IMAGE_SIZE / 2 + dx * GRID_PITCH, IMAGE_SIZE / 2 + dy * GRID_PITCH

    @property
    def is_held_out(self) -> bool:
        return self.shape == NOVEL_SHAPE or (self.colour, self.shape) in HELD_OUT_COMBOS


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]

    @property
    def is_held_out(self) -> bool:
        return any(obj.is_held_out for obj in self.objects)


# ---------------------------------------------------------------------------------------------------- rendering


def _shape_polygon(shape: str, radius: float, cx: float, cy: float) -> list[tuple[float, float]]:
    """Outline of `shape` (except circle and crescent) with half-extent `radius`, y pointing down."""
    if shape == "square":
        r = radius * 0.85
        unit = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        return [(cx + x * r, cy + y * r) for x, y in unit]
    if shape == "triangle":
        return [(cx, cy - radius), (cx + radius, cy + 0.8 * radius), (cx - radius, cy + 0.8 * radius)]
    if shape == "star":
        points = []
        for k in range(10):
            r = radius if k % 2 == 0 else radius * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + r * math.cos(angle), cy + 0.1 * radius + r * math.sin(angle)))
        return points
    if shape == "heart":
        points = []
        for k in range(64):
            t = 2 * math.pi * k / 64
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((cx + radius * x / 16.5, cy - radius * (y + 2.5) / 15.5))
        return points
    if shape == "cross":
        a, w = radius * 0.95, radius * 0.34
        unit = [
            (-w, -a),
            (w, -a),
            (w, -w),
            (a, -w),
            (a, w),
            (w, w),
            (w, a),
            (-w, a),
            (-w, w),
            (-a, w),
            (-a, -w),
            (-w, -w),
        ]
        return [(cx + x, cy + y) for x, y in unit]
    raise ValueError(f"no polygon for shape '{shape}'")


def silhouette(shape: str, extent: float, cx: float, cy: float) -> Image.Image:
    """Binary mask (mode L, at SUPERSAMPLE x) of a shape `extent` pixels across, centred at (cx, cy)."""
    side = IMAGE_SIZE * SUPERSAMPLE
    radius = extent * SUPERSAMPLE / 2
    cx, cy = cx * SUPERSAMPLE, cy * SUPERSAMPLE
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    elif shape == "crescent":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
        shift = radius * 0.55
        inner = radius * 0.85
        draw.ellipse(
            (cx - inner + shift, cy - inner - shift * 0.3, cx + inner + shift, cy + inner - shift * 0.3), fill=0
        )
    else:
        draw.polygon(_shape_polygon(shape, radius, cx, cy), fill=255)
    return mask


def coverage(silhouette: Image.Image, fill: str, line: float, stripe_period: float, rising: bool) -> np.ndarray:
    """Coverage in [0, 1] of a filled, outlined (`line` px) or striped silhouette at the picture's size."""
    if fill == "solid":
        mask = silhouette
    else:
        width = max(1, round(line * SUPERSAMPLE))
        eroded = silhouette.filter(ImageFilter.MinFilter(2 * width + 1))
        ring = np.asarray(silhouette, dtype=np.uint8) & ~np.asarray(eroded, dtype=np.uint8)
        if fill == "striped":
            side = IMAGE_SIZE * SUPERSAMPLE
            yy, xx = np.mgrid[0:side, 0:side]
            period = stripe_period * SUPERSAMPLE
            diagonal = (xx - yy) if rising else (xx + yy)
            stripes = ((diagonal % period) < period / 2).astype(np.uint8) * 255
            ring = ring | (np.asarray(eroded, dtype=np.uint8) & stripes)
        mask = Image.fromarray(ring)
    small = mask.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


@cache
def object_alpha(shape: str, size: str, fill: str) -> np.ndarray:
    """Coverage in [0, 1] of an object centred in the 32x32 picture (float32, antialiased)."""
    centre = IMAGE_SIZE / 2
    mask = silhouette(shape, OBJECT_PIXELS[size], centre, centre)
    return coverage(mask, fill, OUTLINE_PIXELS, STRIPE_PERIOD, rising=False)


def _shifted(alpha: np.ndarray, dx: int, dy: int) -> np.ndarray:
    out = np.zeros_like(alpha)
    h, w = alpha.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = alpha[ys, xs]
    return out


def render_array(scene: Scene) -> np.ndarray:
    """The scene as a (32, 32, 3) uint8 array."""
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    canvas[:] = PALETTE[scene.background]
    for obj in scene.objects:
        dx, dy = POSITION_OFFSETS[obj.position]
        alpha = _shifted(object_alpha(obj.shape, obj.size, obj.fill), dx * GRID_PITCH, dy * GRID_PITCH)[..., None]
        canvas = canvas * (1 - alpha) + np.asarray(PALETTE[obj.colour], dtype=np.float32) * alpha
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def render_scene(scene: Scene) -> Image.Image:
    return Image.fromarray(render_array(scene), "RGB")
