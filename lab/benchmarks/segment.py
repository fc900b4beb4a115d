"""segment_image on `shapes`: does a shape word's mask cover its object, against two baselines, and how fast?

Run: `pictoprompt bench segment [--n 40] [--prompts caption vgd] [--profile shapes]`; `--tune` runs the grid the
method's defaults were picked from, on the tuning scenes.

1. Held-out scenes with one and with two objects (`held_out_scenes`, the evaluation seed). The ground truth of each
   object is its silhouette: the object rendered alone, solid (an outlined or striped object's mask is what a person
   would outline, not its strokes), pixels more than half covered.
2. For each shape word of the prompt, the IoU of its mask with its object's ground truth (a word without a mask, or
   an object whose shape the prompt does not name, scores 0). Objects pair with their shape word's occurrences in
   order. Prompts: the ground-truth caption (`full_caption`: every detail), and VGD's prompt of the picture (as the
   tool makes it without a prompt).
3. Baselines that read no prompt: the whole picture as every word's mask, and a colour threshold (pixels whose
   colour is farther from the background's than Otsu's threshold of those distances; the background colour is the
   border's median) as every word's mask.
4. Seconds per picture of the segmentation alone (the caption rows), and of VGD's description (the vgd rows).
5. For two-object scenes, how much a shape word's map tells its object from the other one: its mean map value on
   its own object and on the other.

Goals (issue 18): mean IoU with the caption >= 0.5 on single-object scenes, >= 0.4 on two-object scenes and above both
baselines there; at most 5 s per picture.

The method's defaults (timestep, steps, noise draws, refinement, resolutions) were chosen with `--tune` on scenes of
the tuning seed (`TUNING_SEED`), never on the evaluation seed. The last line is every table as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lab.benchmarks.harness import OUTSIDE_SEED, Timer, outside_picture, outside_silhouette, print_table
from lab.shapes.world import HELD_OUT_SEED, full_caption, held_out_scenes
from pictoprompt.configs import SegmentationConfig
from pictoprompt.methods.segmentation import WordSegment, otsu, segment
from pictoprompt.methods.vgd import image_targets, invert, runtime_vocabulary
from pictoprompt.models.profiles import get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.models.shapes.scenes import PALETTE, Scene, SceneObject, render_array, render_scene

KINDS = ("single", "two", "outside single", "outside two")
TUNING_SEED = 4_000_037
"""The scenes the defaults were tuned on: another seed than the evaluation's `HELD_OUT_SEED`."""
OUTSIDE_TUNING_SEED = 7_000_019
"""The drawn pictures the binding was tuned on: another seed than the outside set's own."""
GOALS = {"single": 0.5, "two": 0.4}
SECONDS_GOAL = 5.0
TUNING_GRID = {
    "timestep": (50, 100, 250, 500),
    "num_steps": (1, 3),
    "refinement_steps": (0, 2, 3, 4),
    "num_resolutions": (1, 2),
}
"""The attention's grid (`--tune`), run without binding: it picks the regions the binding then cuts."""
BINDING_GRID = {
    "binding_timesteps": ((0.5, 0.7), (0.3, 0.5, 0.7), (0.5, 0.7, 0.9)),
    "binding_spread": (1, 2, 3),
    "binding_noise": (4, 8),
}
"""The binding's grid (`--tune-binding`), on the tuning scenes and drawn pictures."""


@dataclass(frozen=True)
class Case:
    """One picture to segment: its ground-truth caption, and each object's shape and silhouette."""

    image: Image.Image
    caption: str
    shapes: tuple[str, ...]
    truths: tuple[np.ndarray, ...]
    colours: tuple[str, ...]

    @property
    def short(self) -> str:
        """The objects' colours and shapes only, as a person might type them: "a red circle and a blue square"."""
        return " and ".join(
            f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"
            for colour, shape in zip(self.colours, self.shapes, strict=True)
        )


# ------------------------------------------------------------------------------------------------ ground truth


def object_mask(scene: Scene, obj: SceneObject) -> np.ndarray:
    """The object's silhouette: rendered alone and solid on the scene's background, pixels more than half covered."""
    alone = render_array(Scene(scene.background, (replace(obj, fill="solid"),))).astype(np.float32)
    background = np.asarray(PALETTE[scene.background], dtype=np.float32)
    colour = np.asarray(PALETTE[obj.colour], dtype=np.float32)
    coverage = (alone - background) @ (colour - background) / float((colour - background) @ (colour - background))
    return coverage > 0.5


def iou(mask: np.ndarray | None, truth: np.ndarray) -> float:
    if mask is None:
        return 0.0
    return float((mask & truth).sum() / max(1, (mask | truth).sum()))


# ------------------------------------------------------------------------------------------------ baselines


def whole_picture(image: Image.Image) -> np.ndarray:
    return np.ones((image.height, image.width), dtype=bool)


def colour_threshold(image: Image.Image) -> np.ndarray:
    """Pixels farther from the background colour (the border's median) than Otsu's threshold of the distances."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    distance = np.linalg.norm(pixels - np.median(border, axis=0), axis=-1)
    threshold, _ = otsu(distance)
    return distance > threshold


def scene_cases(kind: str, n: int, seed: int) -> list[Case]:
    """`n` scenes of the world's renderer with one or two objects (`kind`), captioned with every detail."""
    return [
        Case(
            render_scene(scene),
            full_caption(scene),
            tuple(obj.shape for obj in scene.objects),
            tuple(object_mask(scene, obj) for obj in scene.objects),
            tuple(obj.colour for obj in scene.objects),
        )
        for scene in held_out_scenes(kind, n, seed)
    ]


def drawn_caption(objects: Sequence[tuple[str, str, str]], background: str) -> str:
    """ "a striped red circle and a solid blue square on a white background": what the drawing shows, in the world's
    words from each object's (fill, colour, shape), without positions (a drawn object sits anywhere, not on the
    world's grid)."""
    parts = [f"{'an' if fill[0] in 'aeiou' else 'a'} {fill} {colour} {shape}" for fill, colour, shape in objects]
    return f"{' and '.join(parts)} on {'an' if background[0] in 'aeiou' else 'a'} {background} background"


def outside_cases(kind: str, n: int, seed: int) -> list[Case]:
    """The first `n` pictures of the outside set (`harness.outside_picture`: drawn with PIL, any size, place and
    line width) with one object, or two (`kind` "outside single" / "outside two")."""
    count = 1 if kind.endswith("single") else 2
    cases = []
    for index in itertools.count():
        if len(cases) == n:
            return cases
        example = outside_picture(index, seed)
        if len(example.objects) != count:
            continue
        image = example.flat
        cases.append(
            Case(
                image,
                drawn_caption([(o.fill, o.colour, o.shape) for o in example.objects], example.background),
                tuple(o.shape for o in example.objects),
                tuple(outside_silhouette(o, image.size) for o in example.objects),
                tuple(o.colour for o in example.objects),
            )
        )
    raise AssertionError("unreachable: itertools.count() never ends")


def cases(kind: str, n: int, tuning: bool) -> list[Case]:
    if kind.startswith("outside"):
        return outside_cases(kind, n, OUTSIDE_TUNING_SEED if tuning else OUTSIDE_SEED)
    return scene_cases(kind, n, TUNING_SEED if tuning else HELD_OUT_SEED)


# ------------------------------------------------------------------------------------------------ scoring


def shape_word_scores(
    shapes: Sequence[str],
    truths: Sequence[np.ndarray],
    masks: Callable[[int], np.ndarray | None],
    words: Sequence[str],
) -> list[float]:
    """IoU per object: its mask is `masks(index)` of its shape word's occurrence (in order), 0 when unnamed."""
    used: dict[str, int] = {}
    scores = []
    for shape, truth in zip(shapes, truths, strict=True):
        occurrences = [i for i, word in enumerate(words) if word == shape]
        rank = used.get(shape, 0)
        used[shape] = rank + 1
        scores.append(iou(masks(occurrences[rank]), truth) if rank < len(occurrences) else 0.0)
    return scores


def discrimination(case: Case, segments: Sequence[WordSegment]) -> list[tuple[float, float, float, float]]:
    """For two objects of different shapes, per shape word: its map's mean on its object and on the other, and the
    share of its mask on its object and on the other (0, 0 without a mask)."""
    if len(case.shapes) != 2 or case.shapes[0] == case.shapes[1]:
        return []
    by_word = {s.word: s for s in segments}
    rows = []
    for index, shape in enumerate(case.shapes):
        if shape not in by_word:
            continue
        own, other = case.truths[index], case.truths[1 - index]
        word = by_word[shape]
        mask = word.mask if word.mask is not None else np.zeros_like(own)
        area = max(1, int(mask.sum()))
        rows.append(
            (
                float(word.score[own].mean()),
                float(word.score[other].mean()),
                float((mask & own).sum() / area) if mask.any() else 0.0,
                float((mask & other).sum() / area) if mask.any() else 0.0,
            )
        )
    return rows


def describe(runtime: Runtime, image: Image.Image, max_tokens: int) -> str:
    """VGD's prompt for the picture, as `segment_image` writes it without a prompt."""
    clip = runtime.clip()
    result = invert(
        runtime.llm(),
        clip,
        image_targets(clip, [image]),
        vocabulary=runtime_vocabulary(runtime),
        max_length=max_tokens,
    )
    return result.best.text


def evaluate(
    runtime: Runtime, kind: str, n: int, source: str, max_tokens: int, tuning: bool = False, **options
) -> dict:
    """One row: mean IoU of the shape words on `n` pictures of `kind` with prompts from `source`, and the
    baselines."""
    pipeline = runtime.pipeline()
    config = SegmentationConfig.model_validate({**runtime.profile.segmentation.model_dump(), **options})
    scores, whole, colour, named, pairs = [], [], [], [], []
    segmenting, describing = Timer(), Timer()
    for case in cases(kind, n, tuning):
        if source == "caption":
            prompt = case.caption
        elif source == "short":
            prompt = case.short
        else:
            with describing:
                prompt = describe(runtime, case.image, max_tokens)
        with segmenting:
            segments = segment(pipeline, case.image, prompt, config)
        words = [s.word for s in segments]
        masks = [s.mask for s in segments]
        scores += shape_word_scores(case.shapes, case.truths, lambda i, masks=masks: masks[i], words)
        named += [shape in words for shape in case.shapes]
        pairs += discrimination(case, segments)
        # The baselines read no prompt: every shape word gets the same mask.
        everything, foreground = whole_picture(case.image), colour_threshold(case.image)
        whole += shape_word_scores(case.shapes, case.truths, lambda i, mask=everything: mask, case.shapes)
        colour += shape_word_scores(case.shapes, case.truths, lambda i, mask=foreground: mask, case.shapes)
    row = {
        "pictures": kind,
        "prompt": source,
        "binding": "on" if options.get("binding_timesteps", True) else "off",
        "n": n,
        "IoU": statistics.fmean(scores),
        "shape named %": 100 * statistics.fmean(named),
        "whole picture": statistics.fmean(whole),
        "colour threshold": statistics.fmean(colour),
        "s/picture": segmenting.mean,
    }
    if source == "vgd":
        row["VGD s/picture"] = describing.mean
    if pairs:
        for index, name in enumerate(("map on own", "map on other", "mask on own %", "mask on other %")):
            scale = 100 if name.endswith("%") else 1
            row[name] = scale * statistics.fmean(p[index] for p in pairs)
    return row


def goal(name: str, value: float, bound: float, at_least: bool = True) -> dict:
    met = value >= bound if at_least else value <= bound
    return {"goal": name, "value": value, "bound": f"{'>=' if at_least else '<='} {bound:.2f}", "met": met}


def tune(runtime: Runtime, n: int, grid: dict[str, tuple], kinds: Sequence[str], fixed: dict) -> list[dict]:
    """`grid` on the tuning pictures of `kinds`, caption prompts: the table the defaults were read from."""
    rows = []
    for values in itertools.product(*grid.values()):
        options = dict(zip(grid, values, strict=True))
        row: dict = dict(options)
        for kind in kinds:
            result = evaluate(runtime, kind, n, "caption", 32, tuning=True, **fixed, **options)
            row[f"IoU {kind}"] = result["IoU"]
            row[f"s/picture {kind}"] = result["s/picture"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return sorted(rows, key=lambda r: -sum(r[f"IoU {kind}"] for kind in kinds))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pictoprompt bench segment", description=__doc__)
    parser.add_argument("--profile", default="shapes")
    parser.add_argument("--n", type=int, default=40, help="pictures per kind")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--prompts", nargs="+", default=["caption", "vgd"], choices=["caption", "short", "vgd"])
    parser.add_argument("--max-tokens", type=int, default=32, help="VGD's prompt length")
    parser.add_argument(
        "--ablation", action="store_true", help="add rows without the binding (the attention's regions alone)"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--tune", action="store_true", help="run the attention's grid on the tuning scenes instead")
    group.add_argument("--tune-binding", action="store_true", help="run the binding's grid on the tuning pictures")
    parser.add_argument("--torch-threads", type=int, default=1, help="small models on a shared CPU: 1 is fastest")
    settings = parser.parse_args(argv)
    torch.set_num_threads(settings.torch_threads)
    runtime = Runtime(get_profile(settings.profile), cache_dir=Path(tempfile.gettempdir()) / "pictoprompt-bench")
    header = f"profile {settings.profile}, {runtime.device}"
    if settings.tune or settings.tune_binding:
        grid, kinds, fixed = (
            (TUNING_GRID, ("single", "two"), {"binding_timesteps": ()})
            if settings.tune
            else (BINDING_GRID, settings.kinds, {})
        )
        rows = tune(runtime, settings.n, grid, kinds, fixed)
        print_table(f"Tuning grid, caption prompts, {settings.n} tuning pictures per kind, best first ({header})", rows)
        print(json.dumps({"tuning": rows}))
        return 0
    rows = [
        evaluate(runtime, kind, settings.n, source, settings.max_tokens)
        for source in settings.prompts
        for kind in settings.kinds
    ]
    if settings.ablation:
        rows += [
            evaluate(runtime, kind, settings.n, "caption", settings.max_tokens, binding_timesteps=())
            for kind in settings.kinds
        ]
    print_table(f"Shape words' masks, IoU with the object's silhouette ({header})", rows)
    goals = []
    for row in rows:
        if row["prompt"] != "caption" or row["binding"] != "on" or row["pictures"] not in GOALS:
            continue
        kind = row["pictures"]
        goals.append(goal(f"{kind}: IoU with the caption", row["IoU"], GOALS[kind]))
        if kind == "two":
            for baseline in ("whole picture", "colour threshold"):
                goals.append(goal(f"two: IoU above the {baseline}", row["IoU"], row[baseline]))
        goals.append(goal(f"{kind}: seconds per picture", row["s/picture"], SECONDS_GOAL, False))
    for row in goals:
        print(f"{row['goal']}: {row['value']:.3f} (goal {row['bound']}): {'met' if row['met'] else 'NOT met'}")
    print(json.dumps({"segment": rows, "goals": goals}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
