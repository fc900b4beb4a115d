"""SD-IPC's conversion, the SD-IPC edit and VGD's scoring on the real-size architectures (random weights).

The sets (`lab.real_size`) are built once into the user's cache, or $PICTOPROMPT_REAL_SIZE_DIR
(sd15 about 22 s and 3.0 GB, sd21 about 70 s and 4.6 GB, llm-1b 19 s and 2.5 GB on one CPU core). The CPU tests
run at a reduced resolution, SD 1.5 in float16 (the dtype a GPU runs it in: every value the methods compute in
float32 must stay float32) and SD 2.1 in float32 (float16 on a CPU is slow; its OpenCLIP image tower is checked
in float16 on its own). They are `slow` and `real_size`: `make test` skips them, `make test-slow` (and so CI) runs them,
about 7 minutes on a shared two-core machine once the sets are built; `-m "slow and not real_size"` leaves them
out. The `gpu` tests run the same at the native resolution on CUDA in float16.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lab.real_size import LLAMA3_VOCAB_SIZE, build_real_size_set, real_size_dir, real_size_profile
from pictoprompt.methods.sd_ipc import (
    VIT_L_TARGET_NORM,
    ImageToPrompt,
    conversion_matrix,
    edit_states,
    embed_references,
    variation_states,
)
from pictoprompt.methods.vgd import clip_log_probs, image_targets
from pictoprompt.models.clip import OpenClipClip
from pictoprompt.models.runtime import Runtime
from pictoprompt.progress import Progress
from pictoprompt.server.images import PreResolvedImages
from pictoprompt.tools.base import SavedImage, ToolContext
from pictoprompt.tools.edit_with_text import EditWithTextRequest, edit_with_text

NEEDED_MEMORY_GB = 16
NEEDED_DISK_GB = 12
"""What the sets take: SD 2.1 in float32 holds about 10 GB; the three sets are 10 GB on disk."""


def _missing_resources() -> str | None:
    """Why this machine cannot hold the sets, or None: a runner too small is told so, not killed."""
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    folder = real_size_dir()
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    disk_gb = shutil.disk_usage(existing).free / 1e9
    built = folder.exists() and any(folder.iterdir())
    if memory_gb < NEEDED_MEMORY_GB:
        return f"the real-size sets need {NEEDED_MEMORY_GB} GB of memory; this machine has {memory_gb:.0f}"
    if not built and disk_gb < NEEDED_DISK_GB:
        return f"the real-size sets need {NEEDED_DISK_GB} GB free in {folder}; there are {disk_gb:.0f}"
    return None


pytestmark = [
    pytest.mark.real_size,
    pytest.mark.skipif(_missing_resources() is not None, reason=_missing_resources() or ""),
]

CPU_SIDE = 64
"""Pixels of the CPU tests' pictures: an 8x8 latent, the smallest every U-Net level can halve."""
WIDTHS = {"sd15": {"text": 768, "embed": 768}, "sd21": {"text": 1024, "embed": 1024}}
"""Text-state width D and joint-space width P of each set's CLIP."""
PUBLISHED_PARAMETERS = {
    ("sd15", "generator/unet"): 859_520_964,
    ("sd15", "generator/vae"): 83_653_863,
    ("sd15", "clip"): 427_616_513,
    ("sd21", "generator/unet"): 865_910_724,
    ("sd21", "generator/vae"): 83_653_863,
    ("sd21", "generator/text_encoder"): 340_387_840,
    ("sd21", "clip"): 986_109_441,
}
"""Parameter counts of the published checkpoints (diffusers' and open_clip's own figures)."""


def stored_tensors(directory: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) of every tensor in the safetensors files under `directory`, read from their headers."""
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
        header.pop("__metadata__", None)
        tensors.update({name: (entry["dtype"], entry["shape"]) for name, entry in header.items()})
    return tensors


class Sink:
    def __init__(self) -> None:
        self.images: list[Image.Image] = []

    def save(self, image: Image.Image, metadata: dict[str, str]) -> SavedImage:
        self.images.append(image)
        return SavedImage(uri=f"test://{len(self.images)}", path="/nowhere.png")


def noise_picture(side: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


def loaded_runtime(set_name: str, device: str, side: int | None, dtype: str = "float16") -> Runtime:
    """The set's generator and CLIP in `dtype`, loaded by the profile machinery; `side` sets the U-Net's default
    size (its weights do not depend on it)."""
    runtime = Runtime(real_size_profile(set_name, dtype=dtype, device=device))  # type: ignore[arg-type]
    pipeline = runtime.pipeline()
    if side is not None:
        pipeline.unet.register_to_config(sample_size=side // pipeline.vae_scale_factor)
    runtime.clip()
    return runtime


@pytest.fixture(scope="module", params=[("sd15", "float16"), ("sd21", "float32")], ids=["sd15-fp16", "sd21-fp32"])
def cpu_runtime(request: pytest.FixtureRequest) -> Iterator[Runtime]:
    """SD 2.1 runs in float32 here: float16 on a CPU is several times slower, and its image tower's float16 path
    has its own test (`test_open_clip_in_float16_embeds_images`)."""
    set_, dtype = request.param
    runtime = loaded_runtime(set_, "cpu", CPU_SIDE, dtype)
    yield runtime
    # One set at a time in memory: the next parameter loads the other.
    runtime._components.clear()


def set_name(runtime: Runtime) -> str:
    return runtime.profile.name.removeprefix("real-size-")


# ------------------------------------------------------------------------------------------------ the sets


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_sets_have_the_published_sizes_stored_in_float16(name: str):
    directory = build_real_size_set(name)
    for (set_, component), expected in PUBLISHED_PARAMETERS.items():
        if set_ != name:
            continue
        tensors = stored_tensors(directory / component)
        assert sum(math.prod(shape) for _, shape in tensors.values()) == expected, component
        assert {dtype for dtype, _ in tensors.values()} == {"F16"}, component
    scheduler = json.loads((directory / "generator/scheduler/scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == ("v_prediction" if name == "sd21" else "epsilon")


@pytest.mark.slow
def test_the_1b_llm_has_llama_3_2_1b_shapes():
    directory = build_real_size_set("llm-1b")
    tensors = stored_tensors(directory)
    # Tied embeddings: one (128256, 2048) matrix serves input and output, as in Llama 3.2 1B (1.236B parameters).
    assert tensors["model.embed_tokens.weight"] == ("F16", [LLAMA3_VOCAB_SIZE, 2048])
    assert "lm_head.weight" not in tensors
    assert sum(math.prod(shape) for _, shape in tensors.values()) == 1_235_814_400


@pytest.mark.slow
def test_sd21_text_encoder_gives_the_open_clip_towers_penultimate_states(cpu_runtime: Runtime):
    if set_name(cpu_runtime) != "sd21":
        pytest.skip("SD 2.x only")
    pipeline, clip = cpu_runtime.pipeline(), cpu_runtime.clip()
    model = clip.model  # type: ignore[attr-defined]
    ids = clip.tokenize(["a photo of a red circle on a blue background"])
    with torch.no_grad():
        cast = model.transformer.get_cast_dtype()
        states = model.token_embedding(ids).to(cast) + model.positional_embedding.to(cast)
        for block in model.transformer.resblocks[:-1]:
            states = block(states, attn_mask=model.attn_mask)
        penultimate = model.ln_final(states)
        ours = pipeline.text_encoder(ids)[0]
        last = clip.text_states(ids)
    assert ours.shape == penultimate.shape == (1, 77, 1024) and ours.dtype == cpu_runtime.dtype
    torch.testing.assert_close(ours.float(), penultimate.float(), atol=1e-4, rtol=1e-4)
    # ...and not the last layer's, which the CLIP's own text embedding reads.
    assert not torch.allclose(ours.float(), last.float(), atol=0.1)


# ------------------------------------------------------------------------------------------------ methods, CPU


def check_conversion(runtime: Runtime, side: int) -> None:
    name, pipeline, clip = set_name(runtime), runtime.pipeline(), runtime.clip()
    widths = WIDTHS[name]
    assert pipeline.unet.dtype == runtime.dtype and clip.text_projection.dtype == torch.float32
    converter = ImageToPrompt.cached(clip, pipeline)
    # The pseudo-inverse and the 27.5 norm are float32 whatever the weights' dtype.
    assert converter.W_t_pinv.dtype == torch.float32
    assert converter.W_t_pinv.shape == (widths["text"], widths["embed"])
    assert torch.equal(converter.W_t_pinv, conversion_matrix(clip.text_projection.half()))
    if name == "sd15":
        assert converter.norm == VIT_L_TARGET_NORM
    else:
        # SD 2.x: the mean EOS-state norm of the generator's own (penultimate-layer) states, a float32 figure.
        assert isinstance(converter.norm, float) and math.isfinite(converter.norm) and converter.norm > 0
    image_embeds = embed_references(clip, [noise_picture(side, 0), noise_picture(side, 1)])
    assert image_embeds.dtype == torch.float32 and image_embeds.shape == (2, widths["embed"])
    f_cnvrt = converter.convert(image_embeds)
    assert f_cnvrt.dtype == torch.float32 and f_cnvrt.shape == (2, widths["text"])
    assert torch.allclose(f_cnvrt.norm(dim=-1), torch.full((2,), converter.norm), rtol=1e-5)
    prompt, negative = variation_states(clip, pipeline, image_embeds)
    assert prompt.shape == negative.shape == (1, 77, widths["text"])
    assert prompt.dtype == negative.dtype == torch.float32 and torch.isfinite(prompt).all()


def check_edit(runtime: Runtime, side: int) -> None:
    name, pipeline, clip = set_name(runtime), runtime.pipeline(), runtime.clip()
    image_embeds = embed_references(clip, [noise_picture(side)])
    prompt, negative = edit_states(clip, pipeline, image_embeds, "in the snow")
    assert prompt.shape == negative.shape == (1, 77, WIDTHS[name]["text"])
    assert prompt.dtype == negative.dtype == torch.float32
    # Through the tool: the float32 conditioning meets the float16 U-Net, and the picture has the asked size.
    sink = Sink()
    context = ToolContext(runtime, sink, PreResolvedImages({"ref": noise_picture(side)}), Progress(), None)
    request = EditWithTextRequest(
        image="ref", text="in the snow", method="sd-ipc", num_images=1, steps=1, seed=0, width=side, height=side
    )
    result = edit_with_text(request, context)
    assert [image.size for image in sink.images] == [(side, side)]
    assert result.images[0].width == side


def check_vgd_scoring(runtime: Runtime, side: int) -> None:
    clip = runtime.clip()
    embed = WIDTHS[set_name(runtime)]["embed"]
    targets = image_targets(clip, [noise_picture(side)])
    assert targets.dtype == torch.float32 and targets.shape == (1, embed)
    texts = ["a red circle", "a dog on the grass", "an oil painting of a lake"]
    with torch.no_grad():
        text_embeddings = clip.encode_text(texts)
    assert text_embeddings.dtype == torch.float32 and text_embeddings.shape == (3, embed)
    scores = clip_log_probs(text_embeddings, targets, clip.logit_scale)
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    # A log-softmax over the candidates: the probabilities sum to one.
    assert torch.isfinite(scores).all() and math.isclose(float(scores.exp().sum()), 1.0, rel_tol=1e-5)
    assert math.isclose(clip.logit_scale, 100.0, rel_tol=1e-3)


@pytest.mark.slow
def test_sd_ipc_conversion_in_float32(cpu_runtime: Runtime):
    check_conversion(cpu_runtime, CPU_SIDE)


@pytest.mark.slow
def test_sd_ipc_edit(cpu_runtime: Runtime):
    check_edit(cpu_runtime, CPU_SIDE)


@pytest.mark.slow
def test_vgd_scoring(cpu_runtime: Runtime):
    check_vgd_scoring(cpu_runtime, CPU_SIDE)


@pytest.fixture(scope="module")
def open_clip_fp16() -> OpenClipClip:
    profile = real_size_profile("sd21", dtype="float16", device="cpu")
    return OpenClipClip.from_pretrained(
        profile.clip.source, profile.clip.pretrained, torch.device("cpu"), torch.float16
    )


@pytest.mark.slow
def test_open_clip_in_float16_gives_float32_text_embeddings_and_conversion(open_clip_fp16: OpenClipClip):
    assert open_clip_fp16.model.visual.conv1.weight.dtype == torch.float16
    assert open_clip_fp16.text_projection.dtype == torch.float32
    assert conversion_matrix(open_clip_fp16.text_projection).dtype == torch.float32
    embeddings = open_clip_fp16.encode_text(["a red circle", "a dog"])
    assert embeddings.dtype == torch.float32 and embeddings.shape == (2, 1024) and torch.isfinite(embeddings).all()


@pytest.mark.slow
def test_open_clip_in_float16_embeds_images(open_clip_fp16: OpenClipClip):
    embeddings = open_clip_fp16.encode_image([noise_picture(CPU_SIDE)])
    assert embeddings.dtype == torch.float32 and embeddings.shape == (1, 1024)


# ------------------------------------------------------------------------------------------------ native size, GPU


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def cuda_runtime(request: pytest.FixtureRequest) -> Iterator[Runtime]:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    runtime = loaded_runtime(request.param, "cuda", None)
    yield runtime
    runtime._components.clear()
    torch.cuda.empty_cache()


def native_side(runtime: Runtime) -> int:
    pipeline = runtime.pipeline()
    return pipeline.unet.config.sample_size * pipeline.vae_scale_factor


@pytest.mark.gpu
def test_sd_ipc_conversion_at_native_size_on_cuda(cuda_runtime: Runtime):
    check_conversion(cuda_runtime, native_side(cuda_runtime))


@pytest.mark.gpu
def test_sd_ipc_edit_at_native_size_on_cuda(cuda_runtime: Runtime):
    check_edit(cuda_runtime, native_side(cuda_runtime))


@pytest.mark.gpu
def test_vgd_scoring_at_native_size_on_cuda(cuda_runtime: Runtime):
    check_vgd_scoring(cuda_runtime, native_side(cuda_runtime))
