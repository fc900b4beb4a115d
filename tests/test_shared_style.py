"""Style that names the shared look (methods.shared_style): a style prompt of several pictures leaves out the words
only some of their own prompts have."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from pictoprompt.configs import VgdConfig
from pictoprompt.methods.shared_style import own_words, shared_style, without_words
from pictoprompt.methods.vgd import (
    ClipVocabulary,
    Limits,
    guided_decode,
    image_targets,
    invert,
    runtime_vocabulary,
    style_reader,
    style_target,
    uses_any,
    vgd_prompt,
)
from pictoprompt.models.clip import STYLE_TEXT_TENSORS, ClipModel, TransformersClip
from pictoprompt.models.llm import LanguageModel
from pictoprompt.models.profiles import BUILTIN_PROFILES, Profile, get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.models.shapes import CLIP_DIR, weights_present
from pictoprompt.models.shapes.scenes import COLOURS, Scene, SceneObject, render_scene
from pictoprompt.server.images import PreResolvedImages
from pictoprompt.tools.base import SavedImage, ToolContext
from pictoprompt.tools.invert_image import InvertImageRequest, invert_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def solid(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (32, 32), colour)


def test_a_word_only_some_own_prompts_have_is_left_out_and_one_all_have_is_not() -> None:
    own = ["A pink cross on a white background.", "an outlined purple square at the top on a white background"]
    assert own_words(own) == {"pink", "cross", "an", "outlined", "purple", "square", "at", "the", "top"}
    assert own_words(["a red circle"] * 3) == set()


def test_a_growing_word_counts_only_once_it_is_finished() -> None:
    left_out = frozenset({"pink", "cross"})
    assert uses_any("striped pink shapes", left_out, complete=True)
    assert not uses_any("striped pi", left_out, complete=False)  # "pi" may still become "pixel"
    assert uses_any("striped pink", left_out, complete=True)
    assert not uses_any("striped shapes on a pinkish background", left_out, complete=True)


def test_the_left_out_words_leave_the_start_words_and_the_dictionary() -> None:
    vocabulary = ClipVocabulary(["red", "striped", "circle"], torch.eye(3), frozenset({"a", "red", "striped"}))
    kept = without_words(vocabulary, {"red", "circle"})
    assert kept.words == ["striped"] and torch.equal(kept.embeddings, torch.eye(3)[[1]])
    assert kept.dictionary == frozenset({"a", "striped"})
    # A start word is always left to begin from.
    assert without_words(vocabulary, {"red", "striped", "circle"}).words == vocabulary.words


def test_the_decoder_writes_no_excluded_word(language_model: LanguageModel, tiny_runtime: Runtime) -> None:
    clip = tiny_runtime.clip()
    targets = image_targets(clip, [solid((220, 30, 30))])
    prompt = vgd_prompt(language_model, "style", 5, condition="red")
    small = VgdConfig(num_beams=3, beam_expand_factor=3)
    free = guided_decode(language_model, clip, targets, prompt, Limits(5), small)
    excluded = frozenset(words(free.best.text))
    assert excluded
    held = guided_decode(language_model, clip, targets, prompt, Limits(5, excluded_words=excluded), small)
    assert held.hypotheses
    assert all(not words(h.text) & excluded for h in held.hypotheses if h.finished)


class NoAssets:
    def save(self, image: Image.Image, metadata: dict[str, str]) -> SavedImage:
        raise AssertionError("a style prompt stores no picture")


def style_context(
    tiny_lm_dir: Path, leave_out: bool, style_text_encoder: str | None = None, start_words: Path | None = None
) -> ToolContext:
    tiny = get_profile("tiny")
    vgd = {**tiny.vgd.model_dump(), "style_leaves_out_own_words": leave_out, "style_text_encoder": style_text_encoder}
    llm = {"backend": "transformers", "source": str(tiny_lm_dir)}
    vocabulary = str(start_words) if start_words is not None else tiny.vocabulary
    profile = Profile(**{**tiny.model_dump(), "llm": llm, "vgd": vgd, "vocabulary": vocabulary})
    images = {"red": solid((220, 30, 30)), "blue": solid((30, 60, 220))}
    return ToolContext(Runtime(profile), NoAssets(), PreResolvedImages(images))


def test_the_style_of_several_pictures_leaves_out_what_only_some_own_prompts_have(tiny_lm_dir: Path) -> None:
    context = style_context(tiny_lm_dir, leave_out=True)
    runtime = context.runtime
    images = [solid((220, 30, 30)), solid((30, 60, 220))]
    vocabulary = runtime_vocabulary(runtime)
    found = shared_style(runtime.llm(), runtime.clip(), images, vocabulary, 5, runtime.profile.vgd)
    assert len(found.own_prompts) == 2
    assert found.left_out == sorted(own_words(found.own_prompts))
    assert all(not words(h.text) & set(found.left_out) for h in found.result.hypotheses if h.finished)
    request = InvertImageRequest(images=["red", "blue"], focus="style", max_tokens=5, num_results=3)
    response = invert_image(request, context)
    assert response.prompts
    # The tool takes this path: its prompts come from the decode without the left-out words.
    assert [p.prompt for p in response.prompts] == [h.text for h in found.result.hypotheses[: len(response.prompts)]]


def test_the_paper_path_is_the_default() -> None:
    assert VgdConfig().style_leaves_out_own_words is False
    assert not any(profile.vgd.style_leaves_out_own_words for profile in BUILTIN_PROFILES.values())


def test_the_paper_reads_style_with_the_clip_and_only_shapes_has_a_style_reader() -> None:
    assert VgdConfig().style_text_encoder is None
    assert [name for name, p in BUILTIN_PROFILES.items() if p.vgd.style_text_encoder is not None] == ["shapes"]


def closest(reader: ClipModel, clip: ClipModel, images: list[Image.Image], texts: list[str]) -> str:
    target = F.normalize(style_target(clip, images), dim=-1)
    with torch.no_grad():
        similarity = target @ F.normalize(reader.encode_text(texts).float(), dim=-1).T
    return texts[int(similarity.argmax())]


@pytest.mark.skipif(not weights_present(), reason="shapes weights absent")
def test_the_shapes_style_reader_names_the_fill_and_the_background_two_pictures_share() -> None:
    clip = TransformersClip.from_pretrained(CLIP_DIR, torch.device("cpu"), torch.float16)
    reader, _ = style_reader(clip, None, get_profile("shapes").vgd)
    # The two striped pictures (a red circle, a blue square), here on different backgrounds.
    circle, square = SceneObject("circle", "red", fill="striped"), SceneObject("square", "blue", fill="striped")
    striped = [render_scene(Scene("white", (circle,))), render_scene(Scene("yellow", (square,)))]
    fills = ["solid shapes", "outlined shapes", "striped shapes"]
    assert closest(reader, clip, striped, fills) == "striped shapes"
    star, heart = SceneObject("triangle", "green", fill="outlined"), SceneObject("heart", "orange", fill="solid")
    gray = [render_scene(Scene("gray", (star,))), render_scene(Scene("gray", (heart,)))]
    backgrounds = [f"shapes on a {colour} background" for colour in COLOURS]
    assert closest(reader, clip, gray, backgrounds) == "shapes on a gray background"
    # Only the text tower is the reader's: the pictures' embeddings are the CLIP's.
    torch.testing.assert_close(reader.encode_image(striped), clip.encode_image(striped))


def test_the_style_decode_scores_with_the_profiles_text_tower(tiny_lm_dir: Path, tmp_path: Path) -> None:
    path, start_words = tmp_path / "style_text.safetensors", tmp_path / "start_words.txt"
    # A few start words: the whole vocabulary would be embedded twice (the CLIP's, the reader's).
    start_words.write_text("red\nblue\nstriped\nshapes\n")
    context = style_context(tiny_lm_dir, leave_out=False, style_text_encoder=str(path), start_words=start_words)
    runtime = context.runtime
    clip = runtime.clip()
    assert isinstance(clip, TransformersClip)
    generator = torch.Generator().manual_seed(0)
    tower = {
        name: torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
        for name, tensor in clip.model.state_dict().items()
        if name.startswith(STYLE_TEXT_TENSORS)
    }
    save_file(tower, str(path))
    reader, words = style_reader(clip, runtime_vocabulary(runtime), runtime.profile.vgd)
    assert not torch.allclose(reader.encode_text(["a red circle"]), clip.encode_text(["a red circle"]))
    target = style_target(clip, [solid((220, 30, 30)), solid((30, 60, 220))])
    config = runtime.profile.vgd
    expected = invert(runtime.llm(), reader, target, task="style", vocabulary=words, max_length=5, config=config)
    request = InvertImageRequest(images=["red", "blue"], focus="style", max_tokens=5, num_results=3)
    response = invert_image(request, context)
    # The tool takes this path: its start word and prompts are the decode scored by the file's text tower.
    assert response.initial_condition == expected.initial_condition
    assert [p.prompt for p in response.prompts] == [h.text for h in expected.hypotheses[: len(response.prompts)]]

    # One picture's colour and fill are its style: the CLIP's own text tower reads it, not the reader.
    red = style_target(clip, [solid((220, 30, 30))])
    vocabulary = runtime_vocabulary(runtime)
    own = invert(runtime.llm(), clip, red, task="style", vocabulary=vocabulary, max_length=5, config=config)
    by_reader = invert(runtime.llm(), reader, red, task="style", vocabulary=words, max_length=5, config=config)
    assert [h.text for h in own.hypotheses] != [h.text for h in by_reader.hypotheses]
    response = invert_image(InvertImageRequest(images=["red"], focus="style", max_tokens=5, num_results=3), context)
    assert [p.prompt for p in response.prompts] == [h.text for h in own.hypotheses[: len(response.prompts)]]
