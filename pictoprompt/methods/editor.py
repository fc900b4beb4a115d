"""EDITOR (paper 003_ccad9491c5e4f205, section 3): a prompt reverse-engineered through the generator itself.

Algorithm 1's three steps, and a fourth from the authors' evaluation:

1. *Initialise* (section 3.3): caption the target (BLIP-large on the real profiles), cut to `max_tokens` tokens.
   The bundled `shapes` set has no captioner: there EDITOR starts from VGD's prompt, a deliberate change.
2. *Reverse-engineer* (section 3.4, Eq. 2-3): optimise the text encoder's *output* states at positions 1..EOS so
   that the image the generator makes from them, from fixed noise, matches the target:
   `c* = argmin_c L(D(R_eps(c, n)), x)`, `L` the pixel MSE in [0, 1], the gradient through `denoising_steps` LMS
   steps and the VAE decoder, AdamW under a cyclic learning rate, the best states kept at every check.
3. *Embedding to text* (section 3.5): the authors' vec2text model is not public; VGD's decoder writes the text
   against `W_t @ h_EOS`, the optimised end-of-text state projected into CLIP space (`eos_target`).
4. *Select*: render every candidate from fixed seeds and rank by the CLIP image-image cosine to the target(s).
   Ours: the start prompt is a candidate too, so EDITOR never answers worse than it started, and the similarity is
   averaged over `selection_seeds`, because on one seed the choice followed that seed's noise.

Several target images make one joint target: one set of states, the loss averaged over the images. Step 3 needs
the generator's text encoder to be the CLIP's text tower (SD 1.x, `shapes`): `check_generator` refuses SD 2.x.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import LMSDiscreteScheduler, StableDiffusionPipeline
from PIL import Image
from torch import Tensor

from pictoprompt.configs import EditorConfig
from pictoprompt.errors import InvalidInputError, PictopromptError
from pictoprompt.methods.generation import Sample, default_size, encode_text_prompt, generate
from pictoprompt.methods.scoring import score_images
from pictoprompt.methods.vgd import ClipVocabulary, image_targets, invert
from pictoprompt.models.captioner import Captioner
from pictoprompt.models.clip import ClipModel, pad_to_square
from pictoprompt.models.llm import LanguageModel
from pictoprompt.progress import Progress

_SAME_ENCODER_COSINE = 0.99
_PROBE = "a photo of a red circle on a blue background"


# ------------------------------------------------------------------------------------------------ checks and inputs


def check_generator(pipeline: StableDiffusionPipeline, clip: ClipModel) -> None:
    """Refuse a generator whose text encoder is not the CLIP's text tower: `W_t @ h_EOS` would mean nothing.

    The check is functional (a probe sentence's end-of-text state from both), so any SD 1.x set with its own
    CLIP passes whatever the dtype, and SD 2.x (penultimate OpenCLIP layer) does not.
    """
    with torch.no_grad():
        ids = clip.tokenize([_PROBE])
        eos = int(clip.eos_positions(ids)[0])
        ours = clip.text_states(ids)[0, eos].float()
        theirs = pipeline.text_encoder(ids.to(pipeline.text_encoder.device))[0][0, eos].float().to(ours.device)
    same_width = ours.shape == theirs.shape
    if not same_width or float(F.cosine_similarity(ours, theirs, dim=0)) < _SAME_ENCODER_COSINE:
        raise InvalidInputError(
            "EDITOR maps the optimised end-of-text state into CLIP space with the CLIP's text projection, which "
            "holds only when the generator's text encoder is that CLIP's text tower (SD 1.x and the shapes set). "
            "This generator's is not (SD 2.x conditions its U-Net on OpenCLIP's penultimate layer); use "
            "method='vgd' on it."
        )


def target_pixels(images: Sequence[Image.Image], size: int) -> Tensor:
    """The targets as (N, 3, size, size) floats in [0, 1]: letterboxed to a square (as CLIP sees them), then
    resized to the generator's resolution."""
    arrays = [
        np.asarray(pad_to_square(image.convert("RGB")).resize((size, size), Image.Resampling.BICUBIC))
        for image in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def start_prompt(
    images: Sequence[Image.Image],
    captioner: Captioner | None,
    llm: LanguageModel,
    clip: ClipModel,
    vocabulary: ClipVocabulary | None,
    max_length: int,
    progress: Progress | None = None,
) -> str:
    """Step 1's prompt: the captioner's captions joined (one per image), or, without a captioner (the `shapes` set),
    VGD's prompt for the image(s)."""
    if captioner is not None:
        return ", ".join(captioner.caption(images))
    result = invert(
        llm, clip, image_targets(clip, images), vocabulary=vocabulary, max_length=max_length, progress=progress
    )
    return result.best.text


def start_states(pipeline: StableDiffusionPipeline, prompt: str, max_tokens: int) -> Tensor:
    """The generator's text states of `prompt` cut at its EOS, (L, D) with L <= max_tokens + 2: start token, at most
    `max_tokens` words, EOS. The text encoder is causal, so the states up to the EOS need no padding after it."""
    tokenizer, text_encoder = pipeline.tokenizer, pipeline.text_encoder
    ids = tokenizer([prompt], max_length=max_tokens + 2, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids.to(text_encoder.device))[0][0].float()


# ------------------------------------------------------------------------------------------------ step 2


@dataclass
class Reconstruction:
    """One problem's reverse-engineering: its loss at every iteration and the best states found."""

    states: Tensor
    """The best states (L, D): the start token's (never optimised) then positions 1..EOS."""
    losses: list[float]
    """The loss of the states after 0, 1, ..., `iterations` updates."""
    improvements: list[tuple[int, float, Tensor]] = field(default_factory=list)
    """(iteration, loss, states) at each check that found better states."""

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    @property
    def best_loss(self) -> float:
        return self.improvements[-1][1]

    def record(self, iteration: int, loss: float, prompt_embeds: Tensor, checked: bool) -> None:
        """The loss of `iteration`'s states (L, D), and the states themselves when they are checked and better."""
        self.losses.append(loss)
        if checked and (not self.improvements or loss < self.improvements[-1][1]):
            self.improvements.append((iteration, loss, prompt_embeds.detach().float().cpu().clone()))


CHECKPOINT_FROM_SIDE = 256
"""EDITOR recomputes activations (gradient checkpointing) only for generators of at least this side in pixels."""


@contextmanager
def recomputed_activations(pipeline: StableDiffusionPipeline) -> Iterator[None]:
    """Gradient checkpointing in the U-Net and the VAE while EDITOR backpropagates through them, for generators of
    `CHECKPOINT_FROM_SIDE` pixels or more: it halves the memory at 512 px, and below 256 px the memory is small and
    the recomputation is not free (lab/results/quality-b.md). The pipeline is shared, so its settings are restored.
    """
    if default_size(pipeline) < CHECKPOINT_FROM_SIDE:
        yield
        return
    unet, vae = pipeline.unet, pipeline.vae
    was_on = unet.is_gradient_checkpointing, vae.is_gradient_checkpointing
    unet.enable_gradient_checkpointing()
    vae.enable_gradient_checkpointing()
    try:
        yield
    finally:
        for model, on in zip((unet, vae), was_on, strict=True):
            if not on:
                model.disable_gradient_checkpointing()


ONE_THREAD_BELOW_SIDE = 64
"""On a CPU, EDITOR runs on one intra-op thread for generators smaller than this side in pixels."""


@contextmanager
def one_cpu_thread(pipeline: StableDiffusionPipeline) -> Iterator[None]:
    """One PyTorch thread while EDITOR runs through a small generator on a CPU, the caller's count after: its
    operations are below PyTorch's parallel grain, so waking a second thread costs more than it saves
    (lab/results/editor-speed.md). The count is the process's; the job runner runs one tool at a time.
    """
    threads = torch.get_num_threads()
    if pipeline.device.type != "cpu" or default_size(pipeline) >= ONE_THREAD_BELOW_SIDE or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class RepeatedScheduleLms(LMSDiscreteScheduler):
    """The LMS scheduler, its step coefficients (integrals over the sigmas around each step) computed once per
    schedule: EDITOR runs the same schedule in every iteration (lab/results/editor-speed.md). The cached value is
    the one diffusers computes, so every step is the same to the bit.
    """

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        # The integrand reads sigmas t - order + 1 .. t, the bounds t and t + 1: the key holds all of them.
        key = (order, t, current_order, tuple(self.sigmas[max(t - order + 1, 0) : t + 2].tolist()))
        cache: dict[tuple, float] = self.__dict__.setdefault("_coefficients", {})
        if key not in cache:
            cache[key] = super().get_lms_coefficient(order, t, current_order)
        return cache[key]


def _denoise(
    pipeline: StableDiffusionPipeline,
    scheduler: LMSDiscreteScheduler,
    prompt_embeds: Tensor,
    negative_embeds: Tensor,
    noise: Tensor,
    config: EditorConfig,
) -> Tensor:
    """`D(R_eps(c, n))` in [0, 1], differentiable in `prompt_embeds`: the pipeline's own denoising loop (its
    `__call__` runs without gradients), classifier-free guidance, the scheduler's steps and the VAE decoder."""
    unet, vae = pipeline.unet, pipeline.vae
    scheduler.set_timesteps(config.denoising_steps, device=noise.device)
    latents = noise * scheduler.init_noise_sigma
    embeds = torch.cat([negative_embeds, prompt_embeds]).to(unet.dtype)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_pred = unet(model_input, t, encoder_hidden_states=embeds).sample
        uncond, cond = noise_pred.chunk(2)
        latents = scheduler.step(uncond + config.guidance_scale * (cond - uncond), t, latents).prev_sample
    pixels = vae.decode(latents / vae.config.scaling_factor).sample
    return (pixels.float() / 2 + 0.5).clamp(0, 1)


@dataclass
class _Problem:
    """What the optimisation redraws the target from: the start token's state (fixed), the states it optimises, the
    empty prompt's states cut to the same length, the fixed noise and the scheduler."""

    start_token: Tensor
    states: Tensor
    negative_embeds: Tensor
    noise: Tensor
    scheduler: LMSDiscreteScheduler

    @classmethod
    def of(cls, pipeline: StableDiffusionPipeline, start: Tensor, seed: int) -> _Problem:
        device = pipeline.unet.device
        # The unconditional states: "" padded as diffusers pads it, cut to the start's length.
        empty_ids = pipeline.tokenizer([""], padding="max_length", max_length=start.shape[0], return_tensors="pt")
        with torch.no_grad():
            unconditional = pipeline.text_encoder(empty_ids.input_ids.to(device))[0].float()
        first = start.to(device).float()[None]
        generator = torch.Generator().manual_seed(seed)
        channels, side = pipeline.unet.config.in_channels, pipeline.unet.config.sample_size
        noise = torch.randn((1, channels, side, side), generator=generator).to(device, pipeline.unet.dtype)
        scheduler = RepeatedScheduleLms.from_config(pipeline.scheduler.config)
        return cls(first[:, :1], first[:, 1:].clone().requires_grad_(True), unconditional, noise, scheduler)


def reverse_engineer(
    pipeline: StableDiffusionPipeline,
    start: Tensor,
    target: Tensor,
    config: EditorConfig = EditorConfig(),
    progress: Progress | None = None,
) -> Reconstruction:
    """Eq. 2-3 from the start states (L, D) against the target pictures (N, 3, H, W) in [0, 1]: the loss is the MSE
    between the redrawn picture and each target, averaged over them, the noise fixed (`noise_seed`). Progress is
    reported after every iteration and cancellation honoured there."""
    size = default_size(pipeline)
    if target.ndim != 4 or target.shape[1:] != (3, size, size):
        raise InvalidInputError(f"EDITOR's targets must be (N, 3, {size}, {size}) pictures in [0, 1].")
    progress = progress or Progress()
    problem = _Problem.of(pipeline, start, config.noise_seed)
    target = target.to(pipeline.unet.device)
    optimizer = torch.optim.AdamW([problem.states], lr=config.max_learning_rate, weight_decay=config.weight_decay)
    # Adam's betas stay fixed: the cycle is the learning rate's only (`cycle_momentum` would cycle beta1 too).
    schedule = torch.optim.lr_scheduler.CyclicLR(
        optimizer,
        config.base_learning_rate,
        config.max_learning_rate,
        step_size_up=config.step_size_up,
        cycle_momentum=False,
    )
    result, iterations = Reconstruction(start.float().cpu(), []), config.iterations
    with recomputed_activations(pipeline):
        for iteration in range(iterations + 1):
            last = iteration == iterations
            # The last pass only measures the final states, which are checked too: no update follows.
            with torch.set_grad_enabled(not last):
                prompt_embeds = torch.cat([problem.start_token, problem.states], dim=1)
                pixels = _denoise(
                    pipeline, problem.scheduler, prompt_embeds, problem.negative_embeds, problem.noise, config
                )
                loss = (pixels - target).pow(2).mean()
            result.record(
                iteration, float(loss.detach()), prompt_embeds[0], last or iteration % config.check_every == 0
            )
            if last:
                break
            progress.check()  # a cancel that came during the forward pass stops before the backward, its dearer half
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            message = f"EDITOR: iteration {iteration + 1}/{iterations}, loss {float(loss.detach()):.4f}"
            progress.step(iteration + 1, iterations, message)
    result.states = result.improvements[-1][2]
    return result


# ------------------------------------------------------------------------------------------------ steps 3 and 4


def eos_target(clip: ClipModel, states: Tensor) -> Tensor:
    """The decoder's target in CLIP space: `W_t @ h_EOS` (1, P), the optimised end-of-text state projected."""
    return states[-1:].to(clip.device).float() @ clip.text_projection.T


@dataclass(frozen=True)
class Candidate:
    """A prompt EDITOR may answer with, its picture from the first selection seed, and its pictures' similarity."""

    prompt: str
    source: str
    """"eos" (decoded from the end-of-text state), or "start" (the start prompt itself)."""
    image: Image.Image
    image_similarity: float
    """CLIP image-image cosine of its pictures to the target(s), mean over the pictures and the targets."""


def decode_candidates(
    llm: LanguageModel,
    clip: ClipModel,
    target: Tensor,
    vocabulary: ClipVocabulary | None,
    config: EditorConfig,
    progress: Progress | None = None,
) -> list[tuple[str, str]]:
    """Step 3: (prompt, "eos") pairs, the VGD decoder's best `candidates_per_target` texts for the CLIP-space
    `target` (`eos_target`)."""
    result = invert(llm, clip, target, vocabulary=vocabulary, max_length=config.max_tokens, progress=progress)
    return [(hypothesis.text, "eos") for hypothesis in result.hypotheses[: config.candidates_per_target]]


def select(
    pipeline: StableDiffusionPipeline,
    clip: ClipModel,
    candidates: Sequence[tuple[str, str]],
    references: Tensor,
    config: EditorConfig,
    progress: Progress | None = None,
) -> list[Candidate]:
    """Step 4: each distinct prompt rendered from each of `selection_seeds`, ranked by its pictures' mean CLIP
    similarity to the `references` (N, P image embeddings), best first; a candidate's image is its picture from the
    first seed."""
    sources: dict[str, str] = {}
    for prompt, source in candidates:
        sources.setdefault(prompt, source)
    distinct = list(sources.items())
    if not distinct:
        raise PictopromptError("EDITOR found no prompt to choose from (the decoder wrote nothing); allow more tokens.")
    encoded = [encode_text_prompt(pipeline, prompt) for prompt, _ in distinct]
    seeds, size = config.selection_seeds, default_size(pipeline)
    # One batch, prompt-major: the pictures of prompt i are images[i * len(seeds) : (i + 1) * len(seeds)].
    sample = Sample(
        torch.cat([prompt_embeds for prompt_embeds, _ in encoded]).repeat_interleave(len(seeds), dim=0),
        torch.cat([negative for _, negative in encoded]).repeat_interleave(len(seeds), dim=0),
        list(seeds) * len(distinct),
        config.guidance_scale,
        progress or Progress(),
    )
    images = generate(pipeline, sample, config.selection_steps, size, size)
    similarity = torch.tensor(score_images(clip, images, references).to_references).view(len(distinct), len(seeds))
    ranked = [
        Candidate(prompt, source, images[i * len(seeds)], float(similarity[i].mean()))
        for i, (prompt, source) in enumerate(distinct)
    ]
    return sorted(ranked, key=lambda candidate: candidate.image_similarity, reverse=True)


# ------------------------------------------------------------------------------------------------ the method


@dataclass
class EditorResult:
    candidates: list[Candidate]
    """Distinct prompts, best first by `image_similarity`."""
    start_prompt: str
    reconstruction: Reconstruction


def editor(
    pipeline: StableDiffusionPipeline,
    clip: ClipModel,
    llm: LanguageModel,
    images: Sequence[Image.Image],
    start: str,
    config: EditorConfig = EditorConfig(),
    vocabulary: ClipVocabulary | None = None,
    progress: Progress | None = None,
) -> EditorResult:
    """Steps 2-4 for the image(s) from the `start` prompt (step 1, `start_prompt`): the reverse-engineered states,
    decoded into candidates, ranked by how well they regenerate the image(s).

    Progress runs over `iterations + 2` units: one per iteration, one for decoding, one for selection.
    """
    if not images:
        raise InvalidInputError("EDITOR needs at least one target image.")
    check_generator(pipeline, clip)
    progress = progress or Progress()
    iterations = config.iterations
    total = iterations + 2
    reconstruction = reverse_engineer(
        pipeline,
        start_states(pipeline, start, config.max_tokens),
        target_pixels(images, default_size(pipeline)),
        config,
        progress.scaled(0, iterations, total),
    )
    target = eos_target(clip, reconstruction.states)
    candidates = decode_candidates(llm, clip, target, vocabulary, config, progress.scaled(iterations, 1, total))
    if start:
        candidates.append((start, "start"))
    references = image_targets(clip, images)
    ranked = select(pipeline, clip, candidates, references, config, progress.scaled(iterations + 1, 1, total))
    progress.step(total, total, "EDITOR: done")
    return EditorResult(ranked, start, reconstruction)
