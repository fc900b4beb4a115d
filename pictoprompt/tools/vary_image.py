"""`vary_image`: variations of one or several reference images through SD-IPC's image-to-prompt conversion.

The references' CLIP embeddings (averaged when there are several, optionally weighted) become a pseudo-prompt
that the unchanged generator renders; no training and no caption are involved. Each variation reports how
close CLIP finds it to the references, so the assistant can point the user to the closest ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import BaseModel, Field, model_validator

from pictoprompt.methods.concept_tuning import applied_concept
from pictoprompt.methods.generation import default_size, generate
from pictoprompt.methods.sd_ipc import ImageToPrompt, average_embeddings
from pictoprompt.models.clip import ClipModel
from pictoprompt.tools.base import (
    ConceptName,
    ImageRef,
    OutputImage,
    Seed,
    ToolContext,
    ToolHints,
    ToolRequest,
    ToolSpec,
)
from pictoprompt.tools.concepts import image_refs_to_fetch, load_concept, reference_embeddings, stored_embeddings
from pictoprompt.tools.generate_image import (
    Guidance,
    NumImages,
    Side,
    Steps,
    generation_metadata,
    save_images,
    seeds_for,
)

METHOD = "sd-ipc-variation"

ImageSimilarity = Annotated[
    float,
    Field(
        description="CLIP cosine similarity between this image and the reference image(s) (weighted mean over the "
        "references); higher means closer."
    ),
]


class VaryImageRequest(ToolRequest):
    images: list[ImageRef] = Field(
        min_length=1,
        max_length=5,
        description="1-5 reference images. Several are blended: their CLIP embeddings are averaged.",
    )
    weights: list[Annotated[float, Field(ge=0.0)]] | None = Field(
        None,
        description="One non-negative weight per reference image (default: equal); a larger weight makes that "
        "image count more in the blend.",
    )
    num_images: NumImages = 4
    steps: Steps = 25
    guidance: Guidance = 7.5
    seed: Seed = None
    width: Side = None
    height: Side = None
    concept: ConceptName = None

    @model_validator(mode="after")
    def _one_weight_per_image(self) -> VaryImageRequest:
        if self.weights is not None:
            if len(self.weights) != len(self.images):
                raise ValueError(
                    f"weights has {len(self.weights)} entries for {len(self.images)} images; give one per image."
                )
            if sum(self.weights) <= 0:
                raise ValueError("at least one weight must be positive.")
        return self

    def image_refs(self) -> list[str]:
        return image_refs_to_fetch(list(self.images))


class Variation(OutputImage):
    image_similarity: ImageSimilarity


class VaryImageResponse(BaseModel):
    images: list[Variation] = Field(description="The variations in seed order, each with its CLIP similarity.")


def weighted_similarity(
    clip: ClipModel, output_embeds: torch.Tensor, reference_embeds: torch.Tensor, weights: Sequence[float] | None
) -> list[float]:
    """Per output image: the weighted mean of its cosine similarities to each reference."""
    similarities = clip.similarity(output_embeds, reference_embeds)
    w = torch.tensor(list(weights) if weights else [1.0] * reference_embeds.shape[0], device=similarities.device)
    return (similarities @ (w / w.sum())).tolist()


def vary_image(request: VaryImageRequest, context: ToolContext) -> VaryImageResponse:
    pipeline, clip = context.runtime.pipeline(), context.runtime.clip()
    size = default_size(pipeline)
    seeds = seeds_for(request.seed, request.num_images)
    concept = load_concept(context, request.concept, pipeline, clip)
    stored = stored_embeddings(context, list(request.images), pipeline, clip)
    with applied_concept(pipeline, clip, concept) as clip:
        with torch.no_grad():
            converter = ImageToPrompt.cached(clip, pipeline)
            reference_embeds = reference_embeddings(context, list(request.images), clip, stored)
            prompt_embeds = converter.prompt(average_embeddings(reference_embeds, request.weights))
        images = generate(
            pipeline,
            prompt_embeds,
            converter.empty_states,
            seeds,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            width=request.width or size,
            height=request.height or size,
            progress=context.progress,
        )
        with torch.no_grad():
            similarity = weighted_similarity(clip, clip.encode_image(images), reference_embeds, request.weights)
    references = request.images
    weights = ",".join(str(w) for w in request.weights or [1.0] * len(references))
    metadata = [
        generation_metadata(
            context, METHOD, seed, request.steps, request.guidance, references=str(len(references)), weights=weights
        )
        for seed in seeds
    ]
    saved = save_images(context, images, seeds, metadata)
    return VaryImageResponse(
        images=[
            Variation(**output.model_dump(), image_similarity=score)
            for output, score in zip(saved, similarity, strict=True)
        ]
    )


SPEC = ToolSpec(
    name="vary_image",
    title="Make variations of images",
    description=(
        "Make 1-8 new images with the content and style of 1-5 reference images, without any prompt (SD-IPC: the "
        "references' CLIP embedding is converted into a prompt embedding). Several references are blended, "
        "optionally weighted. Each image reports its seed and its CLIP similarity to the references, so the "
        "closest variations can be picked."
    ),
    request_model=VaryImageRequest,
    response_model=VaryImageResponse,
    run=vary_image,
    hints=ToolHints(read_only=False, destructive=False, idempotent=False, open_world=False),
)
