"""One small CLIP interface for the methods, whichever library holds the weights.

SD 1.x and the bundled `shapes` set use a transformers `CLIPModel`; SD 2.x pairs with OpenCLIP ViT-H/14. The
methods only see `ClipModel`: image embeddings, text states, the text projection `W_t`, the tokenizer and the
logit scale.
"""

from __future__ import annotations

import copy
import json
import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPTokenizer

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipModel(ABC):
    """What the methods need from a CLIP model. All embeddings are *projected* and *unnormalised*."""

    context_length: int = 77

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width D of the text tower's states."""

    @property
    @abstractmethod
    def embed_dim(self) -> int:
        """Width P of the joint image-text space."""

    @property
    @abstractmethod
    def text_projection(self) -> torch.Tensor:
        """`W_t` as a (P, D) float32 matrix: `W_t @ h_eos` is the text embedding."""

    @property
    @abstractmethod
    def logit_scale(self) -> float:
        """The learned temperature, already exponentiated (100 for OpenAI's CLIP)."""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def image_size(self) -> int:
        """Side in pixels of the square the image tower reads."""

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids of shape (B, context_length), padded and truncated."""

    @abstractmethod
    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of the end-of-text token in each row of `input_ids`."""

    @abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str: ...

    @abstractmethod
    def text_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-layer-normed text states (B, L, D) of token ids (B, L), L at most the context length (the
        generator reads all of them; `encode_text` passes fewer)."""

    @abstractmethod
    def encode_image(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Projected image embeddings of shape (B, P)."""

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings of shape (B, P): `W_t` applied to the EOS state."""
        input_ids = self.tokenize(texts)
        positions = self.eos_positions(input_ids)
        # The text tower's attention is causal, so no state sees the padding after it: the batch is cut at its last
        # EOS (a few tokens rather than 77 for VGD's candidates, its main cost on a real CLIP), same embeddings.
        states = self.text_states(input_ids[:, : int(positions.max()) + 1])
        eos = states[torch.arange(states.shape[0], device=states.device), positions.to(states.device)]
        return eos.float() @ self.text_projection.T

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity matrix between two batches of embeddings."""
        return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def border_colour(image: Image.Image) -> tuple[int, ...]:
    """The median colour of an RGB picture's outermost pixels: its background, as far as one can tell."""
    pixels = np.asarray(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return tuple(int(c) for c in np.median(border, axis=0))


def pad_to_square(image: Image.Image) -> Image.Image:
    """A non-square RGB picture letterboxed to a square in the median colour of its border.

    CLIP's own preprocessing crops the centre square, which drops whatever sits near the long sides of a
    screenshot or a wide photo; an image-to-prompt tool must describe the whole picture, and a band of the
    picture's own background colour reads as more background.
    """
    if image.width == image.height:
        return image
    side = max(image.size)
    square = Image.new("RGB", (side, side), border_colour(image))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


SHIFTS = ((1, 0), (-1, 0), (0, 1), (0, -1))


def shifted_views(image: Image.Image, image_size: int) -> list[Image.Image]:
    """The picture (squared, `pad_to_square`) and, when it is larger than a `image_size` tower's input, four copies
    moved by one pixel of that input (right, left, down, up), the uncovered edge filled with the border colour.

    A picture larger than the tower's input is resampled onto a coarse grid, and what a small CLIP reads there
    depends on where the grid falls: averaging the five views' embeddings averages that out. A picture at the
    input's size is not resampled, so it is read as it is (shifting the `shapes` world's own 32 px renders cost VGD
    named shapes on the held-out combinations). On the `shapes` CLIP the views raise the zero-shot shape on
    PIL-drawn pictures (figures: lab/RESULTS.md, "Figures behind the code's choices").
    """
    square = pad_to_square(image.convert("RGB"))
    if square.width <= image_size:
        return [square]
    step = round(square.width / image_size)
    frame = Image.new("RGB", (square.width + 2 * step, square.height + 2 * step), border_colour(square))
    frame.paste(square, (step, step))
    views = [square]
    for dx, dy in SHIFTS:
        left, top = step - dx * step, step - dy * step
        views.append(frame.crop((left, top, left + square.width, top + square.height)))
    return views


def preprocess_images(
    images: Sequence[Image.Image],
    size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """CLIP's preprocessing: RGB, shortest side to `size` (bicubic), centre crop, normalise. (B, 3, size, size).

    Non-square pictures are first padded to a square (`pad_to_square`), so the crop keeps all of them.
    """
    batch = []
    for image in images:
        image = pad_to_square(image.convert("RGB"))
        scale = size / min(image.size)
        resized = image.resize(
            (max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BICUBIC
        )
        left, top = (resized.width - size) // 2, (resized.height - size) // 2
        cropped = resized.crop((left, top, left + size, top + size))
        batch.append(np.asarray(cropped, dtype=np.float32) / 255.0)
    pixels = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t


class TransformersClip(ClipModel):
    """A transformers `CLIPModel` with its tokenizer (SD 1.x's openai CLIP, the `shapes` CLIP)."""

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: CLIPTokenizer,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.context_length = model.config.text_config.max_position_embeddings
        self._eos_token_id = tokenizer.eos_token_id

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: torch.device, dtype: torch.dtype, tokenizer_path: str | Path | None = None
    ) -> TransformersClip:
        model = CLIPModel.from_pretrained(str(path), dtype=dtype).to(device)
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_path or path))
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        processor_config = Path(path) / "preprocessor_config.json"
        if processor_config.is_file():
            config = json.loads(processor_config.read_text())
            mean, std = config.get("image_mean", mean), config.get("image_std", std)
        return cls(model, tokenizer, mean, std)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def embed_dim(self) -> int:
        return self.model.config.projection_dim

    @property
    def text_projection(self) -> torch.Tensor:
        return self.model.text_projection.weight.float()

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    @property
    def vocab_size(self) -> int:
        return self.model.config.text_config.vocab_size

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(
            list(texts), padding="max_length", max_length=self.context_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids == self._eos_token_id).int().argmax(dim=-1)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()

    def text_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.text_model(input_ids=input_ids.to(self.device)).last_hidden_state

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    def encode_image(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = preprocess_images(images, self.image_size, self.image_mean, self.image_std)
        pixels = pixels.to(self.device, self.model.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return self.model.visual_projection(pooled).float()


STYLE_TEXT_TENSORS = (
    "text_model.embeddings.position_embedding.",
    "text_model.encoder.",
    "text_model.final_layer_norm.",
    "text_projection.",
)
"""The text tower's tensors a text-tower file replaces (`with_text_tower`): all but the token embeddings."""

_text_towers: weakref.WeakKeyDictionary[ClipModel, dict[str, ClipModel]] = weakref.WeakKeyDictionary()


def with_text_tower(clip: ClipModel, path: str | Path) -> ClipModel:
    """A copy of a transformers CLIP whose text tower's tensors (`STYLE_TEXT_TENSORS`) are read from a safetensors
    file; its image tower, tokenizer and temperature are the CLIP's, so its image embeddings are the CLIP's.

    Ours: the `shapes` style reader (`VgdConfig.style_text_encoder`, trained by `lab/shapes/style.py`). Loaded once
    per CLIP and file.
    """
    if not isinstance(clip, TransformersClip):
        raise ValueError("A text-tower file applies to a transformers CLIP only.")
    towers = _text_towers.setdefault(clip, {})
    key = str(path)
    if key not in towers:
        tensors = load_file(key, device=str(clip.device))
        if not tensors or not all(name.startswith(STYLE_TEXT_TENSORS) for name in tensors):
            raise ValueError(f"'{path}' must hold text-tower tensors only ({', '.join(STYLE_TEXT_TENSORS)}).")
        model = copy.deepcopy(clip.model)
        loaded = model.load_state_dict({name: t.to(clip.model.dtype) for name, t in tensors.items()}, strict=False)
        if loaded.unexpected_keys:
            raise ValueError(f"'{path}' has tensors this CLIP lacks: {', '.join(loaded.unexpected_keys[:3])}.")
        towers[key] = TransformersClip(model, clip.tokenizer, clip.image_mean, clip.image_std)
    return towers[key]


class OpenClipClip(ClipModel):
    """An open_clip model with its tokenizer (SD 2.x pairs with OpenCLIP ViT-H/14 `laion2b_s32b_b79k`)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any) -> None:
        import open_clip  # imported on use: only the SD 2.x profiles need it

        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        preprocess = open_clip.get_model_preprocess_cfg(model)
        size = preprocess.get("size", model.visual.image_size)
        self._image_size = size if isinstance(size, int) else int(size[0])
        self.image_mean = tuple(preprocess.get("mean", OPENAI_CLIP_MEAN))
        self.image_std = tuple(preprocess.get("std", OPENAI_CLIP_STD))
        self.context_length = model.context_length
        self._eot_token_id = tokenizer.eot_token_id

    @classmethod
    def from_pretrained(
        cls, name: str, pretrained: str | None, device: torch.device, dtype: torch.dtype
    ) -> OpenClipClip:
        """`name` is an open_clip architecture (e.g. ViT-H-14); `pretrained` a checkpoint tag or file, or None."""
        import open_clip

        precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        model = open_clip.create_model(name, pretrained=pretrained, precision=precision, device=device)
        return cls(model, open_clip.get_tokenizer(name))

    @property
    def device(self) -> torch.device:
        return self.model.positional_embedding.device

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def hidden_size(self) -> int:
        return self.model.ln_final.normalized_shape[0]

    @property
    def embed_dim(self) -> int:
        return self.text_projection.shape[0]

    @property
    def text_projection(self) -> torch.Tensor:
        projection = self.model.text_projection
        # open_clip applies a (D, P) parameter as `x @ W` (or an nn.Linear); the interface wants (P, D).
        if isinstance(projection, torch.nn.Linear):
            return projection.weight.float()
        return projection.T.float()

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts), context_length=self.context_length).to(self.device)

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids == self._eot_token_id).int().argmax(dim=-1)

    def decode(self, token_ids: Sequence[int]) -> str:
        ids = [int(t) for t in token_ids]
        # Padding is id 0 (a real token, "!"), so cut at the end-of-text token rather than dropping zeros.
        if self._eot_token_id in ids:
            ids = ids[: ids.index(self._eot_token_id)]
        special = set(self.tokenizer.all_special_ids)
        return self.tokenizer.decode([t for t in ids if t not in special]).strip()

    def text_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        # open_clip's `encode_text` up to (and including) `ln_final`, before pooling and projection.
        model = self.model
        cast_dtype = model.transformer.get_cast_dtype()
        length = input_ids.shape[1]
        x = model.token_embedding(input_ids.to(self.device)).to(cast_dtype)
        x = x + model.positional_embedding[:length].to(cast_dtype)
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        return model.ln_final(x)

    def encode_image(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = preprocess_images(images, self.image_size, self.image_mean, self.image_std)
        # open_clip's half precision keeps some parameters (the text positional embedding among them) in float32;
        # the pixels must match the patch convolution's dtype.
        dtype = self.model.visual.conv1.weight.dtype
        return self.model.encode_image(pixels.to(self.device, dtype)).float()
