"""SD-IPC (paper 000, section 3.1): the conversion's algebra, the prompt layouts, and the two tools end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo
from pydantic import ValidationError

from pictoprompt.errors import InvalidInputError, JobCancelledError
from pictoprompt.methods.generation import Sample, encode_text_prompt, generate
from pictoprompt.methods.prompt_edit import prompt_edit_states, rewrite_candidates, rewrite_prompt
from pictoprompt.methods.sd_ipc import (
    VIT_L_TARGET_NORM,
    ImageToPrompt,
    average_embeddings,
    centred_on_object,
    conversion_matrix,
    convert_image_embedding,
    edited_prompt,
    prompted_states,
    pseudo_prompt,
    target_norm,
)
from pictoprompt.models.profiles import get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.progress import Progress
from pictoprompt.tools import TOOLS
from pictoprompt.tools import vary_image as vary_image_module
from pictoprompt.tools.base import SavedImage, ToolContext
from pictoprompt.tools.edit_with_text import EditWithTextRequest, edit_with_text
from pictoprompt.tools.vary_image import VaryImageRequest, vary_image, written_prompt


def matrix_with_singular_values(values: list[float], rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A (rows, cols) matrix U diag(values) V^T with random orthonormal U and V."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator, dtype=torch.float64))
    k = len(values)
    return (u[:, :k] * torch.tensor(values, dtype=torch.float64)) @ v[:, :k].T


# --- the conversion matrix (Eq. 6 and footnote 6) -------------------------------------------------------------


def test_conversion_matrix_matches_numpy() -> None:
    W_t = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))  # (P, D), all singular values >> 0.3
    W_t_pinv = conversion_matrix(W_t)
    assert W_t_pinv.shape == (32, 16)
    np.testing.assert_allclose(W_t_pinv.numpy(), np.linalg.pinv(W_t.numpy()), rtol=1e-4, atol=1e-5)
    # Full row rank: W_t W_t^+ = I, so an image embedding survives the round trip through the text states.
    torch.testing.assert_close(W_t @ W_t_pinv, torch.eye(16), atol=1e-4, rtol=0)


def test_small_singular_values_are_dropped() -> None:
    values = [5.0, 2.0, 1.0, 0.29, 0.1, 0.01]
    W_t = matrix_with_singular_values(values, rows=6, cols=10).float()
    W_t_pinv = conversion_matrix(W_t, atol=0.3)
    # numpy's cut-off is relative to the largest singular value: 0.3 absolute = 0.06 of 5.
    reference = np.linalg.pinv(W_t.double().numpy(), rcond=0.3 / 5.0)
    np.testing.assert_allclose(W_t_pinv.numpy(), reference, rtol=1e-4, atol=1e-5)
    singular = torch.linalg.svdvals(W_t_pinv.double())
    torch.testing.assert_close(
        singular[:3], torch.tensor([1 / 1.0, 1 / 2.0, 1 / 5.0], dtype=torch.float64), rtol=1e-4, atol=1e-5
    )
    assert (singular[3:] < 1e-4).all(), "1/0.29, 1/0.1 and 1/0.01 must not appear"
    # Without the cut-off the 0.01 direction would dominate at 100x.
    assert torch.linalg.svdvals(conversion_matrix(W_t, atol=0.0))[0] == pytest.approx(100.0, rel=1e-2)


def test_conversion_keeps_the_gradient() -> None:
    W_t = torch.randn(8, 12, generator=torch.Generator().manual_seed(2), requires_grad=True)
    conversion_matrix(W_t).sum().backward()
    assert W_t.grad is not None and torch.isfinite(W_t.grad).all()


# --- f_cnvrt -----------------------------------------------------------------------------------------------------


def test_f_cnvrt_has_the_target_norm_and_the_pinv_direction() -> None:
    W_t = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    W_t_pinv = conversion_matrix(W_t)
    image_embeds = torch.randn(3, 16, generator=torch.Generator().manual_seed(4))
    f_cnvrt = convert_image_embedding(image_embeds, W_t_pinv, 27.5)
    assert f_cnvrt.shape == (3, 32)
    torch.testing.assert_close(f_cnvrt.norm(dim=-1), torch.full((3,), 27.5))
    torch.testing.assert_close(F.normalize(f_cnvrt, dim=-1), F.normalize(image_embeds @ W_t_pinv.T, dim=-1))
    # The image embedding's length does not matter; projecting back recovers its direction (Eq. 5).
    torch.testing.assert_close(convert_image_embedding(7 * image_embeds, W_t_pinv, 27.5), f_cnvrt)
    torch.testing.assert_close(
        F.normalize(f_cnvrt @ W_t.T, dim=-1), F.normalize(image_embeds, dim=-1), atol=1e-4, rtol=0
    )


def test_f_cnvrt_is_differentiable_in_the_image_embedding() -> None:
    W_t_pinv = conversion_matrix(torch.randn(16, 32, generator=torch.Generator().manual_seed(5)))
    image_embeds = torch.randn(2, 16, requires_grad=True)
    pseudo_prompt(convert_image_embedding(image_embeds, W_t_pinv, 27.5), torch.zeros(32)).square().sum().backward()
    assert image_embeds.grad is not None and image_embeds.grad.abs().sum() > 0


def test_target_norm_is_the_authors_constant_for_a_768_wide_encoder() -> None:
    def encoder_768(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones(len(texts), 77, 768), torch.full((len(texts),), 3)

    assert target_norm(encoder_768) == VIT_L_TARGET_NORM == 27.5


def test_target_norm_is_measured_at_the_eos_for_other_widths() -> None:
    def encoder_64(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states = torch.zeros(len(texts), 77, 64)
        eos = torch.arange(len(texts)) + 2
        for row, position in enumerate(eos):
            states[row, position, 0] = float(row + 1)  # EOS norms 1, 2, 3 ...
            states[row, 0, 1] = 100.0  # the start token must not count
        return states, eos

    assert target_norm(encoder_64, ["a", "b", "c", "d"]) == pytest.approx(2.5)


# --- the pseudo-prompt (Eq. 7) and the edited prompt (Eq. 8) ------------------------------------------------------


def test_pseudo_prompt_layout() -> None:
    f_cnvrt = torch.randn(2, 8)
    start_state = torch.randn(8)
    prompt = pseudo_prompt(f_cnvrt, start_state, length=77)
    assert prompt.shape == (2, 77, 8)
    for row in range(2):
        torch.testing.assert_close(prompt[row, 0], start_state)
        torch.testing.assert_close(prompt[row, 1:], f_cnvrt[row].expand(76, 8))


def test_edited_prompt_layout() -> None:
    f_cnvrt = torch.randn(3, 8)
    text_states = torch.randn(1, 77, 8)
    eos_index = 5
    prompt = edited_prompt(f_cnvrt, text_states, eos_index, alpha=0.9)
    assert prompt.shape == (3, 77, 8)
    for row in range(3):
        torch.testing.assert_close(prompt[row, :eos_index], text_states[0, :eos_index])  # start + words untouched
        torch.testing.assert_close(prompt[row, eos_index:], f_cnvrt[row] + 0.9 * text_states[0, eos_index:])


def test_edited_prompt_at_alpha_zero_is_the_conversion_from_eos_on() -> None:
    f_cnvrt = torch.randn(2, 8)
    text_states = torch.randn(2, 77, 8)
    prompt = edited_prompt(f_cnvrt, text_states, eos_index=4, alpha=0.0)
    torch.testing.assert_close(prompt[:, :4], text_states[:, :4])
    torch.testing.assert_close(prompt[:, 4:], pseudo_prompt(f_cnvrt, torch.zeros(8))[:, 4:])


def test_edited_prompt_is_differentiable_in_f_cnvrt() -> None:
    f_cnvrt = torch.randn(1, 8, requires_grad=True)
    edited_prompt(f_cnvrt, torch.randn(1, 77, 8), eos_index=3).sum().backward()
    torch.testing.assert_close(f_cnvrt.grad, torch.full((1, 8), 74.0))  # one per position from EOS on


# --- several references ------------------------------------------------------------------------------------------


def test_average_of_one_image_is_its_normalised_embedding() -> None:
    embeds = torch.randn(1, 16)
    torch.testing.assert_close(average_embeddings(embeds), F.normalize(embeds, dim=-1))


def test_weighted_average_of_normalised_embeddings() -> None:
    embeds = torch.randn(3, 16)
    normalised = F.normalize(embeds, dim=-1)
    torch.testing.assert_close(average_embeddings(embeds), normalised.mean(dim=0, keepdim=True))
    weighted = average_embeddings(embeds * torch.tensor([[10.0], [1.0], [0.1]]), [1.0, 3.0, 0.0])
    torch.testing.assert_close(weighted, (normalised[0:1] + 3 * normalised[1:2]) / 4)
    torch.testing.assert_close(average_embeddings(embeds, [0.0, 2.0, 0.0]), normalised[1:2])


@pytest.mark.parametrize("weights", [[1.0], [1.0, -1.0], [0.0, 0.0]])
def test_bad_weights_are_refused(weights: list[float]) -> None:
    with pytest.raises(InvalidInputError):
        average_embeddings(torch.randn(2, 16), weights)


# --- ImageToPrompt on the tiny model set --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]


def test_image_to_prompt_uses_the_generators_own_states(
    tiny_runtime: Runtime, reference_images: list[Image.Image]
) -> None:
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    converter = ImageToPrompt(clip, pipeline)
    _, empty = encode_text_prompt(pipeline, "a red circle")
    torch.testing.assert_close(converter.empty_states, empty)
    torch.testing.assert_close(converter.start_state, empty[0, 0])
    assert converter.length == 77
    # The tiny set is 32 wide, so the scale is measured: the generator's mean EOS-state norm.
    assert converter.norm == pytest.approx(target_norm(clip))

    image_embeds = average_embeddings(clip.encode_image(reference_images))
    prompt = converter.prompt(image_embeds)
    assert prompt.shape == (1, 77, 32)
    torch.testing.assert_close(prompt[0, 0], empty[0, 0])
    torch.testing.assert_close(prompt[0, 1:].norm(dim=-1), torch.full((76,), converter.norm))

    edit_states, _ = encode_text_prompt(pipeline, "in the snow")
    eos = 4  # <start> in the snow <end>
    edited = converter.edit(image_embeds, "in the snow", alpha=0.5)
    torch.testing.assert_close(edited[0, :eos], edit_states[0, :eos])
    torch.testing.assert_close(edited[0, eos:], prompt[0, eos:] + 0.5 * edit_states[0, eos:])


def test_sd1_generator_encoder_is_the_clip_text_tower(
    tiny_runtime: Runtime, reference_images: list[Image.Image]
) -> None:
    clip = tiny_runtime.clip()
    image_embeds = clip.encode_image(reference_images[:1])
    from_pipeline = ImageToPrompt(clip, tiny_runtime.pipeline())
    from_clip = ImageToPrompt(clip)
    torch.testing.assert_close(from_clip.prompt(image_embeds), from_pipeline.prompt(image_embeds))
    torch.testing.assert_close(from_clip.edit(image_embeds, "a star"), from_pipeline.edit(image_embeds, "a star"))


def test_conversion_is_cached_per_clip_and_encoder(tiny_runtime: Runtime) -> None:
    first = ImageToPrompt.cached(tiny_runtime.clip(), tiny_runtime.pipeline())
    assert ImageToPrompt.cached(tiny_runtime.clip(), tiny_runtime.pipeline()) is first


def test_a_clip_of_another_width_is_refused(tiny_runtime: Runtime) -> None:
    def encoder_16(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones(len(texts), 77, 16), torch.ones(len(texts), dtype=torch.long)

    with pytest.raises(InvalidInputError, match="text width"):
        ImageToPrompt(tiny_runtime.clip(), encoder_16)


# --- the tools ---------------------------------------------------------------------------------------------------


def assert_same_picture(a: Image.Image, b: Image.Image) -> None:
    """Equal up to one level of rounding: a batch of another size sums in another order on the CPU."""
    difference = np.abs(np.asarray(a.convert("RGB"), dtype=int) - np.asarray(b.convert("RGB"), dtype=int))
    assert difference.max() <= 1


class FolderAssets:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.saved: list[Path] = []

    def save(self, image: Image.Image, metadata: dict[str, str]) -> SavedImage:
        path = self.directory / f"{len(self.saved)}.png"
        info = PngInfo()
        for key, value in metadata.items():
            info.add_text(key, value)
        image.save(path, pnginfo=info)
        self.saved.append(path)
        return SavedImage(uri=path.as_uri(), path=str(path))


class NamedImages:
    def __init__(self, images: dict[str, Image.Image]) -> None:
        self.images = images

    def load(self, ref: str) -> Image.Image:
        return self.images[ref]


@pytest.fixture
def context(tiny_runtime: Runtime, reference_images: list[Image.Image], tmp_path: Path) -> ToolContext:
    images = NamedImages({"first.png": reference_images[0], "second.png": reference_images[1]})
    return ToolContext(runtime=tiny_runtime, assets=FolderAssets(tmp_path), images=images)


def test_tools_are_registered() -> None:
    names = [spec.name for spec in TOOLS]
    assert "vary_image" in names and "edit_with_text" in names


def test_vary_image_renders_the_pseudo_prompt(context: ToolContext, reference_images: list[Image.Image]) -> None:
    request = VaryImageRequest(images=["first.png", "second.png"], weights=[3, 1], num_images=2, seed=11, steps=2)
    assert request.image_refs() == ["first.png", "second.png"]
    response = vary_image(request, context)
    assert [image.seed for image in response.images] == [11, 12]

    clip, pipeline = context.runtime.clip(), context.runtime.pipeline()
    reference_embeds = clip.encode_image(reference_images)
    converter = ImageToPrompt.cached(clip, pipeline)
    with torch.no_grad():
        prompt = converter.prompt(average_embeddings(reference_embeds, [3, 1]))
    expected = generate(pipeline, Sample(prompt, converter.empty_states, [11, 12], 7.5, Progress()), 2, 32, 32)
    for output, image in zip(response.images, expected, strict=True):
        saved = Image.open(output.path)
        assert_same_picture(saved, image)
        assert saved.text["method"] == "sd-ipc-variation" and saved.text["seed"] == str(output.seed)
        assert saved.text["weights"] == "3.0,1.0"
        assert (output.width, output.height) == (32, 32)
        similarities = clip.similarity(clip.encode_image([image]), reference_embeds)[0]
        assert output.image_similarity == pytest.approx(
            float(0.75 * similarities[0] + 0.25 * similarities[1]), abs=1e-5
        )


def test_vary_image_is_reproducible_from_the_reported_seed(context: ToolContext) -> None:
    first = vary_image(VaryImageRequest(images=["first.png"], num_images=2, steps=2), context)
    again = vary_image(
        VaryImageRequest(images=["first.png"], num_images=1, seed=first.images[1].seed, steps=2), context
    )
    assert_same_picture(Image.open(first.images[1].path), Image.open(again.images[0].path))
    assert again.images[0].image_similarity == pytest.approx(first.images[1].image_similarity, abs=1e-4)


@pytest.mark.parametrize(
    "arguments",
    [
        {"images": []},
        {"images": ["a"] * 6},
        {"images": ["a", "b"], "weights": [1.0]},
        {"images": ["a"], "weights": [-1.0]},
        {"images": ["a", "b"], "weights": [0.0, 0.0]},
        {"images": ["a"], "num_images": 9},
        {"images": ["a"], "unknown": 1},
    ],
)
def test_vary_image_refuses_bad_arguments(arguments: dict) -> None:
    with pytest.raises(ValidationError):
        VaryImageRequest(**arguments)


def test_prompted_states_put_the_converted_embedding_after_the_prompts_words(
    tiny_runtime: Runtime, reference_images: list[Image.Image]
) -> None:
    clip, pipeline = tiny_runtime.clip(), tiny_runtime.pipeline()
    converter = ImageToPrompt.cached(clip, pipeline)
    embeds = clip.encode_image(reference_images[:1])
    states, eos = converter.text_states(["a red circle"])
    end = int(eos[0])
    with torch.no_grad():
        words_only, converted, half = (prompted_states(converter, embeds, "a red circle", w) for w in (0.0, 1.0, 0.5))
        f_cnvrt = converter.convert(embeds).float()
    torch.testing.assert_close(words_only, states.float())
    torch.testing.assert_close(converted[:, :end], states[:, :end].float())
    torch.testing.assert_close(converted[0, end:], f_cnvrt.expand(states.shape[1] - end, -1))
    torch.testing.assert_close(half, (words_only + converted) / 2)


def test_vary_image_prompted_draws_the_references_prompt(
    context: ToolContext, reference_images: list[Image.Image]
) -> None:
    request = VaryImageRequest(images=["first.png"], num_images=2, seed=3, steps=2, method="prompted")
    response = vary_image(request, context)
    assert response.prompt
    clip, pipeline = context.runtime.clip(), context.runtime.pipeline()
    converter = ImageToPrompt.cached(clip, pipeline)
    with torch.no_grad():
        states = prompted_states(converter, clip.encode_image(reference_images[:1]), response.prompt, 0.0)
    expected = generate(pipeline, Sample(states, converter.empty_states, [3, 4], 7.5, Progress()), 2, 32, 32)
    for output, image in zip(response.images, expected, strict=True):
        saved = Image.open(output.path)
        assert_same_picture(saved, image)
        assert saved.text["method"] == "prompted-sd-ipc-variation" and saved.text["prompt"] == response.prompt


def test_vary_image_follows_the_profiles_method(context: ToolContext, monkeypatch: pytest.MonkeyPatch) -> None:
    request = VaryImageRequest(images=["first.png"], num_images=1, seed=1, steps=1)
    paper = vary_image(request, context)
    assert paper.prompt is None and Image.open(paper.images[0].path).text["method"] == "sd-ipc-variation"
    profile = context.runtime.profile
    prompted = profile.model_copy(update={"sd_ipc": profile.sd_ipc.model_copy(update={"picture_prompt": True})})
    monkeypatch.setattr(context.runtime, "profile", prompted)
    prompted_response = vary_image(request, context)
    assert prompted_response.prompt
    assert Image.open(prompted_response.images[0].path).text["method"] == "prompted-sd-ipc-variation"
    assert vary_image(request.model_copy(update={"method": "sd-ipc"}), context).prompt is None


def test_edit_with_text_renders_the_edited_prompt(context: ToolContext, reference_images: list[Image.Image]) -> None:
    request = EditWithTextRequest(
        image="first.png", text="in the snow", method="sd-ipc", alpha=1.5, num_images=2, seed=3, steps=2
    )
    assert request.image_refs() == ["first.png"]
    response = edit_with_text(request, context)
    assert (response.text, response.alpha) == ("in the snow", 1.5)
    assert [image.seed for image in response.images] == [3, 4]

    clip, pipeline = context.runtime.clip(), context.runtime.pipeline()
    reference_embeds = clip.encode_image(reference_images[:1])
    converter = ImageToPrompt.cached(clip, pipeline)
    with torch.no_grad():
        prompt = converter.edit(reference_embeds, "in the snow", 1.5)
    expected = generate(pipeline, Sample(prompt, converter.empty_states, [3, 4], 7.5, Progress()), 2, 32, 32)
    text_embeds = clip.encode_text(["in the snow"])
    for output, image in zip(response.images, expected, strict=True):
        saved = Image.open(output.path)
        assert_same_picture(saved, image)
        assert saved.text["method"] == "sd-ipc-edit" and saved.text["edit_text"] == "in the snow"
        assert saved.text["alpha"] == "1.5"
        embeds = clip.encode_image([image])
        assert output.image_similarity == pytest.approx(float(clip.similarity(embeds, reference_embeds)), abs=1e-5)
        assert output.text_similarity == pytest.approx(float(clip.similarity(embeds, text_embeds)), abs=1e-5)


def test_edit_with_text_rewrites_the_pictures_prompt_and_draws_it(
    context: ToolContext, reference_images: list[Image.Image]
) -> None:
    request = EditWithTextRequest(
        image="first.png", text="blue", source_prompt="a red circle", num_images=2, seed=4, steps=2
    )
    response = edit_with_text(request, context)
    assert (response.method, response.alpha, response.source_prompt) == ("rewrite", 1.0, "a red circle")
    assert response.edited_prompt == rewrite_prompt(context.runtime.llm(), "a red circle", "blue")
    assert response.edited_prompt in [text for text, _, _ in rewrite_candidates("a red circle", "blue")]

    clip, pipeline = context.runtime.clip(), context.runtime.pipeline()
    embeds = clip.encode_image(reference_images[:1])
    states, negative = prompt_edit_states(clip, pipeline, embeds, "a red circle", response.edited_prompt, 1.0)
    expected = generate(pipeline, Sample(states, negative, [4, 5], 7.5, Progress()), 2, 32, 32)
    for output, image in zip(response.images, expected, strict=True):
        saved = Image.open(output.path)
        assert_same_picture(saved, image)
        assert saved.text["method"] == "prompt-rewrite-edit"
        assert (saved.text["source_prompt"], saved.text["edited_prompt"]) == ("a red circle", response.edited_prompt)


def test_edit_with_text_by_sd_ipc_keeps_the_papers_alpha_and_writes_no_prompt(context: ToolContext) -> None:
    request = EditWithTextRequest(image="first.png", text="blue", method="sd-ipc", num_images=1, steps=2)
    response = edit_with_text(request, context)
    assert (response.method, response.alpha) == ("sd-ipc", 0.9)
    assert response.source_prompt is None and response.edited_prompt is None


def test_edit_with_text_refuses_bad_arguments() -> None:
    with pytest.raises(ValidationError):
        EditWithTextRequest(image="first.png", text="")
    with pytest.raises(ValidationError):
        EditWithTextRequest(image="first.png", text="snow", alpha=-0.1)


def test_a_cancelled_variation_stops(context: ToolContext) -> None:
    context.progress.cancel()
    with pytest.raises(JobCancelledError):
        vary_image(VaryImageRequest(images=["first.png"], num_images=1, steps=3), context)
    assert context.assets.saved == []


# --- the prompted variation's reading (ours: SdIpcConfig.reading_span, seed_varies) ------------------------------


def off_centre_star(size: tuple[int, int] = (120, 80)) -> Image.Image:
    """A large black star near the top left of a white picture, as a user might draw one."""
    image = Image.new("RGB", size, "white")
    points = [(0.0, -1.0), (0.22, -0.3), (0.95, -0.31), (0.36, 0.12), (0.59, 0.81)]
    points += [(0.0, 0.38), (-0.59, 0.81), (-0.36, 0.12), (-0.95, -0.31), (-0.22, -0.3)]
    ImageDraw.Draw(image).polygon([(35 + 30 * x, 33 + 30 * y) for x, y in points], fill="black")
    return image


def test_centred_on_object_centres_the_object_at_the_asked_span() -> None:
    image = Image.new("RGB", (100, 60), (10, 200, 10))
    ImageDraw.Draw(image).rectangle((5, 5, 14, 14), fill="red")  # 10 x 10 px in the top left corner
    centred = centred_on_object(image, 0.5)
    assert centred.size == (20, 20)
    pixels = np.asarray(centred)
    red = np.argwhere((pixels == [255, 0, 0]).all(axis=-1))
    assert red.min(axis=0).tolist() == [5, 5] and red.max(axis=0).tolist() == [14, 14]
    assert pixels[0, 0].tolist() == [10, 200, 10]  # the canvas in the border's colour
    blank = Image.new("RGB", (40, 30), "white")
    assert np.array_equal(np.asarray(centred_on_object(blank, 0.5)), np.asarray(blank))


def test_written_prompt_reads_the_centred_picture_and_leaves_place_and_size_to_the_seeds(
    context: ToolContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[Image.Image] = []

    def prompt_of(context: ToolContext, refs: list[str], weights: list[float] | None) -> str:
        read.extend(context.images.load(ref) for ref in refs)
        return "a large outlined red circle in the top left corner on a white background"

    monkeypatch.setattr(vary_image_module, "picture_prompt", prompt_of)
    settings = get_profile("shapes").sd_ipc
    assert written_prompt(context, ["first.png"], None, settings) == "an outlined red circle on a white background"
    reference = context.images.load("first.png")
    assert np.array_equal(np.asarray(read[0]), np.asarray(centred_on_object(reference, settings.reading_span)))
    paper = settings.model_copy(update={"reading_span": None, "seed_varies": None})
    assert written_prompt(context, ["first.png"], None, paper) == prompt_of(context, [], None)
    assert np.array_equal(np.asarray(read[-1]), np.asarray(reference))


def test_on_shapes_a_drawn_star_off_centre_is_varied_as_a_star(tmp_path: Path) -> None:
    """The behaviour the reading is for: the variations' prompt names the drawn star's shape, colour and background,
    and no place or size (the seeds vary those)."""
    from pictoprompt.models.shapes import weights_present
    from pictoprompt.server.assets import AssetStore, RecordingSink
    from pictoprompt.server.images import PreResolvedImages

    if not weights_present():
        pytest.skip("the shapes weights are not built yet")
    runtime = Runtime(get_profile("shapes"))
    context = ToolContext(runtime, RecordingSink(AssetStore(tmp_path)), PreResolvedImages({"s": off_centre_star()}))
    response = vary_image(VaryImageRequest(images=["s"], num_images=2, seed=0, steps=4), context)
    words = set(response.prompt.split())
    assert {"black", "star", "white", "background"} <= words, response.prompt
    assert not words & {"small", "large", "left", "right", "top", "bottom", "middle", "center", "corner"}
