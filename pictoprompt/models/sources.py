"""Where weights come from: the bundled and tiny sets behind `builtin:` sources, and whether the hub is off (below
both the runtime and the LLM loader, so that neither imports the other to resolve a source).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from pathlib import Path

from pictoprompt.errors import ModelNotFoundError
from pictoprompt.models.profiles import BUILTIN_SCHEME

_tiny_dir_lock = threading.Lock()
_tiny_dir: Path | None = None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def tiny_model_dir() -> Path:
    """The seeded tiny set, built once per process into a temporary directory."""
    global _tiny_dir
    with _tiny_dir_lock:
        if _tiny_dir is None:
            from pictoprompt.models.tiny import build_tiny_model_set

            directory = Path(tempfile.mkdtemp(prefix="pictoprompt-tiny-"))
            atexit.register(shutil.rmtree, directory, ignore_errors=True)
            _tiny_dir = build_tiny_model_set(directory)
        return _tiny_dir


def resolve_builtin(source: str) -> str:
    """`builtin:shapes/clip` -> the bundled directory; `builtin:tiny/...` -> the tiny set; else unchanged."""
    if not source.startswith(BUILTIN_SCHEME):
        return source
    model_set, _, component = source.removeprefix(BUILTIN_SCHEME).partition("/")
    if model_set == "tiny":
        return str(tiny_model_dir() / component)
    if model_set == "shapes":
        from pictoprompt.models.shapes import WEIGHTS_DIR

        return str(WEIGHTS_DIR / component)
    raise ModelNotFoundError(f"Unknown built-in model set '{model_set}' in '{source}'; use shapes or tiny.")
