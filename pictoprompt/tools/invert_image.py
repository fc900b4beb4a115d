"""`invert_image`: readable prompts that regenerate an image (or its style), by visually guided decoding or EDITOR.

`method="vgd"`: the profile's LLM writes the prompt while the generator's own CLIP steers every token towards the
image(s) (VGD, `methods/vgd.py`). `method="editor"`: a start prompt (the profile's captioner, or VGD's prompt where
it has none) is encoded, its text states are optimised through the generator until they regenerate the image(s),
VGD writes them back as text and the candidate that regenerates the image(s) best wins (`methods/editor.py`).

Each prompt comes with its CLIP similarity to the image(s) and its perplexity under the LLM, so the assistant can
weigh faithfulness against readability; EDITOR's also with its regenerated preview and that picture's similarity.
`focus="style"` (VGD only) asks for the images' shared style and says how to apply it to another subject; with the
profile's `vgd.style_leaves_out_own_words` (ours) the style of several images leaves out the words that only some of
their own prompts have (`methods/shared_style.py`); with `vgd.style_text_encoder` (ours; the `shapes` profile's) the
style of several images is scored by a text tower taught style captions (`methods.vgd.style_reader`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from pictoprompt.configs import EditorConfig
from pictoprompt.errors import InvalidInputError
from pictoprompt.methods.editor import Candidate, check_generator, editor, one_cpu_thread, start_prompt
from pictoprompt.methods.scoring import Embeddings, prompt_similarities
from pictoprompt.methods.shared_style import shared_style
from pictoprompt.methods.vgd import (
    VgdResult,
    image_targets,
    invert,
    runtime_vocabulary,
    style_reader,
    style_target,
    text_perplexities,
)
from pictoprompt.tools.base import (
    DomainNote,
    ImageRef,
    LlmNote,
    MaxTokens,
    OutputImage,
    Perplexity,
    ToolContext,
    ToolHints,
    ToolRequest,
    ToolSpec,
    picture_note,
)
from pictoprompt.tools.render import content_inversion, save_image

STYLE_TEMPLATE = "{subject} in the style of {style}"
"""How the paper applies an extracted style prompt (section 4, style transfer)."""

EDITOR_ITERATIONS = 100
"""EDITOR's default iterations: the paper's 1000 take minutes per picture on a CPU; `pictoprompt bench editor`
measures quality and time at 100 / 300 / 1000, and this is the most that keeps a call within 60 s on the
`shapes` set on one CPU thread (lab/RESULTS.md, "EDITOR")."""

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
        description="Several are described by one prompt.",
    )
    focus: Literal["content", "style"] = Field(
        "content",
        description="content: what is shown; style: only the style.",
    )
    max_tokens: MaxTokens = 32
    num_results: int = Field(3, ge=1, le=10, description="Prompts to return, best first.")
    method: Literal["vgd", "editor"] = Field(
        "vgd",
        description="vgd: an LLM steered by CLIP; editor: refined through the generator (slower).",
    )
    iterations: int | None = Field(
        None,
        ge=1,
        le=5000,
        description=f"editor only (default {EDITOR_ITERATIONS}; paper 1000).",
    )

    def image_refs(self) -> list[str]:
        return list(self.images)


class InvertedPrompt(BaseModel):
    prompt: str
    score: float = Field(
        description="Higher is better: vgd, the decoder's length-penalised score (LLM + CLIP; sets that rerank by "
        "the generator order the best by it instead); editor, image_similarity (the order)."
    )
    clip_similarity: ClipSimilarity
    perplexity: Perplexity
    apply_style_as: str | None = Field(
        None, description="focus=style only: the prompt to use for a new subject, replacing {subject}."
    )
    preview: str | None = Field(None, description="editor only: the URI of the picture this prompt regenerates.")
    image_similarity: float | None = Field(
        None,
        description="editor only: CLIP cosine similarity of the prompt's pictures (the preview's seed and three "
        "more) to the image(s), mean over both.",
    )
    start_prompt: str | None = Field(
        None, description="editor only: the prompt the optimisation started from (captioner, or VGD on shapes)."
    )
    loss_first: float | None = Field(None, description="editor only: the pixel MSE of the start prompt's picture.")
    loss_best: float | None = Field(None, description="editor only: the lowest pixel MSE the optimisation reached.")


class InvertImageResponse(BaseModel):
    focus: Literal["content", "style"]
    method: str
    prompts: list[InvertedPrompt] = Field(description="Distinct prompts, best first.")
    initial_condition: str | None = Field(
        description="The start word closest to the image(s) (from the profile's word list, or the CLIP vocabulary), "
        "given to the LLM to start from."
    )
    llm_note: LlmNote = None
    domain_note: DomainNote = None


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
    if request.method == "editor":
        return invert_by_editor(request, context)
    if request.iterations is not None:
        raise InvalidInputError("`iterations` applies to method='editor' only; drop it, or set method='editor'.")
    clip, llm = context.runtime.clip(), context.runtime.llm()
    images = [context.images.load(ref) for ref in request.images]
    style = request.focus == "style"
    embeddings = image_targets(clip, images)
    vocabulary = runtime_vocabulary(context.runtime, progress=context.progress)
    config = context.runtime.profile.vgd
    if style and len(images) > 1 and config.style_leaves_out_own_words:
        found = shared_style(llm, clip, images, vocabulary, request.max_tokens, config, context.progress)
        result = found.result
    elif style:
        # One picture's colour and fill are its style, which the CLIP's own text tower names; the reader is for what
        # several pictures share (lab/results/style2.md, "One picture").
        reader, reader_vocabulary = style_reader(clip, vocabulary, config) if len(images) > 1 else (clip, vocabulary)
        result = invert(
            llm,
            reader,
            style_target(clip, images),
            task="style",
            vocabulary=reader_vocabulary,
            max_length=request.max_tokens,
            config=config,
            progress=context.progress,
        )
    else:
        result = content_inversion(context, images, embeddings, request.max_tokens)
    return InvertImageResponse(
        focus=request.focus,
        method=request.method,
        prompts=ranked_prompts(context, result, embeddings, request.num_results, style),
        initial_condition=result.initial_condition,
        llm_note=llm.fallback_note,
        domain_note=picture_note(context, request.images),
    )


def invert_by_editor(request: InvertImageRequest, context: ToolContext) -> InvertImageResponse:
    """EDITOR: the start prompt (one progress unit), then `editor`'s iterations, decoding and selection."""
    if request.focus == "style":
        raise InvalidInputError(
            "method='editor' inverts what a picture shows; for its style use focus='style' with method='vgd'."
        )
    pipeline = context.runtime.pipeline()
    # The whole call on one thread on a small CPU generator: what `pictoprompt bench editor` measures (one thread),
    # for less CPU time than on two (lab/results/editor-speed.md).
    with one_cpu_thread(pipeline):
        # Refused before the start prompt is written: on SD 2.x the captioner's minute would be spent for nothing.
        check_generator(pipeline, context.runtime.clip())
        return _editor_response(request, context)


def _editor_response(request: InvertImageRequest, context: ToolContext) -> InvertImageResponse:
    runtime = context.runtime
    pipeline, clip, llm = runtime.pipeline(), runtime.clip(), runtime.llm()
    images = [context.images.load(ref) for ref in request.images]
    iterations = request.iterations or EDITOR_ITERATIONS
    config = runtime.profile.editor.model_copy(update={"iterations": iterations, "max_tokens": request.max_tokens})
    total = iterations + 3
    vocabulary = runtime_vocabulary(runtime, progress=context.progress)
    first = context.progress.scaled(0, 1, total)
    start = start_prompt(images, runtime.captioner(), llm, clip, vocabulary, request.max_tokens, progress=first)
    progress = context.progress.scaled(1, iterations + 2, total)
    result = editor(pipeline, clip, llm, images, start, config, vocabulary, progress)
    chosen = result.candidates[: request.num_results]
    texts = [candidate.prompt for candidate in chosen]
    similarity = [sum(row) / len(row) for row in prompt_similarities(clip, texts, image_targets(clip, images))]
    perplexities = text_perplexities(llm, texts)
    reconstruction = result.reconstruction
    prompts = [
        InvertedPrompt(
            prompt=candidate.prompt,
            score=candidate.image_similarity,
            clip_similarity=s,
            perplexity=p,
            preview=_save_preview(context, candidate, config).uri,
            image_similarity=candidate.image_similarity,
            start_prompt=result.start_prompt,
            loss_first=reconstruction.first_loss,
            loss_best=reconstruction.best_loss,
        )
        for candidate, s, p in zip(chosen, similarity, perplexities, strict=True)
    ]
    return InvertImageResponse(
        focus=request.focus,
        method=request.method,
        prompts=prompts,
        initial_condition=None,
        llm_note=llm.fallback_note,
        domain_note=picture_note(context, request.images),
    )


def _save_preview(context: ToolContext, candidate: Candidate, config: EditorConfig) -> OutputImage:
    """The candidate's picture from the first selection seed, stored with what reproduces it."""
    seed = config.selection_seeds[0]
    metadata = {
        "method": "editor",
        "prompt": candidate.prompt,
        "seed": str(seed),
        "steps": str(config.selection_steps),
        "guidance": str(config.guidance_scale),
        **{f"model_{key}": value for key, value in context.runtime.model_ids().items()},
    }
    return save_image(context, candidate.image, seed, metadata)


SPEC = ToolSpec(
    name="invert_image",
    title="Turn images into a readable prompt",
    description=(
        "Write readable prompts that regenerate 1-5 images (VGD), with CLIP similarity (higher is closer) and "
        "perplexity (lower reads better). focus='style': only the style, for '{subject} in the style of ...'."
    ),
    request_model=InvertImageRequest,
    response_model=InvertImageResponse,
    run=invert_image,
    # Not read-only: method='editor' stores each prompt's preview. Idempotent: the same call gives the same prompts
    # and previews (fixed noise, fixed seed).
    hints=ToolHints(read_only=False, destructive=False, idempotent=True, open_world=False),
    components=("generator", "clip", "llm"),
    # The start words' embeddings (the whole CLIP vocabulary's, cached on disk) a first inversion would wait for.
    warm_up=runtime_vocabulary,
)
