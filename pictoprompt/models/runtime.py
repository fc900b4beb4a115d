"""The runtime: loads a profile's components lazily and once, shares them, and owns the one GPU lock."""

from __future__ import annotations

import logging
import resource
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from pictoprompt.errors import ModelNotFoundError
from pictoprompt.models.captioner import Captioner
from pictoprompt.models.clip import ClipModel, TransformersClip
from pictoprompt.models.llm import LanguageModel
from pictoprompt.models.llm_loading import load_language_model
from pictoprompt.models.profiles import Profile
from pictoprompt.models.sources import hub_offline, resolve_builtin

logger = logging.getLogger(__name__)

# Loading bars would interleave with the CLI's own progress and the server's logs.
diffusers_logging.disable_progress_bar()
transformers_logging.disable_progress_bar()


def resolve_device(requested: str) -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        return torch.float16 if device.type in {"cuda", "mps"} else torch.float32
    return getattr(torch, requested)


def locate(source: str, probe_file: str) -> str | None:
    """Where `source` is on this machine (a directory, or the Hugging Face cache), or None if absent."""
    path = Path(source).expanduser()
    if path.exists():
        return str(path)
    if source.startswith(("/", ".", "~")) or source.count("/") != 1:
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, probe_file)
    return str(Path(cached).parent) if isinstance(cached, str) else None


class Runtime:
    """The model handles of one profile, loaded on first use and shared by every call."""

    def __init__(self, profile: Profile, cache_dir: Path | None = None) -> None:
        self.profile = profile
        self.cache_dir = cache_dir
        """Where values derived from the weights (the CLIP vocabulary's embeddings) are kept across restarts."""
        self.device = resolve_device(profile.device)
        self.dtype = resolve_dtype(profile.dtype, self.device)
        self.gpu_lock = threading.Lock()
        self._components: dict[str, Any] = {}
        self._load_lock = threading.Lock()

    def _component(self, name: str, loader: Callable[[], Any]) -> Any:
        with self._load_lock:
            if name not in self._components:
                logger.info("loading %s for profile %s", name, self.profile.name)
                self._components[name] = loader()
            return self._components[name]

    def _missing(self, component: str, source: str, error: Exception | None = None) -> ModelNotFoundError:
        where = f"'{source}' (a local directory, then the Hugging Face cache)"
        hint = (
            "download it once without HF_HUB_OFFLINE set, or point the profile at a local copy in a profiles "
            "TOML file (README, 'Profiles')"
        )
        if self.profile.is_builtin_set and self.profile.name == "shapes":
            hint = "reinstall pictoprompt, or rebuild the weights with `pictoprompt models train-shapes`"
        detail = f" ({error})" if error else ""
        return ModelNotFoundError(
            f"Profile '{self.profile.name}' needs its {component} but it was not found at {where}{detail}; {hint}."
        )

    def pipeline(self) -> StableDiffusionPipeline:
        return self._component("generator", self._load_pipeline)

    def clip(self) -> ClipModel:
        return self._component("clip", self._load_clip)

    def llm(self) -> LanguageModel:
        return self._component("llm", self._load_llm)

    def captioner(self) -> Captioner | None:
        """The profile's BLIP captioner (EDITOR's start prompt), or None when the profile names none."""
        if self.profile.captioner is None:
            return None
        return self._component("captioner", self._load_captioner)

    def _load_pipeline(self) -> StableDiffusionPipeline:
        source = resolve_builtin(self.profile.generator)
        try:
            pipeline = StableDiffusionPipeline.from_pretrained(
                source,
                dtype=self.dtype,
                safety_checker=None,
                requires_safety_checker=False,
                local_files_only=hub_offline() or Path(source).exists(),
            )
        except (OSError, ValueError) as error:
            raise self._missing("generator", source, error) from error
        if not isinstance(pipeline.scheduler, DDIMScheduler):
            # The papers sample with DDIM; its eta=0 path also makes a seed reproduce an image exactly.
            pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        pipeline.set_progress_bar_config(disable=True)
        pipeline.unet.requires_grad_(False)
        pipeline.vae.requires_grad_(False)
        pipeline.text_encoder.requires_grad_(False)
        return pipeline.to(self.device)

    def _load_clip(self) -> ClipModel:
        spec = self.profile.clip
        source = resolve_builtin(spec.source)
        try:
            if spec.library == "open_clip":
                from pictoprompt.models.clip import OpenClipClip

                return OpenClipClip.from_pretrained(spec.source, spec.pretrained, self.device, self.dtype)
            return TransformersClip.from_pretrained(source, self.device, self.dtype)
        except (OSError, RuntimeError, ValueError) as error:
            raise self._missing("CLIP", source, error) from error

    def _load_llm(self) -> LanguageModel:
        return load_language_model(self.profile.llm, self.device)

    def _load_captioner(self) -> Captioner:
        source = resolve_builtin(self.profile.captioner or "")
        try:
            return Captioner.from_pretrained(
                source, self.device, self.dtype, local_files_only=hub_offline() or Path(source).exists()
            )
        except (OSError, ValueError) as error:
            raise self._missing("captioner", source, error) from error

    def vocabulary_words(self) -> list[str] | None:
        """The profile's start-word list for VGD (one word per line), or None for the CLIP's whole vocabulary."""
        if self.profile.vocabulary is None:
            return None
        return self._component("vocabulary", lambda: self._load_word_list("start-word list", self.profile.vocabulary))

    def dictionary_words(self) -> list[str] | None:
        """The profile's dictionary: the only words VGD's prompts may use; None for any word."""
        if self.profile.dictionary is None:
            return None
        return self._component("dictionary", lambda: self._load_word_list("dictionary", self.profile.dictionary))

    def _load_word_list(self, component: str, source: str | None) -> list[str]:
        path = Path(resolve_builtin(source or "")).expanduser()
        try:
            words = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except OSError as error:
            raise self._missing(component, str(path), error) from error
        return list(dict.fromkeys(word for word in words if word and not word.startswith("#")))

    def preload(self, components: set[str]) -> None:
        """Load these components now (the server's lifespan), so no call pays for loading."""
        loaders = {"generator": self.pipeline, "clip": self.clip, "llm": self.llm}
        for name in sorted(components):
            loaders[name]()

    def loaded_components(self) -> list[str]:
        with self._load_lock:
            return sorted(self._components)

    def model_ids(self) -> dict[str, str]:
        ids = {"profile": self.profile.name, "generator": self.profile.generator, "clip": self.profile.clip.source}
        if self.profile.clip.pretrained:
            ids["clip_pretrained"] = self.profile.clip.pretrained
        return ids

    def memory(self) -> dict[str, float]:
        usage = {"process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if self.device.type == "cuda":
            usage["cuda_allocated_mb"] = torch.cuda.memory_allocated(self.device) / 2**20
            usage["cuda_reserved_mb"] = torch.cuda.memory_reserved(self.device) / 2**20
        return usage
