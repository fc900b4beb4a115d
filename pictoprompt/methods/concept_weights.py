"""A learned concept's weights and how they are applied: K/V deltas and deep prompts (paper 000_2353b6a202bfe3f4).

Trainable, exactly as the paper (Appendix A, Figs. 13-14):
- the key and value projections `W^k`, `W^v` of every U-Net cross-attention (diffusers' `attn2.to_k/to_v`), as
  Custom Diffusion does;
- deep prompts in the CLIP image transformer (VPT-deep, ref. [25]): `num_prompts` learnable tokens at the input
  of every layer (the authors: 50 per layer, dropout 0.1).

The base model is never written to. The K/V changes are float32 deltas, added by a stand-in module swapped in
for `to_k`/`to_v` only while a concept is in use (`applied_concept`); the deep prompts live in a separate forward
pass of the vision tower (`DeepPromptedVision`, on `models.clip_vision`). Leaving the block puts the original
modules back, so a call without a concept gives the base model's output bit for bit. A prompt that names a concept
("my-star on the left") gets the concept's converted embedding where the name stood (`named_concept_states`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from torch import Tensor, nn

from pictoprompt.errors import InvalidInputError
from pictoprompt.methods.sd_ipc import ImageToPrompt
from pictoprompt.models.clip import ClipModel
from pictoprompt.models.clip_vision import PromptedClip, vision_tower
from pictoprompt.models.concepts import name_pattern, weights_fingerprint

DEEP_PROMPTS_KEY = "vision.deep_prompts"
UNET_PREFIX = "unet."


# ------------------------------------------------------------------------------------------ what is trained


def cross_attention_projections(unet: UNet2DConditionModel) -> dict[str, nn.Linear]:
    """`to_k` and `to_v` of every cross-attention in the U-Net, keyed '<module path>.to_k' / '.to_v'."""
    projections = {}
    for path, module in unet.named_modules():
        if not getattr(module, "is_cross_attention", False):
            continue
        if getattr(module, "fused_projections", False):
            raise InvalidInputError(
                "The U-Net's attention projections are fused (fuse_qkv_projections); unfuse them to use concepts."
            )
        projections[f"{path}.to_k"] = module.to_k
        projections[f"{path}.to_v"] = module.to_v
    if not projections:
        raise InvalidInputError("The generator's U-Net has no cross-attention layers to tune.")
    return projections


def base_hash(pipeline: StableDiffusionPipeline, clip: ClipModel) -> str:
    """Fingerprint of the base weights a concept attaches to: every tuned K/V projection and the CLIP weights
    that decide the converted prompt's direction (class embedding, final norm, both projections)."""
    tensors = {
        f"{UNET_PREFIX}{key}": linear.weight for key, linear in cross_attention_projections(pipeline.unet).items()
    }
    tensors.update(vision_tower(clip).conversion_weights())
    return weights_fingerprint(tensors)


@dataclass
class ConceptWeights:
    """What SD-IPC-FT/CT learn: K/V weight deltas of the U-Net cross-attentions and the deep prompts."""

    kv_deltas: dict[str, Tensor]
    """'<attention path>.to_k' / '.to_v' -> float32 delta of that projection's weight (out, in)."""
    deep_prompts: Tensor | None
    """(layers, num_prompts, width) float32 tokens of the image transformer; None = no deep prompts."""

    @classmethod
    def initial(
        cls, unet: UNet2DConditionModel, clip: ClipModel, num_prompts: int, generator: torch.Generator
    ) -> ConceptWeights:
        """Zero deltas (the start is the untrained SD-IPC) and VPT's Xavier-uniform prompts, all trainable."""
        kv_deltas = {
            key: nn.Parameter(torch.zeros(linear.weight.shape, device=linear.weight.device))
            for key, linear in cross_attention_projections(unet).items()
        }
        deep_prompts = None
        if num_prompts > 0:
            vision = vision_tower(clip)
            bound = math.sqrt(6.0 / (3 * vision.patch_size**2 + vision.width))
            shape = (vision.num_layers, num_prompts, vision.width)
            values = (torch.rand(shape, generator=generator) * 2 - 1) * bound
            deep_prompts = nn.Parameter(values.to(vision.clip.device))
        return cls(kv_deltas, deep_prompts)

    def parameters(self) -> list[Tensor]:
        prompts = [] if self.deep_prompts is None else [self.deep_prompts]
        return [*self.kv_deltas.values(), *prompts]

    def parameter_groups(self, learning_rate: float, prompt_learning_rate: float | None) -> list[dict[str, object]]:
        """The optimizer's groups: the K/V deltas at `learning_rate`, the deep prompts at `prompt_learning_rate`
        (None: the same rate)."""
        groups: list[dict[str, object]] = [{"params": list(self.kv_deltas.values()), "lr": learning_rate}]
        if self.deep_prompts is not None:
            groups.append({"params": [self.deep_prompts], "lr": prompt_learning_rate or learning_rate})
        return groups

    def to_tensors(self) -> dict[str, Tensor]:
        """Flat, detached tensors for the concept store."""
        tensors = {f"{UNET_PREFIX}{key}.weight": delta.detach() for key, delta in self.kv_deltas.items()}
        if self.deep_prompts is not None:
            tensors[DEEP_PROMPTS_KEY] = self.deep_prompts.detach()
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> ConceptWeights:
        kv_deltas = {
            key.removeprefix(UNET_PREFIX).removesuffix(".weight"): value
            for key, value in tensors.items()
            if key.startswith(UNET_PREFIX)
        }
        return cls(kv_deltas, tensors.get(DEEP_PROMPTS_KEY))


# ------------------------------------------------------------------------------------------ the K/V deltas


class DeltaLinear(nn.Module):
    """`base` with `delta` added to its weight, in float32 (a delta of 1e-6 would vanish in a float16 weight).

    The cost is nil: cross-attention K/V only ever see the 77 prompt states.
    """

    def __init__(self, base: nn.Linear, delta: Tensor) -> None:
        super().__init__()
        self.base = base
        self.delta = delta

    @property
    def weight(self) -> Tensor:
        """The effective weight, in the base's dtype: diffusers' attention code reads `to_k.weight.dtype`."""
        return (self.base.weight.float() + self.delta).to(self.base.weight.dtype)

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, hidden_states: Tensor) -> Tensor:
        weight = self.base.weight.float() + self.delta
        bias = None if self.base.bias is None else self.base.bias.float()
        return F.linear(hidden_states.float(), weight, bias).to(hidden_states.dtype)


@contextmanager
def swapped_projections(unet: UNet2DConditionModel, kv_deltas: dict[str, Tensor]) -> Iterator[None]:
    """Within the block, each listed `to_k`/`to_v` is `DeltaLinear(original, delta)`; afterwards the original
    module objects are back in place, untouched."""
    projections = cross_attention_projections(unet)
    for key, delta in kv_deltas.items():
        if key not in projections or projections[key].weight.shape != delta.shape:
            raise InvalidInputError(
                f"The concept's weights do not fit this U-Net ({key}); tune the concept again on this model."
            )
    swapped: list[tuple[nn.Module, str, nn.Linear]] = []
    try:
        for key, delta in kv_deltas.items():
            path, _, name = key.rpartition(".")
            attention = unet.get_submodule(path)
            original = projections[key]
            setattr(attention, name, DeltaLinear(original, delta.to(original.weight.device)))
            swapped.append((attention, name, original))
        yield
    finally:
        for attention, name, original in reversed(swapped):
            setattr(attention, name, original)


@contextmanager
def applied_concept(
    pipeline: StableDiffusionPipeline, clip: ClipModel, concept: ConceptWeights | None
) -> Iterator[ClipModel]:
    """Use `concept` for the duration of the block: the U-Net's K/V projections carry its deltas, and the CLIP
    yielded encodes images through its deep prompts. With `concept=None` the block yields `clip` unchanged.

        with applied_concept(pipeline, clip, concept) as clip:
            converter = ImageToPrompt.cached(clip, pipeline)
            prompt = converter.prompt(clip.encode_image(images))
            ...generate(pipeline, prompt, ...)

    Run it under the GPU lock: the swap is visible to anything else using the same pipeline meanwhile.
    """
    if concept is None:
        yield clip
        return
    with swapped_projections(pipeline.unet, concept.kv_deltas):
        if concept.deep_prompts is None:
            yield clip
        else:
            yield PromptedClip(vision_tower(clip).clip, concept.deep_prompts)


# ------------------------------------------------------------------------------------------ a concept by name


WordPlacer = Callable[[str, str], str]
"""(description, the words after the name) -> the description with those words put where the language puts them
("an outlined green heart", "small" -> "a small outlined green heart"); `prompt_edit.rewrite_prompt` with an LLM."""


def named_concept_prompt(
    converter: ImageToPrompt,
    prompt: str,
    name: str,
    concept_embedding: Tensor,
    description: str | None = None,
    place: WordPlacer | None = None,
) -> Tensor:
    """The generator's states (1, L, D) for a prompt that names a learned concept: "my-star on the left".

    The name works as a placeholder token bound to the concept: it is taken out of the text, which is encoded as
    usual ("on the left"), and where it stood one position carries the concept's converted embedding `f_cnvrt`
    (Eq. 6); every other position keeps the text's own state, the end-of-text and padding states too, so the
    context the words give applies. The concept's identity comes from `f_cnvrt` and the concept's `description`,
    never from how its name happens to be spelled (a name "my-star" must not draw any star). Each further mention
    adds one more position. A concept learned with a description ("a green heart") has its words follow the
    placeholder, as DreamBooth's "a [V] dog" names the class beside the identifier: "[f_cnvrt] a green heart on
    the left". With `place`, the words after the name go into the description instead of after it ("NAME small"
    -> "[f_cnvrt] a small outlined green heart"): a generator trained on captions follows a size word only before
    the noun (an extension of ours, `ConceptTuningConfig.place_context_words`).

    On `shapes` this beat Eq. 8's form (`f_cnvrt + alpha * h_text` from the end-of-text token on) on the tuning
    concepts of `pictoprompt bench concepts`, for both the context and the concept (lab/RESULTS.md, "Figures
    behind the code's choices").
    """
    pieces = [piece.strip() for piece in name_pattern(name).split(prompt)]
    if len(pieces) == 1:
        raise InvalidInputError(f"The prompt does not name the concept '{name}'.")
    f_cnvrt = converter.convert(concept_embedding).reshape(1, 1, -1)
    words = (description or "").strip()
    if words:
        pieces = [pieces[0], *(_described(words, piece, place) for piece in pieces[1:])]
    states, _ = converter.text_states([" ".join(piece for piece in pieces if piece)])
    # The encoder is causal: the text's states up to the end of a prefix are the prefix's own states, so the
    # prefix's end-of-text index is where the name stood in the text.
    prefixes = [" ".join(piece for piece in pieces[: k + 1] if piece) for k in range(len(pieces) - 1)]
    _, cuts = converter.text_states(prefixes)
    rows, start = [], 0
    for cut in cuts.tolist():
        rows += [states[:, start:cut].float(), f_cnvrt]
        start = cut
    rows.append(states[:, start:].float())
    return torch.cat(rows, dim=1)[:, : converter.length]


def _described(description: str, words: str, place: WordPlacer | None) -> str:
    """The description followed by (or, with `place`, holding) the words that follow the concept's name."""
    if place is None or not words:
        return f"{description} {words}".strip()
    return place(description, words).strip()


def named_concept_states(
    clip: ClipModel,
    pipeline: StableDiffusionPipeline,
    prompt: str,
    negative_prompt: str,
    name: str,
    concept_embedding: Tensor,
    description: str | None = None,
    place: WordPlacer | None = None,
) -> tuple[Tensor, Tensor]:
    """The generator's conditioning for a text prompt that names the applied concept (`named_concept_prompt`),
    and the negative prompt's own states."""
    with torch.no_grad():
        converter = ImageToPrompt.cached(clip, pipeline)
        negative = converter.text_states([negative_prompt])[0].float() if negative_prompt else converter.empty_states
        return named_concept_prompt(converter, prompt, name, concept_embedding, description, place), negative
