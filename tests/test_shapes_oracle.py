"""The oracle reads rendered scenes (>= 98% per attribute), tolerates blur and colour drift, and reads prompts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from lab.shapes.oracle import ATTRIBUTES, PromptObject, parse_prompt, parse_scene, score_reading
from lab.shapes.world import held_out_scenes
from pictoprompt.models.shapes.scenes import Scene, SceneObject, render_scene


def _accuracy(scenes: list[Scene]) -> dict[str, float]:
    results = [score_reading(parse_scene(render_scene(s)), s) for s in scenes]
    return {key: float(np.mean([r[key] for r in results])) for key in results[0]}


@pytest.mark.parametrize("kind", ["single", "held_out_combos", "crescent"])
def test_reads_single_object_scenes(kind: str) -> None:
    accuracy = _accuracy(held_out_scenes(kind, 200, seed=11))
    assert all(value >= 0.98 for value in accuracy.values()), accuracy


def test_reads_two_object_scenes() -> None:
    accuracy = _accuracy(held_out_scenes("two", 100, seed=11))
    assert all(value >= 0.95 for value in accuracy.values()), accuracy


def test_tolerates_blur_colour_drift_and_other_sizes() -> None:
    rng = np.random.default_rng(0)
    right = {"colour": 0, "shape": 0, "position": 0}
    scenes = held_out_scenes("single", 100, seed=12)
    for scene in scenes:
        image = render_scene(scene).filter(ImageFilter.GaussianBlur(0.6))
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, 3) + rng.normal(0, 4, (32, 32, 3))
        drifted = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).resize((64, 64), Image.BICUBIC)
        reading = parse_scene(drifted).main
        assert reading is not None
        for attribute in right:
            right[attribute] += getattr(reading, attribute) == getattr(scene.objects[0], attribute)
    assert right["colour"] >= 95 and right["position"] >= 95 and right["shape"] >= 85, right


def test_empty_picture_has_no_objects() -> None:
    reading = parse_scene(render_scene(Scene("white", ())))
    assert reading.background == "white" and reading.main is None


def test_prompt_parser_reads_synonyms_and_several_objects() -> None:
    one = parse_prompt("A big hollow grey heart in the upper-left corner on a black backdrop")
    assert one.background == "black"
    (heart,) = one.objects
    assert (heart.shape, heart.colour, heart.size, heart.fill, heart.position) == (
        "heart",
        "gray",
        "large",
        "outlined",
        "top left",
    )
    two = parse_prompt("a green star to the left of a tiny striped yellow circle in the centre")
    assert [(o.colour, o.shape) for o in two.objects] == [("green", "star"), ("yellow", "circle")]
    assert two.objects[0].position is None  # a relation, not a place
    assert (two.objects[1].size, two.objects[1].fill, two.objects[1].position) == ("small", "striped", "center")
    assert parse_prompt("a drawing").objects == []
    assert parse_prompt('Premise: "ORANGE"').objects == [PromptObject(colour="orange")]
    shapeless = parse_prompt("a large striped green thing on the left on a white background")
    assert shapeless.objects == [PromptObject(colour="green", size="large", position="left", fill="striped")]
    assert shapeless.background == "white"


def test_prompt_parser_matches_ground_truth_of_full_captions() -> None:
    from lab.shapes.world import full_caption

    for scene in held_out_scenes("two", 50, seed=3):
        reading = parse_prompt(full_caption(scene))
        assert reading.background == scene.background
        for said, truth in zip(reading.objects, scene.objects, strict=True):
            assert all(getattr(said, a) == getattr(truth, a) for a in ATTRIBUTES)


def test_reading_names_the_object_it_sees() -> None:
    scene = Scene("white", (SceneObject("star", "red", "large", "bottom right"),))
    reading = parse_scene(render_scene(scene))
    assert reading.main is not None and reading.main.as_object() == scene.objects[0]
