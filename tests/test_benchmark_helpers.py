"""The pure helpers of the benchmarks: which captions probe an attribute, the paired gap, the scenes per kind."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from sd_ipc import attribute_variants, paired_gap
from vgd import KINDS, scenes_of_kind

from pictoprompt.models.shapes.scenes import (
    COLOURS,
    FILLS,
    POSITIONS,
    SIZES,
    TRAIN_SHAPES,
    Scene,
    SceneObject,
    full_caption,
)


def one_object(shape: str, fill: str) -> Scene:
    return Scene(background="white", objects=(SceneObject(shape, "red", "large", "top left", fill),))


@pytest.mark.parametrize(
    ("attribute", "values", "true_value"),
    [("shape", TRAIN_SHAPES, "circle"), ("colour", COLOURS, "red"), ("fill", FILLS, "solid"), ("size", SIZES, "large")],
)
def test_variants_swap_exactly_the_attribute_word(attribute: str, values: tuple[str, ...], true_value: str) -> None:
    scene = one_object("circle", "solid")
    captions, truth = attribute_variants(scene, attribute)
    true_caption = full_caption(scene)
    assert captions == [true_caption.replace(f" {true_value} ", f" {value} ") for value in values]
    assert captions[truth] == true_caption


def test_position_variants_keep_the_object_and_background_words() -> None:
    scene = one_object("circle", "solid")
    captions, truth = attribute_variants(scene, "position")
    assert len(set(captions)) == len(POSITIONS)
    assert captions[truth] == full_caption(scene)
    assert all(c.startswith("a large solid red circle ") and c.endswith(" on a white background") for c in captions)


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


@pytest.mark.parametrize(("n", "expected"), [(200, [67, 67, 66]), (198, [66, 66, 66]), (4, [2, 1, 1])])
def test_vgd_splits_its_scenes_exactly_over_the_kinds(n: int, expected: list[int]) -> None:
    assert [scenes_of_kind(n, kind) for kind in KINDS] == expected
    assert sum(expected) == n
