"""The `shapes` world's sampling and language: random scenes, free views, captions, the lexicon, evaluation sets.

The product draws a given scene (`pictoprompt.models.shapes.scenes`); what training and the benchmarks need on top
lives here: seeded scenes (`random_scene(random.Random(seed))`), off-grid free views, the caption grammar and its
words, and the held-out evaluation sets drawn from a seed no training stream uses.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np

from pictoprompt.models.shapes.scenes import (
    BACKGROUND_WEIGHTS,
    COLOURS,
    FILLS,
    HELD_OUT_COMBOS,
    IMAGE_SIZE,
    NOVEL_SHAPE,
    OBJECT_PIXELS,
    PALETTE,
    POSITION_OFFSETS,
    POSITIONS,
    SIZES,
    THIN_SHAPES,
    TRAIN_SHAPES,
    Scene,
    SceneObject,
    coverage,
    silhouette,
)

# ------------------------------------------------------------------------------------------------- free views


@dataclass(frozen=True)
class Placement:
    """Where and how one object of a free view is drawn: anywhere, at any size, with any line width."""

    centre: tuple[float, float]
    extent: float
    """Pixels across, against the grid's 9 or 14."""
    line: float
    """Width of the outline and the stripes, in pixels."""
    stripe_period: float
    rising: bool
    """Stripes rising to the right, instead of the grid renderer's falling ones."""
    colour_shift: tuple[int, int, int]
    """Added to the object's palette RGB: pictures from outside do not use the palette's exact values."""


@dataclass(frozen=True)
class FreeView:
    """A scene's objects drawn off the grid: what a picture from outside the world looks like to the models.

    Only the colour, shape and fill of each object and the background stay meaningful; size and position are
    free, so a free view's caption names neither (`caption_scene(..., layout=False)`).
    """

    placements: tuple[Placement, ...]
    background_shift: tuple[int, int, int]


def _colour_shift(rng: random.Random, spread: int) -> tuple[int, int, int]:
    return (rng.randint(-spread, spread), rng.randint(-spread, spread), rng.randint(-spread, spread))


def random_free_view(scene: Scene, rng: random.Random, colour_spread: int = 16) -> FreeView:
    """Non-overlapping placements for `scene`'s objects: a single object 7-28 px across, several 7-18 px, each
    anywhere inside the picture, with lines 1-3 px wide and stripes of period 3-6 px."""
    largest = 28.0 if len(scene.objects) == 1 else 18.0
    while True:
        placements: list[Placement] = []
        for _ in scene.objects:
            extent = rng.uniform(7.0, largest)
            half = extent / 2
            centre = (rng.uniform(half, IMAGE_SIZE - half), rng.uniform(half, IMAGE_SIZE - half))
            placements.append(
                Placement(
                    centre=centre,
                    extent=extent,
                    line=rng.uniform(1.0, min(3.0, extent / 6)),
                    stripe_period=rng.uniform(3.0, 6.0),
                    rising=rng.random() < 0.5,
                    colour_shift=_colour_shift(rng, colour_spread),
                )
            )
        if all(
            max(abs(a.centre[0] - b.centre[0]), abs(a.centre[1] - b.centre[1])) > (a.extent + b.extent) / 2 + 1
            for i, a in enumerate(placements)
            for b in placements[i + 1 :]
        ):
            return FreeView(tuple(placements), _colour_shift(rng, colour_spread))


def render_free_view(scene: Scene, view: FreeView) -> np.ndarray:
    """`scene`'s objects at `view`'s placements, as a (32, 32, 3) uint8 array."""
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    canvas[:] = np.add(PALETTE[scene.background], view.background_shift)
    for obj, place in zip(scene.objects, view.placements, strict=True):
        mask = silhouette(obj.shape, place.extent, *place.centre)
        alpha = coverage(mask, obj.fill, place.line, place.stripe_period, place.rising)[..., None]
        colour = np.add(PALETTE[obj.colour], place.colour_shift).astype(np.float32)
        canvas = canvas * (1 - alpha) + colour * alpha
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------ sampling


def _bounds(obj: SceneObject) -> tuple[float, float, float, float]:
    cx, cy = obj.centre
    r = OBJECT_PIXELS[obj.size] / 2
    return cx - r, cy - r, cx + r, cy + r


def objects_overlap(a: SceneObject, b: SceneObject, gap: float = 1.0) -> bool:
    ax0, ay0, ax1, ay1 = _bounds(a)
    bx0, by0, bx1, by1 = _bounds(b)
    return not (ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0)


def random_object(
    rng: random.Random, background: str, shapes: tuple[str, ...] = TRAIN_SHAPES, held_out: bool = False
) -> SceneObject:
    """One object whose colour differs from `background`; `held_out` draws only held-out combinations.

    Ordinary draws skip held-out combinations; a shape outside `TRAIN_SHAPES` (crescent) is taken as asked.
    """
    while True:
        if held_out:
            colour, shape = rng.choice(sorted(HELD_OUT_COMBOS))
        else:
            shape, colour = rng.choice(shapes), rng.choice(COLOURS)
        if colour == background:
            continue
        fill = "solid" if shape in THIN_SHAPES else rng.choice(FILLS)
        obj = SceneObject(shape, colour, rng.choice(SIZES), rng.choice(POSITIONS), fill)
        if held_out or shape not in TRAIN_SHAPES or not obj.is_held_out:
            return obj


def random_background(rng: random.Random) -> str:
    return rng.choices(COLOURS, weights=[BACKGROUND_WEIGHTS[c] for c in COLOURS])[0]


def random_scene(
    rng: random.Random,
    n_objects: int | None = None,
    shapes: tuple[str, ...] = TRAIN_SHAPES,
    held_out: bool = False,
) -> Scene:
    """A scene of `n_objects` (default: 1-3, single objects most often) non-overlapping objects.

    With `held_out`, the first object is a held-out combination and the others are ordinary ones.
    """
    if n_objects is None:
        n_objects = rng.choices((1, 2, 3), weights=(0.5, 0.3, 0.2))[0]
    while True:
        background = random_background(rng)
        objects = [random_object(rng, background, shapes, held_out)]
        for _ in range(100):
            if len(objects) == n_objects:
                break
            candidate = random_object(rng, background, shapes)
            if all(not objects_overlap(candidate, o) for o in objects):
                objects.append(candidate)
        if len(objects) == n_objects:
            return Scene(background, tuple(objects))


def shape_twin(scene: Scene, rng: random.Random) -> Scene:
    """`scene` with one object's shape swapped for another training shape: a hard negative for contrastive
    training, since a twin differs from its scene only where the shape is drawn (and its caption only in that word).
    """
    index = rng.randrange(len(scene.objects))
    obj = scene.objects[index]
    shapes = [s for s in TRAIN_SHAPES if s != obj.shape and (obj.colour, s) not in HELD_OUT_COMBOS]
    shape = rng.choice(shapes)
    fill = "solid" if shape in THIN_SHAPES else obj.fill
    return with_object(scene, index, shape=shape, fill=fill)


# ------------------------------------------------------------------------------------------------------ captions

POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "at the top left"),
    "top": ("at the top",),
    "top right": ("in the top right corner", "at the top right"),
    "left": ("on the left",),
    "center": ("in the center", "in the middle"),
    "right": ("on the right",),
    "bottom left": ("in the bottom left corner", "at the bottom left"),
    "bottom": ("at the bottom",),
    "bottom right": ("in the bottom right corner", "at the bottom right"),
}
FILL_WORDS = {"solid": ("solid",), "outlined": ("outlined",), "striped": ("striped",)}
OPENERS = ("", "", "", "a picture of ", "an image of ", "a drawing of ")


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def describe_object(obj: SceneObject, rng: random.Random, size: bool, fill: bool, position: bool) -> str:
    words = []
    if size:
        words.append(obj.size)
    if fill:
        words.append(rng.choice(FILL_WORDS[obj.fill]))
    words += [obj.colour, obj.shape]
    phrase = " ".join(words)
    phrase = f"{_article(phrase)} {phrase}"
    if position:
        phrase += " " + rng.choice(POSITION_PHRASES[obj.position])
    return phrase


def _relation(a: SceneObject, b: SceneObject) -> str | None:
    """A spatial relation of `a` to `b`, when the grid makes one unambiguous."""
    (ax, ay), (bx, by) = POSITION_OFFSETS[a.position], POSITION_OFFSETS[b.position]
    if ay == by and ax != bx:
        return "to the left of" if ax < bx else "to the right of"
    if ax == bx and ay != by:
        return "above" if ay < by else "below"
    return None


def caption_scene(scene: Scene, rng: random.Random, detail: float = 0.5, layout: bool = True) -> str:
    """A caption from the grammar: colour and shape always, every other detail with probability `detail`.

    Without `layout` it names no size, position or relation (for a `FreeView`, where the grid's do not hold).
    """

    def maybe() -> bool:
        return rng.random() < detail

    def maybe_layout() -> bool:
        return layout and maybe()

    background = f" on {_article(scene.background)} {scene.background} background" if maybe() else ""
    opener = rng.choice(OPENERS)
    if layout and len(scene.objects) == 2 and rng.random() < 0.5:
        a, b = scene.objects
        relation = _relation(a, b)
        if relation is not None:
            text = (
                f"{describe_object(a, rng, maybe(), maybe(), False)} {relation} "
                f"{describe_object(b, rng, maybe(), maybe(), False)}"
            )
            return opener + text + background
    parts = [describe_object(o, rng, maybe_layout(), maybe(), maybe_layout()) for o in scene.objects]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return opener + text + background


def full_caption(scene: Scene) -> str:
    """The caption with every detail, no paraphrase: the unambiguous description of a scene."""
    parts = [describe_object(o, random.Random(0), True, True, True) for o in scene.objects]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{text} on {_article(scene.background)} {scene.background} background"


def plain_caption(obj: SceneObject, position: bool = True) -> str:
    """'a red circle in the top left corner': the form used to prompt the generator in benchmarks."""
    phrase = f"{obj.colour} {obj.shape}"
    text = f"{_article(phrase)} {phrase}"
    return f"{text} {POSITION_PHRASES[obj.position][0]}" if position else text


def style_caption(scene: Scene, rng: random.Random, detail: float = 0.5) -> str:
    """The scene's style in the world's words: what its objects share (fill, colour) and its background.

    "striped shapes on a black background", "outlined red shapes", "shapes on a white background": the answer the
    `shapes` LLM learns for VGD's style task. A property the objects do not all share is not part of the style.
    """
    fills = {obj.fill for obj in scene.objects}
    colours = {obj.colour for obj in scene.objects}
    words = []
    if len(fills) == 1 and rng.random() < max(detail, 0.5):
        words.append(next(iter(fills)))
    if len(colours) == 1 and rng.random() < detail:
        words.append(next(iter(colours)))
    words.append("shapes")
    text = " ".join(words)
    if len(words) == 1 or rng.random() < max(detail, 0.5):
        text += f" on {_article(scene.background)} {scene.background} background"
    return text


LEXICON_FUNCTION_WORDS = frozenset({"a", "an", "the", "of", "on", "in", "at", "to", "and"})


def caption_lexicon() -> tuple[str, ...]:
    """The words that name something in the captions the `shapes` CLIP was trained on, sorted.

    Taken from the caption grammar (its colours, shapes, sizes, fills, position phrases, openers and relations),
    less its function words: the only words whose CLIP embeddings were trained, so the only sensible start words for
    VGD's beam. The crescent is absent: no training caption names it.
    """
    phrases = [
        *COLOURS,
        *TRAIN_SHAPES,
        *SIZES,
        *(word for words in FILL_WORDS.values() for word in words),
        *(phrase for phrases in POSITION_PHRASES.values() for phrase in phrases),
        *OPENERS,
        "to the left of",
        "to the right of",
        "above",
        "below",
        "background",
    ]
    words = {word for phrase in phrases for word in phrase.split()}
    return tuple(sorted(words - LEXICON_FUNCTION_WORDS))


def language_words() -> tuple[str, ...]:
    """Every word the world's language uses (captions and style captions), sorted: the `shapes` dictionary."""
    return tuple(sorted({*caption_lexicon(), *LEXICON_FUNCTION_WORDS, "shapes"}))


# --------------------------------------------------------------------------------------------- streams and sets


HELD_OUT_SEED = 2_000_003
HELD_OUT_KINDS = ("single", "two", "held_out_combos", "crescent")


def held_out_scenes(kind: str, n: int, seed: int = HELD_OUT_SEED) -> list[Scene]:
    """Fixed evaluation scenes of one kind, from a seed no training stream uses.

    `single`: one ordinary object; `two`: two ordinary objects; `held_out_combos`: one object of a held-out
    colour-shape combination; `crescent`: one crescent, the shape no model has seen.
    """
    rng = random.Random(f"{kind}-{seed}")
    if kind == "single":
        return [random_scene(rng, 1) for _ in range(n)]
    if kind == "two":
        return [random_scene(rng, 2) for _ in range(n)]
    if kind == "held_out_combos":
        return [random_scene(rng, 1, held_out=True) for _ in range(n)]
    if kind == "crescent":
        return [random_scene(rng, 1, shapes=(NOVEL_SHAPE,)) for _ in range(n)]
    raise ValueError(f"unknown held-out kind '{kind}'; use one of {', '.join(HELD_OUT_KINDS)}")


def with_object(scene: Scene, index: int, **changes: str) -> Scene:
    """A copy of `scene` with some attributes of one object changed (for edit benchmarks)."""
    objects = list(scene.objects)
    objects[index] = replace(objects[index], **changes)
    return Scene(scene.background, tuple(objects))
