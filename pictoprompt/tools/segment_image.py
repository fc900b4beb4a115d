"""`segment_image`: a mask for each word of a prompt, read from the generator's own cross-attention
(`methods/segmentation.py`; EDITOR's appendix B). Without a prompt, VGD describes the picture first (as
`invert_image` does). Words that name nothing visible come back without a mask and say why; one overlay shows every
mask in its own colour.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from pictoprompt.methods.segmentation import WordSegment, segment
from pictoprompt.methods.vgd import image_targets, invert, runtime_vocabulary
from pictoprompt.tools.base import (
    DomainNote,
    ImageRef,
    LlmNote,
    SavedImage,
    ToolContext,
    ToolHints,
    ToolRequest,
    ToolSpec,
    picture_note,
)

METHOD = "cross-attention-segmentation"
PROMPT_TOKENS = 32
"""Without a prompt: the longest prompt VGD writes, in LLM tokens (as invert_image)."""

OVERLAY_COLOURS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
"""One colour per masked word, in the prompt's order (matplotlib's tab10: tell-apart hues), then round again."""

OVERLAY_OPACITY = 0.55
OVERLAY_SIDE = (256, 512)
"""The overlay's longest side is brought into this range: enlarged by nearest neighbour (exact mask edges), or
shrunk to a thumbnail."""


class SegmentImageRequest(ToolRequest):
    image: ImageRef
    prompt: str | None = Field(
        None,
        min_length=1,
        max_length=2000,
        description="The picture's prompt; omitted, VGD writes one.",
    )
    words: list[str] | None = Field(None, min_length=1, max_length=32, description="Only these words (default: all).")

    def image_refs(self) -> list[str]:
        return [self.image]


class WordMask(BaseModel):
    word: str
    mask: SavedImage | None = Field(
        description="The word's mask: a PNG of the picture's size, white where the word is. None when the word "
        "names nothing visible."
    )
    area: float = Field(description="Share of the picture the mask covers, 0-1.")
    mean_attention: float = Field(
        description="Mean share of the generator's cross-attention the word gets per pixel; larger means the "
        "generator looks at the word more."
    )
    colour: str | None = Field(description="The mask's colour in the overlay (#rrggbb).")
    no_mask_reason: str | None = Field(
        description="Why the word has no mask: stop word, punctuation, flat attention (the generator places it "
        "nowhere), or beyond the text encoder's context."
    )


class SegmentImageResponse(BaseModel):
    prompt: str = Field(description="The prompt segmented: the one given, or the one VGD wrote.")
    prompt_source: Literal["given", "vgd"]
    words: list[WordMask] = Field(description="The prompt's words in order (or the requested ones).")
    overlay: SavedImage = Field(description="The picture with each mask tinted in its word's colour.")
    llm_note: LlmNote = None
    domain_note: DomainNote = None


def segment_image(request: SegmentImageRequest, context: ToolContext) -> SegmentImageResponse:
    runtime = context.runtime
    image = context.images.load(request.image).convert("RGB")
    prompt, llm_note, progress = request.prompt, None, context.progress
    if prompt is None:
        # Describing takes most of the call; the segmentation is the last fifth.
        clip, llm = runtime.clip(), runtime.llm()
        describing = progress.scaled(0.0, 0.8, 1.0)
        result = invert(
            llm,
            clip,
            image_targets(clip, [image]),
            vocabulary=runtime_vocabulary(runtime, progress=describing),
            max_length=PROMPT_TOKENS,
            config=runtime.profile.vgd,
            progress=describing,
        )
        prompt, llm_note, progress = result.best.text, llm.fallback_note, progress.scaled(0.8, 0.2, 1.0)
    config = runtime.profile.segmentation
    segments = segment(runtime.pipeline(), image, prompt, config, request.words, progress)

    metadata = {
        "method": METHOD,
        "prompt": prompt,
        "seed": str(config.seed),
        **{f"model_{key}": value for key, value in runtime.model_ids().items()},
    }
    colours = _colours(segments)
    words = []
    for item, colour in zip(segments, colours, strict=True):
        saved = None
        if item.mask is not None:
            # Maps are made at most MAX_MAP_SIDE wide; the mask is handed over at the picture's own size.
            mask = Image.fromarray(item.mask.astype(np.uint8) * 255, "L").resize(image.size, Image.NEAREST)
            saved = context.assets.save(mask, {**metadata, "word": item.word})
        words.append(
            WordMask(
                word=item.word,
                mask=saved,
                area=round(item.area, 4),
                mean_attention=round(item.mean_attention, 5),
                colour="#{:02x}{:02x}{:02x}".format(*colour) if colour else None,
                no_mask_reason=item.no_mask_reason,
            )
        )
    overlay = context.assets.save(overlay_image(image, segments, colours), {**metadata, "kind": "overlay"})
    return SegmentImageResponse(
        prompt=prompt,
        prompt_source="given" if request.prompt is not None else "vgd",
        words=words,
        overlay=overlay,
        llm_note=llm_note,
        domain_note=picture_note(context, [request.image]),
    )


def _colours(segments: list[WordSegment]) -> list[tuple[int, int, int] | None]:
    """The overlay colour of each segment: the next colour for each word with a mask, None for the others."""
    colours: list[tuple[int, int, int] | None] = []
    for item in segments:
        masked = sum(colour is not None for colour in colours)
        colours.append(OVERLAY_COLOURS[masked % len(OVERLAY_COLOURS)] if item.mask is not None else None)
    return colours


def overlay_image(
    image: Image.Image, segments: list[WordSegment], colours: list[tuple[int, int, int] | None]
) -> Image.Image:
    """The picture with each mask tinted in its colour; where masks overlap, the word whose map is strongest there
    wins, so every pixel shows one colour."""
    masked = [(item, colour) for item, colour in zip(segments, colours, strict=True) if colour is not None]
    if masked:
        height, width = masked[0][0].mask.shape
        pixels = np.asarray(image.resize((width, height), Image.BICUBIC), dtype=np.float32)
        strength = np.stack([np.where(item.mask, item.score, -1.0) for item, _ in masked])
        tint = np.array([colour for _, colour in masked], dtype=np.float32)[strength.argmax(0)]
        covered = (strength.max(0) >= 0)[..., None]
        pixels = np.where(covered, (1 - OVERLAY_OPACITY) * pixels + OVERLAY_OPACITY * tint, pixels)
        image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "RGB")
    low, high = OVERLAY_SIDE
    longest = max(image.size)
    if longest < low:
        factor = -(-low // longest)  # the smallest whole factor reaching `low`
        return image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    overlay = image.copy()
    overlay.thumbnail((high, high), Image.LANCZOS)
    return overlay


SPEC = ToolSpec(
    name="segment_image",
    title="Find the words of a prompt in a picture",
    description=(
        "Mask each word of a prompt in a picture from the generator's attention: per word a PNG mask, area and "
        "attention (or why none), and one overlay. Without a prompt, VGD writes one."
    ),
    request_model=SegmentImageRequest,
    response_model=SegmentImageResponse,
    run=segment_image,
    hints=ToolHints(read_only=False, destructive=False, idempotent=True, open_world=False),
    components=("generator", "clip", "llm"),
    # Without a prompt the call starts with VGD, which needs the start words' embeddings.
    warm_up=runtime_vocabulary,
)
