"""`invert_image`: readable prompts that regenerate an image (or its style), by visually guided decoding.

The profile's LLM writes the prompt while the generator's own CLIP steers every token towards the image(s) (VGD,
`methods/vgd.py`). Each prompt comes with its CLIP similarity to the image(s) and its perplexity under the LLM,
so the assistant can weigh faithfulness against readability. `focus="style"` asks for the images' shared style
and says how to apply it to another subject.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from pictoprompt.methods.scoring import Embeddings, prompt_similarities
from pictoprompt.methods.vgd import (
    VgdResult,
    image_targets,
    invert,
    runtime_vocabulary,
    style_target,
    text_perplexities,
)
from pictoprompt.tools.base import (
    ImageRef,
    LlmNote,
    MaxTokens,
    Perplexity,
    ToolContext,
    ToolHints,
    ToolRequest,
    ToolSpec,
)

STYLE_TEMPLATE = "{subject} in the style of {style}"
"""How the paper applies an extracted style prompt (section 4, style transfer)."""

ClipSimilarity = Annotated[
    float,
    Field(
        description="CLIP cosine similarity between the prompt and the image(s), mean over images; higher is closer."
    ),
]


class InvertImageRequest(ToolRequest):
    images: list[ImageRef] = Field(
        min_length=1,
        max_length=5,
        description="Several are described together: the prompt has to match each.",
    )
    focus: Literal["content", "style"] = Field(
        "content",
        description="content: what is shown and how; style: only the style, colours and shapes.",
    )
    max_tokens: MaxTokens = 32
    num_results: int = Field(3, ge=1, le=10, description="Distinct prompts to return, best first.")
    method: Literal["vgd"] = Field("vgd", description="Visually guided decoding (an LLM steered by CLIP).")

    def image_refs(self) -> list[str]:
        return list(self.images)


class InvertedPrompt(BaseModel):
    prompt: str
    score: float = Field(description="The decoder's length-penalised score (LLM + CLIP); higher is better.")
    clip_similarity: ClipSimilarity
    perplexity: Perplexity
    apply_style_as: str | None = Field(
        None, description="focus=style only: the prompt to use for a new subject, replacing {subject}."
    )


class InvertImageResponse(BaseModel):
    focus: Literal["content", "style"]
    method: str
    prompts: list[InvertedPrompt] = Field(description="Distinct prompts, best first.")
    initial_condition: str | None = Field(
        description="The start word closest to the image(s) (from the profile's word list, or the CLIP vocabulary), "
        "given to the LLM to start from."
    )
    llm_note: LlmNote = None


def ranked_prompts(
    context: ToolContext, result: VgdResult, targets: Embeddings, count: int, style: bool
) -> list[InvertedPrompt]:
    """The best `count` hypotheses with their CLIP similarity to `targets` (the images' embeddings) and their
    perplexity."""
    hypotheses = [result.best, *result.hypotheses[1:count]]
    clip, llm = context.runtime.clip(), context.runtime.llm()
    texts = [h.text for h in hypotheses]
    similarity = [sum(row) / len(row) for row in prompt_similarities(clip, texts, targets)]
    perplexities = text_perplexities(llm, texts)
    return [
        InvertedPrompt(
            prompt=h.text,
            score=h.final_score,
            clip_similarity=s,
            perplexity=p,
            apply_style_as=STYLE_TEMPLATE.replace("{style}", h.text) if style else None,
        )
        for h, s, p in zip(hypotheses, similarity, perplexities, strict=True)
    ]


def invert_image(request: InvertImageRequest, context: ToolContext) -> InvertImageResponse:
    clip, llm = context.runtime.clip(), context.runtime.llm()
    images = [context.images.load(ref) for ref in request.images]
    style = request.focus == "style"
    embeddings = image_targets(clip, images)
    targets = style_target(clip, images) if style else embeddings
    result = invert(
        llm,
        clip,
        targets,
        task="style" if style else "inversion",
        vocabulary=runtime_vocabulary(context.runtime, progress=context.progress),
        max_length=request.max_tokens,
        progress=context.progress,
    )
    return InvertImageResponse(
        focus=request.focus,
        method=request.method,
        prompts=ranked_prompts(context, result, embeddings, request.num_results, style),
        initial_condition=result.initial_condition,
        llm_note=llm.fallback_note,
    )


SPEC = ToolSpec(
    name="invert_image",
    title="Turn images into a readable prompt",
    description=(
        "Write readable prompts that regenerate 1-5 images on the loaded model (VGD: an LLM writes, CLIP steers). "
        "Returns the best prompts with their CLIP similarity to the images (higher is closer) and perplexity "
        "(lower reads better). focus='style' extracts only the style, to use as '{subject} in the style of ...'."
    ),
    request_model=InvertImageRequest,
    response_model=InvertImageResponse,
    run=invert_image,
    hints=ToolHints(read_only=True, destructive=False, idempotent=True, open_world=False),
    components=("generator", "clip", "llm"),
    # The start words' embeddings (the whole CLIP vocabulary's, cached on disk) a first inversion would wait for.
    warm_up=runtime_vocabulary,
)
