"""Completing a concept's description with the word its pictures show (methods.concept_description)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from pictoprompt.configs import ConceptTuningConfig, DescriptionConfig
from pictoprompt.errors import JobCancelledError
from pictoprompt.methods.concept_description import (
    align_to_generator,
    closest_words,
    complete_description,
    describe,
    moved,
    with_article,
    with_word,
)
from pictoprompt.methods.generator_score import denoising_errors, relative_gains
from pictoprompt.methods.sd_ipc import ImageToPrompt
from pictoprompt.methods.tuning import encode_latents
from pictoprompt.methods.vgd import runtime_vocabulary
from pictoprompt.models.clip import ClipModel
from pictoprompt.models.concepts import ConceptStore
from pictoprompt.models.profiles import BUILTIN_PROFILES
from pictoprompt.models.runtime import Runtime
from pictoprompt.progress import Progress
from pictoprompt.tools.base import ToolContext
from pictoprompt.tools.customize_concept import CustomizeConceptRequest, customize_concept


def pictures(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]


class DictImages:
    def __init__(self, images: dict[str, Image.Image]) -> None:
        self.images = images

    def load(self, ref: str) -> Image.Image:
        return self.images[ref]


@pytest.mark.parametrize(
    ("description", "word", "expected"),
    [
        ("a green heart", "striped", "a striped green heart"),
        ("a green heart", "outlined", "an outlined green heart"),
        ("an orange heart", "striped", "a striped orange heart"),
        ("An orange heart", "small", "A small orange heart"),
        ("the mug", "blue", "the blue mug"),
        ("ginger cat", "fluffy", "fluffy ginger cat"),
        ("a", "red", "red a"),
    ],
)
def test_the_word_goes_after_the_article_and_the_article_follows_it(description: str, word: str, expected: str) -> None:
    assert with_word(description, word) == expected


def test_every_candidate_is_judged_on_the_same_noise_whatever_the_batch(tiny_runtime: Runtime) -> None:
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    converter = ImageToPrompt.cached(clip, pipeline)
    latents = encode_latents(pipeline, pictures(2))
    texts = ["a red square", "a striped red square", "a red square", *(f"a {n} square" for n in range(8))]
    errors = denoising_errors(pipeline, converter, latents, texts, 3, 0, Progress())
    assert errors.shape == (len(texts), 2) and bool((errors > 0).all())
    assert torch.equal(errors[0], errors[2])  # the same text, in another batch position: the same error
    assert not torch.equal(errors[0], errors[1])
    one_by_one = torch.cat([denoising_errors(pipeline, converter, latents, [t], 3, 0, Progress()) for t in texts[-3:]])
    assert torch.allclose(errors[-3:], one_by_one, rtol=1e-4)  # the last batch holds three: the same errors alone


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_error_is_against_what_the_unet_predicts(tiny_runtime: Runtime, prediction_type: str) -> None:
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    scheduler = pipeline.scheduler
    converter = ImageToPrompt.cached(clip, pipeline)
    latents = encode_latents(pipeline, pictures(1))
    pipeline.scheduler = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)
    try:
        error = denoising_errors(pipeline, converter, latents, ["a red square"], 1, 7, Progress())
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
        t = torch.full((1,), int(0.05 * scheduler.config.num_train_timesteps))
        noisy = pipeline.scheduler.add_noise(latents, noise, t)
        target = noise if prediction_type == "epsilon" else pipeline.scheduler.get_velocity(latents, noise, t)
        with torch.no_grad():
            states, _ = converter.text_states(["a red square"])
            prediction = pipeline.unet(noisy, t, encoder_hidden_states=states).sample
    finally:
        pipeline.scheduler = scheduler
    assert torch.allclose(error[0, 0], (prediction - target).pow(2).mean(), rtol=1e-4)


def test_a_word_is_added_only_when_it_beats_the_threshold(tiny_runtime: Runtime) -> None:
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    words = ["striped", "outlined", "small", "large", "blue"]
    groups = [[word] for word in words]
    loose = complete_description(
        pipeline,
        clip,
        pictures(3),
        "a red square",
        groups,
        DescriptionConfig(completion_timesteps=4, completion_threshold=0.0),
    )
    assert set(loose.gains) == set(words)
    best = min(loose.gains, key=loose.gains.__getitem__)
    if loose.gains[best] < 0:
        assert (loose.added, loose.description) == (best, with_word("a red square", best))
    else:
        assert (loose.added, loose.description) == (None, "a red square")
    strict = complete_description(
        pipeline,
        clip,
        pictures(3),
        "a red square",
        groups,
        DescriptionConfig(completion_timesteps=4, completion_threshold=0.99),
    )
    assert (strict.added, strict.description) == (None, "a red square")
    assert strict.gains == pytest.approx(loose.gains)


def test_a_group_the_description_already_uses_offers_no_word(tiny_runtime: Runtime) -> None:
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    groups = [["red", "blue", "green"], ["solid", "striped"], ["striped"], ["square"]]
    result = complete_description(
        pipeline, clip, pictures(3), " a  Red square ", groups, DescriptionConfig(completion_timesteps=2)
    )
    assert list(result.gains) == ["solid", "striped"]  # no second colour, no repeated word, in the groups' order
    used = [["red", "blue"], ["", "square"]]
    nothing = complete_description(
        pipeline, clip, pictures(3), "a red square", used, DescriptionConfig(completion_timesteps=2)
    )
    assert (nothing.description, nothing.added, nothing.gains) == ("a red square", None, {})


def test_a_moved_picture_keeps_its_size_and_fills_the_uncovered_strip_with_its_border() -> None:
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    image.putpixel((3, 3), (255, 0, 0))
    shifted = np.asarray(moved(image, 2, -1))
    assert shifted.shape == (8, 8, 3)
    assert tuple(shifted[2, 5]) == (255, 0, 0) and (shifted == (255, 0, 0)).all(axis=-1).sum() == 1
    assert (shifted[:, :2] == (10, 20, 30)).all() and (shifted[-1] == (10, 20, 30)).all()


def test_alignment_picks_one_of_the_moved_views_at_the_generators_size(tiny_runtime: Runtime) -> None:
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    converter = ImageToPrompt.cached(clip, pipeline)
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    wide = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 48, 3), dtype=np.uint8))
    (as_is,) = align_to_generator(pipeline, converter, [wide], "a red square", reach=0)
    assert as_is.size == (size, size)
    (aligned,) = align_to_generator(pipeline, converter, [wide], "a red square", reach=1, timesteps=2)
    views = [np.asarray(moved(as_is, dx, dy)) for dx in (-1, 0, 1) for dy in (-1, 0, 1)]
    assert sum(np.array_equal(np.asarray(aligned), view) for view in views) >= 1


def test_without_a_list_the_candidates_are_the_words_clip_finds_closest(tiny_runtime: Runtime) -> None:
    clip = tiny_runtime.clip()
    vocabulary = runtime_vocabulary(tiny_runtime)
    words = closest_words(clip, vocabulary, pictures(3), 5)
    assert len(words) == 5 and len(set(words)) == 5 and set(words) <= set(vocabulary.words)
    with torch.no_grad():
        image = torch.nn.functional.normalize(clip.encode_image(pictures(3)).float(), dim=-1)
    similarity = (image @ vocabulary.embeddings.T).mean(0)
    assert similarity[vocabulary.words.index(words[0])] == similarity.max()


def tiny_context(tiny_runtime: Runtime, tmp_path: Path, description: DescriptionConfig) -> ToolContext:
    tuning = ConceptTuningConfig(iterations=1, neutral_fit_steps=1)
    profile = tiny_runtime.profile.model_copy(update={"concept_tuning": tuning, "concept_description": description})
    runtime = Runtime(profile)
    runtime._components = tiny_runtime._components  # the same loaded models, another profile's defaults
    refs = {f"img{i}": image for i, image in enumerate(pictures(3))}
    return ToolContext(runtime, assets=None, images=DictImages(refs), concepts=ConceptStore(tmp_path))  # type: ignore[arg-type]


def test_the_tool_stores_the_completed_description_and_says_what_it_added(
    tiny_runtime: Runtime, tmp_path: Path
) -> None:
    # A threshold of 0 and one candidate the tiny models must judge: "striped" is added unless it raises the error.
    description = DescriptionConfig(completion_words=[["striped"]], completion_threshold=0.0)
    context = tiny_context(tiny_runtime, tmp_path, description)
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    expected = complete_description(pipeline, clip, pictures(3), "a red square", [["striped"]], description)
    request = CustomizeConceptRequest(name="mine", images=["img0", "img1", "img2"], description="a red square")
    card = customize_concept(request, context)
    assert (card.description, card.completed_with) == (expected.description, expected.added)
    assert context.concept_store().get("mine").description == expected.description

    as_given = customize_concept(
        request.model_copy(update={"name": "as-given", "complete_description": False}), context
    )
    assert (as_given.description, as_given.completed_with) == ("a red square", None)
    no_words = customize_concept(request.model_copy(update={"name": "no-words", "description": None}), context)
    assert (no_words.description, no_words.completed_with) == (None, None)


@pytest.mark.parametrize("completion_words", [[["blue"]], None])
def test_the_tool_reports_progress_through_completion_then_tuning(
    tiny_runtime: Runtime, tmp_path: Path, completion_words: list[list[str]] | None
) -> None:
    # None: the candidates are the CLIP's nearest vocabulary words, which it may first have to embed.
    description = DescriptionConfig(completion_words=completion_words, completion_timesteps=2)
    context = tiny_context(tiny_runtime, tmp_path, description)
    reports: list[tuple[float, float | None, str | None]] = []
    context.progress = Progress(lambda done, total, message: reports.append((done, total, message)))
    request = CustomizeConceptRequest(name="mine", images=["img0", "img1", "img2"], description="a red square")
    customize_concept(request, context)
    fractions = [done / total for done, total, _ in reports if total]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert any("judging" in (message or "") for _, _, message in reports)


def test_a_cancel_during_completion_stores_nothing(tiny_runtime: Runtime, tmp_path: Path) -> None:
    context = tiny_context(
        tiny_runtime, tmp_path, DescriptionConfig(completion_words=[["blue"]], completion_alignment=1)
    )
    context.progress.cancel()
    request = CustomizeConceptRequest(name="mine", images=["img0", "img1", "img2"], description="a red square")
    with pytest.raises(JobCancelledError):
        customize_concept(request, context)
    assert not context.concept_store().exists("mine")
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    for alignment in (0, 1):  # the alignment and the judging each stop at a cancel
        with pytest.raises(JobCancelledError):
            complete_description(
                pipeline,
                clip,
                pictures(3),
                "a red square",
                [["blue"]],
                DescriptionConfig(completion_alignment=alignment),
                progress=context.progress,
            )


def test_a_word_must_explain_most_pictures_not_one_picture_hugely() -> None:
    errors = torch.tensor([[1.0, 1.0, 1.0], [0.5, 1.01, 1.01], [0.9, 0.95, 0.95]])
    gains = relative_gains(errors)
    assert torch.allclose(gains, torch.tensor([0.01, -0.05]))
    # The mean of the errors would have chosen the first word, which fits one picture of three.
    assert int(errors[1:].mean(dim=1).argmin()) == 0 and int(gains.argmin()) == 1


def test_without_a_description_the_generator_writes_one_around_a_noun_or_none(tiny_runtime: Runtime) -> None:
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    groups = [["striped", "solid"], ["red", "blue"], ["square", "circle"]]
    loose = DescriptionConfig(completion_words=groups[:-1], description_nouns=groups[-1], completion_timesteps=2)
    written = describe(pipeline, clip, pictures(3), loose.model_copy(update={"completion_threshold": 0.0}))
    words = written.description.split()
    if words:
        assert words[0] in ("a", "an") and words[-1] in ("square", "circle")
        assert written.added == written.description and set(written.gains) == set(words[1:])
        assert [group for word in words[1:] for group, options in enumerate(groups) if word in options] == sorted(
            group for word in words[1:] for group, options in enumerate(groups) if word in options
        )  # the groups' order
    else:
        assert (written.added, written.gains) == (None, {})
    nothing = describe(pipeline, clip, pictures(3), loose.model_copy(update={"completion_threshold": 0.99}))
    assert (nothing.description, nothing.added, nothing.gains) == ("", None, {})
    assert with_article(["outlined", "red", "square"]) == "an outlined red square" and with_article([]) == ""


def test_the_tool_writes_a_description_only_where_the_profile_names_nouns(
    tiny_runtime: Runtime, tmp_path: Path
) -> None:
    description = DescriptionConfig(
        completion_words=[["red", "blue"]],
        description_nouns=["square", "circle"],
        completion_timesteps=2,
        completion_threshold=0.0,
    )
    context = tiny_context(tiny_runtime, tmp_path, description)
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    expected = describe(pipeline, clip, pictures(3), description)
    request = CustomizeConceptRequest(name="written", images=["img0", "img1", "img2"])
    card = customize_concept(request, context)
    assert (card.description, card.completed_with) == (expected.description or None, expected.added)
    kept = customize_concept(request.model_copy(update={"name": "kept", "complete_description": False}), context)
    assert (kept.description, kept.completed_with) == (None, None)


def test_the_shapes_profile_completes_with_what_the_object_is_never_where_or_how_large() -> None:
    from pictoprompt.models.shapes.scenes import COLOURS, FILLS

    tuning = BUILTIN_PROFILES["shapes"].concept_description
    assert [sorted(group) for group in tuning.completion_words or []] == [sorted(FILLS), sorted(COLOURS)]
    assert tuning.completion_alignment > 0  # its U-Net was trained on a grid of positions
    assert BUILTIN_PROFILES["sd15"].concept_description.completion_words is None
    assert BUILTIN_PROFILES["sd15"].concept_description.completion_alignment == 0
    from pictoprompt.models.shapes.scenes import TRAIN_SHAPES

    assert sorted(tuning.description_nouns or []) == sorted(TRAIN_SHAPES)
    assert BUILTIN_PROFILES["sd15"].concept_description.description_nouns is None  # real profiles write none


@pytest.fixture(scope="module")
def shapes() -> tuple[StableDiffusionPipeline, ClipModel, list[list[str]], int]:
    """The shapes generator and CLIP, with the profile's completion words and alignment."""
    from pictoprompt.models.profiles import get_profile
    from pictoprompt.models.shapes import weights_present

    if not weights_present():
        pytest.skip("the shapes weights are not built yet")
    runtime = Runtime(get_profile("shapes"))
    config = runtime.profile.concept_description
    return runtime.pipeline(), runtime.clip(), config.completion_words or [], config.completion_alignment


def striped_hearts() -> list[Image.Image]:
    from pictoprompt.models.shapes.scenes import Scene, SceneObject, render_scene

    places = [("white", "small", "top left"), ("gray", "large", "right"), ("pink", "small", "bottom")]
    return [
        render_scene(Scene(background, (SceneObject("heart", "green", size, position, "striped"),)))
        for background, size, position in places
    ]


def test_shapes_a_description_gains_the_fill_the_pictures_show(
    shapes: tuple[StableDiffusionPipeline, ClipModel, list[list[str]], int],
) -> None:
    pipeline, clip, words, reach = shapes
    hearts = striped_hearts()
    assert (
        complete_description(
            pipeline, clip, hearts, "a green heart", words, DescriptionConfig(completion_alignment=reach)
        ).added
        == "striped"
    )


@pytest.mark.slow  # four more completions on the shapes set (about 15 s of CPU); the one above stays in `make test`
def test_shapes_alignment_finds_the_fill_off_the_grid_and_the_generator_writes_the_whole_description(
    shapes: tuple[StableDiffusionPipeline, ClipModel, list[list[str]], int],
) -> None:
    pipeline, clip, words, reach = shapes
    hearts = striped_hearts()
    # Off the grid by a pixel or two, the U-Net hardly sees the stripes; moved back onto it, it does again.
    off_grid = [moved(heart, 2, 1) for heart in hearts]
    as_given = complete_description(pipeline, clip, off_grid, "a green heart", words)
    aligned = complete_description(
        pipeline, clip, off_grid, "a green heart", words, DescriptionConfig(completion_alignment=reach)
    )
    assert aligned.added == "striped" and aligned.gains["striped"] < 2 * as_given.gains["striped"] < 0
    # Without a description, the generator writes the whole of it.
    assert describe(pipeline, clip, hearts, BUILTIN_PROFILES["shapes"].concept_description).description == (
        "a striped green heart"
    )


@pytest.mark.slow
def test_shapes_concepts_drawn_with_pil_gain_their_fill(
    shapes: tuple[StableDiffusionPipeline, ClipModel, list[list[str]], int],
) -> None:
    """Drawn with PIL by the benchmarks' `outside_concept`, not by the renderer: three of the concepts of
    `pictoprompt bench concepts --completion` (README: on all 36, what it adds and what it gets wrong)."""
    pipeline, clip, words, reach = shapes
    from lab.benchmarks.harness import outside_concept

    for shape, colour, fill in [
        ("square", "red", "outlined"),
        ("square", "green", "outlined"),
        ("circle", "red", "solid"),
    ]:
        drawn = outside_concept(shape, colour, fill, count=4, seed="completion")
        assert (
            complete_description(
                pipeline, clip, drawn, f"a {colour} {shape}", words, DescriptionConfig(completion_alignment=reach)
            ).added
            == fill
        )
