"""SD-IPC-CT: tuning the image-to-prompt conversion to one concept (paper 000_2353b6a202bfe3f4, section 3.3).

SD-IPC (`sd_ipc.py`) turns an image into a prompt with no training. Fine-tuning a few parameters
(`concept_weights`) makes the conversion keep what matters for one concept, and because the untrained conversion
is already a good prompt, a concept needs only ~30 updates instead of Custom Diffusion's 250. The domain version
(SD-IPC-FT, Eq. 9) is `domain_tuning`; what both share is `tuning`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from torch import Tensor

from pictoprompt.configs import ConceptTuningConfig
from pictoprompt.errors import InvalidInputError
from pictoprompt.methods.concept_weights import swapped_projections
from pictoprompt.methods.sd_ipc import pseudo_prompt
from pictoprompt.methods.tuning import (
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

SD_IPC_CT = "SD-IPC-CT"


def tune_concept(
    pipeline: StableDiffusionPipeline,
    clip: ClipModel,
    references: Sequence[Image.Image],
    config: ConceptTuningConfig = ConceptTuningConfig(),
    description: str | None = None,
    progress: Progress | None = None,
) -> TuningResult:
    """SD-IPC-CT (Sec. 3.3): tune the K/V projections and deep prompts on a few reference images.

    Each iteration takes every reference (randomly flipped and cropped when `augment`), converts it into its
    pseudo-prompt through the deep-prompted image encoder, `W_t_pinv` and Eq. 7, and takes one AdamW step on
    the denoising loss of that same image under that prompt (`L_convrt` only), constant learning rate.
    `prompt_init="random"` starts from VPT's random prompts as they are; "neutral" first fits them, in
    `neutral_fit_steps` Adam steps, so the encoder is unchanged on the references (see `fit_neutral_prompts`).

    With a `description` of the concept ("a green heart") and `caption_alignment` > 0, the loss adds that weight
    times `CaptionAlignment`'s pull of every reference's `f_cnvrt` towards the description's end-of-text state
    (not in the paper; one caption, so no contrastive term): the words steer the conversion while the denoising
    loss still fits the pictures, and the deep prompts learn at `aligned_prompt_learning_rate` when it is set.
    """
    if not references:
        raise InvalidInputError("Concept tuning needs at least one reference image.")
    description = (description or "").strip() or None
    progress = progress or Progress()
    start = start_tuning(pipeline, clip, lambda _: references, config, progress)
    alignment = None
    if description is not None and config.caption_alignment:
        with torch.no_grad():
            states, eos_index = start.converter.text_states([description])
            alignment = CaptionAlignment([description], states[:1, int(eos_index[0])])
    loss_at = _concept_loss(pipeline, start, references, config, alignment)
    aligned_rate = config.aligned_prompt_learning_rate if alignment is not None else None
    prompt_rate = aligned_rate or config.prompt_learning_rate or config.learning_rate
    groups = start.weights.parameter_groups(config.learning_rate, prompt_rate)
    with swapped_projections(pipeline.unet, start.weights.kv_deltas):
        losses = optimise(groups, loss_at, config.iterations, config.learning_rate, progress)
    hyperparameters = {
        "method": SD_IPC_CT,
        "schedule": "constant",
        **config.model_dump(exclude={"aligned_prompt_learning_rate", "place_context_words"}),
        "prompt_learning_rate": prompt_rate,
        "caption_alignment": config.caption_alignment if alignment is not None else 0.0,
    }
    return tuning_result(start, losses, references, hyperparameters)


def _concept_loss(
    pipeline: StableDiffusionPipeline,
    start: TuningStart,
    references: Sequence[Image.Image],
    config: ConceptTuningConfig,
    alignment: CaptionAlignment | None,
) -> Callable[[int], Tensor]:
    """Each iteration's loss: every reference denoised under its own converted prompt, plus the alignment's pull."""
    generator, converter = start.generator, start.converter
    owners = [0] * len(references)

    def loss_at(iteration: int) -> Tensor:
        images = [random_augmentation(image, generator) if config.augment else image for image in references]
        f_cnvrt = converter.convert(start.tower(clip_pixels(start.clip, images), generator))
        prompt = pseudo_prompt(f_cnvrt, converter.start_state, converter.length)
        loss = denoising_loss(pipeline, encode_latents(pipeline, images), prompt, generator)
        if alignment is not None:
            loss = loss + config.caption_alignment * alignment.loss(f_cnvrt, owners)
        return loss

    return loss_at
