"""SD-IPC-FT: tuning the image-to-prompt conversion to a captioned domain (paper 000_2353b6a202bfe3f4, Eq. 9), with
the trainable parameters of a concept (`concept_weights`) and the set-up of `tuning`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from torch import Tensor

from pictoprompt.configs import DomainTuningConfig
from pictoprompt.errors import InvalidInputError
from pictoprompt.methods.concept_weights import swapped_projections
from pictoprompt.methods.sd_ipc import pseudo_prompt
from pictoprompt.methods.tuning import (
    NEUTRAL_FIT_IMAGES,
    CaptionAlignment,
    TuningResult,
    TuningStart,
    denoising_loss,
    encode_latents,
    optimise,
    random_augmentation,
    start_tuning,
    tuning_result,
)
from pictoprompt.models.clip import ClipModel
from pictoprompt.models.clip_vision import clip_pixels
from pictoprompt.progress import Progress

SD_IPC_FT = "SD-IPC-FT"


class _DomainBatches:
    """Batches of training-image indices, each pass over the images in a new random order, and each reference's
    target: with `classes` ("A/B training") another image of its class, else itself."""

    def __init__(self, count: int, classes: Sequence[str] | None, batch_size: int, generator: torch.Generator) -> None:
        self.count, self.batch_size, self.generator = count, batch_size, generator
        self.same_class = [
            [j for j in range(count) if classes is not None and classes[j] == classes[i] and j != i]
            for i in range(count)
        ]
        self.order: list[int] = []

    def next(self) -> tuple[list[int], list[int]]:
        """(references, targets) of the next batch."""
        batch = []
        while len(batch) < self.batch_size:
            if not self.order:
                self.order.extend(torch.randperm(self.count, generator=self.generator).tolist())
            batch.append(self.order.pop())
        targets = [self._partner(i) for i in batch]
        return batch, targets

    def _partner(self, i: int) -> int:
        others = self.same_class[i]
        return others[int(torch.randint(0, len(others), (), generator=self.generator))] if others else i


def train_domain(
    pipeline: StableDiffusionPipeline,
    clip: ClipModel,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    classes: Sequence[str] | None = None,
    config: DomainTuningConfig = DomainTuningConfig(),
    progress: Progress | None = None,
) -> TuningResult:
    """SD-IPC-FT (Sec. 3.2, Eq. 9): adapt the conversion to a domain from ~100 captioned images.

    Loss = `L_convrt` (denoise the target under the pseudo-prompt of the reference) + `L_text` (denoise the
    reference under its own caption, a regulariser so text prompts still work). With `classes` ("A/B training")
    the target is another image of the reference's class, which teaches the converter to keep what the class
    shares; without, the reference itself. Cosine decay; the paper gives ~1 GPU-hour, not a step count. Ours, off
    by default: `caption_alignment` (`CaptionAlignment`) and the deep prompts' own `prompt_learning_rate`.
    """
    if len(images) != len(captions) or (classes is not None and len(classes) != len(images)):
        raise InvalidInputError("Give exactly one caption (and one class, if any) per training image.")
    if not images:
        raise InvalidInputError("Domain training needs at least one captioned image.")
    progress = progress or Progress()

    def neutral_fit_sample(generator: torch.Generator) -> list[Image.Image]:
        return [images[i] for i in torch.randperm(len(images), generator=generator)[:NEUTRAL_FIT_IMAGES].tolist()]

    start = start_tuning(pipeline, clip, neutral_fit_sample, config, progress)
    loss_at = _DomainLoss(pipeline, start, images, captions, classes, config)
    groups = start.weights.parameter_groups(config.learning_rate, config.prompt_learning_rate)
    with swapped_projections(pipeline.unet, start.weights.kv_deltas):
        losses = optimise(groups, loss_at, config.iterations, config.learning_rate, progress, cosine=True)
    hyperparameters = {
        "method": SD_IPC_FT,
        "schedule": "cosine",
        **config.model_dump(),
        "ab_targets": classes is not None,
        "prompt_learning_rate": config.prompt_learning_rate or config.learning_rate,
    }
    return tuning_result(start, losses, images, hyperparameters)


class _DomainLoss:
    """Each iteration's loss (Eq. 9) on the next batch: the targets denoised under the references' converted prompts,
    the references under their captions, plus the caption alignment's pull."""

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        start: TuningStart,
        images: Sequence[Image.Image],
        captions: Sequence[str],
        classes: Sequence[str] | None,
        config: DomainTuningConfig,
    ) -> None:
        self.pipeline, self.start, self.images, self.config = pipeline, start, images, config
        with torch.no_grad():
            states, eos_index = start.converter.text_states(list(captions))
            self.caption_states = states.detach()
            self.alignment = CaptionAlignment(captions, self.caption_states[torch.arange(len(captions)), eos_index])
        self.batches = _DomainBatches(len(images), classes, config.batch_size, start.generator)

    def view(self, image: Image.Image) -> Image.Image:
        return random_augmentation(image, self.start.generator) if self.config.augment else image

    def __call__(self, iteration: int) -> Tensor:
        pipeline, start, generator = self.pipeline, self.start, self.start.generator
        batch, partners = self.batches.next()
        references = [self.view(self.images[i]) for i in batch]
        targets = [
            reference if partner == i else self.view(self.images[partner])
            for reference, i, partner in zip(references, batch, partners, strict=True)
        ]
        reference_latents = encode_latents(pipeline, references)
        target_latents = reference_latents if partners == batch else encode_latents(pipeline, targets)
        f_cnvrt = start.converter.convert(start.tower(clip_pixels(start.clip, references), generator))
        image_prompt = pseudo_prompt(f_cnvrt, start.converter.start_state, start.converter.length)
        loss_convert = denoising_loss(pipeline, target_latents, image_prompt, generator)
        loss_text = denoising_loss(pipeline, reference_latents, self.caption_states[batch], generator)
        loss = loss_convert + loss_text
        if self.config.caption_alignment:
            loss = loss + self.config.caption_alignment * self.alignment.loss(f_cnvrt, batch)
        return loss
