"""Golden values on the tiny set, as diffusers' `expected_slice`: a change to any numeric path shows here.

The tiny set and the tiny LM are built from seeded configs, so these numbers are the same on every machine up to
floating-point noise. After a deliberate change to a method, recompute them and say why in the commit.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from pictoprompt.configs import VgdConfig
from pictoprompt.methods.generation import Sample, encode_text_prompt, generate
from pictoprompt.methods.sd_ipc import ImageToPrompt
from pictoprompt.methods.vgd import image_targets, invert
from pictoprompt.models.llm import LanguageModel
from pictoprompt.models.runtime import Runtime
from pictoprompt.progress import Progress

RED = Image.new("RGB", (32, 32), (220, 30, 30))


def test_tiny_clip_embeddings(tiny_runtime: Runtime) -> None:
    clip = tiny_runtime.clip()
    with torch.no_grad():
        image, text = clip.encode_image([RED]), clip.encode_text(["a red circle"])
    assert image.shape == text.shape == (1, 32)
    expected_image = [0.2224, -0.1903, -1.5788, 0.0541, -0.4217, 1.9432]
    expected_text = [-1.1717, 0.4018, 0.9760, -0.4054, 0.5012, 0.6328]
    np.testing.assert_allclose(image[0, :6].numpy(), expected_image, atol=1e-3)
    np.testing.assert_allclose(text[0, :6].numpy(), expected_text, atol=1e-3)


def test_sd_ipc_conversion_and_edit(tiny_runtime: Runtime) -> None:
    clip, pipeline = tiny_runtime.clip(), tiny_runtime.pipeline()
    converter = ImageToPrompt.cached(clip, pipeline)
    with torch.no_grad():
        embeds = clip.encode_image([RED])
        prompt, edited = converter.prompt(embeds), converter.edit(embeds, "in the snow", 0.9)
    assert prompt.shape == (1, 77, 32)
    np.testing.assert_allclose(
        prompt[0, -1, :6].numpy(), [0.6762, -0.3139, 1.7088, -0.4378, -1.1167, -0.8281], atol=1e-3
    )
    np.testing.assert_allclose(
        edited[0, -1, :6].numpy(), [0.0978, 0.1014, 1.4825, -0.7029, -0.7923, -0.3253], atol=1e-3
    )


def test_text_to_image_pixels(tiny_runtime: Runtime) -> None:
    pipeline = tiny_runtime.pipeline()
    prompt_embeds, negative_embeds = encode_text_prompt(pipeline, "a red circle")
    image = generate(pipeline, Sample(prompt_embeds, negative_embeds, [41], 7.5, Progress()), 3, 32, 32)[0]
    pixels = np.asarray(image).astype(int)
    top_left_red = [[122, 140, 120], [148, 118, 94], [148, 108, 112]]
    bottom_right_blue = [[98, 150, 149], [95, 122, 135], [97, 115, 116]]
    assert np.abs(pixels[:3, :3, 0] - top_left_red).max() <= 2
    assert np.abs(pixels[-3:, -3:, 2] - bottom_right_blue).max() <= 2


def test_guided_decoding_with_the_tiny_lm(tiny_runtime: Runtime, load_llm: Callable[[str], LanguageModel]) -> None:
    clip = tiny_runtime.clip()
    small = VgdConfig(num_beams=3, beam_expand_factor=3)
    result = invert(load_llm("transformers"), clip, image_targets(clip, [RED]), max_length=6, config=small)
    ranked = [(h.text, h.final_score) for h in result.hypotheses[:3]]
    expected = [
        ("red grey orange green vector vector", -6.0359),
        ("red grey orange green vector to", -6.5699),
        ("red grey orange green brown foreground", -7.1776),
    ]
    assert [text for text, _ in ranked] == [text for text, _ in expected]
    assert [score for _, score in ranked] == pytest.approx([score for _, score in expected], abs=1e-3)
