"""The pure helpers of the SD-IPC benchmark: which captions probe an attribute, and the paired gap."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from sd_ipc import attribute_variants, paired_gap

from pictoprompt.models.shapes.scenes import (
    COLOURS,
    POSITIONS,
    TRAIN_SHAPES,
    Scene,
    SceneObject,
    full_caption,
)


def one_object(shape: str, fill: str) -> Scene:
    return Scene(background="white", objects=(SceneObject(shape, "red", "large", "top left", fill),))


@pytest.mark.parametrize(
    ("attribute", "count"),
    [("shape", len(TRAIN_SHAPES)), ("colour", len(COLOURS)), ("position", len(POSITIONS)), ("fill", 3)],
)
def test_variants_differ_from_the_true_caption_in_that_attribute_only(attribute: str, count: int) -> None:
    scene = one_object("circle", "solid")
    captions, truth = attribute_variants(scene, attribute)
    assert len(captions) == len(set(captions)) == count
    assert captions[truth] == full_caption(scene)
    true_words = full_caption(scene).split()
    for caption in captions:
        changed = [w for w in caption.split() if w not in true_words]
        assert len(changed) <= 3  # a position phrase is up to three words; every other value is one word


def test_an_outlined_object_is_not_offered_a_shape_that_can_only_be_solid() -> None:
    captions, truth = attribute_variants(one_object("circle", "outlined"), "shape")
    assert len(captions) == len(TRAIN_SHAPES) - 1
    assert not any(" star " in c for c in captions)
    assert " circle " in captions[truth]


def test_a_thin_shape_has_no_fill_to_probe() -> None:
    assert attribute_variants(one_object("star", "solid"), "fill") is None
    captions, _ = attribute_variants(one_object("star", "solid"), "shape")
    assert len(captions) == len(TRAIN_SHAPES)


def test_paired_gap_is_the_mean_difference_in_points_with_its_standard_error() -> None:
    truth = [{"shape": 1.0}, {"shape": 1.0}, {"shape": 0.0}, {"shape": 1.0}]
    method = [{"shape": 0.5}, {"shape": 1.0}, {"shape": 0.0}, {"shape": 0.0}]
    gap, error = paired_gap(truth, method, "shape")
    assert gap == pytest.approx(-37.5)
    differences = [-50.0, 0.0, 0.0, -100.0]
    mean = sum(differences) / 4
    assert error == pytest.approx(math.sqrt(sum((d - mean) ** 2 for d in differences) / 3) / 2)


def test_paired_gap_of_one_scene_has_no_standard_error() -> None:
    gap, error = paired_gap([{"colour": 1.0}], [{"colour": 0.0}], "colour")
    assert gap == -100.0
    assert math.isnan(error)
