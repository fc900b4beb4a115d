"""The oracle of the `shapes` world: reads pictures and prompts without any model, to judge every method.

    reading = parse_scene(image)          # SceneReading: background + one ObjectReading per object
    prompt = parse_prompt("a big red circle in the upper left on a white background")
    agreement(prompt.objects[0], reading.main)   # {"colour": True, "shape": True, "size": True, ...}

`parse_scene` is deterministic image processing: background = palette colour of the border, objects = connected
components of pixels far from it, each object's colour = nearest palette colour of its core pixels, and its
shape, size and fill = the best template (rendered by `scenes` itself) after unmixing the object's coverage
from the background, searched over small shifts so blurry, off-grid generated pictures still read. Its
position is the nearest grid cell. `parse_prompt` reads the vocabulary of the caption grammar plus common
synonyms ("grey", "big", "hollow", "centre", "upper left").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

from pictoprompt.models.shapes.scenes import (
    COLOURS,
    FILLS,
    GRID_PITCH,
    IMAGE_SIZE,
    PALETTE,
    POSITION_OFFSETS,
    SHAPES,
    SIZES,
    THIN_SHAPES,
    Scene,
    SceneObject,
    object_alpha,
)

ATTRIBUTES = ("shape", "colour", "size", "position", "fill")
_PALETTE_RGB = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)
# Half the smallest distance between two palette colours (orange-yellow, about 83) is where a pixel stops
# looking like the background.
_FOREGROUND_DISTANCE = 40.0
_MIN_OBJECT_COVERAGE = 6.0
_SHIFT_SEARCH = 2
_BLUR_SIGMA = 0.6


@dataclass
class ObjectReading:
    shape: str
    colour: str
    size: str
    position: str
    fill: str
    coverage: float = 0.0  # object area in pixels (sum of its unmixed coverage)
    match_error: float = 0.0  # mean squared error of the best template; high = unsure

    def as_object(self) -> SceneObject:
        return SceneObject(self.shape, self.colour, self.size, self.position, self.fill)


@dataclass
class SceneReading:
    background: str
    objects: list[ObjectReading]

    @property
    def main(self) -> ObjectReading | None:
        """The largest object (the one a single-object prompt is about), or None in an empty picture."""
        return self.objects[0] if self.objects else None


# ----------------------------------------------------------------------------------------------------- pictures


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        array = image
        if array.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
            image = Image.fromarray(array.astype(np.uint8))
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
        array = np.asarray(image)
    return array.astype(np.float32)


def nearest_colour(rgb: np.ndarray, exclude: Iterable[str] = ()) -> str:
    excluded = set(exclude)
    distances = np.linalg.norm(_PALETTE_RGB - rgb[None], axis=1)
    order = np.argsort(distances)
    return next(COLOURS[i] for i in order if COLOURS[i] not in excluded)


def _background(pixels: np.ndarray) -> tuple[str, np.ndarray]:
    """Palette name and measured RGB of the background: the commonest palette colour along the border."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    labels = np.argmin(np.linalg.norm(border[:, None] - _PALETTE_RGB[None], axis=2), axis=1)
    commonest = int(np.bincount(labels, minlength=len(COLOURS)).argmax())
    return COLOURS[commonest], np.median(border[labels == commonest], axis=0)


@lru_cache(maxsize=1)
def _templates() -> tuple[list[tuple[str, str, str]], np.ndarray]:
    """Every (shape, size, fill) a scene can hold, as blurred coverage maps centred in the picture."""
    keys, maps = [], []
    for shape in SHAPES:
        for size in SIZES:
            for fill in ("solid",) if shape in THIN_SHAPES else FILLS:
                keys.append((shape, size, fill))
                maps.append(ndimage.gaussian_filter(object_alpha(shape, size, fill), _BLUR_SIGMA))
    return keys, np.stack(maps)


def _unmix(pixels: np.ndarray, background: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Coverage in [0, 1] of `colour` over `background` per pixel (projection onto the line between them)."""
    direction = colour - background
    alpha = ((pixels - background) @ direction) / float(direction @ direction)
    return np.clip(alpha, 0.0, 1.0)


def _read_object(coverage: np.ndarray, colour: str, area: float) -> ObjectReading:
    """Shape, size, fill and position of one object from its coverage map, by template matching."""
    keys, templates = _templates()
    blurred = ndimage.gaussian_filter(coverage, _BLUR_SIGMA)
    ys, xs = np.nonzero(coverage > 0.5)
    if len(ys) == 0:
        ys, xs = np.nonzero(coverage > 0)
    centre_x = (xs.min() + xs.max() + 1) / 2
    centre_y = (ys.min() + ys.max() + 1) / 2
    dx = int(np.clip(round((centre_x - IMAGE_SIZE / 2) / GRID_PITCH), -1, 1))
    dy = int(np.clip(round((centre_y - IMAGE_SIZE / 2) / GRID_PITCH), -1, 1))
    position = next(name for name, offset in POSITION_OFFSETS.items() if offset == (dx, dy))
    # Bring the object back to the centre where the templates sit; then allow a small slack for off-grid ones.
    base_x, base_y = dx * GRID_PITCH, dy * GRID_PITCH
    best = (np.inf, 0)
    for sy in range(-_SHIFT_SEARCH, _SHIFT_SEARCH + 1):
        for sx in range(-_SHIFT_SEARCH, _SHIFT_SEARCH + 1):
            moved = ndimage.shift(blurred, (-(base_y + sy), -(base_x + sx)), order=0, mode="constant")
            errors = ((templates - moved[None]) ** 2).mean(axis=(1, 2))
            index = int(errors.argmin())
            if errors[index] < best[0]:
                best = (float(errors[index]), index)
    shape, size, fill = keys[best[1]]
    return ObjectReading(shape, colour, size, position, fill, coverage=area, match_error=best[0])


def parse_scene(image: Image.Image | np.ndarray) -> SceneReading:
    """Read background and objects (largest first) from a picture of the shapes world (any size; read at 32x32)."""
    pixels = _as_array(image)
    background_name, background = _background(pixels)
    distance = np.linalg.norm(pixels - background, axis=2)
    foreground = distance > _FOREGROUND_DISTANCE
    labels, count = ndimage.label(foreground, structure=np.ones((3, 3)))
    objects = []
    for index in range(1, count + 1):
        component = labels == index
        for colour_name, part in _split_by_colour(pixels, component, distance, background_name, background):
            region = ndimage.binary_dilation(part, iterations=1) & ~(foreground & ~part)
            coverage = np.where(region, _unmix(pixels, background, np.asarray(PALETTE[colour_name])), 0.0)
            area = float(coverage.sum())
            if area >= _MIN_OBJECT_COVERAGE:
                objects.append(_read_object(coverage.astype(np.float32), colour_name, area))
    objects.sort(key=lambda o: -o.coverage)
    return SceneReading(background_name, objects)


def _mix_residual(pixels: np.ndarray, background: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """How far each pixel is from every blend of `background` and `colour` (0 = an antialiased edge pixel)."""
    alpha = _unmix(pixels, background, colour)[..., None]
    return np.linalg.norm(pixels - (background + alpha * (colour - background)), axis=-1)


def _split_by_colour(
    pixels: np.ndarray, component: np.ndarray, distance: np.ndarray, background_name: str, background: np.ndarray
) -> list[tuple[str, np.ndarray]]:
    """One (colour, mask) per object in a component; two touching objects of different colours come apart.

    Two readings of the colour compete: the palette colour nearest the pixels farthest from the background
    (right when the object has pure pixels), and the palette colour whose blends with the background explain
    the component best (right for thin outlines that have hardly a pure pixel; but gray on black is also a
    half-covered white). The one leaving fewer pixels unexplained wins, the first on a tie. Pixels that no
    blend of the winner explains belong to a second object.
    """
    residuals = {
        name: _mix_residual(pixels, background, _PALETTE_RGB[i])
        for i, name in enumerate(COLOURS)
        if name != background_name
    }
    strongest = component & (distance >= 0.85 * distance[component].max())
    by_pure = nearest_colour(np.median(pixels[strongest], axis=0), exclude=(background_name,))
    by_blend = min(residuals, key=lambda name: float(residuals[name][component].sum()))

    def unexplained(name: str) -> np.ndarray:
        return component & (residuals[name] > _FOREGROUND_DISTANCE)

    colour = min((by_pure, by_blend), key=lambda name: int(unexplained(name).sum()))
    rest = unexplained(colour)
    if rest.sum() < 4:
        return [(colour, component)]
    other = nearest_colour(np.median(pixels[rest], axis=0), exclude=(background_name, colour))
    mine = residuals[colour] <= residuals[other]
    return [(colour, component & mine), (other, component & ~mine)]


# ------------------------------------------------------------------------------------------------------ prompts

_SYNONYMS: dict[str, str] = {
    "grey": "gray",
    "violet": "purple",
    "magenta": "pink",
    "crimson": "red",
    "scarlet": "red",
    "gold": "yellow",
    "big": "large",
    "huge": "large",
    "tiny": "small",
    "little": "small",
    "filled": "solid",
    "hollow": "outlined",
    "outline": "outlined",
    "stripy": "striped",
    "stripes": "striped",
    "circles": "circle",
    "disc": "circle",
    "disk": "circle",
    "dot": "circle",
    "ring": "circle",
    "round": "circle",
    "squares": "square",
    "box": "square",
    "triangles": "triangle",
    "stars": "star",
    "hearts": "heart",
    "crosses": "cross",
    "plus": "cross",
    "crescents": "crescent",
    "moon": "crescent",
    "centre": "center",
    "middle": "center",
    "centered": "center",
    "centred": "center",
    "upper": "top",
    "lower": "bottom",
}
_WORD = re.compile(r"[a-z]+")


@dataclass
class PromptObject:
    """What a prompt says about one object; None = not mentioned."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    position: str | None = None
    fill: str | None = None


@dataclass
class PromptReading:
    objects: list[PromptObject]
    background: str | None = None

    @property
    def mentioned(self) -> dict[str, set[str]]:
        """Every value the prompt mentions, per attribute (and `background`)."""
        found: dict[str, set[str]] = {a: set() for a in (*ATTRIBUTES, "background")}
        for obj in self.objects:
            for attribute, value in asdict(obj).items():
                if value is not None:
                    found[attribute].add(value)
        if self.background is not None:
            found["background"].add(self.background)
        return found


def _words(text: str) -> list[str]:
    return [_SYNONYMS.get(w, w) for w in _WORD.findall(text.lower().replace("-", " "))]


def _position(words: Sequence[str]) -> str | None:
    """An absolute position in a run of words; 'left of' / 'right of' are relations, not positions."""
    vertical = horizontal = None
    for i, word in enumerate(words):
        following = words[i + 1] if i + 1 < len(words) else ""
        if word in ("top", "bottom"):
            vertical = word
        elif word in ("left", "right") and following != "of":
            horizontal = word
        elif word == "center":
            return "center" if vertical is None and horizontal is None else None
    if vertical and horizontal:
        return f"{vertical} {horizontal}"
    return vertical or horizontal


def parse_prompt(text: str) -> PromptReading:
    """Read the objects a prompt describes (in order) and its background colour, if named.

    Each shape word starts an object; a prompt with no shape word describes at most one, of unknown shape.
    """
    words = _words(text)
    background = None
    for i, word in enumerate(words):
        if word in ("background", "backdrop") and i > 0 and words[i - 1] in PALETTE:
            background = words[i - 1]
            words = words[: i - 1] + words[i + 1 :]
            break
    shape_at = [i for i, w in enumerate(words) if w in SHAPES]
    if not shape_at:
        # "GREEN" or "an orange thing on the left" still says something about the one object it describes.
        thing = PromptObject(
            colour=next((w for w in words if w in PALETTE), None),
            size=next((w for w in words if w in SIZES), None),
            fill=next((w for w in words if w in FILLS), None),
            position=_position(words),
        )
        return PromptReading([thing] if any(asdict(thing).values()) else [], background)
    objects = []
    for k, i in enumerate(shape_at):
        start = shape_at[k - 1] + 1 if k else 0
        end = shape_at[k + 1] if k + 1 < len(shape_at) else len(words)
        before = words[start:i]
        # Adjectives belong to the next shape; a position phrase follows its shape ("a star on the left").
        after = words[i + 1 : end]
        adjectives_of_next = next((j for j, w in enumerate(after) if w in ("and", "a", "an", "with")), len(after))
        obj = PromptObject(shape=words[i])
        obj.colour = next((w for w in reversed(before) if w in PALETTE), None)
        obj.size = next((w for w in reversed(before) if w in SIZES), None)
        obj.fill = next((w for w in reversed(before) if w in FILLS), None)
        obj.position = _position(after[:adjectives_of_next] if k + 1 < len(shape_at) else after)
        objects.append(obj)
    return PromptReading(objects, background)


# ---------------------------------------------------------------------------------------------------- agreement


def agreement(expected: PromptObject | SceneObject, observed: ObjectReading | None) -> dict[str, bool]:
    """Per attribute the expectation names: does the observed object have it? (All False if none was seen.)"""
    result = {}
    for attribute in ATTRIBUTES:
        wanted = getattr(expected, attribute)
        if wanted is not None:
            result[attribute] = observed is not None and getattr(observed, attribute) == wanted
    return result


def score_reading(reading: SceneReading, scene: Scene) -> dict[str, bool]:
    """Per attribute, did the reading get a scene right? Objects are paired greedily by attributes in common.

    Keys: `background`, `count`, and each attribute of `ATTRIBUTES` (true only if right for every object).
    """
    result = {"background": reading.background == scene.background, "count": len(reading.objects) == len(scene.objects)}
    pairs = match_objects(list(scene.objects), reading.objects)
    for attribute in ATTRIBUTES:
        result[attribute] = len(pairs) == len(scene.objects) and all(
            getattr(truth, attribute) == getattr(seen, attribute) for truth, seen in pairs
        )
    return result


def match_objects(
    expected: Sequence[PromptObject | SceneObject], observed: Sequence[ObjectReading]
) -> list[tuple[PromptObject | SceneObject, ObjectReading]]:
    """Pair each expected object with a distinct observed one, most shared attributes first."""
    candidates = sorted(
        ((sum(agreement(e, o).values()), i, j) for i, e in enumerate(expected) for j, o in enumerate(observed)),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    used_e, used_o, pairs = set(), set(), {}
    for _, i, j in candidates:
        if i not in used_e and j not in used_o:
            used_e.add(i)
            used_o.add(j)
            pairs[i] = (expected[i], observed[j])
    return [pairs[i] for i in sorted(pairs)]


__all__ = [
    "ATTRIBUTES",
    "ObjectReading",
    "PromptObject",
    "PromptReading",
    "SceneReading",
    "agreement",
    "match_objects",
    "nearest_colour",
    "parse_prompt",
    "parse_scene",
    "score_reading",
]
