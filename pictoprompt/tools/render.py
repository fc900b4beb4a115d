"""The tools' shared kernel: render images from a prompt of any kind, score them with CLIP, and save them.

Every image-making tool goes through `render_and_score`, so the tool modules stay plain (a request model, a method
call, a result) and never touch tensors. It also resolves concept references: `load_concept` for `concept=NAME`,
`concept_image_embedding` for an image reference `concept:NAME`; both refuse a concept of another base model.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from PIL import Image

from pictoprompt.methods.concept_description import description_margins, swapped_descriptions
from pictoprompt.methods.concept_weights import (
    ConceptWeights,
    WordPlacer,
    applied_concept,
    base_hash,
    named_concept_states,
)
from pictoprompt.methods.generation import (
    Judge,
    PromptStates,
    Sample,
    default_size,
    encode_text_prompt,
    generate,
    generate_best,
)
from pictoprompt.methods.generator_score import generator_reranked, names_several, one_subject_vocabulary
from pictoprompt.methods.prompt_edit import prompt_edit_states, rewrite_prompt
from pictoprompt.methods.scoring import Embeddings, ImageScores, closeness_judge, score_images
from pictoprompt.methods.sd_ipc import (
    average_embeddings,
    edit_states,
    embed_references,
    prompted_variation_states,
    variation_states,
)
from pictoprompt.methods.vgd import VgdResult, invert, runtime_vocabulary
from pictoprompt.models.clip import ClipModel
from pictoprompt.models.concepts import mentions
from pictoprompt.progress import Progress
from pictoprompt.tools.base import CONCEPT_REF_PREFIX, OutputImage, SamplingRequest, ToolContext

# ------------------------------------------------------------------------------------------------ what to draw


@dataclass(frozen=True)
class TextPrompt:
    """A text prompt, encoded by the generator's own text encoder."""

    prompt: str
    negative_prompt: str = ""


@dataclass(frozen=True)
class ImagePrompt:
    """SD-IPC's variation: the references' CLIP embedding (weighted mean; `concept:NAME` among them) converted into a
    prompt embedding; with `prompt` (`picture_prompt`), combined with that prompt's states (ours)."""

    images: Sequence[str]
    weights: Sequence[float] | None = None
    prompt: str | None = None
    converted_weight: float = 0.0


@dataclass(frozen=True)
class EditPrompt:
    """One reference image changed by an edit text: SD-IPC's text-edited conversion (paper Eq. 8), or, when
    `prompts` holds the picture's prompt and its edited form, those prompts' states (`methods.prompt_edit`)."""

    image: str
    text: str
    alpha: float
    prompts: tuple[str, str] | None = None


Prompt = TextPrompt | ImagePrompt | EditPrompt


@dataclass(frozen=True)
class Rendered:
    """One saved image with its scores: `image_similarity` against the references (image prompts, or
    `score_against`), `text_similarity` against an edit's text."""

    image: OutputImage
    image_similarity: float | None = None
    text_similarity: float | None = None


# ------------------------------------------------------------------------------------------------ the kernel


def render_and_score(
    context: ToolContext,
    prompt: Prompt,
    sampling: SamplingRequest,
    method: str,
    metadata: dict[str, str] | None = None,
    score_against: Embeddings | None = None,
) -> list[Rendered]:
    """Render `sampling.num_images` images of `prompt`, one per consecutive seed, scored and saved with the common
    PNG text chunks and `metadata`; `score_against` (N, P) scores text-prompted images against these embeddings."""
    pipeline, clip = context.runtime.pipeline(), context.runtime.clip()
    seeds = seeds_for(sampling.seed, sampling.num_images)
    size = default_size(pipeline)
    concept = load_concept(context, sampling.concept)
    # Read before the concept is applied: the check that a stored concept belongs to this base hashes the
    # untouched base.
    stored = stored_embeddings(context, [*_references(prompt), *_named_concept(prompt, sampling.concept)])
    with applied_concept(pipeline, clip, concept) as clip:
        conditioning, negative, references = _conditioning(context, prompt, clip, stored, sampling.concept)
        sample = Sample(conditioning, negative, seeds, sampling.guidance, context.progress)
        width, height = sampling.width or size, sampling.height or size
        if concept is None:
            images = (context.sampler or generate)(pipeline, sample, sampling.steps, width, height)
        else:
            # A learned concept changes the generator's weights while applied: such a call never shares a batch.
            count, judge = _candidate_check(context, prompt, sampling.concept)
            images = generate_best(pipeline, sample, sampling.steps, (width, height), count, judge)
        scores = _scores(clip, images, prompt, references if references is not None else score_against)
    saved = [
        save_image(context, image, seed, _metadata(context, method, seed, sampling, metadata))
        for image, seed in zip(images, seeds, strict=True)
    ]
    if scores is None:
        return [Rendered(output) for output in saved]
    to_text = scores.to_text or [None] * len(saved)
    return [Rendered(*row) for row in zip(saved, scores.to_references, to_text, strict=True)]


def _references(prompt: Prompt) -> list[str]:
    if isinstance(prompt, ImagePrompt):
        return list(prompt.images)
    if isinstance(prompt, EditPrompt):
        return [prompt.image]
    return []


def _named_concept(prompt: Prompt, concept: str | None) -> list[str]:
    """`concept:NAME` when a text prompt names the applied concept ("my-star on the left"), else nothing."""
    if isinstance(prompt, TextPrompt) and concept is not None and mentions(prompt.prompt, concept):
        return [CONCEPT_REF_PREFIX + concept]
    return []


def _conditioning(
    context: ToolContext, prompt: Prompt, clip: ClipModel, stored: dict[str, Embeddings], concept: str | None
) -> tuple[PromptStates, PromptStates, Embeddings | None]:
    """(prompt states, negative states, reference embeddings or None) for the generator, `clip` the one in use. A
    text prompt that names the applied concept gets the concept's converted embedding where the name stands."""
    pipeline = context.runtime.pipeline()
    if isinstance(prompt, TextPrompt):
        named = _named_concept(prompt, concept)
        if named:
            name = str(concept)
            description = context.concept_store().get(name).description
            prompt_embeds, negative_embeds = named_concept_states(
                clip,
                pipeline,
                prompt.prompt,
                prompt.negative_prompt,
                name,
                stored[named[0]],
                description,
                _word_placer(context),
            )
        else:
            prompt_embeds, negative_embeds = encode_text_prompt(pipeline, prompt.prompt, prompt.negative_prompt)
        return prompt_embeds, negative_embeds, None
    refs = _references(prompt)
    references = embed_references(clip, [stored[ref] if ref in stored else context.images.load(ref) for ref in refs])
    if isinstance(prompt, ImagePrompt) and prompt.prompt is not None:
        prompt_embeds, negative_embeds = prompted_variation_states(
            clip, pipeline, references, prompt.prompt, prompt.converted_weight, prompt.weights
        )
    elif isinstance(prompt, ImagePrompt):
        prompt_embeds, negative_embeds = variation_states(clip, pipeline, references, prompt.weights)
    elif prompt.prompts is not None:
        source, edited = prompt.prompts
        prompt_embeds, negative_embeds = prompt_edit_states(clip, pipeline, references, source, edited, prompt.alpha)
    else:
        prompt_embeds, negative_embeds = edit_states(clip, pipeline, references, prompt.text, prompt.alpha)
    return prompt_embeds, negative_embeds, references


def _candidate_check(context: ToolContext, prompt: Prompt, concept: str | None) -> tuple[int, Judge]:
    """How many candidates each picture of a prompt or an edit naming the concept has, and the judge that keeps
    one (`ConceptTuningConfig.candidates_per_picture`, ours): the CLIP's similarity to the concept's description
    plus its mean similarity to the concept's pictures. Any other call draws one picture, as the paper."""
    count = context.runtime.profile.concept_tuning.candidates_per_picture
    named = isinstance(prompt, TextPrompt) and bool(_named_concept(prompt, concept))
    edited = isinstance(prompt, EditPrompt) and prompt.image == f"{CONCEPT_REF_PREFIX}{concept}"
    if concept is None or count == 1 or not (named or edited):
        return 1, lambda images: [0.0] * len(images)
    store = context.concept_store()
    description = store.get(concept).description
    generator_judge = _generator_judge(context, description)
    if generator_judge is not None:
        return count, generator_judge
    pictures = [Image.open(path).convert("RGB") for path in store.thumbnail_paths(concept)]
    return count, closeness_judge(context.runtime.clip(), pictures, description)


def _generator_judge(context: ToolContext, description: str | None) -> Judge | None:
    """The generator as the candidates' judge (`candidate_timesteps`): how much better the concept's description
    explains a candidate than the same with its other fills; None when the profile leaves it to the CLIP."""
    runtime = context.runtime
    timesteps, groups = runtime.profile.concept_tuning.candidate_timesteps, runtime.profile.concept_description
    alternatives = swapped_descriptions(description or "", groups.completion_words or [])
    if not timesteps or not alternatives:
        return None
    pipeline, clip = runtime.pipeline(), runtime.clip()
    return lambda images: description_margins(pipeline, clip, images, str(description), alternatives, timesteps)


def _word_placer(context: ToolContext) -> WordPlacer | None:
    """The LLM's rewrite when the profile places a concept's context words into its description, else None."""
    if not context.runtime.profile.concept_tuning.place_context_words:
        return None
    llm = context.runtime.llm()
    return lambda description, words: rewrite_prompt(llm, description, words)


def _scores(
    clip: ClipModel, images: list[Image.Image], prompt: Prompt, references: Embeddings | None
) -> ImageScores | None:
    if references is None:
        return None
    weights = prompt.weights if isinstance(prompt, ImagePrompt) else None
    text = prompt.text if isinstance(prompt, EditPrompt) else None
    return score_images(clip, images, references, weights, text)


# ------------------------------------------------------------------------------------------------ readable prompts


def picture_prompt(context: ToolContext, refs: Sequence[str], weights: Sequence[float] | None = None) -> str:
    """VGD's prompt for the reference(s) (with `weights`, their weighted mean), as `invert_image` writes it; for one
    `concept:NAME` taught with a description, that description: the user's own words, where VGD may invent."""
    if len(refs) == 1 and refs[0].startswith(CONCEPT_REF_PREFIX):
        description = context.concept_store().get(refs[0].removeprefix(CONCEPT_REF_PREFIX)).description
        if description:
            return description
    targets = reference_embeddings(context, refs)
    if weights is not None:
        targets = average_embeddings(targets, weights)
    # A learned concept has no picture of its own for the generator to judge.
    concepts = any(ref.startswith(CONCEPT_REF_PREFIX) for ref in refs)
    images = None if concepts else [context.images.load(ref) for ref in refs]
    progress = context.progress.scaled(0.0, 0.6, 1.0)
    return content_inversion(context, images, targets, weights=weights, progress=progress).best.text


def content_inversion(
    context: ToolContext,
    images: Sequence[Image.Image] | None,
    targets: Embeddings,
    max_length: int = 32,
    weights: Sequence[float] | None = None,
    progress: Progress | None = None,
) -> VgdResult:
    """VGD's inversion of the pictures' CLIP embeddings `targets`; with the profile's `vgd_rerank` (ours) and the
    pictures at hand, a best prompt naming several subjects is weighed by the generator against a one-subject decode
    (`methods.generator_score.generator_reranked`)."""
    runtime, progress = context.runtime, progress or context.progress
    llm, clip, settings = runtime.llm(), runtime.clip(), runtime.profile.vgd_rerank
    vocabulary = runtime_vocabulary(runtime, progress=progress.scaled(0.0, 0.1, 1.0))
    config = runtime.profile.vgd
    decode = partial(invert, llm, clip, targets, max_length=max_length, config=config)
    result = decode(vocabulary=vocabulary, progress=progress.scaled(0.1, 0.5, 1))
    alternative = one_subject_vocabulary(vocabulary, settings) if settings is not None and images else None
    if settings is None or not images or alternative is None or not names_several(result.best.text, settings):
        return result
    one_subject = decode(vocabulary=alternative, progress=progress.scaled(0.6, 0.35, 1))
    judging = progress.scaled(0.95, 0.05, 1.0)
    return generator_reranked(runtime.pipeline(), clip, images, result, [one_subject], settings, weights, judging)


# ------------------------------------------------------------------------------------------------ seeds and saving


def seeds_for(seed: int | None, count: int) -> list[int]:
    """Consecutive seeds from the given one (or a random start), one per image, so each is reproducible."""
    start = secrets.randbelow(2**32 - count) if seed is None else seed
    return [(start + i) % 2**32 for i in range(count)]


def _metadata(
    context: ToolContext, method: str, seed: int, sampling: SamplingRequest, extra: dict[str, str] | None
) -> dict[str, str]:
    """The PNG text chunks every output image carries."""
    return {
        "method": method,
        "seed": str(seed),
        "steps": str(sampling.steps),
        "guidance": str(sampling.guidance),
        **{f"model_{key}": value for key, value in context.runtime.model_ids().items()},
        **(extra or {}),
    }


def save_image(context: ToolContext, image: Image.Image, seed: int, metadata: dict[str, str]) -> OutputImage:
    saved = context.assets.save(image, metadata)
    return OutputImage(uri=saved.uri, path=saved.path, seed=seed, width=image.width, height=image.height)


# ------------------------------------------------------------------------------------------------ concepts


def load_concept(context: ToolContext, name: str | None) -> ConceptWeights | None:
    """The weights of concept `name` for `applied_concept`, or None when no concept is asked for."""
    if name is None:
        return None
    runtime = context.runtime
    stored = context.concept_store().load(name, base_hash(runtime.pipeline(), runtime.clip()), runtime.model_ids())
    return ConceptWeights.from_tensors(stored.tensors)


def concept_image_embedding(context: ToolContext, name: str) -> Embeddings:
    """The (1, P) CLIP image embedding `concept:NAME` stands for: its references' mean through the tuned encoder."""
    runtime = context.runtime
    clip = runtime.clip()
    embedding = context.concept_store().mean_embedding(name, base_hash(runtime.pipeline(), clip), runtime.model_ids())
    return embedding.to(clip.device)


def reference_embeddings(context: ToolContext, refs: Sequence[str]) -> Embeddings:
    """(N, P) CLIP image embeddings of image references, `concept:NAME` among them, through the base CLIP."""
    stored = stored_embeddings(context, refs)
    images = [stored[ref] if ref in stored else context.images.load(ref) for ref in refs]
    return embed_references(context.runtime.clip(), images)


def stored_embeddings(context: ToolContext, refs: Sequence[str]) -> dict[str, Embeddings]:
    """The embeddings the `concept:NAME` references among `refs` stand for."""
    return {
        ref: concept_image_embedding(context, ref.removeprefix(CONCEPT_REF_PREFIX))
        for ref in refs
        if ref.startswith(CONCEPT_REF_PREFIX)
    }
