"""Profiles: which weights make up a model set, and each method's settings on it.

A profile names a generator (a diffusers Stable Diffusion 1.x/2.x directory or hub id), a CLIP (transformers, or an
open_clip name + checkpoint), an LLM (a GGUF file, a GGUF file in a Hugging Face hub repo, or a transformers causal
LM), a captioner, a device and a dtype. Built-in profiles cover the bundled `shapes` set, the seeded `tiny` set and
the real SD 1.5 and SD 2.1 sets; more can be defined in a TOML file of `[profiles.NAME]` tables (README,
"Profiles and real weights"). A hub LLM is downloaded into the Hugging Face cache on first use (never with
HF_HUB_OFFLINE set); until then, `fallback = true` lets the bundled SmolLM2-135M-Instruct stand in, and results say so.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pictoprompt.configs import (
    ConceptTuningConfig,
    DescriptionConfig,
    DomainTuningConfig,
    EditorConfig,
    GeneratorRerank,
    SdIpcConfig,
    SegmentationConfig,
    VgdConfig,
)
from pictoprompt.errors import InvalidInputError, NotFoundError
from pictoprompt.models.shapes import WEIGHTS_DIR, weights_present

BUILTIN_SCHEME = "builtin:"
SHAPES_PROFILE_FILE = WEIGHTS_DIR / "profile.toml"


class LlmSpec(BaseModel):
    """The LLM of a profile."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["llama_cpp", "transformers"] = "llama_cpp"
    source: str | None = Field(
        None,
        description="llama_cpp: a GGUF file, or a Hugging Face hub repo id with `filename`; transformers: a "
        "directory or hub id. None = the bundled SmolLM2-135M-Instruct.",
    )
    filename: str | None = Field(
        None,
        description="llama_cpp with a hub repo id as `source`: the GGUF file in that repo, a name or a glob pattern "
        "such as '*Q4_K_M.gguf'.",
    )
    adapter: str | None = Field(
        None,
        description="A LoRA adapter in llama.cpp's GGUF adapter format, applied on top of the model (both backends).",
    )
    fallback: bool = Field(
        True,
        description="When `source` is not on this machine (offline, not yet downloaded), use the bundled "
        "SmolLM2-135M-Instruct instead of failing; results then say so.",
    )
    n_threads: int | None = Field(None, ge=1, description="llama_cpp: CPU threads; none = half the cores.")


class ClipSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    library: Literal["transformers", "open_clip"] = "transformers"
    source: str = Field(description="transformers: a directory or hub id; open_clip: an architecture name.")
    pretrained: str | None = Field(None, description="open_clip only: a checkpoint tag or a file path.")


class DomainCheck(BaseModel):
    """When a picture is outside a narrow model set's world (`methods.domain`), calibrated per set; real profiles
    have none."""

    model_config = ConfigDict(extra="forbid")

    min_coverage: float = Field(
        ge=0.0, le=1.0, description="A picture whose flat-region coverage is below this is outside the world."
    )
    regions: int = Field(4, ge=1, le=16, description="Flat regions a world picture is made of (background + objects).")
    latent_radius: float = Field(0.2, gt=0.0, description="How near a VAE latent must be to a region's centre.")
    working_size: int = Field(64, ge=16, le=512, description="Pixels of the square every picture is judged at.")
    world: str = Field(description="The world in a few words, for the note.")
    instead: str = Field(description="What to use for other pictures, for the note.")


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    generator: str = Field(description="A diffusers Stable Diffusion directory or hub id.")
    clip: ClipSpec
    llm: LlmSpec = Field(default_factory=LlmSpec)
    captioner: str | None = Field(None, description="A BLIP captioning directory or hub id (EDITOR).")
    vocabulary: str | None = Field(
        None,
        description="A word list (one word per line) that VGD's beam initialisation picks the start word from: the "
        "words this CLIP was trained on. None = every word of the CLIP tokenizer (right for real CLIPs).",
    )
    dictionary: str | None = Field(
        None,
        description="A word list (one word per line): the only words VGD's prompts may use, because they are the "
        "only ones this CLIP (and so the generator's text encoder) learnt. None = any word (right for real CLIPs).",
    )
    sd_ipc: SdIpcConfig = Field(
        default_factory=SdIpcConfig,
        description="vary_image's method: the paper's SD-IPC unless a profile's models need more.",
    )
    concept_tuning: ConceptTuningConfig = Field(
        default_factory=ConceptTuningConfig,
        description="customize_concept's tuning (SD-IPC-CT): the paper's (30 iterations at lr 5e-6) unless a profile's "
        "models need others.",
    )
    concept_description: DescriptionConfig = Field(
        default_factory=DescriptionConfig, description="How customize_concept completes or writes a description (ours)."
    )
    domain_tuning: DomainTuningConfig = Field(
        default_factory=DomainTuningConfig,
        description="train-domain's defaults (SD-IPC-FT): the paper's (1000 iterations at lr 1e-5, no caption "
        "alignment) unless a profile's models need others.",
    )
    segmentation: SegmentationConfig = Field(default_factory=SegmentationConfig, description="segment_image's method.")
    editor: EditorConfig = Field(
        default_factory=EditorConfig,
        description="invert_image's EDITOR: the paper's, with the request's iterations (default 100) and tokens.",
    )
    vgd: VgdConfig = Field(
        default_factory=VgdConfig,
        description="VGD as invert_image, fuse_concepts, distill_prompt and the picture prompts use it: the paper's, "
        "and distill_prompt keeping the long prompt's words (ours).",
    )
    distillation: Literal["vgd", "prune"] = Field(
        "vgd",
        description="distill_prompt's method: vgd, the paper's VGD distillation (with vgd.distillation_keeps_words), "
        "or prune (ours): deletions that leave CLIP's reading and add fluency, as long as the content needs "
        "(methods/pruning.py).",
    )
    vgd_rerank: GeneratorRerank | None = Field(
        None,
        description="Ours, not the paper's: VGD's best prompts for a picture's content reordered by the generator "
        "(configs.GeneratorRerank). None: the paper's choice, the best length-penalised score.",
    )
    domain_check: DomainCheck | None = Field(
        None, description="Only for a set trained on a narrow world: when a picture is outside it. None: never."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto = float16 on a GPU, float32 on the CPU."
    )

    @property
    def is_builtin_set(self) -> bool:
        return self.generator.startswith(BUILTIN_SCHEME)


def load_profiles_file(path: Path) -> dict[str, Profile]:
    """Profiles from a TOML file's `[profiles.NAME]` tables."""
    try:
        tables = tomllib.loads(path.read_text()).get("profiles", {})
    except FileNotFoundError as error:
        raise NotFoundError(f"The profiles file {path} does not exist; create it or drop the option.") from error
    except tomllib.TOMLDecodeError as error:
        raise InvalidInputError(f"The profiles file {path} is not valid TOML ({error}); fix it and retry.") from error
    profiles = {}
    for name, table in tables.items():
        try:
            profiles[name] = Profile(name=name, **table)
        except (ValidationError, TypeError) as error:
            raise InvalidInputError(
                f"Profile '{name}' in {path} is invalid: {error}. It needs at least `generator` and "
                "`clip = {{ source = ... }}`."
            ) from error
    return profiles


# The LLM of the real profiles. VGD's LLM proposes every word CLIP chooses among, so it must write the one image
# prompt VGD's instruction asks for, which SmolLM2-135M does not. Llama-3.2-3B-Instruct, as bartowski's llama.cpp
# quantisation: strong instruction following for ~3B (IFEval), a licence that allows commercial use (unlike
# Qwen2.5-3B's), not gated, 2.0 GB at Q4_K_M, and a chat template with a system role. Phi-3.5-mini-instruct (MIT)
# is the pick where a permissive licence matters most; set it in a TOML profile.
INSTRUCT_LLM = LlmSpec(source="bartowski/Llama-3.2-3B-Instruct-GGUF", filename="*Q4_K_M.gguf")

BUILTIN_PROFILES: dict[str, Profile] = {
    profile.name: profile
    for profile in [
        # The bundled set's profile, its own method settings with it, is data beside its weights.
        load_profiles_file(SHAPES_PROFILE_FILE)["shapes"],
        Profile(
            name="tiny",
            description="Seeded random-init components for tests: right shapes, meaningless pictures.",
            generator="builtin:tiny/generator",
            clip=ClipSpec(source="builtin:tiny/clip"),
        ),
        Profile(
            name="sd15",
            description="Stable Diffusion 1.5 with OpenAI CLIP ViT-L/14 (its own text encoder).",
            generator="stable-diffusion-v1-5/stable-diffusion-v1-5",
            clip=ClipSpec(source="openai/clip-vit-large-patch14"),
            llm=INSTRUCT_LLM.model_copy(),
            captioner="Salesforce/blip-image-captioning-large",
        ),
        Profile(
            name="sd21",
            description="Stable Diffusion 2.1 with OpenCLIP ViT-H/14 (laion2b_s32b_b79k).",
            generator="stabilityai/stable-diffusion-2-1",
            clip=ClipSpec(library="open_clip", source="ViT-H-14", pretrained="laion2b_s32b_b79k"),
            llm=INSTRUCT_LLM.model_copy(),
            captioner="Salesforce/blip-image-captioning-large",
        ),
    ]
}


def available_profiles(profiles_file: Path | None = None) -> dict[str, Profile]:
    profiles = dict(BUILTIN_PROFILES)
    if profiles_file is not None:
        profiles.update(load_profiles_file(profiles_file))
    return profiles


def default_profile_name() -> str:
    """`shapes` once its weights ship in the package, else `tiny`."""
    return "shapes" if weights_present() else "tiny"


def get_profile(name: str | None, profiles_file: Path | None = None) -> Profile:
    profiles = available_profiles(profiles_file)
    name = name or default_profile_name()
    if name not in profiles:
        raise NotFoundError(
            f"There is no profile '{name}'. Known profiles: {', '.join(sorted(profiles))}; define others in a "
            "TOML file passed with --profiles-file (see README, 'Profiles')."
        )
    return profiles[name]
