"""`vary_image`: variations of one or several reference images through SD-IPC's image-to-prompt conversion.

The references' CLIP embeddings (averaged when there are several, optionally weighted) become a pseudo-prompt
that the unchanged generator renders; no training and no caption are involved. Each variation reports how
close CLIP finds it to the references, so the assistant can point the user to the closest ones.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, model_validator

from pictoprompt.tools.base import (
    DomainNote,
    ImageRef,
    NumImages,
    SamplingRequest,
    ToolContext,
    ToolHints,
    ToolRequest,
    ToolSpec,
    Variation,
    image_refs_to_fetch,
    picture_note,
)
from pictoprompt.tools.render import ImagePrompt, render_and_score

METHOD = "sd-ipc-variation"


class VaryImageInputs(ToolRequest):
    images: list[ImageRef] = Field(
        min_length=1,
        max_length=5,
        description="Reference images; several are blended (their CLIP embeddings averaged).",
    )
    weights: list[Annotated[float, Field(ge=0.0)]] | None = Field(
        None,
        description="One weight per reference (default: equal); a larger one counts more in the blend.",
    )

    @model_validator(mode="after")
    def _one_weight_per_image(self) -> VaryImageInputs:
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


class VaryImageRequest(SamplingRequest, VaryImageInputs):
    num_images: NumImages = 4


class VaryImageResponse(BaseModel):
    images: list[Variation] = Field(description="The variations in seed order, each with its CLIP similarity.")
    domain_note: DomainNote = None


def vary_image(request: VaryImageRequest, context: ToolContext) -> VaryImageResponse:
    weights = request.weights or [1.0] * len(request.images)
    rendered = render_and_score(
        context,
        ImagePrompt(request.images, request.weights),
        request,
        METHOD,
        {"references": str(len(request.images)), "weights": ",".join(str(w) for w in weights)},
    )
    return VaryImageResponse(
        images=[Variation(**r.image.model_dump(), image_similarity=r.image_similarity) for r in rendered],
        domain_note=picture_note(context, request.images),
    )


SPEC = ToolSpec(
    name="vary_image",
    title="Make variations of images",
    description=(
        "Make 1-8 new images with the content and style of 1-5 reference images, no prompt needed (SD-IPC converts "
        "their CLIP embedding into a prompt embedding). Several references are blended, optionally weighted. Each "
        "image reports its seed and its CLIP similarity to the references (higher is closer)."
    ),
    request_model=VaryImageRequest,
    response_model=VaryImageResponse,
    run=vary_image,
    hints=ToolHints(read_only=False, destructive=False, idempotent=False, open_world=False),
)
