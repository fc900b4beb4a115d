"""Real-size model sets: seeded random-init copies of the real architectures, built from their published configs.

Weights cannot be downloaded everywhere, but speed, memory, shapes and dtypes do not depend on them. These sets
have exactly the published shapes:

- `sd15`: the Stable Diffusion 1.5 U-Net and VAE (epsilon prediction, 512 px) with OpenAI CLIP ViT-L/14, whose text
  tower is the generator's text encoder (as in SD 1.x);
- `sd21`: the Stable Diffusion 2.1 U-Net and VAE (v-prediction, 768 px) with OpenCLIP ViT-H/14 (built with
  `open_clip.create_model("ViT-H-14", pretrained=None)`) and its Hugging Face text encoder: the first 23 of the
  tower's 24 layers and its final layer norm, which is how SD 2.x conditions on the penultimate layer;
- `llm-1b` and `llm-3b`: Llama 3.2 1B / 3B-shaped causal LMs (transformers layout) with a word-level tokenizer of
  CLIP's whole words, padded to Llama 3's 128,256-row vocabulary like a real checkpoint's logits.

A set is built once into a cache folder (`real_size_dir`), stored in float16, and then loaded by the same profile
and loader code as real weights (`real_size_profile` returns the `Profile`). The pictures are noise.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

from lab.schedule import build_scheduler
from pictoprompt.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from pictoprompt.models.clip_tokenizer import CLIP_VOCAB_SIZE, load_clip_tokenizer, write_clip_tokenizer
from pictoprompt.models.profiles import ClipSpec, LlmSpec, Profile

logger = logging.getLogger(__name__)

SetName = Literal["sd15", "sd21"]
LlmSize = Literal["1b", "3b"]

REAL_SIZE_SEED = 0
STORAGE_DTYPE = torch.float16
"""Every weight is stored in float16 (the dtype real checkpoints are shared in); loaders cast to the profile's."""
OPEN_CLIP_ARCHITECTURE = "ViT-H-14"
OPEN_CLIP_CHECKPOINT = "open_clip_model.safetensors"
CLIP_LOGIT_SCALE = 100.0
"""The learned temperature of both trained CLIPs; a fresh model starts at 1/0.07 instead."""
_COMPLETE = "complete.json"


def real_size_dir(base: Path | None = None) -> Path:
    """Where the sets are built: `base`, else $PICTOPROMPT_REAL_SIZE_DIR, else <cache>/pictoprompt/real-size."""
    if base is not None:
        return base
    configured = os.environ.get("PICTOPROMPT_REAL_SIZE_DIR")
    if configured:
        return Path(configured).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "pictoprompt" / "real-size"


# ------------------------------------------------------------------------------------------------ configs


def sd_unet_config(set_name: SetName) -> dict:
    """The published `unet/config.json` values of SD 1.5 and SD 2.1 (768-v)."""
    config = {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
    }
    if set_name == "sd21":
        # SD 2.x: 768 px, 1024-wide text states, 64-channel heads, linear projections in the transformers.
        config.update(
            sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
        )
    return config


def sd_vae_config(set_name: SetName) -> dict:
    """The published `vae/config.json` values (the same autoencoder for both; only its nominal size differs)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "sample_size": 768 if set_name == "sd21" else 512,
        "scaling_factor": 0.18215,
    }


def sd_scheduler(set_name: SetName) -> DDIMScheduler:
    """SD's noise schedule (the one the `shapes` set trains with); SD 2.1 (768-v) predicts v instead of the noise."""
    prediction_type = "v_prediction" if set_name == "sd21" else "epsilon"
    return DDIMScheduler.from_config(build_scheduler().config, prediction_type=prediction_type)


def vit_l14_config() -> CLIPConfig:
    """`openai/clip-vit-large-patch14`: a 768-wide, 12-layer text tower and a 1024-wide, 24-layer ViT at 224 px."""
    return CLIPConfig(
        text_config={
            "vocab_size": CLIP_VOCAB_SIZE,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
        },
        projection_dim=768,
    )


def sd21_text_encoder_config() -> CLIPTextConfig:
    """SD 2.1's `text_encoder/config.json`: OpenCLIP ViT-H/14's text tower less its last layer."""
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=512,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def llama_config(size: LlmSize, vocab_size: int, bos_token_id: int, eos_token_id: int) -> dict:
    """Llama 3.2 1B / 3B's published shapes (1.24B / 3.21B parameters with tied embeddings)."""
    shapes = {
        "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "head_dim": 64},
        "3b": {"hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24, "head_dim": 128},
    }[size]
    return {
        **shapes,
        "vocab_size": vocab_size,
        "intermediate_size": 8192,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
    }


LLAMA3_VOCAB_SIZE = 128256


# ------------------------------------------------------------------------------------------------ building


def _set_logit_scale(parameter: torch.nn.Parameter) -> None:
    with torch.no_grad():
        parameter.fill_(math.log(CLIP_LOGIT_SCALE))


def _write_generator(
    directory: Path, set_name: SetName, text_encoder: CLIPTextModel, tokenizer_dir: Path, seed: int
) -> None:
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**sd_unet_config(set_name))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**sd_vae_config(set_name))
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(tokenizer_dir),
        unet=unet,
        scheduler=sd_scheduler(set_name),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.to(dtype=STORAGE_DTYPE)
    pipeline.save_pretrained(directory, safe_serialization=True)


def _write_sd15(directory: Path, seed: int) -> None:
    clip_dir = directory / "clip"
    write_clip_tokenizer(clip_dir)
    torch.manual_seed(seed)
    clip = CLIPModel(vit_l14_config()).eval()
    _set_logit_scale(clip.logit_scale)
    # SD 1.x's text encoder is this CLIP's text tower, weight for weight.
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    clip.to(STORAGE_DTYPE).save_pretrained(clip_dir, safe_serialization=True)
    preprocessor = {"image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "size": 224}
    (clip_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    del clip
    _write_generator(directory / "generator", "sd15", text_encoder, clip_dir, seed)


def open_clip_text_state_dict(open_clip_model: torch.nn.Module, num_layers: int) -> dict[str, torch.Tensor]:
    """The first `num_layers` layers of an open_clip text tower (and its final layer norm) as a transformers
    `CLIPTextModel` state dict: the mapping of diffusers' SD 2.x conversion script."""
    source = open_clip_model.state_dict()
    state = {
        "embeddings.token_embedding.weight": source["token_embedding.weight"],
        "embeddings.position_embedding.weight": source["positional_embedding"],
        "final_layer_norm.weight": source["ln_final.weight"],
        "final_layer_norm.bias": source["ln_final.bias"],
    }
    for layer in range(num_layers):
        ours, theirs = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        # open_clip keeps q, k and v as one (3D, D) projection.
        for kind in ("weight", "bias"):
            query, key, value = source[theirs + f"attn.in_proj_{kind}"].chunk(3, dim=0)
            state[ours + f"self_attn.q_proj.{kind}"] = query
            state[ours + f"self_attn.k_proj.{kind}"] = key
            state[ours + f"self_attn.v_proj.{kind}"] = value
            state[ours + f"self_attn.out_proj.{kind}"] = source[theirs + f"attn.out_proj.{kind}"]
            state[ours + f"layer_norm1.{kind}"] = source[theirs + f"ln_1.{kind}"]
            state[ours + f"layer_norm2.{kind}"] = source[theirs + f"ln_2.{kind}"]
            state[ours + f"mlp.fc1.{kind}"] = source[theirs + f"mlp.c_fc.{kind}"]
            state[ours + f"mlp.fc2.{kind}"] = source[theirs + f"mlp.c_proj.{kind}"]
    return state


def _write_sd21(directory: Path, seed: int) -> None:
    import open_clip
    from safetensors.torch import save_file

    clip_dir = directory / "clip"
    clip_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.create_model(OPEN_CLIP_ARCHITECTURE, pretrained=None).eval()
    _set_logit_scale(model.logit_scale)
    text_config = sd21_text_encoder_config()
    text_encoder = CLIPTextModel(text_config)
    text_encoder.load_state_dict(open_clip_text_state_dict(model, text_config.num_hidden_layers))
    state = {name: tensor.to(STORAGE_DTYPE).contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(clip_dir / OPEN_CLIP_CHECKPOINT))
    del model, state
    # SD 2.x's tokenizer pads with "!" (id 0), as open_clip's does.
    tokenizer_dir = write_clip_tokenizer(directory / "tokenizer", pad_token="!")
    _write_generator(directory / "generator", "sd21", text_encoder, tokenizer_dir, seed)


def clip_whole_words() -> list[str]:
    """CLIP's whole-word tokens made of letters only (about 30,000): an LLM vocabulary every CLIP can score."""
    with tempfile.TemporaryDirectory() as scratch:
        vocab = json.loads((write_clip_tokenizer(Path(scratch)) / "vocab.json").read_text())
    words = [token.removesuffix("</w>") for token in vocab if token.endswith("</w>")]
    return list(dict.fromkeys(word for word in words if word.isascii() and word.isalpha()))


def _write_llm(directory: Path, size: LlmSize, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lab.tiny_lm import write_word_level_tokenizer

    tokenizer = write_word_level_tokenizer(directory, clip_whole_words())
    config = LlamaConfig(
        **llama_config(size, LLAMA3_VOCAB_SIZE, tokenizer.bos_token_id, tokenizer.eos_token_id),
        dtype=STORAGE_DTYPE,
    )
    torch.manual_seed(seed)
    # Built in float16 directly: a 3B model in float32 would take 13 GB just to be cast down.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(STORAGE_DTYPE)
    try:
        model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(directory, safe_serialization=True)


def build_real_size_set(name: str, base: Path | None = None, seed: int = REAL_SIZE_SEED) -> Path:
    """Build the set `name` (sd15, sd21, llm-1b, llm-3b) under `real_size_dir(base)` unless already complete, and
    return its directory. A build interrupted halfway is redone from scratch."""
    directory = real_size_dir(base) / name
    marker = directory / _COMPLETE
    if marker.is_file():
        return directory
    writers = {
        "sd15": lambda: _write_sd15(directory, seed),
        "sd21": lambda: _write_sd21(directory, seed),
        "llm-1b": lambda: _write_llm(directory, "1b", seed),
        "llm-3b": lambda: _write_llm(directory, "3b", seed),
    }
    if name not in writers:
        raise ValueError(f"Unknown real-size set '{name}'; choose one of {', '.join(writers)}.")
    logger.info("building the real-size set %s in %s (once)", name, directory)
    began = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    writers[name]()
    seconds = time.perf_counter() - began
    size = sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
    marker.write_text(json.dumps({"seed": seed, "build_seconds": round(seconds, 1), "bytes": size}))
    return directory


def real_size_profile(
    set_name: SetName,
    llm_size: LlmSize = "1b",
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto",
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto",
    base: Path | None = None,
) -> Profile:
    """The profile of a real-size set (built first if needed), pointing at its folders like a real profile's."""
    directory = build_real_size_set(set_name, base)
    llm_dir = build_real_size_set(f"llm-{llm_size}", base)
    if set_name == "sd15":
        clip = ClipSpec(source=str(directory / "clip"))
    else:
        clip = ClipSpec(
            library="open_clip",
            source=OPEN_CLIP_ARCHITECTURE,
            pretrained=str(directory / "clip" / OPEN_CLIP_CHECKPOINT),
        )
    return Profile(
        name=f"real-size-{set_name}",
        description=f"Random-init {set_name} architecture with a Llama {llm_size.upper()}-shaped LLM (shapes only).",
        generator=str(directory / "generator"),
        clip=clip,
        llm=LlmSpec(backend="transformers", source=str(llm_dir), fallback=False),
        device=device,
        dtype=dtype,
    )
