"""What the MCP server adds to a call: `generate_image` on `tiny`, direct vs stdio vs streamable HTTP.

Run: `pictoprompt bench server_overhead [--calls N] [--steps S]`. Prints per-path median and mean seconds,
the overhead over the direct call in milliseconds, and the ratio. Goal: the server adds < 50 ms per call.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from pictoprompt.models.profiles import get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.server.assets import AssetStore
from pictoprompt.server.images import ImagePolicy, ImageResolver
from pictoprompt.tools.base import ToolContext
from pictoprompt.tools.generate_image import GenerateImageRequest, generate_image

TOKEN = "benchmark-token-0123456789"


def environment(folder: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PICTOPROMPT_PROFILE": "tiny",
        "PICTOPROMPT_ASSET_DIR": str(folder / "assets"),
        "PICTOPROMPT_TOKEN": TOKEN,
    }


class DirectCaller:
    """The tool function called in this process, as the CLI does: no protocol, no job queue."""

    def __init__(self, folder: Path) -> None:
        self.runtime = Runtime(get_profile("tiny"))
        store = AssetStore(folder / "direct-assets")
        self.context = ToolContext(self.runtime, store, ImageResolver(ImagePolicy(allowed_roots=[]), store))

    async def call(self, arguments: dict) -> None:
        with self.runtime.gpu_lock:
            generate_image(GenerateImageRequest(**arguments), self.context)


class McpCaller:
    def __init__(self, client: Client) -> None:
        self.client = client

    async def call(self, arguments: dict) -> None:
        result = await self.client.call_tool("generate_image", {**arguments, "inline": "none"})
        assert not result.is_error, result.content


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_for_port(port: int, process: subprocess.Popen) -> None:
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if process.poll() is not None:
                raise RuntimeError("the HTTP server exited during start-up") from None
            await anyio.sleep(0.3)


async def measure(arguments: dict, calls: int, folder: Path) -> dict[str, list[float]]:
    """Rounds of one call per path, interleaved, so load from other processes hits every path alike."""
    port = free_port()
    command = [sys.executable, "-m", "pictoprompt.cli", "serve", "--http", "--port", str(port)]
    process = subprocess.Popen(command, env=environment(folder), stderr=subprocess.DEVNULL)
    stdio = StdioServerParameters(
        command=sys.executable, args=["-m", "pictoprompt.cli", "serve"], env=environment(folder)
    )
    try:
        await wait_for_port(port, process)
        http_client = create_mcp_http_client(headers={"Authorization": f"Bearer {TOKEN}"})
        url = f"http://127.0.0.1:{port}/mcp"
        async with (
            Client(stdio, read_timeout_seconds=600) as stdio_client,
            http_client,
            Client(streamable_http_client(url, http_client=http_client)) as http,
        ):
            callers = {"direct": DirectCaller(folder), "stdio": McpCaller(stdio_client), "http": McpCaller(http)}
            times: dict[str, list[float]] = {name: [] for name in callers}
            for round_index in range(calls + 1):
                for name, caller in callers.items():
                    started = time.perf_counter()
                    await caller.call(arguments)
                    if round_index:  # round 0 warms up (loads models, fills caches)
                        times[name].append(time.perf_counter() - started)
            return times
    finally:
        process.terminate()
        process.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pictoprompt bench server_overhead", description=__doc__)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    arguments = {"prompt": "a red circle", "steps": args.steps, "seed": 1}
    with tempfile.TemporaryDirectory() as scratch:
        results = anyio.run(measure, arguments, args.calls, Path(scratch))
    direct = statistics.median(results["direct"])
    print(f"generate_image on tiny, {args.steps} steps, {args.calls} calls per path (after one warm-up call)")
    print(f"{'path':8} {'median s':>9} {'mean s':>9} {'overhead ms':>12} {'ratio':>7}")
    summary = {}
    for name, times in results.items():
        median = statistics.median(times)
        overhead = (median - direct) * 1000
        summary[name] = {"median_s": median, "overhead_ms": overhead}
        print(f"{name:8} {median:9.4f} {statistics.mean(times):9.4f} {overhead:12.1f} {median / direct:7.2f}")
    worst = max(summary["stdio"]["overhead_ms"], summary["http"]["overhead_ms"])
    print(f"\nworst server overhead: {worst:.1f} ms per call (goal < 50 ms): {'met' if worst < 50 else 'NOT met'}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
