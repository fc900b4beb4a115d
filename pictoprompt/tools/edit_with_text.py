"""`edit_with_text`: an image changed by words, through SD-IPC's text-edited conversion (paper Eq. 8).

The edit text keeps its own states up to its end-of-text token; from there on each position carries the
image's converted embedding plus `alpha` times the text's state. The generator is unchanged and, unlike
inversion-based editing, the layout of the source image is not copied.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from pictoprompt.tools.base import (
    AppliedConcept,
    Guidance,
    ImageRef,
    NumImages,
    Seed,
    Side,
    Steps,
    ToolContext,
    ToolHints,
    ToolRequest,
    ToolSpec,
    Variation,
    image_refs_to_fetch,
)
from pictoprompt.tools.render import EditPrompt, Sampling, render_and_score

METHOD = "sd-ipc-edit"


class EditWithTextRequest(ToolRequest):
    image: ImageRef
    text: str = Field(
        min_length=1,
        max_length=300,
        description="The change in words.",
    )
    alpha: float = Field(
        0.9,
        ge=0.0,
        le=3.0,
        description="How strongly the words count: 0 keeps only the picture, 0.9 is the paper's setting.",
    )
    num_images: NumImages = 4
    steps: Steps = 25
    guidance: Guidance = 7.5
    seed: Seed = None
    width: Side = None
    height: Side = None
    concept: AppliedConcept = None

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
    rendered = render_and_score(
        context,
        EditPrompt(request.image, request.text, request.alpha),
        Sampling.of(request),
        METHOD,
        {"edit_text": request.text, "alpha": str(request.alpha)},
    )
    return EditWithTextResponse(
        text=request.text,
        alpha=request.alpha,
        images=[
            EditedImage(**r.image.model_dump(), image_similarity=r.image_similarity, text_similarity=r.text_similarity)
            for r in rendered
        ],
    )


SPEC = ToolSpec(
    name="edit_with_text",
    title="Edit an image with words",
    description=(
        "Make 1-8 images that keep a reference image's content and apply a change in words ('in the snow', 'as a "
        "watercolor', 'wearing a hat'); SD-IPC, no training, the layout is not copied. Each image reports its seed "
        "and its CLIP similarity to the reference and to the edit text."
    ),
    request_model=EditWithTextRequest,
    response_model=EditWithTextResponse,
    run=edit_with_text,
    hints=ToolHints(read_only=False, destructive=False, idempotent=False, open_world=False),
)
