"""The captioner: a BLIP image-captioning model (EDITOR's start prompt, paper 003 section 3.3; the real profiles
name `Salesforce/blip-image-captioning-large`, the paper's choice), loaded through transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipProcessor

CAPTION_TOKENS = 32
"""EDITOR cuts its start prompt to at most 32 tokens; BLIP need not write more."""


class Captioner:
    """A BLIP captioning model with its processor (image preprocessing and BERT tokenizer)."""

    def __init__(self, model: BlipForConditionalGeneration, processor: BlipProcessor) -> None:
        self.model = model.eval().requires_grad_(False)
        self.processor = processor

    @classmethod
    def from_pretrained(
        cls, source: str | Path, device: torch.device, dtype: torch.dtype, local_files_only: bool = False
    ) -> Captioner:
        model = BlipForConditionalGeneration.from_pretrained(
            str(source), dtype=dtype, local_files_only=local_files_only
        )
        processor = BlipProcessor.from_pretrained(str(source), local_files_only=local_files_only)
        return cls(model.to(device), processor)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def caption(self, images: Sequence[Image.Image], max_new_tokens: int = CAPTION_TOKENS) -> list[str]:
        """One caption per image (BLIP's own greedy decoding, as the authors call it)."""
        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        pixels = inputs.pixel_values.to(self.device, self.model.dtype)
        with torch.no_grad():
            output = self.model.generate(pixel_values=pixels, max_new_tokens=max_new_tokens)
        return [text.strip() for text in self.processor.batch_decode(output, skip_special_tokens=True)]
