"""Shared fixtures: one tiny runtime per test session, and servers whose assets live in a temp folder."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The test models are tiny: one thread per process avoids OpenMP overhead on small tensors and, with the servers
# the transport tests spawn, oversubscribing a small CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from lab.tiny_lm import write_tiny_causal_lm
from pictoprompt.models.llm import LanguageModel
from pictoprompt.models.llm_loading import load_language_model
from pictoprompt.models.profiles import LlmSpec, get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.settings import Settings

LLM_BACKENDS = ["transformers", "llama_cpp"]


@pytest.fixture(scope="session")
def tiny_runtime() -> Runtime:
    runtime = Runtime(get_profile("tiny"))
    runtime.pipeline()
    runtime.clip()
    return runtime


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random-init Llama in the transformers layout, written once per session."""
    return write_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def load_llm(tiny_lm_dir: Path) -> Callable[[str], LanguageModel]:
    """One model per backend for the whole session: the tiny random Llama, or SmolLM2-135M through llama.cpp."""

    @cache
    def load(backend: str) -> LanguageModel:
        if backend == "transformers":
            return load_language_model(LlmSpec(backend="transformers", source=str(tiny_lm_dir)), torch.device("cpu"))
        return load_language_model(LlmSpec(backend="llama_cpp"), torch.device("cpu"))

    return load


@pytest.fixture(params=LLM_BACKENDS)
def language_model(request: pytest.FixtureRequest, load_llm: Callable[[str], LanguageModel]) -> LanguageModel:
    return load_llm(request.param)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        profile="tiny",
        asset_dir=tmp_path / "assets",
        cache_dir=tmp_path / "cache",
        data_dir=tmp_path / "data",
        allow_dirs=[tmp_path],
        allow_home=False,
    )


@pytest.fixture(scope="session")
def server_environment() -> Callable[..., dict[str, str]]:
    """The environment of a server subprocess on the tiny profile: `folder` holds its assets and data and is the
    one folder it may read images from; `extra` adds or overrides variables."""

    def environment(folder: Path, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "PICTOPROMPT_PROFILE": "tiny",
            "PICTOPROMPT_ASSET_DIR": str(folder / "assets"),
            "PICTOPROMPT_DATA_DIR": str(folder / "data"),
            "PICTOPROMPT_ALLOW_DIRS": json.dumps([str(folder)]),
            **extra,
        }

    return environment


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared CPU: a second OpenMP thread spins more than it helps (4x slower here). A module opts in
    with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
