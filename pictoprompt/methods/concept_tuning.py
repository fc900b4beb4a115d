"""SD-IPC-FT and SD-IPC-CT: tuning the image-to-prompt conversion (paper 000_2353b6a202bfe3f4, sections 3.2-3.3).

SD-IPC (`sd_ipc.py`) turns an image into a prompt with no training. Fine-tuning a few parameters makes the
conversion keep what matters for a domain (SD-IPC-FT, Eq. 9) or for one concept (SD-IPC-CT), and because the
untrained conversion is already a good prompt, a concept needs only ~30 updates instead of Custom Diffusion's 250.

Trainable, exactly as the paper (Appendix A, Figs. 13-14):
- the key and value projections `W^k`, `W^v` of every U-Net cross-attention (diffusers' `attn2.to_k/to_v`), as
  Custom Diffusion does;
- deep prompts in the CLIP image transformer (VPT-deep, ref. [25]): `num_prompts` learnable tokens at the input
  of every layer (the authors: 50 per layer, dropout 0.1).
The pseudo-inverse `W_t_pinv` and every other weight stay frozen. Tuning starts from the untrained SD-IPC: zero
deltas, and deep prompts fitted to leave the image embeddings unchanged (`prompt_init="neutral"`, the default;
"random" keeps VPT's random start, which on a small encoder moves the conversion far from SD-IPC's).

The base model is never written to. The K/V changes are float32 deltas, added by a stand-in module swapped in
for `to_k`/`to_v` only while a concept is in use (`applied_concept`); the deep prompts live in a separate forward
pass of the vision tower (`DeepPromptedVision`). Leaving the block puts the original modules back, so a call
without a concept gives the base model's output bit for bit.

The CLIP may be a transformers one (SD 1.x) or an open_clip ViT (SD 2.x): `VisionTower` gives the steps of either
image transformer between which the deep prompts go.
"""

from __future__ import annotations

import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image, ImageOps
from torch import Tensor, nn

from pictoprompt.errors import InvalidInputError
from pictoprompt.methods.generation import default_size, noise_target
from pictoprompt.methods.sd_ipc import ImageToPrompt, average_embeddings, pseudo_prompt
from pictoprompt.models.clip import ClipModel, OpenClipClip, TransformersClip, preprocess_images
from pictoprompt.models.concepts import weights_fingerprint
from pictoprompt.progress import Progress

SD_IPC_CT = "SD-IPC-CT"
SD_IPC_FT = "SD-IPC-FT"
DEEP_PROMPTS_KEY = "vision.deep_prompts"
UNET_PREFIX = "unet."
WEIGHT_DECAY = 1e-2
"""AdamW's decay, as diffusers' training scripts. On deltas it pulls towards the base weights, not towards 0."""
NEUTRAL_FIT_STEPS = 50
NEUTRAL_FIT_LR = 1e-2
NEUTRAL_FIT_IMAGES = 16
"""Fitting fresh deep prompts to leave the embeddings unchanged (`prompt_init="neutral"`): cosine loss, Adam,
on at most 16 images (one batch through the encoder with gradients)."""
CROP_SCALE = (0.8, 1.0)
"""Side of the random square crop as a fraction of the image's short side (augmentation)."""


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


# ------------------------------------------------------------------------------------------ the deep prompts


class VisionTower(ABC):
    """A CLIP's image transformer taken apart where VPT-deep prompts go in, whichever library holds it.

    `embed`, then `layer` for every layer in turn, then `pool` is the CLIP's own `encode_image`; the deep prompts
    are inserted between those steps (`DeepPromptedVision`). Hidden states are batch first, class token first.
    """

    clip: ClipModel
    """The base CLIP (a `PromptedClip`'s base, not the wrapper)."""
    num_layers: int
    width: int
    patch_size: int

    @abstractmethod
    def pixels(self, images: Sequence[Image.Image]) -> Tensor:
        """The CLIP's own preprocessing, on its device and in its image tower's dtype."""

    @abstractmethod
    def embed(self, pixels: Tensor) -> Tensor:
        """The tokens entering the first layer (B, 1 + patches, width): patch, class and position embeddings,
        then the pre-layernorm."""

    @abstractmethod
    def layer(self, index: int, hidden: Tensor) -> Tensor:
        """Layer `index` applied to `hidden` (B, tokens, width)."""

    @abstractmethod
    def pool(self, hidden: Tensor) -> Tensor:
        """The projected image embedding (B, P), float32, from the last layer's class token."""

    @abstractmethod
    def conversion_weights(self) -> dict[str, Tensor]:
        """The weights that decide the converted prompt's direction, named alike for both libraries (`base_hash`)."""


class TransformersVisionTower(VisionTower):
    """A transformers `CLIPModel`'s vision model (SD 1.x, `shapes`, `tiny`)."""

    def __init__(self, clip: TransformersClip) -> None:
        config = clip.model.config.vision_config
        self.clip = clip
        self.model = clip.model
        self.num_layers, self.width, self.patch_size = config.num_hidden_layers, config.hidden_size, config.patch_size

    def pixels(self, images: Sequence[Image.Image]) -> Tensor:
        pixels = preprocess_images(images, self.clip.image_size, self.clip.image_mean, self.clip.image_std)
        return pixels.to(self.clip.device, self.model.dtype)

    def embed(self, pixels: Tensor) -> Tensor:
        vision = self.model.vision_model
        return vision.pre_layrnorm(vision.embeddings(pixels))

    def layer(self, index: int, hidden: Tensor) -> Tensor:
        return self.model.vision_model.encoder.layers[index](hidden, None)

    def pool(self, hidden: Tensor) -> Tensor:
        pooled = self.model.vision_model.post_layernorm(hidden[:, 0])
        return self.model.visual_projection(pooled).float()

    def conversion_weights(self) -> dict[str, Tensor]:
        return {
            "clip.class_embedding": self.model.vision_model.embeddings.class_embedding,
            "clip.post_layernorm": self.model.vision_model.post_layernorm.weight,
            "clip.visual_projection": self.model.visual_projection.weight,
            "clip.text_projection": self.model.text_projection.weight,
        }


class OpenClipVisionTower(VisionTower):
    """An open_clip ViT's `visual` (SD 2.x's OpenCLIP ViT-H/14): `VisionTransformer.forward` step by step."""

    def __init__(self, clip: OpenClipClip) -> None:
        from open_clip.transformer import VisionTransformer  # imported on use, as `OpenClipClip` does

        visual = clip.model.visual
        # Deep prompts need a ViT whose embedding is its class token through `ln_post` and `proj` (what `pool`
        # computes); ResNet and timm towers, attentional or average pooling are something else.
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None or visual.pool_type != "tok":
            raise InvalidInputError(
                "Concept tuning needs a ViT image tower that pools its class token; this open_clip CLIP's image "
                f"tower ({type(visual).__name__}) does not. Use a profile with OpenCLIP ViT-H/14 (SD 2.x) or a "
                "transformers CLIP (SD 1.x)."
            )
        self.clip = clip
        self.visual = visual
        self.num_layers = len(visual.transformer.resblocks)
        self.width = visual.conv1.out_channels
        self.patch_size = visual.conv1.kernel_size[0]
        # open_clip runs its blocks batch first unless the model was built with `batch_first=False` (the tower then
        # transposes around the whole stack).
        self.sequence_first = not getattr(visual.transformer, "batch_first", True)

    def pixels(self, images: Sequence[Image.Image]) -> Tensor:
        pixels = preprocess_images(images, self.clip.image_size, self.clip.image_mean, self.clip.image_std)
        # open_clip's half precision keeps some parameters in float32: the patch convolution decides.
        return pixels.to(self.clip.device, self.visual.conv1.weight.dtype)

    def embed(self, pixels: Tensor) -> Tensor:
        visual = self.visual
        patches = visual.conv1(pixels).flatten(2).transpose(1, 2)  # (B, grid * grid, width)
        class_token = visual.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        hidden = torch.cat([class_token, patches], dim=1) + visual.positional_embedding.to(patches.dtype)
        return visual.ln_pre(visual.patch_dropout(hidden))  # patch dropout is the identity outside training

    def layer(self, index: int, hidden: Tensor) -> Tensor:
        block = self.visual.transformer.resblocks[index]
        if self.sequence_first:
            return block(hidden.transpose(0, 1), attn_mask=None).transpose(0, 1)
        return block(hidden, attn_mask=None)

    def pool(self, hidden: Tensor) -> Tensor:
        return (self.visual.ln_post(hidden[:, 0]) @ self.visual.proj).float()

    def conversion_weights(self) -> dict[str, Tensor]:
        return {
            "clip.class_embedding": self.visual.class_embedding,
            "clip.post_layernorm": self.visual.ln_post.weight,
            "clip.visual_projection": self.visual.proj,
            "clip.text_projection": self.clip.text_projection,
        }


def vision_tower(clip: ClipModel) -> VisionTower:
    """The image transformer of `clip` (of its base, for a `PromptedClip`), ready for deep prompts."""
    if isinstance(clip, PromptedClip):
        clip = clip.base
    if isinstance(clip, TransformersClip):
        return TransformersVisionTower(clip)
    if isinstance(clip, OpenClipClip):
        return OpenClipVisionTower(clip)
    raise InvalidInputError(
        f"Concept tuning needs a transformers or open_clip CLIP; this profile's {type(clip).__name__} is not "
        "supported. Use an SD 1.x or SD 2.x profile."
    )


def clip_pixels(clip: ClipModel, images: Sequence[Image.Image]) -> Tensor:
    """The CLIP's own preprocessing (the same as its `encode_image`)."""
    return vision_tower(clip).pixels(images)


class DeepPromptedVision:
    """CLIP's image transformer with VPT-deep prompts, returning projected image embeddings (B, P).

    Each layer sees the class and patch tokens followed by its own prompts; the prompts' outputs are dropped
    before the next layer (which brings its own), so only the class and patch tokens carry on. The class token
    then goes through the final layer norm and the visual projection as usual. With no prompts this is exactly
    the CLIP's `encode_image`.
    """

    def __init__(self, clip: ClipModel, deep_prompts: Tensor | None, dropout: float = 0.1) -> None:
        self.vision = vision_tower(clip)
        if deep_prompts is not None and deep_prompts.shape[0] != self.vision.num_layers:
            raise InvalidInputError(
                f"The concept has deep prompts for {deep_prompts.shape[0]} layers but this CLIP has "
                f"{self.vision.num_layers}; tune the concept again on this model."
            )
        self.deep_prompts = deep_prompts
        self.dropout = dropout

    def __call__(self, pixels: Tensor, dropout_generator: torch.Generator | None = None) -> Tensor:
        """Embeddings of preprocessed `pixels`; prompt dropout is applied when a generator is given (training)."""
        hidden = self.vision.embed(pixels)
        tokens = hidden.shape[1]
        for index in range(self.vision.num_layers):
            if self.deep_prompts is not None:
                prompts = self._prompts(index, dropout_generator).to(hidden.dtype).expand(hidden.shape[0], -1, -1)
                hidden = torch.cat([hidden[:, :tokens], prompts], dim=1)
            hidden = self.vision.layer(index, hidden)
        return self.vision.pool(hidden)

    def _prompts(self, layer: int, generator: torch.Generator | None) -> Tensor:
        prompts = self.deep_prompts[layer]
        if generator is None or self.dropout == 0:
            return prompts
        # Dropout drawn from the tuning's own generator, so a seed reproduces a concept.
        keep = (torch.rand(prompts.shape, generator=generator) >= self.dropout).to(prompts.device)
        return prompts * keep / (1 - self.dropout)

    def encode_image(self, images: Sequence[Image.Image]) -> Tensor:
        return self(self.vision.pixels(images))


class PromptedClip(ClipModel):
    """A `ClipModel` whose image encoder carries a concept's deep prompts; everything else is the base CLIP."""

    def __init__(self, base: ClipModel, deep_prompts: Tensor) -> None:
        self.base = base
        self.context_length = base.context_length
        self.tower = DeepPromptedVision(base, deep_prompts.to(base.device), dropout=0.0)

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def hidden_size(self) -> int:
        return self.base.hidden_size

    @property
    def embed_dim(self) -> int:
        return self.base.embed_dim

    @property
    def text_projection(self) -> Tensor:
        return self.base.text_projection

    @property
    def logit_scale(self) -> float:
        return self.base.logit_scale

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size

    @property
    def image_size(self) -> int:
        return self.base.image_size

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        return self.base.tokenize(texts)

    def eos_positions(self, input_ids: Tensor) -> Tensor:
        return self.base.eos_positions(input_ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.base.decode(token_ids)

    def text_states(self, input_ids: Tensor) -> Tensor:
        return self.base.text_states(input_ids)

    def encode_image(self, images: Sequence[Image.Image]) -> Tensor:
        return self.tower.encode_image(images)


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


def name_pattern(name: str) -> re.Pattern[str]:
    """The concept's name as a whole word of a prompt, in any case ('my-star' but not 'my-stars')."""
    return re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])", re.IGNORECASE)


def mentions(prompt: str, name: str) -> bool:
    return name_pattern(name).search(prompt) is not None


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
    the left". With `place`, the words after the name are put into the description instead of after it
    ("NAME small" -> "[f_cnvrt] a small outlined green heart"): a generator trained on captions follows a size
    word only before the noun (extension of ours; see `ConceptTuning.place_context_words`).

    On `shapes` this beat Eq. 8's form (`f_cnvrt + alpha * h_text` from the end-of-text token on) on the tuning
    concepts of `pictoprompt bench concepts`: the context showed in 67% of pictures against 38% (alpha 0.9), and
    the concept in 19% against 3%.
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


def placeholder_prompt(f_cnvrt: Tensor, states: Tensor) -> Tensor:
    """The named form of a concept alone, batched: "[f_cnvrt] WORDS" (B, L, D) from each picture's `f_cnvrt` (B, D)
    and the text states (1, L, D) of the words (its description, or "" for none). It equals
    `named_concept_prompt` of the prompt "NAME", what tuning with `named_form_weight` denoises under."""
    batch, length = f_cnvrt.shape[0], states.shape[1]
    text = states.float().expand(batch, -1, -1)
    return torch.cat([text[:, :1], f_cnvrt.float().unsqueeze(1), text[:, 1:]], dim=1)[:, :length]


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

PromptInit = Literal["neutral", "random"]


def fit_neutral_prompts(
    clip: ClipModel,
    deep_prompts: Tensor,
    images: Sequence[Image.Image],
    progress: Progress,
    steps: int = NEUTRAL_FIT_STEPS,
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


def _mean_embeddings(
    converter: ImageToPrompt, tower: DeepPromptedVision, images: Sequence[Image.Image], chunk: int = 16
) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        embeds = torch.cat([tower.encode_image(images[i : i + chunk]) for i in range(0, len(images), chunk)])
        mean = average_embeddings(embeds)
        return mean, converter.convert(mean)


@dataclass
class _Start:
    """What both tunings start from: the base CLIP and the SD-IPC converter on it, the seeded generator, the initial
    weights (zero K/V deltas, deep prompts) and the deep-prompted tower they train through."""

    clip: ClipModel
    converter: ImageToPrompt
    generator: torch.Generator
    weights: ConceptWeights
    tower: DeepPromptedVision
    started: float


def _start(
    pipeline: StableDiffusionPipeline,
    clip: ClipModel,
    neutral_fit_images: Callable[[torch.Generator], Sequence[Image.Image]],
    num_prompts: int,
    prompt_dropout: float,
    prompt_init: PromptInit,
    neutral_fit_steps: int,
    seed: int,
    progress: Progress,
) -> _Start:
    """The shared set-up; with `prompt_init="neutral"` the deep prompts are first fitted (`fit_neutral_prompts`) on
    the images `neutral_fit_images` picks with the generator."""
    started = time.perf_counter()
    base = vision_tower(clip).clip
    generator = torch.Generator().manual_seed(seed)
    weights = ConceptWeights.initial(pipeline.unet, base, num_prompts, generator)
    if weights.deep_prompts is not None and prompt_init == "neutral":
        fit_neutral_prompts(base, weights.deep_prompts, neutral_fit_images(generator), progress, neutral_fit_steps)
    tower = DeepPromptedVision(base, weights.deep_prompts, prompt_dropout)
    return _Start(base, ImageToPrompt.cached(base, pipeline), generator, weights, tower, started)


def _result(
    start: _Start, losses: list[float], images: Sequence[Image.Image], hyperparameters: dict[str, object]
) -> TuningResult:
    """The tuned weights with their losses, the images' mean embeddings through the tuned tower, and the settings."""
    mean_image, mean_converted = _mean_embeddings(start.converter, start.tower, images)
    seconds = time.perf_counter() - start.started
    return TuningResult(
        start.weights, losses, mean_image, mean_converted, {**hyperparameters, "weight_decay": WEIGHT_DECAY}, seconds
    )


def tune_concept(
    pipeline: StableDiffusionPipeline,
    clip: ClipModel,
    references: Sequence[Image.Image],
    iterations: int = 30,
    learning_rate: float = 5e-6,
    num_prompts: int = 50,
    prompt_dropout: float = 0.1,
    prompt_init: PromptInit = "neutral",
    neutral_fit_steps: int = NEUTRAL_FIT_STEPS,
    augment: bool = True,
    prompt_learning_rate: float | None = None,
    description: str | None = None,
    caption_alignment: float = 0.0,
    named_form_weight: float = 0.0,
    description_form_weight: float = 0.0,
    seed: int = 0,
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
    loss still fits the pictures.

    Two more terms of ours (0 = the paper's loss) denoise the references under the forms a concept is used in,
    not only Eq. 7's pseudo-prompt: `named_form_weight` under "[f_cnvrt] DESCRIPTION" (`placeholder_prompt`, what
    `generate_image` draws "NAME ..." from) and `description_form_weight` under the description's own text (what
    an edit of `concept:NAME` draws).
    """
    if not references:
        raise InvalidInputError("Concept tuning needs at least one reference image.")
    if caption_alignment < 0 or learning_rate <= 0 or (prompt_learning_rate is not None and prompt_learning_rate <= 0):
        raise InvalidInputError(
            "The learning rates must be positive and the caption alignment's weight at least 0 (0 turns it off)."
        )
    description = (description or "").strip() or None
    progress = progress or Progress()
    start = _start(
        pipeline,
        clip,
        lambda _: references,
        num_prompts,
        prompt_dropout,
        prompt_init,
        neutral_fit_steps,
        seed,
        progress,
    )
    generator, converter = start.generator, start.converter
    alignment = None
    if description is not None and caption_alignment:
        with torch.no_grad():
            states, eos_index = converter.text_states([description])
            alignment = CaptionAlignment([description], states[:1, int(eos_index[0])])
    owners = [0] * len(references)
    with torch.no_grad():
        words = converter.text_states([description or ""])[0].detach()

    def loss_at(iteration: int) -> Tensor:
        images = [random_augmentation(image, generator) if augment else image for image in references]
        f_cnvrt = converter.convert(start.tower(clip_pixels(start.clip, images), generator))
        prompt = pseudo_prompt(f_cnvrt, converter.start_state, converter.length)
        latents = encode_latents(pipeline, images)
        loss = denoising_loss(pipeline, latents, prompt, generator)
        if named_form_weight:
            named = denoising_loss(pipeline, latents, placeholder_prompt(f_cnvrt, words), generator)
            loss = loss + named_form_weight * named
        if description_form_weight and description is not None:
            own = denoising_loss(pipeline, latents, words.expand(len(images), -1, -1), generator)
            loss = loss + description_form_weight * own
        if alignment is not None:
            loss = loss + caption_alignment * alignment.loss(f_cnvrt, owners)
        return loss

    groups = start.weights.parameter_groups(learning_rate, prompt_learning_rate)
    with swapped_projections(pipeline.unet, start.weights.kv_deltas):
        losses = optimise(groups, loss_at, iterations, learning_rate, progress)
    hyperparameters = {
        "method": SD_IPC_CT,
        "iterations": iterations,
        "learning_rate": learning_rate,
        "schedule": "constant",
        "num_prompts": num_prompts,
        "prompt_dropout": prompt_dropout,
        "prompt_init": prompt_init,
        "neutral_fit_steps": neutral_fit_steps,
        "augment": augment,
        "prompt_learning_rate": prompt_learning_rate or learning_rate,
        "caption_alignment": caption_alignment if alignment is not None else 0.0,
        "named_form_weight": named_form_weight,
        "description_form_weight": description_form_weight if description is not None else 0.0,
        "seed": seed,
    }
    return _result(start, losses, references, hyperparameters)


class CaptionAlignment:
    """SD-IPC-FT's optional caption-alignment loss (not in the paper): each image's converted prompt `f_cnvrt` is
    pulled towards its caption's end-of-text state, the state Eq. 6 estimates, and made closer to it than to the
    domain's other captions.

    Why: on `shapes`, variations of striped objects kept the stripes in 7.5 % of pictures, while the same U-Net
    drew them in 57.5 % from the caption's end-of-text state repeated as SD-IPC repeats `f_cnvrt`, and the
    pseudo-inverse keeps 98-99 % of the striped-minus-solid direction: the image side loses the fill, and the
    paper's denoising losses did not bring it back (no gain at any rate tried). The loss is the cosine distance
    to the own caption, plus `CONTRAST` times a cross-entropy over the cosines (centred on the captions' mean, at
    `TEMPERATURE`) to every distinct caption. On the domain's tuning scenes (`pictoprompt bench domain`) the cosine
    alone bought fill and background but lost the shape (75 -> 42.5 % of variations); with the contrastive term,
    which keeps what tells captions apart, the shape stayed (70 %) and fill went 7.5 -> 21 %.
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
    iterations: int = 1000,
    learning_rate: float = 1e-5,
    batch_size: int = 4,
    num_prompts: int = 50,
    prompt_dropout: float = 0.1,
    prompt_init: PromptInit = "neutral",
    neutral_fit_steps: int = NEUTRAL_FIT_STEPS,
    augment: bool = True,
    caption_alignment: float = 0.0,
    prompt_learning_rate: float | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> TuningResult:
    """SD-IPC-FT (Sec. 3.2, Eq. 9): adapt the conversion to a domain from ~100 captioned images.

    Loss = `L_convrt` (denoise the target under the pseudo-prompt of the reference) + `L_text` (denoise the
    reference under its own caption: the ordinary text-to-image loss, kept as a regulariser so text prompts
    still work). With `classes` ("A/B training") the target is another image of the reference's class, which
    teaches the converter to keep what the class shares; without, the target is the reference itself.
    Learning rate with cosine decay; `iterations` x `batch_size` defaults to 40 passes over 100 images (the
    paper gives ~1 GPU-hour, not a step count). Two additions of ours, off by default: `caption_alignment` weighs
    `CaptionAlignment`'s loss (the converted prompt pulled towards its own caption), and `prompt_learning_rate`
    gives the deep prompts their own rate (the paper's 1e-5 hardly moves them in 1000 steps).
    """
    if len(images) != len(captions) or (classes is not None and len(classes) != len(images)):
        raise InvalidInputError("Give exactly one caption (and one class, if any) per training image.")
    if not images:
        raise InvalidInputError("Domain training needs at least one captioned image.")
    if caption_alignment < 0 or learning_rate <= 0 or (prompt_learning_rate is not None and prompt_learning_rate <= 0):
        raise InvalidInputError(
            "The learning rates must be positive and the caption alignment's weight at least 0 (0 turns it off)."
        )
    progress = progress or Progress()

    def neutral_fit_sample(generator: torch.Generator) -> list[Image.Image]:
        return [images[i] for i in torch.randperm(len(images), generator=generator)[:NEUTRAL_FIT_IMAGES].tolist()]

    start = _start(
        pipeline, clip, neutral_fit_sample, num_prompts, prompt_dropout, prompt_init, neutral_fit_steps, seed, progress
    )
    generator, converter = start.generator, start.converter
    with torch.no_grad():
        caption_states, caption_eos_index = converter.text_states(list(captions))
        caption_states = caption_states.detach()
        alignment = CaptionAlignment(captions, caption_states[torch.arange(len(captions)), caption_eos_index])
    batches = _DomainBatches(len(images), classes, batch_size, generator)

    def view(image: Image.Image) -> Image.Image:
        return random_augmentation(image, generator) if augment else image

    def loss_at(iteration: int) -> Tensor:
        batch, partners = batches.next()
        references = [view(images[i]) for i in batch]
        targets = [
            reference if partner == i else view(images[partner])
            for reference, i, partner in zip(references, batch, partners, strict=True)
        ]
        reference_latents = encode_latents(pipeline, references)
        target_latents = reference_latents if partners == batch else encode_latents(pipeline, targets)
        f_cnvrt = converter.convert(start.tower(clip_pixels(start.clip, references), generator))
        image_prompt = pseudo_prompt(f_cnvrt, converter.start_state, converter.length)
        loss_convert = denoising_loss(pipeline, target_latents, image_prompt, generator)
        loss_text = denoising_loss(pipeline, reference_latents, caption_states[batch], generator)
        loss = loss_convert + loss_text
        if caption_alignment:
            loss = loss + caption_alignment * alignment.loss(f_cnvrt, batch)
        return loss

    groups = start.weights.parameter_groups(learning_rate, prompt_learning_rate)
    with swapped_projections(pipeline.unet, start.weights.kv_deltas):
        losses = optimise(groups, loss_at, iterations, learning_rate, progress, cosine=True)
    hyperparameters = {
        "method": SD_IPC_FT,
        "iterations": iterations,
        "learning_rate": learning_rate,
        "schedule": "cosine",
        "batch_size": batch_size,
        "num_prompts": num_prompts,
        "prompt_dropout": prompt_dropout,
        "prompt_init": prompt_init,
        "neutral_fit_steps": neutral_fit_steps,
        "augment": augment,
        "ab_targets": classes is not None,
        "caption_alignment": caption_alignment,
        "prompt_learning_rate": prompt_learning_rate or learning_rate,
        "seed": seed,
    }
    return _result(start, losses, images, hyperparameters)
