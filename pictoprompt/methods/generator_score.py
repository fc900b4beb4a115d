"""How well the generator's denoising explains pictures under a text: a diffusion classifier (Li et al. 2023, "Your
Diffusion Model is Secretly a Zero-Shot Classifier"), scored at the same timesteps and noise for every text so that
the errors compare. The generator judges what CLIP cannot, such as how many objects a picture holds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from torch import Tensor

from pictoprompt.configs import GeneratorRerank
from pictoprompt.methods.generation import errors_per_text, noise_target
from pictoprompt.methods.sd_ipc import ImageToPrompt
from pictoprompt.methods.tuning import encode_latents
from pictoprompt.methods.vgd import ClipVocabulary, VgdResult
from pictoprompt.models.clip import ClipModel
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
    """For rows 1.. of (T, N) errors: the median over the N pictures of each one's relative change against row 0,
    so that one picture a word fits far better does not outvote the others."""
    return (errors[1:] / errors[0] - 1).median(dim=1).values


def one_subject_vocabulary(vocabulary: ClipVocabulary, settings: GeneratorRerank) -> ClipVocabulary | None:
    """The vocabulary whose dictionary lacks the words that join a second subject to the first: a decode written in
    it names one subject. None when there is no such decode (no dictionary, or no joining words)."""
    if vocabulary.dictionary is None or not settings.joining_words:
        return None
    return replace(vocabulary, dictionary=vocabulary.dictionary - {word.lower() for word in settings.joining_words})


def names_several(text: str, settings: GeneratorRerank) -> bool:
    """Whether a prompt joins a second subject to the first: one of the joining words, or a comma list."""
    joining = {word.lower() for word in settings.joining_words}
    return "," in text or any(word in joining for word in re.findall(r"[a-z]+", text.lower()))


def generator_reranked(
    pipeline: StableDiffusionPipeline,
    clip: ClipModel,
    images: Sequence[Image.Image],
    result: VgdResult,
    alternatives: Sequence[VgdResult],
    settings: GeneratorRerank,
    weights: Sequence[float] | None = None,
    progress: Progress | None = None,
) -> VgdResult:
    """`result` with its best hypothesis and the `settings.candidates` best finished one-subject hypotheses of the
    `alternatives` in front, lowest denoising error on the images first (mean, or weighted by `weights`); its other
    hypotheses follow in their order.

    Ours, not VGD's (`Profile.vgd_rerank`): the generator judges the whole sentence against the whole picture, so a
    second object the picture lacks costs a prompt what CLIP's similarity did not. Only sentences the LLM ended are
    judged: the generator can prefer a fragment cut at the length limit.
    """
    chosen = {result.best.text: result.best}
    for alternative in alternatives:
        ended = [h for h in alternative.hypotheses if h.finished and not names_several(h.text, settings)]
        for hypothesis in ended[: settings.candidates]:
            chosen.setdefault(hypothesis.text, hypothesis)
    head, texts = list(chosen.values()), list(chosen)
    if len(head) > 1:
        converter = ImageToPrompt.cached(clip, pipeline)
        latents = encode_latents(pipeline, [image.convert("RGB") for image in images])
        errors = denoising_errors(
            pipeline, converter, latents, texts, settings.timesteps, settings.seed, progress or Progress()
        )
        share = torch.tensor(weights if weights is not None else [1.0] * len(images), dtype=errors.dtype)
        head = [head[i] for i in (errors @ (share / share.sum())).argsort(stable=True).tolist()]
    return replace(result, hypotheses=head + [h for h in result.hypotheses if h.text not in chosen])
