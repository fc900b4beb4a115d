"""Learned concepts on `shapes`, as users have them: an instance the model can draw parts of, kept in new contexts.

Run: `pictoprompt bench concepts [--seeds 4] [--steps 25] [--concepts 7] [--sweep]`.

A concept is a held-out colour-shape combination with a fill (a striped green heart, an outlined yellow square: no
training picture or caption ever joined that colour and that shape), shown in 4 pictures at different grid
positions, both sizes and different backgrounds (never black, so "on a black background" is a new context). After
learning it, every row asks through the tool functions, `num_images` = --seeds, seed 0:

- `generate_image(prompt="NAME CONTEXT", concept=NAME)` for each of 6 contexts ("on the left", "on the right", "at
  the top", "large", "small", "on a black background");
- `edit_with_text(image="concept:NAME", text=CONTEXT, concept=NAME)`, the tool's default method and alpha (the
  concept's prompt that the first edit writes is passed back as `source_prompt` to the other five);
- `vary_image(images=["concept:NAME"], concept=NAME)`.

The oracle reads each picture's largest object. `identity`: its shape, colour and fill are all the concept's.
`context`: the context shows (the object on that side or at the top, of that size, or the background black).
`both`: both at once. Rows:

- SD-IPC untuned, one reference: the first picture's embedding, no tuning (a concept of 0 iterations, no deep
  prompts, so `concept:NAME` is exactly SD-IPC of that picture);
- SD-IPC-CT at the paper's settings (30 iterations, lr 5e-6) and at the profile's defaults, both by
  `customize_concept` on the 4 pictures;
- described: the profile's defaults with `description="a COLOUR SHAPE"` ("a green heart"), the colour and the kind
  a user would name, never the fill, which only the pictures show; the tool completes it with the word that best
  explains the pictures (`complete_description`, on by default), and the row prints which words it added;
- described as given: the same with `complete_description=False`, the words as the user wrote them;
- those words alone: `generate_image(prompt="a COLOUR SHAPE CONTEXT")` with no concept, the control that says
  what the description gives without the pictures (generation only);
- K/V only (Custom-Diffusion-like): the cross-attention K/V tuned for 250 iterations at the profile's learning rate on
  the text "a sks shape" (no deep prompts, no converted prompt); its `generate_image` prompts say "a sks shape"
  where the others say NAME, as Custom Diffusion is used;
- crescent (a new geometry, reported as it is): 5 crescents of varied colour at the profile's defaults; identity is
  the shape alone.

`--completion` instead judges `customize_concept`'s completion of a description alone: on the 10 concepts (tuning and
evaluated) it says which word "a COLOUR SHAPE" gains, and on 36 concepts of 4 pictures drawn with PIL (not the
project's renderer: `harness.outside_concept`, 64 to 128 px, anywhere, of any size and line width, on other
backgrounds) whether the word is the fill, none, 'solid' for a pattern or the other pattern, without and with the
profile's alignment.

Settings were chosen with `--sweep`, on other concepts (`TUNING_CONCEPTS`) drawn from other seeds than the evaluated
ones (`EVALUATION_CONCEPTS`). A last table times `vary_image` and `edit_with_text` with and without a concept.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lab.benchmarks.harness import DictImages, Timer, outside_concept, print_table
from lab.shapes.oracle import SceneReading, parse_scene
from lab.shapes.world import held_out_scenes
from pictoprompt.configs import ConceptTuningConfig
from pictoprompt.methods.concept_description import complete_description
from pictoprompt.methods.concept_tuning import tune_concept
from pictoprompt.methods.concept_weights import ConceptWeights, swapped_projections
from pictoprompt.methods.sd_ipc import ImageToPrompt
from pictoprompt.methods.tuning import TuningResult, denoising_loss, encode_latents, optimise, random_augmentation
from pictoprompt.models.concepts import ConceptStore
from pictoprompt.models.profiles import get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.models.shapes import weights_present
from pictoprompt.models.shapes.scenes import POSITIONS, SIZES, Scene, SceneObject, render_scene
from pictoprompt.progress import Progress
from pictoprompt.server.assets import AssetStore
from pictoprompt.tools.base import CONCEPT_REF_PREFIX, ToolContext
from pictoprompt.tools.customize_concept import CustomizeConceptRequest, concept_card, customize_concept
from pictoprompt.tools.edit_with_text import EditWithTextRequest, edit_with_text
from pictoprompt.tools.generate_image import GenerateImageRequest, generate_image
from pictoprompt.tools.vary_image import VaryImageRequest, vary_image

UNTUNED = ConceptTuningConfig(iterations=0, num_prompts=0)
"""SD-IPC as it is: no steps, no deep prompts."""

Concept = tuple[str, str, str]
"""(colour, shape, fill) of a held-out colour-shape combination; stars are always solid in this world."""

EVALUATION_CONCEPTS: tuple[Concept, ...] = (
    ("green", "heart", "striped"),
    ("green", "heart", "solid"),
    ("yellow", "square", "outlined"),
    ("yellow", "square", "solid"),
    ("blue", "cross", "striped"),
    ("blue", "cross", "outlined"),
    ("purple", "star", "solid"),
)
TUNING_CONCEPTS: tuple[Concept, ...] = (
    ("green", "heart", "outlined"),
    ("yellow", "square", "striped"),
    ("blue", "cross", "solid"),
)
EVALUATION_SEED = "concepts-evaluation"
TUNING_SEED = "concepts-tuning"
REFERENCES = 4
REFERENCE_BACKGROUNDS = ("white", "white", "gray", "pink", "orange", "yellow", "blue", "green", "red", "purple")
"""Never black: "on a black background" is one of the new contexts."""

CONTEXTS: dict[str, Callable[[SceneReading], bool]] = {
    "on the left": lambda reading: reading.main is not None and "left" in reading.main.position,
    "on the right": lambda reading: reading.main is not None and "right" in reading.main.position,
    "at the top": lambda reading: reading.main is not None and "top" in reading.main.position,
    "large": lambda reading: reading.main is not None and reading.main.size == "large",
    "small": lambda reading: reading.main is not None and reading.main.size == "small",
    "on a black background": lambda reading: reading.background == "black",
}
"""Each context and whether a picture shows it; a side or the top counts in any of its three grid cells."""

SWEEP = ((30, 5e-6, None), (30, 1e-4, None), (100, 1e-4, None), (100, 1e-3, None), (30, 1e-4, 1e-3), (30, 1e-4, 1e-2))
"""(iterations, learning rate, the deep prompts' learning rate or None for the same) of `--sweep`."""
ROWS = ("untuned", "paper", "defaults", "described", "given", "words", "kv", "crescent", "speed")
BASELINE_WORDS = "a sks shape"
BASELINE_ITERATIONS = 250


def references(concept: Concept, seed: str, count: int = REFERENCES) -> list[Image.Image]:
    """`count` pictures of the concept: distinct grid positions, both sizes in turn, backgrounds other than black
    and the concept's colour."""
    colour, shape, fill = concept
    rng = random.Random(f"{seed}-{colour}-{shape}-{fill}")
    positions = rng.sample(POSITIONS, count)
    backgrounds = [c for c in REFERENCE_BACKGROUNDS if c != colour]
    return [
        render_scene(Scene(rng.choice(backgrounds), (SceneObject(shape, colour, SIZES[i % 2], positions[i], fill),)))
        for i in range(count)
    ]


def crescent_references() -> list[Image.Image]:
    return [render_scene(scene) for scene in held_out_scenes("crescent", 5)]


def described(concept: Concept) -> str:
    """What a user would say of the concept: its colour and kind, not its fill."""
    colour, shape, _ = concept
    return f"a {colour} {shape}"


@dataclass
class Learned:
    """A concept in the store, the words `generate_image` prompts say for it, and how it is judged."""

    name: str
    words: str
    concept: Concept | None
    """None for the crescent, judged on its shape alone."""
    seconds: float
    stored: bool = True
    """False for words alone: nothing learned, prompts carry no concept."""

    def identity(self, reading: SceneReading) -> bool:
        main = reading.main
        if main is None:
            return False
        if self.concept is None:
            return main.shape == "crescent"
        return (main.colour, main.shape, main.fill) == self.concept


class Bench:
    def __init__(self, folder: Path, seeds: int, steps: int) -> None:
        self.runtime = Runtime(get_profile("shapes"))
        self.pipeline, self.clip = self.runtime.pipeline(), self.runtime.clip()
        self.images = DictImages()
        self.store = ConceptStore(folder / "concepts")
        self.context = ToolContext(self.runtime, AssetStore(folder / "assets"), self.images, concepts=self.store)
        self.seeds, self.steps = seeds, steps
        self.defaults = self.runtime.profile.concept_tuning
        self.count = 0
        self.at_defaults: dict[Concept | None, Learned] = {}
        """Concepts learned at the profile's defaults, by concept: the `single` row asks them again."""

    def with_candidates(self, count: int) -> None:
        """Ask from now on with `count` candidates per picture of a concept (`candidates_per_picture`)."""
        profile = self.runtime.profile
        tuning = profile.concept_tuning.model_copy(update={"candidates_per_picture": count})
        self.runtime.profile = profile.model_copy(update={"concept_tuning": tuning})

    def at_profile_defaults(self, concept: Concept | None, pictures: list[Image.Image]) -> Learned:
        """`customize` at the profile's defaults, once per concept."""
        if concept not in self.at_defaults:
            self.at_defaults[concept] = self.customize(concept, pictures, None, None)
        return self.at_defaults[concept]

    def _name(self) -> str:
        self.count += 1
        return f"concept-{self.count}"

    def _add_references(self, pictures: list[Image.Image]) -> list[str]:
        refs = []
        for picture in pictures:
            ref = f"reference-{len(self.images.images)}"
            self.images.images[ref] = picture
            refs.append(ref)
        return refs

    # ---------------------------------------------------------------------------------------------- learning

    def customize(
        self,
        concept: Concept | None,
        pictures: list[Image.Image],
        iterations: int | None,
        learning_rate: float | None,
        description: str | None = None,
        complete: bool = True,
    ) -> Learned:
        """SD-IPC-CT through the tool; None settings are the profile's defaults."""
        name = self._name()
        request = CustomizeConceptRequest(
            name=name,
            images=self._add_references(pictures),
            iterations=iterations,
            learning_rate=learning_rate,
            description=description,
            complete_description=complete,
        )
        started = time.perf_counter()
        summary = customize_concept(request, self.context)
        if summary.completed_with is not None:
            print(f"  {description!r} of {concept} completed to {summary.description!r}", flush=True)
        return Learned(name, name, concept, time.perf_counter() - started)

    def tune(self, concept: Concept | None, pictures: list[Image.Image], **options: object) -> Learned:
        """SD-IPC-CT with `tune_concept`'s options, some of which the tool does not take, stored as the tool stores
        it."""
        started = time.perf_counter()
        config = ConceptTuningConfig(neutral_fit_steps=self.defaults.neutral_fit_steps, **options)
        result = tune_concept(self.pipeline, self.clip, pictures, config)
        seconds = time.perf_counter() - started
        name = self._save(result, pictures)
        return Learned(name, name, concept, seconds)

    def _save(self, result: TuningResult, pictures: list[Image.Image]) -> str:
        name = self._name()
        self.store.save(concept_card(name, "concept", result, self.runtime), result.weights.to_tensors(), pictures)
        return name

    def untuned(self, concept: Concept, pictures: list[Image.Image]) -> Learned:
        """Untuned SD-IPC of the first picture alone, stored as a concept so it is asked the same way."""
        result = tune_concept(self.pipeline, self.clip, pictures[:1], UNTUNED)
        name = self._save(result, pictures[:1])
        return Learned(name, name, concept, 0.0)

    def words_alone(self, concept: Concept, pictures: list[Image.Image]) -> Learned:
        """No concept: the prompts say the description's words where the others say NAME."""
        return Learned("", described(concept), concept, 0.0, stored=False)

    def kv_only(self, concept: Concept, pictures: list[Image.Image]) -> Learned:
        """Custom-Diffusion-like: K/V deltas only, denoising each picture under the text "a sks shape"."""
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(0)
        weights = ConceptWeights.initial(self.pipeline.unet, self.clip, 0, generator)
        converter = ImageToPrompt.cached(self.clip, self.pipeline)
        with torch.no_grad():
            prompt = converter.text_states([BASELINE_WORDS])[0].expand(len(pictures), -1, -1)

        def loss_at(iteration: int) -> torch.Tensor:
            views = [random_augmentation(picture, generator) for picture in pictures]
            return denoising_loss(self.pipeline, encode_latents(self.pipeline, views), prompt, generator)

        with swapped_projections(self.pipeline.unet, weights.kv_deltas):
            losses = optimise(
                weights.parameters(), loss_at, BASELINE_ITERATIONS, self.defaults.learning_rate, Progress()
            )
        seconds = time.perf_counter() - started
        # The stored mean embedding is the untuned SD-IPC one (no deep prompts): what `concept:NAME` stands for.
        untuned = tune_concept(self.pipeline, self.clip, pictures, UNTUNED)
        untuned.weights, untuned.losses = weights, losses
        untuned.hyperparameters = {
            "method": "K/V only",
            "iterations": BASELINE_ITERATIONS,
            "learning_rate": self.defaults.learning_rate,
        }
        return Learned(self._save(untuned, pictures), BASELINE_WORDS, concept, seconds)

    # ---------------------------------------------------------------------------------------------- asking

    def _read(self, outputs: list) -> list[SceneReading]:
        readings = []
        for output in outputs:
            with Image.open(output.path) as image:
                readings.append(parse_scene(image.convert("RGB")))
        return readings

    def ask(self, learned: Learned, edits: bool = True) -> dict[str, list[bool]]:
        """Every tool call of one concept (with `edits`, edit_with_text too): outcomes keyed '<tool> <measure>'."""
        common = {"num_images": self.seeds, "steps": self.steps, "seed": 0, "concept": learned.name or None}
        outcome: dict[str, list[bool]] = {}

        def record(tool: str, readings: list[SceneReading], shows: Callable[[SceneReading], bool] | None) -> None:
            for reading in readings:
                kept = learned.identity(reading)
                outcome.setdefault(f"{tool} identity", []).append(kept)
                if shows is not None:
                    outcome.setdefault(f"{tool} context", []).append(shows(reading))
                    outcome.setdefault(f"{tool} both", []).append(kept and shows(reading))

        def timed(tool: str, call: Callable[[], Any]) -> Any:
            started = time.perf_counter()
            result = call()
            outcome.setdefault(f"{tool} s a picture", []).append((time.perf_counter() - started) / self.seeds)
            return result

        source_prompt = None
        for text, shows in CONTEXTS.items():
            request = GenerateImageRequest(prompt=f"{learned.words} {text}", **common)
            generated = timed("generate", lambda request=request: generate_image(request, self.context))
            record("generate", self._read(generated.images), shows)
            if not edits or not learned.stored:
                continue
            # The concept's prompt, once the first edit has written it, comes back with the later edits as an
            # assistant would send it (the default method would otherwise invert the same concept six times).
            edit = EditWithTextRequest(
                image=CONCEPT_REF_PREFIX + learned.name, text=text, source_prompt=source_prompt, **common
            )
            edited = timed("edit", lambda edit=edit: edit_with_text(edit, self.context))
            source_prompt = edited.source_prompt
            record("edit", self._read(edited.images), shows)
        if not learned.stored:
            return outcome
        varied = vary_image(VaryImageRequest(images=[CONCEPT_REF_PREFIX + learned.name], **common), self.context)
        record("vary", self._read(varied.images), None)
        return outcome


COLUMNS = [
    "row",
    "generate identity",
    "generate context",
    "generate both",
    "edit identity",
    "edit context",
    "edit both",
    "vary identity",
    "tune s",
    "generate s a picture",
    "edit s a picture",
]


def summarise(label: str, outcomes: list[dict[str, list[bool]]], learned: list[Learned]) -> dict[str, object]:
    """Percentages over every picture of every concept of a row, and the mean tuning time."""
    row: dict[str, object] = {"row": label}
    for key in COLUMNS[1:]:
        values = [value for outcome in outcomes for value in outcome.get(key, [])]
        # Shares of pictures in percent; the times (seconds) as they are.
        row[key] = (1 if key.endswith(" s a picture") else 100) * statistics.fmean(values) if values else float("nan")
    row["tune s"] = statistics.fmean(item.seconds for item in learned)
    return row


def evaluate(
    bench: Bench,
    label: str,
    learn: Callable[[Concept | None, list[Image.Image]], Learned],
    sets: list,
    edits: bool = True,
    candidates: int | None = None,
) -> dict[str, object]:
    """One row; with `candidates`, the concepts are asked with that many candidates per picture (else the
    profile's)."""
    learned = [learn(concept, pictures) for concept, pictures in sets]
    bench.with_candidates(candidates or bench.defaults.candidates_per_picture)
    outcomes = []
    for item in learned:
        outcomes.append(bench.ask(item, edits))
        # The row so far after each concept, so a run stopped early still says what it measured.
        row = summarise(label, outcomes, learned)
        print(f"  {label}, {len(outcomes)}/{len(learned)} concepts: {row}", flush=True)
    return row


def speed_table(bench: Bench, learned: Learned, pictures: list[Image.Image], repeats: int) -> list[dict[str, object]]:
    """Median wall time of `vary_image` and `edit_with_text` on the same picture, with and without the concept."""
    reference = bench._add_references(pictures[:1])[0]
    common = {"num_images": 4, "steps": bench.steps, "seed": 0}
    calls = {
        "vary_image": lambda concept: vary_image(
            VaryImageRequest(images=[reference], concept=concept, **common), bench.context
        ),
        "edit_with_text": lambda concept: edit_with_text(
            EditWithTextRequest(image=reference, text="on the left", concept=concept, **common), bench.context
        ),
    }
    rows = []
    for tool, call in calls.items():
        timers = {None: Timer(), learned.name: Timer()}
        for concept in timers:
            call(concept)  # warm-up: caches, the conversion matrix
        for _ in range(repeats):  # interleaved, so drift in the machine's load hits both alike
            for concept, timer in timers.items():
                with timer:
                    call(concept)
        plain, with_concept = (statistics.median(timer.times) for timer in timers.values())
        rows.append(
            {
                "tool": tool,
                "without s": plain,
                "with concept s": with_concept,
                "extra %": 100 * (with_concept / plain - 1),
            }
        )
    return rows


DRAWN_CONCEPTS = [
    (shape, colour, fill)
    for shape in ("square", "circle", "heart", "cross")
    for colour in ("red", "blue", "green")
    for fill in ("solid", "outlined", "striped")
]
"""36 concepts drawn with PIL (`harness.outside_concept`), every fill of four shapes in three colours."""
DRAWN_VERDICTS = {
    "right fill": "right",
    "no word": "none",
    "'solid' for a pattern": "solid",
    "the other pattern": "wrong",
}
"""How a drawn concept's completion went. A wrong 'solid' draws what the words alone draw (the shapes generator
draws 'a COLOUR SHAPE' solid 86% of the time); the other pattern changes the concept."""


def completion_study(bench: Bench) -> None:
    """Which word `customize_concept` adds to "a COLOUR SHAPE": the bench's concepts, then pictures drawn with PIL."""
    tuning = bench.runtime.profile.concept_description
    words = tuning.completion_words or []
    for concept, seed in [
        *((c, TUNING_SEED) for c in TUNING_CONCEPTS),
        *((c, EVALUATION_SEED) for c in EVALUATION_CONCEPTS),
    ]:
        result = complete_description(
            bench.pipeline,
            bench.clip,
            references(concept, seed),
            described(concept),
            words,
            tuning,
        )
        best = sorted(result.gains.items(), key=lambda item: item[1])[:2]
        print(f"  {concept}: {result.description!r}; best gains {[(w, round(100 * g, 1)) for w, g in best]} %")
    sets = [(concept, outside_concept(*concept, count=REFERENCES, seed="completion")) for concept in DRAWN_CONCEPTS]
    rows = []
    for alignment in sorted({0, tuning.completion_alignment}):
        verdicts = []
        for (shape, colour, fill), pictures in sets:
            config = tuning.model_copy(update={"completion_alignment": alignment})
            added = complete_description(
                bench.pipeline, bench.clip, pictures, f"a {colour} {shape}", words, config
            ).added
            verdicts.append(
                "none" if added is None else "right" if added == fill else "solid" if added == "solid" else "wrong"
            )
        rows.append(
            {
                "alignment (px)": alignment,
                **{column: verdicts.count(verdict) for column, verdict in DRAWN_VERDICTS.items()},
            }
        )
    print_table(f"Completion of 'a COLOUR SHAPE' on {len(sets)} concepts of 4 pictures drawn with PIL", rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pictoprompt bench concepts", description=__doc__)
    parser.add_argument("--seeds", type=int, default=4, help="Pictures per tool call (seeds 0..N-1).")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps per picture.")
    parser.add_argument("--concepts", type=int, default=len(EVALUATION_CONCEPTS), help="Evaluated concepts.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed calls per tool and condition.")
    parser.add_argument(
        "--rows",
        nargs="+",
        default=[*ROWS],
        choices=ROWS,
        help="Which rows (and the speed table) to run; separate runs can share a machine's cores.",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="Instead of the evaluation: SD-IPC-CT over a grid of settings on the tuning concepts (no edits).",
    )
    parser.add_argument(
        "--completion",
        action="store_true",
        help="Instead of the evaluation: the word the tool adds to a description, on the concepts and on drawn ones.",
    )
    parser.add_argument(
        "--candidates",
        type=int,
        nargs="+",
        help="The defaults row once per count of candidates a picture, the concepts learned once (default: the "
        "profile's count).",
    )
    parser.add_argument(
        "--tuning-concepts",
        action="store_true",
        help="Ask the rows of the tuning concepts instead of the evaluated ones (to choose settings on).",
    )
    args = parser.parse_args(argv)
    if not weights_present():
        print("The shapes weights are not built; run `pictoprompt models train-shapes` first.")
        return 1
    torch.set_num_threads(1)  # a shared CPU: one thread keeps the timings comparable
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        bench = Bench(Path(scratch), args.seeds, args.steps)
        if args.completion:
            completion_study(bench)
            return 0
        if args.sweep:
            sets = [(concept, references(concept, TUNING_SEED)) for concept in TUNING_CONCEPTS]
            rows = [
                evaluate(
                    bench,
                    f"SD-IPC-CT {n} it, lr {lr:g}, deep prompts' lr {prompt_lr or lr:g}",
                    lambda c, p, n=n, lr=lr, prompt_lr=prompt_lr: bench.tune(
                        c, p, iterations=n, learning_rate=lr, prompt_learning_rate=prompt_lr
                    ),
                    sets,
                    edits=False,
                )
                for n, lr, prompt_lr in SWEEP
            ]
            print_table(f"Sweep on the tuning concepts ({len(sets)} concepts x {args.seeds} seeds)", rows, COLUMNS)
            return 0
        sets = [(concept, references(concept, EVALUATION_SEED)) for concept in EVALUATION_CONCEPTS[: args.concepts]]
        if args.tuning_concepts:
            sets = [(concept, references(concept, TUNING_SEED)) for concept in TUNING_CONCEPTS]
        candidates = args.candidates or [bench.defaults.candidates_per_picture]
        tuning = bench.defaults
        defaults = f"{tuning.iterations} it, lr {tuning.learning_rate:g}, deep prompts' lr when described " + (
            f"{tuning.aligned_prompt_learning_rate or tuning.learning_rate:g}"
        )
        print(
            f"{len(sets)} concepts x {len(CONTEXTS)} contexts x {args.seeds} seeds, {args.steps} steps; profile "
            f"defaults {defaults}",
            flush=True,
        )
        evaluations: dict[str, tuple[str, Callable[[Concept | None, list[Image.Image]], Learned], list]] = {
            **{
                f"defaults {count}": (
                    f"SD-IPC-CT profile defaults ({defaults}), {count} candidate(s) a picture",
                    bench.at_profile_defaults,
                    sets,
                )
                for count in candidates
            },
            "untuned": ("SD-IPC untuned, one reference", bench.untuned, sets),
            "paper": ("SD-IPC-CT paper (30 it, lr 5e-06)", lambda c, p: bench.customize(c, p, 30, 5e-6), sets),
            "described": (
                f"SD-IPC-CT profile defaults, described as 'a COLOUR SHAPE' ({defaults})",
                lambda c, p: bench.customize(c, p, None, None, described(c)),
                sets,
            ),
            "given": (
                f"the same, the description as given (complete_description=False; {defaults})",
                lambda c, p: bench.customize(c, p, None, None, described(c), complete=False),
                sets,
            ),
            "words": ("those words alone, no concept (generate only)", bench.words_alone, sets),
            "kv": (f"K/V only, {BASELINE_ITERATIONS} it, lr {bench.defaults.learning_rate:g}", bench.kv_only, sets),
            "crescent": (
                f"crescent (new geometry), profile defaults ({defaults})",
                lambda c, p: bench.customize(None, crescent_references(), None, None),
                [(None, [])],
            ),
        }
        rows = [
            evaluate(bench, *evaluations[key], candidates=count)
            for row in args.rows
            for key, count in ([(f"defaults {n}", n) for n in candidates] if row == "defaults" else [(row, None)])
            if key in evaluations
        ]
        if rows:
            print_table("Concepts on shapes (oracle, % of pictures)", rows, COLUMNS)
        if "speed" in args.rows:
            speed_concept, speed_pictures = sets[0]
            learned = bench.customize(speed_concept, speed_pictures, None, None)
            print(f"  customize_concept at the profile's defaults: {learned.seconds:.1f} s", flush=True)
            with_words = bench.customize(speed_concept, speed_pictures, None, None, described(speed_concept))
            print(f"  the same with a description, completed: {with_words.seconds:.1f} s", flush=True)
            print_table(
                f"Cost of a concept (median of {args.repeats}, 4 pictures, {args.steps} steps, 1 thread, shared CPU)",
                speed_table(bench, learned, speed_pictures, args.repeats),
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
