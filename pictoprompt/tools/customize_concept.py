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
from pydantic import Field, ValidationError

from pictoprompt.configs import ConceptTuningConfig, DescriptionConfig, DomainTuningConfig
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
        description="Varied pictures of the concept.",
    )
    iterations: int | None = Field(None, ge=1, le=500, description="Default: the profile's (paper: 30).")
    learning_rate: float | None = Field(
        None,
        gt=0.0,
        le=1e-3,
        description="Default: the profile's (paper: 5e-6).",
    )
    description: str | None = Field(
        None,
        max_length=200,
        description="Optional: what the pictures show ('a green heart'); tuning aligns to it.",
    )
    complete_description: bool = Field(
        True,
        description="Complete (or write) the description from the pictures.",
    )
    overwrite: bool = Field(False, description="Replace a concept of that name.")

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


def completion_candidates(
    runtime: Runtime, references: list[Image.Image], config: DescriptionConfig, progress: Progress
) -> list[list[str]]:
    """The groups of words a description may be completed with: the profile's, else each of the vocabulary's words
    closest to the pictures alone."""
    if config.completion_words is not None:
        return config.completion_words
    # The whole vocabulary is embedded once per CLIP (then read from the cache): minutes on a CPU the first time.
    vocabulary = runtime_vocabulary(runtime, progress)
    words = closest_words(runtime.clip(), vocabulary, references, config.completion_candidates)
    return [[word] for word in words]


def completed(
    runtime: Runtime, references: list[Image.Image], description: str | None, progress: Progress
) -> CompletedDescription:
    """The user's description with the word the pictures show best, or without one, the profile's nouns with a
    word of each completion group that the generator writes."""
    config = runtime.profile.concept_description
    pipeline, clip = runtime.pipeline(), runtime.clip()
    if description is None:
        return describe(pipeline, clip, references, config, progress)
    candidates = completion_candidates(runtime, references, config, progress.scaled(0.0, 0.2, 1.0))
    return complete_description(
        pipeline, clip, references, description, candidates, config, progress.scaled(0.2, 0.8, 1.0)
    )


def tuning_config(request: CustomizeConceptRequest, profile: ConceptTuningConfig) -> ConceptTuningConfig:
    """The profile's SD-IPC-CT config with what the request sets: a learning rate set is every weight's."""
    if request.learning_rate is not None:
        profile = profile.model_copy(
            update={
                "learning_rate": request.learning_rate,
                "prompt_learning_rate": None,
                "aligned_prompt_learning_rate": None,
            }
        )
    return profile.model_copy(update={"iterations": request.iterations or profile.iterations})


def customize_concept(request: CustomizeConceptRequest, context: ToolContext) -> CustomizeConceptResponse:
    store = context.concept_store()
    store.check_free(request.name, request.overwrite)  # before minutes of tuning, not after
    pipeline, clip = context.runtime.pipeline(), context.runtime.clip()
    references = [context.images.load(ref) for ref in request.images]
    profile = context.runtime.profile
    description = " ".join((request.description or "").split()) or None
    completed_with, tuning_progress = None, context.progress
    if request.complete_description and (description is not None or profile.concept_description.description_nouns):
        # Half the bar: on `shapes` the completion, with its alignment, took longer than the tuning (about 10 s
        # against 4 s); on real profiles the tuning's passes with gradients through ViT-L or ViT-H take longer.
        completion = completed(context.runtime, references, description, context.progress.scaled(0.0, 0.5, 1.0))
        description, completed_with = completion.description or None, completion.added
        tuning_progress = context.progress.scaled(0.5, 0.5, 1.0)
    config = tuning_config(request, profile.concept_tuning)
    result = tune_concept(pipeline, clip, references, config, description, tuning_progress)
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


def domain_tuning_config(profile: DomainTuningConfig, **options: float | int | None) -> DomainTuningConfig:
    """The profile's SD-IPC-FT config with the `options` given (None: the profile's), validated."""
    given = {name: value for name, value in options.items() if value is not None}
    try:
        return DomainTuningConfig.model_validate({**profile.model_dump(), **given})
    except ValidationError as error:
        raise InvalidInputError(f"Invalid domain training settings: {error}") from error


def train_domain_adapter(
    runtime: Runtime,
    store: ConceptStore,
    name: str,
    training_set: tuple[Path, Path],
    config: DomainTuningConfig,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ConceptSummary:
    """`pictoprompt train-domain`: SD-IPC-FT on the captioned images of `training_set` (the images' folder and the
    captions file), saved in the store as a 'domain' concept."""
    store.check_free(name, overwrite)
    images, captions, classes = read_captions(*training_set)
    result = train_domain(runtime.pipeline(), runtime.clip(), images, captions, classes, config, progress)
    card = concept_card(name, "domain", result, runtime)
    # A domain has ~100 images; a handful of thumbnails is enough to recognise it.
    return store.save(card, result.weights.to_tensors(), images[:10], overwrite=overwrite).summary()


SPEC = ToolSpec(
    name="customize_concept",
    title="Learn a concept from a few pictures",
    description=(
        "Teach a concept (object, pet, person) from 3-10 pictures (SD-IPC-CT), optionally described in a few words. "
        "Then use concept=NAME in generate_image (NAME in the prompt stands for it), vary_image or edit_with_text, "
        "or image='concept:NAME'."
    ),
    request_model=CustomizeConceptRequest,
    response_model=CustomizeConceptResponse,
    run=customize_concept,
    hints=ToolHints(read_only=False, destructive=True, idempotent=False, open_world=False),
)
