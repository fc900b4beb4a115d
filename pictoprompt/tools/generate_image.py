"""`generate_image`: text to image on the profile's generator, one reported seed per image."""

from __future__ import annotations

from pydantic import BaseModel, Field

from pictoprompt.tools.base import (
    OutputImage,
    SamplingRequest,
    ToolContext,
    ToolHints,
    ToolRequest,
    ToolSpec,
)
from pictoprompt.tools.render import TextPrompt, render_and_score

METHOD = "text-to-image"


class GenerateImageInputs(ToolRequest):
    prompt: str = Field(
        min_length=1,
        max_length=2000,
        description="What to draw; with concept=NAME, NAME here stands for it.",
    )
    negative_prompt: str = Field("", max_length=2000, description="What to steer away from.")


class GenerateImageRequest(SamplingRequest, GenerateImageInputs):
    pass


class GenerateImageResponse(BaseModel):
    prompt: str
    images: list[OutputImage]


def generate_image(request: GenerateImageRequest, context: ToolContext) -> GenerateImageResponse:
    rendered = render_and_score(
        context,
        TextPrompt(request.prompt, request.negative_prompt),
        request,
        METHOD,
        {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "concept": request.concept or ""},
    )
    return GenerateImageResponse(prompt=request.prompt, images=[r.image for r in rendered])


SPEC = ToolSpec(
    name="generate_image",
    title="Generate images from a prompt",
    description=("Generate 1-8 images from a text prompt; each reports the seed that reproduces it."),
    request_model=GenerateImageRequest,
    response_model=GenerateImageResponse,
    run=generate_image,
    hints=ToolHints(read_only=False, destructive=False, idempotent=False, open_world=False),
)
