"""Real servers for the reliability runs: `pictoprompt serve` over stdio or streamable HTTP, as a user starts it.

Each server is a subprocess of this one on a profile (`tiny` for the fuzz, `shapes` for the soak), with its
assets and concepts in a folder the run owns and may inspect between calls. The helpers here also read a
process's resident memory, open file descriptors and threads from /proc (Linux), which the soak records.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

HOST = "127.0.0.1"
READ_TIMEOUT_SECONDS = 300


def server_environment(folder: Path, profile: str, **extra: str) -> dict[str, str]:
    """A server's environment: its assets and data under `folder`, which is also the one folder it may read."""
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PICTOPROMPT_PROFILE": profile,
        "PICTOPROMPT_ASSET_DIR": str(folder / "assets"),
        "PICTOPROMPT_DATA_DIR": str(folder / "data"),
        "PICTOPROMPT_ALLOW_DIRS": json.dumps([str(folder)]),
        **extra,
    }
    environment.pop("PICTOPROMPT_TOKEN", None)
    return environment


def stdio_parameters(folder: Path, profile: str, **extra: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "pictoprompt.cli", "serve"],
        env=server_environment(folder, profile, **extra),
    )


@asynccontextmanager
async def stdio_client(folder: Path, profile: str, **extra: str) -> AsyncIterator[Client]:
    """A client of its own stdio server (each stdio client starts one, as an assistant's host does)."""
    async with Client(stdio_parameters(folder, profile, **extra), read_timeout_seconds=READ_TIMEOUT_SECONDS) as client:
        yield client


@dataclass
class HttpServer:
    process: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/mcp"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@contextmanager
def http_server(folder: Path, profile: str, start_seconds: float = 600, **extra: str) -> Iterator[HttpServer]:
    """`pictoprompt serve --http` on a free loopback port, its output in `folder/http-server.log`."""
    port = free_port()
    log = folder / "http-server.log"
    folder.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "pictoprompt.cli", "serve", "--http", "--host", HOST, "--port", str(port)],
            env=server_environment(folder, profile, **extra),
            stdout=output,
            stderr=output,
        )
    try:
        deadline = time.monotonic() + start_seconds
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the HTTP server exited: {log.read_text()[-2000:]}")
            try:
                with socket.create_connection((HOST, port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the HTTP server did not start listening") from None
                time.sleep(0.2)
        yield HttpServer(process, port, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@asynccontextmanager
async def http_client(server: HttpServer) -> AsyncIterator[Client]:
    timeout = httpx.Timeout(30, read=READ_TIMEOUT_SECONDS)
    async with (
        httpx.AsyncClient(timeout=timeout, follow_redirects=True) as transport,
        Client(streamable_http_client(server.url, http_client=transport)) as client,
    ):
        yield client


# ----------------------------------------------------------------------------------------- a process's resources


@dataclass(frozen=True)
class ProcessSample:
    pid: int
    rss_bytes: int
    open_fds: int
    threads: int


def sample_process(pid: int) -> ProcessSample | None:
    """Resident memory, open file descriptors and threads of `pid` (None once it has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss = int(fields["VmRSS"].split()[0]) * 1024
    return ProcessSample(pid, rss, fds, int(fields["Threads"]))


def server_children(parent: int | None = None) -> list[int]:
    """The pids of `pictoprompt serve` processes whose parent is `parent` (default: this process)."""
    parent = os.getpid() if parent is None else parent
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        parent_of_entry = int(stat.rsplit(")", 1)[1].split()[1])
        if parent_of_entry == parent and b"pictoprompt.cli" in command and b"serve" in command:
            found.append(int(entry.name))
    return sorted(found)


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(files, bytes) under `folder`."""
    count = size = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file():
                count += 1
                size += path.stat().st_size
        except OSError:  # removed while we walked
            continue
    return count, size
