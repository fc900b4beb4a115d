"""Shared fixtures: one tiny runtime per test session, servers whose assets live in a temp folder, and the order in
which `make test`'s two workers take the test files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The test models are tiny: one thread per process avoids OpenMP overhead on small tensors and, with the servers
# the transport tests spawn, oversubscribing a small CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from lab.reliability.servers import stdio_client
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


# --- servers shared by several test files -----------------------------------------------------------------------
# Each `pictoprompt serve` subprocess costs about 10 s of CPU before it answers (importing torch, diffusers and
# transformers, loading the models, the warm-up): a test that only talks to a server takes one of these two,
# started once per worker. A test that needs its own (a token, a noisy or killed server) starts its own.

SHARED_HTTP_HOST = "127.0.0.2"
"""A loopback address other than the three the MCP SDK protects by itself (test_hardening's DNS-rebinding checks)."""


@dataclass
class StdioServer:
    """A connected MCP client of a `pictoprompt serve` over stdio; call it through `portal` (its event loop)."""

    portal: Any
    client: Any
    folder: Path


@dataclass
class HttpServer:
    """A token-less `pictoprompt serve --http`; its stdout and stderr (the access log too) land in `log`."""

    host: str
    port: int
    folder: Path
    log: Path
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/mcp"


@pytest.fixture(scope="session")
def shared_stdio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StdioServer]:
    """`pictoprompt serve` on the tiny profile over stdio, its assets and data in its own folder."""
    from anyio.from_thread import start_blocking_portal

    folder = tmp_path_factory.mktemp("stdio-server")
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(stdio_client(folder, "tiny")) as client:
        yield StdioServer(portal, client, folder)


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def shared_http_server(
    tmp_path_factory: pytest.TempPathFactory, server_environment: Callable[..., dict[str, str]]
) -> Iterator[HttpServer]:
    """Token-less `pictoprompt serve --http` on the tiny profile, on `SHARED_HTTP_HOST` where this machine has it
    (else on 127.0.0.1, and test_hardening's HTTP tests skip)."""
    try:
        host, port = SHARED_HTTP_HOST, _free_port(SHARED_HTTP_HOST)
    except OSError:
        host, port = "127.0.0.1", _free_port("127.0.0.1")
    folder = tmp_path_factory.mktemp("http-server")
    log = folder / "output.log"
    environment = server_environment(folder)
    environment.pop("PICTOPROMPT_TOKEN", None)
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "pictoprompt.cli", "serve", "--http", "--host", host, "--port", str(port)],
            env=environment,
            stdout=output,
            stderr=output,
        )
    try:
        deadline = time.monotonic() + 600  # a server's start on a loaded machine (two test workers and more)
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited: {log.read_text()[-2000:]}")
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("the server did not start listening")
                time.sleep(0.2)
        yield HttpServer(host, port, folder, log, process)
    finally:
        process.terminate()
        process.wait(timeout=30)


# --- the order of the test files on `make test`'s workers ------------------------------------------------------
# pytest-xdist's `--dist loadfile` hands a worker one file at a time, by default the files with the most tests
# first: a file of a few long tests (the fuzz run, a server's start) came last and left one worker running alone
# for a minute at the end. Here the files known to take the most CPU go first, heaviest first (then the others by
# their number of tests), and the files that share the servers above form one unit, so each server starts once.

SHARED_SERVER_FILES = ("test_fuzz.py", "test_hardening.py", "test_transports.py")

HEAVIEST_FIRST = (
    "shared servers",
    "test_editor.py",
    "test_concept_tuning.py",
    "test_every_tool.py",
    "test_vgd.py",
    "test_sd_ipc.py",
    "test_concept_description.py",
    "test_server.py",
    "test_stdio_channel.py",
    "test_segment.py",
    "test_shapes_train.py",
    "test_shared_style.py",
    "test_concept_names.py",
    "test_llm.py",
    "test_wheel_install.py",
)
"""Scopes by their CPU time in the fast suite (lab/results/testtime2.md), most first."""


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class HeaviestFilesFirst(LoadFileScheduling):
        ordered = False

        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return "shared servers" if Path(path).name in SHARED_SERVER_FILES else path

        def _assign_work_unit(self, node: Any) -> None:
            if not self.ordered:  # the queue is complete once every worker has collected
                rank = {name: index for index, name in enumerate(HEAVIEST_FIRST)}
                units = list(self.workqueue.items())
                units.sort(key=lambda unit: (rank.get(Path(unit[0]).name, len(rank)), -len(unit[1])))
                self.workqueue = OrderedDict(units)
                self.ordered = True
            super()._assign_work_unit(node)

    return HeaviestFilesFirst(config, log)
