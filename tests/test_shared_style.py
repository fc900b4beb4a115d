"""Style that names the shared look (methods.shared_style): a style prompt of several pictures leaves out the words
only some of their own prompts have."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from pictoprompt.configs import VgdConfig
from pictoprompt.methods.shared_style import own_words, shared_style, without_words
from pictoprompt.methods.vgd import (
    ClipVocabulary,
    Limits,
    guided_decode,
    image_targets,
    runtime_vocabulary,
    uses_any,
    vgd_prompt,
)
from pictoprompt.models.llm import LanguageModel
from pictoprompt.models.profiles import BUILTIN_PROFILES, Profile, get_profile
from pictoprompt.models.runtime import Runtime
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


def style_context(tiny_lm_dir: Path, leave_out: bool) -> ToolContext:
    tiny = get_profile("tiny")
    profile = Profile(
        **{
            **tiny.model_dump(),
            "llm": {"backend": "transformers", "source": str(tiny_lm_dir)},
            "vgd": {**tiny.vgd.model_dump(), "style_leaves_out_own_words": leave_out},
        }
    )
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
