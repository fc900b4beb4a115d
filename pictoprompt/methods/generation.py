"""Text-to-image sampling through a diffusers Stable Diffusion pipeline, shared by every method.

Each image gets its own `torch.Generator`, so the seed reported for an image reproduces it alone. Progress is
reported per denoising step and cancellation is honoured between steps through diffusers'
`callback_on_step_end` / `interrupt`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import SchedulerMixin, StableDiffusionPipeline
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


def generate(
    pipeline: StableDiffusionPipeline,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    seeds: Sequence[int],
    num_inference_steps: int,
    guidance_scale: float,
    width: int,
    height: int,
    progress: Progress,
) -> list[Image.Image]:
    """Sample one image per seed. `prompt_embeds` is (1, L, D) or (len(seeds), L, D)."""
    count = len(seeds)
    if prompt_embeds.shape[0] == 1:
        prompt_embeds = prompt_embeds.expand(count, -1, -1)
    if negative_prompt_embeds.shape[0] == 1:
        negative_prompt_embeds = negative_prompt_embeds.expand(count, -1, -1)
    generator_device = "cpu" if pipeline.device.type == "mps" else pipeline.device
    generators = [torch.Generator(device=generator_device).manual_seed(int(seed)) for seed in seeds]

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
            guidance_scale=guidance_scale,
            width=width,
            height=height,
            generator=generators,
            eta=0.0,
            callback_on_step_end=on_step_end,
        )
    progress.check()
    return list(result.images)
