"""SD-IPC on `shapes`: do variations carry the reference's content, do text edits apply, and what do they cost?

Run: `pictoprompt bench sd_ipc [--n 200] [--seeds-per-scene 4] [--edit-n 100] [--steps 25] [--profile shapes]`.
Four tables:

1. Variation (the paper's Table 2 claim): on held-out single-object scenes, the oracle's agreement between the
   reference scene and an image generated from (a) the ground-truth caption, (b) the SD-IPC pseudo-prompt of
   the reference picture, (c) the caption of another scene (the floor). Goal: (b) within 10 points of (a) on
   colour and shape. One image per scene leaves its seed's noise in the gap, so every scene is drawn with
   several seeds, and the gap is printed with its standard error over scenes.
2. Editing: one attribute changed by text ("blue", "on the left", "a star", "striped") by both methods of
   `edit_with_text`: the paper's Eq. 8 (`sd-ipc`) at alpha 0 / 0.9 / 1.5, and `rewrite` (the default: VGD's
   prompt of the picture with the edit put in, `methods.prompt_edit`) at alpha 1 / 1.5; how often the oracle sees
   the edit applied; the share of the other attributes (shape, colour, size, position, fill, background) that
   match the reference; how often the edit is applied while the object keeps its identity (its colour and shape,
   less the one edited); for `rewrite`, how often the edited prompt names the edit. Goal, at the defaults:
   applied and the rest kept in at least 60% each, per kind.
3. Speed: `vary_image` against `generate_image` with the same settings through the tool functions. Goal: a
   variation costs at most 5% more.
4. Conversion (no images drawn): where a variation loses an attribute, did CLIP not read it from the picture,
   did the conversion (Eq. 6) lose it, or did the generator not draw it? Per attribute, how often the picture's
   CLIP embedding is nearest its own caption among captions that differ only in that attribute, and how often
   `f_cnvrt` is nearest that caption's EOS state among theirs.

Every image of one scene uses the same seed in every condition, so the conditions differ only in the prompt.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from lab.benchmarks.grammar import parse_caption
from lab.benchmarks.harness import (
    Example,
    Timer,
    clip_image_similarity,
    image_agreement,
    mean_scores,
    print_table,
    scene_set,
)
from lab.shapes.oracle import ATTRIBUTES, agreement, parse_scene
from lab.shapes.world import POSITION_PHRASES, full_caption, with_object
from pictoprompt.methods.generation import Sample, default_size, generate
from pictoprompt.methods.prompt_edit import prompt_edit_states, rewrite_prompt
from pictoprompt.methods.sd_ipc import ImageToPrompt
from pictoprompt.methods.vgd import invert, runtime_vocabulary
from pictoprompt.models.profiles import get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.models.shapes.scenes import (
    COLOURS,
    FILLS,
    HELD_OUT_COMBOS,
    POSITIONS,
    SIZES,
    THIN_SHAPES,
    TRAIN_SHAPES,
    Scene,
    SceneObject,
)
from pictoprompt.progress import Progress
from pictoprompt.server.assets import AssetStore
from pictoprompt.tools.base import ToolContext
from pictoprompt.tools.edit_with_text import DEFAULT_ALPHA
from pictoprompt.tools.generate_image import GenerateImageRequest, generate_image
from pictoprompt.tools.vary_image import VaryImageRequest, vary_image

ALPHAS = (0.0, 0.9, 1.5)
"""SD-IPC's Eq. 8 at these alphas (0.9 is the paper's)."""
REWRITE_ALPHAS = (1.0, 1.5)
EDIT_KINDS = ("colour", "position", "shape", "fill")
EDIT_GOAL = 60.0
"""Applied and the rest kept, each at least this %, per kind, at the tool's defaults."""
REPORTED = ("shape", "colour", "fill", "background", "size", "position")
BATCH = 50
PROBED = {"shape": TRAIN_SHAPES, "colour": COLOURS, "fill": FILLS, "size": SIZES, "position": POSITIONS}


def render(
    runtime: Runtime, prompt_embeds: torch.Tensor, seeds: Sequence[int], settings: argparse.Namespace
) -> list[Image.Image]:
    """One image per row of `prompt_embeds` (row i with seed i), in batches, against the empty-prompt negative."""
    pipeline = runtime.pipeline()
    negative = ImageToPrompt.cached(runtime.clip(), pipeline).empty_states
    size = default_size(pipeline)
    images = []
    for start in range(0, len(seeds), BATCH):
        rows = slice(start, start + BATCH)
        images += generate(
            pipeline,
            Sample(prompt_embeds[rows], negative, seeds[rows], settings.guidance, Progress()),
            settings.steps,
            size,
            size,
        )
    return images


def text_prompts(runtime: Runtime, texts: Sequence[str]) -> torch.Tensor:
    pipeline = runtime.pipeline()
    states, _ = ImageToPrompt.cached(runtime.clip(), pipeline).text_states(texts)
    return states


def image_prompts(runtime: Runtime, images: Sequence[Image.Image]) -> torch.Tensor:
    clip = runtime.clip()
    return ImageToPrompt.cached(clip, runtime.pipeline()).prompt(clip.encode_image(images))


def variation_table(
    runtime: Runtime, examples: list[Example], settings: argparse.Namespace
) -> tuple[list[dict], dict[str, list[dict[str, float]]]]:
    """The table's rows, and per condition each scene's scores averaged over its `seeds_per_scene` images.

    Scene i's copy j uses seed i + j * n in every condition, so copy 0 is the single-seed run of earlier versions.
    """
    n, copies = len(examples), settings.seeds_per_scene
    seeds = list(range(n * copies))
    others = examples[n // 2 :] + examples[: n // 2]
    conditions = {
        "ground-truth caption": text_prompts(runtime, [ex.caption for ex in examples]),
        "SD-IPC variation": image_prompts(runtime, [ex.image for ex in examples]),
        "random caption": text_prompts(runtime, [ex.caption for ex in others]),
    }
    references = [ex.image for ex in examples] * copies
    rows, per_scene = [], {}
    for name, prompt_embeds in conditions.items():
        images = render(runtime, prompt_embeds.repeat(copies, 1, 1), seeds, settings)
        per_scene[name] = [
            mean_scores(image_agreement(images[i + j * n], ex.scene) for j in range(copies))
            for i, ex in enumerate(examples)
        ]
        scores = mean_scores(per_scene[name])
        clip_i = float(clip_image_similarity(runtime.clip(), images, references).mean())
        rows.append({"condition": name, **{a: 100 * scores[a] for a in REPORTED}, "CLIP-I": clip_i})
    return rows, per_scene


def paired_gap(
    truth: Sequence[dict[str, float]], method: Sequence[dict[str, float]], attribute: str
) -> tuple[float, float]:
    """Mean of method minus truth over the scenes, in points, and its standard error (paired by scene; NaN for
    a single scene)."""
    differences = [100 * (m[attribute] - t[attribute]) for t, m in zip(truth, method, strict=True)]
    if len(differences) < 2:
        return statistics.fmean(differences), math.nan
    return statistics.fmean(differences), statistics.stdev(differences) / len(differences) ** 0.5


def edited_object(obj: SceneObject, background: str, kind: str, rng: random.Random) -> tuple[SceneObject, str] | None:
    """The object with one attribute changed, and the edit text that asks for it; None where the world has no
    such change (a star has no outline or stripes)."""
    if kind == "colour":
        colour = rng.choice([c for c in COLOURS if c not in (obj.colour, background)])
        return SceneObject(obj.shape, colour, obj.size, obj.position, obj.fill), colour
    if kind == "position":
        position = rng.choice([p for p in POSITIONS if p != obj.position])
        return SceneObject(obj.shape, obj.colour, obj.size, position, obj.fill), POSITION_PHRASES[position][0]
    if kind == "fill":
        if obj.shape in THIN_SHAPES:
            return None
        fill = rng.choice([f for f in FILLS if f != obj.fill])
        return SceneObject(obj.shape, obj.colour, obj.size, obj.position, fill), fill
    # A new shape the generator has seen in this colour and that can carry the object's fill.
    shapes = [
        s
        for s in TRAIN_SHAPES
        if s != obj.shape and (obj.colour, s) not in HELD_OUT_COMBOS and (obj.fill == "solid" or s not in THIN_SHAPES)
    ]
    shape = rng.choice(shapes)
    article = "an" if shape[0] in "aeiou" else "a"
    return SceneObject(shape, obj.colour, obj.size, obj.position, obj.fill), f"{article} {shape}"


def picture_prompts(runtime: Runtime, examples: Sequence[Example]) -> list[str]:
    """VGD's prompt of each picture, as `edit_with_text(method="rewrite")` writes it when given none."""
    clip, llm, vocabulary = runtime.clip(), runtime.llm(), runtime_vocabulary(runtime)
    return [invert(llm, clip, clip.encode_image([ex.image]), vocabulary=vocabulary).best.text for ex in examples]


def edit_conditions(
    runtime: Runtime, examples: Sequence[Example], edits: Sequence[tuple[SceneObject, str]], sources: Sequence[str]
) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """Per method and alpha, the generator's prompts (one row per edit) and the edited prompts (rewrite only)."""
    clip, pipeline, llm = runtime.clip(), runtime.pipeline(), runtime.llm()
    converter = ImageToPrompt.cached(clip, pipeline)
    image_embeds = clip.encode_image([ex.image for ex in examples])
    conditions: dict[str, tuple[torch.Tensor, list[str]]] = {}
    for alpha in ALPHAS:
        rows = [converter.edit(image_embeds[i : i + 1], text, alpha) for i, (_, text) in enumerate(edits)]
        conditions[f"sd-ipc, alpha {alpha}"] = (torch.cat(rows), [])
    targets = [rewrite_prompt(llm, source, text) for source, (_, text) in zip(sources, edits, strict=True)]
    for alpha in REWRITE_ALPHAS:
        rows = [
            prompt_edit_states(clip, pipeline, image_embeds[i : i + 1], sources[i], targets[i], alpha)[0]
            for i in range(len(edits))
        ]
        conditions[f"rewrite, alpha {alpha}"] = (torch.cat(rows), targets)
    return conditions


def edit_table(runtime: Runtime, examples: list[Example], settings: argparse.Namespace) -> list[dict]:
    """Each edit kind by each method: applied, the rest kept, and both at once, over `seeds_per_scene` images of
    every scene; for `rewrite` also how often the edited prompt itself names the edit (parsed)."""
    sources = picture_prompts(runtime, examples)
    rows = []
    for kind in EDIT_KINDS:
        rng = random.Random(f"edit-{kind}")
        chosen = [(ex, edited_object(ex.scene.objects[0], ex.scene.background, kind, rng)) for ex in examples]
        kept_examples = [(ex, source) for (ex, edit), source in zip(chosen, sources, strict=True) if edit is not None]
        edits = [edit for _, edit in chosen if edit is not None]
        scenes = [ex for ex, _ in kept_examples]
        conditions = edit_conditions(runtime, scenes, edits, [source for _, source in kept_examples])
        for name, (prompt_embeds, targets) in conditions.items():
            repeats = settings.seeds_per_scene
            seeds = [i * repeats + r for i in range(len(edits)) for r in range(repeats)]
            images = render(runtime, prompt_embeds.repeat_interleave(repeats, dim=0), seeds, settings)
            applied, kept, both = [], [], []
            for k, image in enumerate(images):
                ex, (target, _) = scenes[k // repeats], edits[k // repeats]
                reading = parse_scene(image)
                seen = agreement(target, reading.main)
                applied.append(seen[kind])
                others = [seen[a] for a in ATTRIBUTES if a != kind] + [reading.background == ex.scene.background]
                kept.append(statistics.fmean(others))
                both.append(seen[kind] and all(seen[a] for a in ("colour", "shape") if a != kind))
            named = (
                [prompt_names(text, edit[0], kind) for text, edit in zip(targets, edits, strict=True)]
                if targets
                else []
            )
            rows.append(
                {
                    "edit": kind,
                    "method": name,
                    "scenes": len(edits),
                    "applied %": 100 * statistics.fmean(applied),
                    "others kept %": 100 * statistics.fmean(kept),
                    "applied, identity kept %": 100 * statistics.fmean(both),
                    "edited prompt names it %": 100 * statistics.fmean(named) if named else math.nan,
                }
            )
    return rows


def prompt_names(text: str, target: SceneObject, kind: str) -> bool:
    """Whether an edited prompt parses and its first object has the edited attribute's new value."""
    parsed = parse_caption(text)
    return bool(parsed and parsed.objects and getattr(parsed.objects[0], kind) == getattr(target, kind))


def attribute_variants(scene: Scene, attribute: str) -> tuple[list[str], int] | None:
    """Full captions of the scene with its object's `attribute` set to every value the object can take, and the
    index of the true one; None where the object can take only one (a thin shape is always solid)."""
    obj = scene.objects[0]
    if attribute == "fill" and obj.shape in THIN_SHAPES:
        return None
    values = [v for v in PROBED[attribute] if attribute != "shape" or obj.fill == "solid" or v not in THIN_SHAPES]
    captions = [full_caption(with_object(scene, 0, **{attribute: value})) for value in values]
    return captions, values.index(getattr(obj, attribute))


def conversion_table(runtime: Runtime, examples: list[Example]) -> tuple[list[dict], float]:
    """Per attribute, % of scenes where the picture's CLIP embedding picks its own caption's text embedding, and
    `f_cnvrt` its own caption's EOS state, among the captions that differ only in that attribute; and the mean
    cosine between `f_cnvrt` and the true caption's EOS state."""
    clip = runtime.clip()
    converter = ImageToPrompt.cached(clip, runtime.pipeline())
    image_embeds = clip.encode_image([ex.image for ex in examples])
    f_cnvrt = converter.convert(image_embeds)
    states, eos = converter.text_states([ex.caption for ex in examples])
    cosine = float(F.cosine_similarity(f_cnvrt, states[torch.arange(len(examples)), eos].float()).mean())
    rows = []
    for attribute in PROBED:
        clip_hits, conversion_hits, chance = [], [], []
        for i, ex in enumerate(examples):
            variants = attribute_variants(ex.scene, attribute)
            if variants is None:
                continue
            captions, truth = variants
            text_embeds = F.normalize(clip.encode_text(captions).float(), dim=-1)
            clip_hits.append(int((text_embeds @ image_embeds[i].float()).argmax()) == truth)
            variant_states, variant_eos = converter.text_states(captions)
            eos_states = variant_states[torch.arange(len(captions)), variant_eos].float()
            conversion_hits.append(int((F.normalize(eos_states, dim=-1) @ f_cnvrt[i]).argmax()) == truth)
            chance.append(1 / len(captions))
        rows.append(
            {
                "attribute": attribute,
                "scenes": len(clip_hits),
                "chance %": 100 * statistics.fmean(chance),
                "CLIP reads it %": 100 * statistics.fmean(clip_hits),
                "f_cnvrt keeps it %": 100 * statistics.fmean(conversion_hits),
            }
        )
    return rows, cosine


class OneImage:
    """The `ImageSource` of the speed test: every reference is the same picture."""

    def __init__(self, image: Image.Image) -> None:
        self.image = image

    def load(self, ref: str) -> Image.Image:
        return self.image


def speed_table(
    runtime: Runtime, example: Example, settings: argparse.Namespace, repeats: int, num_images: int
) -> list[dict]:
    common = {"num_images": num_images, "steps": settings.steps, "guidance": settings.guidance, "seed": 0}
    calls = {
        "generate_image": (generate_image, GenerateImageRequest(prompt=example.caption, **common)),
        "vary_image": (vary_image, VaryImageRequest(images=["reference"], **common)),
    }
    timers = {name: Timer() for name in calls}
    with tempfile.TemporaryDirectory() as scratch:
        context = ToolContext(runtime, AssetStore(Path(scratch)), OneImage(example.image))
        for tool, request in calls.values():
            tool(request, context)  # warm-up: loading, caches, the conversion matrix
        for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
            for name, (tool, request) in calls.items():
                with timers[name], runtime.gpu_lock:
                    tool(request, context)
    baseline = statistics.median(timers["generate_image"].times)
    return [
        {
            "tool": name,
            "median s": statistics.median(timer.times),
            "mean s": timer.mean,
            "vs generate_image %": 100 * (statistics.median(timer.times) / baseline - 1),
        }
        for name, timer in timers.items()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pictoprompt bench sd_ipc", description=__doc__)
    parser.add_argument("--profile", default="shapes")
    parser.add_argument("--n", type=int, default=200, help="held-out single-object scenes for the variations")
    parser.add_argument(
        "--seeds-per-scene", type=int, default=4, help="variation images per scene and condition (seed noise)"
    )
    parser.add_argument("--edit-n", type=int, default=100, help="scenes per edit kind and alpha")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per tool")
    parser.add_argument("--num-images", type=int, default=4, help="images per timed call")
    settings = parser.parse_args(argv)
    if settings.n < 1 or settings.seeds_per_scene < 1:
        parser.error("--n and --seeds-per-scene must be at least 1")

    runtime = Runtime(get_profile(settings.profile))
    examples = scene_set("single", settings.n)
    header = f"profile {settings.profile}, {settings.steps} DDIM steps, guidance {settings.guidance}"
    with torch.no_grad():
        variation, per_scene = variation_table(runtime, examples, settings)
        print_table(
            f"Variation: oracle agreement with the reference, % ({settings.n} scenes x {settings.seeds_per_scene} "
            f"seeds; {header})",
            variation,
        )
        edits = edit_table(runtime, examples[: settings.edit_n], settings)
        print_table(
            f"Editing by text ({min(settings.edit_n, settings.n)} scenes x {settings.seeds_per_scene} seeds per row, "
            f"fewer for fill (stars have none); {header})",
            edits,
        )
        conversion, cosine = conversion_table(runtime, examples)
        print_table(
            f"Conversion: the true value nearest among captions differing in one attribute ({settings.n} scenes)",
            conversion,
        )
        print(f"mean cosine of f_cnvrt to the true caption's EOS state: {cosine:.3f}")
    speed = speed_table(runtime, examples[0], settings, settings.repeats, settings.num_images)
    print_table(f"Speed: {settings.num_images} images per call, {settings.repeats} calls ({runtime.device})", speed)

    gaps = {
        a: paired_gap(per_scene["ground-truth caption"], per_scene["SD-IPC variation"], a) for a in ("colour", "shape")
    }
    overhead = speed[1]["vs generate_image %"]
    summary = {
        "variation": variation,
        "edits": edits,
        "conversion": conversion,
        "f_cnvrt_eos_cosine": cosine,
        "speed": speed,
        "gap_points": gaps,
    }
    print(
        "SD-IPC minus ground-truth caption, points (standard error over scenes): "
        + ", ".join(f"{a} {gap:+.1f} ({error:.1f})" for a, (gap, error) in gaps.items())
        + f" (goal within 10): {'met' if min(gap for gap, _ in gaps.values()) >= -10 else 'NOT met'}"
    )
    print(f"variation cost over generation: {overhead:+.1f}% (goal <= 5%): {'met' if overhead <= 5 else 'NOT met'}")
    for row in edits:
        if row["method"] == f"rewrite, alpha {DEFAULT_ALPHA['rewrite']}":
            met = row["applied %"] >= EDIT_GOAL and row["others kept %"] >= EDIT_GOAL
            print(
                f"{row['edit']} edit at the defaults: applied {row['applied %']:.1f}%, others kept "
                f"{row['others kept %']:.1f}% (goal >= {EDIT_GOAL:.0f} each): {'met' if met else 'NOT met'}"
            )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
