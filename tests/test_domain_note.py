"""`domain_note`: a photo on the bundled `shapes` set is said to be outside its world; its own pictures and pictures
drawn with PIL are not; a profile without a domain check (real models) never adds a note."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from pictoprompt.methods.domain import domain_note, flat_coverage
from pictoprompt.models.profiles import BUILTIN_PROFILES, get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.server.images import PreResolvedImages
from pictoprompt.tools.base import SavedImage, ToolContext
from pictoprompt.tools.vary_image import VaryImageRequest, vary_image


@pytest.fixture(scope="module")
def shapes() -> Runtime:
    from pictoprompt.models.shapes import weights_present

    if not weights_present():
        pytest.skip("the shapes weights are not built yet")
    return Runtime(get_profile("shapes"))


def photo() -> Image.Image:
    """scikit-image's coffee cup, longest side 256 px, as a user would drop it in."""
    data = pytest.importorskip("skimage.data")
    return Image.fromarray(data.coffee()).resize((256, 171), Image.BICUBIC)


def drawn_circle() -> Image.Image:
    """A red circle drawn with PIL off the world's grid, at a size and line width the renderer never uses."""
    image = Image.new("RGB", (120, 90), (250, 250, 246))
    ImageDraw.Draw(image).ellipse((14, 20, 60, 66), fill=(214, 38, 30), outline=(120, 20, 20), width=3)
    return image


def world_picture() -> Image.Image:
    from pictoprompt.models.shapes.scenes import Scene, SceneObject, render_scene

    return render_scene(Scene("black", (SceneObject("star", "yellow", "small", "top left"),)))


def test_a_photo_is_outside_the_shapes_world_and_its_own_pictures_are_not(shapes: Runtime) -> None:
    pipeline, check = shapes.pipeline(), shapes.profile.domain_check
    assert check is not None
    assert flat_coverage(pipeline, photo(), check) < check.min_coverage
    for inside in (world_picture(), drawn_circle()):
        assert flat_coverage(pipeline, inside, check) > check.min_coverage
        assert domain_note(pipeline, [inside], check) is None
    note = domain_note(pipeline, [photo()], check)
    assert note is not None and note.startswith("The picture") and "sd15" in note


def test_the_note_names_which_of_several_pictures_is_outside(shapes: Runtime) -> None:
    note = domain_note(shapes.pipeline(), [drawn_circle(), photo()], shapes.profile.domain_check)
    assert note is not None and note.startswith("Picture 2 of 2 ")


def test_the_size_of_a_picture_does_not_decide(shapes: Runtime) -> None:
    """The same drawing at 60 px and at 600 px reads alike: the check works on one square working size."""
    pipeline, check = shapes.pipeline(), shapes.profile.domain_check
    small, large = drawn_circle().resize((60, 45), Image.BICUBIC), drawn_circle().resize((600, 450), Image.BICUBIC)
    assert abs(flat_coverage(pipeline, small, check) - flat_coverage(pipeline, large, check)) < 0.1


def test_only_a_narrow_world_has_a_domain_check() -> None:
    """The threshold is the profile's data: the real profiles and the tiny test set have none, so no note."""
    assert BUILTIN_PROFILES["shapes"].domain_check is not None
    assert all(BUILTIN_PROFILES[name].domain_check is None for name in ("sd15", "sd21", "tiny"))


def test_no_check_no_note(tiny_runtime: Runtime) -> None:
    assert domain_note(tiny_runtime.pipeline(), [Image.new("RGB", (64, 64), "white")], None) is None


class _Folder:
    def __init__(self, root: Path) -> None:
        self.root, self.count = root, 0

    def save(self, image: Image.Image, metadata: dict[str, str]) -> SavedImage:
        self.count += 1
        path = self.root / f"{self.count}.png"
        image.save(path)
        return SavedImage(uri=path.as_uri(), path=str(path))


def test_a_tool_that_reads_a_photo_says_so(shapes: Runtime, tmp_path: Path) -> None:
    images = PreResolvedImages({"photo": photo(), "drawn": drawn_circle()})
    context = ToolContext(runtime=shapes, assets=_Folder(tmp_path), images=images)
    # The paper's SD-IPC: the note is the tool's whatever its method (the shapes profile's own, `prompted`, first
    # writes each picture's prompt with VGD, seconds of decoding the note does not depend on).
    request = {"num_images": 1, "steps": 2, "seed": 1, "method": "sd-ipc"}
    noted = vary_image(VaryImageRequest(images=["photo"], **request), context)
    assert noted.domain_note is not None and "sd15" in noted.domain_note
    assert vary_image(VaryImageRequest(images=["drawn"], **request), context).domain_note is None
