"""The shapes world is deterministic, keeps its held-out sets out of training, and captions what it draws."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from lab.shapes.oracle import parse_prompt
from lab.shapes.train import scene_batch, training_scenes
from lab.shapes.world import (
    caption_scene,
    held_out_scenes,
    objects_overlap,
    random_free_view,
    random_scene,
    render_free_view,
    shape_twin,
)
from pictoprompt.models.shapes.scenes import (
    HELD_OUT_COMBOS,
    IMAGE_SIZE,
    NOVEL_SHAPE,
    PALETTE,
    TRAIN_SHAPES,
    render_array,
)


def test_same_seed_same_scenes_and_pixels() -> None:
    first = [random_scene(random.Random(7)) for _ in range(3)]
    again = [random_scene(random.Random(7)) for _ in range(3)]
    assert first == again
    assert np.array_equal(render_array(first[0]), render_array(again[0]))
    batch_a, batch_b = scene_batch(3, "unet", 5, 8, detail=0.5), scene_batch(3, "unet", 5, 8, detail=0.5)
    assert batch_a.captions == batch_b.captions and torch.equal(batch_a.pixels, batch_b.pixels)
    assert scene_batch(3, "unet", 6, 8, detail=0.5).captions != batch_a.captions


def test_different_seeds_differ() -> None:
    assert [random_scene(random.Random(1)) for _ in range(5)] != [random_scene(random.Random(2)) for _ in range(5)]


# Every stage that trains on pictures draws them through `training_scenes` (the LLM stage's chats are checked
# in test_shapes_language); these are the stages and batch settings of `TrainConfig`.
TRAINING_DRAWS = [
    ("clip", 0.5),
    ("vae", 0.0),
    ("vae-scale", 0.0),
    ("unet", 0.0),
    ("unet_layout", 0.0),
    ("clip-vision", 0.5),
]


@pytest.mark.parametrize(("stage", "twins"), TRAINING_DRAWS)
def test_training_never_shows_held_out_things_and_respects_the_rules(stage: str, twins: float) -> None:
    counts = {1: 0, 2: 0, 3: 0}
    for step in range(40):
        for scene, _ in training_scenes(0, stage, step, 32, twins):
            counts[len(scene.objects)] += 1
            for i, obj in enumerate(scene.objects):
                assert obj.shape != NOVEL_SHAPE
                assert (obj.colour, obj.shape) not in HELD_OUT_COMBOS
                assert obj.colour != scene.background
                assert all(not objects_overlap(obj, other) for other in scene.objects[i + 1 :])
    assert all(n > 100 for n in counts.values()), counts


def test_the_held_out_rule_check_sees_a_held_out_scene() -> None:
    scene = held_out_scenes("held_out_combos", 1)[0]
    assert (scene.objects[0].colour, scene.objects[0].shape) in HELD_OUT_COMBOS


def test_captions_name_every_object_by_colour_and_shape() -> None:
    for step in range(20):
        for scene, caption_seed in training_scenes(5, "unet", step, 25):
            caption = caption_scene(scene, random.Random(caption_seed), 0.5)
            described = parse_prompt(caption).objects
            assert [(o.colour, o.shape) for o in described] == [(o.colour, o.shape) for o in scene.objects]


def test_held_out_sets_are_fixed_and_of_their_kind() -> None:
    assert held_out_scenes("single", 10) == held_out_scenes("single", 10)
    assert all(len(s.objects) == 1 and not s.is_held_out for s in held_out_scenes("single", 50))
    assert all(len(s.objects) == 2 and not s.is_held_out for s in held_out_scenes("two", 50))
    combos = held_out_scenes("held_out_combos", 50)
    assert all((s.objects[0].colour, s.objects[0].shape) in HELD_OUT_COMBOS for s in combos)
    assert all(s.objects[0].shape == NOVEL_SHAPE for s in held_out_scenes("crescent", 20))


def test_shape_twins_change_one_shape_and_keep_the_rules() -> None:
    rng = random.Random(4)
    for _ in range(500):
        scene = random_scene(rng)
        twin = shape_twin(scene, rng)
        changed = [i for i, (a, b) in enumerate(zip(scene.objects, twin.objects, strict=True)) if a != b]
        assert len(changed) == 1
        before, after = scene.objects[changed[0]], twin.objects[changed[0]]
        assert after.shape != before.shape and not twin.is_held_out and twin.background == scene.background
        assert (after.colour, after.size, after.position) == (before.colour, before.size, before.position)


def test_contrastive_batches_pair_each_twin_with_a_caption_differing_only_in_shape() -> None:
    batch = scene_batch(0, "clip", 7, 16, detail=0.5, twins=0.5)
    pixels, captions = batch.pixels, batch.captions
    assert pixels.shape == (16, 3, IMAGE_SIZE, IMAGE_SIZE) and len(set(captions)) == 16
    assert batch.shapes.shape == (16, 6)
    for caption, labels in zip(captions, batch.shapes, strict=True):
        named = {o.shape for o in parse_prompt(caption).objects}
        assert named == {shape for shape, on in zip(TRAIN_SHAPES, labels.tolist(), strict=True) if on}
    shape_words = {"circle", "square", "triangle", "star", "heart", "cross", "solid", "outlined", "striped"}
    for original, twin in zip(captions[:8], captions[8:], strict=True):
        differing = set(original.split()) ^ set(twin.split())
        assert differing and differing <= shape_words, (original, twin)
        assert not torch.equal(pixels[captions.index(original)], pixels[captions.index(twin)])


def test_the_words_loss_wants_every_word_of_the_caption_and_nothing_else() -> None:
    from lab.shapes.train import caption_words_loss

    start, end = 49406, 49407
    ids = torch.tensor([[start, 5, 6, 5, end, end], [start, 7, end, end, end, end]])
    head = torch.nn.Linear(2, 49408)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-30.0)
        # Pooled state [1, 0] names tokens 5 (twice as often) and 6; [0, 1] names token 7.
        head.weight[5, 0], head.weight[6, 0], head.weight[7, 1] = 30 + math.log(2), 30.0, 30.0
    perfect = caption_words_loss(head, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), ids, end)
    entropy_of_first = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert perfect.item() == pytest.approx(entropy_of_first / 2, abs=1e-4)
    swapped = caption_words_loss(head, torch.tensor([[0.0, 1.0], [1.0, 0.0]]), ids, end)
    assert swapped.item() > perfect.item() + 10


def test_free_views_draw_every_object_inside_the_picture_off_the_grid_in_shifted_colours() -> None:
    rng = random.Random(5)
    for _ in range(40):
        scene = random_scene(rng)
        view = random_free_view(scene, rng)
        picture = render_free_view(scene, view)
        assert picture.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and picture.dtype == np.uint8
        assert np.array_equal(picture, render_free_view(scene, view))
        for obj, place in zip(scene.objects, view.placements, strict=True):
            half = place.extent / 2
            assert 7.0 <= place.extent <= (28.0 if len(scene.objects) == 1 else 18.0)
            assert half <= place.centre[0] <= IMAGE_SIZE - half and half <= place.centre[1] <= IMAGE_SIZE - half
            assert all(abs(shift) <= 16 for shift in place.colour_shift)
            # The object's own colour (shifted) is drawn at its centre for solid objects.
            if obj.fill == "solid":
                x, y = (min(IMAGE_SIZE - 1, int(c)) for c in place.centre)
                drawn = picture[y, x].astype(int)
                expected = np.clip(np.add(PALETTE[obj.colour], place.colour_shift), 0, 255)
                assert np.abs(drawn - expected).max() <= 60, (obj, place)


def test_a_free_view_caption_names_no_size_position_or_relation() -> None:
    rng = random.Random(2)
    for _ in range(60):
        scene = random_scene(rng)
        caption = caption_scene(scene, random.Random(rng.random()), detail=1.0, layout=False)
        parsed = parse_prompt(caption)
        assert [(o.colour, o.shape) for o in parsed.objects] == [(o.colour, o.shape) for o in scene.objects]
        assert all(o.position is None and o.size is None for o in parsed.objects), caption
        assert not any(word in caption for word in ("left of", "right of", "above", "below", "small", "large"))


def test_batches_with_free_views_keep_twins_in_the_same_placements_and_without_views_are_unchanged() -> None:
    grid = scene_batch(0, "clip-views", 4, 16, detail=0.8, twins=0.5)
    rendered = [render_array(scene) for scene, _ in training_scenes(0, "clip-views", 4, 16, twins=0.5)]
    assert torch.equal(grid.pixels, torch.from_numpy(np.stack(rendered)).permute(0, 3, 1, 2).float() / 127.5 - 1.0)
    views = scene_batch(0, "clip-views", 4, 16, detail=0.8, twins=0.5, free_views=1.0)
    assert torch.equal(views.pixels, scene_batch(0, "clip-views", 4, 16, 0.8, 0.5, 1.0).pixels)
    assert torch.equal(views.shapes, grid.shapes)
    for caption in views.captions:
        assert all(o.position is None and o.size is None for o in parse_prompt(caption).objects), caption
    for original, twin in zip(range(8), range(8, 16), strict=True):
        # A twin differs from its original only where the swapped shape is drawn: same placements, same colours.
        changed = (views.pixels[original] != views.pixels[twin]).any(dim=0)
        assert 0 < changed.float().mean() < 0.6
