"""`distill_prompt`: a shorter prompt that CLIP (and so the generator) reads like the long one.

The profile's `distillation` picks the method: `vgd`, the paper's VGD distillation against the long prompt's CLIP
text embedding (by default the short prompt may only leave words out, `vgd.distillation_keeps_words`, ours), or
`prune` (ours, `methods/pruning.py`). Optional previews render both prompts from the same seed.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from pictoprompt.errors import InvalidInputError
from pictoprompt.methods.pruning import prune
from pictoprompt.methods.scoring import prompt_similarities
from pictoprompt.methods.vgd import clip_token_count, distill, distillation_length, text_perplexities, text_target
from pictoprompt.tools.base import (
    Guidance,
    LlmNote,
    OutputImage,
    Perplexity,
    SamplingRequest,
    Seed,
    Steps,
    ToolContext,
    ToolHints,
    ToolRequest,
    ToolSpec,
)
from pictoprompt.tools.render import TextPrompt, render_and_score, seeds_for

METHODS = {"vgd": "vgd-distillation", "prune": "pruning"}
"""The `method` recorded with the previews, by the profile's `distillation`."""


class DistillPromptRequest(ToolRequest):
    prompt: str = Field(min_length=1, max_length=2000, description="The long prompt to shorten.")
    max_tokens: int | None = Field(
        None, ge=1, le=75, description="CLIP tokens; default 30% of the prompt's (VGD), what it needs (prune)."
    )
    generate_preview: bool = Field(False, description="Also render both from one seed.")
    steps: Steps = 25
    guidance: Guidance = 7.5
    seed: Seed = None


class DistillPromptResponse(BaseModel):
    prompt: str = Field(description="The short prompt.")
    original_prompt: str
    clip_similarity: float = Field(
        description="CLIP cosine similarity between the short and the original prompt's text embeddings."
    )
    tokens_before: int = Field(description="CLIP tokens of the original (CLIP reads at most 75).")
    tokens_after: int = Field(description="CLIP tokens of the short prompt; at most max_tokens.")
    max_tokens: int
    perplexity: Perplexity
    preview_original: OutputImage | None = None
    preview_distilled: OutputImage | None = None
    llm_note: LlmNote = None


def distill_prompt(request: DistillPromptRequest, context: ToolContext) -> DistillPromptResponse:
    clip, llm = context.runtime.clip(), context.runtime.llm()
    tokens_before = clip_token_count(clip, [request.prompt])[0]
    method = context.runtime.profile.distillation
    ratio = context.runtime.profile.vgd.distillation_ratio
    budget = request.max_tokens or (None if method == "prune" else distillation_length(clip, request.prompt, ratio))
    if budget is not None and budget >= tokens_before:
        raise InvalidInputError(
            f"The prompt has {tokens_before} CLIP tokens, already within max_tokens={budget}; ask for fewer tokens."
        )
    short = _shorten(request.prompt, budget, context)
    similarity = prompt_similarities(clip, [short], text_target(clip, request.prompt))[0][0]
    tokens_after = clip_token_count(clip, [short])[0]
    response = DistillPromptResponse(
        prompt=short,
        original_prompt=request.prompt,
        clip_similarity=similarity,
        tokens_before=tokens_before,
        tokens_after=tokens_after,
        max_tokens=budget or tokens_after,
        perplexity=text_perplexities(llm, [short])[0],
        llm_note=llm.fallback_note,
    )
    if request.generate_preview:
        response.preview_original, response.preview_distilled = _previews(request, context, [request.prompt, short])
    return response


def _shorten(prompt: str, budget: int | None, context: ToolContext) -> str:
    """The short prompt by the profile's method; `budget` None only for `prune` (as long as the content needs)."""
    clip, llm, config = context.runtime.clip(), context.runtime.llm(), context.runtime.profile.vgd
    method = context.runtime.profile.distillation
    dictionary = context.runtime.dictionary_words()
    words = frozenset(dictionary) if dictionary is not None else None
    if method == "prune":
        return prune(llm, clip, prompt, max_tokens=budget, dictionary=words).text
    return distill(
        llm,
        clip,
        prompt,
        max_length=budget,
        keep_words=config.distillation_keeps_words,
        dictionary=words,
        config=config,
        progress=context.progress,
    ).best.text


def _previews(request: DistillPromptRequest, context: ToolContext, prompts: list[str]) -> list[OutputImage]:
    """One image per prompt, all from the same seed."""
    seed = seeds_for(request.seed, 1)[0]
    sampling = SamplingRequest(steps=request.steps, guidance=request.guidance, seed=seed)
    method = METHODS[context.runtime.profile.distillation]
    return [
        render_and_score(context, TextPrompt(prompt), sampling, method, {"prompt": prompt})[0].image
        for prompt in prompts
    ]


SPEC = ToolSpec(
    name="distill_prompt",
    title="Shorten a prompt without changing what it generates",
    description=(
        "A shorter prompt that CLIP reads like the original (VGD distillation at 30% of the CLIP tokens, or pruning "
        "to what the content needs, by profile), with its similarity, token counts and optional previews from one "
        "seed."
    ),
    request_model=DistillPromptRequest,
    response_model=DistillPromptResponse,
    run=distill_prompt,
    hints=ToolHints(read_only=False, destructive=False, idempotent=False, open_world=False),
    components=("generator", "clip", "llm"),
)
