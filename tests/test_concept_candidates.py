"""A concept's candidate check (`ConceptTuningConfig.candidates_per_picture`, ours): of several pictures drawn from
their own noises, the one the CLIP finds closest to the concept is kept, and the reported seed reproduces it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pictoprompt.configs import ConceptTuningConfig
from pictoprompt.methods.concept_description import swapped_descriptions
from pictoprompt.methods.concept_tuning import tune_concept
from pictoprompt.methods.generation import Sample, candidate_seeds, encode_text_prompt, generate, generate_best
from pictoprompt.methods.scoring import weighted_similarity
from pictoprompt.models.concepts import ConceptStore
from pictoprompt.models.runtime import Runtime
from pictoprompt.progress import Progress
from pictoprompt.server.assets import AssetStore
from pictoprompt.tools.base import ToolContext
from pictoprompt.tools.customize_concept import concept_card
from pictoprompt.tools.generate_image import GenerateImageRequest, generate_image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def test_the_judged_candidate_is_kept_and_its_seed_alone_draws_it_again(tiny_runtime: Runtime) -> None:
    pipeline = tiny_runtime.pipeline()
    prompt, negative = encode_text_prompt(pipeline, "a red circle")

    def sample(seeds: list[int]) -> Sample:
        return Sample(prompt, negative, seeds, 7.5, Progress())

    def redness(images: list[Image.Image]) -> list[float]:
        return [float(pixels(image)[..., 0].mean()) for image in images]

    kept = generate_best(pipeline, sample([7, 8]), 2, (32, 32), 3, redness)
    for seed, picture in zip((7, 8), kept, strict=True):
        candidates = generate(pipeline, sample(candidate_seeds(seed, 3)), 2, 32, 32)
        best = candidates[int(np.argmax(redness(candidates)))]
        assert np.abs(pixels(picture) - pixels(best)).max() <= 2
        alone = generate_best(pipeline, sample([seed]), 2, (32, 32), 3, redness)[0]
        assert np.abs(pixels(picture) - pixels(alone)).max() <= 2
    # One candidate is the paper's single draw, and the first candidate of a seed is that seed's own picture.
    single = generate(pipeline, sample([7]), 2, 32, 32)[0]
    assert np.array_equal(pixels(generate_best(pipeline, sample([7]), 2, (32, 32), 1, redness)[0]), pixels(single))
    assert candidate_seeds(7, 3)[0] == 7 and len(set(candidate_seeds(7, 3)) & set(candidate_seeds(8, 3))) == 0


def test_a_concepts_prompt_keeps_the_candidate_closest_to_its_pictures(tiny_runtime: Runtime, tmp_path: Path) -> None:
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    rng = np.random.default_rng(0)
    references = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    tuned = tune_concept(pipeline, clip, references, ConceptTuningConfig(iterations=1, num_prompts=2))

    def draw(candidates: int, prompt: str, timesteps: int = 0) -> list[np.ndarray]:
        tuning = tiny_runtime.profile.concept_tuning.model_copy(
            update={"candidates_per_picture": candidates, "candidate_timesteps": timesteps}
        )
        words = tiny_runtime.profile.concept_description.model_copy(update={"completion_words": [["red", "blue"]]})
        profile = tiny_runtime.profile.model_copy(update={"concept_tuning": tuning, "concept_description": words})
        runtime = Runtime(profile)
        runtime._components = tiny_runtime._components  # the same loaded models, another count of candidates
        store = ConceptStore(tmp_path / f"concepts-{candidates}-{timesteps}")
        card = concept_card("my-star", "concept", tuned, runtime, description="a red square")
        store.save(card, tuned.weights.to_tensors(), references, True)
        assets = AssetStore(tmp_path / f"assets-{candidates}-{timesteps}")
        context = ToolContext(runtime, assets, None, concepts=store)  # type: ignore[arg-type]
        request = GenerateImageRequest(prompt=prompt, concept="my-star", seed=3, num_images=2, steps=2)
        outputs = generate_image(request, context).images
        assert [output.seed for output in outputs] == [3, 4]
        return [pixels(Image.open(output.path)) for output in outputs]

    single, kept = draw(1, "my-star on the left"), draw(3, "my-star on the left")
    assert any(not np.array_equal(one, best) for one, best in zip(single, kept, strict=True))
    with torch.no_grad():
        pictures = clip.encode_image(references)
        for one, best in zip(single, kept, strict=True):
            # The seed's single draw is its first candidate: the kept one is at least as close to the pictures.
            drawn = clip.encode_image([Image.fromarray(best.astype(np.uint8)), Image.fromarray(one.astype(np.uint8))])
            closeness = weighted_similarity(clip, drawn, pictures)
            assert closeness[0] >= closeness[1] - 1e-3
    # With candidate_timesteps the generator judges instead ("a red square" against "a blue square").
    assert any(not np.array_equal(a, b) for a, b in zip(kept, draw(3, "my-star on the left", 2), strict=True))
    # A prompt without the concept's name draws one picture per seed whatever the count.
    assert all(np.array_equal(a, b) for a, b in zip(draw(1, "on the left"), draw(3, "on the left"), strict=True))


def test_the_generator_judges_the_description_against_its_other_fills() -> None:
    fills = [["solid", "outlined", "striped"], ["green", "red"]]
    assert swapped_descriptions("a striped green heart", fills) == ["a solid green heart", "an outlined green heart"]
    assert swapped_descriptions("a green heart", fills) == ["a red heart"]
    assert swapped_descriptions("a heart", fills) == []
