"""Text-to-image sampling through a diffusers Stable Diffusion pipeline, shared by every method.

Each image gets its own `torch.Generator`, so the seed reported for an image reproduces it alone. Progress is
reported per denoising step and cancellation is honoured between steps through diffusers'
`callback_on_step_end` / `interrupt`.

`generate_batch` samples several calls that share a step count and a size in one U-Net batch (a Ray Serve replica
gathers concurrent calls into it): the same arithmetic as the pipeline's loop, row by row, so each call gets the
pictures it gets alone for its seeds, up to float rounding. Each call keeps its own progress and may leave the batch
between two steps when cancelled; the others go on.

`generate_best` draws several candidates per seed and keeps the one a judge prefers (a concept's candidate check,
ours: `ConceptTuningConfig.candidates_per_picture`); the choice depends on the seed alone, so it still reproduces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from diffusers import SchedulerMixin, StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from PIL import Image

from pictoprompt.progress import Progress

PromptStates = torch.Tensor
"""The generator's conditioning (B, L, D), text states or SD-IPC's converted ones: what the tools hand from a
method to `generate` without reading it."""


def default_size(pipeline: StableDiffusionPipeline) -> int:
    """The resolution the generator was trained at (512 for SD 1.5, 768 for SD 2.1)."""
    return pipeline.unet.config.sample_size * pipeline.vae_scale_factor


def noise_target(
    scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """What the U-Net is trained to predict for `latents` noised with `noise` at `t`: the noise itself, or the
    velocity for a v-prediction scheduler (SD 2.x)."""
    if scheduler.config.prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(latents, noise, t)


def errors_per_text(
    unet: torch.nn.Module,
    noisy: torch.Tensor,
    t: torch.Tensor,
    target: torch.Tensor,
    states: torch.Tensor,
    texts_per_call: int,
) -> torch.Tensor:
    """(T, B, h, w) on the CPU: the squared error, averaged over channels, of the noise the U-Net predicts for one
    noisy batch (B, C, h, w) at `t` (B,) under each of T text states (T, L, D), against `target`. Every text sees
    the same noisy latents, so the errors compare text by text; `texts_per_call` texts go through at once."""
    count = noisy.shape[0]
    errors = []
    for begin in range(0, states.shape[0], texts_per_call):
        chunk = states[begin : begin + texts_per_call].to(unet.dtype)
        size = chunk.shape[0]
        prediction = unet(
            noisy.repeat(size, 1, 1, 1), t.repeat(size), encoder_hidden_states=chunk.repeat_interleave(count, dim=0)
        ).sample
        error = (prediction.float() - target.float().repeat(size, 1, 1, 1)).pow(2).mean(1)
        errors.append(error.unflatten(0, (size, count)).cpu())
    return torch.cat(errors)


def encode_text_prompt(
    pipeline: StableDiffusionPipeline, prompt: str, negative_prompt: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator's own text states for a prompt and its negative, each (1, 77, D)."""
    with torch.no_grad():
        prompt_embeds, negative_prompt_embeds = pipeline.encode_prompt(
            prompt, pipeline.device, 1, True, negative_prompt or ""
        )
    return prompt_embeds, negative_prompt_embeds


# ------------------------------------------------------------------------------------------------ batched sampling


@dataclass(frozen=True)
class Sample:
    """One call's sampling: its conditioning, seeds, guidance and progress (a share of the batch when batched)."""

    prompt_embeds: torch.Tensor
    """(1, L, D) or (len(seeds), L, D)."""
    negative_prompt_embeds: torch.Tensor
    seeds: Sequence[int]
    guidance_scale: float
    progress: Progress

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance applies (the pipeline skips it at a scale of 1 or less)."""
        return self.guidance_scale > 1.0


Sampler = Callable[[StableDiffusionPipeline, Sample, int, int, int], list[Image.Image]]
"""Renders one `Sample` with (pipeline, sample, num_inference_steps, width, height): `generate`, or a batcher
that gathers concurrent calls into `generate_batch`."""


def generate(
    pipeline: StableDiffusionPipeline, sample: Sample, num_inference_steps: int, width: int, height: int
) -> list[Image.Image]:
    """The `Sampler` of one call on its own: one image per seed of `sample`, by the pipeline's own loop."""
    count = len(sample.seeds)
    prompt_embeds, negative_prompt_embeds = sample.prompt_embeds, sample.negative_prompt_embeds
    if prompt_embeds.shape[0] == 1:
        prompt_embeds = prompt_embeds.expand(count, -1, -1)
    if negative_prompt_embeds.shape[0] == 1:
        negative_prompt_embeds = negative_prompt_embeds.expand(count, -1, -1)
    generator_device = "cpu" if pipeline.device.type == "mps" else pipeline.device
    generators = [torch.Generator(device=generator_device).manual_seed(int(seed)) for seed in sample.seeds]
    progress = sample.progress

    def on_step_end(pipe: StableDiffusionPipeline, step: int, timestep: int, kwargs: dict) -> dict:
        progress.report(step + 1, num_inference_steps, f"denoising step {step + 1}/{num_inference_steps}")
        if progress.cancelled:
            pipe._interrupt = True
        return kwargs

    dtype = pipeline.unet.dtype
    with torch.no_grad():
        result = pipeline(
            prompt_embeds=prompt_embeds.to(pipeline.device, dtype),
            negative_prompt_embeds=negative_prompt_embeds.to(pipeline.device, dtype),
            num_inference_steps=num_inference_steps,
            guidance_scale=sample.guidance_scale,
            width=width,
            height=height,
            generator=generators,
            eta=0.0,
            callback_on_step_end=on_step_end,
        )
    progress.check()
    return list(result.images)


@dataclass
class _Rows:
    """The batch's rows still being denoised: one per image, each owned by one sample."""

    owners: list[int]
    latents: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    scales: torch.Tensor
    """(B, 1, 1, 1) guidance scale of each row."""

    def keep(self, kept: list[bool]) -> None:
        mask = torch.tensor(kept)
        self.owners = [owner for owner, k in zip(self.owners, kept, strict=True) if k]
        self.latents, self.positive = self.latents[mask], self.positive[mask]
        self.negative, self.scales = self.negative[mask], self.scales[mask]


def generate_batch(
    pipeline: StableDiffusionPipeline, samples: Sequence[Sample], num_inference_steps: int, width: int, height: int
) -> list[list[Image.Image] | None]:
    """Sample every call of `samples` in one U-Net batch: per sample its images in seed order, or None when it was
    cancelled (it left the batch between two steps; the others went on). All samples must agree on guidance being
    on or off, as the pipeline decides it per call."""
    if len({sample.guided for sample in samples}) > 1:
        raise ValueError("a batch mixes guided and unguided samples; batch them apart")
    guided = samples[0].guided
    rows = _batch_rows(pipeline, samples, width, height)
    timesteps, _ = retrieve_timesteps(pipeline.scheduler, num_inference_steps, pipeline.device)
    _leave_if_cancelled(samples, rows)
    with torch.no_grad():
        for step, t in enumerate(timesteps):
            if not rows.owners:
                break
            rows.latents = _denoise_step(pipeline, rows, t, guided)
            members = sorted(set(rows.owners))
            for owner in members:
                message = f"denoising step {step + 1}/{num_inference_steps}"
                if len(members) > 1:
                    message += f" (in a batch of {len(members)} calls)"
                samples[owner].progress.report(step + 1, num_inference_steps, message)
            _leave_if_cancelled(samples, rows)
        images = _decode(pipeline, rows.latents) if rows.owners else []
    done: list[list[Image.Image] | None] = [None] * len(samples)
    for owner in dict.fromkeys(rows.owners):
        done[owner] = [image for image, o in zip(images, rows.owners, strict=True) if o == owner]
    return done


def _batch_rows(pipeline: StableDiffusionPipeline, samples: Sequence[Sample], width: int, height: int) -> _Rows:
    """The starting noise of every image from its own seed (as the pipeline draws it) and each row's conditioning."""
    device, dtype = pipeline.device, pipeline.unet.dtype
    generator_device = "cpu" if device.type == "mps" else device
    generators = [torch.Generator(device=generator_device).manual_seed(int(s)) for x in samples for s in x.seeds]
    channels = pipeline.unet.config.in_channels
    latents = pipeline.prepare_latents(len(generators), channels, height, width, dtype, device, generators)

    def per_row(states: torch.Tensor, count: int) -> torch.Tensor:
        return (states.expand(count, -1, -1) if states.shape[0] == 1 else states).to(device, dtype)

    return _Rows(
        owners=[index for index, sample in enumerate(samples) for _ in sample.seeds],
        latents=latents,
        positive=torch.cat([per_row(x.prompt_embeds, len(x.seeds)) for x in samples]),
        negative=torch.cat([per_row(x.negative_prompt_embeds, len(x.seeds)) for x in samples]),
        scales=torch.tensor(
            [x.guidance_scale for x in samples for _ in x.seeds], device=device, dtype=latents.dtype
        ).view(-1, 1, 1, 1),
    )


def _denoise_step(pipeline: StableDiffusionPipeline, rows: _Rows, t: torch.Tensor, guided: bool) -> torch.Tensor:
    """One step of the pipeline's loop on every row (no time condition, no guidance rescale: SD 1.x/2.x defaults)."""
    model_input = torch.cat([rows.latents, rows.latents]) if guided else rows.latents
    model_input = pipeline.scheduler.scale_model_input(model_input, t)
    states = torch.cat([rows.negative, rows.positive]) if guided else rows.positive
    noise = pipeline.unet(model_input, t, encoder_hidden_states=states, return_dict=False)[0]
    if guided:
        unconditional, conditional = noise.chunk(2)
        noise = unconditional + rows.scales * (conditional - unconditional)
    # DDIM at eta=0 (the runtime's scheduler) is deterministic and acts on each row alone, so rows may leave.
    return pipeline.scheduler.step(noise, t, rows.latents, eta=0.0, return_dict=False)[0]


def _leave_if_cancelled(samples: Sequence[Sample], rows: _Rows) -> None:
    cancelled = {owner for owner in set(rows.owners) if samples[owner].progress.cancelled}
    if cancelled:
        rows.keep([owner not in cancelled for owner in rows.owners])


def _decode(pipeline: StableDiffusionPipeline, latents: torch.Tensor) -> list[Image.Image]:
    decoded = pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor, return_dict=False)[0]
    return pipeline.image_processor.postprocess(decoded, output_type="pil", do_denormalize=[True] * len(latents))


# ------------------------------------------------------------------------------------------------ candidates

CANDIDATE_STRIDE = 1_000_003
"""Seed distance between the candidates of one requested picture: far beyond the seeds of consecutive pictures."""

Judge = Callable[[list[Image.Image]], Sequence[float]]
"""Scores pictures, higher is better: which candidate is kept."""


def candidate_seeds(seed: int, count: int) -> list[int]:
    """The seeds of `count` candidates for a requested seed: the seed itself first (its picture is the one a single
    draw gives), then seeds that consecutive requested seeds do not reach."""
    return [(seed + j * CANDIDATE_STRIDE) % 2**32 for j in range(count)]


def generate_best(
    pipeline: StableDiffusionPipeline,
    sample: Sample,
    num_inference_steps: int,
    size: tuple[int, int],
    count: int,
    judge: Judge,
) -> list[Image.Image]:
    """One picture per seed of `sample`: of `count` candidates drawn from `candidate_seeds` (one U-Net batch), the
    one `judge` scores highest. The choice depends on the seed alone, so the seed still reproduces its picture.
    `count` 1 is `generate`."""
    width, height = size
    if count == 1:
        return generate(pipeline, sample, num_inference_steps, width, height)

    def per_candidate(states: torch.Tensor) -> torch.Tensor:
        return states if states.shape[0] == 1 else states.repeat_interleave(count, dim=0)

    candidates = replace(
        sample,
        prompt_embeds=per_candidate(sample.prompt_embeds),
        negative_prompt_embeds=per_candidate(sample.negative_prompt_embeds),
        seeds=[seed for requested in sample.seeds for seed in candidate_seeds(int(requested), count)],
    )
    images = generate(pipeline, candidates, num_inference_steps, width, height)
    # Judged seed by seed: a judge that draws noise per batch then sees the same batch whatever else was asked.
    groups = [images[begin : begin + count] for begin in range(0, len(images), count)]
    return [group[max(range(count), key=list(judge(group)).__getitem__)] for group in groups]
