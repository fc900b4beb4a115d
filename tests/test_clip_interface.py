"""Both CLIP families behind `ClipModel` behave the same: checked against each library's own forward pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel

from pictoprompt.methods.sd_ipc import ImageToPrompt, target_norm
from pictoprompt.methods.vgd import image_targets
from pictoprompt.models.clip import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipModel,
    OpenClipClip,
    TransformersClip,
    pad_to_square,
    preprocess_images,
    shifted_views,
)
from pictoprompt.models.clip_tokenizer import load_clip_tokenizer, write_clip_tokenizer
from pictoprompt.models.profiles import ClipSpec, Profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.models.tiny import tiny_clip_config

TINY_OPEN_CLIP = "pictoprompt-test-tiny-vit"
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def build_open_clip(directory: Path, dtype: torch.dtype = torch.float32) -> OpenClipClip:
    """A seeded random-init open_clip model from a tiny config registered in open_clip's model registry."""
    import open_clip

    config_path = directory / f"{TINY_OPEN_CLIP}.json"
    config_path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(config_path)
    torch.manual_seed(0)
    return OpenClipClip.from_pretrained(TINY_OPEN_CLIP, None, torch.device("cpu"), dtype)


def build_transformers_clip(directory: Path) -> TransformersClip:
    torch.manual_seed(0)
    return TransformersClip(CLIPModel(tiny_clip_config()), load_clip_tokenizer(write_clip_tokenizer(directory)))


@pytest.fixture(scope="module", params=["transformers", "open_clip"])
def clip(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ClipModel:
    directory = tmp_path_factory.mktemp(request.param)
    return build_transformers_clip(directory) if request.param == "transformers" else build_open_clip(directory)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)),
        Image.new("RGB", (32, 32), (200, 30, 30)),
    ]


def library_text_features(clip: ClipModel, input_ids: torch.Tensor) -> torch.Tensor:
    if isinstance(clip, OpenClipClip):
        return clip.model.encode_text(input_ids)
    return clip.model.get_text_features(input_ids=input_ids).pooler_output


def library_image_features(clip: ClipModel, pixels: torch.Tensor) -> torch.Tensor:
    if isinstance(clip, OpenClipClip):
        return clip.model.encode_image(pixels)
    return clip.model.get_image_features(pixel_values=pixels).pooler_output


def test_sizes(clip: ClipModel) -> None:
    assert clip.hidden_size == 32
    assert clip.text_projection.shape == (clip.embed_dim, clip.hidden_size)
    assert clip.text_projection.dtype == torch.float32
    assert clip.vocab_size == 49408
    assert clip.context_length == 77
    assert clip.device == torch.device("cpu")


def test_image_size_is_the_towers_input(clip: ClipModel) -> None:
    assert clip.image_size == 32
    assert preprocess_images([Image.new("RGB", (80, 50))], clip.image_size).shape == (1, 3, 32, 32)


def test_tokenize_and_eos(clip: ClipModel) -> None:
    input_ids = clip.tokenize(["a red circle", "", "a small blue square on the left"])
    assert input_ids.shape == (3, 77)
    assert (input_ids[:, 0] == 49406).all()
    assert clip.eos_positions(input_ids).tolist() == [4, 1, 8]
    assert input_ids[0, 4] == 49407


def test_long_text_is_truncated_with_its_eos_last(clip: ClipModel) -> None:
    input_ids = clip.tokenize([" ".join(["circle"] * 100)])
    assert input_ids.shape == (1, 77)
    assert clip.eos_positions(input_ids).tolist() == [76]


def test_both_families_share_the_clip_vocabulary(tmp_path: Path) -> None:
    text = ["A watercolor of a red circle, wearing a hat!"]
    transformers_ids = build_transformers_clip(tmp_path / "t").tokenize(text)
    open_clip_ids = build_open_clip(tmp_path).tokenize(text)
    eos = int(transformers_ids[0].argmax())
    assert transformers_ids[0, : eos + 1].tolist() == open_clip_ids[0, : eos + 1].tolist()


def test_decode_round_trip(clip: ClipModel) -> None:
    input_ids = clip.tokenize(["a red circle on a blue background"])
    assert clip.decode(input_ids[0].tolist()) == "a red circle on a blue background"


def test_text_states_are_what_the_projection_applies_to(clip: ClipModel) -> None:
    input_ids = clip.tokenize(["a red circle", "a photo of a dog"])
    states = clip.text_states(input_ids)
    assert states.shape == (2, 77, clip.hidden_size)
    eos_states = states[torch.arange(2), clip.eos_positions(input_ids)]
    expected = library_text_features(clip, input_ids)
    torch.testing.assert_close(eos_states @ clip.text_projection.T, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(clip.encode_text(["a red circle", "a photo of a dog"]), expected, rtol=1e-4, atol=1e-5)


def test_text_states_are_final_layer_normed(clip: ClipModel) -> None:
    states = clip.text_states(clip.tokenize(["a red circle"]))
    # After the last layer norm (weight 1, bias 0 at init) every position has zero mean and unit variance.
    torch.testing.assert_close(states.mean(dim=-1), torch.zeros(1, 77), atol=1e-4, rtol=0)
    torch.testing.assert_close(states.var(dim=-1, unbiased=False), torch.ones(1, 77), atol=1e-2, rtol=0)


def test_text_states_are_differentiable(clip: ClipModel) -> None:
    embedding = clip.model.token_embedding if isinstance(clip, OpenClipClip) else clip.model.text_model.embeddings
    embedding.requires_grad_(True)
    try:
        clip.text_states(clip.tokenize(["a red circle"])).sum().backward()
        assert next(embedding.parameters()).grad is not None
    finally:
        embedding.requires_grad_(False)


def test_encode_image_matches_the_library(clip: ClipModel, images: list[Image.Image]) -> None:
    embeds = clip.encode_image(images)
    assert embeds.shape == (2, clip.embed_dim)
    assert embeds.dtype == torch.float32
    assert not torch.allclose(embeds.norm(dim=-1), torch.ones(2)), "embeddings must be unnormalised"
    pixels = preprocess_images(images, 32, clip.image_mean, clip.image_std)
    torch.testing.assert_close(embeds, library_image_features(clip, pixels), rtol=1e-4, atol=1e-5)


def test_logit_scale_is_exponentiated(clip: ClipModel) -> None:
    assert clip.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)


def test_similarity_is_cosine(clip: ClipModel, images: list[Image.Image]) -> None:
    image_embeds = clip.encode_image(images)
    text_embeds = clip.encode_text(["a red circle", "noise", "a dog"])
    similarity = clip.similarity(image_embeds, text_embeds)
    assert similarity.shape == (2, 3)
    expected = torch.nn.functional.cosine_similarity(image_embeds[1], text_embeds[0], dim=0)
    torch.testing.assert_close(similarity[1, 0], expected)
    torch.testing.assert_close(clip.similarity(image_embeds, image_embeds).diagonal(), torch.ones(2))


def test_sd_ipc_runs_on_either_family(clip: ClipModel, images: list[Image.Image]) -> None:
    image_embeds = clip.encode_image(images[:1])
    converter = ImageToPrompt(clip)  # the CLIP's own text tower as the generator's encoder
    prompt = converter.prompt(image_embeds)
    assert prompt.shape == (1, 77, clip.hidden_size)
    torch.testing.assert_close(prompt[0, 1:].norm(dim=-1), torch.full((76,), target_norm(clip)))
    # Projected back into CLIP space, the converted state still points towards the image.
    back = prompt[0, 1] @ clip.text_projection.T
    assert torch.nn.functional.cosine_similarity(back, image_embeds[0], dim=0) > 0.5


def test_runtime_loads_an_open_clip_profile(tmp_path: Path) -> None:
    build_open_clip(tmp_path)  # registers the tiny architecture
    profile = Profile(
        name="tiny-open-clip",
        generator="builtin:tiny/generator",
        clip=ClipSpec(library="open_clip", source=TINY_OPEN_CLIP),
    )
    clip = Runtime(profile).clip()
    assert isinstance(clip, OpenClipClip)
    assert clip.text_projection.shape == (16, 32)


def test_wide_pictures_are_padded_with_their_background_not_cropped() -> None:
    """CLIP's centre crop would cut a red square drawn at the left edge of a wide screenshot out of the picture."""
    picture = Image.new("RGB", (96, 32), (245, 245, 245))
    picture.paste((220, 30, 30), (2, 8, 18, 24))
    square = pad_to_square(picture)
    assert square.size == (96, 96)
    assert square.getpixel((0, 0)) == (245, 245, 245)
    assert square.getpixel((10, 48)) == (220, 30, 30)
    pixels = preprocess_images([picture], 32)
    red = torch.tensor([220, 30, 30]) / 255.0
    std, mean = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1), torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    unnormalised = pixels[0] * std + mean
    reddish = ((unnormalised - red.view(3, 1, 1)).abs().amax(0) < 0.1).sum()
    assert reddish >= 9, "the object must survive preprocessing"
    # A square picture is left as it was.
    assert pad_to_square(square) is square


def test_shifted_views_move_the_picture_by_one_input_pixel() -> None:
    """A 64 px picture for a 32 px tower: one input pixel is 2 picture pixels; the uncovered edge is background."""
    picture = Image.new("RGB", (64, 48), (245, 245, 245))
    picture.paste((220, 30, 30), (30, 20, 34, 24))
    views = shifted_views(picture, 32)
    assert [view.size for view in views] == [(64, 64)] * 5
    assert views[0].tobytes() == pad_to_square(picture).tobytes()
    marker = np.argwhere((np.asarray(views[0]) == (220, 30, 30)).all(-1)).min(0)
    moved = [np.argwhere((np.asarray(view) == (220, 30, 30)).all(-1)).min(0) - marker for view in views[1:]]
    assert [tuple(int(v) for v in m) for m in moved] == [(0, 2), (0, -2), (2, 0), (-2, 0)]  # (row, column)
    assert views[1].getpixel((0, 30)) == views[2].getpixel((63, 30)) == (245, 245, 245)
    # A picture at the tower's own size is not resampled: it is read as it is.
    small = picture.resize((32, 24))
    assert [view.tobytes() for view in shifted_views(small, 32)] == [pad_to_square(small).tobytes()]


def test_image_targets_are_the_mean_direction_of_the_views(clip: ClipModel, images: list[Image.Image]) -> None:
    targets = image_targets(clip, images)
    assert targets.shape == (2, clip.embed_dim)
    torch.testing.assert_close(targets.norm(dim=-1), torch.ones(2))
    views = torch.nn.functional.normalize(clip.encode_image(shifted_views(images[0], clip.image_size)), dim=-1)
    torch.testing.assert_close(targets[0], torch.nn.functional.normalize(views.mean(0), dim=0), atol=1e-5, rtol=1e-5)
    # The second picture is at the tower's size: one view, its own unit embedding.
    alone = torch.nn.functional.normalize(clip.encode_image(images[1:]), dim=-1)[0]
    torch.testing.assert_close(targets[1], alone, atol=1e-5, rtol=1e-5)


def test_open_clip_in_half_precision_embeds_images(tmp_path: Path, images: list[Image.Image]) -> None:
    """open_clip's fp16 keeps the positional embedding in float32 while the patch convolution is float16."""
    clip = build_open_clip(tmp_path, torch.float16)
    assert clip.model.visual.conv1.weight.dtype == torch.float16
    embeddings = clip.encode_image(images)
    assert embeddings.dtype == torch.float32 and embeddings.shape == (2, 16)
    assert torch.isfinite(embeddings).all()


def test_text_embeddings_read_the_tokens_up_to_the_last_eos_only(clip: ClipModel, monkeypatch) -> None:
    """Cut at the batch's last EOS (9 tokens here, not 77): the causal tower gives the same EOS states."""
    texts = ["a red circle", "a small blue square on the left"]
    input_ids = clip.tokenize(texts)
    full = clip.text_states(input_ids)[torch.arange(2), clip.eos_positions(input_ids)] @ clip.text_projection.T
    lengths = []
    text_states = type(clip).text_states
    monkeypatch.setattr(
        type(clip), "text_states", lambda self, ids: lengths.append(ids.shape[1]) or text_states(self, ids)
    )
    torch.testing.assert_close(clip.encode_text(texts), full.float(), rtol=1e-4, atol=1e-5)
    assert lengths == [int(clip.eos_positions(input_ids).max()) + 1] == [9]
