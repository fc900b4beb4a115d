"""What the prompt tools write on the bundled `shapes` set, for pictures the project did not render.

The pictures are drawn here with PIL at other sizes, aspects, positions and line widths (one with a transparent
background); a prompt must be a sentence of the world's language, never noise words, and name what is drawn.
"""

from __future__ import annotations

import re

import pytest
from PIL import Image, ImageDraw

from lab.shapes.world import LEXICON_FUNCTION_WORDS, caption_lexicon
from pictoprompt.models.profiles import get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.models.shapes import weights_present
from pictoprompt.models.shapes.scenes import PALETTE
from pictoprompt.server.images import PreResolvedImages
from pictoprompt.tools.base import SavedImage, ToolContext
from pictoprompt.tools.fuse_concepts import FuseConceptsRequest, fuse_concepts
from pictoprompt.tools.invert_image import InvertImageRequest, invert_image

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not weights_present(), reason="shapes weights absent"),
]

WORLD_WORDS = set(caption_lexicon()) | LEXICON_FUNCTION_WORDS | {"shapes"}


def drawn_pictures() -> dict[str, Image.Image]:
    """Drawn with PIL, not with the project's renderer: off-grid, at 128, 96x64 and 64 px, one with alpha."""
    circle = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    ImageDraw.Draw(circle).ellipse((20, 30, 76, 86), fill=(*PALETTE["red"], 255))
    square = Image.new("RGB", (96, 64), PALETTE["white"])
    ImageDraw.Draw(square).rectangle((30, 12, 66, 48), fill=PALETTE["blue"])
    triangle = Image.new("RGB", (64, 64), PALETTE["black"])
    ImageDraw.Draw(triangle).polygon([(40, 10), (60, 50), (20, 50)], fill=PALETTE["green"])
    star = Image.new("RGB", (64, 64), PALETTE["white"])
    points = [(32, 6), (38, 24), (58, 24), (42, 36), (48, 56), (32, 44), (16, 56), (22, 36), (6, 24), (26, 24)]
    ImageDraw.Draw(star).polygon(points, fill=PALETTE["yellow"])
    # The server flattens transparency onto white before a tool sees a picture.
    flat = Image.new("RGB", circle.size, (255, 255, 255))
    flat.paste(circle, mask=circle.getchannel("A"))
    return {"red circle": flat, "blue square": square, "green triangle": triangle, "yellow star": star}


class NoAssets:
    def save(self, image: Image.Image, metadata: dict[str, str]) -> SavedImage:
        raise AssertionError("prompt tools asked not to generate must not save images")


@pytest.fixture(scope="module")
def context() -> ToolContext:
    return ToolContext(Runtime(get_profile("shapes")), NoAssets(), PreResolvedImages(drawn_pictures()))


def words(prompt: str) -> list[str]:
    return re.findall(r"[a-z]+", prompt.lower())


def test_inverted_prompts_are_the_worlds_captions_and_name_what_is_drawn(context: ToolContext) -> None:
    named = 0
    for name in drawn_pictures():
        response = invert_image(InvertImageRequest(images=[name], num_results=2), context)
        top = response.prompts[0].prompt
        assert response.initial_condition in caption_lexicon()
        assert set(words(top)) <= WORLD_WORDS, f"{name}: {top!r} has words the world does not"
        assert response.llm_note is None
        colour, shape = name.split()
        assert colour in words(top), f"{name}: {top!r}"
        named += shape in words(top)
    assert named >= 3


def test_a_fused_prompt_names_both_pictures_objects_in_one_sentence(context: ToolContext) -> None:
    response = fuse_concepts(FuseConceptsRequest(images=["red circle", "yellow star"], generate=False), context)
    assert response.strategy == "merge" and len(response.parts) == 2
    assert set(words(response.prompt)) <= WORLD_WORDS, response.prompt
    assert {"red", "circle", "yellow", "star"} <= set(words(response.prompt)), response.prompt
    assert len(response.clip_similarity) == 2 and response.llm_note is None


def test_a_joint_prompt_is_written_in_the_worlds_words(context: ToolContext) -> None:
    """Only the language is held here: a joint prompt often names one picture's object, not both
    (`pictoprompt bench vgd`, fuse table)."""
    request = FuseConceptsRequest(images=["red circle", "yellow star"], strategy="joint", generate=False)
    response = fuse_concepts(request, context)
    assert set(words(response.prompt)) <= WORLD_WORDS, response.prompt


def test_concat_fusion_names_each_picture_in_one_list(context: ToolContext) -> None:
    request = FuseConceptsRequest(images=["red circle", "yellow star"], strategy="concat", generate=False)
    response = fuse_concepts(request, context)
    first, second = response.parts
    assert response.prompt == f"{first} and {second}"
    assert {"red", "circle", "yellow", "star"} <= set(words(response.prompt)), response.prompt


def test_a_style_prompt_names_the_shared_background(context: ToolContext) -> None:
    response = invert_image(InvertImageRequest(images=["blue square", "yellow star"], focus="style"), context)
    style = response.prompts[0]
    assert set(words(style.prompt)) <= WORLD_WORDS, style.prompt
    assert "white" in words(style.prompt), style.prompt
    assert style.apply_style_as == f"{{subject}} in the style of {style.prompt}"
