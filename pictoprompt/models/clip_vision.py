"""The steps of a CLIP's image transformer, for either CLIP library (SD 1.x's transformers CLIP, SD 2.x's open_clip
ViT), between which a method can put its own tokens: the deep prompts of SD-IPC-CT/FT.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

from pictoprompt.errors import InvalidInputError
from pictoprompt.models.clip import ClipModel, OpenClipClip, TransformersClip, preprocess_images


class VisionTower(ABC):
    """A CLIP's image transformer taken apart where VPT-deep prompts go in (`DeepPromptedVision`): `embed`, then
    `layer` for every layer in turn, then `pool` is the CLIP's own `encode_image`. Hidden states are batch first,
    class token first."""

    clip: ClipModel
    """The base CLIP (a `PromptedClip`'s base, not the wrapper)."""
    num_layers: int
    width: int
    patch_size: int
    dtype: torch.dtype
    """The image tower's input dtype."""

    def pixels(self, images: Sequence[Image.Image]) -> Tensor:
        """The CLIP's own preprocessing, on its device and in its image tower's dtype."""
        pixels = preprocess_images(images, self.clip.image_size, self.clip.image_mean, self.clip.image_std)
        return pixels.to(self.clip.device, self.dtype)

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
        self.dtype = self.model.dtype

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
        # open_clip's half precision keeps some parameters in float32: the patch convolution decides.
        self.dtype = visual.conv1.weight.dtype
        # open_clip runs its blocks batch first unless the model was built with `batch_first=False` (the tower then
        # transposes around the whole stack).
        self.sequence_first = not getattr(visual.transformer, "batch_first", True)

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
    """CLIP's image transformer with VPT-deep prompts, returning projected image embeddings (B, P): each layer sees
    the class and patch tokens followed by its own prompts, whose outputs are dropped before the next layer. With no
    prompts this is exactly the CLIP's `encode_image`.
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
