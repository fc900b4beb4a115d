"""Does the `shapes` generator draw the background it is asked for, in every object colour x background colour?

Run: `pictoprompt bench backgrounds [--samples 6] [--steps 25] [--guidance 7.5] [--sheet DIR]`.

Every cell of the palette's 10 x 10 table less its diagonal (an object never shares its background's colour in this
world): "a {colour} {shape} on a {background} background", `--samples` pictures per cell, each a different
training shape (in turn, from a cell-dependent start) and its own seed, sampled as `generate_image` samples at its
defaults (the same `generate`, 25 DDIM steps, guidance 7.5, one generator per seed). The oracle reads each picture's
background (the commonest palette colour along its border). Printed: the rate per background colour (the row), per
object colour, overall, the cells under 50 %, and the full table. `--sheet DIR` also writes one contact sheet per
background row (8x upscaled) to look at.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from PIL import Image

from lab.benchmarks.harness import print_table
from lab.shapes.oracle import parse_scene
from pictoprompt.methods.generation import Sample, encode_text_prompt, generate
from pictoprompt.models.profiles import get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.models.shapes.scenes import COLOURS, TRAIN_SHAPES
from pictoprompt.progress import Progress

BATCH = 18
"""Pictures per call of the sampler: one background row's cells at a time, in chunks."""


def prompt_for(colour: str, shape: str, background: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} on a {background} background"


def cells(samples: int, rows: tuple[str, ...] = COLOURS) -> list[tuple[str, str, str, int]]:
    """(object colour, shape, background, seed) of every picture of the background rows `rows`: each cell cycles
    through the shapes from its own start, so every shape meets every colour and background, and seed k for its
    k-th picture."""
    items = []
    for b, background in enumerate(COLOURS):
        for c, colour in enumerate(COLOURS):
            if colour == background or background not in rows:
                continue
            for k in range(samples):
                items.append((colour, TRAIN_SHAPES[(b + c + k) % len(TRAIN_SHAPES)], background, k))
    return items


def sample(pipeline, items: list[tuple[str, str, str, int]], steps: int, guidance: float) -> list[Image.Image]:
    images = []
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    for begin in range(0, len(items), BATCH):
        chunk = items[begin : begin + BATCH]
        states = [
            encode_text_prompt(pipeline, prompt_for(colour, shape, background))
            for colour, shape, background, _ in chunk
        ]
        prompt = torch.cat([s[0] for s in states])
        negative = torch.cat([s[1] for s in states])
        seeds = [seed for *_, seed in chunk]
        images += generate(pipeline, Sample(prompt, negative, seeds, guidance, Progress()), steps, size, size)
    return images


def table(items: list[tuple[str, str, str, int]], readings: list[str]) -> dict[tuple[str, str], list[bool]]:
    outcome: dict[tuple[str, str], list[bool]] = {}
    for (colour, _, background, _), read in zip(items, readings, strict=True):
        outcome.setdefault((background, colour), []).append(read == background)
    return outcome


def report(outcome: dict[tuple[str, str], list[bool]], misread: dict[str, dict[str, int]]) -> None:
    def rate(values: list[bool]) -> float:
        return 100 * statistics.fmean(values)

    present = [
        background for background in COLOURS if (background, next(c for c in COLOURS if c != background)) in outcome
    ]
    rows = []
    for background in present:
        row_values = [v for (b, _), values in outcome.items() if b == background for v in values]
        worst = sorted(misread[background].items(), key=lambda item: -item[1])[:2]
        rows.append(
            {
                "background": background,
                "followed %": rate(row_values),
                "worst cell %": min(rate(values) for (b, _), values in outcome.items() if b == background),
                "drawn instead": ", ".join(f"{name} {count}" for name, count in worst) or "-",
            }
        )
    everything = [v for values in outcome.values() for v in values]
    rows.append({"background": "all", "followed %": rate(everything)})
    print_table("Background followed, per background colour (row)", rows)
    by_object = [
        {
            "object colour": colour,
            "followed %": rate([v for (_, c), values in outcome.items() if c == colour for v in values]),
        }
        for colour in COLOURS
    ]
    print_table("Background followed, per object colour", by_object)
    full = []
    for background in present:
        row: dict[str, object] = {"bg \\ object": background}
        for colour in COLOURS:
            row[colour] = "" if colour == background else round(rate(outcome[(background, colour)]))
        full.append(row)
    print_table("Cells (% of pictures with the named background)", full)
    weak = [(b, c, rate(values)) for (b, c), values in outcome.items() if rate(values) < 50]
    print("Cells under 50 %:", ", ".join(f"{c} on {b} {r:.0f}" for b, c, r in sorted(weak)) or "none")


def contact_sheets(folder: Path, items: list[tuple[str, str, str, int]], images: list[Image.Image]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for background in sorted({b for _, _, b, _ in items}):
        row = [image for (_, _, b, _), image in zip(items, images, strict=True) if b == background]
        columns = max(1, len(row) // 9)  # one line per object colour, its samples across
        sheet = Image.new("RGB", (columns * 64, 9 * 64), (255, 255, 255))
        for index, image in enumerate(row):
            sheet.paste(image.resize((64, 64), Image.NEAREST), ((index % columns) * 64, (index // columns) * 64))
        sheet.save(folder / f"background-{background}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pictoprompt bench backgrounds", description=__doc__)
    parser.add_argument("--samples", type=int, default=6, help="Pictures per cell (shapes in turn, seeds 0..N-1).")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (generate_image's default).")
    parser.add_argument("--guidance", type=float, default=7.5, help="Guidance scale (generate_image's default).")
    parser.add_argument("--rows", nargs="+", default=list(COLOURS), choices=COLOURS, help="Background rows to run.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a shared CPU: 1).")
    parser.add_argument("--generator", type=Path, default=None, help="Another generator directory to judge.")
    parser.add_argument("--sheet", type=Path, default=None, help="Write a contact sheet per background row here.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    profile = get_profile("shapes")
    if args.generator is not None:  # a candidate generator (a training run's export), judged the same way
        profile = profile.model_copy(update={"generator": str(args.generator.resolve())})
    pipeline = Runtime(profile).pipeline()
    items = cells(args.samples, tuple(args.rows))
    images = sample(pipeline, items, args.steps, args.guidance)
    readings = [parse_scene(image).background for image in images]
    misread: dict[str, dict[str, int]] = {b: {} for b in COLOURS}
    for (_, _, background, _), read in zip(items, readings, strict=True):
        if read != background:
            misread[background][read] = misread[background].get(read, 0) + 1
    print(f"{len(items)} pictures, {args.samples} per cell, {args.steps} steps, guidance {args.guidance}")
    report(table(items, readings), misread)
    if args.sheet is not None:
        contact_sheets(args.sheet, items, images)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
