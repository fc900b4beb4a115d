"""The domain benchmark's scene sets (`lab/benchmarks/domain.py`): what the domain holds, and the training set."""

from __future__ import annotations

from pathlib import Path

from lab.benchmarks.domain import (
    STRIPED_ON_DARK,
    class_caption,
    domain_scenes,
    outside_scenes,
    split,
    write_training_set,
)
from lab.benchmarks.grammar import parse_caption
from pictoprompt.models.shapes.scenes import Scene, SceneObject, render_scene
from pictoprompt.tools.customize_concept import read_captions


def test_the_domain_is_striped_single_objects_on_dark_backgrounds():
    striped = SceneObject("heart", "red", "small", "left", "striped")
    assert STRIPED_ON_DARK.contains(Scene("black", (striped,)))
    assert not STRIPED_ON_DARK.contains(Scene("white", (striped,)))
    assert not STRIPED_ON_DARK.contains(Scene("black", (SceneObject("heart", "red", "small", "left", "solid"),)))
    assert not STRIPED_ON_DARK.contains(Scene("black", (SceneObject("star", "red"),)))
    assert not STRIPED_ON_DARK.contains(Scene("gray", (striped, SceneObject("circle", "blue", "small", "right"))))


def test_every_domain_scene_is_one_the_world_may_train_on():
    scenes = STRIPED_ON_DARK.scenes()
    assert len(set(scenes)) == len(scenes)
    assert all(STRIPED_ON_DARK.contains(scene) for scene in scenes)
    assert not any(scene.is_held_out for scene in scenes)
    assert all(scene.objects[0].colour != scene.background for scene in scenes)


def test_training_scenes_are_distinct_fixed_and_never_evaluated():
    training = domain_scenes(STRIPED_ON_DARK, "training", 500)
    assert len(set(training)) == 500
    assert training == domain_scenes(STRIPED_ON_DARK, "training", 500)
    assert training[:20] == domain_scenes(STRIPED_ON_DARK, "training", 20)
    assert {split(scene) for scene in training} == {"training"}
    evaluation = domain_scenes(STRIPED_ON_DARK, "evaluation", 40)
    assert not set(training) & set(evaluation)
    assert {split(scene) for scene in evaluation} == {"evaluation"}


def test_outside_scenes_are_not_in_the_domain():
    scenes = outside_scenes(STRIPED_ON_DARK, 40)
    assert len(scenes) == 40
    assert not any(STRIPED_ON_DARK.contains(scene) for scene in scenes)


def test_the_training_set_is_what_train_domain_reads(tmp_path: Path):
    scenes = domain_scenes(STRIPED_ON_DARK, "training", 4)
    images, captions, classes = read_captions(tmp_path, write_training_set(scenes, tmp_path))
    assert [image.tobytes() for image in images] == [render_scene(scene).tobytes() for scene in scenes]
    assert all(f"{s.objects[0].colour} {s.objects[0].shape}" in c for s, c in zip(scenes, captions, strict=True))
    assert classes is None


def test_class_captions_name_the_four_kept_attributes_and_ab_targets_carry_the_class(tmp_path: Path):
    scenes = domain_scenes(STRIPED_ON_DARK, "training", 6)
    _, captions, classes = read_captions(
        tmp_path, write_training_set(scenes, tmp_path, ab_targets=True, captions="class")
    )
    assert captions == [class_caption(scene) for scene in scenes]
    for scene, caption, scene_class in zip(scenes, captions, classes, strict=True):
        (parsed,) = parse_caption(caption).objects
        obj = scene.objects[0]
        assert (parsed.colour, parsed.shape, parsed.fill) == (obj.colour, obj.shape, "striped")
        assert caption.endswith(f"on a {scene.background} background")
        assert scene_class == f"{obj.colour} striped {obj.shape} on {scene.background}"
