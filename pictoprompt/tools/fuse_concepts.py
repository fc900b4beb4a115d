"""`fuse_concepts`: one readable prompt holding the concepts of several images, and images made from it.

`joint` (the default) decodes one prompt against all images at once: each step's CLIP score is the average of the
per-image log-softmax. `concat` is the paper's multi-concept recipe (section 4.2): one prompt per image, joined as
a caption lists things ("A and B"). On the bundled set neither names both objects of a pair often (`pictoprompt
bench vgd`, 30 pairs: joint 13%, concat 7%): a small LLM seldom goes on past the first object, the averaged CLIP
score cannot tell which colour goes with which shape, and concat's parts each name their own background.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from pictoprompt.methods.scoring import prompt_similarities
from pictoprompt.methods.vgd import image_targets, invert, joined_prompts, runtime_vocabulary, text_perplexities
from pictoprompt.tools.base import (
    Guidance,
    ImageRef,
    LlmNote,
    MaxTokens,
    NumImages,
    Perplexity,
    Seed,
    Steps,
    ToolContext,
    ToolHints,
    ToolRequest,
    ToolSpec,
    Variation,
)
from pictoprompt.tools.render import Sampling, TextPrompt, render_and_score

METHOD = "vgd-fusion"


class FuseConceptsRequest(ToolRequest):
    images: list[ImageRef] = Field(min_length=2, max_length=5, description="2-5 images, one concept each.")
    strategy: Literal["joint", "concat"] = Field(
        "joint",
        description="joint: one prompt against all images at once; concat: one prompt per image, joined ('A and B').",
    )
    max_tokens: MaxTokens = 32
    generate: bool = Field(True, description="Also generate images from the fused prompt.")
    num_images: NumImages = 4
    steps: Steps = 25
    guidance: Guidance = 7.5
    seed: Seed = None

    def image_refs(self) -> list[str]:
        return list(self.images)


class FuseConceptsResponse(BaseModel):
    prompt: str = Field(description="The fused prompt.")
    strategy: Literal["joint", "concat"]
    parts: list[str] = Field(description="concat: the per-image prompts that were joined; joint: empty.")
    clip_similarity: list[float] = Field(
        description="Per input image, CLIP cosine similarity between it and the fused prompt; a low one means "
        "that image's concept is weakly present."
    )
    perplexity: Perplexity
    images: list[Variation] = Field(
        description="Images from the fused prompt (when generate=true), each with its mean CLIP similarity to the "
        "inputs."
    )
    llm_note: LlmNote = None


def fuse_concepts(request: FuseConceptsRequest, context: ToolContext) -> FuseConceptsResponse:
    clip, llm = context.runtime.clip(), context.runtime.llm()
    references = [context.images.load(ref) for ref in request.images]
    embeddings = image_targets(clip, references)
    vocabulary = runtime_vocabulary(context.runtime, progress=context.progress)
    parts: list[str] = []
    if request.strategy == "joint":
        result = invert(
            llm, clip, embeddings, vocabulary=vocabulary, max_length=request.max_tokens, progress=context.progress
        )
        prompt = result.best.text
    else:
        budget = max(4, request.max_tokens // len(references))
        for i in range(len(references)):
            progress = context.progress.scaled(i / len(references), 1 / len(references), 1.0)
            row = embeddings[i : i + 1]
            result = invert(llm, clip, row, vocabulary=vocabulary, max_length=budget, progress=progress)
            parts.append(result.best.text)
        prompt = joined_prompts(parts)
    images: list[Variation] = []
    if request.generate:
        rendered = render_and_score(
            context, TextPrompt(prompt), Sampling.of(request), METHOD, {"prompt": prompt}, score_against=embeddings
        )
        images = [Variation(**r.image.model_dump(), image_similarity=r.image_similarity) for r in rendered]
    return FuseConceptsResponse(
        prompt=prompt,
        strategy=request.strategy,
        parts=parts,
        clip_similarity=prompt_similarities(clip, [prompt], embeddings)[0],
        perplexity=text_perplexities(llm, [prompt])[0],
        images=images,
        llm_note=llm.fallback_note,
    )


SPEC = ToolSpec(
    name="fuse_concepts",
    title="Fuse the concepts of several images into one prompt",
    description=(
        "Write one readable prompt that combines the concepts of 2-5 images (VGD), and optionally images from it. "
        "Reports each input image's CLIP similarity to the prompt (a low one: that concept is weak), and each "
        "generated image's mean similarity to the inputs."
    ),
    request_model=FuseConceptsRequest,
    response_model=FuseConceptsResponse,
    run=fuse_concepts,
    hints=ToolHints(read_only=False, destructive=False, idempotent=False, open_world=False),
    components=("generator", "clip", "llm"),
    warm_up=runtime_vocabulary,
)
