"""`customize_concept`: learn a concept from 3-10 pictures in ~30 steps (SD-IPC-CT), and the CLI's domain training.

The concept is tuned in memory and written to the concept store only once tuning has finished, so a cancelled
or failed job leaves nothing behind (and an existing concept of that name untouched).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from PIL import Image
from pydantic import Field

from pictoprompt.errors import InvalidInputError
from pictoprompt.methods.concept_description import (
    CompletedDescription,
    closest_words,
    complete_description,
    describe,
)
from pictoprompt.methods.concept_tuning import tune_concept
from pictoprompt.methods.concept_weights import base_hash
from pictoprompt.methods.domain_tuning import train_domain
from pictoprompt.methods.tuning import TuningResult
from pictoprompt.methods.vgd import runtime_vocabulary
from pictoprompt.models.concepts import ConceptCard, ConceptStore, ConceptSummary
from pictoprompt.models.profiles import ConceptTuning
from pictoprompt.models.runtime import Runtime
from pictoprompt.progress import Progress
from pictoprompt.tools.base import (
    ConceptName,
    DomainNote,
    ImageRef,
    ToolContext,
    ToolHints,
    ToolRequest,
    ToolSpec,
    picture_note,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class CustomizeConceptRequest(ToolRequest):
    name: ConceptName
    images: list[ImageRef] = Field(
        min_length=3,
        max_length=10,
        description="Pictures of the concept, ideally varied in pose, position and background.",
    )
    iterations: int | None = Field(None, ge=1, le=500, description="Tuning steps; default: the profile's (paper: 30).")
    learning_rate: float | None = Field(
        None,
        gt=0.0,
        le=1e-3,
        description="Constant learning rate of every tuned weight; default: the profile's (paper: 5e-6), which may "
        "give the deep prompts their own while aligning to a description.",
    )
    description: str | None = Field(
        None,
        max_length=200,
        description="Optional: what the pictures show in a few words ('a green heart', 'a ginger cat'). Tuning aligns "
        "to them; they follow its name in prompts and start edits of image='concept:NAME'.",
    )
    complete_description: bool = Field(
        True,
        description="Let the generator complete the description (or write one) from the pictures.",
    )
    overwrite: bool = Field(False, description="Replace an existing concept of the same name.")

    def image_refs(self) -> list[str]:
        return list(self.images)


class CustomizeConceptResponse(ConceptSummary):
    domain_note: DomainNote = None


def concept_card(
    name: str,
    kind: Literal["concept", "domain"],
    result: TuningResult,
    runtime: Runtime,
    description: str | None = None,
    completed_with: str | None = None,
) -> ConceptCard:
    """The card of a finished tuning on `runtime`'s base models; the store fills in the thumbnails and the
    reference count."""
    return ConceptCard(
        name=name,
        kind=kind,
        description=description,
        completed_with=completed_with,
        method=str(result.hyperparameters["method"]),
        base_models=runtime.model_ids(),
        base_hash=base_hash(runtime.pipeline(), runtime.clip()),
        hyperparameters=result.hyperparameters,
        iterations=len(result.losses),
        final_loss=result.losses[-1] if result.losses else None,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        training_seconds=round(result.seconds, 2),
        reference_count=0,
        thumbnails=[],
        losses=result.losses,
        mean_image_embedding=result.mean_image_embedding[0].tolist(),
        mean_converted_embedding=result.mean_converted_embedding[0].tolist(),
    )


def prompt_learning_rate(defaults: ConceptTuning, description: str | None, asked: float | None) -> float | None:
    """The deep prompts' own rate: the profile's for aligning to a description, unless the request sets the
    learning rate (then every weight's); None means the K/V deltas' rate."""
    aligned = description is not None and defaults.caption_alignment > 0
    return defaults.aligned_prompt_learning_rate if aligned and asked is None else None


def completion_candidates(
    runtime: Runtime, references: list[Image.Image], defaults: ConceptTuning, progress: Progress
) -> list[list[str]]:
    """The groups of words a description may be completed with: the profile's, else each of the vocabulary's words
    closest to the pictures alone."""
    if defaults.completion_words is not None:
        return defaults.completion_words
    # The whole vocabulary is embedded once per CLIP (then read from the cache): minutes on a CPU the first time.
    vocabulary = runtime_vocabulary(runtime, progress)
    words = closest_words(runtime.clip(), vocabulary, references, defaults.completion_candidates)
    return [[word] for word in words]


def completed(
    runtime: Runtime, references: list[Image.Image], description: str | None, progress: Progress
) -> CompletedDescription:
    """The user's description with the word the pictures show best, or without one, the profile's nouns with a
    word of each completion group that the generator writes."""
    defaults = runtime.profile.concept_tuning
    pipeline, clip = runtime.pipeline(), runtime.clip()
    if description is None:
        groups = [*(defaults.completion_words or []), defaults.description_nouns or []]
        return describe(
            pipeline,
            clip,
            references,
            groups,
            timesteps=defaults.completion_timesteps,
            threshold=defaults.completion_threshold,
            alignment=defaults.completion_alignment,
            progress=progress,
        )
    return complete_description(
        pipeline,
        clip,
        references,
        description,
        completion_candidates(runtime, references, defaults, progress.scaled(0.0, 0.2, 1.0)),
        timesteps=defaults.completion_timesteps,
        threshold=defaults.completion_threshold,
        alignment=defaults.completion_alignment,
        progress=progress.scaled(0.2, 0.8, 1.0),
    )


def customize_concept(request: CustomizeConceptRequest, context: ToolContext) -> CustomizeConceptResponse:
    store = context.concept_store()
    store.check_free(request.name, request.overwrite)  # before minutes of tuning, not after
    pipeline, clip = context.runtime.pipeline(), context.runtime.clip()
    references = [context.images.load(ref) for ref in request.images]
    defaults = context.runtime.profile.concept_tuning
    description = " ".join((request.description or "").split()) or None
    completed_with, tuning_progress = None, context.progress
    if request.complete_description and (description is not None or defaults.description_nouns):
        # Half the bar: on `shapes` the completion, with its alignment, took longer than the tuning (about 10 s
        # against 4 s); on real profiles the tuning's passes with gradients through ViT-L or ViT-H take longer.
        completion = completed(context.runtime, references, description, context.progress.scaled(0.0, 0.5, 1.0))
        description, completed_with = completion.description or None, completion.added
        tuning_progress = context.progress.scaled(0.5, 0.5, 1.0)
    result = tune_concept(
        pipeline,
        clip,
        references,
        iterations=request.iterations or defaults.iterations,
        learning_rate=request.learning_rate or defaults.learning_rate,
        prompt_learning_rate=prompt_learning_rate(defaults, description, request.learning_rate),
        neutral_fit_steps=defaults.neutral_fit_steps,
        description=description,
        caption_alignment=defaults.caption_alignment,
        progress=tuning_progress,
    )
    card = concept_card(request.name, "concept", result, context.runtime, description, completed_with)
    summary = store.save(card, result.weights.to_tensors(), references, overwrite=request.overwrite).summary()
    return CustomizeConceptResponse(**summary.model_dump(), domain_note=picture_note(context, request.images))


def read_captions(images_dir: Path, captions_file: Path) -> tuple[list[Image.Image], list[str], list[str] | None]:
    """Images, captions and (when every line has one) classes from a JSON-lines file, one object per image:
    `{"file_name": "cat1.png", "text": "a photo of a cat", "class": "cat"}` (Hugging Face's imagefolder
    `metadata.jsonl` layout; `class` is optional and turns on A/B targets)."""
    images, captions, classes = [], [], []
    try:
        lines = captions_file.read_text().splitlines()
    except OSError as error:
        raise InvalidInputError(f"Cannot read the captions file {captions_file}: {error}.") from error
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            path = images_dir / entry["file_name"]
            caption = str(entry["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise InvalidInputError(
                f"Line {number} of {captions_file} is not a JSON object with 'file_name' and 'text' ({error})."
            ) from error
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            raise InvalidInputError(f"Line {number} of {captions_file} names {path}, which is not an image file.")
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
        captions.append(caption)
        classes.append(entry.get("class"))
    if not images:
        raise InvalidInputError(f"{captions_file} lists no images.")
    with_class = [c for c in classes if c is not None]
    if with_class and len(with_class) != len(classes):
        raise InvalidInputError(f"In {captions_file}, give a 'class' on every line or on none.")
    return images, captions, [str(c) for c in classes] if with_class else None


def train_domain_adapter(
    runtime: Runtime,
    store: ConceptStore,
    name: str,
    images_dir: Path,
    captions_file: Path,
    iterations: int | None = None,
    learning_rate: float | None = None,
    batch_size: int = 4,
    caption_alignment: float | None = None,
    prompt_learning_rate: float | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ConceptSummary:
    """`pictoprompt train-domain`: SD-IPC-FT on captioned images, saved in the store as a 'domain' concept. Settings
    left None are the profile's (`Profile.domain_tuning`)."""
    store.check_free(name, overwrite)
    defaults = runtime.profile.domain_tuning
    images, captions, classes = read_captions(images_dir, captions_file)
    pipeline, clip = runtime.pipeline(), runtime.clip()
    result = train_domain(
        pipeline,
        clip,
        images,
        captions,
        classes,
        iterations=iterations or defaults.iterations,
        learning_rate=learning_rate or defaults.learning_rate,
        batch_size=batch_size,
        caption_alignment=defaults.caption_alignment if caption_alignment is None else caption_alignment,
        prompt_learning_rate=prompt_learning_rate or defaults.prompt_learning_rate,
        neutral_fit_steps=runtime.profile.concept_tuning.neutral_fit_steps,
        progress=progress,
    )
    card = concept_card(name, "domain", result, runtime)
    # A domain has ~100 images; a handful of thumbnails is enough to recognise it.
    return store.save(card, result.weights.to_tensors(), images[:10], overwrite=overwrite).summary()


SPEC = ToolSpec(
    name="customize_concept",
    title="Learn a concept from a few pictures",
    description=(
        "Teach the model a concept (an object, a pet, a person) from 3-10 pictures (SD-IPC-CT), optionally with a "
        "few words of what it is. Then pass concept=NAME to generate_image (NAME in its prompt stands for it), "
        "vary_image or edit_with_text, and image='concept:NAME' instead of re-sending pictures. Nothing is saved "
        "unless the job finishes."
    ),
    request_model=CustomizeConceptRequest,
    response_model=CustomizeConceptResponse,
    run=customize_concept,
    hints=ToolHints(read_only=False, destructive=True, idempotent=False, open_world=False),
)
