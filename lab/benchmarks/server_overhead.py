"""What the MCP server adds to a call: `generate_image` on `tiny`, direct vs stdio vs streamable HTTP.

Run: `pictoprompt bench server_overhead [--calls N] [--steps S]`. Prints per-path median and quartiles in
seconds, the overhead over the direct call in milliseconds, and the ratio. Goal: the server adds < 50 ms per call.

The three paths do the same work, so their difference is the server's:
- each runs in a fresh process of its own, one path at a time, with OpenMP told not to spin (an idle torch
  process otherwise keeps its threads busy-waiting after each call, and on a 2-core machine that stole the cores
  from whichever path ran next);
- each process loads the same components and finishes the same warm-up (the CLIP vocabulary) before the first
  timed call: the direct process does it up front, the servers' first call is an `invert_image`, which waits for
  their background warm-up, so no warm-up thread competes with a timed call;
- the tool runs the way the server's job runner runs it: on the runner's worker thread, under the GPU lock, saving
  into an asset store. What the direct path leaves out is exactly the protocol: JSON-RPC, the transport, argument
  validation and building the tool result.

A direct path slower than a server path means the paths still differ in some other way; the benchmark then says
the comparison is inconclusive instead of reporting a negative overhead as a goal met. The servers' logs (uvicorn's
access log among them) go to files in the scratch folder, never into the table.
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
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from PIL import Image

from pictoprompt.methods.vgd import runtime_vocabulary
from pictoprompt.models.profiles import get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.progress import Progress
from pictoprompt.server.assets import AssetStore, RecordingSink
from pictoprompt.server.images import PreResolvedImages
from pictoprompt.server.jobs import JobRunner
from pictoprompt.tools import TOOLS
from pictoprompt.tools.base import ToolContext
from pictoprompt.tools.generate_image import GenerateImageRequest, generate_image

TOKEN = "benchmark-token-0123456789"
WARM_UP_CALL = {"images": [], "max_tokens": 4, "num_results": 1}
"""`invert_image` arguments for the servers' first call (its picture is added per run)."""


def environment(folder: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PICTOPROMPT_PROFILE": "tiny",
        "PICTOPROMPT_ASSET_DIR": str(folder / "assets"),
        "PICTOPROMPT_CACHE_DIR": str(folder / "cache"),
        "PICTOPROMPT_ALLOW_DIRS": json.dumps([str(folder)]),
        "PICTOPROMPT_TOKEN": TOKEN,
        "OMP_WAIT_POLICY": "PASSIVE",
    }


def direct_times(arguments: dict, calls: int, folder: Path) -> list[float]:
    """The tool run as the server's job runner runs it, without the protocol (in a child process of its own)."""
    runtime = Runtime(get_profile("tiny"), folder / "cache")
    # What the server's lifespan loads and its warm-up thread computes before a call can use it.
    runtime.preload({component for spec in TOOLS for component in spec.components})
    runtime_vocabulary(runtime, Progress())
    jobs = JobRunner(runtime.gpu_lock)
    sink = RecordingSink(AssetStore(folder / "direct-assets"))
    context = ToolContext(runtime, sink, PreResolvedImages({}))

    def work(progress: Progress) -> object:
        return generate_image(GenerateImageRequest(**arguments), context)

    times = []
    for index in range(calls + 1):
        started = time.perf_counter()
        jobs.submit("generate_image", work, jobs.reserve()).future.result()
        if index:  # call 0 warms up (fills caches)
            times.append(time.perf_counter() - started)
    jobs.shutdown()
    return times


def measure_direct(arguments: dict, calls: int, folder: Path) -> list[float]:
    command = [
        sys.executable,
        "-m",
        "lab.benchmarks.server_overhead",
        "--direct",
        json.dumps(arguments),
        "--calls",
        str(calls),
        str(folder),
    ]
    with (folder / "direct.log").open("w") as log:
        finished = subprocess.run(command, env=environment(folder), stdout=subprocess.PIPE, stderr=log, text=True)
    if finished.returncode != 0:
        raise RuntimeError(f"the direct path failed; see {folder / 'direct.log'}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


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


async def client_times(client: Client, arguments: dict, calls: int, picture: Path) -> list[float]:
    warm_up = await client.call_tool("invert_image", {**WARM_UP_CALL, "images": [str(picture)], "wait_seconds": 600})
    assert not warm_up.is_error, warm_up.content
    times = []
    for index in range(calls + 1):
        started = time.perf_counter()
        result = await client.call_tool("generate_image", {**arguments, "inline": "none"})
        assert not result.is_error, result.content
        if index:
            times.append(time.perf_counter() - started)
    return times


async def measure_servers(arguments: dict, calls: int, folder: Path, picture: Path) -> dict[str, list[float]]:
    stdio = StdioServerParameters(
        command=sys.executable, args=["-m", "pictoprompt.cli", "serve"], env=environment(folder)
    )
    with (folder / "stdio-server.log").open("w") as log:
        async with Client(stdio_client(stdio, errlog=log), read_timeout_seconds=600) as stdio_client_session:
            stdio_times = await client_times(stdio_client_session, arguments, calls, picture)
    port = free_port()
    command = [sys.executable, "-m", "pictoprompt.cli", "serve", "--http", "--port", str(port)]
    with (folder / "http-server.log").open("w") as log:
        # uvicorn writes its access log to stdout: into the log file, not into the table.
        process = subprocess.Popen(command, env=environment(folder), stdout=log, stderr=subprocess.STDOUT)
        try:
            await wait_for_port(port, process)
            http_client = create_mcp_http_client(headers={"Authorization": f"Bearer {TOKEN}"})
            url = f"http://127.0.0.1:{port}/mcp"
            async with http_client, Client(streamable_http_client(url, http_client=http_client)) as http:
                http_times = await client_times(http, arguments, calls, picture)
        finally:
            process.terminate()
            process.wait(timeout=30)
    return {"stdio": stdio_times, "http": http_times}


def quartiles(times: list[float]) -> tuple[float, float, float]:
    low, median, high = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return low, median, high


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
        folder = Path(scratch)
        picture = folder / "warm-up.png"
        Image.new("RGB", (32, 32), (220, 30, 30)).save(picture)
        results = {"direct": measure_direct(arguments, args.calls, folder)}
        results.update(anyio.run(measure_servers, arguments, args.calls, folder, picture))
    direct = statistics.median(results["direct"])
    print(f"generate_image on tiny, {args.steps} steps, {args.calls} timed calls per path (after the warm-up)")
    print(f"{'path':8} {'median s':>9} {'q1 s':>8} {'q3 s':>8} {'overhead ms':>12} {'ratio':>7}")
    summary = {}
    for name, times in results.items():
        low, median, high = quartiles(times)
        overhead = (median - direct) * 1000
        summary[name] = {"median_s": median, "q1_s": low, "q3_s": high, "overhead_ms": overhead}
        print(f"{name:8} {median:9.4f} {low:8.4f} {high:8.4f} {overhead:12.1f} {median / direct:7.2f}")
    overheads = [summary["stdio"]["overhead_ms"], summary["http"]["overhead_ms"]]
    # Below the direct path by more than its own spread: the paths did not do the same work.
    spread_ms = (summary["direct"]["q3_s"] - summary["direct"]["q1_s"]) * 1000
    if min(overheads) < -spread_ms:
        verdict = "inconclusive: a server path beat the direct path, so the paths differ in more than the protocol"
    else:
        verdict = "met" if max(overheads) < 50 else "NOT met"
    print(f"\nworst server overhead: {max(overheads):.1f} ms per call (goal < 50 ms): {verdict}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
