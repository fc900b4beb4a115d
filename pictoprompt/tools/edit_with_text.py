"""`edit_with_text`: an image changed by words.

`rewrite` (the default): VGD writes the picture's prompt (or the caller gives it), the edit is put in place of the
words it replaces ("a red circle on the left" + "blue" -> "a blue circle on the left"), and the generator draws
the edited prompt (`methods.prompt_edit`). Both prompts come back, so the user sees what was understood.

`sd-ipc`: the paper's Eq. 8. The edit text keeps its own states up to its end-of-text token; from there on each
position carries the image's converted embedding plus `alpha` times the text's state. Where the picture already
holds the attribute the edit changes, the sum holds both values, and the generator draws either or a mix.

Neither copies the source's layout pixel for pixel: the picture is redrawn from its description.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import BaseModel, Field

from pictoprompt.methods.prompt_edit import rewrite_prompt
from pictoprompt.methods.vgd import runtime_vocabulary
from pictoprompt.tools.base import (
    DomainNote,
    ImageRef,
    LlmNote,
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
from pictoprompt.tools.render import EditPrompt, picture_prompt, render_and_score

EditMethod = Literal["rewrite", "sd-ipc"]
METHODS: dict[EditMethod, str] = {"rewrite": "prompt-rewrite-edit", "sd-ipc": "sd-ipc-edit"}
"""The method name each image's metadata records."""
DEFAULT_ALPHA: dict[EditMethod, float] = {"rewrite": 1.0, "sd-ipc": 0.9}


class EditWithTextInputs(ToolRequest):
    image: ImageRef
    text: str = Field(
        min_length=1,
        max_length=300,
        description="The change in words.",
    )
    method: EditMethod = Field(
        "rewrite",
        description="rewrite: edit the picture's prompt; sd-ipc: the paper's Eq. 8 (no LLM).",
    )
    source_prompt: str | None = Field(
        None,
        max_length=300,
        description="rewrite: the picture's prompt, if known.",
    )
    alpha: float | None = Field(
        None,
        ge=0.0,
        le=3.0,
        description="Edit strength (0: only the picture); default 1.0, sd-ipc 0.9.",
    )

    def image_refs(self) -> list[str]:
        return image_refs_to_fetch([self.image])


class EditWithTextRequest(SamplingRequest, EditWithTextInputs):
    num_images: NumImages = 4


class EditedImage(Variation):
    text_similarity: float = Field(
        description="CLIP cosine similarity between this image and the edit text; higher means the edit shows more."
    )


class EditWithTextResponse(BaseModel):
    text: str
    method: EditMethod
    alpha: float
    source_prompt: str | None = Field(description="rewrite: the picture's prompt, as given or as VGD wrote it.")
    edited_prompt: str | None = Field(description="rewrite: that prompt with the edit put in; what was drawn.")
    images: list[EditedImage] = Field(description="The edited images in seed order, each with its two scores.")
    llm_note: LlmNote = None
    domain_note: DomainNote = None


def edit_with_text(request: EditWithTextRequest, context: ToolContext) -> EditWithTextResponse:
    alpha = DEFAULT_ALPHA[request.method] if request.alpha is None else request.alpha
    source = edited = note = None
    drawing = context
    if request.method == "rewrite":
        llm = context.runtime.llm()
        note = llm.fallback_note
        source = (request.source_prompt or "").strip() or picture_prompt(context, [request.image])
        context.progress.report(0.6, 1.0, "Putting the edit into the picture's prompt")
        edited = rewrite_prompt(llm, source, request.text)
        drawing = replace(context, progress=context.progress.scaled(0.7, 0.3, 1.0))
    metadata = {"edit_text": request.text, "alpha": str(alpha)}
    if edited is not None:
        metadata |= {"source_prompt": source, "edited_prompt": edited}
    rendered = render_and_score(
        drawing,
        EditPrompt(request.image, request.text, alpha, None if edited is None else (source, edited)),
        request,
        METHODS[request.method],
        metadata,
    )
    return EditWithTextResponse(
        text=request.text,
        method=request.method,
        alpha=alpha,
        source_prompt=source,
        edited_prompt=edited,
        llm_note=note,
        domain_note=picture_note(context, [request.image]),
        images=[
            EditedImage(**r.image.model_dump(), image_similarity=r.image_similarity, text_similarity=r.text_similarity)
            for r in rendered
        ],
    )


SPEC = ToolSpec(
    name="edit_with_text",
    title="Edit an image with words",
    description=(
        "Make 1-8 images of a reference image with a change in words ('blue', 'on the left'). By default its prompt "
        "is written (or given as source_prompt) and edited; the layout is not copied. Each image reports its seed "
        "and CLIP similarity to the reference and the edit."
    ),
    request_model=EditWithTextRequest,
    response_model=EditWithTextResponse,
    run=edit_with_text,
    hints=ToolHints(read_only=False, destructive=False, idempotent=False, open_world=False),
    components=("generator", "clip", "llm"),
    warm_up=runtime_vocabulary,
)
