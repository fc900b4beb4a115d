"""Ray Serve, measured: replicas, the front's added latency, a replica killed in the middle, batching.

Run: `pictoprompt bench ray` (or `make bench-ray`); about 4-6 minutes on a quiet 2-core machine. Four phases, each a
fresh MCP HTTP front (`pictoprompt serve --http`, a subprocess) on the tiny profile, one torch thread per process:

- `single`: the single-box server (no Ray): the reference for the front's added latency;
- `ray-1`: a front on a local Ray with one replica, batching off;
- `ray-2`: the same with two replicas; then the kill: 100 calls from 4 clients, one replica's worker process killed
  with SIGKILL after the 50th call has ended;
- `ray-1-batched`: one replica batching up to 8 calls (the default settings).

Each phase times `--latency-calls` calls one after the other (p50, p95: what one user sees) and `--waves` waves of 8
concurrent calls (throughput; p50, p95 of those calls). Every call is the same fixed work, `generate_image` with its
own seed. The floors (issue 38):
1. two replicas give >= 1.5x the throughput of one (`ray-2` over `ray-1`, the waves);
2. the front adds <= 30 ms to a call's median (`ray-1` over `single`, calls one after the other);
3. with a replica killed halfway, every call ends in its result or the clear replica-stopped error, none hangs,
   Serve replaces the replica, and the next calls succeed;
4. batching: 8 concurrent calls on one replica reach >= 1.5x the throughput of the same calls unbatched
   (`ray-1-batched` over `ray-1`, the waves), with the same pixels per seed (within 2 levels of 8 bits).
The last line of the output is the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from PIL import Image

TOKEN = "ray-benchmark-token-0123456789"
CLIENTS = 8
"""Concurrent calls per wave (floor 4 names 8)."""
REPLICA_STOPPED = "replica running this job stopped"
"""What the clear error of a call whose replica died says (`ray_serve.RayJobs`)."""
PIXEL_TOLERANCE = 2


@dataclass
class Call:
    seconds: float
    outcome: str
    """"ok", "replica-stopped", "error: ...", or "hung"."""
    seed: int
    path: str | None = None
    replica: str | None = None
    message: str | None = None
    ended_at: float = field(default_factory=time.monotonic)


def environment(folder: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        # An idle torch process must not keep its threads spinning on the cores the others measure on.
        "OMP_WAIT_POLICY": "PASSIVE",
        "PICTOPROMPT_PROFILE": "tiny",
        "PICTOPROMPT_ASSET_DIR": str(folder / "assets"),
        "PICTOPROMPT_CACHE_DIR": str(folder / "cache"),
        "PICTOPROMPT_DATA_DIR": str(folder / "data"),
        "PICTOPROMPT_TOKEN": TOKEN,
        "PICTOPROMPT_QUEUE_DEPTH": "200",
        "PICTOPROMPT_ALLOW_DIRS": json.dumps([str(folder)]),
        **extra,
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@asynccontextmanager
async def front(folder: Path, name: str, ray_address: str | None, **settings: str) -> AsyncIterator[str]:
    """A `pictoprompt serve --http` subprocess (with `--ray ADDRESS` when given); yields its URL once it listens."""
    port = free_port()
    command = [sys.executable, "-m", "pictoprompt.cli", "serve", "--http", "--port", str(port)]
    if ray_address:
        command += ["--ray", ray_address]
    log = (folder / f"{name}.log").open("w")
    process = subprocess.Popen(command, env=environment(folder, **settings), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the {name} front did not start; see {folder / f'{name}.log'}") from None
                await anyio.sleep(0.3)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


@asynccontextmanager
async def session(url: str) -> AsyncIterator[Client]:
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {TOKEN}"})
    async with http, Client(streamable_http_client(url, http_client=http), read_timeout_seconds=600) as client:
        yield client


async def generate(client: Client, work: dict[str, Any], seed: int, timeout: float) -> Call:
    """One `generate_image` call, its outcome sorted: a result, the clear replica-stopped error, another error, or
    no answer within `timeout` (hung)."""
    started = time.perf_counter()
    try:
        with anyio.fail_after(timeout):
            result = await client.call_tool("generate_image", {**work, "seed": seed, "wait_seconds": timeout})
    except TimeoutError:
        return Call(time.perf_counter() - started, "hung", seed)
    seconds = time.perf_counter() - started
    content = result.structured_content or {}
    job = content.get("job") or {}
    if result.is_error:
        text = result.content[0].text if result.content else ""
        return Call(seconds, "replica-stopped" if REPLICA_STOPPED in text else f"error: {text[:200]}", seed)
    if job.get("state") != "succeeded":
        return Call(seconds, f"error: ended {job.get('state')}", seed)
    image = content["result"]["images"][0]
    return Call(seconds, "ok", seed, image["path"], job.get("replica"), job.get("message"))


async def warm_up(url: str, work: dict[str, Any], folder: Path) -> None:
    """Untimed: an `invert_image` (it waits for a single-box server's background warm-up, which would otherwise
    compete with the timed calls), then two calls from each of 4 clients, so every replica and path is warm."""
    picture = folder / "warm-up.png"
    Image.new("RGB", (32, 32), (220, 30, 30)).save(picture)
    async with session(url) as client:
        arguments = {"images": [str(picture)], "max_tokens": 4, "num_results": 1, "wait_seconds": 600}
        inverted = await client.call_tool("invert_image", arguments)
        if inverted.is_error:
            raise RuntimeError(f"the warm-up inversion failed: {inverted.content[0].text}")
    async with anyio.create_task_group() as group:
        for index in range(4):
            group.start_soon(_warm_one, url, work, 10_000 + index)


async def _warm_one(url: str, work: dict[str, Any], seed: int) -> None:
    async with session(url) as client:
        for offset in range(2):
            call = await generate(client, work, seed + 100 * offset, 300)
            if call.outcome != "ok":
                raise RuntimeError(f"a warm-up call failed: {call.outcome}")


async def sequential(url: str, work: dict[str, Any], calls: int) -> list[Call]:
    async with session(url) as client:
        return [await generate(client, work, 20_000 + index, 300) for index in range(calls)]


async def waves(url: str, work: dict[str, Any], count: int) -> tuple[list[Call], float]:
    """`count` waves of `CLIENTS` calls at once, each client on its own session; the calls and the wall time."""
    calls: list[Call] = []
    async with session(url) as first:
        clients = [first]
        sessions = [session(url) for _ in range(CLIENTS - 1)]
        for opened in sessions:
            clients.append(await opened.__aenter__())
        try:
            started = time.perf_counter()
            for wave in range(count):
                async with anyio.create_task_group() as group:
                    for index, client in enumerate(clients):

                        async def one(client: Client = client, seed: int = wave * CLIENTS + index) -> None:
                            calls.append(await generate(client, work, seed, 300))

                        group.start_soon(one)
            wall = time.perf_counter() - started
        finally:
            for opened in reversed(sessions):
                await opened.__aexit__(None, None, None)
    return calls, wall


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary(latency: list[Call], wave_calls: list[Call], wall: float) -> dict[str, Any]:
    ok = [call for call in wave_calls if call.outcome == "ok"]
    batches = Counter(_batch_size(call.message) for call in ok)
    return {
        "latency_p50_ms": 1000 * statistics.median(c.seconds for c in latency),
        "latency_p95_ms": 1000 * percentile([c.seconds for c in latency], 0.95),
        "throughput_calls_per_s": len(ok) / wall,
        "waves_p50_ms": 1000 * statistics.median(c.seconds for c in ok),
        "waves_p95_ms": 1000 * percentile([c.seconds for c in ok], 0.95),
        "failed": len(wave_calls) - len(ok) + sum(c.outcome != "ok" for c in latency),
        "replicas_used": len({c.replica for c in ok if c.replica}),
        "batch_sizes": dict(sorted(batches.items())),
    }


def _batch_size(message: str | None) -> int:
    """How many calls shared the last denoising step, from its progress message ("... (in a batch of 8 calls)")."""
    if message and "in a batch of " in message:
        return int(message.split("in a batch of ")[1].split()[0])
    return 1


async def measure(
    url: str, work: dict[str, Any], args: argparse.Namespace, folder: Path
) -> tuple[dict[str, Any], list[Call]]:
    await warm_up(url, work, folder)
    latency = await sequential(url, work, args.latency_calls)
    wave_calls, wall = await waves(url, work, args.waves)
    return summary(latency, wave_calls, wall), wave_calls


# ------------------------------------------------------------------------------------------------ the kill


def live_replicas() -> dict[str, int]:
    """The deployment's live replicas: actor name -> process id."""
    import ray
    from ray.util import list_named_actors

    found = {}
    for actor in list_named_actors(all_namespaces=True):
        if actor["namespace"] == "serve" and "#ModelReplica#" in actor["name"]:
            handle = ray.get_actor(actor["name"], namespace="serve")
            try:
                found[actor["name"]] = ray.get(handle.__ray_call__.remote(lambda _: os.getpid()), timeout=30)
            except Exception:  # the replica died between the listing and the question: not live
                continue
    return found


async def kill_in_the_middle(url: str, work: dict[str, Any], total: int, timeout: float) -> dict[str, Any]:
    """`total` calls from 4 clients; one replica killed (SIGKILL on its worker process) once `total // 2` calls have
    ended. Then: Serve replaced the replica, and 4 more calls succeed."""
    before = await anyio.to_thread.run_sync(live_replicas)
    ended: list[Call] = []
    killed: dict[str, Any] = {}
    per_client = total // 4

    async def client_loop(index: int) -> None:
        async with session(url) as client:
            for call in range(per_client):
                ended.append(await generate(client, work, 30_000 + index * per_client + call, timeout))
                if len(ended) == total // 2 and not killed:
                    name, pid = sorted(before.items())[0]
                    os.kill(pid, signal.SIGKILL)
                    killed.update(name=name, pid=pid, at=time.monotonic())

    async with anyio.create_task_group() as group:
        for index in range(4):
            group.start_soon(client_loop, index)
    replaced_after = await _wait_for_replacement(set(before), killed, len(before))
    async with session(url) as client:
        after = [await generate(client, work, 40_000 + index, timeout) for index in range(4)]
    outcomes = Counter(call.outcome if not call.outcome.startswith("error") else "other error" for call in ended)
    served_on = sum(call.outcome == "ok" and call.ended_at > killed.get("at", 0) for call in ended)
    return {
        "calls": len(ended),
        "results": outcomes.get("ok", 0),
        "clear_errors": outcomes.get("replica-stopped", 0),
        "other_errors": [call.outcome for call in ended if call.outcome.startswith("error")],
        "hung": outcomes.get("hung", 0),
        "lost": total - len(ended),
        "results_after_the_kill": served_on,
        "replaced_within_s": replaced_after,
        "next_calls_ok": sum(call.outcome == "ok" for call in after),
        "next_calls_replicas": sorted({call.replica or "" for call in after}),
    }


async def _wait_for_replacement(before: set[str], killed: dict[str, Any], count: int) -> float | None:
    """Seconds from the kill until Serve ran `count` live replicas again, one of them new; None if not in 120 s."""
    if not killed:
        return None
    while time.monotonic() - killed["at"] < 120:
        live = await anyio.to_thread.run_sync(live_replicas)
        if len(live) == count and killed["name"] not in live and set(live) - before:
            return time.monotonic() - killed["at"]
        await anyio.sleep(0.5)
    return None


# ------------------------------------------------------------------------------------------------ the run


def same_pixels(first: list[Call], second: list[Call]) -> float | None:
    """The largest 8-bit difference between the pictures of the same seed in two runs; None if none match up."""
    paths = {call.seed: call.path for call in first if call.path}
    differences = [
        int(np.abs(np.asarray(Image.open(paths[c.seed]), np.int16) - np.asarray(Image.open(c.path), np.int16)).max())
        for c in second
        if c.path and c.seed in paths
    ]
    return max(differences) if differences else None


async def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    import ray
    from ray import serve

    from pictoprompt.server.ray_serve import APP_NAME, NAMESPACE

    work: dict[str, Any] = {"prompt": "a red circle on the left", "steps": args.steps, "inline": "none"}
    if args.side is not None:
        work.update(width=args.side, height=args.side)
    figures: dict[str, Any] = {"work": work, "clients": CLIENTS, "waves": args.waves}
    async with front(folder, "single", None) as url:
        figures["single"], _ = await measure(url, work, args, folder)
    # Logical CPUs: two replicas and the replacement of a killed one must fit.
    ray.init(num_cpus=4, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    phases = {
        "ray-1": {"PICTOPROMPT_RAY_MAX_REPLICAS": "1", "PICTOPROMPT_RAY_BATCH_SIZE": "1"},
        "ray-2": {"PICTOPROMPT_RAY_MIN_REPLICAS": "2", "PICTOPROMPT_RAY_MAX_REPLICAS": "2"},
        "ray-1-batched": {"PICTOPROMPT_RAY_MAX_REPLICAS": "1", "PICTOPROMPT_RAY_BATCH_SIZE": "8"},
    }
    phases["ray-2"]["PICTOPROMPT_RAY_BATCH_SIZE"] = "1"
    calls: dict[str, list[Call]] = {}
    try:
        for name, settings in phases.items():
            async with front(folder, name, address, **settings) as url:
                figures[name], calls[name] = await measure(url, work, args, folder)
                if name == "ray-2" and args.kill_calls:
                    kill_work = {**work, "steps": max(2, args.steps // 2)}
                    figures["kill"] = await kill_in_the_middle(url, kill_work, args.kill_calls, args.call_timeout)
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    figures["batched_max_pixel_difference"] = same_pixels(calls["ray-1"], calls["ray-1-batched"])
    return figures


def verdicts(figures: dict[str, Any]) -> list[tuple[str, str, bool]]:
    one, two, batched = figures["ray-1"], figures["ray-2"], figures["ray-1-batched"]
    scaling = two["throughput_calls_per_s"] / one["throughput_calls_per_s"]
    added = one["latency_p50_ms"] - figures["single"]["latency_p50_ms"]
    kill = figures.get("kill")
    batching = batched["throughput_calls_per_s"] / one["throughput_calls_per_s"]
    pixels = figures["batched_max_pixel_difference"]
    rows = [
        ("1. 2 replicas / 1 replica throughput >= 1.5x", f"{scaling:.2f}x", scaling >= 1.5),
        ("2. front's added median latency <= 30 ms", f"{added:+.1f} ms", added <= 30),
    ]
    if kill is not None:
        clean = kill["results"] + kill["clear_errors"] == kill["calls"] == figures["kill_total"]
        ok = clean and kill["hung"] == 0 and kill["replaced_within_s"] is not None and kill["next_calls_ok"] == 4
        ok = ok and kill["results_after_the_kill"] > 0
        text = (
            f"{kill['results']} results, {kill['clear_errors']} clear errors, {len(kill['other_errors'])} other, "
            f"{kill['hung']} hung, {kill['lost']} lost; replaced in {_seconds(kill['replaced_within_s'])}; "
            f"next {kill['next_calls_ok']}/4 ok"
        )
        rows.append(("3. a replica killed halfway: nothing lost or hung", text, ok))
    text = f"{batching:.2f}x, max pixel difference {pixels}"
    rows.append(("4. batching 8 calls >= 1.5x unbatched, same pixels", text, batching >= 1.5 and pixels is not None))
    rows[-1] = (rows[-1][0], rows[-1][1], rows[-1][2] and pixels <= PIXEL_TOLERANCE)
    return rows


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pictoprompt bench ray", description=__doc__)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of each call (fixed work)")
    parser.add_argument("--side", type=int, help="picture side in pixels (default: the profile's, 32 on tiny)")
    parser.add_argument("--latency-calls", type=int, default=15, help="calls one after the other per phase")
    parser.add_argument("--waves", type=int, default=3, help="waves of 8 concurrent calls per phase")
    parser.add_argument("--kill-calls", type=int, default=100, help="calls of the kill test (0: skip it)")
    parser.add_argument("--call-timeout", type=float, default=120, help="a call without an answer by then hung")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        figures = anyio.run(run, args, Path(scratch))
    figures["kill_total"] = args.kill_calls
    figures["wall_s"] = time.monotonic() - started
    size = f"{args.side}x{args.side}" if args.side else "the profile's size"
    print(f"generate_image on tiny, {args.steps} steps, {size}, one torch thread per process")
    print(f"{'phase':14} {'seq p50 ms':>10} {'seq p95 ms':>10} {'calls/s':>8} {'wave p50':>9} {'wave p95':>9}  batches")
    for name in ("single", "ray-1", "ray-2", "ray-1-batched"):
        row = figures[name]
        print(
            f"{name:14} {row['latency_p50_ms']:10.1f} {row['latency_p95_ms']:10.1f} "
            f"{row['throughput_calls_per_s']:8.2f} {row['waves_p50_ms']:9.1f} {row['waves_p95_ms']:9.1f}  "
            f"{row['batch_sizes']} (failed {row['failed']}, replicas {row['replicas_used']})"
        )
    print()
    for floor, figure, met in verdicts(figures):
        print(f"{floor:55} {figure:45} {'met' if met else 'NOT met'}")
    print(f"\nwall time {figures['wall_s']:.0f} s, load average now {os.getloadavg()[0]:.1f}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
