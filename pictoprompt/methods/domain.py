"""Is a picture far from the world a narrow model set was trained on? The `domain_note` of the tools that read pictures.

A set trained on one small world (the bundled `shapes`: flat coloured shapes on a plain background) still answers for
a photo, confidently, and its CLIP cannot tell (lab/results/quality-a.md). The generator's own VAE can: a world
picture's latents gather around a few points (one per flat region), a photo's spread over many. The statistic is
the share of latent positions within `latent_radius` of the `regions` densest latent points, on the picture
letterboxed to `working_size` pixels; below the profile's `min_coverage` (`DomainCheck`) the picture is outside the
world. A profile without a `DomainCheck` (real models) gets no note.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from pictoprompt.models.clip import pad_to_square, preprocess_images
from pictoprompt.models.profiles import DomainCheck

_HALF = (0.5, 0.5, 0.5)
"""Mean = std = 0.5 maps [0, 1] pixels to the VAE's [-1, 1]."""


def flat_coverage(pipeline: StableDiffusionPipeline, image: Image.Image, check: DomainCheck) -> float:
    """The share (0-1) of the picture's VAE latent positions that `check.regions` flat regions explain."""
    size = check.working_size
    square = pad_to_square(image.convert("RGB")).resize((size, size), Image.BICUBIC)
    vae = pipeline.vae
    with torch.no_grad():
        pixels = preprocess_images([square], size, _HALF, _HALF).to(vae.device, vae.dtype)
        latents = vae.encode(pixels).latent_dist.mean[0].float()
    points = latents.flatten(1).T
    near = torch.cdist(points, points) <= check.latent_radius
    left = torch.ones(len(points), dtype=torch.bool, device=points.device)
    for _ in range(check.regions):
        # The densest point among those not yet explained, counting only neighbours not yet explained.
        centre = int(((near & left).sum(1) * left).argmax())
        left &= ~near[centre]
    return 1.0 - float(left.float().mean())


def domain_note(
    pipeline: StableDiffusionPipeline, images: Sequence[Image.Image], check: DomainCheck | None
) -> str | None:
    """A sentence for the user when any of `images` is outside the set's world (`check`), else None."""
    if check is None or not images:
        return None
    coverages = [flat_coverage(pipeline, image, check) for image in images]
    outside = [i + 1 for i, coverage in enumerate(coverages) if coverage < check.min_coverage]
    if not outside:
        return None
    which = "The picture" if len(images) == 1 else f"Picture {', '.join(map(str, outside))} of {len(images)}"
    return (
        f"{which} looks unlike anything this model set knows ({check.world}), so the result is the nearest thing "
        f"in that world, not a reading of the picture. {check.instead}"
    )
