"""How well the generator's denoising explains pictures under a text: a diffusion classifier (Li et al. 2023, "Your
Diffusion Model is Secretly a Zero-Shot Classifier").

Each text is scored by the U-Net's denoising error on the pictures' latents, at the same timesteps and the same noise
for every text, so that the errors compare text by text. Used by concept completion (`concept_description`) and by
VGD's generator rerank (`vgd.generator_rerank`); the generator judges what CLIP cannot, such as how many objects a
picture holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import StableDiffusionPipeline
from torch import Tensor

from pictoprompt.methods.generation import errors_per_text, noise_target
from pictoprompt.methods.sd_ipc import ImageToPrompt
from pictoprompt.progress import Progress

CANDIDATES_PER_BATCH = 8
"""Texts per U-Net call (times the pictures): bounds the batch on SD-sized U-Nets."""


def denoising_errors(
    pipeline: StableDiffusionPipeline,
    converter: ImageToPrompt,
    latents: Tensor,
    texts: Sequence[str],
    timesteps: int,
    seed: int,
    progress: Progress,
) -> Tensor:
    """(len(texts), N) mean squared denoising error of each text on each of the N latents, over `timesteps` evenly
    spaced timesteps with one noise draw per timestep, the same for every text."""
    scheduler, unet = pipeline.scheduler, pipeline.unet
    train_steps = scheduler.config.num_train_timesteps
    steps = torch.linspace(0.05 * train_steps, 0.95 * train_steps, timesteps).long()
    generator = torch.Generator().manual_seed(seed)
    count = latents.shape[0]
    noises = [torch.randn(latents.shape, generator=generator).to(latents) for _ in range(timesteps)]
    with torch.no_grad():
        states, _ = converter.text_states(list(texts))
        errors = torch.zeros(len(texts), count)
        for index, step in enumerate(steps.tolist()):
            t = torch.full((count,), step, device=latents.device)
            noisy = scheduler.add_noise(latents, noises[index], t)
            target = noise_target(scheduler, latents, noises[index], t)
            errors += errors_per_text(unet, noisy, t, target, states, CANDIDATES_PER_BATCH).mean(dim=(2, 3))
            progress.step(index + 1, timesteps, f"judging {len(texts)} texts, timestep {index + 1}/{timesteps}")
    return errors / timesteps


def relative_gains(errors: Tensor) -> Tensor:
    """For rows 1.. of (T, N) errors: the median over the N pictures of each one's relative change against row 0.
    The median, not the mean of the errors: one picture that a word fits far better (a small shape on white) must
    not outvote the others; the mean gave an outlined orange heart "striped" on one picture's large drop."""
    return (errors[1:] / errors[0] - 1).median(dim=1).values
