"""The segmentation benchmark's ground truth, baselines and word pairing (`benchmarks/segment.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from segment import colour_threshold, iou, object_mask, shape_word_scores, whole_picture

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
    masks = {1: object_mask(scene, first), 4: object_mask(scene, second)}
    words = ["a", "circle", "and", "a", "circle"]
    assert shape_word_scores(scene, lambda obj, i: masks[i], words) == [1.0, 1.0]
    assert shape_word_scores(scene, lambda obj, i: masks[i], ["a", "circle"]) == [1.0, 0.0]
