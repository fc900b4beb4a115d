"""SD-IPC-CT/FT on the tiny set (and the `shapes` set when its weights are present), and on a tiny open_clip ViT
in place of the tiny CLIP (SD 2.x's case).

The tiny models are random, so the paper's learning rate (5e-6) moves nothing measurable in a few steps there;
tests that need the loss to move use 1e-3 on tiny and say so. The `shapes` test uses the paper's defaults.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pictoprompt.configs import ConceptTuningConfig, DomainTuningConfig
from pictoprompt.errors import InvalidInputError, JobCancelledError
from pictoprompt.methods.concept_tuning import tune_concept
from pictoprompt.methods.concept_weights import (
    ConceptWeights,
    applied_concept,
    base_hash,
    cross_attention_projections,
    swapped_projections,
)
from pictoprompt.methods.domain_tuning import train_domain
from pictoprompt.methods.generation import Sample, default_size, generate
from pictoprompt.methods.sd_ipc import ImageToPrompt
from pictoprompt.methods.tuning import CaptionAlignment, denoising_loss, encode_latents
from pictoprompt.models.clip import OpenClipClip
from pictoprompt.models.clip_vision import DeepPromptedVision, PromptedClip, clip_pixels, vision_tower
from pictoprompt.models.concepts import ConceptStore
from pictoprompt.models.profiles import ClipSpec, Profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.progress import Progress
from pictoprompt.server.assets import AssetStore
from pictoprompt.tools.base import ToolContext
from pictoprompt.tools.concepts import DeleteConceptRequest, ListConceptsRequest, delete_concept, list_concepts
from pictoprompt.tools.customize_concept import (
    CustomizeConceptRequest,
    customize_concept,
    domain_tuning_config,
    read_captions,
    train_domain_adapter,
)
from pictoprompt.tools.generate_image import GenerateImageRequest, generate_image
from pictoprompt.tools.render import concept_image_embedding, load_concept
from pictoprompt.tools.vary_image import VaryImageRequest, vary_image

TINY_LR = 1e-3  # random tiny weights: the paper's 5e-6 would change nothing visible in a handful of steps
TINY_OPEN_CLIP = "pictoprompt-test-tuning-vit"
TINY_OPEN_CLIP_CONFIG = {  # text width 32: the tiny generator's, so SD-IPC converts into its prompt space
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 48, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
OPEN_CLIP_LAYERS, OPEN_CLIP_WIDTH = 3, 48


def pictures(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(count)]


class DictImages:
    def __init__(self, images: dict[str, Image.Image]) -> None:
        self.images = images

    def load(self, ref: str) -> Image.Image:
        return self.images[ref]


def tool_context(
    runtime: Runtime, store: ConceptStore, images: dict[str, Image.Image], progress: Progress
) -> ToolContext:
    context = ToolContext(runtime, assets=None, images=DictImages(images), progress=progress)  # type: ignore[arg-type]
    context.concepts = store
    return context


def cancelling_progress(at: int, seen: list[float]) -> Progress:
    """A progress sink that records each step and cancels the work once step `at` is reported."""

    def callback(done: float, total: float | None, message: str | None) -> None:
        seen.append(done)
        if done == at:
            progress.cancel()

    progress = Progress(callback)
    return progress


def snapshot(runtime: Runtime) -> dict[str, torch.Tensor]:
    """Every weight of the base model (generator and CLIP)."""
    pipeline, clip = runtime.pipeline(), runtime.clip()
    modules = {"unet": pipeline.unet, "vae": pipeline.vae, "text": pipeline.text_encoder, "clip": clip.model}
    return {
        f"{name}.{key}": value.clone() for name, module in modules.items() for key, value in module.state_dict().items()
    }


def evaluation_loss(runtime: Runtime, weights: ConceptWeights, images: list[Image.Image]) -> float:
    """The denoising loss on fixed timesteps and noise (the training loss draws new ones every step)."""
    pipeline, clip = runtime.pipeline(), runtime.clip()
    converter = ImageToPrompt.cached(clip, pipeline)
    tower = DeepPromptedVision(clip, weights.deep_prompts)
    generator = torch.Generator().manual_seed(1234)
    losses = []
    with torch.no_grad(), swapped_projections(pipeline.unet, weights.kv_deltas):
        prompt = converter.prompt(tower(clip_pixels(clip, images)))
        for _ in range(16):
            losses.append(float(denoising_loss(pipeline, encode_latents(pipeline, images), prompt, generator)))
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def open_clip_runtime(tiny_runtime: Runtime, tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    """The tiny generator with a seeded random-init open_clip ViT as its CLIP: an SD 2.x profile in miniature."""
    import open_clip

    config_path = tmp_path_factory.mktemp("open-clip") / f"{TINY_OPEN_CLIP}.json"
    config_path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(config_path)
    clip = ClipSpec(library="open_clip", source=TINY_OPEN_CLIP)
    runtime = Runtime(Profile(name="tiny-open-clip", generator="builtin:tiny/generator", clip=clip))
    torch.manual_seed(0)
    assert isinstance(runtime.clip(), OpenClipClip)
    runtime.pipeline()
    return runtime


def sequence_first(clip: OpenClipClip) -> OpenClipClip:
    """A copy of `clip` whose vision blocks run sequence first, as open_clip builds them with `batch_first=False`."""
    copied = copy.deepcopy(clip)
    transformer = copied.model.visual.transformer
    transformer.batch_first = False
    for block in transformer.resblocks:
        block.attn.batch_first = False
    return copied


def test_deep_prompted_tower_without_prompts_is_the_clip_image_encoder(tiny_runtime: Runtime) -> None:
    clip = tiny_runtime.clip()
    images = pictures(3)
    with torch.no_grad():
        assert torch.equal(DeepPromptedVision(clip, None).encode_image(images), clip.encode_image(images))
        prompts = torch.randn(clip.model.config.vision_config.num_hidden_layers, 4, 32)
        assert not torch.allclose(DeepPromptedVision(clip, prompts).encode_image(images), clip.encode_image(images))


def test_tuning_latents_are_the_posterior_mean_not_a_draw(tiny_runtime: Runtime) -> None:
    pipeline = tiny_runtime.pipeline()
    size = default_size(pipeline)
    images = [Image.new("RGB", (size, size), (200, 30, 30)), Image.new("RGB", (size, size), (20, 20, 220))]
    latents = encode_latents(pipeline, images)
    assert torch.equal(latents, encode_latents(pipeline, images))
    pixels = torch.stack([torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1) for image in images])
    pixels = pixels.permute(0, 3, 1, 2)
    with torch.no_grad():
        posterior = pipeline.vae.encode(pixels).latent_dist
    torch.testing.assert_close(latents, posterior.mean * pipeline.vae.config.scaling_factor, atol=1e-4, rtol=1e-4)


def test_only_the_named_parameters_change(tiny_runtime: Runtime) -> None:
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    before = snapshot(tiny_runtime)
    initial = ConceptWeights.initial(pipeline.unet, clip, 4, torch.Generator().manual_seed(0))
    result = tune_concept(
        pipeline, clip, pictures(3), ConceptTuningConfig(iterations=3, learning_rate=TINY_LR, num_prompts=4)
    )

    after = snapshot(tiny_runtime)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before), "a base weight changed"
    expected = {key for key in cross_attention_projections(pipeline.unet)}
    assert all(key.rsplit(".", 2)[-2] == "attn2" for key in expected)
    assert set(result.weights.kv_deltas) == expected
    assert all(delta.abs().max() > 0 for delta in result.weights.kv_deltas.values())
    assert result.weights.deep_prompts.shape == (clip.model.config.vision_config.num_hidden_layers, 4, 32)
    assert not torch.equal(result.weights.deep_prompts, initial.deep_prompts)
    assert set(result.weights.to_tensors()) == {f"unet.{key}.weight" for key in expected} | {"vision.deep_prompts"}


def test_loss_decreases_over_30_iterations(tiny_runtime: Runtime) -> None:
    images = pictures(4, seed=1)
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    options = {"learning_rate": TINY_LR, "num_prompts": 4, "augment": False}
    start = tune_concept(
        pipeline, clip, images, ConceptTuningConfig(iterations=0, **options)
    )  # the same seed: where tuning starts
    result = tune_concept(pipeline, clip, images, ConceptTuningConfig(**options))
    assert len(result.losses) == 30
    assert evaluation_loss(tiny_runtime, result.weights, images) < 0.95 * evaluation_loss(
        tiny_runtime, start.weights, images
    )


def test_base_outputs_are_bit_identical_after_a_concept_was_used(tiny_runtime: Runtime) -> None:
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    images = pictures(3)
    result = tune_concept(
        pipeline, clip, images, ConceptTuningConfig(iterations=2, learning_rate=TINY_LR, num_prompts=4)
    )

    def render(clip_in_use: object) -> tuple[np.ndarray, torch.Tensor]:
        with torch.no_grad():
            converter = ImageToPrompt.cached(clip_in_use, pipeline)
            embeds = clip_in_use.encode_image(images[:1])
            prompt = converter.prompt(embeds)
        picture = generate(pipeline, Sample(prompt, converter.empty_states, [7], 7.5, Progress()), 3, 32, 32)[0]
        return np.asarray(picture), embeds

    base_picture, base_embeds = render(clip)
    with applied_concept(pipeline, clip, result.weights) as tuned_clip:
        tuned_picture, tuned_embeds = render(tuned_clip)
    again_picture, again_embeds = render(clip)
    assert not torch.equal(tuned_embeds, base_embeds)
    assert not np.array_equal(tuned_picture, base_picture)
    assert torch.equal(again_embeds, base_embeds)
    assert np.array_equal(again_picture, base_picture)
    with applied_concept(pipeline, clip, None) as same_clip:
        assert same_clip is clip


def test_the_swap_is_undone_when_the_block_fails(tiny_runtime: Runtime) -> None:
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    originals = dict(cross_attention_projections(pipeline.unet))
    weights = ConceptWeights.initial(pipeline.unet, clip, 2, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError), applied_concept(pipeline, clip, weights):
        assert all(type(m).__name__ == "DeltaLinear" for m in cross_attention_projections(pipeline.unet).values())
        raise RuntimeError("generation failed")
    assert all(cross_attention_projections(pipeline.unet)[key] is module for key, module in originals.items())


def test_base_hash_tracks_the_weights_concepts_attach_to(tiny_runtime: Runtime) -> None:
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    unet = copy.deepcopy(pipeline.unet)
    assert base_hash(SimpleNamespace(unet=unet), clip) == base_hash(pipeline, clip)  # type: ignore[arg-type]
    with torch.no_grad():
        next(iter(cross_attention_projections(unet).values())).weight.add_(1e-2)
    assert base_hash(SimpleNamespace(unet=unet), clip) != base_hash(pipeline, clip)  # type: ignore[arg-type]


def test_customize_concept_tool_round_trip(tiny_runtime: Runtime, tmp_path: Path) -> None:
    store = ConceptStore(tmp_path / "concepts")
    refs = {f"img{i}": image for i, image in enumerate(pictures(3))}
    reports: list[tuple[float, float | None, str | None]] = []
    context = tool_context(tiny_runtime, store, refs, Progress(lambda *report: reports.append(report)))
    request = CustomizeConceptRequest(name="noise-cat", images=list(refs), iterations=3)
    card = customize_concept(request, context)

    assert card.name == "noise-cat" and card.kind == "concept" and card.method == "SD-IPC-CT"
    assert card.iterations == 3 and card.reference_count == 3 and len(card.thumbnails) == 3
    assert card.hyperparameters["learning_rate"] == 5e-6 and card.base_models["profile"] == "tiny"
    assert [r[0] for r in reports] == [1, 2, 3] and "loss" in reports[-1][2]
    assert [c.name for c in list_concepts(ListConceptsRequest(), context).concepts] == ["noise-cat"]

    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    weights = load_concept(context, "noise-cat")
    assert load_concept(context, None) is None
    embedding = concept_image_embedding(context, "noise-cat")
    assert embedding.shape == (1, clip.embed_dim)
    with torch.no_grad(), applied_concept(pipeline, clip, weights) as tuned_clip:
        # The stored mean is the references' mean through the tuned encoder, as the store says.
        references = torch.nn.functional.normalize(tuned_clip.encode_image(list(refs.values())), dim=-1)
        assert torch.allclose(embedding, references.mean(0, keepdim=True), atol=1e-5)

    with pytest.raises(InvalidInputError, match="already exists"):
        customize_concept(request, context)
    assert delete_concept(DeleteConceptRequest(name="noise-cat"), context).deleted == "noise-cat"
    assert store.list() == []


def test_request_refuses_bad_names_and_image_counts() -> None:
    with pytest.raises(ValueError, match="name"):
        CustomizeConceptRequest(name="../cat", images=["a", "b", "c"])
    with pytest.raises(ValueError, match="images"):
        CustomizeConceptRequest(name="cat", images=["a", "b"])
    with pytest.raises(ValueError, match="images"):
        CustomizeConceptRequest(name="cat", images=["a"] * 11)


def test_cancelling_mid_tuning_leaves_no_concept(tiny_runtime: Runtime, tmp_path: Path) -> None:
    store = ConceptStore(tmp_path / "concepts")
    refs = {f"img{i}": image for i, image in enumerate(pictures(3))}
    first = tool_context(tiny_runtime, store, refs, Progress())
    kept = customize_concept(CustomizeConceptRequest(name="cat", images=list(refs), iterations=1), first)

    for name, overwrite in [("cat", True), ("dog", False)]:
        seen: list[float] = []
        progress = cancelling_progress(3, seen)
        context = tool_context(tiny_runtime, store, refs, progress)
        with pytest.raises(JobCancelledError):
            customize_concept(CustomizeConceptRequest(name=name, images=list(refs), overwrite=overwrite), context)
        assert seen == [1, 2, 3]
    assert os.listdir(store.root) == ["cat"]
    # The stored card is the first result less what is said about the call (domain_note belongs to the response).
    assert store.get("cat").summary().model_dump() == kept.model_dump(exclude={"domain_note"})


def test_train_domain_with_ab_targets(tiny_runtime: Runtime, tmp_path: Path) -> None:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    lines = []
    for i, image in enumerate(pictures(4, seed=2)):
        image.save(images_dir / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}", "class": "ab"[i % 2]}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    images, captions, classes = read_captions(images_dir, tmp_path / "metadata.jsonl")
    assert len(images) == 4 and captions[1] == "picture 1" and classes == ["a", "b", "a", "b"]

    before = snapshot(tiny_runtime)
    store = ConceptStore(tmp_path / "concepts")
    training_set = (images_dir, tmp_path / "metadata.jsonl")
    config = domain_tuning_config(tiny_runtime.profile.domain_tuning, iterations=2, batch_size=2)
    card = train_domain_adapter(tiny_runtime, store, "noise", training_set, config)
    assert all(torch.equal(value, snapshot(tiny_runtime)[key]) for key, value in before.items())
    assert card.kind == "domain" and card.method == "SD-IPC-FT" and card.hyperparameters["ab_targets"] is True
    assert card.hyperparameters["schedule"] == "cosine" and card.iterations == 2
    # The tiny profile keeps the paper's settings; the bundled set's own are in its profile.
    assert card.hyperparameters["learning_rate"] == 1e-5 and card.hyperparameters["prompt_learning_rate"] == 1e-5
    assert card.hyperparameters["caption_alignment"] == 0.0
    config = domain_tuning_config(config, iterations=1, caption_alignment=2.0, prompt_learning_rate=1e-2)
    tuned = train_domain_adapter(tiny_runtime, store, "aligned", training_set, config)
    assert tuned.hyperparameters["caption_alignment"] == 2.0 and tuned.hyperparameters["prompt_learning_rate"] == 1e-2
    assert store.load("noise", card.base_hash, tiny_runtime.model_ids()).tensors["vision.deep_prompts"].shape[1] == 50


def test_caption_alignment_pulls_the_converted_prompts_towards_the_captions(tiny_runtime: Runtime) -> None:
    pipeline, clip = tiny_runtime.pipeline(), tiny_runtime.clip()
    images = pictures(4, seed=3)
    captions = ["a red circle", "a blue square on the left", "a small green star", "a striped pink heart"]
    converter = ImageToPrompt.cached(clip, pipeline)
    with torch.no_grad():
        states, eos = converter.text_states(captions)
    alignment = CaptionAlignment(captions, states[torch.arange(4), eos])

    def misalignment(deep_prompts: torch.Tensor) -> float:
        with torch.no_grad():
            converted = converter.convert(DeepPromptedVision(clip, deep_prompts, 0.0).encode_image(images))
            return float(alignment.loss(converted, range(4)))

    # 10 iterations part the two by 0.24 on this machine (6 by 0.15): over twice the margin the assertion asks.
    options = {
        "iterations": 10,
        "batch_size": 4,
        "learning_rate": TINY_LR,
        "prompt_learning_rate": 1e-2,
        "num_prompts": 4,
        "augment": False,
    }
    plain = train_domain(pipeline, clip, images, captions, None, DomainTuningConfig(**options))
    aligned = train_domain(pipeline, clip, images, captions, None, DomainTuningConfig(caption_alignment=1.0, **options))
    assert misalignment(aligned.weights.deep_prompts) < misalignment(plain.weights.deep_prompts) - 0.1
    assert aligned.hyperparameters["caption_alignment"] == 1.0 and plain.hyperparameters["caption_alignment"] == 0.0
    assert aligned.hyperparameters["prompt_learning_rate"] == 1e-2


def test_caption_alignment_is_lowest_at_the_own_caption_and_shares_repeated_captions() -> None:
    states = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    alignment = CaptionAlignment(["a", "b", "c", "a"], states)
    assert alignment.distinct.shape == (3, 3) and alignment.owner.tolist() == [0, 1, 2, 0]
    own = alignment.loss(states[:2], [0, 1])
    swapped = alignment.loss(states[[1, 0]], [0, 1])
    assert float(own) < 0.05 < 1.0 < float(swapped)


def test_parameter_groups_give_the_deep_prompts_their_own_rate(tiny_runtime: Runtime) -> None:
    weights = ConceptWeights.initial(tiny_runtime.pipeline().unet, tiny_runtime.clip(), 2, torch.Generator())
    kv, prompts = weights.parameter_groups(1e-5, 1e-2)
    assert kv["lr"] == 1e-5 and len(kv["params"]) == len(weights.kv_deltas)
    assert prompts["lr"] == 1e-2 and prompts["params"][0] is weights.deep_prompts
    assert [group["lr"] for group in weights.parameter_groups(1e-5, None)] == [1e-5, 1e-5]
    without_prompts = ConceptWeights.initial(tiny_runtime.pipeline().unet, tiny_runtime.clip(), 0, torch.Generator())
    assert len(without_prompts.parameter_groups(1e-5, 1e-2)) == 1


def test_train_domain_rejects_unpaired_inputs(tiny_runtime: Runtime) -> None:
    with pytest.raises(InvalidInputError, match="one caption"):
        train_domain(tiny_runtime.pipeline(), tiny_runtime.clip(), pictures(2), ["only one"])
    for options in ({"caption_alignment": -1.0}, {"learning_rate": 0.0}, {"prompt_learning_rate": -1e-3}):
        with pytest.raises(InvalidInputError, match=next(iter(options))):
            domain_tuning_config(tiny_runtime.profile.domain_tuning, **options)


def test_bad_captions_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "x"}\n')
    with pytest.raises(InvalidInputError, match="not an image file"):
        read_captions(tmp_path, tmp_path / "metadata.jsonl")
    (tmp_path / "metadata.jsonl").write_text("not json\n")
    with pytest.raises(InvalidInputError, match="Line 1"):
        read_captions(tmp_path, tmp_path / "metadata.jsonl")


@pytest.mark.slow
def test_shapes_concept_loss_decreases_with_the_paper_defaults() -> None:
    from pictoprompt.models.profiles import get_profile
    from pictoprompt.models.shapes import weights_present

    if not weights_present():
        pytest.skip("the shapes weights are not built yet")
    from lab.shapes.world import held_out_scenes
    from pictoprompt.models.shapes.scenes import render_scene

    runtime = Runtime(get_profile("shapes"))
    pipeline, clip = runtime.pipeline(), runtime.clip()
    images = [render_scene(scene) for scene in held_out_scenes("crescent", 5)]
    start = tune_concept(pipeline, clip, images, ConceptTuningConfig(iterations=0))
    result = tune_concept(pipeline, clip, images)
    # The speed goal (under a minute on a CPU) is a benchmark's figure (`pictoprompt bench concepts`), not a test's.
    assert len(result.losses) == 30 and result.hyperparameters["learning_rate"] == 5e-6
    assert evaluation_loss(runtime, result.weights, images) < evaluation_loss(runtime, start.weights, images)


@pytest.mark.slow
def test_neutral_prompts_keep_the_shapes_conversion() -> None:
    from pictoprompt.models.profiles import get_profile
    from pictoprompt.models.shapes import weights_present

    if not weights_present():
        pytest.skip("the shapes weights are not built yet")
    from lab.shapes.world import held_out_scenes
    from pictoprompt.models.shapes.scenes import render_scene

    runtime = Runtime(get_profile("shapes"))
    pipeline, clip = runtime.pipeline(), runtime.clip()
    images = [render_scene(scene) for scene in held_out_scenes("crescent", 5)]
    with torch.no_grad():
        base = clip.encode_image(images)
    for prompt_init, low, high in [("random", -1.0, 0.9), ("neutral", 0.98, 1.0)]:
        start = tune_concept(pipeline, clip, images, ConceptTuningConfig(iterations=0, prompt_init=prompt_init))
        with torch.no_grad():
            prompted = DeepPromptedVision(clip, start.weights.deep_prompts).encode_image(images)
        assert low < float(torch.nn.functional.cosine_similarity(prompted, base).mean()) < high


# ------------------------------------------------------------------------------------------ on an open_clip ViT


@pytest.mark.parametrize("layout", ["batch first", "sequence first"])
def test_deep_prompted_open_clip_tower_without_prompts_is_the_clip_image_encoder(
    open_clip_runtime: Runtime, layout: str
) -> None:
    clip = open_clip_runtime.clip()
    if layout == "sequence first":
        clip = sequence_first(clip)
    vision = vision_tower(clip)
    assert (vision.num_layers, vision.width, vision.patch_size) == (OPEN_CLIP_LAYERS, OPEN_CLIP_WIDTH, 8)
    assert vision.sequence_first == (layout == "sequence first")
    images = pictures(3)
    with torch.no_grad():
        base = clip.encode_image(images)
        plain = DeepPromptedVision(clip, None).encode_image(images)
        prompted = DeepPromptedVision(clip, torch.randn(OPEN_CLIP_LAYERS, 4, OPEN_CLIP_WIDTH)).encode_image(images)
        # `clip_pixels` is the preprocessing `encode_image` uses, through open_clip's own forward pass
        library = clip.model.encode_image(clip_pixels(clip, images))
    assert base.shape == plain.shape == prompted.shape == (3, 16)
    assert torch.allclose(plain, base, atol=1e-5) and torch.allclose(library.float(), base, atol=1e-5)
    assert (prompted - base).abs().max() > 1e-2


def test_tune_concept_on_open_clip_trains_the_deep_prompts_and_kv_deltas(open_clip_runtime: Runtime) -> None:
    pipeline, clip = open_clip_runtime.pipeline(), open_clip_runtime.clip()
    images = pictures(3)
    before = {key: value.clone() for key, value in clip.model.state_dict().items()}
    options = {"learning_rate": TINY_LR, "num_prompts": 4, "augment": False}
    start = tune_concept(
        pipeline, clip, images, ConceptTuningConfig(iterations=0, **options)
    )  # the same seed: where tuning starts
    result = tune_concept(pipeline, clip, images, ConceptTuningConfig(iterations=2, **options))

    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert all(torch.equal(value, clip.model.state_dict()[key]) for key, value in before.items())
    assert result.weights.deep_prompts.shape == (OPEN_CLIP_LAYERS, 4, OPEN_CLIP_WIDTH)
    assert set(result.weights.kv_deltas) == set(cross_attention_projections(pipeline.unet))
    assert all(delta.abs().max() > 0 for delta in result.weights.kv_deltas.values())
    assert result.mean_image_embedding.shape == (1, 16) and result.mean_converted_embedding.shape == (1, 32)
    with torch.no_grad():
        base = clip.encode_image(images)
        untrained = DeepPromptedVision(clip, start.weights.deep_prompts).encode_image(images)
        tuned = DeepPromptedVision(clip, result.weights.deep_prompts).encode_image(images)
    # The neutral start keeps the base embeddings; two steps move the prompted tower away from that start.
    assert float(torch.nn.functional.cosine_similarity(untrained, base).mean()) > 0.95
    assert (tuned - untrained).abs().max() > 1e-4


def test_a_stored_concept_applies_on_open_clip(open_clip_runtime: Runtime, tmp_path: Path) -> None:
    store = ConceptStore(tmp_path / "concepts")
    refs = {f"img{i}": image for i, image in enumerate(pictures(3))}
    context = ToolContext(open_clip_runtime, AssetStore(tmp_path / "assets"), DictImages(refs), concepts=store)
    card = customize_concept(
        CustomizeConceptRequest(name="noise-cat", images=list(refs), iterations=2, learning_rate=TINY_LR), context
    )
    pipeline, clip = open_clip_runtime.pipeline(), open_clip_runtime.clip()
    assert card.method == "SD-IPC-CT" and card.iterations == 2 and card.base_models["profile"] == "tiny-open-clip"
    assert card.base_hash == base_hash(pipeline, clip)

    weights = load_concept(context, "noise-cat")
    embedding = concept_image_embedding(context, "noise-cat")
    with torch.no_grad(), applied_concept(pipeline, clip, weights) as tuned_clip:
        assert isinstance(tuned_clip, PromptedClip) and tuned_clip.base is clip
        tuned = tuned_clip.encode_image(list(refs.values()))
        references = torch.nn.functional.normalize(tuned, dim=-1)
        assert torch.allclose(embedding, references.mean(0, keepdim=True), atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(tuned, clip.encode_image(list(refs.values())), atol=1e-4)

    def draw(request: GenerateImageRequest | VaryImageRequest) -> np.ndarray:
        tool = generate_image if isinstance(request, GenerateImageRequest) else vary_image
        with Image.open(tool(request, context).images[0].path) as image:
            return np.asarray(image.convert("RGB"))

    named = draw(GenerateImageRequest(prompt="noise-cat on the left", concept="noise-cat", seed=3, steps=2))
    plain = draw(GenerateImageRequest(prompt="on the left", seed=3, steps=2))
    varied = draw(VaryImageRequest(images=["concept:noise-cat"], concept="noise-cat", seed=3, steps=2, num_images=1))
    assert named.shape == plain.shape == varied.shape == (32, 32, 3)
    assert not np.array_equal(named, plain)


def test_train_domain_on_open_clip(open_clip_runtime: Runtime) -> None:
    pipeline, clip = open_clip_runtime.pipeline(), open_clip_runtime.clip()
    result = train_domain(
        pipeline,
        clip,
        pictures(4, seed=2),
        [f"picture {i}" for i in range(4)],
        None,
        DomainTuningConfig(iterations=2, batch_size=2, learning_rate=TINY_LR, num_prompts=4),
    )
    assert result.hyperparameters["method"] == "SD-IPC-FT" and len(result.losses) == 2
    assert result.weights.deep_prompts.shape == (OPEN_CLIP_LAYERS, 4, OPEN_CLIP_WIDTH)
    assert all(delta.abs().max() > 0 for delta in result.weights.kv_deltas.values())


def test_an_open_clip_without_a_class_token_tower_is_refused(open_clip_runtime: Runtime) -> None:
    clip = copy.deepcopy(open_clip_runtime.clip())
    clip.model.visual.pool_type = "avg"
    with pytest.raises(InvalidInputError, match="pools its class token"):
        tune_concept(open_clip_runtime.pipeline(), clip, pictures(1), ConceptTuningConfig(iterations=1, num_prompts=2))
