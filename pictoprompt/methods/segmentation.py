"""Segmentation from the generator's own cross-attention (EDITOR paper 003_ccad9491c5e4f205, appendix B,
"Unsupervised Segmentation", after DiffuMask and Attend-and-Excite), and a binding of ours.

A word of the prompt is drawn where the U-Net's pixels attend to it, so its cross-attention map is a soft mask:

1. *Look* (`record_attention`): the picture, stretched to the generator's native square, is encoded, noised to
   `timestep` and denoised for `num_steps` DDIM steps under the prompt, `num_noise` draws in one batch (a single
   draw leaves its grain in the maps), every attention layer recording its probabilities (`RecordingAttnProcessor`).
2. *Aggregate per word* (`word_maps`): a word's map is the sum of its BPE tokens' probabilities, spread along the
   self-attention of its resolution and oriented per head (`_orient`), then averaged over heads, layers, steps,
   draws and the `num_resolutions` finest resolutions.
3. *Region* (`word_mask`): Otsu's threshold on the word's map.
4. *Bind* (ours; `word_attributions`, `word_mask`): a small U-Net's cross-attention does not tell a word's thing
   from the other things in the picture, so a region often holds every object. What the generator does with the
   word does: the U-Net predicts the noise of the picture's latents under the prompt and under the prompt without
   each word (DiffEdit reads masks from the same denoising), and the mask keeps the part of the region where taking
   the word out makes the prediction worse. lab/RESULTS.md, "Segmentation", has the figures behind it.

Which words name nothing visible, and get no mask (`no_mask_reason`): punctuation, a stop word (`STOP_WORDS`), a
word past the text encoder's context, and "flat attention", a word whose raw attention hardly varies over the
picture or whose map has no two classes (a generator that places a word nowhere spreads its attention evenly).
Everything runs under `torch.no_grad`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import Attention, AttnProcessor
from PIL import Image
from torch import Tensor

from pictoprompt.configs import SegmentationConfig
from pictoprompt.errors import InvalidInputError
from pictoprompt.methods.generation import default_size, encode_text_prompt, errors_per_text, noise_target
from pictoprompt.methods.tuning import encode_latents
from pictoprompt.progress import Progress

STOP_WORDS = frozenset(
    word
    for group in (
        "a an the this that these those some any each every no",  # articles, determiners
        "of on in at to for from by with without into onto over under above below between behind near beside",
        "and or but nor so yet as than then",  # conjunctions
        "is are was were be been being am has have had do does did will would can could should may might must",
        "it its he she they them their his her we us our you your i me my",  # pronouns
        "there here which who whom whose what where when while very too also not just only",
        "picture image 's 't",  # "a picture of ...", "an image of ...": the whole picture; clitics
    )
    for word in group.split()
)
"""Words that never name a thing in the picture, and the openers of captions ("a picture of ..."), which name the
whole picture."""

MIN_SEPARABILITY = 0.7
"""Otsu's eta below which a map counts as flat (a uniform histogram scores 0.75, two clean classes 1.0)."""

MIN_CONTRAST = 0.05
"""The map's standard deviation over its mean below which it counts as flat, whatever its histogram."""

ATTRIBUTION_LATENT_PIXELS = 32 * 16 * 16
"""At most this many latent pixels (texts x noise draws x height x width) per U-Net call while binding words, and
at least one text's draws."""

MAX_MAP_SIDE = 1024
"""Maps and masks are made at the picture's size up to this longest side: the finest attention map is far coarser,
and a 40-megapixel picture would otherwise cost gigabytes per word."""


# ------------------------------------------------------------------------------------------------ words


@dataclass(frozen=True)
class PromptWord:
    """One word of the prompt as the generator's tokenizer splits it, and its token positions after the start
    token."""

    text: str
    positions: tuple[int, ...]
    no_mask_reason: str | None = None
    """Set when the word names nothing visible by its form (punctuation, a stop word, cut off by the context)."""


_HAS_LETTER = re.compile(r"[^\W\d_]")


def prompt_words(pipeline: StableDiffusionPipeline, prompt: str) -> list[PromptWord]:
    """The prompt's words in order: CLIP's BPE marks the last token of each piece with `</w>`, so tokens are grouped
    up to that mark ("xylophonist" -> "xy", "lo", "ph", "onist</w>" is one word; "don't" is "don" and "'t")."""
    tokenizer = pipeline.tokenizer
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt, add_special_tokens=False).input_ids)
    context = tokenizer.model_max_length - 2  # the start and end tokens take two places
    words: list[PromptWord] = []
    pieces: list[str] = []
    begin = 0
    for index, token in enumerate(tokens):
        pieces.append(token)
        if not token.endswith("</w>") and index < len(tokens) - 1:
            continue
        text = "".join(pieces).removesuffix("</w>")
        positions = tuple(range(begin + 1, index + 2))
        reason = None
        if not _HAS_LETTER.search(text):
            reason = "punctuation"
        elif text in STOP_WORDS:
            reason = "stop word"
        elif positions[-1] > context:
            reason = "beyond the text encoder's context"
        words.append(PromptWord(text, positions, reason))
        pieces, begin = [], index + 1
    return words


# ------------------------------------------------------------------------------------------------ recording


@dataclass
class AttentionRecord:
    """The attention probabilities recorded per denoising step, averaged over the noise draws: per cross-attention
    layer per head (heads, Q, L), per resolution over heads and layers for self-attention (Q, Q)."""

    cross: dict[str, list[Tensor]] = field(default_factory=dict)
    self_attention: dict[int, list[Tensor]] = field(default_factory=dict)

    def cross_maps(self) -> dict[str, Tensor]:
        return {name: torch.stack(calls).mean(0) for name, calls in self.cross.items()}

    def self_maps(self) -> dict[int, Tensor]:
        return {queries: torch.stack(calls).mean(0) for queries, calls in self.self_attention.items()}


class RecordingAttnProcessor(AttnProcessor):
    """diffusers' `AttnProcessor` that also adds its layer's attention probabilities (`attn.get_attention_scores`
    on the inputs the parent then attends with) to `record`, when the layer's query count is one of `queries`."""

    def __init__(self, record: AttentionRecord, name: str, queries: frozenset[int]) -> None:
        self.record = record
        self.name = name
        self.queries = queries

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> Tensor:
        batch, queries = hidden_states.shape[0], hidden_states.shape[1]
        if hidden_states.ndim == 3 and queries in self.queries:
            keys_from = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            query = attn.head_to_batch_dim(attn.to_q(hidden_states))
            key = attn.head_to_batch_dim(attn.to_k(keys_from))
            mask = attn.prepare_attention_mask(attention_mask, keys_from.shape[1], batch)
            probabilities = attn.get_attention_scores(query, key, mask).unflatten(0, (batch, attn.heads)).float()
            if encoder_hidden_states is None:
                self.record.self_attention.setdefault(queries, []).append(probabilities.mean((0, 1)))
            else:
                self.record.cross.setdefault(self.name, []).append(probabilities.mean(0))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def cross_attention_sides(pipeline: StableDiffusionPipeline, num_resolutions: int) -> list[int]:
    """The sides of the `num_resolutions` finest attention maps carrying cross-attention, finest first (each down
    block halves the latents after it)."""
    blocks = pipeline.unet.config.down_block_types
    first = next(i for i, block in enumerate(blocks) if "CrossAttn" in block)
    last = max(i for i, block in enumerate(blocks) if "CrossAttn" in block)
    side = pipeline.unet.config.sample_size
    return [side // 2**i for i in range(first, min(last + 1, first + num_resolutions))]


def picture_latents(pipeline: StableDiffusionPipeline, image: Image.Image) -> Tensor:
    """The picture, stretched to the generator's native square, as its latents (1, C, h, w)."""
    size = default_size(pipeline)
    return encode_latents(pipeline, [image.convert("RGB").resize((size, size), Image.BICUBIC)])


def record_attention(
    pipeline: StableDiffusionPipeline,
    latents: Tensor,
    prompt_embeds: Tensor,
    sides: Sequence[int],
    config: SegmentationConfig,
    progress: Progress,
) -> AttentionRecord:
    """The U-Net's attention at the maps of `sides` while it denoises the picture's `latents` (1, C, h, w) under
    `prompt_embeds` (1, L, D): step 1 of the module docstring."""
    unet, scheduler = pipeline.unet, pipeline.scheduler
    timestep, num_steps, num_noise = config.timestep, config.num_steps, config.num_noise
    generator = torch.Generator().manual_seed(config.seed)
    record = AttentionRecord()
    queries = frozenset(side * side for side in sides)
    with torch.no_grad():
        latents = latents.expand(num_noise, -1, -1, -1)
        # DDIM's step goes from t to t - train_steps // num_inference_steps: a schedule of that many steps makes
        # `num_steps` of them span `timestep`.
        train_steps = scheduler.config.num_train_timesteps
        scheduler.set_timesteps(max(1, round(train_steps * num_steps / timestep)), device=latents.device)
        stride = train_steps // scheduler.num_inference_steps
        timesteps = [timestep - i * stride for i in range(num_steps) if timestep - i * stride > 0]
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        latents = scheduler.add_noise(latents, noise, torch.tensor([timestep], device=latents.device))
        states = prompt_embeds.to(latents.device, unet.dtype).expand(num_noise, -1, -1)

        original = unet.attn_processors
        unet.set_attn_processor(
            {name: RecordingAttnProcessor(record, name.removesuffix(".processor"), queries) for name in original}
        )
        try:
            for step, t in enumerate(timesteps):
                progress.step(step, len(timesteps), f"denoising step {step + 1}/{len(timesteps)}")
                noise_pred = unet(latents, t, encoder_hidden_states=states).sample
                latents = scheduler.step(noise_pred, t, latents).prev_sample
        finally:
            unet.set_attn_processor(original)
    progress.step(len(timesteps), len(timesteps), "aggregating attention")
    return record


# ------------------------------------------------------------------------------------------------ binding


def without_word(pipeline: StableDiffusionPipeline, prompt: str, word: PromptWord) -> str:
    """The prompt with `word`'s tokens taken out, as text that tokenizes back to the other tokens."""
    tokenizer = pipeline.tokenizer
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    return tokenizer.decode([token for index, token in enumerate(ids) if index + 1 not in word.positions]).strip()


def word_attributions(
    pipeline: StableDiffusionPipeline,
    latents: Tensor,
    prompt: str,
    words: Sequence[PromptWord],
    config: SegmentationConfig,
    progress: Progress,
) -> Tensor:
    """(W, h, w) at the latents' side: how much worse the generator predicts the noise on each latent pixel when
    each word is taken out of the prompt, averaged over `binding_timesteps` (fractions of the training schedule) and
    `binding_noise` draws, the same draws for every text."""
    unet, scheduler = pipeline.unet, pipeline.scheduler
    timesteps, num_noise = config.binding_timesteps, config.binding_noise
    texts = [prompt] + [without_word(pipeline, prompt, word) for word in words]
    generator = torch.Generator().manual_seed(config.seed)
    train_steps = scheduler.config.num_train_timesteps
    draws = latents.expand(num_noise, -1, -1, -1)
    with torch.no_grad():
        states, _ = pipeline.encode_prompt(texts, latents.device, 1, False)
        errors = torch.zeros(len(texts), *latents.shape[2:])
        for index, fraction in enumerate(timesteps):
            progress.step(index, len(timesteps), f"taking out each of {len(words)} words, pass {index + 1}")
            t = torch.full((num_noise,), round(fraction * train_steps), device=latents.device)
            noise = torch.randn(draws.shape, generator=generator).to(latents.device, latents.dtype)
            noisy = scheduler.add_noise(draws, noise, t)
            target = noise_target(scheduler, draws, noise, t)
            per_call = max(1, ATTRIBUTION_LATENT_PIXELS // (num_noise * latents[0, 0].numel()))
            errors += errors_per_text(unet, noisy, t, target, states, per_call).mean(1)
    progress.step(len(timesteps), len(timesteps), "binding words to their things")
    return (errors[1:] - errors[:1]) / len(timesteps)


def spread_along(maps: Tensor, self_attention: Tensor, steps: int) -> Tensor:
    """Maps (W, h, w) pooled to the self-attention's side and spread `steps` times along it: each pixel takes the
    mean of the pixels it attends to, so a value grows over its whole thing (W, side, side)."""
    side = round(self_attention.shape[0] ** 0.5)
    flat = F.adaptive_avg_pool2d(maps[None], side)[0].flatten(1)
    for _ in range(steps):
        flat = flat @ self_attention.T
    return flat.reshape(-1, side, side)


# ------------------------------------------------------------------------------------------------ maps and masks


def _orient(maps: Tensor) -> Tensor:
    """Each map (N, h, w), standardised and signed so that its high side holds at most half of the picture's
    border: a thing is what its surroundings frame.

    In a small U-Net many heads attend to a word *less* on its thing than around it, and which heads do flips from
    picture to picture, so plain averaging would cancel them out. The price: a word for the surroundings themselves
    ("background") gets the thing they frame, which the binding turns back (`word_mask`).
    """
    standard = (maps - maps.mean((1, 2), keepdim=True)) / (maps.std((1, 2), keepdim=True) + 1e-12)
    border = torch.ones_like(standard[0], dtype=torch.bool)
    border[1:-1, 1:-1] = False
    high = standard > 0
    sign = torch.where((high & border).flatten(1).sum(1) * 2 > border.sum(), -1.0, 1.0)
    return standard * sign[:, None, None]


def word_maps(
    record: AttentionRecord,
    words: Sequence[PromptWord],
    height: int,
    width: int,
    refinement_steps: int = 3,
) -> tuple[Tensor, Tensor]:
    """Each word's map for thresholding (W, height, width), step 2 of the module docstring, and its raw attention
    (the plain mean of its probabilities, upsampled alike) for the flatness test and the mean attention.

    Spreading along the self-attention grows a blob to its object's edges: pixels that attend to each other belong
    together.
    """
    selves = record.self_maps()
    positions = [list(word.positions) for word in words]
    oriented: dict[int, list[Tensor]] = {}
    raw: dict[int, list[Tensor]] = {}
    for probabilities in record.cross_maps().values():
        queries = probabilities.shape[1]
        side = round(queries**0.5)  # the picture was stretched square, so every map is too
        per_word = torch.stack([probabilities[:, :, p].sum(-1) for p in positions], 1)  # (heads, W, Q)
        raw.setdefault(queries, []).append(per_word.mean(0))
        for _ in range(refinement_steps):
            per_word = per_word @ selves[queries].T
        maps = _orient(per_word.reshape(-1, side, side)).reshape(*per_word.shape[:2], queries)
        oriented.setdefault(queries, []).append(maps.mean(0))

    def upsampled(per_resolution: dict[int, list[Tensor]]) -> Tensor:
        grids = []
        for queries, maps in per_resolution.items():
            side = round(queries**0.5)
            grid = torch.stack(maps).mean(0).reshape(1, len(words), side, side)
            grids.append(F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[0])
        return torch.stack(grids).mean(0)

    return upsampled(oriented), upsampled(raw)


def otsu(values: np.ndarray, bins: int = 256) -> tuple[float, float]:
    """Otsu's threshold of `values` and its separability eta (between-class over total variance, 0-1)."""
    histogram, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weights = histogram / histogram.sum()
    below = np.cumsum(weights)
    below_mean = np.cumsum(weights * centres)
    total_mean = below_mean[-1]
    above = 1 - below
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mean * below - below_mean) ** 2 / (below * above)
    between = np.nan_to_num(between[:-1])
    best = int(between.argmax())
    total = float(((centres - total_mean) ** 2 * weights).sum())
    return float(edges[best + 1]), float(between[best] / total) if total > 0 else 0.0


@dataclass(frozen=True)
class WordSegment:
    """One word's result at `map_size` of the picture: its mask, unless it names nothing visible
    (`no_mask_reason`)."""

    word: str
    mean_attention: float
    """The share of the picture's cross-attention the word gets: its probability averaged over pixels, heads,
    layers and steps at the recorded resolutions."""
    mask: np.ndarray | None
    """Boolean (height, width)."""
    score: np.ndarray
    """The map the mask is thresholded from, in [0, 1] (height, width)."""
    no_mask_reason: str | None = None

    @property
    def area(self) -> float:
        """The share of the picture the mask covers (0 without a mask)."""
        return float(self.mask.mean()) if self.mask is not None else 0.0


def map_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) of the maps and masks for `image`: its own, shrunk to `MAX_MAP_SIDE` on its longest side."""
    scale = min(1.0, MAX_MAP_SIDE / max(image.size))
    return max(1, round(image.height * scale)), max(1, round(image.width * scale))


def word_mask(
    score: np.ndarray, attention: np.ndarray, attribution: np.ndarray | None = None
) -> tuple[np.ndarray | None, str | None]:
    """(mask, None), or (None, "flat attention") when the word's raw attention is nearly the same everywhere or its
    map has no two clear classes.

    The region is Otsu's threshold on the map. With the word's `attribution`, the mask is the part of the region
    where the attribution is above Otsu's threshold within the region and above zero, holes filled: a word adds
    most where the rest of the prompt says least ("circle" beside "red" is needed at the circle's edge).
    """
    level = float(attention.mean())
    if level <= 0 or float(attention.std()) / level < MIN_CONTRAST:
        return None, "flat attention"
    threshold, separability = otsu(score)
    if separability < MIN_SEPARABILITY:
        return None, "flat attention"
    region = score > threshold
    if attribution is None:
        return region, None
    if 0.0 < float(attribution[region].mean()) < float(attribution[~region].mean()):
        # Needed in its region, and more around it: the word names the surroundings ("white" of "on a white
        # background"), which `_orient` turned into the thing they frame.
        region = ~region
    inside = attribution[region]
    if float(inside.mean()) <= 0:
        # Taking the word out makes the generator redraw its region better: its idea of the word fights the
        # picture, so the attribution says nothing about where the word is.
        return region, None
    cut = otsu(inside)[0] if float(np.ptp(inside)) > 0 else 0.0
    return region & filled(region & (attribution > max(cut, 0.0))), None


def filled(mask: np.ndarray) -> np.ndarray:
    """`mask` with its holes filled: the pixels outside it that no 4-connected path outside it joins to the border."""
    outside = ~mask
    reached = np.zeros_like(mask)
    for edge in ((0, slice(None)), (-1, slice(None)), (slice(None), 0), (slice(None), -1)):
        reached[edge] = outside[edge]
    while True:
        grown = reached.copy()
        grown[1:] |= reached[:-1]
        grown[:-1] |= reached[1:]
        grown[:, 1:] |= reached[:, :-1]
        grown[:, :-1] |= reached[:, 1:]
        grown &= outside
        if np.array_equal(grown, reached):
            return ~reached
        reached = grown


def segment(
    pipeline: StableDiffusionPipeline,
    image: Image.Image,
    prompt: str,
    config: SegmentationConfig = SegmentationConfig(),
    words: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> list[WordSegment]:
    """Masks of the prompt's words on `image`, in the prompt's order, at `map_size(image)`: every word with its mask
    or the reason it has none, or only `words` (as the tokenizer splits them, lower case). An empty
    `binding_timesteps` keeps each word's whole region.
    """
    if not prompt.strip():
        raise InvalidInputError("The prompt is empty; give the words to find in the picture, or omit the prompt.")
    train_steps = pipeline.scheduler.config.num_train_timesteps
    if not config.timestep < train_steps:
        raise InvalidInputError(f"timestep must be between 1 and {train_steps - 1}, got {config.timestep}.")
    found = prompt_words(pipeline, prompt)
    if words is not None:
        found = _select(found, words, prompt)
    if not found:
        raise InvalidInputError(f"The prompt {prompt!r} has no words to segment.")
    progress = progress or Progress()
    latents = picture_latents(pipeline, image)
    prompt_embeds, _ = encode_text_prompt(pipeline, prompt)
    sides = cross_attention_sides(pipeline, config.num_resolutions)
    candidates = [word for word in found if word.no_mask_reason is None]
    binding = bool(candidates and config.binding_timesteps)
    looking = progress.scaled(0.0, 0.2 if binding else 1.0, 1.0)
    record = record_attention(pipeline, latents, prompt_embeds, sides, config, looking)
    height, width = map_size(image)
    scores, attention = word_maps(record, found, height, width, config.refinement_steps)
    bound: dict[int, np.ndarray] = {}
    if binding:
        attributions = word_attributions(pipeline, latents, prompt, candidates, config, progress.scaled(0.2, 0.8, 1.0))
        # The errors were gathered on the CPU; the recorded self-attention is on the U-Net's device.
        spread = spread_along(attributions.float(), record.self_maps()[sides[0] ** 2].cpu(), config.binding_spread)
        upsampled = F.interpolate(spread[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        bound = {word.positions[0]: grid for word, grid in zip(candidates, upsampled.numpy(), strict=True)}
    segments = []
    for word, score, raw in zip(found, scores.cpu().numpy(), attention.cpu().numpy(), strict=True):
        score = (score - score.min()) / max(float(score.max() - score.min()), 1e-12)
        if word.no_mask_reason:
            mask, reason = None, word.no_mask_reason
        else:
            mask, reason = word_mask(score, raw, bound.get(word.positions[0]))
        segments.append(WordSegment(word.text, float(raw.mean()), mask, score, reason))
    return segments


def _select(found: list[PromptWord], words: Sequence[str], prompt: str) -> list[PromptWord]:
    """The prompt's words named in `words` (each once, in the prompt's order), refusing a word it lacks."""
    wanted = {word.strip().lower() for word in words}
    known = {word.text for word in found}
    missing = sorted(wanted - known)
    if missing:
        verb = "is not a word" if len(missing) == 1 else "are not words"
        raise InvalidInputError(
            f"{', '.join(repr(w) for w in missing)} {verb} of the prompt {prompt!r}; its words are: "
            f"{', '.join(dict.fromkeys(w.text for w in found))}."
        )
    return [word for word in found if word.text in wanted]
