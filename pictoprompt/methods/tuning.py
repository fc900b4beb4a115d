"""What SD-IPC-CT (`concept_tuning`) and SD-IPC-FT (`domain_tuning`) share: the denoising loss, the optimiser,
and the set-up both start from (zero K/V deltas, deep prompts fitted to leave the embeddings unchanged).

Tuning starts from the untrained SD-IPC: zero deltas, and deep prompts fitted to leave the image embeddings
unchanged (`prompt_init="neutral"`, the default; "random" keeps VPT's random start, which on a small encoder moves
the conversion far from SD-IPC's).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image, ImageOps
from torch import Tensor

from pictoprompt.configs import TuningConfig
from pictoprompt.methods.concept_weights import ConceptWeights
from pictoprompt.methods.generation import default_size, noise_target
from pictoprompt.methods.sd_ipc import ImageToPrompt, average_embeddings
from pictoprompt.models.clip import ClipModel, preprocess_images
from pictoprompt.models.clip_vision import DeepPromptedVision, clip_pixels, vision_tower
from pictoprompt.progress import Progress

WEIGHT_DECAY = 1e-2
"""AdamW's decay, as diffusers' training scripts. On deltas it pulls towards the base weights, not towards 0."""
NEUTRAL_FIT_LR = 1e-2
NEUTRAL_FIT_IMAGES = 16
"""Fitting fresh deep prompts to leave the embeddings unchanged (`prompt_init="neutral"`): cosine loss, Adam,
on at most 16 images (one batch through the encoder with gradients)."""
CROP_SCALE = (0.8, 1.0)
"""Side of the random square crop as a fraction of the image's short side (augmentation)."""


# ------------------------------------------------------------------------------------------ the losses


def random_augmentation(image: Image.Image, generator: torch.Generator) -> Image.Image:
    """A horizontal flip half the time and a random square crop (Custom Diffusion-style augmentation)."""
    image = image.convert("RGB")
    if float(torch.rand((), generator=generator)) < 0.5:
        image = ImageOps.mirror(image)
    low, high = CROP_SCALE
    side = round(min(image.size) * (low + (high - low) * float(torch.rand((), generator=generator))))
    left = int(torch.randint(0, image.width - side + 1, (), generator=generator))
    top = int(torch.randint(0, image.height - side + 1, (), generator=generator))
    return image.crop((left, top, left + side, top + side))


def encode_latents(pipeline: StableDiffusionPipeline, images: Sequence[Image.Image]) -> Tensor:
    """`z_0` of each image at the generator's native size, scaled as the U-Net expects.

    The posterior's mean, not a draw from it: the `shapes` VAE was trained on its mean alone and its variance is
    untrained (standard deviation ~1 per latent), so a draw buried the picture in noise (denoising loss 0.26
    against 0.008 on held-out scenes) and tuning learned from that noise. SD's VAE has a small variance, where
    the two differ by little.
    """
    half = (0.5, 0.5, 0.5)  # mean = std = 0.5 maps [0, 1] to the VAE's [-1, 1]
    pixels = preprocess_images(images, default_size(pipeline), half, half)
    vae = pipeline.vae
    with torch.no_grad():
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    return latents * vae.config.scaling_factor


def denoising_loss(
    pipeline: StableDiffusionPipeline, latents: Tensor, prompt_embeds: Tensor, generator: torch.Generator
) -> Tensor:
    """`||eps - eps_theta(z_t, c, t)||^2` with a random timestep and noise per image (Eq. 9, either term).

    For a v-prediction U-Net (SD 2.x at 768 px) the target is the velocity instead of the noise.
    """
    scheduler, unet = pipeline.scheduler, pipeline.unet
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise_target(scheduler, latents, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states=prompt_embeds.to(unet.dtype)).sample
    return F.mse_loss(prediction.float(), target.float())


# ------------------------------------------------------------------------------------------ the tuning


def fit_neutral_prompts(
    clip: ClipModel,
    deep_prompts: Tensor,
    images: Sequence[Image.Image],
    progress: Progress,
    steps: int,
) -> None:
    """Move fresh deep prompts (in place) until the prompted encoder gives `images` their original embeddings.

    VPT's random prompts alone turn a small encoder's embeddings far away (cosine 0.4-0.7 to the original on
    `shapes` with 50 prompts per layer), and 30 steps at lr 5e-6 cannot bring them back: tuning would start
    from a broken conversion instead of SD-IPC's, the starting point the paper's 30-step claim rests on.
    Fitting the prompts first (cosine 0.99 in ~50 steps on `shapes`) keeps VPT's parameters but starts from
    SD-IPC. Only the prompts move here; the K/V deltas are still zero.
    """
    tower = DeepPromptedVision(clip, deep_prompts, dropout=0.0)
    pixels = clip_pixels(clip, images)
    with torch.no_grad():
        target = DeepPromptedVision(clip, None)(pixels)
    optimizer = torch.optim.Adam([deep_prompts], lr=NEUTRAL_FIT_LR)
    with torch.enable_grad():
        for _ in range(steps):
            loss = 1 - F.cosine_similarity(tower(pixels), target).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            progress.check()


@dataclass
class TuningResult:
    weights: ConceptWeights
    losses: list[float]
    mean_image_embedding: Tensor
    """(1, P): normalised mean of the references' embeddings through the tuned image encoder."""
    mean_converted_embedding: Tensor
    """(1, D): `f_cnvrt` of that mean."""
    hyperparameters: dict[str, float | int | bool | str]
    seconds: float


def optimise(
    parameters: list[Tensor] | list[dict[str, object]],
    loss_at: Callable[[int], Tensor],
    iterations: int,
    learning_rate: float,
    progress: Progress,
    cosine: bool = False,
) -> list[float]:
    """AdamW on `parameters` (tensors, or groups with their own rates) for `iterations` steps of
    `loss_at(iteration)`, with a constant learning rate or a cosine decay to 0; reports each step's loss and stops
    between steps when cancelled."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations) if cosine else None
    losses = []
    with torch.enable_grad():
        for iteration in range(iterations):
            loss = loss_at(iteration)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            losses.append(float(loss.detach()))
            progress.step(iteration + 1, iterations, f"iteration {iteration + 1}/{iterations}, loss {losses[-1]:.4f}")
    return losses


def mean_embeddings(
    converter: ImageToPrompt, tower: DeepPromptedVision, images: Sequence[Image.Image], chunk: int = 16
) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        embeds = torch.cat([tower.encode_image(images[i : i + chunk]) for i in range(0, len(images), chunk)])
        mean = average_embeddings(embeds)
        return mean, converter.convert(mean)


@dataclass
class TuningStart:
    """What both tunings start from: the base CLIP and the SD-IPC converter on it, the seeded generator, the initial
    weights (zero K/V deltas, deep prompts) and the deep-prompted tower they train through."""

    clip: ClipModel
    converter: ImageToPrompt
    generator: torch.Generator
    weights: ConceptWeights
    tower: DeepPromptedVision
    started: float


def start_tuning(
    pipeline: StableDiffusionPipeline,
    clip: ClipModel,
    neutral_fit_images: Callable[[torch.Generator], Sequence[Image.Image]],
    config: TuningConfig,
    progress: Progress,
) -> TuningStart:
    """The shared set-up; with `prompt_init="neutral"` the deep prompts are first fitted (`fit_neutral_prompts`) on
    the images `neutral_fit_images` picks with the generator."""
    started = time.perf_counter()
    base = vision_tower(clip).clip
    generator = torch.Generator().manual_seed(config.seed)
    weights = ConceptWeights.initial(pipeline.unet, base, config.num_prompts, generator)
    if weights.deep_prompts is not None and config.prompt_init == "neutral":
        images = neutral_fit_images(generator)
        fit_neutral_prompts(base, weights.deep_prompts, images, progress, config.neutral_fit_steps)
    tower = DeepPromptedVision(base, weights.deep_prompts, config.prompt_dropout)
    return TuningStart(base, ImageToPrompt.cached(base, pipeline), generator, weights, tower, started)


def tuning_result(
    start: TuningStart, losses: list[float], images: Sequence[Image.Image], hyperparameters: dict[str, object]
) -> TuningResult:
    """The tuned weights with their losses, the images' mean embeddings through the tuned tower, and the settings."""
    mean_image, mean_converted = mean_embeddings(start.converter, start.tower, images)
    seconds = time.perf_counter() - start.started
    return TuningResult(
        start.weights, losses, mean_image, mean_converted, {**hyperparameters, "weight_decay": WEIGHT_DECAY}, seconds
    )


class CaptionAlignment:
    """SD-IPC-FT's optional caption-alignment loss (not in the paper): each image's converted prompt `f_cnvrt` is
    pulled towards its caption's end-of-text state, the state Eq. 6 estimates, and made closer to it than to the
    domain's other captions.

    Why: on `shapes`, variations of striped objects seldom kept the stripes, while the same U-Net drew them far
    more often from the caption's end-of-text state repeated as SD-IPC repeats `f_cnvrt`, and the pseudo-inverse
    keeps nearly all of the striped-minus-solid direction: the image side loses the fill, and the paper's
    denoising losses did not bring it back (no gain at any rate tried). The loss is the cosine distance
    to the own caption, plus `CONTRAST` times a cross-entropy over the cosines (centred on the captions' mean, at
    `TEMPERATURE`) to every distinct caption. On the domain's tuning scenes (`pictoprompt bench domain`) the cosine
    alone bought fill and background but lost the shape; with the contrastive term, which keeps what tells
    captions apart, the shape stayed and the fill improved (figures: lab/RESULTS.md, "SD-IPC-FT: domain
    fine-tuning").
    """

    CONTRAST = 0.5
    TEMPERATURE = 0.05

    def __init__(self, captions: Sequence[str], eos_states: Tensor) -> None:
        first: dict[str, int] = {}
        for i, caption in enumerate(captions):
            first.setdefault(caption, i)
        index = {caption: k for k, caption in enumerate(first)}
        self.targets = eos_states.detach().float()
        self.owner = torch.tensor([index[caption] for caption in captions], device=self.targets.device)
        self.distinct = self.targets[list(first.values())]
        self.centre = self.distinct.mean(dim=0, keepdim=True)

    def loss(self, f_cnvrt: Tensor, batch: Sequence[int]) -> Tensor:
        pulled = 1 - F.cosine_similarity(f_cnvrt, self.targets[batch]).mean()
        if len(self.distinct) == 1:  # nothing to tell the caption apart from
            return pulled
        similarity = F.normalize(f_cnvrt - self.centre, dim=-1) @ F.normalize(self.distinct - self.centre, dim=-1).T
        return pulled + self.CONTRAST * F.cross_entropy(similarity / self.TEMPERATURE, self.owner[batch])
