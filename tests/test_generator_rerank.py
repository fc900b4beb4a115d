"""VGD's generator rerank (ours, `Profile.vgd_rerank`): the decoder's best finished hypotheses, and a one-subject
decode's, reordered by the generator's denoising error on the picture (methods.generator_score)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pictoprompt.configs import GeneratorRerank
from pictoprompt.methods.generator_score import (
    denoising_errors,
    generator_reranked,
    names_several,
    one_subject_vocabulary,
)
from pictoprompt.methods.sd_ipc import ImageToPrompt
from pictoprompt.methods.tuning import encode_latents
from pictoprompt.methods.vgd import ClipVocabulary, Hypothesis, VgdResult, image_targets
from pictoprompt.models.profiles import get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.progress import Progress
from pictoprompt.server.assets import AssetStore, RecordingSink
from pictoprompt.server.images import PreResolvedImages
from pictoprompt.tools.base import ToolContext
from pictoprompt.tools.invert_image import InvertImageRequest, invert_image
from pictoprompt.tools.render import content_inversion

TEXTS = ["a red square", "a blue circle on a white background", "a green star and a red star", "a yellow heart"]


def pictures(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]


def hypothesis(text: str, score: float, finished: bool = True) -> Hypothesis:
    return Hypothesis(text, [1, 2], score, score, score, finished)


def errors_of(runtime: Runtime, images: list[Image.Image], texts: list[str], settings: GeneratorRerank) -> torch.Tensor:
    pipeline, clip = runtime.pipeline(), runtime.clip()
    latents = encode_latents(pipeline, images)
    converter = ImageToPrompt.cached(clip, pipeline)
    return denoising_errors(pipeline, converter, latents, texts, settings.timesteps, settings.seed, Progress())


def test_vgds_best_and_the_one_subject_decodes_best_come_in_the_generators_order(tiny_runtime: Runtime) -> None:
    settings = GeneratorRerank(candidates=2, timesteps=2)
    images = pictures(2)
    result = VgdResult([hypothesis(TEXTS[2], 0.0), hypothesis(TEXTS[3], -1.0)], "red", 5)
    one_subject = VgdResult(
        [
            hypothesis("a green star on a", 1.0, finished=False),  # a fragment cut at the length limit
            hypothesis("a blue circle, a red star", 0.5),  # a comma list names two
            hypothesis(TEXTS[0], 0.0),
            hypothesis(TEXTS[3], -0.5),  # also VGD's: judged once, from the one-subject decode
            hypothesis(TEXTS[1], -1.0),  # beyond the candidates
        ],
        "red",
        4,
    )
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    reranked = generator_reranked(pipeline, clip, images, result, [one_subject], settings)
    judged = [TEXTS[2], TEXTS[0], TEXTS[3]]
    expected = [judged[i] for i in errors_of(tiny_runtime, images, judged, settings).mean(1).argsort().tolist()]
    assert [h.text for h in reranked.hypotheses] == expected
    assert reranked.initial_condition == "red" and reranked.steps == 5


def test_a_weight_of_zero_leaves_that_picture_out_of_the_judgement(tiny_runtime: Runtime) -> None:
    settings = GeneratorRerank(candidates=3, timesteps=2)
    images = pictures(2, seed=3)
    result = VgdResult([hypothesis(TEXTS[2], 0.0)], None, 1)
    one_subject = VgdResult([hypothesis(text, 0.0) for text in (TEXTS[0], TEXTS[1], TEXTS[3])], None, 1)
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    texts = [TEXTS[2], TEXTS[0], TEXTS[1], TEXTS[3]]
    errors = errors_of(tiny_runtime, images, texts, settings)
    for picture in (0, 1):
        weights = [1.0 if i == picture else 0.0 for i in range(2)]
        reranked = generator_reranked(pipeline, clip, images, result, [one_subject], settings, weights)
        assert [h.text for h in reranked.hypotheses] == [texts[i] for i in errors[:, picture].argsort().tolist()]


def test_without_an_alternative_vgds_result_stands() -> None:
    result = VgdResult([hypothesis(TEXTS[2], 0.0), hypothesis(TEXTS[0], -1.0)], None, 1)
    # Nothing to judge: neither the generator nor the pictures are touched.
    assert generator_reranked(None, None, [], result, [], GeneratorRerank()) == result  # type: ignore[arg-type]


def test_a_prompt_names_several_subjects_by_a_joining_word_or_a_comma() -> None:
    settings = GeneratorRerank(joining_words=["and", "above"])
    assert names_several("a red circle And a blue square", settings)
    assert names_several("a red circle above a blue square", settings)
    assert names_several("a red circle, a blue square", settings)
    assert not names_several("a red circle in the top left corner on a sandy background", settings)
    assert not names_several("a red circle and a blue square", GeneratorRerank(joining_words=[]))


def test_the_one_subject_decode_is_written_without_the_joining_words() -> None:
    vocabulary = ClipVocabulary(["red"], torch.ones(1, 4), frozenset({"a", "red", "and", "above", "circle"}))
    settings = GeneratorRerank(joining_words=["And", "above"])
    alternative = one_subject_vocabulary(vocabulary, settings)
    assert alternative is not None and alternative.dictionary == frozenset({"a", "red", "circle"})
    assert alternative.words == vocabulary.words
    assert one_subject_vocabulary(vocabulary, GeneratorRerank(joining_words=[])) is None
    assert one_subject_vocabulary(ClipVocabulary(["red"], torch.ones(1, 4)), settings) is None


def test_the_shapes_set_reranks_and_the_real_sets_keep_the_papers_choice() -> None:
    assert get_profile("shapes").vgd_rerank == GeneratorRerank()
    for name in ("sd15", "sd21", "tiny"):
        assert get_profile(name).vgd_rerank is None


@pytest.fixture
def reranking_context(tiny_runtime: Runtime, tmp_path: Path) -> ToolContext:
    """The tiny set with the rerank on; the tiny set has no dictionary, so no one-subject decode."""
    original = tiny_runtime.profile
    tiny_runtime.profile = original.model_copy(update={"vgd_rerank": GeneratorRerank(candidates=3, timesteps=2)})
    yield ToolContext(tiny_runtime, RecordingSink(AssetStore(tmp_path)), PreResolvedImages({"p": pictures(1)[0]}))
    tiny_runtime.profile = original


def test_without_a_dictionary_invert_image_answers_with_vgds_own_choice(reranking_context: ToolContext) -> None:
    runtime = reranking_context.runtime
    image = reranking_context.images.load("p")
    plain = runtime.profile.model_copy(update={"vgd_rerank": None})
    reranking, runtime.profile = runtime.profile, plain
    try:
        paper = content_inversion(reranking_context, [image], image_targets(runtime.clip(), [image]), 8)
    finally:
        runtime.profile = reranking
    response = invert_image(InvertImageRequest(images=["p"], max_tokens=8, num_results=2), reranking_context)
    assert [p.prompt for p in response.prompts] == [h.text for h in paper.hypotheses[:2]]
