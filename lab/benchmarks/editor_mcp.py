"""EDITOR's default call through the MCP server, as a user makes it: seconds per picture, median of N.

Run: `pictoprompt bench editor_mcp [--pictures 5] [--direct] [--iterations N]`. Starts `pictoprompt serve` over
stdio on the default profile (`shapes`) as a subprocess, connects as an MCP client, and calls
`invert_image(method="editor")` at its defaults once per picture: 64 px drawings made with PIL here (the world's
shapes and colours, anywhere, any size, solid, outlined or striped; `harness.outside_picture`), one call at a
time, each timed from the request to the result on the client. Goal: the median at most 60 s (issue 35, item 6),
measured alone on the machine.

`--direct` also times the same calls without the protocol, as the server's job runner runs them (its worker
thread, under the GPU lock, saving into an asset store) in a process of its own that first loads what the server
loads before its first call, so the two can be compared on the same pictures. Every call of both paths is listed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client

from lab.benchmarks.harness import outside_picture

GOAL_SECONDS = 60.0
PICTURE_SEED = 7_100_001
"""Drawings from a seed of their own: 64 px pictures, not the outside set's mix of sizes."""


def pictures(folder: Path, count: int) -> list[Path]:
    """`count` 64 x 64 drawings saved as PNG under `folder` (every fourth outside picture is 64 x 64)."""
    paths = []
    for index in range(count):
        example = outside_picture(4 * index, PICTURE_SEED)
        path = folder / f"drawing-{index}.png"
        example.flat.save(path)
        paths.append(path)
    return paths


def environment(folder: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PICTOPROMPT_ASSET_DIR": str(folder / "assets"),
        "PICTOPROMPT_CACHE_DIR": str(folder / "cache"),
        "PICTOPROMPT_ALLOW_DIRS": json.dumps([str(folder)]),
    }


def call_arguments(picture: Path, iterations: int | None) -> dict:
    arguments: dict = {"images": [str(picture)], "method": "editor", "wait_seconds": 600, "inline": "none"}
    if iterations is not None:
        arguments["iterations"] = iterations
    return arguments


async def mcp_times(folder: Path, paths: list[Path], iterations: int | None) -> list[tuple[float, str]]:
    """(seconds, best prompt) per picture over stdio, in order."""
    server = StdioServerParameters(
        command=sys.executable, args=["-m", "pictoprompt.cli", "serve"], env=environment(folder)
    )
    results = []
    with (folder / "server.log").open("w") as log:
        async with Client(stdio_client(server, errlog=log), read_timeout_seconds=900) as client:
            for path in paths:
                started = time.perf_counter()
                result = await client.call_tool("invert_image", call_arguments(path, iterations))
                seconds = time.perf_counter() - started
                if result.is_error:
                    raise RuntimeError(f"invert_image failed on {path.name}: {result.content}")
                prompts = (result.structured_content or {}).get("result", {}).get("prompts", [])
                results.append((seconds, prompts[0]["prompt"] if prompts else "?"))
                print(f"  mcp    {path.name}: {seconds:6.1f} s  {results[-1][1]!r}", file=sys.stderr, flush=True)
    return results


def direct_times(folder: Path, paths: list[Path], iterations: int | None) -> list[tuple[float, str]]:
    """The same calls without the protocol, as the server's job runner runs them."""
    from PIL import Image

    from pictoprompt.methods.vgd import runtime_vocabulary
    from pictoprompt.models.profiles import get_profile
    from pictoprompt.models.runtime import Runtime
    from pictoprompt.server.assets import AssetStore, RecordingSink, flatten_to_rgb
    from pictoprompt.server.images import PreResolvedImages
    from pictoprompt.server.jobs import JobRunner
    from pictoprompt.tools.base import ToolContext
    from pictoprompt.tools.invert_image import InvertImageRequest, invert_image

    runtime = Runtime(get_profile(None), folder / "cache")
    # What the server's lifespan loads and its warm-up computes before its first call is timed.
    runtime.preload({"generator", "clip", "llm"})
    runtime_vocabulary(runtime)
    jobs = JobRunner(runtime.gpu_lock)
    results = []
    for path in paths:
        arguments = call_arguments(path, iterations)
        for option in ("wait_seconds", "inline"):
            arguments.pop(option)
        images = PreResolvedImages({str(path): flatten_to_rgb(Image.open(path))})
        context = ToolContext(runtime, RecordingSink(AssetStore(folder / "direct-assets")), images)
        request = InvertImageRequest(**arguments)
        started = time.perf_counter()
        job = jobs.submit("invert_image", lambda progress, r=request, c=context: invert_image(r, c))
        response = job.future.result()
        seconds = time.perf_counter() - started
        results.append((seconds, response.prompts[0].prompt))
        print(f"  direct {path.name}: {seconds:6.1f} s  {results[-1][1]!r}", file=sys.stderr, flush=True)
    jobs.shutdown()
    return results


def report(name: str, results: list[tuple[float, str]]) -> float:
    median = statistics.median(seconds for seconds, _ in results)
    listed = ", ".join(f"{seconds:.1f}" for seconds, _ in results)
    print(f"{name}: median {median:.1f} s per picture ({listed})")
    return median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pictoprompt bench editor_mcp", description=__doc__)
    parser.add_argument("--pictures", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=None, help="default: the tool's")
    parser.add_argument("--direct", action="store_true", help="also time the calls without the protocol")
    parser.add_argument("--direct-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.direct_only:
        print(json.dumps(direct_times(args.folder, pictures(args.folder, args.pictures), args.iterations)))
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        paths = pictures(folder, args.pictures)
        over_mcp = anyio.run(mcp_times, folder, paths, args.iterations)
        # The server has exited and been waited for: its CPU time is in this process's children's.
        server = resource.getrusage(resource.RUSAGE_CHILDREN)
        direct = None
        if args.direct:
            command = [sys.executable, "-m", "lab.benchmarks.editor_mcp", "--direct-only", "--folder", str(folder)]
            command += ["--pictures", str(args.pictures)]
            command += ["--iterations", str(args.iterations)] if args.iterations is not None else []
            finished = subprocess.run(command, env=environment(folder), stdout=subprocess.PIPE, text=True, check=True)
            direct = [tuple(row) for row in json.loads(finished.stdout.strip().splitlines()[-1])]
    print(f"invert_image(method='editor'), {args.iterations or 'default'} iterations, {args.pictures} 64 px drawings")
    median = report("over MCP (stdio)", over_mcp)
    user, system = server.ru_utime / args.pictures, server.ru_stime / args.pictures
    cpu = f"{user + system:.1f} s per picture (user {user:.1f} + system {system:.1f})"
    print(f"server process CPU time: {cpu}, all threads, its loading included")
    if direct is not None:
        report("direct (job runner, no protocol)", direct)  # type: ignore[arg-type]
    verdict = "met" if median <= GOAL_SECONDS else "NOT met"
    print(f"goal: median over MCP <= {GOAL_SECONDS:.0f} s per picture: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
