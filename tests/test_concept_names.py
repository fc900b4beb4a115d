"""A learned concept named in a prompt ("my-star on the left", concept="my-star"), and the profiles' tuning defaults."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from pictoprompt.configs import ConceptTuningConfig
from pictoprompt.errors import InvalidInputError
from pictoprompt.methods.concept_tuning import tune_concept
from pictoprompt.methods.concept_weights import named_concept_prompt
from pictoprompt.methods.sd_ipc import ImageToPrompt
from pictoprompt.methods.tuning import TuningResult
from pictoprompt.models.concepts import ConceptStore, mentions
from pictoprompt.models.profiles import BUILTIN_PROFILES
from pictoprompt.models.runtime import Runtime
from pictoprompt.server.assets import AssetStore
from pictoprompt.tools.base import ToolContext
from pictoprompt.tools.customize_concept import CustomizeConceptRequest, concept_card, customize_concept
from pictoprompt.tools.edit_with_text import EditWithTextRequest, edit_with_text
from pictoprompt.tools.generate_image import GenerateImageRequest, generate_image


def pictures(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]


class DictImages:
    def __init__(self, images: dict[str, Image.Image]) -> None:
        self.images = images

    def load(self, ref: str) -> Image.Image:
        return self.images[ref]


def test_mentions_finds_the_name_as_a_whole_word_in_any_case() -> None:
    assert mentions("my-star on the left", "my-star")
    assert mentions("a large My-Star, on a black background", "my-star")
    assert not mentions("my-stars on the left", "my-star")
    assert not mentions("not-my-star", "my-star")
    assert not mentions("a star on the left", "my-star")


def test_the_name_becomes_the_concepts_converted_embedding(tiny_runtime: Runtime) -> None:
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    converter = ImageToPrompt.cached(clip, pipeline)
    embedding = torch.randn(1, clip.embed_dim)
    with torch.no_grad():
        f_cnvrt = converter.convert(embedding)[0]
        context, _ = converter.text_states(["on the left"])
        states = named_concept_prompt(converter, "my-star on the left", "my-star", embedding)
    assert states.shape == converter.empty_states.shape
    assert torch.equal(states[0, 0], context[0, 0])  # the start token
    assert torch.equal(states[0, 1], f_cnvrt)  # where the name stood
    # Every other position is the text's own: "on the left", its end-of-text token and the padding, one later.
    assert torch.equal(states[0, 2:], context[0, 1:-1])


def test_the_name_can_stand_anywhere_and_more_than_once(tiny_runtime: Runtime) -> None:
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    converter = ImageToPrompt.cached(clip, pipeline)
    embedding = torch.randn(1, clip.embed_dim)
    with torch.no_grad():
        f_cnvrt = converter.convert(embedding)[0]
        text, _ = converter.text_states(["a and a"])
        states = named_concept_prompt(converter, "a obj-1 and a OBJ-1", "obj-1", embedding)
    assert torch.equal(states[0, 1], text[0, 1])  # "a"
    assert torch.equal(states[0, 2], f_cnvrt)
    assert torch.equal(states[0, 3:5], text[0, 2:4])  # "and a"
    assert torch.equal(states[0, 5], f_cnvrt)
    with pytest.raises(InvalidInputError, match="does not name"):
        named_concept_prompt(converter, "a red circle", "obj-1", embedding)


def test_a_description_follows_the_placeholder_as_class_words(tiny_runtime: Runtime) -> None:
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    converter = ImageToPrompt.cached(clip, pipeline)
    embedding = torch.randn(1, clip.embed_dim)
    with torch.no_grad():
        f_cnvrt = converter.convert(embedding)[0]
        text, _ = converter.text_states(["a green heart on the left and a green heart"])
        states = named_concept_prompt(
            converter, "my-star on the left and my-star", "my-star", embedding, description="  a green heart "
        )
        _, first_mention_end = converter.text_states(["a green heart on the left and"])
    words = int(first_mention_end[0])  # start token + the first mention's text: where the second mention stands
    assert torch.equal(states[0, 0], text[0, 0])
    assert torch.equal(states[0, 1], f_cnvrt)  # the placeholder, then the description's words
    assert torch.equal(states[0, 2 : words + 1], text[0, 1:words])
    assert torch.equal(states[0, words + 1], f_cnvrt)  # the second mention, its words after it
    assert torch.equal(states[0, words + 2 :], text[0, words:-2])
    # An empty description is none: the plain placeholder form.
    assert torch.equal(
        named_concept_prompt(converter, "my-star on the left", "my-star", embedding, description=" "),
        named_concept_prompt(converter, "my-star on the left", "my-star", embedding),
    )


def test_a_placer_puts_the_words_after_the_name_into_the_description(tiny_runtime: Runtime) -> None:
    """With a placer (the LLM's rewrite on a profile that asks for it), "NAME small" draws "[f] a small ... heart"."""
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    converter = ImageToPrompt.cached(clip, pipeline)
    embedding = torch.randn(1, clip.embed_dim)
    asked: list[tuple[str, str]] = []

    def place(description: str, words: str) -> str:
        asked.append((description, words))
        return "a small striped green heart"

    with torch.no_grad():
        placed = named_concept_prompt(converter, "my-star small", "my-star", embedding, "a striped green heart", place)
        text, _ = converter.text_states(["a small striped green heart"])
        alone = named_concept_prompt(converter, "my-star", "my-star", embedding, "a striped green heart", place)
    assert asked == [("a striped green heart", "small")]  # nothing to place after a name that ends the prompt
    assert torch.equal(placed[0, 2:], text[0, 1:-1])
    assert torch.equal(placed[0, 1], converter.convert(embedding)[0])
    with torch.no_grad():
        assert torch.equal(
            alone, named_concept_prompt(converter, "my-star", "my-star", embedding, "a striped green heart")
        )


def test_the_names_spelling_never_reaches_the_generator(tiny_runtime: Runtime) -> None:
    """Only the concept's embedding stands for it: 'my-star' draws no more of a star than 'obj-1' does."""
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    converter = ImageToPrompt.cached(clip, pipeline)
    embedding = torch.randn(1, clip.embed_dim)
    with torch.no_grad():
        star = named_concept_prompt(converter, "my-star on the left", "my-star", embedding)
        other = named_concept_prompt(converter, "obj-1 on the left", "obj-1", embedding)
    assert torch.equal(star, other)


def test_generate_image_draws_the_named_concept(tiny_runtime: Runtime, tmp_path: Path) -> None:
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    store = ConceptStore(tmp_path / "concepts")
    context = ToolContext(tiny_runtime, AssetStore(tmp_path / "assets"), DictImages({}), concepts=store)
    result = tune_concept(pipeline, clip, pictures(3), ConceptTuningConfig(iterations=1, num_prompts=2))
    other = tune_concept(pipeline, clip, pictures(3, seed=5), ConceptTuningConfig(iterations=1, num_prompts=2))
    for name, tuned in (("my-star", result), ("obj-1", result), ("obj-2", other)):
        store.save(concept_card(name, "concept", tuned, tiny_runtime), tuned.weights.to_tensors(), pictures(1))

    def draw(prompt: str, concept: str | None) -> np.ndarray:
        request = GenerateImageRequest(prompt=prompt, concept=concept, seed=3, steps=2)
        with Image.open(generate_image(request, context).images[0].path) as image:
            return np.asarray(image.convert("RGB"))

    named = draw("my-star on the left", "my-star")
    # The same concept under another name draws the same picture: the name's words play no part.
    assert np.array_equal(named, draw("obj-1 on the left", "obj-1"))
    # Another concept (other references) draws another picture from the same words.
    assert not np.array_equal(named, draw("obj-2 on the left", "obj-2"))
    # Without the name the prompt is plain text, with or without the concept's weights applied.
    assert not np.array_equal(named, draw("on the left", "my-star"))


def test_a_concept_of_no_iterations_is_untuned_sd_ipc_and_stores(tiny_runtime: Runtime, tmp_path: Path) -> None:
    """The concept benchmark's untuned row: 0 iterations, no deep prompts, so `concept:NAME` is plain SD-IPC."""
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    result = tune_concept(pipeline, clip, pictures(1), ConceptTuningConfig(iterations=0, num_prompts=0))
    card = concept_card("untuned", "concept", result, tiny_runtime)
    assert card.final_loss is None and card.iterations == 0
    store = ConceptStore(tmp_path / "concepts")
    store.save(card, result.weights.to_tensors(), pictures(1))
    with torch.no_grad():
        plain = torch.nn.functional.normalize(clip.encode_image(pictures(1)), dim=-1)
    stored = store.mean_embedding("untuned", card.base_hash, tiny_runtime.model_ids())
    assert store.get("untuned").final_loss is None
    assert torch.allclose(stored, plain, atol=1e-6)


def test_customize_concept_takes_the_profiles_defaults(tiny_runtime: Runtime, tmp_path: Path) -> None:
    store = ConceptStore(tmp_path / "concepts")
    refs = {f"img{i}": image for i, image in enumerate(pictures(3))}
    tuning = ConceptTuningConfig(
        iterations=2, learning_rate=1e-4, neutral_fit_steps=3, caption_alignment=1.0, aligned_prompt_learning_rate=1e-2
    )
    profile = tiny_runtime.profile.model_copy(update={"concept_tuning": tuning})
    runtime = Runtime(profile)
    runtime._components = tiny_runtime._components  # the same loaded models, another profile's defaults
    context = ToolContext(runtime, assets=None, images=DictImages(refs), concepts=store)  # type: ignore[arg-type]

    card = customize_concept(CustomizeConceptRequest(name="by-default", images=list(refs)), context)
    assert card.iterations == 2 and card.hyperparameters["learning_rate"] == 1e-4
    assert card.hyperparameters["neutral_fit_steps"] == 3
    # Without a description nothing is aligned and the deep prompts share the K/V deltas' rate.
    assert (card.hyperparameters["prompt_learning_rate"], card.hyperparameters["caption_alignment"]) == (1e-4, 0.0)
    # The described calls keep their descriptions as written (completing one is test_concept_description's): the
    # rates and the alignment follow from a description being given.
    card = customize_concept(
        CustomizeConceptRequest(
            name="described", images=list(refs), description="a red square", complete_description=False
        ),
        context,
    )
    assert (card.hyperparameters["prompt_learning_rate"], card.hyperparameters["caption_alignment"]) == (1e-2, 1.0)
    card = customize_concept(
        CustomizeConceptRequest(
            name="asked",
            images=list(refs),
            iterations=3,
            learning_rate=2e-4,
            description="a red square",
            complete_description=False,
        ),
        context,
    )
    assert card.iterations == 3 and card.hyperparameters["learning_rate"] == 2e-4
    # A rate the request sets is every weight's: the profile's deep-prompt rate goes with the profile's rate.
    assert card.hyperparameters["prompt_learning_rate"] == 2e-4


def test_profiles_keep_the_paper_defaults_unless_their_models_need_others() -> None:
    paper = ConceptTuningConfig()
    assert (paper.iterations, paper.learning_rate) == (30, 5e-6)
    assert BUILTIN_PROFILES["sd15"].concept_tuning == paper
    assert BUILTIN_PROFILES["sd21"].concept_tuning == paper
    assert BUILTIN_PROFILES["shapes"].concept_tuning != paper


@pytest.mark.slow
def test_shapes_a_named_concept_is_drawn_in_the_context_its_prompt_gives(tmp_path: Path) -> None:
    from pictoprompt.models.profiles import get_profile
    from pictoprompt.models.shapes import weights_present

    if not weights_present():
        pytest.skip("the shapes weights are not built yet")
    from lab.shapes.oracle import parse_scene
    from pictoprompt.models.shapes.scenes import Scene, SceneObject, render_scene

    runtime = Runtime(get_profile("shapes"))
    refs = {
        f"ref{i}": render_scene(Scene(background, (SceneObject("heart", "green", size, position, "striped"),)))
        for i, (background, size, position) in enumerate(
            [("white", "small", "top left"), ("gray", "large", "right"), ("pink", "small", "bottom")]
        )
    }
    store = ConceptStore(tmp_path / "concepts")
    context = ToolContext(runtime, AssetStore(tmp_path / "assets"), DictImages(refs), concepts=store)
    card = customize_concept(CustomizeConceptRequest(name="my-heart", images=list(refs)), context)
    assert (card.iterations, card.hyperparameters["learning_rate"]) == (30, 1e-4)  # the shapes profile's defaults

    request = GenerateImageRequest(prompt="my-heart on the left", concept="my-heart", num_images=8, seed=0)
    readings = []
    for output in generate_image(request, context).images:
        with Image.open(output.path) as image:
            readings.append(parse_scene(image.convert("RGB")).main)
    # The prompt's words place it: only one reference is anywhere near the left.
    assert sum(main is not None and "left" in main.position for main in readings) >= 6
    # The concept's colour comes from its pictures, not from any word of the prompt.
    assert sum(main is not None and main.colour == "green" for main in readings) >= 6


def test_tuning_with_a_description_pulls_the_concept_towards_it(tiny_runtime: Runtime) -> None:
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    converter = ImageToPrompt.cached(clip, pipeline)
    with torch.no_grad():
        states, eos = converter.text_states(["a green heart"])
        words = states[0, int(eos[0])]
    options = {"iterations": 20, "learning_rate": 1e-3, "prompt_learning_rate": 1e-2, "num_prompts": 4}
    plain = tune_concept(pipeline, clip, pictures(3), ConceptTuningConfig(augment=False, **options))
    aligned = tune_concept(
        pipeline,
        clip,
        pictures(3),
        ConceptTuningConfig(augment=False, caption_alignment=1.0, **options),
        description="a green heart",
    )

    def closeness(result: TuningResult) -> float:
        return float(torch.nn.functional.cosine_similarity(result.mean_converted_embedding[0], words, dim=0))

    assert closeness(aligned) > closeness(plain) + 0.1
    assert aligned.hyperparameters["caption_alignment"] == 1.0 and plain.hyperparameters["caption_alignment"] == 0.0
    # Without words to align to, the weight does nothing and the card says so.
    unaligned = tune_concept(
        pipeline, clip, pictures(3), ConceptTuningConfig(iterations=1, num_prompts=2, caption_alignment=1.0)
    )
    assert unaligned.hyperparameters["caption_alignment"] == 0.0
    with pytest.raises(ValidationError, match="caption_alignment"):
        ConceptTuningConfig(iterations=1, caption_alignment=-1.0)


def test_a_described_concept_is_drawn_with_its_words_and_edited_from_them(
    tiny_runtime: Runtime, tmp_path: Path
) -> None:
    store = ConceptStore(tmp_path / "concepts")
    refs = {f"img{i}": image for i, image in enumerate(pictures(3))}
    context = ToolContext(tiny_runtime, AssetStore(tmp_path / "assets"), DictImages(refs), concepts=store)
    request = CustomizeConceptRequest(
        name="my-heart", images=list(refs), iterations=1, description=" a  green heart ", complete_description=False
    )
    card = customize_concept(request, context)
    assert card.description == "a green heart" and store.get("my-heart").description == "a green heart"
    # The same weights without the words: the description is exactly words after the placeholder.
    stored = store.load("my-heart", card.base_hash, tiny_runtime.model_ids())
    plain = stored.card.model_copy(update={"name": "plain", "description": None})
    store.save(plain, stored.tensors, pictures(1))

    def draw(prompt: str, concept: str) -> np.ndarray:
        request = GenerateImageRequest(prompt=prompt, concept=concept, seed=3, steps=2)
        with Image.open(generate_image(request, context).images[0].path) as image:
            return np.asarray(image.convert("RGB"))

    described = draw("my-heart on the left", "my-heart")
    assert np.array_equal(described, draw("plain a green heart on the left", "plain"))
    assert not np.array_equal(described, draw("plain on the left", "plain"))

    edit = EditWithTextRequest(image="concept:my-heart", text="blue", num_images=1, steps=2, concept="my-heart")
    assert edit_with_text(edit, context).source_prompt == "a green heart"
