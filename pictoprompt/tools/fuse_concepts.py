"""`fuse_concepts`: one readable prompt holding the concepts of several images, and images made from it.

`joint` decodes one prompt against all images at once: each step's CLIP score is the average of the per-image
log-softmax, so a candidate that drops one image's concept loses. `concat` is the paper's multi-concept recipe
(section 4.2): one prompt per image, joined.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field

from pictoprompt.methods.generation import default_size, encode_text_prompt, generate
from pictoprompt.methods.vgd import image_targets, invert, text_perplexities
from pictoprompt.tools.base import ImageRef, LlmNote, Seed, ToolContext, ToolHints, ToolRequest, ToolSpec
from pictoprompt.tools.generate_image import Guidance, NumImages, Steps, generation_metadata, save_images, seeds_for
from pictoprompt.tools.invert_image import MaxTokens, Perplexity, embed_clip_vocabulary, vocabulary_for
from pictoprompt.tools.vary_image import Variation

METHOD = "vgd-fusion"


class FuseConceptsRequest(ToolRequest):
    images: list[ImageRef] = Field(min_length=2, max_length=5, description="2-5 images, one concept each.")
    strategy: Literal["joint", "concat"] = Field(
        "joint",
        description="joint: one prompt decoded against all images at once; concat: one prompt per image, joined "
        "(each gets max_tokens / number of images).",
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
    vocabulary = vocabulary_for(context, clip)
    if request.strategy == "joint":
        result = invert(
            llm, clip, embeddings, vocabulary=vocabulary, max_length=request.max_tokens, progress=context.progress
        )
        parts: list[str] = []
        prompt = result.best.text
    else:
        budget = max(4, request.max_tokens // len(references))
        parts = []
        for i, row in enumerate(embeddings):
            progress = context.progress.scaled(i / len(references), 1 / len(references), 1.0)
            result = invert(llm, clip, row[None], vocabulary=vocabulary, max_length=budget, progress=progress)
            parts.append(result.best.text)
        prompt = ", ".join(parts)
    with torch.no_grad():
        similarity = clip.similarity(clip.encode_text([prompt]), embeddings)[0].tolist()
    images: list[Variation] = []
    if request.generate:
        images = _generate(request, context, prompt, embeddings)
    return FuseConceptsResponse(
        prompt=prompt,
        strategy=request.strategy,
        parts=parts,
        clip_similarity=similarity,
        perplexity=text_perplexities(llm, [prompt])[0],
        images=images,
        llm_note=llm.fallback_note,
    )


def _generate(
    request: FuseConceptsRequest, context: ToolContext, prompt: str, references: torch.Tensor
) -> list[Variation]:
    pipeline, clip = context.runtime.pipeline(), context.runtime.clip()
    size = default_size(pipeline)
    seeds = seeds_for(request.seed, request.num_images)
    prompt_embeds, negative_embeds = encode_text_prompt(pipeline, prompt)
    images = generate(
        pipeline,
        prompt_embeds,
        negative_embeds,
        seeds,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance,
        width=size,
        height=size,
        progress=context.progress,
    )
    with torch.no_grad():
        similarity = clip.similarity(clip.encode_image(images), references).mean(dim=1).tolist()
    metadata = [
        generation_metadata(context, METHOD, seed, request.steps, request.guidance, prompt=prompt) for seed in seeds
    ]
    saved = save_images(context, images, seeds, metadata)
    return [
        Variation(**output.model_dump(), image_similarity=score)
        for output, score in zip(saved, similarity, strict=True)
    ]


SPEC = ToolSpec(
    name="fuse_concepts",
    title="Fuse the concepts of several images into one prompt",
    description=(
        "Write one readable prompt that combines the concepts of 2-5 images (VGD), and optionally generate images "
        "from it. joint decodes against all images at once; concat writes one prompt per image and joins them. "
        "Reports how strongly each input image is represented in the prompt (CLIP similarity per image)."
    ),
    request_model=FuseConceptsRequest,
    response_model=FuseConceptsResponse,
    run=fuse_concepts,
    hints=ToolHints(read_only=False, destructive=False, idempotent=False, open_world=False),
    components=("generator", "clip", "llm"),
    warm_up=embed_clip_vocabulary,
)
