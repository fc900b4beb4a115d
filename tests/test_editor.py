"""EDITOR (`methods/editor.py`, `invert_image(method="editor")`) on the tiny random-init set, and the BLIP captioner
on a tiny random-init BLIP built here from a config: nothing is downloaded."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LMSDiscreteScheduler
from diffusers.schedulers import scheduling_lms_discrete as lms_module
from PIL import Image
from pydantic import ValidationError
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPModel,
)

from lab.benchmarks.editor import best_within
from pictoprompt.configs import EditorConfig
from pictoprompt.errors import InvalidInputError, JobCancelledError, ModelNotFoundError
from pictoprompt.methods import editor as ed
from pictoprompt.methods.vgd import ClipVocabulary, clip_vocabulary
from pictoprompt.models.check import component_status
from pictoprompt.models.clip import ClipModel, TransformersClip
from pictoprompt.models.profiles import Profile, get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.models.tiny import tiny_clip_config
from pictoprompt.progress import Progress
from pictoprompt.server.images import PreResolvedImages
from pictoprompt.tools.base import SavedImage, ToolContext
from pictoprompt.tools.invert_image import InvertImageRequest, invert_image

SIZE = 32
"""The tiny generator's resolution."""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    return Image.new("RGB", size, colour)


def small_vocabulary(clip: ClipModel) -> ClipVocabulary:
    """The first 2,000 CLIP tokens as start words, so tests do not embed all 49,408 (memoised per model)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TransformersClip, "vocab_size", property(lambda self: 2000))
        return clip_vocabulary(clip)


@pytest.fixture(scope="module")
def runtime(tiny_lm_dir: Path) -> Runtime:
    """The tiny set with the tiny transformers LM as its LLM."""
    tiny = get_profile("tiny")
    runtime = Runtime(Profile(**{**tiny.model_dump(), "llm": {"backend": "transformers", "source": str(tiny_lm_dir)}}))
    small_vocabulary(runtime.clip())
    return runtime


def one_seed(seed: int) -> EditorConfig:
    return EditorConfig(selection_seeds=(seed,))


def red_target() -> torch.Tensor:
    return ed.target_pixels([solid((220, 30, 30))], SIZE)


# --- step 1: start states --------------------------------------------------------------------------------------------


def test_start_states_are_the_text_states_cut_at_the_eos(runtime: Runtime) -> None:
    pipeline = runtime.pipeline()
    states = ed.start_states(pipeline, "a red circle", 32)
    # start token, three words, EOS
    assert states.shape == (5, pipeline.text_encoder.config.hidden_size)
    ids = pipeline.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        padded = pipeline.text_encoder(ids)[0][0]
    # The encoder is causal: what follows the EOS changes nothing before it.
    torch.testing.assert_close(states, padded[:5], atol=1e-5, rtol=1e-5)
    assert ed.start_states(pipeline, "a red circle and a blue square on a white background", max_tokens=4).shape[0] == 6
    assert ed.start_states(pipeline, "", 32).shape[0] == 2


def test_the_eos_target_of_unoptimised_states_is_the_prompts_clip_embedding(runtime: Runtime) -> None:
    clip, pipeline = runtime.clip(), runtime.pipeline()
    states = ed.start_states(pipeline, "a blue square", 32)
    with torch.no_grad():
        expected = clip.encode_text(["a blue square"])
    torch.testing.assert_close(ed.eos_target(clip, states), expected, atol=1e-4, rtol=1e-4)


def test_targets_are_letterboxed_and_resized_into_zero_one() -> None:
    pixels = ed.target_pixels([solid((255, 0, 0), (64, 32)), solid((0, 0, 255))], SIZE)
    assert pixels.shape == (2, 3, SIZE, SIZE)
    assert float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0
    torch.testing.assert_close(pixels[1, 2], torch.ones(SIZE, SIZE))


# --- step 2: reverse engineering -------------------------------------------------------------------------------------


def test_the_loss_falls_and_the_best_checked_states_are_kept(runtime: Runtime) -> None:
    pipeline = runtime.pipeline()
    start = ed.start_states(pipeline, "a red circle", 32)
    result = ed.reverse_engineer(pipeline, start, red_target(), EditorConfig(iterations=12, check_every=4))
    assert len(result.losses) == 13
    checked = {0, 4, 8, 12}
    assert {at for at, _, _ in result.improvements} <= checked
    assert result.first_loss == result.losses[0]
    assert result.best_loss == pytest.approx(min(result.losses[i] for i in checked))
    assert result.best_loss < result.first_loss
    assert result.states.shape == start.shape
    # Only positions 1..EOS move; the start token's state is the encoder's.
    torch.testing.assert_close(result.states[0], start[0])
    assert not torch.allclose(result.states[1:], start[1:])
    # A shorter run is the same trajectory: its best is what the longer run had kept by then.
    short = ed.reverse_engineer(pipeline, start, red_target(), EditorConfig(iterations=8, check_every=4))
    torch.testing.assert_close(short.states, best_within(result, 8), atol=1e-5, rtol=1e-4)


def test_activations_are_recomputed_during_backpropagation_with_the_same_result(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = runtime.pipeline()
    unet, vae = pipeline.unet, pipeline.vae
    start = ed.start_states(pipeline, "a red circle", 32)
    seen_in_backward: list[tuple[bool, bool]] = []
    # The tiny generator is below the side where checkpointing pays; count it as large enough here.
    monkeypatch.setattr(ed, "CHECKPOINT_FROM_SIDE", SIZE)

    def record(*args: object) -> None:
        seen_in_backward.append((unet.is_gradient_checkpointing, vae.is_gradient_checkpointing))

    hook = unet.conv_in.register_full_backward_hook(record)
    try:
        checkpointed = ed.reverse_engineer(pipeline, start, red_target(), EditorConfig(iterations=3))
    finally:
        hook.remove()
    # On while EDITOR backpropagates through the shared pipeline, off again for every other caller.
    assert seen_in_backward and all(state == (True, True) for state in seen_in_backward)
    assert not unet.is_gradient_checkpointing and not vae.is_gradient_checkpointing
    # Recomputing the activations changes the memory, not the trajectory: below the side it stays off.
    monkeypatch.setattr(ed, "CHECKPOINT_FROM_SIDE", SIZE + 1)
    seen_in_backward.clear()
    hook = unet.conv_in.register_full_backward_hook(record)
    try:
        stored = ed.reverse_engineer(pipeline, start, red_target(), EditorConfig(iterations=3))
    finally:
        hook.remove()
    assert seen_in_backward and all(state == (False, False) for state in seen_in_backward)
    assert checkpointed.losses == pytest.approx(stored.losses, rel=1e-6, abs=1e-7)
    torch.testing.assert_close(checkpointed.states, stored.states)


def test_checkpointing_that_was_on_stays_on(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ed, "CHECKPOINT_FROM_SIDE", SIZE)
    unet, vae = runtime.pipeline().unet, runtime.pipeline().vae
    unet.enable_gradient_checkpointing()
    try:
        with ed.recomputed_activations(runtime.pipeline()):
            assert unet.is_gradient_checkpointing and vae.is_gradient_checkpointing
        assert unet.is_gradient_checkpointing and not vae.is_gradient_checkpointing
    finally:
        unet.disable_gradient_checkpointing()


def test_the_lms_coefficients_are_integrated_once_per_schedule_and_the_steps_stay_the_same(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = runtime.pipeline().scheduler.config
    integrals: list[int] = []
    quad = lms_module.integrate.quad

    def counted(*args: object, **kwargs: object) -> tuple[float, float]:
        integrals.append(1)
        return quad(*args, **kwargs)

    monkeypatch.setattr(lms_module.integrate, "quad", counted)

    def run(scheduler: LMSDiscreteScheduler, steps: int) -> list[torch.Tensor]:
        """One schedule from fixed noise with fixed 'model outputs': its latents after every step."""
        generator = torch.Generator().manual_seed(3)
        scheduler.set_timesteps(steps)
        latents = torch.randn(1, 4, 8, 8, generator=generator) * scheduler.init_noise_sigma
        trajectory = []
        for t in scheduler.timesteps:
            scheduler.scale_model_input(latents, t)
            latents = scheduler.step(torch.randn(1, 4, 8, 8, generator=generator), t, latents).prev_sample
            trajectory.append(latents)
        return trajectory

    plain, repeated = LMSDiscreteScheduler.from_config(config), ed.RepeatedScheduleLms.from_config(config)
    first = run(repeated, EditorConfig().denoising_steps)
    assert len(integrals) == 1 + 2 + 3 + 4 + 4  # orders 1..4, then 4: one integral per coefficient
    integrals.clear()
    again = run(repeated, EditorConfig().denoising_steps)
    assert not integrals
    expected = run(plain, EditorConfig().denoising_steps)
    assert len(integrals) == 14  # diffusers' own scheduler integrates them every time
    for ours, theirs in zip([*first, *again], [*expected, *expected], strict=True):
        assert torch.equal(ours, theirs)
    # Another schedule has other sigmas, so other coefficients: they are integrated, not taken from the first.
    integrals.clear()
    longer = run(repeated, 7)
    assert integrals
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(longer, run(plain, 7), strict=True))


@pytest.fixture
def two_threads() -> Iterator[None]:
    """The server's job thread: PyTorch's default of one thread per core (two here, whatever the machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("two_threads")
def test_editor_runs_on_one_thread_on_a_small_cpu_generator_and_gives_the_callers_back(
    context: ToolContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = context.runtime.pipeline()
    seen: list[int] = []
    hooks = [
        model.register_forward_pre_hook(lambda module, inputs: seen.append(torch.get_num_threads()))
        for model in (pipeline.unet, pipeline.text_encoder)
    ]
    try:
        request = InvertImageRequest(images=["red.png"], method="editor", iterations=1, max_tokens=4, num_results=1)
        invert_image(request, context)
    finally:
        for hook in hooks:
            hook.remove()
    # The generator check, the start states, every optimisation pass and the selection's renders: one thread; the
    # caller's two after.
    assert len(seen) > 2 * EditorConfig().denoising_steps and set(seen) == {1}
    assert torch.get_num_threads() == 2
    with ed.one_cpu_thread(pipeline):
        assert torch.get_num_threads() == 1
    # At the side where a batch of two has work for every thread, the caller's count stays.
    monkeypatch.setattr(ed, "ONE_THREAD_BELOW_SIDE", SIZE)
    with ed.one_cpu_thread(pipeline):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 2


def test_progress_every_iteration_and_cancel_between_iterations(runtime: Runtime) -> None:
    pipeline = runtime.pipeline()
    start = ed.start_states(pipeline, "a red circle", 32)
    reports: list[tuple[float, float | None]] = []
    ed.reverse_engineer(
        pipeline, start, red_target(), EditorConfig(iterations=4), Progress(lambda d, t, m: reports.append((d, t)))
    )
    assert reports == [(1, 4), (2, 4), (3, 4), (4, 4)]

    seen: list[float] = []

    def cancel_at_three(done: float, total: float | None, message: str | None) -> None:
        seen.append(done)
        if done == 3:
            progress.cancel()

    progress = Progress(cancel_at_three)
    with pytest.raises(JobCancelledError):
        ed.reverse_engineer(pipeline, start, red_target(), EditorConfig(iterations=50), progress=progress)
    assert seen == [1, 2, 3]


def test_bad_inputs_are_refused_with_a_reason(runtime: Runtime) -> None:
    pipeline = runtime.pipeline()
    start = ed.start_states(pipeline, "a red circle", 32)
    with pytest.raises(ValidationError, match="iterations"):
        EditorConfig(iterations=0)
    with pytest.raises(InvalidInputError, match=r"\(N, 3, 32, 32\)"):
        ed.reverse_engineer(pipeline, start, torch.rand(1, 3, 16, 16), EditorConfig(iterations=1))


def test_a_generator_whose_text_encoder_is_not_the_clips_is_refused(runtime: Runtime) -> None:
    ed.check_generator(runtime.pipeline(), runtime.clip())
    torch.manual_seed(1)
    clip = runtime.clip()
    assert isinstance(clip, TransformersClip)
    stranger = TransformersClip(CLIPModel(tiny_clip_config()), clip.tokenizer)
    with pytest.raises(InvalidInputError, match="method='vgd'"):
        ed.check_generator(runtime.pipeline(), stranger)


# --- steps 3-4 and the tool -----------------------------------------------------------------------------------------


class FolderAssets:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.saved: list[dict[str, str]] = []
        self.paths: dict[str, Path] = {}

    def save(self, image: Image.Image, metadata: dict[str, str]) -> SavedImage:
        path = self.directory / f"{len(self.saved)}.png"
        image.save(path)
        self.saved.append(metadata)
        self.paths[path.as_uri()] = path
        return SavedImage(uri=path.as_uri(), path=str(path))


@pytest.fixture
def context(runtime: Runtime, tmp_path: Path) -> ToolContext:
    images = {"red.png": solid((220, 30, 30)), "blue.png": solid((30, 60, 220))}
    return ToolContext(runtime=runtime, assets=FolderAssets(tmp_path), images=PreResolvedImages(images))


def test_invert_image_by_editor_reports_each_prompts_preview_and_similarity(context: ToolContext) -> None:
    reports: list[tuple[float, float | None]] = []
    context.progress = Progress(lambda done, total, message: reports.append((done, total)))
    request = InvertImageRequest(
        images=["red.png", "blue.png"], method="editor", iterations=3, max_tokens=6, num_results=2
    )
    response = invert_image(request, context)
    assert response.method == "editor" and 1 <= len(response.prompts) <= 2
    clip = context.runtime.clip()
    references = clip.encode_image([solid((220, 30, 30)), solid((30, 60, 220))])
    first = response.prompts[0]
    for item in response.prompts:
        assert item.prompt and item.start_prompt == first.start_prompt and item.start_prompt
        assert item.preview in context.assets.paths  # type: ignore[attr-defined]
        preview = Image.open(context.assets.paths[item.preview]).convert("RGB")  # type: ignore[attr-defined]
        # The preview is the prompt's picture from the first selection seed; the similarity is over all four.
        [alone] = ed.select(context.runtime.pipeline(), clip, [(item.prompt, "any")], references, EditorConfig())
        # Batched and lone sampling may round one channel differently (oneDNN picks kernels per batch size).
        difference = np.abs(np.asarray(preview, dtype=int) - np.asarray(alone.image, dtype=int))
        assert preview.size == (SIZE, SIZE) and difference.max() <= 2
        assert item.image_similarity == pytest.approx(alone.image_similarity, abs=1e-4)
        pictures = [
            ed.select(context.runtime.pipeline(), clip, [(item.prompt, "any")], references, one_seed(seed))[0]
            for seed in EditorConfig().selection_seeds
        ]
        assert item.image_similarity == pytest.approx(sum(p.image_similarity for p in pictures) / 4, abs=1e-4)
        assert item.score == item.image_similarity
        assert item.loss_first is not None and item.loss_best is not None
        assert 0.0 <= item.loss_best <= item.loss_first
    assert [p.score for p in response.prompts] == sorted((p.score for p in response.prompts), reverse=True)
    saved = context.assets.saved  # type: ignore[attr-defined]
    assert [m["prompt"] for m in saved] == [p.prompt for p in response.prompts]
    assert all(m["method"] == "editor" and m["seed"] == str(EditorConfig().selection_seeds[0]) for m in saved)
    # Progress rises to the end: the start prompt, 3 iterations, decoding, selection.
    fractions = [done / total for done, total in reports if total]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)


def test_invert_image_refuses_what_editor_cannot_do(context: ToolContext) -> None:
    with pytest.raises(InvalidInputError, match="focus='style' with method='vgd'"):
        invert_image(InvertImageRequest(images=["red.png"], method="editor", focus="style"), context)
    with pytest.raises(InvalidInputError, match="method='editor' only"):
        invert_image(InvertImageRequest(images=["red.png"], iterations=10), context)


def test_the_cli_offers_editor_and_its_iterations(capsys: pytest.CaptureFixture[str]) -> None:
    from pictoprompt.cli import build_parser

    args = build_parser().parse_args(["invert", "x.png", "--method", "editor", "--iterations", "7"])
    assert (args.method, args.iterations) == ("editor", 7)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["invert", "--help"])
    assert "--iterations" in capsys.readouterr().out


# --- the captioner ---------------------------------------------------------------------------------------------------

BLIP_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "red", "blue", "circle", "square", "on"]


def write_tiny_blip(directory: Path) -> Path:
    """A seeded random-init BLIP captioner with a twelve-word BERT tokenizer, in the transformers layout."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(BLIP_WORDS) + "\n")
    tokenizer = BertTokenizer(str(directory / "vocab.txt"), do_lower_case=True, bos_token="[DEC]")
    processor = BlipProcessor(BlipImageProcessor(size={"height": SIZE, "width": SIZE}), tokenizer)
    special = {"bos_token_id": 5, "pad_token_id": 0, "sep_token_id": 3, "eos_token_id": 3}
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = BlipConfig(
        text_config={"vocab_size": len(BLIP_WORDS), "encoder_hidden_size": 32, **small, **special},
        vision_config={"image_size": SIZE, "patch_size": 8, **small},
        projection_dim=32,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_the_blip_captioner_loads_through_the_runtime_and_starts_editor(runtime: Runtime, tmp_path: Path) -> None:
    blip = write_tiny_blip(tmp_path / "blip")
    profile = runtime.profile.model_copy(update={"captioner": str(blip)})
    captioner = Runtime(profile).captioner()
    assert captioner is not None
    captions = captioner.caption([solid((220, 30, 30)), solid((30, 60, 220), (48, 32))], max_new_tokens=5)
    assert len(captions) == 2
    assert all(set(c.split()) <= set(BLIP_WORDS[6:]) and 0 < len(c.split()) <= 5 for c in captions)
    images = [solid((220, 30, 30)), solid((30, 60, 220))]
    start = ed.start_prompt(images, captioner, runtime.llm(), runtime.clip(), None, 32)
    assert start == ", ".join(captioner.caption(images))
    assert Runtime(runtime.profile).captioner() is None
    missing = Runtime(runtime.profile.model_copy(update={"captioner": str(tmp_path / "nowhere")}))
    with pytest.raises(ModelNotFoundError, match="captioner"):
        missing.captioner()


def test_models_check_lists_the_captioner_as_editors() -> None:
    rows = {component: source for component, source, _ in component_status(get_profile("sd15"))}
    assert rows["EDITOR captioner (optional)"] == "Salesforce/blip-image-captioning-large"
    assert not any("captioner" in component for component, _, _ in component_status(get_profile("shapes")))


# --- on the shipped shapes set ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cancel_frees_the_shapes_model_within_a_second(tmp_path: Path) -> None:
    """Figure 4 of the issue: a cancel from another thread in the middle of the optimisation lands at the end of
    that iteration, so the call ends (and the job runner's lock is free) within a second, on the shapes U-Net."""
    from lab.shapes.world import held_out_scenes
    from pictoprompt.models.shapes.scenes import render_scene

    runtime = Runtime(get_profile("shapes"))
    picture = render_scene(held_out_scenes("single", 1)[0])
    optimising = threading.Event()

    def watch(done: float, total: float | None, message: str | None) -> None:
        if message and message.startswith("EDITOR: iteration"):
            optimising.set()

    progress = Progress(watch)
    context = ToolContext(runtime, FolderAssets(tmp_path), PreResolvedImages({"x.png": picture}), progress)
    cancelled_at: list[float] = []

    def cancel_mid_run() -> None:
        optimising.wait()
        time.sleep(0.55)  # not on an iteration boundary
        cancelled_at.append(time.perf_counter())
        progress.cancel()

    canceller = threading.Thread(target=cancel_mid_run, daemon=True)
    canceller.start()
    with pytest.raises(JobCancelledError):
        invert_image(InvertImageRequest(images=["x.png"], method="editor", iterations=1000), context)
    ended = time.perf_counter()
    canceller.join()
    assert ended - cancelled_at[0] < 1.0
    assert context.assets.saved == []  # type: ignore[attr-defined]
