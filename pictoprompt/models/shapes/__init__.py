"""The bundled `shapes` model set: a miniature Stable Diffusion + CLIP trained on a synthetic world.

`scenes` generates the world (images, captions, held-out sets), `oracle` judges images and prompts against it
without any model, `train` reproduces the weights shipped under `weights/` (see `MODEL_CARD.md`).
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
GENERATOR_DIR = WEIGHTS_DIR / "generator"
CLIP_DIR = WEIGHTS_DIR / "clip"


def weights_present() -> bool:
    """Whether the trained generator and CLIP ship with this install (both directories complete)."""
    return (GENERATOR_DIR / "model_index.json").is_file() and (CLIP_DIR / "config.json").is_file()
