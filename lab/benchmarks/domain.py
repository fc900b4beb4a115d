"""SD-IPC-FT on `shapes`: does a domain adapter make `vary_image` keep more inside its domain, and what does it cost
outside?

Run: `pictoprompt bench domain [--train-n 500] [--n 40] [--seeds-per-scene 4] [--iterations N] [--learning-rate R]
[--prompt-learning-rate R] [--caption-alignment W] [--captions class|grammar] [--ab-targets] [--steps 25]
[--threads 1]` (unset training options are the `shapes` profile's `domain_tuning`), or with `--learning-rates 1e-5
1e-4` to compare rates on the domain's tuning scenes instead of the evaluation.

The domain (`STRIPED_ON_DARK`): one striped object on a dark background (black, gray, purple or blue), of any colour
but the background's. Stars are left out (they are always solid in this world), and so are the crescent and the
held-out colour-shape combinations, which no training stream may show. Its 3,042 scenes are split once by a hash
of their full caption (`split`): a tenth for evaluation, a tenth for tuning the settings, the rest for training, so
no set depends on another's size and training never sees an evaluated scene.

Training: the first `--train-n` scenes of the training part in a fixed shuffled order, rendered to PNGs and
captioned, in the captions file `pictoprompt train-domain` reads, and trained by the same function
(`train_domain_adapter`), timed (wall seconds, `--threads` torch threads). The captions (`--captions`) are `class`
by default, naming exactly what a variation should keep ("a striped pink square on a gray background", as a user
would caption a domain), or `grammar`, the world's grammar with each detail named half the time, as the generator
was trained (`caption_scene`, detail 0.5).

Evaluation: `vary_image` on each of `--n` evaluation scenes of the domain, and on `--n` held-out single-object
scenes outside it (`held_out_scenes("single")` less those the domain contains), `--seeds-per-scene` images per call
(scene i: seeds i*k .. i*k+k-1), once without a concept and once with `concept=` the adapter; both calls of a scene
use the same seeds, so the conditions differ only in the adapter. The oracle reads every picture and scores it
against the reference scene as `pictoprompt bench sd_ipc`'s variation table does (`image_agreement`). "All kept":
colour, shape, fill and background all right, what a variation is meant to carry; size and position are reported
but not in it, as SD-IPC's conversion passes CLIP's pooled embedding of the picture, which says what is drawn more
than where. The gain is paired by scene, with its standard error over scenes.

Floor (the issue's): the adapter keeps all four in at least 10 points more of the in-domain variations. A last
table gives the training time, seconds per iteration and per `vary_image` call with and without the adapter.

At the paper's settings (1000 iterations, lr 1e-5 for both the K/V deltas and the deep prompts, grammar
captions) no rate helped on the tuning scenes (500 training scenes, 40 tuning scenes x 2 seeds): all kept went
6.2% without an adapter, 6.2% / 3.8% / 0.0% with lr 1e-5 / 1e-4 / 1e-3, and A/B targets (class = the four
attributes) gave +0.0 and -1.2 points at 1e-5 and 1e-4. The stripes were what variations lost, adapter or not
(fill kept in 7.5%), while the same U-Net drew them from the caption's end-of-text state in 57.5%: the image side
loses them. Caption alignment (`CaptionAlignment`) with the deep prompts at lr 1e-2 gave +10.0 points there
(+11.2 with its cosine term alone, which lost the shape, 75% -> 42.5%; alignment weight 3: +10.0), and is the
profile's default.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from lab.benchmarks.harness import DictImages, Timer, image_agreement, mean_scores, print_table
from lab.benchmarks.sd_ipc import paired_gap
from lab.shapes.world import caption_scene, full_caption, held_out_scenes
from pictoprompt.models.concepts import ConceptStore
from pictoprompt.models.profiles import get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.models.shapes import weights_present
from pictoprompt.models.shapes.scenes import (
    COLOURS,
    HELD_OUT_COMBOS,
    POSITIONS,
    SIZES,
    THIN_SHAPES,
    TRAIN_SHAPES,
    Scene,
    SceneObject,
    render_scene,
)
from pictoprompt.progress import Progress
from pictoprompt.server.assets import AssetStore
from pictoprompt.tools.base import ToolContext
from pictoprompt.tools.customize_concept import domain_tuning_config, train_domain_adapter
from pictoprompt.tools.vary_image import VaryImageRequest, vary_image

HEADLINE = ("colour", "shape", "fill", "background")
"""The attributes "all kept" asks for: what a variation should carry (not size and position)."""
REPORTED = (*HEADLINE, "size", "position")
ALL_KEPT = "all kept"
FLOOR = 10.0
"""Points of "all kept" the adapter must add in the domain."""
CAPTION_DETAIL = 0.5
"""As the `shapes` generator's captions: colour and shape always, each other detail half the time."""
SPLIT_BUCKETS = 10


@dataclass(frozen=True)
class Domain:
    """Single-object scenes of one fill on a few backgrounds: what a domain adapter is trained on."""

    name: str
    fill: str
    backgrounds: tuple[str, ...]
    shapes: tuple[str, ...]

    def contains(self, scene: Scene) -> bool:
        if len(scene.objects) != 1:
            return False
        obj = scene.objects[0]
        return scene.background in self.backgrounds and obj.fill == self.fill and obj.shape in self.shapes

    def scenes(self) -> list[Scene]:
        """Every scene of the domain the world may show in training, in a fixed order (no held-out combination)."""
        return [
            Scene(background, (SceneObject(shape, colour, size, position, self.fill),))
            for background, shape, colour, size, position in itertools.product(
                self.backgrounds, self.shapes, COLOURS, SIZES, POSITIONS
            )
            if colour != background and (colour, shape) not in HELD_OUT_COMBOS
        ]


STRIPED_ON_DARK = Domain(
    name="striped-on-dark",
    fill="striped",
    backgrounds=("black", "gray", "purple", "blue"),
    shapes=tuple(shape for shape in TRAIN_SHAPES if shape not in THIN_SHAPES),
)


def split(scene: Scene) -> str:
    """'evaluation', 'tuning' or 'training': a fixed partition by a hash of the scene's full caption."""
    bucket = zlib.crc32(full_caption(scene).encode()) % SPLIT_BUCKETS
    return "evaluation" if bucket == 0 else "tuning" if bucket == 1 else "training"


def domain_scenes(domain: Domain, part: str, n: int) -> list[Scene]:
    """The first `n` scenes of one part of the domain, shuffled by a seed of their own: distinct, and the first `n`
    are the same whatever larger `n` is asked for."""
    pool = [scene for scene in domain.scenes() if split(scene) == part]
    if n > len(pool):
        raise ValueError(f"the {part} part of {domain.name} has {len(pool)} scenes; asked for {n}")
    random.Random(f"{domain.name}-{part}").shuffle(pool)
    return pool[:n]


def outside_scenes(domain: Domain, n: int) -> list[Scene]:
    """The first `n` held-out single-object scenes the domain does not contain."""
    # Under one in six single-object scenes falls in the domain, so four times as many always leave n.
    scenes = [scene for scene in held_out_scenes("single", 4 * n) if not domain.contains(scene)][:n]
    if len(scenes) < n:
        raise ValueError(f"only {len(scenes)} held-out scenes outside {domain.name}; asked for {n}")
    return scenes


def scene_class(scene: Scene) -> str:
    """What a variation of the scene should keep (`HEADLINE`), as the class of A/B targets."""
    obj = scene.objects[0]
    return f"{obj.colour} {obj.fill} {obj.shape} on {scene.background}"


def class_caption(scene: Scene) -> str:
    """The caption naming what a variation should keep (`HEADLINE`) and nothing else: "a striped pink square on a
    gray background"."""
    obj = scene.objects[0]
    return f"a {obj.fill} {obj.colour} {obj.shape} on a {scene.background} background"


CAPTIONS = ("grammar", "class")
"""How the training captions are written: the world's grammar as the generator was trained (`CAPTION_DETAIL`), or
`class_caption`."""


def write_training_set(
    scenes: Iterable[Scene], folder: Path, ab_targets: bool = False, captions: str = "grammar"
) -> Path:
    """A PNG per scene in `folder` and the captions file `read_captions` reads; returns that file. With
    `ab_targets` each line carries its scene's class (`scene_class`), which turns on A/B training."""
    rng = random.Random("domain-captions")
    lines = []
    for i, scene in enumerate(scenes):
        name = f"scene-{i:05d}.png"
        render_scene(scene).save(folder / name)
        text = caption_scene(scene, rng, CAPTION_DETAIL) if captions == "grammar" else class_caption(scene)
        entry = {"file_name": name, "text": text}
        if ab_targets:
            entry["class"] = scene_class(scene)
        lines.append(json.dumps(entry))
    captions = folder / "metadata.jsonl"
    captions.write_text("\n".join(lines) + "\n")
    return captions


# --------------------------------------------------------------------------------------------------- the bench


@dataclass
class Adapter:
    name: str
    learning_rate: float
    iterations: int
    seconds: float
    """Wall time of `train_domain_adapter`: reading the images, fitting the deep prompts, training, saving."""
    iteration_seconds: float
    """Time per training iteration alone, between the first and the last iteration's reports."""
    losses: list[float]

    def loss_at(self, start: float, end: float) -> float:
        """Mean loss over a slice of training given as fractions (the loss of one step is noisy)."""
        count = len(self.losses)
        part = self.losses[int(start * count) : max(int(end * count), int(start * count) + 1)]
        return statistics.fmean(part)


class Bench:
    def __init__(self, folder: Path, settings: argparse.Namespace) -> None:
        self.folder, self.settings = folder, settings
        self.runtime = Runtime(get_profile("shapes"))
        self.store = ConceptStore(folder / "concepts")
        self.images = DictImages()
        self.context = ToolContext(self.runtime, AssetStore(folder / "assets"), self.images, concepts=self.store)
        self.timers: dict[str | None, Timer] = {}

    def train(self, domain: Domain, scenes: list[Scene], learning_rate: float) -> Adapter:
        name = f"{domain.name}-{len(self.store.list())}"
        images_dir = self.folder / name
        images_dir.mkdir()
        captions = write_training_set(scenes, images_dir, self.settings.ab_targets, self.settings.captions)
        iterations = self.settings.iterations
        stamps: list[float] = []

        def report(done: float, total: float | None, message: str | None) -> None:
            stamps.append(time.perf_counter())
            if int(done) % max(iterations // 10, 1) == 0:
                print(f"    {message}", file=sys.stderr, flush=True)

        started = time.perf_counter()
        with self.runtime.gpu_lock:
            config = domain_tuning_config(
                self.runtime.profile.domain_tuning,
                iterations=iterations,
                learning_rate=learning_rate,
                caption_alignment=self.settings.caption_alignment,
                prompt_learning_rate=self.settings.prompt_learning_rate,
            )
            train_domain_adapter(
                self.runtime, self.store, name, (images_dir, captions), config, False, Progress(report)
            )
        seconds = time.perf_counter() - started
        per_iteration = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else seconds
        adapter = Adapter(name, learning_rate, iterations, seconds, per_iteration, self.store.get(name).losses)
        print(
            f"  trained {name} on {len(scenes)} scenes, {adapter.iterations} it at lr {learning_rate:g}: "
            f"{seconds:.1f} s, loss {adapter.loss_at(0, 0.1):.4f} (first tenth) -> {adapter.loss_at(0.9, 1):.4f} "
            "(last tenth)",
            flush=True,
        )
        return adapter

    def label(self, adapter: Adapter) -> str:
        label = f"adapter, lr {adapter.learning_rate:g}"
        if self.settings.prompt_learning_rate not in (None, adapter.learning_rate):
            label += f" (prompts {self.settings.prompt_learning_rate:g})"
        if self.settings.caption_alignment:
            label += f", alignment {self.settings.caption_alignment:g}"
        if self.settings.captions != "grammar":
            label += f", {self.settings.captions} captions"
        return label + (", A/B targets" if self.settings.ab_targets else "")

    def vary(self, scenes: list[Scene], concepts: list[str | None], label: str) -> dict[str | None, list[dict]]:
        """Per concept (None: none), each scene's scores averaged over its images; a scene's calls are made one
        after another, so drift in the machine's load hits every condition alike."""
        k = self.settings.seeds_per_scene
        per_scene: dict[str | None, list[dict]] = {concept: [] for concept in concepts}
        for i, scene in enumerate(scenes):
            ref = f"{label}-{i}"
            self.images.images[ref] = render_scene(scene)
            for concept in concepts:
                request = VaryImageRequest(
                    images=[ref], num_images=k, steps=self.settings.steps, seed=i * k, concept=concept
                )
                with self.timers.setdefault(concept, Timer()), self.runtime.gpu_lock:
                    response = vary_image(request, self.context)
                per_scene[concept].append(mean_scores(score(output.path, scene) for output in response.images))
            if (i + 1) % 10 == 0:
                print(f"    {label}: {i + 1}/{len(scenes)} scenes", file=sys.stderr, flush=True)
        return per_scene


def score(path: Path, scene: Scene) -> dict[str, float]:
    """The oracle's agreement of a saved picture with the reference scene, and whether it kept all of `HEADLINE`."""
    with Image.open(path) as image:
        scores = image_agreement(image.convert("RGB"), scene)
    return {**scores, ALL_KEPT: float(all(scores[a] == 1.0 for a in HEADLINE))}


def rows_of(
    set_label: str, per_scene: dict[str | None, list[dict]], labels: dict[str | None, str]
) -> list[dict[str, object]]:
    """One row per condition: % per attribute and all kept, and the paired gain over no adapter in points."""
    rows = []
    for concept, scenes in per_scene.items():
        scores = mean_scores(scenes)
        row: dict[str, object] = {"set": set_label, "condition": labels[concept]}
        row |= {f"{a} %": 100 * scores[a] for a in REPORTED}
        row[f"{ALL_KEPT} %"] = 100 * scores[ALL_KEPT]
        if concept is None:
            row["gain (SE), points"] = ""
        else:
            gain, error = paired_gap(per_scene[None], scenes, ALL_KEPT)
            row["gain (SE), points"] = f"{gain:+.1f} ({error:.1f})"
        rows.append(row)
    return rows


def gain(per_scene: dict[str | None, list[dict]], concept: str) -> float:
    return paired_gap(per_scene[None], per_scene[concept], ALL_KEPT)[0]


def print_costs(bench: Bench, adapters: list[Adapter], training: list[Scene], settings: argparse.Namespace) -> None:
    """Per adapter: its training time, and the median `vary_image` call with it against the one without."""
    calls = {concept: statistics.median(timer.times) for concept, timer in bench.timers.items()}
    print_table(
        f"Cost ({settings.threads} torch thread(s), {bench.runtime.device}; {len(training)} training scenes, "
        f"batch 4; vary_image: median of {len(bench.timers[None].times)} calls of {settings.seeds_per_scene} images, "
        f"{settings.steps} steps)",
        [
            {
                "learning rate": f"{adapter.learning_rate:g}",
                "iterations": adapter.iterations,
                "train s": adapter.seconds,
                "s per iteration": adapter.iteration_seconds,
                "set-up s": adapter.seconds - adapter.iterations * adapter.iteration_seconds,
                "vary s, no adapter": calls[None],
                "vary s, adapter": calls[adapter.name],
                "adapter extra %": 100 * (calls[adapter.name] / calls[None] - 1),
            }
            for adapter in adapters
        ],
    )


# ------------------------------------------------------------------------------------------------------- main


def sweep(bench: Bench, domain: Domain, training: list[Scene], settings: argparse.Namespace) -> None:
    """One adapter per learning rate, compared on the domain's tuning scenes (never the evaluated ones)."""
    adapters = [bench.train(domain, training, rate) for rate in settings.learning_rates]
    labels: dict[str | None, str] = {None: "no adapter"}
    labels |= {adapter.name: bench.label(adapter) for adapter in adapters}
    per_scene = bench.vary(domain_scenes(domain, "tuning", settings.n), list(labels), "tuning")
    rows = rows_of("tuning scenes, in domain", per_scene, labels)
    for row, adapter in zip(rows[1:], adapters, strict=True):
        row["loss, first tenth"] = adapter.loss_at(0, 0.1)
        row["loss, last tenth"] = adapter.loss_at(0.9, 1)
    print_table(
        f"Learning rates on {domain.name}'s tuning scenes: vary_image, oracle % ({settings.n} scenes x "
        f"{settings.seeds_per_scene} seeds, {settings.steps} steps; {settings.iterations} it; {ALL_KEPT}: "
        f"{', '.join(HEADLINE)})",
        rows,
    )
    print_costs(bench, adapters, training, settings)


def evaluate(bench: Bench, domain: Domain, training: list[Scene], settings: argparse.Namespace) -> None:
    adapter = bench.train(domain, training, settings.learning_rate)
    labels: dict[str | None, str] = {None: "no adapter", adapter.name: bench.label(adapter)}
    sets = {
        "in domain": domain_scenes(domain, "evaluation", settings.n),
        "outside": outside_scenes(domain, settings.n),
    }
    results = {label: bench.vary(scenes, list(labels), label) for label, scenes in sets.items()}
    print_table(
        f"vary_image on {domain.name}: oracle agreement with the reference, % ({settings.n} scenes per set x "
        f"{settings.seeds_per_scene} seeds, {settings.steps} steps; {settings.iterations} it; {ALL_KEPT}: "
        f"{', '.join(HEADLINE)})",
        [row for label, per_scene in results.items() for row in rows_of(label, per_scene, labels)],
    )
    print_costs(bench, [adapter], training, settings)
    inside, outside = gain(results["in domain"], adapter.name), gain(results["outside"], adapter.name)
    print(
        f"adapter minus no adapter, {ALL_KEPT}: in domain {inside:+.1f} points (floor +{FLOOR:.0f}: "
        f"{'met' if inside >= FLOOR else 'NOT met'}), outside {outside:+.1f} points"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pictoprompt bench domain", description=__doc__)
    parser.add_argument("--train-n", type=int, default=500, help="Training scenes of the domain.")
    parser.add_argument("--n", type=int, default=40, help="Evaluated scenes per set (in the domain, outside it).")
    parser.add_argument("--seeds-per-scene", type=int, default=4, help="Variations per scene and condition.")
    parser.add_argument("--iterations", type=int, help="Training iterations (batch 4); default: the profile's.")
    rates = parser.add_mutually_exclusive_group()
    rates.add_argument("--learning-rate", type=float, help="The K/V deltas' rate; default: the profile's.")
    rates.add_argument(
        "--learning-rates",
        type=float,
        nargs="+",
        help="Instead of the evaluation: one adapter per rate, compared on the domain's tuning scenes.",
    )
    parser.add_argument(
        "--ab-targets",
        action="store_true",
        help="A/B training: each reference's target is another training scene of its class (colour, fill, shape "
        "and background: what a variation should keep).",
    )
    parser.add_argument(
        "--captions",
        choices=CAPTIONS,
        default="class",
        help="Training captions: the world's grammar (each detail named half the time) or 'class' (fill, colour, "
        "shape and background, always).",
    )
    parser.add_argument(
        "--caption-alignment",
        type=float,
        help="Weight of the caption-alignment loss (0: the paper's); default: the profile's.",
    )
    parser.add_argument("--prompt-learning-rate", type=float, help="The deep prompts' rate; default: the profile's.")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps per variation.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings comparable).")
    settings = parser.parse_args(argv)
    defaults = get_profile("shapes").domain_tuning
    for option in ("iterations", "learning_rate", "caption_alignment", "prompt_learning_rate"):
        if getattr(settings, option) is None:
            setattr(settings, option, getattr(defaults, option))
    if min(settings.train_n, settings.n, settings.seeds_per_scene, settings.iterations) < 1:
        parser.error("--train-n, --n, --seeds-per-scene and --iterations must be at least 1")
    if not weights_present():
        print("The shapes weights are not built; run `pictoprompt models train-shapes` first.")
        return 1
    torch.set_num_threads(settings.threads)
    torch.manual_seed(0)
    domain = STRIPED_ON_DARK
    training = domain_scenes(domain, "training", settings.train_n)
    with tempfile.TemporaryDirectory() as scratch:
        bench = Bench(Path(scratch), settings)
        if settings.learning_rates:
            sweep(bench, domain, training, settings)
        else:
            evaluate(bench, domain, training, settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
