"""`fuse_concepts`: one readable prompt holding the concepts of several images, and images made from it.

The strategies are `methods.vgd.fuse`'s: `merge` (the default: a prompt per image, then one sentence from them),
`joint` (one decode against all images) and `concat` (the paper's multi-concept recipe).
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from pictoprompt.methods.scoring import prompt_similarities
from pictoprompt.methods.vgd import FuseStrategy, fuse, image_targets, runtime_vocabulary, text_perplexities
from pictoprompt.tools.base import (
    DomainNote,
    Guidance,
    ImageRef,
    LlmNote,
    MaxTokens,
    NumImages,
    Perplexity,
    SamplingRequest,
    Seed,
    Steps,
    ToolContext,
    ToolHints,
    ToolRequest,
    ToolSpec,
    Variation,
    picture_note,
)
from pictoprompt.tools.render import TextPrompt, render_and_score

METHOD = "vgd-fusion"


class FuseConceptsRequest(ToolRequest):
    images: list[ImageRef] = Field(min_length=2, max_length=5, description="2-5 images, one concept each.")
    strategy: FuseStrategy = Field(
        "merge",
        description="merge: a prompt per image, then one from them; joint: one for all images; concat: joined "
        "('A and B').",
    )
    max_tokens: MaxTokens = 32
    generate: bool = Field(True, description="Also draw the prompt.")
    num_images: NumImages = 4
    steps: Steps = 25
    guidance: Guidance = 7.5
    seed: Seed = None

    def image_refs(self) -> list[str]:
        return list(self.images)


class FuseConceptsResponse(BaseModel):
    prompt: str = Field(description="The fused prompt.")
    strategy: FuseStrategy
    parts: list[str] = Field(description="merge and concat: the per-image prompts, in image order; joint: empty.")
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
    domain_note: DomainNote = None


def fuse_concepts(request: FuseConceptsRequest, context: ToolContext) -> FuseConceptsResponse:
    clip, llm = context.runtime.clip(), context.runtime.llm()
    references = [context.images.load(ref) for ref in request.images]
    embeddings = image_targets(clip, references)
    vocabulary = runtime_vocabulary(context.runtime, progress=context.progress)
    fusion = fuse(
        llm,
        clip,
        embeddings,
        strategy=request.strategy,
        vocabulary=vocabulary,
        max_length=request.max_tokens,
        config=context.runtime.profile.vgd,
        progress=context.progress,
    )
    prompt = fusion.prompt
    images: list[Variation] = []
    if request.generate:
        sampling = SamplingRequest(
            num_images=request.num_images, steps=request.steps, guidance=request.guidance, seed=request.seed
        )
        rendered = render_and_score(
            context, TextPrompt(prompt), sampling, METHOD, {"prompt": prompt}, score_against=embeddings
        )
        images = [Variation(**r.image.model_dump(), image_similarity=r.image_similarity) for r in rendered]
    return FuseConceptsResponse(
        prompt=prompt,
        strategy=request.strategy,
        parts=fusion.parts,
        clip_similarity=prompt_similarities(clip, [prompt], embeddings)[0],
        perplexity=text_perplexities(llm, [prompt])[0],
        images=images,
        llm_note=llm.fallback_note,
        domain_note=picture_note(context, request.images),
    )


SPEC = ToolSpec(
    name="fuse_concepts",
    title="Fuse the concepts of several images into one prompt",
    description=(
        "One readable prompt combining the concepts of 2-5 images (VGD), optionally with images from it; reports "
        "each input's CLIP similarity to it (low: that concept is weak)."
    ),
    request_model=FuseConceptsRequest,
    response_model=FuseConceptsResponse,
    run=fuse_concepts,
    hints=ToolHints(read_only=False, destructive=False, idempotent=False, open_world=False),
    components=("generator", "clip", "llm"),
    warm_up=runtime_vocabulary,
)
