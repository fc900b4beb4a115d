"""Profiles: which weights make up a model set.

A profile names a generator (a diffusers Stable Diffusion 1.x/2.x directory or hub id), a CLIP (transformers
directory/id, or an open_clip name + checkpoint), an LLM (a GGUF file, a GGUF file in a Hugging Face hub
repo, or a transformers causal LM), a captioner, a device and a dtype. Built-in profiles cover the bundled
`shapes` set, the seeded `tiny` set (built on first use into a temporary directory) and the real SD 1.5 and
SD 2.1 sets; more can be defined in a TOML file:

    [profiles.my-sd15]
    generator = "/models/stable-diffusion-v1-5"
    clip = { library = "transformers", source = "/models/clip-vit-large-patch14" }
    llm = { backend = "llama_cpp", source = "/models/llama-3.2-3b-instruct-q4_k_m.gguf" }

    [profiles.my-sd15-hub-llm]
    generator = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    clip = { source = "openai/clip-vit-large-patch14" }
    llm = { source = "bartowski/Llama-3.2-3B-Instruct-GGUF", filename = "*Q4_K_M.gguf", fallback = false }

A hub LLM is downloaded into the Hugging Face cache on first use (never with HF_HUB_OFFLINE set); until it is
there, `fallback = true` (the default) lets the bundled SmolLM2-135M-Instruct stand in, and results say so.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pictoprompt.errors import InvalidInputError, NotFoundError

BUILTIN_SCHEME = "builtin:"


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


class ConceptTuning(BaseModel):
    """`customize_concept`'s defaults on a profile (SD-IPC-CT, paper section 3.3); a request may override them."""

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(30, ge=1, le=500, description="Tuning steps (paper: 30).")
    learning_rate: float = Field(5e-6, gt=0.0, le=1e-3, description="Constant learning rate (paper: 5e-6).")
    neutral_fit_steps: int = Field(
        50,
        ge=1,
        le=500,
        description="Steps fitting the fresh deep prompts to leave the references' embeddings unchanged, before "
        "tuning (not in the paper; see methods.tuning.fit_neutral_prompts). Each is a pass with gradients "
        "through the image tower: seconds on a GPU, minutes on a CPU with a ViT-L or larger.",
    )
    caption_alignment: float = Field(
        0.0,
        ge=0.0,
        description="Weight pulling the concept's converted prompt towards its description, when one is given "
        "(methods.tuning.CaptionAlignment; not in the paper, 0 = the paper's loss).",
    )
    aligned_prompt_learning_rate: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="The deep prompts' own learning rate while aligning to a description; none: the K/V deltas'. "
        "Without a description they always share the K/V deltas' rate.",
    )
    completion_words: list[list[str]] | None = Field(
        None,
        description="Groups of alternative words (the fills, the colours) a description may be completed with, one "
        "word at most, none from a group the description already uses (methods.concept_description; not in the "
        "paper). None: the `completion_candidates` vocabulary words closest to the pictures in CLIP, each alone.",
    )
    completion_candidates: int = Field(
        16, ge=1, le=256, description="With `completion_words` none: how many CLIP-nearest words are tried."
    )
    completion_timesteps: int = Field(
        16, ge=1, le=1000, description="Timesteps at which every candidate's denoising error is measured."
    )
    completion_threshold: float = Field(
        0.01,
        ge=0.0,
        lt=1.0,
        description="A word is added only if it lowers the references' denoising error by more than this "
        "fraction (the median over the pictures of each one's relative change).",
    )
    description_nouns: list[str] | None = Field(
        None,
        description="Without a description: the kinds of thing the generator may name when it writes one, each "
        "with at most one word of every `completion_words` group before it ('a striped green heart'). None: "
        "without a description, none is written.",
    )
    place_context_words: bool = Field(
        False,
        description="In a prompt naming a concept with a description, put the words after its name into the "
        "description where the LLM finds them likeliest, as edit_with_text puts an edit into a prompt ('NAME small' "
        "-> '[concept] a small striped green heart'), instead of after it (not in the paper; for a generator that "
        "follows a word only where its captions put it).",
    )
    completion_alignment: int = Field(
        0,
        ge=0,
        le=8,
        description="Pixels (at the generator's size) each picture may be moved, each way, to where the generator "
        "judges it best before the words are judged: for a generator trained on a grid of positions. 0: as given.",
    )


class DomainTuning(BaseModel):
    """`pictoprompt train-domain`'s defaults on a profile (SD-IPC-FT, paper section 3.2); the command may override
    them."""

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(1000, ge=1, le=100_000, description="Training steps of batch 4.")
    learning_rate: float = Field(1e-5, gt=0.0, le=1e-2, description="K/V deltas' rate, cosine decay (paper: 1e-5).")
    prompt_learning_rate: float | None = Field(
        None, gt=0.0, le=1e-1, description="The deep prompts' rate; none = learning_rate, as the paper."
    )
    caption_alignment: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        description="Weight of the caption-alignment loss (methods.tuning.CaptionAlignment; not in the "
        "paper, 0 = the paper's loss).",
    )


class Variation(BaseModel):
    """`vary_image`'s method on a profile: SD-IPC's variation (paper Eq. 7) unless an extension field is set; a
    request may ask for either."""

    model_config = ConfigDict(extra="forbid")

    picture_prompt: bool = Field(
        False,
        description="Ours, not in the paper: write the references' readable prompt (VGD's inversion) and condition "
        "on it together with the converted embedding (methods.sd_ipc.prompted_states). False: the paper's SD-IPC.",
    )
    converted_weight: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="With picture_prompt: the converted embedding's share of the states from the prompt's "
        "end-of-text token on (0: the prompt's own states).",
    )


class DomainCheck(BaseModel):
    """When a picture is outside a narrow model set's world (`methods.domain`): the tools that read pictures then
    add a `domain_note`. Calibrated per set (`lab/benchmarks/domain_note.py`); real profiles have none."""

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
    concept_tuning: ConceptTuning = Field(
        default_factory=ConceptTuning,
        description="customize_concept's defaults: the paper's (30 iterations at lr 5e-6) unless a profile's models "
        "need others.",
    )
    domain_tuning: DomainTuning = Field(
        default_factory=DomainTuning,
        description="train-domain's defaults: the paper's (1000 iterations at lr 1e-5, no caption alignment) unless a "
        "profile's models need others.",
    )
    distillation: Literal["vgd", "vgd_keep_words", "prune"] = Field(
        "vgd_keep_words",
        description="distill_prompt's method. vgd: the paper's free VGD distillation. vgd_keep_words (ours): VGD whose "
        "short prompt may only leave words out of the long one, so it invents nothing (vgd.copied_from). prune "
        "(ours): deletions that leave CLIP's reading and add fluency, as long as the content needs "
        "(methods/pruning.py).",
    )
    variation: Variation = Field(
        default_factory=Variation,
        description="vary_image's method: the paper's SD-IPC unless a profile's models need more.",
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


# The LLM of the real profiles. VGD's LLM proposes every word CLIP chooses among, so it must do what VGD's
# instruction asks (write one image prompt) instead of writing about the task, which SmolLM2-135M does.
# Llama-3.2-3B-Instruct, as bartowski's llama.cpp quantisation:
# - instruction following: Meta's model card gives it 77.4 on IFEval, the benchmark of exactly this skill;
# - licence: the Llama 3.2 Community Licence allows use, commercial too (below 700M monthly users, with its
#   acceptable-use policy); Qwen2.5-3B-Instruct, the other strong ~3B model, is under the Qwen Research licence
#   (non-commercial), unlike its 1.5B and 7B siblings;
# - gating: Meta's own repo is gated, bartowski's GGUF repo is not, so it downloads with no account or token;
# - size: 3.2B parameters, 2.0 GB at Q4_K_M (its usual quality/size balance), about 2.5 GB of RAM on the CPU;
# - chat template: the GGUF carries Llama 3's template with a system role, which VGD's prompts use, and llama.cpp
#   renders it as is.
# Phi-3.5-mini-instruct (3.8B, MIT) is the pick where a permissive licence matters most; set it in a TOML profile.
INSTRUCT_LLM = LlmSpec(source="bartowski/Llama-3.2-3B-Instruct-GGUF", filename="*Q4_K_M.gguf")

BUILTIN_PROFILES: dict[str, Profile] = {
    profile.name: profile
    for profile in [
        Profile(
            name="shapes",
            description="The bundled miniature SD + CLIP trained on the synthetic shapes world, and SmolLM2 with an "
            "adapter that speaks its language (offline, CPU).",
            generator="builtin:shapes/generator",
            clip=ClipSpec(source="builtin:shapes/clip"),
            llm=LlmSpec(adapter="builtin:shapes/llm/adapter.gguf"),
            vocabulary="builtin:shapes/lexicon.txt",
            dictionary="builtin:shapes/words.txt",
            # VGD's distillation at 30 % dropped places and backgrounds (the adapter learnt short answers without
            # them); pruning keeps them (lab/results/distill.md).
            distillation="prune",
            # 30 steps at 1e-4 was the best of the sweep on concepts kept apart from the evaluated ones
            # (`pictoprompt bench concepts --sweep`), against the paper's 5e-6 and against 100 steps, and the
            # fastest. The larger rate than the paper's suits these small weights. With a description, aligning to
            # it with the deep prompts at 1e-2 did best on those concepts; without one, the deep prompts at 1e-2
            # lost identity, so they keep 1e-4 (figures: lab/RESULTS.md, "SD-IPC-CT: learned concepts").
            # A description is completed with a fill or a colour: what the object is, never where it stands or how
            # large one picture shows it. Among every lexicon word, position words ("middle") explained the bench's
            # references better for 3 of its 10 concepts, and size words won on pictures drawn at other sizes. The
            # shapes U-Net only judges pictures on its grid, hence the alignment (lab/RESULTS.md, "SD-IPC-CT:
            # learned concepts").
            concept_tuning=ConceptTuning(
                iterations=30,
                learning_rate=1e-4,
                caption_alignment=1.0,
                aligned_prompt_learning_rate=1e-2,
                completion_words=[
                    ["solid", "outlined", "striped"],
                    ["black", "blue", "gray", "green", "orange", "pink", "purple", "red", "white", "yellow"],
                ],
                description_nouns=["circle", "square", "triangle", "star", "heart", "cross"],
                completion_alignment=4,
                # The generator follows a size word before the noun only: "a striped blue circle small" came out
                # small 2 times in 6, "a small striped blue circle" 6 in 6, so "NAME small" lost its context.
                place_context_words=True,
            ),
            # The paper's loss and rate gave no gain on a domain of striped objects (`pictoprompt bench domain`):
            # the image side loses the stripes. Caption alignment with the deep prompts at 1e-2 was chosen on the
            # domain's tuning scenes, against the paper's settings, and measured on its evaluation scenes
            # (lab/RESULTS.md, "SD-IPC-FT: domain fine-tuning").
            domain_tuning=DomainTuning(prompt_learning_rate=1e-2, caption_alignment=1.0),
            # SD-IPC's conversion alone loses the shape and the background of a picture drawn with PIL (on tuning
            # pictures, not the reported ones: shape 57 %, background 63 %); the picture's own prompt keeps them
            # (82 %, 98 %), and any share of the converted embedding combined with it lowered every attribute
            # (0.5: shape 72 %, colour 82 %) (lab/results/quality-b.md).
            variation=Variation(picture_prompt=True, converted_weight=0.0),
            # The 1st percentile of the flat-region coverage of 1,000 calibration pictures: the world's training-like
            # scenes and pictures drawn with PIL off its grid, none from an evaluation set (`pictoprompt bench
            # domain_note --calibrate`; lab/results/quality-a.md).
            domain_check=DomainCheck(
                min_coverage=0.38,
                world="flat coloured shapes on a plain background",
                instead="For photos and other real pictures use a real profile such as sd15 (--profile sd15).",
            ),
        ),
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


def available_profiles(profiles_file: Path | None = None) -> dict[str, Profile]:
    profiles = dict(BUILTIN_PROFILES)
    if profiles_file is not None:
        profiles.update(load_profiles_file(profiles_file))
    return profiles


def default_profile_name() -> str:
    """`shapes` once its weights ship in the package, else `tiny`."""
    from pictoprompt.models.shapes import weights_present

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
