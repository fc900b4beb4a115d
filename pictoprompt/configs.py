"""One frozen config per method: the papers' names and defaults, and each extension of ours as a named field.

A profile carries these configs as data (`models.profiles.Profile`; the `shapes` set's own values are in the data
file beside its weights); a tool passes its profile's config whole to the method, with the few fields a request may
set replaced (`model_copy`), and the method writes what it used onto the concept card. Fields marked "ours" go
beyond the paper; `lab/RESULTS.md` has the figures behind each.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ------------------------------------------------------------------------------------------ SD-IPC (paper 000)


class SdIpcConfig(MethodConfig):
    """SD-IPC's variation (section 3.1, Eq. 7), and the variation's extension of ours."""

    picture_prompt: bool = Field(
        False,
        description="Ours, not in the paper: write the references' readable prompt (VGD's inversion) and condition "
        "on it together with the converted embedding (methods.sd_ipc.prompted_states). False: the paper's SD-IPC.",
    )
    converted_weight: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Ours, with picture_prompt: the converted embedding's share of the states from the prompt's "
        "end-of-text token on (0: the prompt's own states).",
    )
    reading_span: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Ours, with picture_prompt: VGD reads each picture centred on what differs from its border and "
        "zoomed so that this spans that share of a square canvas in the border's colour (methods.sd_ipc."
        "centred_on_object). None: the picture as given. A CLIP that learnt objects of a few sizes misreads others.",
    )
    seed_varies: str | None = Field(
        None,
        description="Ours, with picture_prompt: a regular expression; what it matches is cut from the written "
        "prompt, so that the seeds vary it (the place and the size, which a centred reading cannot know). None: "
        "the prompt as written.",
    )


class TuningConfig(MethodConfig):
    """What SD-IPC-CT and SD-IPC-FT share (sections 3.2, 3.3; authors' code): deep prompts in every layer of the
    image encoder and the U-Net's cross-attention K/V, trained with AdamW."""

    num_prompts: int = Field(50, ge=0, le=200, description="Deep prompts per layer of the image encoder (code: 50).")
    prompt_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the deep prompts (code: 0.1).")
    augment: bool = Field(True, description="Random flips and square crops of the pictures (Custom Diffusion's).")
    seed: int = 0
    prompt_init: Literal["neutral", "random"] = Field(
        "neutral",
        description="Ours: 'neutral' first fits the fresh deep prompts to leave the pictures' embeddings unchanged "
        "(methods.tuning.fit_neutral_prompts), so tuning starts from SD-IPC; 'random': VPT's random start as is.",
    )
    neutral_fit_steps: int = Field(
        50,
        ge=1,
        le=500,
        description="Ours: steps of that fit. Each is a pass with gradients through the image tower: seconds on a GPU, "
        "minutes on a CPU with a ViT-L or larger.",
    )
    prompt_learning_rate: float | None = Field(
        None, gt=0.0, le=1e-1, description="Ours: the deep prompts' rate; none = learning_rate, as the paper."
    )
    caption_alignment: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        description="Ours: weight pulling each converted prompt towards its caption or the concept's description "
        "(methods.tuning.CaptionAlignment); 0 = the paper's loss.",
    )


class ConceptTuningConfig(TuningConfig):
    """SD-IPC-CT (section 3.3): a few reference pictures, the conversion loss only, a constant rate."""

    iterations: int = Field(30, ge=0, le=500, description="Tuning steps (paper: 30; 0: SD-IPC untuned).")
    learning_rate: float = Field(5e-6, gt=0.0, le=1e-3, description="Constant learning rate (paper: 5e-6).")
    aligned_prompt_learning_rate: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Ours: the deep prompts' own rate while aligning to a description; none: `prompt_learning_rate`.",
    )
    place_context_words: bool = Field(
        False,
        description="Ours: in a prompt naming a concept with a description, put the words after its name into the "
        "description where the LLM finds them likeliest, as edit_with_text puts an edit into a prompt ('NAME small' "
        "-> '[concept] a small striped green heart'), instead of after it (for a generator that follows a word only "
        "where its captions put it).",
    )
    candidates_per_picture: int = Field(
        1,
        ge=1,
        le=8,
        description="Ours: for each picture asked of a prompt or an edit that names a concept, draw this many from "
        "their own noises and keep the one the CLIP finds closest to the concept's pictures and description (or, with "
        "candidate_timesteps, the generator's choice); the reported seed reproduces it. 1: the paper's one picture.",
    )
    candidate_timesteps: int = Field(
        0,
        ge=0,
        le=64,
        description="Ours: with candidates, 0: the CLIP judges them; N: the generator's denoising error at N "
        "timesteps does, the description against the same with the other words of the first completion group it uses "
        "(shapes: its fill), which the CLIP tells apart poorly.",
    )


class DomainTuningConfig(TuningConfig):
    """SD-IPC-FT (section 3.2, Eq. 9): ~100 captioned pictures, conversion and text losses, cosine decay."""

    iterations: int = Field(1000, ge=1, le=100_000, description="Training steps of `batch_size` pictures.")
    learning_rate: float = Field(1e-5, gt=0.0, le=1e-2, description="K/V deltas' rate, cosine decay (paper: 1e-5).")
    batch_size: int = Field(4, ge=1, le=256)


# ------------------------------------------------------------------------------------------ VGD (paper 002)


class GeneratorRerank(MethodConfig):
    """Ours, not VGD's: when VGD's prompt for a picture names several subjects, a one-subject prompt is decoded
    too, and the generator chooses between them by how well its denoising explains the picture under each (a
    diffusion classifier, `methods.generator_score`). A small CLIP cannot count; the generator, trained to draw what
    a caption names, explains a one-object picture worse under a two-object caption (lab/results/onecount.md)."""

    candidates: int = Field(
        4, ge=1, le=10, description="How many of the one-subject decode's best hypotheses are judged against VGD's."
    )
    timesteps: int = Field(
        8, ge=1, le=64, description="Noised timesteps each is judged at: one U-Net pass per candidate and timestep."
    )
    seed: int = Field(0, description="The noise draw, the same for every candidate so that their errors compare.")
    joining_words: tuple[str, ...] = Field(
        ("and",),
        description="Words that join a second subject to the first (a comma list does too): the one-subject "
        "decode is written in the profile's dictionary without them. Empty, or a profile without a dictionary: "
        "VGD's choice stands.",
    )


# ------------------------------------------------------------------------------------------ concept description


class DescriptionConfig(MethodConfig):
    """Completing (or writing) a concept's description with the words its pictures show, judged by the generator's
    denoising error (methods.concept_description). All of it is ours: SD-IPC-CT takes no description."""

    completion_words: list[list[str]] | None = Field(
        None,
        description="Groups of alternative words (the fills, the colours) a description may be completed with, one "
        "word at most, none from a group the description already uses. None: the `completion_candidates` "
        "vocabulary words closest to the pictures in CLIP, each alone.",
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
    completion_alignment: int = Field(
        0,
        ge=0,
        le=8,
        description="Pixels (at the generator's size) each picture may be moved, each way, to where the generator "
        "judges it best before the words are judged: for a generator trained on a grid of positions. 0: as given.",
    )
    sweeps: int = Field(2, ge=1, le=8, description="Rounds over the groups when the generator writes a description.")
    seed: int = 0


# ------------------------------------------------------------------------------------------ segmentation


class SegmentationConfig(MethodConfig):
    """Segmentation from the generator's cross-attention (EDITOR's appendix B, after DiffuMask), and the binding of
    ours (methods.segmentation). The defaults were tuned on the `shapes` world's tuning scenes
    (`lab/benchmarks/segment.py --tune`, `--tune-binding`)."""

    timestep: int = Field(100, ge=1, le=999, description="How far the picture is noised before it is denoised.")
    num_steps: int = Field(1, ge=1, le=50, description="DDIM steps recorded.")
    num_noise: int = Field(4, ge=1, le=32, description="Noise draws, in one batch.")
    num_resolutions: int = Field(1, ge=1, le=4, description="The finest attention maps averaged.")
    refinement_steps: int = Field(3, ge=0, le=10, description="Products with the self-attention per map.")
    binding_timesteps: tuple[float, ...] = Field(
        (0.5, 0.7),
        description="Ours: fractions of the schedule at which each word is taken out of the prompt to bind it to "
        "its thing; empty: the attention's region whole.",
    )
    binding_noise: int = Field(4, ge=1, le=32, description="Ours: noise draws per binding timestep.")
    binding_spread: int = Field(
        1, ge=0, le=10, description="Ours: how often the binding is spread along the finest self-attention."
    )
    seed: int = Field(0, description="The noise the picture is looked at through: the same call gives the same masks.")

    @field_validator("binding_timesteps")
    @classmethod
    def _fractions(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not all(0 < fraction < 1 for fraction in value):
            raise ValueError(f"binding_timesteps are fractions of the schedule, in (0, 1); got {value}")
        return value


# ------------------------------------------------------------------------------------------ EDITOR (paper 003)


class EditorConfig(MethodConfig):
    """EDITOR (section 3, authors' code): the text encoder's output states optimised so that the generator redraws
    the picture, decoded into text, the candidates ranked by their pictures (methods.editor)."""

    iterations: int = Field(1000, ge=1, le=100_000, description="Optimisation steps (paper: 1000).")
    max_tokens: int = Field(
        32, ge=1, le=75, description="The start prompt's tokens, and the candidates' (paper: 32 at most, 16 best)."
    )
    denoising_steps: int = Field(5, ge=1, le=50, description="LMS steps the gradient runs through (code: 5).")
    guidance_scale: float = Field(7.5, ge=1.0, le=30.0)
    base_learning_rate: float = Field(0.05, gt=0.0, description="CyclicLR's low end (code: 0.05).")
    max_learning_rate: float = Field(0.1, gt=0.0, description="CyclicLR's high end (code: 0.1).")
    step_size_up: int = Field(50, ge=1, description="CyclicLR's half cycle in iterations (code: 50).")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW's (torch's default, as the code).")
    check_every: int = Field(50, ge=1, description="Iterations between checks for the best states (code: 50).")
    noise_seed: int = Field(0, description="The fixed noise the picture is redrawn from (code: seed 0).")
    candidates_per_target: int = Field(
        3, ge=1, le=10, description="Ours: VGD's best texts kept as candidates (it replaces the unpublished vec2text)."
    )
    selection_seeds: tuple[int, ...] = Field(
        (0, 1, 2, 3),
        min_length=1,
        description="Ours: each candidate is judged on its pictures from these seeds (the paper: one); the first "
        "one's is its preview.",
    )
    selection_steps: int = Field(25, ge=1, le=200, description="Denoising steps of those pictures.")


# ------------------------------------------------------------------------------------------ VGD (paper 002)


class VgdConfig(MethodConfig):
    """Visually guided decoding (section 3, authors' code): an LLM proposes, CLIP rescores every token
    (methods.vgd). `clip_alpha=0` and `llm_alpha=0` are the paper's Table 2 ablations."""

    num_beams: int = Field(10, ge=1, le=64, description="Beams kept each step (paper: K = 10).")
    beam_expand_factor: int = Field(10, ge=1, le=64, description="The LLM proposes num_beams times this (code: 10).")
    llm_alpha: float = Field(1.0, ge=0.0, description="Weight of the LLM's log-probability (code: 1.0).")
    clip_alpha: float = Field(1.5, ge=0.0, description="Weight of CLIP's log-softmax (code: 1.5; paper alpha 0.67).")
    length_penalty_alpha: float = Field(1.2, description="The final pick's length penalty exponent (code: 1.2).")
    length_penalty_offset: int = Field(5, ge=0, description="The final pick's length penalty offset (code: 5).")
    distillation_ratio: float = Field(
        0.3, gt=0.0, le=1.0, description="Distillation's default length, of the long prompt's CLIP tokens (code: 0.3)."
    )
    no_repeat_ngram_size: int = Field(
        3, ge=0, le=16, description="Ours: no beam repeats a run of this many tokens (a small LLM loops); 0: off."
    )
    merge_part_tokens: int = Field(
        16,
        ge=1,
        le=77,
        description="Ours: fuse's `merge` decodes each picture's prompt in at least this many tokens (the paper's "
        "shortest table length); the parts are read by the LLM, not pasted, so they need not share the budget.",
    )
    distillation_keeps_words: bool = Field(
        True,
        description="Ours: distill_prompt's short prompt may only leave words out of the long one, so it invents "
        "nothing (methods.vgd.copied_from). False: the paper's free distillation.",
    )
    style_leaves_out_own_words: bool = Field(
        False,
        description="Ours: invert_image(focus='style') on several pictures first writes each picture's own prompt, "
        "then decodes the style without the words some but not all of them have (one picture's object, colour or "
        "place; methods.shared_style). False: the paper's style decode.",
    )
    style_text_encoder: str | None = Field(
        None,
        description="Ours: invert_image(focus='style') on several pictures scores its hypotheses (and picks its "
        "start word) with this text tower instead of the CLIP's: a safetensors file of a transformers CLIP's "
        "text-tower tensors (models.clip.with_text_tower; builtin: paths allowed), the image tower unchanged. The "
        "shapes profile's was taught style captions (lab/shapes/style.py). None: the CLIP's own, as in the paper.",
    )
