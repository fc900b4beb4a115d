"""What the MCP server adds to a call: `generate_image` on `tiny`, direct vs stdio vs streamable HTTP.

Run: `pictoprompt bench server_overhead [--calls N] [--steps S]`. Prints per-path median and mean seconds,
the overhead over the direct call in milliseconds, and the ratio. Goal: the server adds < 50 ms per call.

Each path runs in its own process, one path at a time, with OpenMP told not to spin: an idle torch process
otherwise keeps its worker threads busy-waiting for a while after each call, and on a 2-core machine that
stole the cores from whichever path ran next (an earlier interleaved version of this benchmark measured the
in-process direct call ten times slower than the same call alone).
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
        "OMP_WAIT_POLICY": "PASSIVE",
    }


def direct_times(arguments: dict, calls: int, folder: Path) -> list[float]:
    """The tool function called in-process, as the CLI does (no protocol, no job queue); run in a child."""
    runtime = Runtime(get_profile("tiny"))
    store = AssetStore(folder / "direct-assets")
    context = ToolContext(runtime, store, ImageResolver(ImagePolicy(allowed_roots=[]), store))
    times = []
    for index in range(calls + 1):
        started = time.perf_counter()
        with runtime.gpu_lock:
            generate_image(GenerateImageRequest(**arguments), context)
        if index:  # call 0 warms up (loads models, fills caches)
            times.append(time.perf_counter() - started)
    return times


def measure_direct(arguments: dict, calls: int, folder: Path) -> list[float]:
    command = [sys.executable, __file__, "--direct", json.dumps(arguments), "--calls", str(calls), str(folder)]
    finished = subprocess.run(command, env=environment(folder), capture_output=True, text=True, check=True)
    return json.loads(finished.stdout.strip().splitlines()[-1])


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


async def client_times(client: Client, arguments: dict, calls: int) -> list[float]:
    times = []
    for index in range(calls + 1):
        started = time.perf_counter()
        await McpCaller(client).call(arguments)
        if index:
            times.append(time.perf_counter() - started)
    return times


async def measure_servers(arguments: dict, calls: int, folder: Path) -> dict[str, list[float]]:
    stdio = StdioServerParameters(
        command=sys.executable, args=["-m", "pictoprompt.cli", "serve"], env=environment(folder)
    )
    async with Client(stdio, read_timeout_seconds=600) as stdio_client:
        stdio_times = await client_times(stdio_client, arguments, calls)
    port = free_port()
    command = [sys.executable, "-m", "pictoprompt.cli", "serve", "--http", "--port", str(port)]
    process = subprocess.Popen(command, env=environment(folder), stderr=subprocess.DEVNULL)
    try:
        await wait_for_port(port, process)
        http_client = create_mcp_http_client(headers={"Authorization": f"Bearer {TOKEN}"})
        url = f"http://127.0.0.1:{port}/mcp"
        async with http_client, Client(streamable_http_client(url, http_client=http_client)) as http:
            http_times = await client_times(http, arguments, calls)
    finally:
        process.terminate()
        process.wait(timeout=30)
    return {"stdio": stdio_times, "http": http_times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pictoprompt bench server_overhead", description=__doc__)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--direct", metavar="ARGUMENTS", help=argparse.SUPPRESS)
    parser.add_argument("folder", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.direct:
        print(json.dumps(direct_times(json.loads(args.direct), args.calls, Path(args.folder))))
        return 0
    arguments = {"prompt": "a red circle", "steps": args.steps, "seed": 1}
    with tempfile.TemporaryDirectory() as scratch:
        results = {"direct": measure_direct(arguments, args.calls, Path(scratch))}
        results.update(anyio.run(measure_servers, arguments, args.calls, Path(scratch)))
    direct = statistics.median(results["direct"])
    print(f"generate_image on tiny, {args.steps} steps, {args.calls} calls per path (after one warm-up call each)")
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
