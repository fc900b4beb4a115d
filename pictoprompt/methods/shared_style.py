"""Style that names the shared look: VGD's style task, written only in words the pictures do not disagree on.

Ours, an extension of VGD's style path (paper 002, section 4: the style prompt of several pictures, decoded against
the mean of their embeddings, `vgd.style_target`). On its own that path names one picture's colour, shape or
background as often as what the pictures share ("outlined pink shapes on a white background" for an outlined pink
cross on white and an outlined purple square on yellow): a mean of embeddings is close to each picture's own
caption, and the decoder cannot tell the shared words from one picture's. Here the decoder proposes and the pictures'
own prompts and the generator decide which words a style prompt may use:

1. Each picture's own prompt (VGD's inversion of that picture alone).
2. The paper's style decode; its hypotheses' words are the proposals.
3. A word that some but not every picture's own prompt has belongs to those pictures (their object, colour, place):
   left out. A word every own prompt has is shared: kept.
4. A proposed word that no own prompt has is judged by the generator in each picture's own prompt (`with_word`, the
   word placed before the others, as concept completion does): it is refuted, and left out, if it raises any
   picture's denoising error by more than `refutation` (a colour or a place that one picture does not show).
5. The style task is decoded again with only the kept words (the start word the closest kept one); when the paper's
   answer already uses only kept words it is the answer, and nothing is decoded again.

On a profile without a dictionary (SD) the same steps hold: the words of the pictures' own prompts and of the style
hypotheses are the vocabulary the second decode may use. `lab/results/style.md` has what it does on the `shapes`
pairs and what it costs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from pictoprompt.methods.concept_description import align_to_generator, with_word
from pictoprompt.methods.generator_score import denoising_errors
from pictoprompt.methods.sd_ipc import ImageToPrompt
from pictoprompt.methods.tuning import encode_latents
from pictoprompt.methods.vgd import ClipVocabulary, VgdResult, clip_vocabulary, image_targets, invert, style_target
from pictoprompt.models.clip import ClipModel
from pictoprompt.models.llm import LanguageModel
from pictoprompt.progress import Progress

_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class SharedStyle:
    result: VgdResult
    """The style decode whose hypotheses are the answer (the paper's, or the one with only the kept words)."""
    own_prompts: list[str]
    """Each picture's own prompt (VGD's inversion)."""
    kept: list[str]
    """The words the style prompt may use: shared by every own prompt, or proposed and not refuted."""
    left_out: list[str]
    """Proposed words some pictures' own prompts have and others not, or that the generator refuted."""


def words_of(text: str) -> list[str]:
    """The text's words, lower-cased, in order, each once."""
    return list(dict.fromkeys(_WORD.findall(text.lower())))


def split_words(own_prompts: Sequence[str], proposed: Sequence[str]) -> tuple[set[str], set[str], list[str]]:
    """(words every own prompt has, words some but not all have, proposed words none has, in order)."""
    own = [set(words_of(prompt)) for prompt in own_prompts]
    shared = set.intersection(*own)
    partial = set.union(*own) - shared
    return shared, partial, [word for word in proposed if word not in shared | partial]


def refuted_words(
    pipeline: StableDiffusionPipeline,
    clip: ClipModel,
    images: Sequence[Image.Image],
    own_prompts: Sequence[str],
    words: Sequence[str],
    *,
    refutation: float,
    timesteps: int = 16,
    seed: int = 0,
) -> set[str]:
    """The words that raise some picture's denoising error, placed in that picture's own prompt (`with_word`), by
    more than `refutation` (a fraction) against the own prompt as it is."""
    if not words:
        return set()
    converter = ImageToPrompt.cached(clip, pipeline)
    latents = encode_latents(pipeline, align_to_generator(pipeline, converter, images, "", 0))
    worst = torch.full((len(words),), -float("inf"))
    for index, prompt in enumerate(own_prompts):
        texts = [prompt, *(with_word(prompt, word) for word in words)]
        errors = denoising_errors(pipeline, converter, latents[index : index + 1], texts, timesteps, seed, Progress())
        worst = torch.maximum(worst, errors[1:, 0] / errors[0, 0] - 1)
    return {word for word, change in zip(words, worst.tolist(), strict=True) if change > refutation}


def kept_vocabulary(clip: ClipModel, vocabulary: ClipVocabulary | None, kept: set[str]) -> ClipVocabulary:
    """The start words and the dictionary of the second decode: the kept words (the start word among those of the
    profile's start words, when any is kept)."""
    starts = [word for word in vocabulary.words if word in kept] if vocabulary is not None else []
    base = clip_vocabulary(clip, words=starts or sorted(kept))
    return ClipVocabulary(base.words, base.embeddings, frozenset(kept))


def shared_style(
    llm: LanguageModel,
    clip: ClipModel,
    pipeline: StableDiffusionPipeline,
    images: Sequence[Image.Image],
    *,
    vocabulary: ClipVocabulary | None,
    max_length: int = 32,
    refutation: float = 0.05,
    progress: Progress | None = None,
) -> SharedStyle:
    """The style prompt of `images` (two or more) that names what they share (steps 1-5 of the module's text)."""
    progress = progress or Progress()
    steps = len(images) + 2
    own_prompts = [
        invert(
            llm,
            clip,
            image_targets(clip, [image]),
            vocabulary=vocabulary,
            max_length=max_length,
            progress=progress.scaled(index / steps, 1 / steps, 1.0),
        ).best.text
        for index, image in enumerate(images)
    ]
    target = style_target(clip, images)
    paper = invert(
        llm,
        clip,
        target,
        task="style",
        vocabulary=vocabulary,
        max_length=max_length,
        progress=progress.scaled(len(images) / steps, 1 / steps, 1.0),
    )
    finished = [hypothesis.text for hypothesis in paper.hypotheses if hypothesis.finished]
    proposed = words_of(" ".join(finished or [paper.best.text]))
    shared, partial, unclaimed = split_words(own_prompts, proposed)
    refuted = refuted_words(pipeline, clip, images, own_prompts, unclaimed, refutation=refutation)
    kept = shared | (set(unclaimed) - refuted)
    left_out = sorted((partial & set(proposed)) | refuted)
    if not kept or set(words_of(paper.best.text)) <= kept:
        return SharedStyle(paper, own_prompts, sorted(kept), left_out)
    result = invert(
        llm,
        clip,
        target,
        task="style",
        vocabulary=kept_vocabulary(clip, vocabulary, kept),
        max_length=max_length,
        progress=progress.scaled((len(images) + 1) / steps, 1 / steps, 1.0),
    )
    return SharedStyle(result, own_prompts, sorted(kept), left_out)
