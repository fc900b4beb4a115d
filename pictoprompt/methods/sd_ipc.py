"""SD-IPC: training-free image-to-prompt conversion (paper 000_2353b6a202bfe3f4, section 3.1).

CLIP is trained so that an image's embedding `f_img_c` points the same way as its caption's embedding
`f_txt_c = W_t @ f_txt_eos` (Eq. 5). Inverting the text projection `W_t` therefore turns an image embedding into an
estimate of the caption's end-of-text state (Eq. 6), and because Stable Diffusion's cross-attention hardly needs
the word tokens, a prompt made of that one state reproduces the image's content (Eq. 7). Adding an edit text's
own states to it steers the result with words (Eq. 8).

Every function here is plain differentiable torch (no `no_grad`), so the fine-tuning variants (sections 3.2/3.3)
can backpropagate through the conversion into the image encoder.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from PIL import Image
from torch import Tensor

from pictoprompt.errors import InvalidInputError
from pictoprompt.models.clip import ClipModel, border_colour

OBJECT_CONTRAST = 48
"""A pixel belongs to the object when one of its channels differs from the border's colour by more than this."""

SINGULAR_VALUE_ATOL = 0.3
"""Paper footnote 6: singular values of `W_t` below 0.3 are treated as 0 when forming the pseudo-inverse."""

VIT_L_TARGET_NORM = 27.5
"""The authors' scale for CLIP ViT-L/14 (768 wide): the typical norm of its final-layer-normed EOS state."""

REFERENCE_PROMPTS = (
    "a photo of a dog sitting on the grass",
    "a red circle on a blue background",
    "an oil painting of a mountain lake at sunset",
    "a portrait of a woman wearing a hat",
    "a city street at night in the rain",
    "a small green triangle",
)
"""Prompts whose EOS-state norm sets the conversion's scale for encoders other than ViT-L/14."""

TextStatesFn = Callable[[Sequence[str]], tuple[Tensor, Tensor]]
"""Encodes texts with a generator's text encoder: final states (B, L, D) and each row's EOS index (B,)."""


def conversion_matrix(text_projection: Tensor, atol: float = SINGULAR_VALUE_ATOL) -> Tensor:
    """`W_t_pinv` (D, P): the Moore-Penrose pseudo-inverse of `W_t` (P, D), singular values below `atol` dropped.

    Dropping the small singular values keeps directions `W_t` barely uses from being blown up by 1/sigma.
    """
    # rtol=0 so that only the absolute threshold of the paper applies.
    return torch.linalg.pinv(text_projection.float(), atol=atol, rtol=0.0)


def convert_image_embedding(image_embeds: Tensor, W_t_pinv: Tensor, norm: float) -> Tensor:
    """`f_cnvrt` (B, D) from projected image embeddings (B, P) (Eq. 6).

    The paper scales by `||f_txt_c|| / ||f_img_c||`; the authors' code normalises after the pseudo-inverse and
    scales to the EOS-state norm instead, which puts `f_cnvrt` exactly on the norm the U-Net was trained on.
    """
    return norm * F.normalize(image_embeds.float() @ W_t_pinv.T, dim=-1)


def pseudo_prompt(f_cnvrt: Tensor, start_state: Tensor, length: int = 77) -> Tensor:
    """The pseudo-prompt (B, length, D) of Eq. 7: the start-token state, then `f_cnvrt` at every other position.

    The repeats are kept on purpose (paper footnote 7): they dilute the start token's share of the attention.
    """
    batch, width = f_cnvrt.shape
    start = start_state.to(f_cnvrt).expand(batch, 1, width)
    return torch.cat([start, f_cnvrt.unsqueeze(1).expand(batch, length - 1, width)], dim=1)


def edited_prompt(f_cnvrt: Tensor, text_states: Tensor, eos_index: int, alpha: float = 0.9) -> Tensor:
    """The text-edited prompt (B, length, D) of Eq. 8, as the authors' code builds it.

    Positions before the edit text's EOS keep the text's own states (start token and words); every position
    `i >= eos_index` becomes `f_cnvrt + alpha * h_text[i]`, each with its own state (EOS and pads alike).
    """
    batch = f_cnvrt.shape[0]
    text_states = text_states.to(f_cnvrt).expand(batch, -1, -1)
    combined = f_cnvrt.unsqueeze(1) + alpha * text_states[:, eos_index:]
    return torch.cat([text_states[:, :eos_index], combined], dim=1)


def average_embeddings(image_embeds: Tensor, weights: Sequence[float] | None = None) -> Tensor:
    """One (1, P) embedding for several references: the (weighted) mean of their normalised embeddings.

    Normalising first gives every image the same say whatever its embedding's length; the conversion
    normalises again afterwards, so only the direction of the result matters.
    """
    count = image_embeds.shape[0]
    if weights is None:
        weights = [1.0] * count
    if len(weights) != count:
        raise InvalidInputError(f"Got {len(weights)} weights for {count} images; give exactly one per image.")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise InvalidInputError("Image weights must be non-negative and at least one must be positive.")
    w = torch.tensor(list(weights), dtype=torch.float32, device=image_embeds.device)
    return ((w / w.sum()).unsqueeze(1) * F.normalize(image_embeds.float(), dim=-1)).sum(dim=0, keepdim=True)


def clip_text_states(clip: ClipModel) -> TextStatesFn:
    """The CLIP text tower as the generator's encoder (SD 1.x and `shapes`, where the two are one model)."""

    def encode(texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        input_ids = clip.tokenize(texts)
        return clip.text_states(input_ids), clip.eos_positions(input_ids)

    return encode


def pipeline_text_states(pipeline: DiffusionPipeline) -> TextStatesFn:
    """The generator's own tokenizer and text encoder, tokenised as diffusers' `encode_prompt` does.

    The prompt must live where the U-Net was trained (for SD 2.x that is not the CLIP's last layer), so the
    start state, the edit text and the scale all come from here.
    """
    tokenizer, text_encoder = pipeline.tokenizer, pipeline.text_encoder

    def encode(texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        input_ids = tokenizer(
            list(texts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(text_encoder.device)
        # The first end-of-text token is the EOS whatever the pad token is (SD 2.x pads with "!").
        eos = (input_ids == tokenizer.eos_token_id).int().argmax(dim=-1)
        return text_encoder(input_ids)[0], eos

    return encode


def target_norm(encoder: ClipModel | TextStatesFn, prompts: Sequence[str] = REFERENCE_PROMPTS) -> float:
    """The norm `f_cnvrt` is scaled to: 27.5 for a 768-wide encoder (the authors' value for ViT-L/14), otherwise
    the mean EOS-state norm of `encoder` over a few reference prompts."""
    text_states = clip_text_states(encoder) if isinstance(encoder, ClipModel) else encoder
    states, eos = text_states(prompts)
    if states.shape[-1] == 768:
        return VIT_L_TARGET_NORM
    eos_states = states[torch.arange(states.shape[0], device=states.device), eos]
    return float(eos_states.float().norm(dim=-1).mean())


class ImageToPrompt:
    """SD-IPC for one CLIP and one generator: `W_t_pinv`, the target norm and the empty prompt, computed once.

    `generator` is the diffusers pipeline whose U-Net will consume the prompts, or a `TextStatesFn`; None means
    the CLIP's own text tower is the generator's text encoder. Use `ImageToPrompt.cached` to share one instance
    per (CLIP, text encoder).
    """

    def __init__(
        self,
        clip: ClipModel,
        generator: DiffusionPipeline | TextStatesFn | None = None,
        atol: float = SINGULAR_VALUE_ATOL,
    ) -> None:
        if isinstance(generator, DiffusionPipeline):
            generator = pipeline_text_states(generator)
        self.text_states: TextStatesFn = generator or clip_text_states(clip)
        self.W_t_pinv = conversion_matrix(clip.text_projection, atol).detach()
        self.norm = target_norm(self.text_states)
        empty_states, _ = self.text_states([""])
        self.empty_states = empty_states.detach().float()
        """The generator's states for "" (1, L, D): the negative prompt of classifier-free guidance."""
        if self.empty_states.shape[-1] != self.W_t_pinv.shape[0]:
            raise InvalidInputError(
                f"The CLIP's text width ({self.W_t_pinv.shape[0]}) differs from the generator's "
                f"({self.empty_states.shape[-1]}); SD-IPC needs the CLIP the generator was trained with "
                "(ViT-L/14 for SD 1.x, OpenCLIP ViT-H/14 for SD 2.x)."
            )

    @classmethod
    def cached(cls, clip: ClipModel, pipeline: DiffusionPipeline) -> ImageToPrompt:
        """The shared instance for this CLIP and this pipeline's text encoder, built on first use."""
        with _cache_lock:
            per_encoder = _cache.setdefault(clip, weakref.WeakKeyDictionary())
            if pipeline.text_encoder not in per_encoder:
                per_encoder[pipeline.text_encoder] = cls(clip, pipeline)
            return per_encoder[pipeline.text_encoder]

    @property
    def start_state(self) -> Tensor:
        """The state at the start token (D,): the same for every prompt, since attention is causal."""
        return self.empty_states[0, 0]

    @property
    def length(self) -> int:
        return self.empty_states.shape[1]

    def convert(self, image_embeds: Tensor) -> Tensor:
        """`f_cnvrt` (B, D) on the generator's device."""
        f_cnvrt = convert_image_embedding(image_embeds, self.W_t_pinv.to(image_embeds.device), self.norm)
        return f_cnvrt.to(self.empty_states.device)

    def prompt(self, image_embeds: Tensor) -> Tensor:
        """The pseudo-prompt (B, L, D) to pass as `prompt_embeds`; pair it with `empty_states` as the negative."""
        return pseudo_prompt(self.convert(image_embeds), self.start_state, self.length)

    def edit(self, image_embeds: Tensor, text: str, alpha: float = 0.9) -> Tensor:
        """The prompt (B, L, D) that carries both the image(s) and the edit `text` (Eq. 8)."""
        states, eos = self.text_states([text])
        return edited_prompt(self.convert(image_embeds), states, int(eos[0]), alpha)


def embed_references(clip: ClipModel, references: Sequence[Image.Image | Tensor]) -> Tensor:
    """(N, P) CLIP image embeddings of references: pictures through `clip`, and embeddings (a learned concept's
    mean, say) as they are."""
    with torch.no_grad():
        rows = [ref if isinstance(ref, Tensor) else clip.encode_image([ref]) for ref in references]
    return torch.cat([row.float().reshape(1, -1).to(clip.device) for row in rows])


def variation_states(
    clip: ClipModel, pipeline: DiffusionPipeline, image_embeds: Tensor, weights: Sequence[float] | None = None
) -> tuple[Tensor, Tensor]:
    """The generator's conditioning for SD-IPC's variation (Eq. 7) of the references' weighted mean: the
    pseudo-prompt and, as the negative, the empty prompt's states."""
    with torch.no_grad():
        converter = ImageToPrompt.cached(clip, pipeline)
        return converter.prompt(average_embeddings(image_embeds, weights)), converter.empty_states


def prompted_variation_states(
    clip: ClipModel,
    pipeline: DiffusionPipeline,
    image_embeds: Tensor,
    prompt: str,
    converted_weight: float = 0.0,
    weights: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor]:
    """`variation_states` with the references' readable `prompt` combined in (`prompted_states`, ours)."""
    with torch.no_grad():
        converter = ImageToPrompt.cached(clip, pipeline)
        embeds = average_embeddings(image_embeds, weights)
        return prompted_states(converter, embeds, prompt, converted_weight), converter.empty_states


def prompted_states(
    converter: ImageToPrompt, image_embeds: Tensor, prompt: str, converted_weight: float = 0.0
) -> Tensor:
    """Ours, beyond the paper: the picture's converted embedding combined with the picture's own readable prompt.

    SD-IPC's pseudo-prompt (Eq. 7) carries what CLIP's image embedding holds, and on a small CLIP the conversion
    loses the shape and the background more often than the colour. A prompt that names them (VGD's inversion of
    the same picture) keeps them. The states are the prompt's up to its end-of-text token; from there on each
    position is `(1 - converted_weight) * h_prompt[i] + converted_weight * f_cnvrt`, so 0 draws the prompt and 1
    puts SD-IPC's converted embedding where Eq. 8 puts it, without the prompt's own end-of-text states.
    """
    states, eos = converter.text_states([prompt])
    end = int(eos[0])
    f_cnvrt = converter.convert(image_embeds).float()
    combined = states.float().expand(f_cnvrt.shape[0], -1, -1).clone()
    combined[:, end:] = (1 - converted_weight) * combined[:, end:] + converted_weight * f_cnvrt.unsqueeze(1)
    return combined


def centred_on_object(image: Image.Image, span: float) -> Image.Image:
    """Ours, not the paper's: the picture on a square canvas in its border's colour, centred on what differs from the
    border (its objects) and scaled so that their extent is `span` of the canvas's side; unchanged if nothing differs.

    The bundled CLIP learnt objects of two sizes on a grid of places; a picture drawn with another size, anywhere, is
    read better centred at the size it knows (on tuning pictures drawn with PIL, shape named right 87 % -> 93 %,
    lab/results/variations.md). The place and the size are lost, which a variation varies anyway.
    """
    rgb = image.convert("RGB")
    border = border_colour(rgb)
    difference = np.abs(np.asarray(rgb, dtype=np.float32) - np.asarray(border, dtype=np.float32)).max(axis=-1)
    rows, columns = np.nonzero(difference > OBJECT_CONTRAST)
    if len(rows) == 0:
        return rgb
    left, right, top, bottom = columns.min(), columns.max() + 1, rows.min(), rows.max() + 1
    extent = int(max(right - left, bottom - top))
    side = max(round(extent / span), extent)
    canvas = Image.new("RGB", (side, side), border)
    canvas.paste(rgb, (round(side / 2 - (left + right) / 2), round(side / 2 - (top + bottom) / 2)))
    return canvas


def edit_states(
    clip: ClipModel, pipeline: DiffusionPipeline, image_embeds: Tensor, text: str, alpha: float = 0.9
) -> tuple[Tensor, Tensor]:
    """The generator's conditioning for SD-IPC's text-edited variation (Eq. 8), and the empty prompt's states."""
    with torch.no_grad():
        converter = ImageToPrompt.cached(clip, pipeline)
        return converter.edit(image_embeds, text, alpha), converter.empty_states


_cache: weakref.WeakKeyDictionary[ClipModel, weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()
