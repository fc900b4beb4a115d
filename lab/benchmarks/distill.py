"""`distill_prompt` on `shapes`: does the short prompt keep the long one's objects, colours and background?

Run: `pictoprompt bench distill [--n 60] [--methods keep_words paper] [--steps 25]`.

Captions of held-out scenes (`held_out_scenes`, half single objects, half two; the world's grammar at detail 0.6,
seed "distill-bench") are wrapped in fluff the project never tuned on (`FLUFF`, none of `vgd.py`'s `FILLER`): a
prefix and four fluff phrases after the caption. Each is distilled at the tool's default length by each method, with
the profile's dictionary: `prune` (ours, the `shapes` default: `pruning.prune`, as long as the content needs),
`keep_words` (VGD whose short prompt may only leave words out of the long one, `distill(keep_words=True)`, at 30 % of
the CLIP tokens) and `paper` (the paper's free VGD distillation, at 30 %). "s/prompt" is wall time, "CPU s/prompt"
the process's CPU time (`time.process_time`, every thread) per prompt.

Per method: the share of short prompts that parse under the world's grammar and name exactly the caption's objects
(shape and colour of each, as a multiset) and background ("exact"); the share naming an object or colour the caption
does not ("invented"); and the share of regenerated pictures (one seed per caption, the same for every prompt) that
the oracle finds showing every object's shape and colour the caption names and its background ("regen ok"), with
the caption's own pictures as the reference row.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter

from lab.benchmarks.grammar import ParsedCaption, parse_caption
from lab.benchmarks.harness import Timer, image_agreement, print_table
from lab.benchmarks.vgd import FILLER, render
from lab.shapes.world import caption_scene, held_out_scenes, random_scene
from pictoprompt.methods.pruning import prune, salience
from pictoprompt.methods.vgd import distill
from pictoprompt.models.profiles import get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.models.shapes.scenes import COLOURS, SHAPES

FLUFF = (
    "ultra realistic",
    "dramatic lighting",
    "unreal engine",
    "concept art",
    "hyperdetailed",
    "volumetric light",
    "depth of field",
    "digital painting",
    "insanely detailed",
    "golden hour",
    "crisp edges",
    "bokeh",
)
PREFIXES = ("a stunning", "an epic, hyperdetailed", "breathtaking", "a gorgeous cinematic")
METHODS = ("prune", "keep_words", "paper")
"""`prune`: `pruning.prune` at its content-fitting length; the two VGD methods at the tool's 30 % budget."""


def fluffed_captions(n: int) -> list[tuple[str, str]]:
    """(caption, fluffed prompt) for `n` held-out scenes, half with one object and half with two."""
    rng = random.Random("distill-bench")
    scenes = held_out_scenes("single", n - n // 2) + held_out_scenes("two", n // 2)
    pairs = []
    for scene in scenes:
        caption = caption_scene(scene, rng, detail=0.6)
        pairs.append((caption, f"{rng.choice(PREFIXES)} {caption}, {', '.join(rng.sample(FLUFF, 4))}"))
    return pairs


CALIBRATION_PREFIXES = ("a beautiful", "an amazing, intricate", "masterful", "a detailed professional")
"""The calibration's prefixes, in the forms of the benchmark's (an article, a comma) with other words."""


def calibration_prompts(n: int) -> list[tuple[str, str]]:
    """(caption, fluffed prompt) for `n` training scenes (not held out), wrapped in `vgd.py`'s `FILLER`."""
    rng = random.Random("distill-calibration")
    pairs = []
    for _ in range(n):
        caption = caption_scene(random_scene(rng), rng, detail=0.6)
        pairs.append((caption, f"{rng.choice(CALIBRATION_PREFIXES)} {caption}, {', '.join(rng.sample(FILLER, 4))}"))
    return pairs


def calibrate(runtime: Runtime, n: int) -> int:
    """`prune`'s step 2 on `n` fluffed training captions: the salience of each dictionary word (colours and shapes
    must stay above `WORDLESS_SALIENCE`), and how many captions come back exactly."""
    clip, llm = runtime.clip(), runtime.llm()
    words = runtime.dictionary_words() or []
    saliences = salience(clip, [*words, ","])
    content = [word for word in saliences if word in COLOURS + SHAPES]
    must_stay = min(saliences[word] for word in content)
    rows = [
        {"words": kind, "salience": ", ".join(f"{w} {saliences[w]:.3f}" for w in sorted(group, key=saliences.get))}
        for kind, group in (("colours, shapes", content), ("others", [w for w in saliences if w not in content]))
    ]
    print_table(f"Salience of the dictionary's words (smallest colour or shape: {must_stay:.3f})", rows)
    pairs, back = calibration_prompts(n), 0
    for caption, long in pairs:
        short = prune(llm, clip, long, dictionary=frozenset(words)).text
        back += short == caption
        print(
            f"  {long!r} -> {short!r}{'' if short == caption else '  (not the caption)'}", file=sys.stderr, flush=True
        )
    print(f"prune gave back {back} of {n} fluffed training captions exactly ({100 * back / n:.1f} %)")
    return 0


def named(parsed: ParsedCaption | None) -> tuple[Counter, str | None] | None:
    if parsed is None:
        return None
    return Counter((obj.shape, obj.colour) for obj in parsed.objects), parsed.background


def invented(short: ParsedCaption | None, caption: ParsedCaption) -> bool:
    if short is None:
        return False
    shapes, colours = {o.shape for o in caption.objects}, {o.colour for o in caption.objects} | {caption.background}
    return any(o.shape not in shapes or o.colour not in colours for o in short.objects) or (
        short.background is not None and short.background != caption.background
    )


def regen_ok(image: object, caption: str) -> bool:
    return all(value == 1.0 for value in image_agreement(image, caption, ("shape", "colour")).values())


def shorten(method: str, runtime: Runtime, long: str) -> str:
    clip, llm, dictionary = runtime.clip(), runtime.llm(), runtime.dictionary_words()
    words = frozenset(dictionary) if dictionary is not None else None
    if method == "prune":
        return prune(llm, clip, long, dictionary=words).text
    return distill(llm, clip, long, keep_words=method == "keep_words", dictionary=words).best.text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pictoprompt bench distill", description=__doc__)
    parser.add_argument("--profile", default="shapes")
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--calibrate", action="store_true", help="calibrate prune on training captions instead")
    settings = parser.parse_args(argv)
    runtime = Runtime(get_profile(settings.profile))
    if settings.calibrate:
        return calibrate(runtime, settings.n)
    pairs = fluffed_captions(settings.n)
    captions = [caption for caption, _ in pairs]
    seeds = list(range(len(pairs)))
    caption_images = render(runtime, captions, seeds, settings.steps)
    rows = [
        {
            "prompt": "caption (reference)",
            "exact %": 100.0,
            "invented %": 0.0,
            "regen ok %": 100 * sum(map(regen_ok, caption_images, captions)) / len(pairs),
        }
    ]
    for method in settings.methods:
        timer, shorts, cpu = Timer(), [], time.process_time()
        for _, long in pairs:
            with timer:
                shorts.append(shorten(method, runtime, long))
            print(f"  {method}: {long!r} -> {shorts[-1]!r}", file=sys.stderr, flush=True)
        cpu = (time.process_time() - cpu) / len(pairs)
        parsed = [
            (parse_caption(short), parse_caption(caption)) for short, caption in zip(shorts, captions, strict=True)
        ]
        images = render(runtime, shorts, seeds, settings.steps)
        rows.append(
            {
                "prompt": method if method == "prune" else f"{method} (30 %)",
                "exact %": 100 * sum(named(s) is not None and named(s) == named(c) for s, c in parsed) / len(pairs),
                "invented %": 100 * sum(invented(s, c) for s, c in parsed) / len(pairs),
                "regen ok %": 100 * sum(map(regen_ok, images, captions)) / len(pairs),
                "s/prompt": timer.mean,
                "CPU s/prompt": cpu,
            }
        )
    print_table(f"Distillation of {len(pairs)} fluffed held-out captions ({settings.profile})", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
