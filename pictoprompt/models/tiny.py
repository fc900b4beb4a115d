"""The `tiny` model set: seeded random-init components in the standard diffusers/transformers layout, written to a
directory and loaded through the real `from_pretrained` path. The pictures are noise; shapes, dtypes and plumbing
are real. The generator's text encoder is the CLIP's own text tower, as in SD 1.x.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextModel

from pictoprompt.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from pictoprompt.models.clip_tokenizer import CLIP_VOCAB_SIZE, load_clip_tokenizer, write_clip_tokenizer

TINY_SEED = 0
TEXT_WIDTH = 32
IMAGE_SIZE = 32


def tiny_clip_config() -> CLIPConfig:
    return CLIPConfig(
        text_config={
            "vocab_size": CLIP_VOCAB_SIZE,
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
        },
        projection_dim=32,
    )


def build_tiny_model_set(directory: Path, seed: int = TINY_SEED) -> Path:
    """Write `clip/` and `generator/` under `directory` (idempotent) and return `directory`."""
    marker = directory / "complete.json"
    if marker.is_file():
        return directory
    torch.manual_seed(seed)
    clip_dir, generator_dir = directory / "clip", directory / "generator"
    write_clip_tokenizer(clip_dir)
    clip = CLIPModel(tiny_clip_config()).eval()
    clip.save_pretrained(clip_dir, safe_serialization=True)
    preprocessor = {"image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "size": IMAGE_SIZE}
    (clip_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))

    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(clip_dir),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(generator_dir, safe_serialization=True)
    marker.write_text(json.dumps({"seed": seed}))
    return directory
