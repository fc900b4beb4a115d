"""`vary_image`: variations of one or several reference images through SD-IPC's image-to-prompt conversion.

The references' CLIP embeddings (averaged when there are several, optionally weighted) become a pseudo-prompt
that the unchanged generator renders; no training and no caption are involved (`method="sd-ipc"`, the paper's).
`method="prompted"` (ours) first writes the references' readable prompt with VGD and conditions on it together
with the converted embedding (`methods.sd_ipc.prompted_states`): the prompt names the shape and the background,
which the conversion alone loses on a small CLIP, while the seeds still vary what it does not name. The profile
says which is the default (`Profile.sd_ipc`). Each variation reports how close CLIP finds it to the
references, so the assistant can point the user to the closest ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Annotated, Literal

from PIL import Image
from pydantic import BaseModel, Field, model_validator

from pictoprompt.configs import SdIpcConfig
from pictoprompt.methods.sd_ipc import centred_on_object
from pictoprompt.methods.vgd import runtime_vocabulary
from pictoprompt.tools.base import (
    DomainNote,
    ImageRef,
    ImageSource,
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
from pictoprompt.tools.render import ImagePrompt, picture_prompt, render_and_score

VaryMethod = Literal["sd-ipc", "prompted"]
METHODS: dict[VaryMethod, str] = {"sd-ipc": "sd-ipc-variation", "prompted": "prompted-sd-ipc-variation"}


class VaryImageInputs(ToolRequest):
    images: list[ImageRef] = Field(
        min_length=1,
        max_length=5,
        description="Reference images; several are blended.",
    )
    weights: list[Annotated[float, Field(ge=0.0)]] | None = Field(
        None,
        description="One weight per reference (default: equal).",
    )
    method: VaryMethod | None = Field(
        None,
        description="sd-ipc (paper) or prompted: also the images' written prompt. Default: the model set's.",
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
    prompt: str | None = Field(None, description="method prompted: the references' prompt the variations follow.")
    domain_note: DomainNote = None


def _relative(weights: list[float] | None) -> list[float] | None:
    """Only the ratios count: scaled to at most 1 they stay finite in float32 (a weight of 1e308 became inf there,
    and the similarity NaN)."""
    return None if weights is None else [weight / max(weights) for weight in weights]


@dataclass(frozen=True)
class _CentredImages:
    """The call's pictures as VGD reads them for the prompt (`SdIpcConfig.reading_span`)."""

    images: ImageSource
    span: float

    def load(self, ref: str) -> Image.Image:
        return centred_on_object(self.images.load(ref), self.span)


def written_prompt(context: ToolContext, refs: list[str], weights: list[float] | None, settings: SdIpcConfig) -> str:
    """The references' prompt for `method="prompted"`: VGD's, read from the centred pictures when the profile says
    so, with what the seeds should vary cut out (`SdIpcConfig.reading_span`, `seed_varies`; ours)."""
    if settings.reading_span is not None:
        context = replace(context, images=_CentredImages(context.images, settings.reading_span))
    prompt = picture_prompt(context, refs, weights)
    if settings.seed_varies is None:
        return prompt
    cut = " ".join(re.sub(settings.seed_varies, " ", prompt).split())
    # "a large orange star" without its size is "an orange star".
    return re.sub(r"\b(an?) (\w)", lambda m: ("an " if m[2] in "aeiou" else "a ") + m[2], cut)


def vary_image(request: VaryImageRequest, context: ToolContext) -> VaryImageResponse:
    settings = context.runtime.profile.sd_ipc
    method: VaryMethod = request.method or ("prompted" if settings.picture_prompt else "sd-ipc")
    weights = request.weights or [1.0] * len(request.images)
    metadata = {"references": str(len(request.images)), "weights": ",".join(str(w) for w in weights)}
    prompt, drawing, relative = None, context, _relative(request.weights)
    if method == "prompted":
        prompt = written_prompt(context, request.images, relative, settings)
        metadata |= {"prompt": prompt, "converted_weight": str(settings.converted_weight)}
        drawing = replace(context, progress=context.progress.scaled(0.6, 0.4, 1.0))
    rendered = render_and_score(
        drawing,
        ImagePrompt(request.images, relative, prompt, settings.converted_weight),
        request,
        METHODS[method],
        metadata,
    )
    return VaryImageResponse(
        images=[Variation(**r.image.model_dump(), image_similarity=r.image_similarity) for r in rendered],
        prompt=prompt,
        domain_note=picture_note(context, request.images),
    )


SPEC = ToolSpec(
    name="vary_image",
    title="Make variations of images",
    description=(
        "Make 1-8 images with the content and style of 1-5 reference images, blended and optionally weighted "
        "(SD-IPC; no prompt). Each reports its seed and CLIP similarity to the references."
    ),
    request_model=VaryImageRequest,
    response_model=VaryImageResponse,
    run=vary_image,
    hints=ToolHints(read_only=False, destructive=False, idempotent=False, open_world=False),
    # method='prompted' writes the references' prompt with the LLM, from the profile's start words.
    components=("generator", "clip", "llm"),
    warm_up=runtime_vocabulary,
)
