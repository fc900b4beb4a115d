"""The pure helpers of the benchmarks: which captions probe an attribute, the paired gap, the scenes per kind, the
caption grammar's parser, and the pictures drawn outside the project."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from lab.benchmarks.grammar import (
    WORLD_WORDS,
    ParsedCaption,
    ParsedObject,
    ParsedStyle,
    match_parsed,
    named_attributes,
    parse_caption,
    parse_style,
)
from lab.benchmarks.harness import (
    OUTSIDE_N,
    OUTSIDE_SIZES,
    OutsideExample,
    outside_concept,
    outside_picture,
    outside_set,
    scene_set,
)
from lab.benchmarks.sd_ipc import attribute_variants, paired_gap
from lab.benchmarks.vgd import (
    KINDS,
    STYLE_FILLS,
    STYLE_TUNING_SEED,
    scene_scores,
    scenes_of_kind,
    style_leaks,
    style_pairs,
)
from lab.shapes.oracle import nearest_colour
from lab.shapes.world import caption_scene, full_caption, held_out_scenes, plain_caption, random_scene, style_caption
from pictoprompt.models.shapes.scenes import COLOURS, FILLS, PALETTE, POSITIONS, SIZES, TRAIN_SHAPES, Scene, SceneObject


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


# ------------------------------------------------------------------------------------------ the caption grammar


def seeded_scenes(count: int) -> list[Scene]:
    rng = random.Random("grammar-test")
    return [random_scene(rng) for _ in range(count)]


def test_every_caption_of_the_grammar_parses_to_what_it_says() -> None:
    rng = random.Random(1)
    for scene in seeded_scenes(300):
        for detail in (0.0, 0.5, 1.0):
            parsed = parse_caption(caption_scene(scene, rng, detail))
            assert parsed is not None
            assert len(parsed.objects) == len(scene.objects)
            assert parsed.background in (None, scene.background)
            # Captions list the objects in the scene's order; a detail is either left out or right.
            for said, truth in zip(parsed.objects, scene.objects, strict=True):
                assert (said.shape, said.colour) == (truth.shape, truth.colour)
                for attribute in ("size", "fill", "position"):
                    assert getattr(said, attribute) in (None, getattr(truth, attribute))


def test_a_full_caption_names_every_attribute_and_a_plain_one_shape_colour_and_position() -> None:
    for scene in seeded_scenes(100):
        expected = tuple(ParsedObject(o.shape, o.colour, o.size, o.fill, o.position) for o in scene.objects)
        assert parse_caption(full_caption(scene)) == ParsedCaption(expected, scene.background)
        for obj in scene.objects:
            plain = ParsedObject(obj.shape, obj.colour, position=obj.position)
            assert parse_caption(plain_caption(obj)) == ParsedCaption((plain,))
            assert parse_caption(plain_caption(obj, position=False)) == ParsedCaption(
                (ParsedObject(obj.shape, obj.colour),)
            )


def test_the_two_object_form_keeps_its_relation() -> None:
    parsed = parse_caption("a drawing of a small red circle to the left of a striped blue square on a black background")
    assert parsed == ParsedCaption(
        (ParsedObject("circle", "red", size="small"), ParsedObject("square", "blue", fill="striped")),
        "black",
        "to the left of",
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("red circle", ParsedCaption((ParsedObject("circle", "red"),))),
        ("Red circle on a white background.", ParsedCaption((ParsedObject("circle", "red"),), "white")),
        (
            "an orange heart and green star",
            ParsedCaption((ParsedObject("heart", "orange"), ParsedObject("star", "green"))),
        ),
        (
            "a red circle, a blue square and a green star in the top left corner",
            ParsedCaption(
                (
                    ParsedObject("circle", "red"),
                    ParsedObject("square", "blue"),
                    ParsedObject("star", "green", position="top left"),
                )
            ),
        ),
    ],
)
def test_the_documented_leniencies_parse(text: str, expected: ParsedCaption) -> None:
    assert parse_caption(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "shored",
        "circle",
        "To determine the style of the image based on the given conditions, the image must contain at least",
        "The heart is a symbol of dedication and resilience",
        "Triangle, 2022, 02:00:01",
        "To create the diffusion prompt on the given condition containing the objects, people, background",
        "a red circle a red circle",
        "a red circle, a red circle, a red circle",
        "a red circle, a red circle, a red circle and a red circle",
        "a red circle on the left and a blue square on the left",
        "red red circle",
        "a orange circle",
        "a red circle and",
        "a red circle, a blue square",
        "a red circle on a white",
        "a red circle on white background",
        "a red circle on a white background on a white background",
        "a red circle above a blue square in the center",
        "a crimson circle",
        "a red circle!",
        "a red  circle",
        "a beautiful red circle",
        "striped shapes on a black background",
    ],
)
def test_anything_else_does_not_parse(text: str) -> None:
    assert parse_caption(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("striped shapes on a black background", ParsedStyle("striped", None, "black")),
        ("outlined red shapes", ParsedStyle("outlined", "red", None)),
        ("solid shapes on a white background", ParsedStyle("solid", None, "white")),
        ("shapes on an orange background", ParsedStyle(None, None, "orange")),
        ("Blue shapes.", ParsedStyle(None, "blue", None)),
    ],
)
def test_style_prompts_parse(text: str, expected: ParsedStyle) -> None:
    assert parse_style(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "shapes",
        "red striped shapes",
        "striped shape",
        "a red circle on a white background",
        "a cross with a white cross-section is a painting style that is based o",
        "striped shapes on a black background in the style of",
    ],
)
def test_other_style_texts_do_not_parse(text: str) -> None:
    assert parse_style(text) is None


def test_every_style_caption_parses_to_the_scene_style() -> None:
    rng = random.Random(2)
    for scene in seeded_scenes(300):
        parsed = parse_style(style_caption(scene, rng, rng.random()))
        assert parsed is not None
        assert parsed.fill in (None, *{o.fill for o in scene.objects})
        assert parsed.colour in (None, *{o.colour for o in scene.objects})
        assert parsed.background in (None, scene.background)


def test_the_world_words_are_the_grammars_and_nothing_else() -> None:
    assert {
        *COLOURS,
        *TRAIN_SHAPES,
        *SIZES,
        *FILLS,
        "background",
        "corner",
        "middle",
        "picture",
        "above",
    } <= WORLD_WORDS
    assert not {"shored", "nephro", "adjec", "prompt", "style"} & WORLD_WORDS


# ------------------------------------------------------------------------------------------------ scoring by parsing


def test_a_shape_word_inside_a_ramble_names_nothing() -> None:
    scene = Scene("white", (SceneObject("heart", "red"),))
    text = "The heart is a symbol of dedication, red and white"
    assert named_attributes(parse_caption(text), scene.objects, scene.background, ("colour", "shape")) == {
        "colour": 0.0,
        "shape": 0.0,
        "background": 0.0,
    }


def test_named_attributes_pair_objects_whatever_their_order_in_the_prompt() -> None:
    scene = Scene(
        "white", (SceneObject("circle", "red", "small", "left"), SceneObject("star", "blue", "large", "right"))
    )
    parsed = parse_caption("a blue star on the right and a red square on the left")
    scores = named_attributes(parsed, scene.objects, scene.background, ("colour", "shape", "size", "position"))
    assert scores == {"colour": 1.0, "shape": 0.5, "size": 0.0, "position": 1.0, "background": 0.0}


def test_pairing_is_the_best_one_not_the_first_greedy_match() -> None:
    truth = [SceneObject("circle", "red"), SceneObject("square", "red")]
    # Greedily the first prompt object ("red square", one attribute in common with the circle) would take the
    # circle; the best pairing gives each its own shape.
    parsed = [ParsedObject("square", "red"), ParsedObject("circle", "blue")]
    assert match_parsed(truth, parsed, ("colour", "shape")) == [parsed[1], parsed[0]]


def test_an_object_the_prompt_leaves_out_has_no_partner() -> None:
    truth = [SceneObject("circle", "red"), SceneObject("square", "blue")]
    assert match_parsed(truth, [ParsedObject("square", "blue")], ("colour", "shape")) == [
        None,
        ParsedObject("square", "blue"),
    ]


# ---------------------------------------------------------------------------------------------- pictures from outside


@pytest.fixture(scope="module")
def outside() -> list[OutsideExample]:
    return outside_set(OUTSIDE_N)


def test_the_outside_set_is_fixed_and_has_every_kind_of_picture(outside: list[OutsideExample]) -> None:
    assert len(outside) >= 60
    again = outside_set(OUTSIDE_N)
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(outside, again, strict=True))
    assert np.array_equal(np.asarray(outside_picture(7).image), np.asarray(outside[7].image))
    assert {ex.image.size for ex in outside} == set(OUTSIDE_SIZES)
    assert {(64, 64), (128, 128)} <= set(OUTSIDE_SIZES)
    assert any(w != h for w, h in OUTSIDE_SIZES)
    assert {ex.image.mode for ex in outside} == {"RGB", "RGBA"}
    assert {len(ex.objects) for ex in outside} == {1, 2}
    drawn = [obj for ex in outside for obj in ex.objects]
    assert {obj.shape for obj in drawn} == set(TRAIN_SHAPES)
    assert {obj.fill for obj in drawn} == set(FILLS)
    assert len({obj.colour for obj in drawn}) >= 8
    # Not the world's 3x3 grid: object centres are anywhere.
    assert len({(round(x), round(y)) for x, y in (obj.centre for obj in drawn)}) > 40


def test_an_outside_concept_is_one_object_drawn_anew_in_each_picture() -> None:
    pictures = outside_concept("heart", "green", "striped", count=4, seed="test")
    assert [picture.size for picture in pictures] == list(OUTSIDE_SIZES[:4])
    assert all(picture.mode == "RGB" for picture in pictures)
    again = outside_concept("heart", "green", "striped", count=4, seed="test")
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(pictures, again, strict=True))
    other = outside_concept("heart", "green", "striped", count=4, seed="other")
    assert not np.array_equal(np.asarray(pictures[0]), np.asarray(other[0]))
    for picture in pictures:
        pixels = np.asarray(picture).astype(np.float32).reshape(-1, 3)
        colours = {nearest_colour(pixel) for pixel in pixels[:: max(1, len(pixels) // 400)]}
        assert "green" in colours and len(colours - {"green"}) >= 1  # the object on a background of another colour


def test_a_transparent_picture_is_transparent_around_its_objects_and_flattens_onto_white(
    outside: list[OutsideExample],
) -> None:
    for ex in (ex for ex in outside if ex.image.mode == "RGBA"):
        alpha = np.asarray(ex.image)[..., 3]
        assert alpha[0, 0] == 0 and alpha.max() == 255
        assert ex.background == "white"
        assert ex.flat.mode == "RGB" and ex.flat.getpixel((0, 0)) == (255, 255, 255)


def _pixel_colour(pixels: np.ndarray, x: float, y: float) -> str:
    return nearest_colour(pixels[int(y), int(x)].astype(np.float32))


def test_each_drawn_object_has_its_colour_and_stays_in_its_place(outside: list[OutsideExample]) -> None:
    for ex in outside:
        pixels = np.asarray(ex.flat).astype(np.float32)
        background = np.asarray(PALETTE[ex.background], dtype=np.float32)
        foreground = np.linalg.norm(pixels - background, axis=-1) > 40
        yy, xx = np.mgrid[0 : pixels.shape[0], 0 : pixels.shape[1]]
        near_any = np.zeros_like(foreground)
        for obj in ex.objects:
            (cx, cy), r = obj.centre, obj.radius
            near = (np.abs(xx + 0.5 - cx) <= r + 1) & (np.abs(yy + 0.5 - cy) <= r + 1)
            near_any |= near
            mine = foreground & near
            # The pixels most unlike the background are the object's own colour, jitter and antialiasing aside.
            distance = np.linalg.norm(pixels[mine] - background, axis=-1)
            core = pixels[mine][distance >= np.quantile(distance, 0.5)]
            assert nearest_colour(np.median(core, axis=0)) == obj.colour, (ex.image.size, obj)
            assert mine.sum() >= 0.1 * r * r
        # Nothing is drawn outside the objects' extents.
        assert not (foreground & ~near_any).any()


# Points of each shape in its unit frame (half-extent 1, y down): inside (True) or outside (False) it.
SHAPE_PROBES = {
    "circle": [((0.0, 0.0), True), ((0.55, 0.55), True), ((0.85, 0.85), False)],
    "square": [((0.65, 0.65), True), ((-0.65, -0.65), True), ((0.0, 0.97), False)],
    "triangle": [((0.0, 0.5), True), ((-0.75, 0.7), True), ((-0.7, -0.5), False), ((0.7, -0.5), False)],
    "star": [((0.0, 0.1), True), ((0.0, -0.75), True), ((0.0, 0.8), False), ((-0.8, -0.6), False)],
    "cross": [
        ((0.0, 0.0), True),
        ((0.85, 0.0), True),
        ((0.0, -0.85), True),
        ((0.7, 0.7), False),
        ((-0.7, -0.7), False),
    ],
    "heart": [
        ((0.0, 0.3), True),
        ((0.45, -0.35), True),
        ((-0.45, -0.35), True),
        ((0.0, -0.85), False),
        ((0.8, 0.7), False),
    ],
}


def test_each_solid_object_has_the_shape_of_its_label(outside: list[OutsideExample]) -> None:
    checked = set()
    for ex in outside:
        pixels = np.asarray(ex.flat)
        for obj in (o for o in ex.objects if o.fill == "solid"):
            for (x, y), inside in SHAPE_PROBES[obj.shape]:
                colour = _pixel_colour(pixels, obj.centre[0] + x * obj.radius, obj.centre[1] + y * obj.radius)
                assert colour == (obj.colour if inside else ex.background), (ex.image.size, obj, (x, y))
            checked.add(obj.shape)
    assert checked == set(TRAIN_SHAPES)


# ---------------------------------------------------------------------------------------------- style pairs


def test_style_pairs_share_exactly_the_named_property_and_differ_in_shape_and_colour() -> None:
    pairs = style_pairs(12)
    assert len(pairs) == 12
    assert {p.shared for p in pairs} == {"fill", "background"}
    assert {p.value for p in pairs if p.shared == "fill"} == set(STYLE_FILLS)
    held_out = set(held_out_scenes("single", 600))
    for pair in pairs:
        (a, b), ((x,), (y,)) = pair.scenes, (s.objects for s in pair.scenes)
        assert {a, b} <= held_out
        assert x.shape != y.shape and x.colour != y.colour
        assert (x.fill == y.fill == pair.value) == (pair.shared == "fill")
        assert (a.background == b.background == pair.value) == (pair.shared == "background")


def test_tuning_style_pairs_are_other_scenes_than_the_evaluated_ones() -> None:
    evaluated = {scene for pair in style_pairs(12) for scene in pair.scenes}
    tuning = {scene for pair in style_pairs(12, STYLE_TUNING_SEED) for scene in pair.scenes}
    assert len(tuning) == 24 and not evaluated & tuning


def test_style_leaks_count_a_shape_an_own_colour_and_a_place_but_not_the_shared_look() -> None:
    pairs = style_pairs(12)
    fill = next(pair for pair in pairs if pair.shared == "fill")
    background = next(pair for pair in pairs if pair.shared == "background")
    (x,), (y,) = (scene.objects for scene in fill.scenes)
    clean = {"names a shape": False, "names an own colour": False, "names a place": False}
    assert style_leaks(f"{fill.value} shapes", fill) == clean
    assert style_leaks(f"shapes on a {background.value} background", background) == clean
    assert style_leaks(f"{fill.value} {x.colour} {y.shape}s at the top left", fill) == dict.fromkeys(clean, True)
    assert style_leaks(f"{fill.value} shapes on a {fill.scenes[1].background} background", fill)["names an own colour"]


def test_a_prompt_inventing_an_object_names_the_true_one_but_has_the_wrong_count() -> None:
    example = scene_set("single", 1)[0]
    invented = example.caption.replace(" on a", " and a blue star on a", 1)
    assert scene_scores(example.caption, example.image, example)["right count"] == 1.0
    scores = scene_scores(invented, example.image, example)
    assert scores["parse %"] == 1.0 and scores["named shape"] == 1.0 and scores["right count"] == 0.0
    assert scene_scores("a picture of something", example.image, example)["right count"] == 0.0
