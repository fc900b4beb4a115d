"""Shared fixtures: one tiny runtime per test session, and servers whose assets live in a temp folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The test models are tiny: one thread per process avoids OpenMP overhead on small tensors and, with the servers
# the transport tests spawn, oversubscribing a small CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pictoprompt.models.profiles import get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.settings import Settings


@pytest.fixture(scope="session")
def tiny_runtime() -> Runtime:
    runtime = Runtime(get_profile("tiny"))
    runtime.pipeline()
    runtime.clip()
    return runtime


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


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
