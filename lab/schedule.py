"""Stable Diffusion's noise schedule, shared by the `shapes` training and the real-size builders."""

from __future__ import annotations

from diffusers import DDIMScheduler


def build_scheduler() -> DDIMScheduler:
    """Stable Diffusion's noise schedule, as its DDIM sampler is configured."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
