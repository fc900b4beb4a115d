"""The bundled `shapes` model set: a miniature Stable Diffusion + CLIP trained on a synthetic world.

`scenes` draws the world's scenes (the demo's pictures); the weights ship under `weights/` (see `MODEL_CARD.md`).
Their training, the world's captions and evaluation sets, and the oracle that judges against it are the
laboratory's (`lab.shapes`, in a source checkout).
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
GENERATOR_DIR = WEIGHTS_DIR / "generator"
CLIP_DIR = WEIGHTS_DIR / "clip"


def weights_present() -> bool:
    """Whether the trained generator and CLIP ship with this install (both directories complete)."""
    return (GENERATOR_DIR / "model_index.json").is_file() and (CLIP_DIR / "config.json").is_file()
