"""The CLIP scores reported with results: cosine similarities in CLIP space (`ClipModel.similarity`) of an output
to its references, a text or a target. They rank and explain results; they are no paper's objective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from pictoprompt.methods.generation import Judge
from pictoprompt.models.clip import ClipModel

Embeddings = Tensor
"""CLIP-space vectors, one row each (N, P): what the tools hand from one method to another without reading them."""


def weighted_similarity(
    clip: ClipModel, output_embeds: Tensor, reference_embeds: Tensor, weights: Sequence[float] | None = None
) -> list[float]:
    """Per output embedding: the weighted mean of its cosine similarities to each reference (equal weights when
    `weights` is None)."""
    similarities = clip.similarity(output_embeds, reference_embeds)
    w = torch.tensor(list(weights) if weights else [1.0] * reference_embeds.shape[0], device=similarities.device)
    return (similarities @ (w / w.sum())).tolist()


@dataclass(frozen=True)
class ImageScores:
    """Per output image: its similarity to the references and, when a text was given, to that text."""

    to_references: list[float]
    to_text: list[float] | None = None


def score_images(
    clip: ClipModel,
    images: Sequence[Image.Image],
    references: Tensor,
    weights: Sequence[float] | None = None,
    text: str | None = None,
) -> ImageScores:
    """Scores of generated `images` against the (N, P) reference embeddings (weighted mean) and `text`; each image
    is encoded once."""
    with torch.no_grad():
        embeds = clip.encode_image(images)
        to_text = clip.similarity(embeds, clip.encode_text([text]))[:, 0].tolist() if text is not None else None
        return ImageScores(weighted_similarity(clip, embeds, references.to(embeds.device), weights), to_text)


def closeness_judge(clip: ClipModel, pictures: Sequence[Image.Image], description: str | None) -> Judge:
    """A judge of candidate pictures (`generation.generate_best`): each one's mean CLIP similarity to `pictures`, plus
    its similarity to `description` when there is one."""
    with torch.no_grad():
        references = clip.encode_image(pictures)
        words = clip.encode_text([description]) if description else None

    def judge(images: list[Image.Image]) -> list[float]:
        with torch.no_grad():
            embeds = clip.encode_image(images)
        closeness = torch.tensor(weighted_similarity(clip, embeds, references))
        if words is not None:
            closeness += torch.tensor(weighted_similarity(clip, embeds, words))
        return closeness.tolist()

    return judge


def prompt_similarities(clip: ClipModel, texts: Sequence[str], targets: Embeddings) -> list[list[float]]:
    """Cosine similarity of each text's CLIP embedding to each target row (T, N): a prompt against the images it
    should regenerate, or a short prompt against a long one's text embedding."""
    with torch.no_grad():
        return clip.similarity(clip.encode_text(list(texts)), targets.to(clip.device)).tolist()
