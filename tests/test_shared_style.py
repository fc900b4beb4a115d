"""Style that names the shared look (methods.shared_style): which words a style prompt of several pictures may use."""

from __future__ import annotations

import pytest
from diffusers import StableDiffusionPipeline

from pictoprompt.configs import StyleConfig
from pictoprompt.methods.shared_style import kept_vocabulary, refuted_words, split_words, words_of
from pictoprompt.methods.vgd import ClipVocabulary
from pictoprompt.models.clip import ClipModel
from pictoprompt.models.profiles import BUILTIN_PROFILES
from pictoprompt.models.runtime import Runtime


def test_words_are_lower_cased_once_each_in_order() -> None:
    assert words_of("A red circle, a Red star.") == ["a", "red", "circle", "star"]


def test_a_word_only_some_pictures_own_prompts_have_is_theirs_and_a_word_all_have_is_shared() -> None:
    own = ["a pink cross on a white background", "an outlined purple square on a white background"]
    proposed = ["outlined", "pink", "shapes", "on", "a", "white", "background", "striped"]
    shared, partial, unclaimed = split_words(own, proposed)
    assert shared == {"on", "a", "white", "background"}
    assert {"pink", "cross", "outlined", "purple", "square", "an"} == partial
    # Only the proposed words no own prompt has are left for the generator to judge, in the proposal's order.
    assert unclaimed == ["shapes", "striped"]


def test_the_second_decode_starts_from_a_kept_start_word_and_writes_only_kept_words(tiny_runtime: Runtime) -> None:
    clip = tiny_runtime.clip()
    profile_words = ClipVocabulary(["red", "striped", "circle"], clip.encode_text(["red", "striped", "circle"]))
    vocabulary = kept_vocabulary(clip, profile_words, {"striped", "shapes", "a"})
    assert vocabulary.words == ["striped"]
    assert vocabulary.dictionary == frozenset({"striped", "shapes", "a"})
    # Without a profile's start words (a real CLIP's whole vocabulary is not consulted), the kept words start it.
    assert sorted(kept_vocabulary(clip, None, {"shapes", "a"}).words) == ["a", "shapes"]


def test_the_paper_path_is_the_default_and_the_shapes_profile_names_its_choice() -> None:
    assert StyleConfig().shared_words is False
    assert BUILTIN_PROFILES["sd15"].style == StyleConfig()


@pytest.fixture(scope="module")
def shapes() -> tuple[StableDiffusionPipeline, ClipModel]:
    from pictoprompt.models.profiles import get_profile
    from pictoprompt.models.shapes import weights_present

    if not weights_present():
        pytest.skip("the shapes weights are not built yet")
    runtime = Runtime(get_profile("shapes"))
    return runtime.pipeline(), runtime.clip()


def test_shapes_the_generator_refutes_a_colour_one_picture_does_not_show(
    shapes: tuple[StableDiffusionPipeline, ClipModel],
) -> None:
    from pictoprompt.models.shapes.scenes import Scene, SceneObject, render_scene

    pipeline, clip = shapes
    images = [
        render_scene(Scene("white", (SceneObject("circle", "red"),))),
        render_scene(Scene("white", (SceneObject("square", "blue"),))),
    ]
    own = ["a red circle on a white background", "a blue square on a white background"]
    refuted = refuted_words(pipeline, clip, images, own, ["green", "black", "red"], refutation=0.05)
    # Green and black fit neither picture; red is the circle's own colour but not the square's.
    assert refuted == {"green", "black", "red"}
    assert refuted_words(pipeline, clip, images, own, [], refutation=0.05) == set()
