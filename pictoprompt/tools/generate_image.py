"""`generate_image`: text to image on the profile's generator, one reported seed per image."""

from __future__ import annotations

import secrets
from typing import Annotated

from PIL import Image
from pydantic import BaseModel, Field

from pictoprompt.methods.concept_tuning import applied_concept
from pictoprompt.methods.generation import default_size, encode_text_prompt, generate
from pictoprompt.tools.base import ConceptName, OutputImage, Seed, ToolContext, ToolHints, ToolRequest, ToolSpec
from pictoprompt.tools.concepts import load_concept

NumImages = Annotated[int, Field(ge=1, le=8, description="How many images to make (1-8).")]
Steps = Annotated[int, Field(ge=1, le=150, description="Denoising steps (DDIM); more is slower and finer.")]
Guidance = Annotated[
    float, Field(ge=0.0, le=30.0, description="Classifier-free guidance scale; higher follows the prompt harder.")
]
Side = Annotated[
    int | None,
    Field(ge=16, le=2048, multiple_of=8, description="Pixels, a multiple of 8; default the model's native size."),
]


class GenerateImageRequest(ToolRequest):
    prompt: str = Field(min_length=1, max_length=2000, description="What to draw.")
    negative_prompt: str = Field("", max_length=2000, description="What to steer away from.")
    num_images: NumImages = 1
    steps: Steps = 25
    guidance: Guidance = 7.5
    seed: Seed = None
    width: Side = None
    height: Side = None
    concept: ConceptName = None


class GenerateImageResponse(BaseModel):
    prompt: str
    images: list[OutputImage]


def seeds_for(seed: int | None, count: int) -> list[int]:
    """Consecutive seeds from the given one (or a random start), one per image, so each is reproducible."""
    start = secrets.randbelow(2**32 - count) if seed is None else seed
    return [(start + i) % 2**32 for i in range(count)]


def generation_metadata(
    context: ToolContext, method: str, seed: int, steps: int, guidance: float, **extra: str
) -> dict[str, str]:
    """The PNG text chunks every output image carries."""
    return {
        "method": method,
        "seed": str(seed),
        "steps": str(steps),
        "guidance": str(guidance),
        **{f"model_{key}": value for key, value in context.runtime.model_ids().items()},
        **extra,
    }


def save_images(
    context: ToolContext, images: list[Image.Image], seeds: list[int], metadata: list[dict[str, str]]
) -> list[OutputImage]:
    outputs = []
    for image, seed, meta in zip(images, seeds, metadata, strict=True):
        saved = context.assets.save(image, meta)
        outputs.append(OutputImage(uri=saved.uri, path=saved.path, seed=seed, width=image.width, height=image.height))
    return outputs


def generate_image(request: GenerateImageRequest, context: ToolContext) -> GenerateImageResponse:
    pipeline = context.runtime.pipeline()
    size = default_size(pipeline)
    seeds = seeds_for(request.seed, request.num_images)
    concept = load_concept(context, request.concept, pipeline, context.runtime.clip())
    with applied_concept(pipeline, context.runtime.clip(), concept):
        prompt_embeds, negative_embeds = encode_text_prompt(pipeline, request.prompt, request.negative_prompt)
        images = generate(
            pipeline,
            prompt_embeds,
            negative_embeds,
            seeds,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            width=request.width or size,
            height=request.height or size,
            progress=context.progress,
        )
    metadata = [
        generation_metadata(
            context,
            "text-to-image",
            seed,
            request.steps,
            request.guidance,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            concept=request.concept or "",
        )
        for seed in seeds
    ]
    return GenerateImageResponse(prompt=request.prompt, images=save_images(context, images, seeds, metadata))


SPEC = ToolSpec(
    name="generate_image",
    title="Generate images from a prompt",
    description=(
        "Generate 1-8 images from a text prompt with the loaded Stable Diffusion model. Each image reports its "
        "seed: call again with that seed and the same arguments to reproduce it."
    ),
    request_model=GenerateImageRequest,
    response_model=GenerateImageResponse,
    run=generate_image,
    hints=ToolHints(read_only=False, destructive=False, idempotent=False, open_world=False),
)
