"""`invert_image`: readable prompts that regenerate an image (or its style), by visually guided decoding.

The profile's LLM writes the prompt while the generator's own CLIP steers every token towards the image(s) (VGD,
`methods/vgd.py`). Each prompt comes with its CLIP similarity to the image(s) and its perplexity under the LLM,
so the assistant can weigh faithfulness against readability. `focus="style"` asks for the images' shared style
and says how to apply it to another subject.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import BaseModel, Field

from pictoprompt.methods.vgd import (
    ClipVocabulary,
    VgdResult,
    image_targets,
    invert,
    runtime_vocabulary,
    style_target,
    text_perplexities,
)
from pictoprompt.models.clip import ClipModel
from pictoprompt.models.runtime import Runtime
from pictoprompt.tools.base import ImageRef, LlmNote, ToolContext, ToolHints, ToolRequest, ToolSpec

STYLE_TEMPLATE = "{subject} in the style of {style}"
"""How the paper applies an extracted style prompt (section 4, style transfer)."""

MaxTokens = Annotated[
    int,
    Field(ge=4, le=75, description="Longest prompt in LLM tokens (the paper uses 16, 32 or 64); CLIP reads 75."),
]
ClipSimilarity = Annotated[
    float,
    Field(
        description="CLIP cosine similarity between the prompt and the image(s), mean over images; higher is closer."
    ),
]
Perplexity = Annotated[
    float, Field(description="Perplexity of the prompt under the LLM; lower reads more naturally (PEZ-style ~1000).")
]


class InvertImageRequest(ToolRequest):
    images: list[ImageRef] = Field(
        min_length=1,
        max_length=5,
        description="1-5 images. Several are described together: the prompt has to match each of them.",
    )
    focus: Literal["content", "style"] = Field(
        "content",
        description="content: what is shown and how; style: only the painting style, colours and shapes, to "
        "apply to another subject.",
    )
    max_tokens: MaxTokens = 32
    num_results: int = Field(3, ge=1, le=10, description="How many distinct prompts to return, best first.")
    method: Literal["vgd"] = Field("vgd", description="vgd: visually guided decoding (an LLM steered by CLIP).")

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


def vocabulary_for(context: ToolContext, clip: ClipModel) -> ClipVocabulary:
    """The profile's start words with their embeddings (the CLIP vocabulary's on disk under the cache folder)."""
    return runtime_vocabulary(context.runtime, progress=context.progress)


def embed_clip_vocabulary(runtime: Runtime) -> None:
    """Embed (or load from the cache folder) the start words, which a first inversion would wait for."""
    runtime_vocabulary(runtime)


def ranked_prompts(
    context: ToolContext, result: VgdResult, targets: torch.Tensor, count: int, style: bool
) -> list[InvertedPrompt]:
    """The best `count` hypotheses with their CLIP similarity to `targets` and their perplexity."""
    hypotheses = [result.best, *result.hypotheses[1:count]]
    clip, llm = context.runtime.clip(), context.runtime.llm()
    texts = [h.text for h in hypotheses]
    with torch.no_grad():
        similarity = clip.similarity(clip.encode_text(texts), targets).mean(dim=1).tolist()
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
        vocabulary=vocabulary_for(context, clip),
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
        "Write text prompts that regenerate 1-5 images with the loaded model (VGD: a small LLM writes, the "
        "generator's CLIP steers each word). Returns the best prompts with their CLIP similarity to the images and "
        "their perplexity (readability). focus='style' extracts only the style and says how to apply it to "
        "another subject ('{subject} in the style of ...')."
    ),
    request_model=InvertImageRequest,
    response_model=InvertImageResponse,
    run=invert_image,
    hints=ToolHints(read_only=True, destructive=False, idempotent=True, open_world=False),
    components=("generator", "clip", "llm"),
    warm_up=embed_clip_vocabulary,
)
