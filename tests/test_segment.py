"""segment_image: words of a prompt to masks through the generator's cross-attention.

The plumbing runs on the tiny set (random weights: the masks mean nothing, their form does); that a mask lands on
its thing is checked on the bundled `shapes` set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from pictoprompt.errors import InvalidInputError, JobCancelledError
from pictoprompt.methods import segmentation
from pictoprompt.methods.segmentation import (
    RecordingAttnProcessor,
    cross_attention_sides,
    otsu,
    prompt_words,
    segment,
)
from pictoprompt.models.profiles import LlmSpec, get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.models.shapes import weights_present
from pictoprompt.models.shapes.scenes import Scene, SceneObject, render_array, render_scene
from pictoprompt.progress import Progress
from pictoprompt.server.images import PreResolvedImages
from pictoprompt.tools.base import SavedImage, ToolContext
from pictoprompt.tools.segment_image import SegmentImageRequest, segment_image


class Sink:
    """Keeps the saved pictures."""

    def __init__(self) -> None:
        self.saved: list[tuple[Image.Image, dict[str, str]]] = []

    def save(self, image: Image.Image, metadata: dict[str, str]) -> SavedImage:
        self.saved.append((image.copy(), metadata))
        return SavedImage(uri=f"test://{len(self.saved)}", path=f"/nowhere/{len(self.saved)}.png")


def red_circle(size: str = "large", position: str = "center") -> Scene:
    return Scene("white", (SceneObject("circle", "red", size, position),))


# ------------------------------------------------------------------------------------------------ words


def test_a_word_is_its_bpe_tokens_and_function_words_name_nothing(tiny_runtime: Runtime):
    pipeline = tiny_runtime.pipeline()
    words = prompt_words(pipeline, "A xylophonist fox, on the hill")
    assert [w.text for w in words] == ["a", "xylophonist", "fox", ",", "on", "the", "hill"]
    tokens = pipeline.tokenizer("A xylophonist fox, on the hill").input_ids
    assert len(words[1].positions) == 4, "xylophonist is four BPE tokens"
    # Positions are consecutive, start after the start token and end before the end token.
    flat = [position for word in words for position in word.positions]
    assert flat == list(range(1, len(tokens) - 1))
    reasons = {w.text: w.no_mask_reason for w in words}
    assert reasons == {
        "a": "stop word",
        "xylophonist": None,
        "fox": None,
        ",": "punctuation",
        "on": "stop word",
        "the": "stop word",
        "hill": None,
    }


def test_words_past_the_context_are_marked(tiny_runtime: Runtime):
    words = prompt_words(tiny_runtime.pipeline(), " ".join(["fox"] * 80))
    assert [w.no_mask_reason for w in words[:75]] == [None] * 75
    assert {w.no_mask_reason for w in words[75:]} == {"beyond the text encoder's context"}


def test_otsu_splits_two_modes():
    values = np.concatenate([np.full(300, 0.1), np.full(100, 0.9)]) + np.linspace(0, 0.02, 400)
    threshold, separability = otsu(values)
    assert ((values > threshold) == (values > 0.5)).all() and separability > 0.95
    _, flat = otsu(np.linspace(0, 1, 1000))
    assert flat == pytest.approx(0.75, abs=0.01)


# ------------------------------------------------------------------------------------------------ the method


def test_masks_have_the_pictures_size_and_processors_are_restored(tiny_runtime: Runtime):
    pipeline = tiny_runtime.pipeline()
    before = {name: type(p) for name, p in pipeline.unet.attn_processors.items()}
    picture = Image.new("RGB", (40, 24), (250, 250, 250))
    picture.paste((220, 30, 30), (8, 6, 20, 18))
    segments = segment(pipeline, picture, "a red square")
    assert [s.word for s in segments] == ["a", "red", "square"]
    assert segments[0].mask is None and segments[0].no_mask_reason == "stop word"
    for item in segments:
        assert item.score.shape == (24, 40) and 0.0 <= item.score.min() <= item.score.max() <= 1.0
        assert item.mean_attention > 0
        if item.mask is not None:
            assert item.mask.shape == (24, 40) and item.mask.dtype == bool and 0 < item.area < 1
    assert {name: type(p) for name, p in pipeline.unet.attn_processors.items()} == before
    assert RecordingAttnProcessor not in before.values()


def test_cancelling_restores_the_processors(tiny_runtime: Runtime):
    pipeline = tiny_runtime.pipeline()
    before = {name: type(p) for name, p in pipeline.unet.attn_processors.items()}
    progress = Progress(lambda done, total, message: progress.cancel())
    with pytest.raises(JobCancelledError):
        segment(pipeline, Image.new("RGB", (32, 32)), "a red square", progress=progress)
    assert {name: type(p) for name, p in pipeline.unet.attn_processors.items()} == before


def test_the_finest_cross_attention_map_is_read_from_the_unet(tiny_runtime: Runtime):
    # tiny: latents 16 x 16, cross-attention in the first down block, so at the latents' own side.
    assert cross_attention_sides(tiny_runtime.pipeline(), 1) == [16]


@pytest.mark.parametrize(
    ("prompt", "words", "message"),
    [
        ("   ", None, "empty"),
        ("a red circle", ["dog"], "'dog' is not a word of the prompt"),
        ("a red circle", ["Circle", "cat", "dog"], "'cat', 'dog' are not words"),
        ("a, the", ["a"], None),
    ],
)
def test_bad_inputs_are_refused_with_a_sentence(tiny_runtime: Runtime, prompt, words, message):
    picture = Image.new("RGB", (32, 32))
    if message is None:  # only function words: still answered, with no mask
        (only,) = segment(tiny_runtime.pipeline(), picture, prompt, words=words)
        assert only.mask is None and only.no_mask_reason == "stop word"
        return
    with pytest.raises(InvalidInputError, match=message):
        segment(tiny_runtime.pipeline(), picture, prompt, words=words)


# ------------------------------------------------------------------------------------------------ the tool


def test_random_weights_attend_evenly_so_no_word_gets_a_mask(tiny_runtime: Runtime):
    picture = Image.new("RGB", (40, 24), (250, 250, 250))
    picture.paste((220, 30, 30), (8, 6, 20, 18))
    segments = segment(tiny_runtime.pipeline(), picture, "a red square on grass")
    assert {s.word: s.no_mask_reason for s in segments} == {
        "a": "stop word",
        "red": "flat attention",
        "square": "flat attention",
        "on": "stop word",
        "grass": "flat attention",
    }


def test_the_tool_saves_a_png_mask_per_visible_word_and_one_overlay(
    tiny_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
):
    # The tiny set's random weights attend evenly (the test above): let every content word through.
    monkeypatch.setattr(segmentation, "MIN_CONTRAST", 0.0)
    monkeypatch.setattr(segmentation, "MIN_SEPARABILITY", 0.0)
    picture = Image.new("RGB", (40, 24), (250, 250, 250))
    picture.paste((220, 30, 30), (8, 6, 20, 18))
    sink = Sink()
    context = ToolContext(tiny_runtime, sink, PreResolvedImages({"pic": picture}))
    result = segment_image(SegmentImageRequest(image="pic", prompt="a red square, on grass"), context)
    assert result.prompt == "a red square, on grass" and result.prompt_source == "given"
    by_word = {w.word: w for w in result.words}
    assert [w.word for w in result.words] == ["a", "red", "square", ",", "on", "grass"]
    for name in ("a", ",", "on"):
        assert by_word[name].mask is None and by_word[name].area == 0 and by_word[name].colour is None
    masked = [w for w in result.words if w.mask is not None]
    assert masked and all(w.colour and w.colour.startswith("#") for w in masked)
    assert len({w.colour for w in masked}) == len(masked)
    # One PNG per mask, then the overlay.
    assert len(sink.saved) == len(masked) + 1
    for (image, metadata), word in zip(sink.saved, masked, strict=False):
        assert image.mode == "L" and image.size == (40, 24)
        assert set(np.unique(np.asarray(image))) <= {0, 255}
        assert np.asarray(image).mean() / 255 == pytest.approx(word.area, abs=1e-3)
        assert metadata["word"] == word.word and metadata["prompt"] == result.prompt
    overlay, metadata = sink.saved[-1]
    assert metadata["kind"] == "overlay" and overlay.mode == "RGB"
    assert max(overlay.size) >= 256 and overlay.width * 24 == overlay.height * 40


def test_requested_words_only(tiny_runtime: Runtime):
    context = ToolContext(tiny_runtime, Sink(), PreResolvedImages({"pic": Image.new("RGB", (32, 32))}))
    result = segment_image(SegmentImageRequest(image="pic", prompt="a red square", words=["square"]), context)
    assert [w.word for w in result.words] == ["square"]


def test_an_empty_prompt_is_refused_by_the_request():
    with pytest.raises(ValidationError, match="prompt"):
        SegmentImageRequest(image="pic", prompt="")
    with pytest.raises(ValidationError, match="words"):
        SegmentImageRequest(image="pic", prompt="a red circle", words=[])


def test_without_a_prompt_vgd_writes_it(tiny_lm_dir: Path, tmp_path: Path):
    words = tmp_path / "words.txt"
    words.write_text("red\ncircle\nsquare\n")
    llm = LlmSpec(backend="transformers", source=str(tiny_lm_dir))
    runtime = Runtime(get_profile("tiny").model_copy(update={"llm": llm, "vocabulary": str(words)}))
    reports: list[float] = []
    progress = Progress(lambda done, total, message: reports.append(done / total if total else 0.0))
    context = ToolContext(runtime, Sink(), PreResolvedImages({"pic": Image.new("RGB", (32, 32))}), progress)
    result = segment_image(SegmentImageRequest(image="pic"), context)
    assert result.prompt_source == "vgd" and result.prompt.strip()
    assert " ".join(w.word for w in result.words).replace(" ", "") in result.prompt.lower().replace(" ", "")
    assert reports == sorted(reports) and reports[-1] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ on shapes


@pytest.mark.skipif(not weights_present(), reason="shapes weights absent")
def test_on_shapes_the_circle_mask_covers_the_red_circle():
    pipeline = Runtime(get_profile("shapes")).pipeline()
    for scene in (red_circle(), red_circle("large", "top left"), red_circle("small", "right")):
        truth = render_array(scene)[..., 1] < 128  # the red circle's pixels on white
        segments = {s.word: s for s in segment(pipeline, render_scene(scene), "a red circle")}
        mask = segments["circle"].mask
        assert mask is not None
        iou = (mask & truth).sum() / (mask | truth).sum()
        assert iou >= 0.55, (scene, iou)
        assert segments["a"].mask is None


def test_a_large_picture_is_mapped_small_and_masked_at_its_own_size(
    tiny_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(segmentation, "MIN_CONTRAST", 0.0)
    monkeypatch.setattr(segmentation, "MIN_SEPARABILITY", 0.0)
    picture = Image.new("RGB", (3000, 1500), (250, 250, 250))
    picture.paste((220, 30, 30), (600, 300, 1500, 1200))
    (red,) = segment(tiny_runtime.pipeline(), picture, "red")
    assert red.mask is not None and red.mask.shape == (512, 1024)
    sink = Sink()
    context = ToolContext(tiny_runtime, sink, PreResolvedImages({"pic": picture}))
    segment_image(SegmentImageRequest(image="pic", prompt="red"), context)
    (mask, _), (overlay, _) = sink.saved
    assert mask.size == (3000, 1500)
    assert overlay.size == (512, 256)
