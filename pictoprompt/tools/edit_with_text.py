"""`edit_with_text`: an image changed by words, through SD-IPC's text-edited conversion (paper Eq. 8).

The edit text keeps its own states up to its end-of-text token; from there on each position carries the
image's converted embedding plus `alpha` times the text's state. The generator is unchanged and, unlike
inversion-based editing, the layout of the source image is not copied.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from pictoprompt.methods.concept_tuning import applied_concept
from pictoprompt.methods.generation import default_size, generate
from pictoprompt.methods.sd_ipc import ImageToPrompt
from pictoprompt.tools.base import ConceptName, ImageRef, Seed, ToolContext, ToolHints, ToolRequest, ToolSpec
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
from pictoprompt.tools.vary_image import Variation, weighted_similarity

METHOD = "sd-ipc-edit"


class EditWithTextRequest(ToolRequest):
    image: ImageRef
    text: str = Field(
        min_length=1,
        max_length=300,
        description="The change in words, e.g. 'in the snow', 'as a watercolor', 'wearing a hat'.",
    )
    alpha: float = Field(
        0.9,
        ge=0.0,
        le=3.0,
        description="How much the words count against the picture: 0 keeps only the picture's content, 0.9 is "
        "the paper's setting, higher applies the edit more strongly.",
    )
    num_images: NumImages = 4
    steps: Steps = 25
    guidance: Guidance = 7.5
    seed: Seed = None
    width: Side = None
    height: Side = None
    concept: ConceptName = None

    def image_refs(self) -> list[str]:
        return image_refs_to_fetch([self.image])


class EditedImage(Variation):
    text_similarity: float = Field(
        description="CLIP cosine similarity between this image and the edit text; higher means the edit shows more."
    )


class EditWithTextResponse(BaseModel):
    text: str
    alpha: float
    images: list[EditedImage] = Field(description="The edited images in seed order, each with its two scores.")


def edit_with_text(request: EditWithTextRequest, context: ToolContext) -> EditWithTextResponse:
    pipeline, clip = context.runtime.pipeline(), context.runtime.clip()
    size = default_size(pipeline)
    seeds = seeds_for(request.seed, request.num_images)
    concept = load_concept(context, request.concept, pipeline, clip)
    stored = stored_embeddings(context, [request.image], pipeline, clip)
    with applied_concept(pipeline, clip, concept) as clip:
        with torch.no_grad():
            converter = ImageToPrompt.cached(clip, pipeline)
            reference_embeds = reference_embeddings(context, [request.image], clip, stored)
            prompt_embeds = converter.edit(reference_embeds, request.text, request.alpha)
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
            output_embeds = clip.encode_image(images)
            image_similarity = weighted_similarity(clip, output_embeds, reference_embeds, None)
            text_similarity = clip.similarity(output_embeds, clip.encode_text([request.text]))[:, 0].tolist()
    metadata = [
        generation_metadata(
            context, METHOD, seed, request.steps, request.guidance, edit_text=request.text, alpha=str(request.alpha)
        )
        for seed in seeds
    ]
    saved = save_images(context, images, seeds, metadata)
    return EditWithTextResponse(
        text=request.text,
        alpha=request.alpha,
        images=[
            EditedImage(**output.model_dump(), image_similarity=image_score, text_similarity=text_score)
            for output, image_score, text_score in zip(saved, image_similarity, text_similarity, strict=True)
        ],
    )


SPEC = ToolSpec(
    name="edit_with_text",
    title="Edit an image with words",
    description=(
        "Make 1-8 images that keep the content of a reference image and apply a change given in words ('in the "
        "snow', 'as a watercolor', 'wearing a hat'); SD-IPC's text-edited conversion, no training. The layout of "
        "the reference is not copied. `alpha` sets how strongly the words count (default 0.9). Each image reports "
        "its seed, its CLIP similarity to the reference and its CLIP similarity to the edit text."
    ),
    request_model=EditWithTextRequest,
    response_model=EditWithTextResponse,
    run=edit_with_text,
    hints=ToolHints(read_only=False, destructive=False, idempotent=False, open_world=False),
)
