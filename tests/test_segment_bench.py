"""The segmentation benchmark's ground truth, baselines and word pairing (`lab/benchmarks/segment.py`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from lab.benchmarks.segment import (
    Case,
    colour_threshold,
    discrimination,
    drawn_caption,
    iou,
    object_mask,
    outside_cases,
    scene_cases,
    shape_word_scores,
    whole_picture,
)
from pictoprompt.models.shapes.scenes import Scene, SceneObject, object_alpha, render_scene


def test_the_ground_truth_is_the_solid_silhouette_of_the_object_alone():
    outlined = SceneObject("circle", "red", "large", "center", "outlined")
    square = SceneObject("square", "blue", "small", "top left")
    scene = Scene("white", (outlined, square))
    truth = object_mask(scene, outlined)
    assert np.array_equal(truth, object_alpha("circle", "large", "solid") > 0.5)
    assert not (truth & object_mask(scene, square)).any()


def test_baselines_read_no_prompt():
    scene = Scene("black", (SceneObject("heart", "yellow", "large", "center"),))
    image = render_scene(scene)
    truth = object_mask(scene, scene.objects[0])
    assert iou(colour_threshold(image), truth) > 0.9
    assert iou(whole_picture(image), truth) == truth.mean()
    assert iou(None, truth) == 0.0


def test_objects_pair_with_their_shape_words_in_order_and_unnamed_ones_score_zero():
    first = SceneObject("circle", "red", "large", "top left")
    second = SceneObject("circle", "blue", "large", "bottom right")
    scene = Scene("white", (first, second))
    truths = (object_mask(scene, first), object_mask(scene, second))
    masks = {1: truths[0], 4: truths[1]}
    words = ["a", "circle", "and", "a", "circle"]
    assert shape_word_scores(("circle", "circle"), truths, masks.get, words) == [1.0, 1.0]
    assert shape_word_scores(("circle", "circle"), truths, masks.get, ["a", "circle"]) == [1.0, 0.0]


def test_cases_carry_a_silhouette_per_object_at_the_pictures_size():
    (scene,) = scene_cases("two", 1, 5)
    assert len(scene.shapes) == len(scene.truths) == 2 and scene.truths[0].shape == (32, 32)
    assert scene.short.count(" and ") == 1 and all(shape in scene.caption for shape in scene.shapes)
    drawn = outside_cases("outside two", 3, 5)
    for case in drawn:
        assert len(case.shapes) == 2
        for truth in case.truths:
            assert truth.shape == (case.image.height, case.image.width) and 0 < truth.mean() < 0.5
        assert not (case.truths[0] & case.truths[1]).any(), "drawn objects are apart"
        assert case.caption.endswith("background") and case.caption.count(" and ") == 1
    assert [len(case.shapes) for case in outside_cases("outside single", 3, 5)] == [1, 1, 1]


def test_a_drawn_caption_names_fill_colour_and_shape():
    caption = drawn_caption([("outlined", "orange", "heart"), ("solid", "red", "star")], "white")
    assert caption == "an outlined orange heart and a solid red star on a white background"


@dataclass
class Found:
    """What `discrimination` reads of a segment."""

    word: str
    mask: np.ndarray

    @property
    def score(self) -> np.ndarray:
        return self.mask.astype(float)


def test_discrimination_reads_the_map_and_the_mask_on_each_object():
    scene = Scene(
        "white", (SceneObject("circle", "red", "large", "left"), SceneObject("square", "blue", "large", "right"))
    )
    own, other = object_mask(scene, scene.objects[0]), object_mask(scene, scene.objects[1])
    case = Case(render_scene(scene), "", ("circle", "square"), (own, other), ("red", "blue"))
    circle, square = discrimination(case, [Found("circle", own), Found("square", own | other)])
    assert circle == (1.0, 0.0, 1.0, 0.0)
    share = own.sum() / (own | other).sum()
    # The square's map and mask cover both objects: as much on the circle as on its own square.
    assert square == pytest.approx((1.0, 1.0, 1 - share, share))
