"""segment_image: words of a prompt to masks through the generator's cross-attention.

The plumbing runs on the tiny set (random weights: the masks mean nothing, their form does); that a mask lands on
its thing is checked on the bundled `shapes` set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from lab.shapes.world import full_caption
from pictoprompt.configs import SegmentationConfig
from pictoprompt.errors import InvalidInputError, JobCancelledError
from pictoprompt.methods import segmentation
from pictoprompt.methods.segmentation import (
    RecordingAttnProcessor,
    cross_attention_sides,
    filled,
    otsu,
    picture_latents,
    prompt_words,
    segment,
    spread_along,
    without_word,
    word_attributions,
    word_mask,
)
from pictoprompt.models.profiles import LlmSpec, get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.models.shapes import weights_present
from pictoprompt.models.shapes.scenes import PALETTE, Scene, SceneObject, render_array, render_scene
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


# ------------------------------------------------------------------------------------------------ binding


def test_taking_a_word_out_leaves_the_other_tokens(tiny_runtime: Runtime):
    pipeline = tiny_runtime.pipeline()
    prompt = "a red xylophonist, on the hill"
    tokens = pipeline.tokenizer(prompt, add_special_tokens=False).input_ids
    for word in prompt_words(pipeline, prompt):
        text = without_word(pipeline, prompt, word)
        kept = [token for index, token in enumerate(tokens) if index + 1 not in word.positions]
        assert pipeline.tokenizer(text, add_special_tokens=False).input_ids == kept, (word.text, text)
    xylophonist = prompt_words(pipeline, prompt)[2]
    assert without_word(pipeline, prompt, xylophonist) == "a red , on the hill"


def test_spreading_averages_over_the_pixels_attended_to():
    maps = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    pooled = torch.nn.functional.avg_pool2d(maps[None], 2)[0]
    identity = torch.eye(4)
    assert torch.equal(spread_along(maps, identity, 3), pooled)
    uniform = torch.full((4, 4), 0.25)
    spread = spread_along(maps, uniform, 1)
    assert torch.allclose(spread, pooled.mean((1, 2), keepdim=True).expand(2, 2, 2))


def two_blobs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A map whose region holds two blobs, its raw attention, and the blobs (left, right)."""
    left, right = np.zeros((16, 16), dtype=bool), np.zeros((16, 16), dtype=bool)
    left[4:12, 1:6] = True
    right[4:12, 10:15] = True
    score = np.where(left | right, 1.0, 0.0) + np.linspace(0, 0.01, 256).reshape(16, 16)
    return score, 0.1 + score, left, right


def test_the_mask_keeps_the_part_of_the_region_the_word_is_bound_to():
    score, attention, left, right = two_blobs()
    region, reason = word_mask(score, attention)
    assert reason is None and np.array_equal(region, left | right)
    bound = np.where(left, 2.0, 0.0) + np.where(right, 0.2, 0.0) - 0.1
    mask, reason = word_mask(score, attention, bound)
    assert reason is None and np.array_equal(mask, left)


def test_an_attribution_that_is_not_positive_over_the_region_leaves_it_whole():
    score, attention, left, right = two_blobs()
    fights = np.where(left, 0.5, 0.0) + np.where(right, -2.0, 0.0)
    mask, reason = word_mask(score, attention, fights)
    assert reason is None and np.array_equal(mask, left | right)


def test_the_cut_leaves_no_holes_inside_the_mask():
    score, attention, left, right = two_blobs()
    # Bound only along the left blob's edge, as "circle" beside "red" is: the mask is the whole blob.
    inside = np.zeros_like(left)
    inside[5:11, 2:5] = True
    edge = left & ~inside
    mask, _ = word_mask(score, attention, np.where(edge, 1.0, 0.0) + np.where(right, 0.05, 0.0) - 0.01)
    assert np.array_equal(mask, left)
    ring = np.zeros((9, 9), dtype=bool)
    ring[2:7, 2:7] = True
    ring[3:6, 3:6] = False
    assert filled(ring).sum() == 25 and not filled(ring)[0].any()
    open_ring = ring.copy()
    open_ring[4, 2] = False  # a gap to the outside: nothing is enclosed
    assert np.array_equal(filled(open_ring), open_ring)


def test_a_word_needed_around_its_region_takes_the_surroundings():
    score, attention, left, right = two_blobs()
    surroundings = ~(left | right)
    mask, _ = word_mask(score, attention, np.where(surroundings, 1.0, 0.2))
    assert np.array_equal(mask, surroundings)
    # Needed nowhere in its region, the word fights the picture: the region stays, whatever the surroundings say.
    mask, _ = word_mask(score, attention, np.where(surroundings, 1.0, -0.2))
    assert np.array_equal(mask, left | right)


def test_binding_timesteps_must_be_fractions():
    with pytest.raises(ValidationError, match="fractions of the schedule"):
        SegmentationConfig(binding_timesteps=(0.5, 1.0))


def test_attributions_use_the_same_noise_for_every_text(tiny_runtime: Runtime, monkeypatch: pytest.MonkeyPatch):
    pipeline = tiny_runtime.pipeline()
    latents = picture_latents(pipeline, Image.new("RGB", (32, 32), (200, 40, 40)))
    words = prompt_words(pipeline, "red red")
    # Both words leave the same text "red": with the same noise, their attributions are equal.
    config = SegmentationConfig(binding_timesteps=(0.5,), binding_noise=3)
    attributions = word_attributions(pipeline, latents, "red red", words, config, Progress())
    assert attributions.shape == (2, *latents.shape[2:])
    assert torch.equal(attributions[0], attributions[1]) and attributions.abs().sum() > 0
    # Any batch split gives the same numbers.
    monkeypatch.setattr(segmentation, "ATTRIBUTION_LATENT_PIXELS", 1)  # one text per call
    again = word_attributions(pipeline, latents, "red red", words, config, Progress())
    assert torch.allclose(again, attributions, atol=1e-6)


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


TWO_OBJECTS = (
    Scene("white", (SceneObject("circle", "red", "large", "left"), SceneObject("square", "blue", "large", "right"))),
    Scene(
        "black",
        (
            SceneObject("heart", "yellow", "large", "top left"),
            SceneObject("triangle", "green", "large", "bottom right"),
        ),
    ),
    Scene("gray", (SceneObject("star", "pink", "small", "top"), SceneObject("cross", "orange", "large", "bottom"))),
)


def silhouette(scene: Scene, index: int) -> np.ndarray:
    """The object's pixels: rendered alone, more than half covered."""
    obj = scene.objects[index]
    alone = render_array(Scene(scene.background, (obj,))).astype(np.float32)
    background, colour = (np.asarray(PALETTE[name], dtype=np.float32) for name in (scene.background, obj.colour))
    return (alone - background) @ (colour - background) / float((colour - background) @ (colour - background)) > 0.5


@pytest.mark.skipif(not weights_present(), reason="shapes weights absent")
def test_on_shapes_the_circle_mask_covers_the_red_circle():
    pipeline = Runtime(get_profile("shapes")).pipeline()
    for scene in (red_circle(), red_circle("large", "top left"), red_circle("small", "right")):
        truth = silhouette(scene, 0)
        # The world's caption, as VGD writes it when segment_image is given no prompt.
        segments = {s.word: s for s in segment(pipeline, render_scene(scene), full_caption(scene))}
        mask = segments["circle"].mask
        assert mask is not None
        iou = (mask & truth).sum() / (mask | truth).sum()
        assert iou >= 0.45, (scene, iou)
        assert (mask & truth).sum() >= 0.75 * mask.sum(), "the mask lies on the circle"
        assert segments["a"].mask is None


@pytest.mark.skipif(not weights_present(), reason="shapes weights absent")
@pytest.mark.parametrize("scene", TWO_OBJECTS, ids=lambda scene: scene.background)
def test_on_shapes_each_shape_word_is_bound_to_its_own_object(scene: Scene):
    pipeline = Runtime(get_profile("shapes")).pipeline()
    prompt = " and ".join(f"a {obj.colour} {obj.shape}" for obj in scene.objects)
    bound = {s.word: s.mask for s in segment(pipeline, render_scene(scene), prompt)}
    unbound = {
        s.word: s.mask for s in segment(pipeline, render_scene(scene), prompt, SegmentationConfig(binding_timesteps=()))
    }
    spilled = []
    for index, obj in enumerate(scene.objects):
        own, other = silhouette(scene, index), silhouette(scene, 1 - index)
        mask = bound[obj.shape]
        assert mask is not None
        assert (mask & own).sum() / (mask | own).sum() >= 0.35, obj
        assert (mask & own).sum() > 2 * (mask & other).sum(), obj
        spilled.append((unbound[obj.shape] & other).sum() / unbound[obj.shape].sum())
    # The attention's regions alone spill onto the other object: the binding is what separates them.
    assert max(spilled) > 0.2


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
