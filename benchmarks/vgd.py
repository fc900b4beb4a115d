"""VGD on `shapes`: are the prompts right, readable, and fast, and does the key/value cache pay?

Run: `pictoprompt bench vgd [--n 200] [--distill-n 100] [--max-tokens 32] [--profile shapes]`. Three tables;
`--kinds` and `--skip` run a part of them, so a long run can be split across processes:

1. Inversion on held-out scenes (a third each: single object, two objects, held-out colour-shape combinations):
   how many ground-truth attributes the prompt names (oracle prompt parser), the oracle's agreement between the
   scene and an image regenerated from the prompt (same seed for every method), CLIP image-text similarity,
   perplexity (harness: SmolLM2, no context) and seconds per inversion; for VGD, its `llm_only` and `clip_only`
   ablations (paper Table 2), a PEZ-style baseline (projected gradient descent on CLIP similarity, Wen et al.
   2023, written here) and the ground-truth caption as the ceiling. The paper's claims: VGD near `clip_only` on
   similarity and near `llm_only` on perplexity.
2. Distillation of long prompts (the full caption padded with filler words) to 30% of their CLIP tokens: CLIP
   text similarity to the long prompt and the oracle's agreement of images from the long and the short prompt
   with the scene; the first 30% of the tokens is the baseline.
3. Speed: one inversion (K = 10, the full 32 tokens) with each beam's cache and recomputed from scratch (the
   authors' code), side by side on the same image. Goals: cached at most 10 s, at least 3x faster.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import (
    Example,
    Perplexity,
    Timer,
    clip_text_similarity,
    image_agreement,
    mean_scores,
    print_table,
    prompt_agreement,
    scene_set,
)
from PIL import Image

from pictoprompt.methods.generation import default_size, encode_text_prompt, generate
from pictoprompt.methods.vgd import (
    ClipVocabulary,
    Variant,
    clip_token_count,
    clip_vocabulary,
    distill,
    guided_decode,
    image_targets,
    invert,
    vgd_prompt,
)
from pictoprompt.models.clip import ClipModel, TransformersClip
from pictoprompt.models.profiles import get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.progress import Progress

KINDS = ("single", "two", "held_out_combos")
VARIANTS: tuple[Variant, ...] = ("vgd", "llm_only", "clip_only")
NAMED = ("colour", "shape", "size", "position", "fill")
FILLER = (
    "highly detailed",
    "trending on artstation",
    "masterpiece",
    "8k resolution",
    "sharp focus",
    "studio lighting",
    "award winning",
    "octane render",
    "intricate details",
    "beautiful composition",
    "professional photograph",
    "vivid colors",
)
BATCH = 50


# ---------------------------------------------------------------------------------------------------- PEZ


def pez_prompt(
    clip: TransformersClip,
    target: torch.Tensor,
    length: int = 16,
    iterations: int = 500,
    lr: float = 0.1,
    weight_decay: float = 0.1,
    seed: int = 0,
) -> str:
    """PEZ (Wen et al. 2023, Algorithm 1): optimise `length` soft token embeddings, but take every gradient at
    their projection onto the nearest vocabulary embeddings (cosine), and keep the best projected prompt."""
    text_model = clip.model.text_model
    table = text_model.embeddings.token_embedding.weight.detach()
    bos, eos = clip.tokenizer.bos_token_id, clip.tokenizer.eos_token_id
    allowed = torch.tensor([t for t in range(table.shape[0]) if t not in (bos, eos)], device=table.device)
    allowed_unit = F.normalize(table[allowed], dim=-1)
    generator = torch.Generator().manual_seed(seed)
    soft = table[allowed[torch.randint(len(allowed), (length,), generator=generator)]].clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([soft], lr=lr, weight_decay=weight_decay)
    # The text tower is causal: the end-of-text state of "<bos> prompt <eos>" needs no padding after it.
    template = torch.tensor([[bos, *[bos] * length, eos]], device=table.device)
    target_unit = F.normalize(target.float().reshape(1, -1), dim=-1)
    best_ids, best_similarity = None, -2.0

    def similarity_of(prompt_embeds: torch.Tensor) -> torch.Tensor:
        def splice(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            output[:, 1 : length + 1] = prompt_embeds
            return output

        handle = text_model.embeddings.token_embedding.register_forward_hook(splice)
        try:
            eos_state = clip.text_states(template)[0, length + 1]
        finally:
            handle.remove()
        return (F.normalize(eos_state.float() @ clip.text_projection.T, dim=-1) * target_unit).sum()

    for _ in range(iterations):
        ids = allowed[(F.normalize(soft.detach(), dim=-1) @ allowed_unit.T).argmax(dim=-1)]
        projected = table[ids].clone().requires_grad_(True)
        similarity = similarity_of(projected)
        (-similarity).backward()
        soft.grad = projected.grad  # the projection's gradient moves the soft embeddings
        optimizer.step()
        optimizer.zero_grad()
        if float(similarity.detach()) > best_similarity:
            best_ids, best_similarity = ids.tolist(), float(similarity.detach())
    return clip.decode(best_ids or [])


# ------------------------------------------------------------------------------------------------ rendering


def render(runtime: Runtime, prompts: Sequence[str], seeds: Sequence[int], steps: int) -> list[Image.Image]:
    """One image per prompt (prompt i with seed i), in batches."""
    pipeline = runtime.pipeline()
    size = default_size(pipeline)
    images = []
    for start in range(0, len(prompts), BATCH):
        pairs = [encode_text_prompt(pipeline, p) for p in prompts[start : start + BATCH]]
        prompt_embeds = torch.cat([p for p, _ in pairs])
        negative = torch.cat([n for _, n in pairs])
        batch_seeds = list(seeds[start : start + BATCH])
        images += generate(pipeline, prompt_embeds, negative, batch_seeds, steps, 7.5, size, size, Progress())
    return images


def agreement_row(prompts: Sequence[str], images: Sequence[Image.Image], examples: Sequence[Example]) -> dict:
    """Prompt recall of the scene's attributes and the regenerated images' agreement with the scene, in %."""
    named = mean_scores(prompt_agreement(p, ex.scene) for p, ex in zip(prompts, examples, strict=True))
    seen = mean_scores(image_agreement(im, ex.scene) for im, ex in zip(images, examples, strict=True))
    return {
        "named colour": 100 * named["colour"],
        "named shape": 100 * named["shape"],
        "named all": 100 * statistics.fmean(named[a] for a in NAMED),
        "regen colour": 100 * seen["colour"],
        "regen shape": 100 * seen["shape"],
        "regen all": 100 * statistics.fmean(seen.values()),
    }


# ------------------------------------------------------------------------------------------------ tables


def scenes_of_kind(n: int, kind: str) -> int:
    """`kind`'s share of `n` scenes: a third each, the remainder to the first kinds (200 -> 67, 67, 66)."""
    return max(1, n // len(KINDS) + (KINDS.index(kind) < n % len(KINDS)))


def inversion_table(
    runtime: Runtime, vocabulary: ClipVocabulary, perplexity: Perplexity, settings: argparse.Namespace
) -> list[dict]:
    clip, llm = runtime.clip(), runtime.llm()
    methods: dict[str, Callable[[Example], str]] = {
        variant: (
            lambda ex, v=variant: (
                invert(
                    llm,
                    clip,
                    image_targets(clip, [ex.image]),
                    vocabulary=vocabulary,
                    variant=v,
                    max_length=settings.max_tokens,
                ).best.text
            )
        )
        for variant in VARIANTS
    }
    if isinstance(clip, TransformersClip):
        methods["pez"] = lambda ex: pez_prompt(
            clip, image_targets(clip, [ex.image])[0], settings.pez_length, settings.pez_iterations
        )
    rows = []
    for kind in settings.kinds:
        examples = scene_set(kind, scenes_of_kind(settings.n, kind))
        seeds = list(range(len(examples)))
        prompts_by = {"caption (ceiling)": [ex.caption for ex in examples]}
        seconds = {"caption (ceiling)": float("nan")}
        for name, method in methods.items():
            timer = Timer()
            prompts = []
            for ex in examples:
                with timer:
                    prompts.append(method(ex))
            prompts_by[name], seconds[name] = prompts, timer.mean
        for name, prompts in prompts_by.items():
            images = render(runtime, prompts, seeds, settings.steps)
            similarity = clip_text_similarity(clip, [ex.image for ex in examples], prompts)
            rows.append(
                {
                    "scenes": f"{kind} ({len(examples)})",
                    "method": name,
                    **agreement_row(prompts, images, examples),
                    "CLIP sim": float(similarity.mean()),
                    "perplexity": median_perplexity(perplexity, prompts),
                    "s/prompt": seconds[name],
                }
            )
            print(f"  {kind} {name}: {prompts[0]!r}", file=sys.stderr)
    return rows


def median_perplexity(perplexity: Perplexity, prompts: Sequence[str]) -> float:
    """Median over the prompts the harness can score (a one-token prompt has no perplexity)."""
    values = [value for value in map(perplexity, prompts) if not math.isnan(value)]
    return statistics.median(values) if values else float("nan")


def long_prompt(example: Example, rng: random.Random) -> str:
    return ", ".join([example.caption, *rng.sample(FILLER, 6)])


def first_tokens(clip: ClipModel, text: str, count: int) -> str:
    ids = clip.tokenize([text])[0]
    return clip.decode(ids[1 : count + 1].tolist())


def distillation_table(runtime: Runtime, perplexity: Perplexity, settings: argparse.Namespace) -> list[dict]:
    clip, llm = runtime.clip(), runtime.llm()
    examples = scene_set("single", settings.distill_n // 2) + scene_set(
        "two", settings.distill_n - settings.distill_n // 2
    )
    rng = random.Random("distillation")
    long_prompts = [long_prompt(ex, rng) for ex in examples]
    timer = Timer()
    distilled = []
    for prompt in long_prompts:
        with timer:
            distilled.append(distill(llm, clip, prompt).best.text)
    budgets = [max(1, int(0.3 * n)) for n in clip_token_count(clip, long_prompts)]
    truncated = [first_tokens(clip, p, b) for p, b in zip(long_prompts, budgets, strict=True)]
    seeds = list(range(len(examples)))
    long_images = render(runtime, long_prompts, seeds, settings.steps)
    long_seen = mean_scores(image_agreement(im, ex.scene) for im, ex in zip(long_images, examples, strict=True))
    with torch.no_grad():
        long_embeds = clip.encode_text(long_prompts)
    rows = [
        {
            "prompt": "long (original)",
            "CLIP tokens": statistics.fmean(clip_token_count(clip, long_prompts)),
            "sim to long": 1.0,
            "regen all": 100 * statistics.fmean(long_seen.values()),
            "perplexity": median_perplexity(perplexity, long_prompts),
            "s/prompt": float("nan"),
        }
    ]
    for name, prompts, seconds in (("VGD 30%", distilled, timer.mean), ("first 30% of tokens", truncated, 0.0)):
        images = render(runtime, prompts, seeds, settings.steps)
        seen = mean_scores(image_agreement(im, ex.scene) for im, ex in zip(images, examples, strict=True))
        with torch.no_grad():
            similarity = F.cosine_similarity(clip.encode_text(prompts), long_embeds)
        rows.append(
            {
                "prompt": name,
                "CLIP tokens": statistics.fmean(clip_token_count(clip, prompts)),
                "sim to long": float(similarity.mean()),
                "regen all": 100 * statistics.fmean(seen.values()),
                "perplexity": median_perplexity(perplexity, prompts),
                "s/prompt": seconds,
            }
        )
        print(f"  distill {name}: {prompts[0]!r}", file=sys.stderr)
    return rows


def speed_table(runtime: Runtime, vocabulary: ClipVocabulary, example: Example, max_tokens: int) -> list[dict]:
    """The same inversion with the beams' caches and recomputed from scratch: same beams, different cost.

    Stop tokens are held back until `max_tokens`, so both decoders run the full length the goal is stated for.
    """
    clip, llm = runtime.clip(), runtime.llm()
    targets = image_targets(clip, [example.image])
    prompt = vgd_prompt(llm, "inversion", max_tokens, condition=vocabulary.closest(targets))
    rows, results = [], {}
    for use_cache in (True, False):
        timer = Timer()
        with timer:
            results[use_cache] = guided_decode(
                llm, clip, targets, prompt, max_length=max_tokens, min_length=max_tokens, use_cache=use_cache
            )
        rows.append(
            {
                "decoder": "cached (per-beam KV)" if use_cache else "recomputed (authors' code)",
                "tokens": results[use_cache].steps,
                "seconds": timer.mean,
                "s/token": timer.mean / max(1, results[use_cache].steps),
            }
        )
    rows[1]["speed-up"] = rows[1]["seconds"] / rows[0]["seconds"]
    rows[0]["same beams"] = rows[1]["same beams"] = results[True].beams == results[False].beams
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pictoprompt bench vgd", description=__doc__)
    parser.add_argument("--profile", default="shapes")
    parser.add_argument("--n", type=int, default=200, help="held-out scenes for inversion, a third per kind")
    parser.add_argument("--distill-n", type=int, default=100, help="long prompts to distill")
    parser.add_argument(
        "--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="scene sets to invert (to split a run)"
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=25, help="denoising steps of the regenerated images")
    parser.add_argument("--pez-length", type=int, default=16, help="PEZ prompt tokens (the paper's PEZ setting)")
    parser.add_argument("--pez-iterations", type=int, default=500)
    parser.add_argument("--torch-threads", type=int, default=1, help="small models on a shared CPU: 1 is fastest")
    parser.add_argument("--skip", nargs="*", default=[], choices=["inversion", "distillation", "speed"])
    settings = parser.parse_args(argv)
    torch.set_num_threads(settings.torch_threads)

    runtime = Runtime(get_profile(settings.profile))
    llm = runtime.llm()
    cache = Path(tempfile.gettempdir()) / "pictoprompt-bench"
    vocabulary = clip_vocabulary(runtime.clip(), cache)
    perplexity = Perplexity()
    header = f"profile {settings.profile}, LLM {Path(llm.model_id).name}, {runtime.device}"
    summary: dict[str, object] = {}
    if "inversion" not in settings.skip:
        rows = inversion_table(runtime, vocabulary, perplexity, settings)
        print_table(f"Inversion, {settings.max_tokens} tokens, attribute scores in % ({header})", rows)
        summary["inversion"] = rows
    if "distillation" not in settings.skip:
        rows = distillation_table(runtime, perplexity, settings)
        print_table(f"Distillation to 30% of the CLIP tokens ({settings.distill_n} prompts; {header})", rows)
        summary["distillation"] = rows
    if "speed" not in settings.skip:
        rows = speed_table(runtime, vocabulary, scene_set("single", 1)[0], settings.max_tokens)
        print_table(f"Speed of one inversion, K = 10, {settings.max_tokens} tokens ({header})", rows)
        summary["speed"] = rows
        cached, speed_up = rows[0]["seconds"], rows[1]["speed-up"]
        print(f"cached inversion {cached:.1f} s (goal <= 10 s): {'met' if cached <= 10 else 'NOT met'}")
        print(f"cache speed-up {speed_up:.1f}x (goal >= 3x): {'met' if speed_up >= 3 else 'NOT met'}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
