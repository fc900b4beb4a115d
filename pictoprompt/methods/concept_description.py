"""Completing a concept's description with the word its pictures show, or writing one, judged by the generator.

A user describes a concept by its kind and what strikes them ("a green heart"); what the pictures show besides (the
heart is striped) is often left out, and SD-IPC's image side does not carry it either: on `shapes` the converted
prompt loses the fill, so the concept is drawn solid. This step asks the generator which single word, added to the
description, best explains the pictures: a diffusion classifier (Li et al. 2023, "Your Diffusion Model is Secretly
a Zero-Shot Classifier"). Each candidate description is scored by the U-Net's denoising error on the references'
latents, at the same timesteps and the same noise for every candidate so that their errors compare pair by pair; a
word is added only if it lowers the error, relative to the description as given, by more than a threshold (the
median of the pictures' relative changes).
Candidates come in groups of alternatives (the fills, the colours): a description that already uses a word of a
group gets none of its others ("a red square" never becomes "an orange red square").

A generator trained on a grid of positions (`shapes`) judges only pictures on that grid: "outlined" lowers the error
on rendered outlined squares, and raises it once they are moved one pixel (lab/RESULTS.md, "Figures behind the
code's choices").
`align_to_generator` first moves each picture, by a few pixels, to where the description's error is lowest; the
profile says how far (`DescriptionConfig.completion_alignment`).

Given no description, `describe` has the generator write one from the profile's groups and nouns ("a FILL COLOUR
SHAPE"), judged the same way.

It is not in SD-IPC. lab/RESULTS.md ("SD-IPC-CT: learned concepts") has what it adds on the bench's concepts and
on pictures drawn with PIL, and what it does to the pictures generated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image
from torch import Tensor

from pictoprompt.configs import DescriptionConfig
from pictoprompt.methods.generation import default_size
from pictoprompt.methods.generator_score import denoising_errors, relative_gains
from pictoprompt.methods.sd_ipc import ImageToPrompt
from pictoprompt.methods.tuning import encode_latents
from pictoprompt.methods.vgd import ClipVocabulary, clip_vocabulary, image_targets
from pictoprompt.models.clip import ClipModel, border_colour, pad_to_square
from pictoprompt.progress import Progress

ARTICLES = ("a", "an", "the")


@dataclass
class CompletedDescription:
    description: str
    """The description with the word added, or as given when no word explains the pictures better."""
    added: str | None
    gains: dict[str, float]
    """Each candidate word's `relative_gains` on the references (negative: explains them better than the
    description as given)."""


def with_word(description: str, word: str) -> str:
    """The description with `word` before its other words, after a leading article ("a green heart" + "striped" ->
    "a striped green heart"), the indefinite article following the word's first letter ("an outlined ...")."""
    first, _, rest = description.strip().partition(" ")
    if first.lower() not in ARTICLES or not rest:
        return f"{word} {description.strip()}"
    article = first
    if first.lower() != "the":
        article = "an" if word[:1].lower() in "aeiou" else "a"
        article = article.capitalize() if first[:1].isupper() else article
    return f"{article} {word} {rest}"


def closest_words(
    clip: ClipModel, vocabulary: ClipVocabulary, references: Sequence[Image.Image], count: int
) -> list[str]:
    """The vocabulary's `count` words with the highest mean CLIP similarity to the references."""
    targets = F.normalize(image_targets(clip, references).float(), dim=-1).to(vocabulary.embeddings.device)
    similarity = (targets @ vocabulary.embeddings.T).mean(0)
    return [vocabulary.words[i] for i in similarity.argsort(descending=True)[:count].tolist()]


def moved(image: Image.Image, dx: int, dy: int) -> Image.Image:
    """The picture moved right by `dx` and down by `dy` pixels, the uncovered strip in its border's colour."""
    canvas = Image.new("RGB", image.size, border_colour(image))
    canvas.paste(image, (dx, dy))
    return canvas


def align_to_generator(
    pipeline: StableDiffusionPipeline,
    converter: ImageToPrompt,
    references: Sequence[Image.Image],
    description: str,
    reach: int,
    timesteps: int = 4,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[Image.Image]:
    """Each reference at the generator's size, moved by at most `reach` pixels each way to where the description's
    denoising error is lowest (`reach` 0: only resized)."""
    size = default_size(pipeline)
    offsets = [(dx, dy) for dx in range(-reach, reach + 1) for dy in range(-reach, reach + 1)]
    aligned = []
    for reference in references:
        if progress is not None:
            progress.check()
        native = pad_to_square(reference.convert("RGB")).resize((size, size), Image.Resampling.BICUBIC)
        if reach == 0:
            aligned.append(native)
            continue
        views = [moved(native, dx, dy) for dx, dy in offsets]
        errors = denoising_errors(
            pipeline, converter, encode_latents(pipeline, views), [description], timesteps, seed, Progress()
        )
        aligned.append(views[int(errors[0].argmin())])
    return aligned


def complete_description(
    pipeline: StableDiffusionPipeline,
    clip: ClipModel,
    references: Sequence[Image.Image],
    description: str,
    candidates: Sequence[Sequence[str]],
    config: DescriptionConfig = DescriptionConfig(),
    progress: Progress | None = None,
) -> CompletedDescription:
    """The description with the one candidate word that lowers the references' denoising error the most, by more
    than `completion_threshold` (`relative_gains`), or the description as given. `candidates` are groups of
    alternative words; a group of which the description has a word offers none. `completion_alignment`: see
    `align_to_generator`."""
    description = " ".join(description.split())
    present = {word.lower() for word in description.split()}
    open_groups = [group for group in candidates if not present & {word.lower() for word in group}]
    words = list(dict.fromkeys(word.strip() for group in open_groups for word in group if word.strip()))
    if not words:
        return CompletedDescription(description, None, {})
    progress = progress or Progress()
    converter = ImageToPrompt.cached(clip, pipeline)
    timesteps, seed = config.completion_timesteps, config.seed
    if config.completion_alignment:
        progress.report(0, timesteps, "placing the pictures where the generator judges them")
    pictures = align_to_generator(
        pipeline, converter, references, description, config.completion_alignment, seed=seed, progress=progress
    )
    texts = [description, *(with_word(description, word) for word in words)]
    errors = denoising_errors(pipeline, converter, encode_latents(pipeline, pictures), texts, timesteps, seed, progress)
    gains = {word: float(change) for word, change in zip(words, relative_gains(errors).tolist(), strict=True)}
    best = min(gains, key=gains.__getitem__)
    if gains[best] < -config.completion_threshold:
        return CompletedDescription(with_word(description, best), best, gains)
    return CompletedDescription(description, None, gains)


def with_article(words: Sequence[str]) -> str:
    """ "a striped green heart" of ["striped", "green", "heart"]; "" of none (the empty prompt)."""
    if not words:
        return ""
    return f"{'an' if words[0][:1].lower() in 'aeiou' else 'a'} {' '.join(words)}"


def describe(
    pipeline: StableDiffusionPipeline,
    clip: ClipModel,
    references: Sequence[Image.Image],
    config: DescriptionConfig,
    progress: Progress | None = None,
) -> CompletedDescription:
    """A description written by the generator when the user gives none, from the groups `completion_words` and then
    `description_nouns`: one word per group at most, in the groups' order after an article ("a FILL COLOUR SHAPE"),
    the noun required, else none at all.

    It starts from each group's word CLIP finds closest to the pictures, then, group by group for `sweeps` rounds,
    keeps the word (or none) whose whole description lowers the references' denoising error the most; a word stays
    only if it beats leaving its group out by `completion_threshold`. Partial phrases ("a striped") are never judged
    against each other: the generator learnt whole captions, and from the empty prompt up, one word at a time,
    "a striped" won for a yellow outlined square and nothing followed it."""
    progress = progress or Progress()
    groups = [*(config.completion_words or []), config.description_nouns or []]
    options = [list(dict.fromkeys(word.strip() for word in group if word.strip())) for group in groups]
    options = [words for words in options if words]
    if not options:
        return CompletedDescription("", None, {})
    chosen: dict[int, str | None] = {
        index: closest_words(clip, clip_vocabulary(clip, words=words), references, 1)[0]
        for index, words in enumerate(options)
    }
    converter = ImageToPrompt.cached(clip, pipeline)
    pictures = align_to_generator(
        pipeline,
        converter,
        references,
        _phrase(chosen),
        config.completion_alignment,
        seed=config.seed,
        progress=progress,
    )
    judge = _PhraseJudge(pipeline, converter, encode_latents(pipeline, pictures), config)
    gains: dict[str, float] = {}
    steps, unchanged = config.sweeps * len(options), 0
    for step in range(steps):
        if unchanged == len(options):  # a whole sweep kept every word: another would judge the same texts again
            break
        index = step % len(options)
        choice, gain = judge.best_choice(chosen, index, options[index], progress.scaled(step, 1, steps))
        unchanged = unchanged + 1 if choice == chosen[index] else 0
        chosen[index] = choice
        if choice is not None:
            gains[choice] = gain
    if chosen[len(options) - 1] is None:  # no noun: "a striped" would describe nothing
        return CompletedDescription("", None, {})
    description = _phrase(chosen)
    kept = {word: gain for word, gain in gains.items() if word in description.split()}
    return CompletedDescription(description, description, kept)


def _phrase(words: dict[int, str | None]) -> str:
    return with_article([word for _, word in sorted(words.items()) if word is not None])


@dataclass
class _PhraseJudge:
    """Which word of a group (or none) makes the whole description explain the pictures best."""

    pipeline: StableDiffusionPipeline
    converter: ImageToPrompt
    latents: Tensor
    config: DescriptionConfig

    def best_choice(
        self, chosen: dict[int, str | None], index: int, words: list[str], progress: Progress
    ) -> tuple[str | None, float]:
        """The best of `words` at group `index` with its gain, or (None, its gain) unless it beats the threshold."""
        choices: list[str | None] = [None, *words]
        texts = [_phrase({**chosen, index: choice}) for choice in choices]
        config = self.config
        errors = denoising_errors(
            self.pipeline, self.converter, self.latents, texts, config.completion_timesteps, config.seed, progress
        )
        changes = relative_gains(errors)
        best = int(changes.argmin()) + 1
        gain = float(changes[best - 1])
        return (choices[best] if gain < -config.completion_threshold else None), gain


def swapped_descriptions(description: str, groups: Sequence[Sequence[str]]) -> list[str]:
    """The description with the word it uses of the first group it uses replaced by each of that group's others
    ("a striped green heart", fills -> "a solid green heart", "an outlined green heart"); none if it uses no group."""
    words = description.split()
    words = words[1:] if words and words[0].lower() in ARTICLES else words
    for group in groups:
        used = [i for i, word in enumerate(words) if word in group]
        if used:
            i = used[0]
            return [with_article([*words[:i], other, *words[i + 1 :]]) for other in group if other != words[i]]
    return []


def description_margins(
    pipeline: StableDiffusionPipeline,
    clip: ClipModel,
    images: Sequence[Image.Image],
    description: str,
    alternatives: Sequence[str],
    timesteps: int,
) -> list[float]:
    """Per picture, how much better the description explains it than the best of `alternatives`: the lowest
    alternative's denoising error over the description's, minus 1 (positive: the description wins). Ours: a
    concept's candidate check with the generator as judge (`ConceptTuningConfig.candidate_timesteps`)."""
    latents = encode_latents(pipeline, [image.convert("RGB") for image in images])
    converter = ImageToPrompt.cached(clip, pipeline)
    errors = denoising_errors(pipeline, converter, latents, [description, *alternatives], timesteps, 0, Progress())
    return (errors[1:].min(dim=0).values / errors[0] - 1).tolist()
