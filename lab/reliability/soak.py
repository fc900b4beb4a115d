"""The soak: mixed calls from 4 clients at once over both transports, for a long time, watching for growth and loss.

    python -m lab.reliability.soak --minutes 20 --json lab/results/soak.json

On the `shapes` profile (the bundled models) one HTTP server serves two clients and two stdio clients run a server
each, all four servers sharing one asset store and one concept store, as users' servers on one machine do:

- `http-a`: every tool, waiting for results, fetching `job_id`s later, cancelling (by `cancel_job` and by
  cancelling its request), learning concepts and deleting them;
- `http-b`: the same, and now and then a client on the side that drops its connection mid-call (the pre-2026 wire,
  spoken by hand) or goes away on the 2026 wire;
- `stdio-a`: the same over stdio, on one server for the whole run;
- `stdio-b`: the same over stdio, and now and then it ends its session mid-call, which stops its server, then
  starts a new one.

Every minute it records each server's resident memory, open file descriptors and threads, the asset store's files
and bytes, and each long-lived server's queue. At the end it waits for the queues to drain and checks that every
call ended in a result, a cancellation or a clear error (no job lost), that every asset is a whole PNG and every
concept whole, and it computes the floors of issue 39 from the series.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from PIL import Image

from lab.reliability.servers import (
    ProcessSample,
    folder_bytes,
    http_client,
    http_server,
    sample_process,
    server_children,
    stdio_client,
)

PROMPTS = [
    "a red circle",
    "a large blue star on the left",
    "a striped green square on a black background",
    "a small yellow heart in the middle",
    "an outlined orange triangle",
    "a purple cross at the top",
]
LONG_PROMPT = (
    "a large red circle in the center of a white picture, very detailed, sharp, beautiful, award winning, "
    "trending, masterpiece, intricate, professional lighting"
)
EDITS = ["blue", "striped", "on a black background", "as a star", "small"]
ASSET_MAX_BYTES = 3_000_000
"""The asset store's configured bound for the soak: small, so that trimming happens during the run."""
CALL_SECONDS = 300.0
LEGACY_VERSION = "2025-11-25"
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@dataclass
class Ledger:
    """Every call's end, and the jobs still to fetch."""

    outcomes: Counter = field(default_factory=Counter)
    by_tool: dict[str, Counter] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    pending: list[tuple[str, str, float]] = field(default_factory=list)
    """(client, job_id, when) of jobs left running, to fetch later."""

    def record(self, client: str, tool: str, outcome: str, detail: str = "") -> None:
        self.outcomes[outcome] += 1
        self.by_tool.setdefault(tool, Counter())[outcome] += 1
        if outcome == "lost":
            self.lost.append(f"{client} {tool}: {detail[:400]}")
        elif outcome == "error":
            self.errors[re.sub(r"'[^']*'|\d+(\.\d+)?", "_", detail)[:150]] += 1


@dataclass
class Shared:
    """What the clients share: the pictures they may send, the concepts learned, and the run's clock."""

    folder: Path
    pictures: list[str]
    assets: list[str] = field(default_factory=list)
    concepts: list[str] = field(default_factory=list)
    deadline: float = 0.0
    counter: int = 0

    def image(self, rng: random.Random) -> str:
        if self.assets and rng.random() < 0.5:
            return rng.choice(self.assets[-50:])
        if self.concepts and rng.random() < 0.1:
            return f"concept:{rng.choice(self.concepts)}"
        return rng.choice(self.pictures)


def _text(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in result.content if getattr(block, "type", "") == "text")


def planned_call(rng: random.Random, shared: Shared, name: str) -> tuple[str, dict[str, Any]]:
    """A random call of any tool, with small settings so that calls take seconds on a shared CPU."""
    steps = rng.randint(2, 6)
    seed = rng.randint(0, 10**6)
    choices: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        (
            "generate_image",
            lambda: {"prompt": rng.choice(PROMPTS), "steps": steps, "seed": seed, "num_images": rng.randint(1, 2)},
        ),
        ("vary_image", lambda: {"images": [shared.image(rng)], "steps": steps, "num_images": 1, "seed": seed}),
        (
            "edit_with_text",
            lambda: {
                "image": shared.image(rng),
                "text": rng.choice(EDITS),
                "steps": steps,
                "num_images": 1,
                "seed": seed,
            },
        ),
        ("invert_image", lambda: {"images": [shared.image(rng)], "max_tokens": 6, "num_results": 1}),
        (
            "fuse_concepts",
            lambda: {
                "images": [shared.image(rng), shared.image(rng)],
                "max_tokens": 6,
                "num_images": 1,
                "steps": steps,
                "seed": seed,
            },
        ),
        ("distill_prompt", lambda: {"prompt": LONG_PROMPT, "max_tokens": 6}),
        ("segment_image", lambda: {"image": shared.image(rng), "prompt": rng.choice(PROMPTS)}),
        ("list_concepts", dict),
        ("server_status", dict),
    ]
    if rng.random() < 0.08:
        shared.counter += 1
        concept = f"soak-{name}-{shared.counter}"
        images = [rng.choice(shared.pictures) for _ in range(3)]
        return "customize_concept", {"name": concept, "images": images, "iterations": 3, "overwrite": True}
    if shared.concepts and rng.random() < 0.06:
        return "delete_concept", {"name": rng.choice(shared.concepts)}
    tool, arguments = rng.choice(choices)
    return tool, arguments()


class SoakClient:
    """One client's loop: random calls, each ended in a result, a cancellation or an error, in the ledger."""

    def __init__(self, name: str, shared: Shared, ledger: Ledger, seed: int) -> None:
        self.name, self.shared, self.ledger = name, shared, ledger
        self.rng = random.Random(seed)
        self.client: Client | None = None

    async def call(self, tool: str, arguments: dict[str, Any]) -> Any:
        assert self.client is not None
        with anyio.fail_after(CALL_SECONDS):
            return await self.client.call_tool(tool, arguments)

    async def one(self) -> None:
        """One step: fetch a job left for later, or a new call in one of the ways a client makes it."""
        mine = [entry for entry in self.ledger.pending if entry[0] == self.name]
        if mine and self.rng.random() < 0.3:
            entry = self.rng.choice(mine)
            self.ledger.pending.remove(entry)
            await self.fetch(entry[1])
            return
        tool, arguments = planned_call(self.rng, self.shared, self.name)
        if tool in {"list_concepts", "server_status", "delete_concept", "customize_concept"}:
            await self.settle(tool, arguments, self.call(tool, arguments))
            return
        way = self.rng.choices(["wait", "later", "cancel_job", "cancel_request"], [5, 2, 1, 1])[0]
        arguments = {**arguments, "inline": self.rng.choice(["none", "thumbnail"])}
        if way == "wait":
            await self.settle(tool, arguments, self.call(tool, {**arguments, "wait_seconds": 120}))
        elif way == "later":
            await self.settle(tool, arguments, self.call(tool, {**arguments, "wait_seconds": 0}))
        elif way == "cancel_job":
            result = await self.call(tool, {**arguments, "wait_seconds": self.rng.choice([0, 0.5, 2])})
            job = (result.structured_content or {}).get("job") if not result.is_error else None
            if job and job["state"] in {"queued", "running"}:
                await self.call("cancel_job", {"job_id": job["job_id"]})
                await self.fetch(job["job_id"])
            else:
                await self.settle(tool, arguments, _ready(result))
        else:  # cancel the request itself: the client sends notifications/cancelled
            with anyio.move_on_after(self.rng.uniform(0.05, 3.0)) as scope:
                result = await self.call(tool, {**arguments, "wait_seconds": 120})
            if scope.cancelled_caught:
                self.ledger.record(self.name, tool, "cancelled_by_client")
            else:
                await self.settle(tool, arguments, _ready(result))

    async def settle(self, tool: str, arguments: dict[str, Any], answer: Awaitable[Any]) -> None:
        try:
            result = await answer
        except MCPError as error:
            self.ledger.record(self.name, tool, "lost", f"JSON-RPC error {error.error.code}: {error.error.message}")
            return
        except TimeoutError:
            self.ledger.record(self.name, tool, "lost", f"no answer in {CALL_SECONDS:.0f} s")
            return
        if result.is_error:
            self.ledger.record(self.name, tool, _error_kind(_text(result)), _text(result))
            return
        structured = result.structured_content or {}
        job = structured.get("job")
        if isinstance(job, dict) and structured.get("result") is None and job.get("state") in {"queued", "running"}:
            self.ledger.pending.append((self.name, job["job_id"], time.monotonic()))
            self.ledger.record(self.name, tool, "left_for_later")
            return
        self.ledger.record(self.name, tool, "result")
        self.learn(tool, arguments, structured)

    async def fetch(self, job_id: str) -> None:
        await self.settle("get_job", {}, self.call("get_job", {"job_id": job_id, "wait_seconds": 120}))

    def learn(self, tool: str, arguments: dict[str, Any], structured: dict[str, Any]) -> None:
        uris = re.findall(r"pictoprompt://assets/[A-Za-z0-9_-]{22}", json.dumps(structured))
        self.shared.assets.extend(uris[:2])
        if tool == "customize_concept":
            self.shared.concepts.append(arguments["name"])
        elif tool == "delete_concept" and arguments["name"] in self.shared.concepts:
            self.shared.concepts.remove(arguments["name"])

    async def loop(self, connect: Callable[[], Any], disconnect_every: float | None = None) -> None:
        """Calls until the deadline; with `disconnect_every`, a session ended mid-call about that often."""
        while time.monotonic() < self.shared.deadline:
            async with connect() as client:
                self.client = client
                started = time.monotonic()
                while time.monotonic() < self.shared.deadline:
                    if disconnect_every and time.monotonic() - started > disconnect_every:
                        await self.disconnect_mid_call()
                        break
                    await self.one()
            self.client = None
            if disconnect_every:
                # A stdio server stops with its session: the jobs it held ended with it, and the next server
                # (a new process) never knew them. They are not fetched from it.
                for entry in [e for e in self.ledger.pending if e[0] == self.name]:
                    self.ledger.pending.remove(entry)
                    self.ledger.record(self.name, "get_job", "ended_with_its_server")

    async def disconnect_mid_call(self) -> None:
        """Start a slow call and end the whole session under it (the stdio server stops with its session)."""
        call = {"prompt": "for nobody", "steps": 150, "num_images": 2, "inline": "none"}
        async with anyio.create_task_group() as group:
            group.start_soon(self.call, "generate_image", call)
            await anyio.sleep(self.rng.uniform(0.2, 3.0))
            group.cancel_scope.cancel()
        self.ledger.record(self.name, "generate_image", "disconnected")


def _ready(result: Any) -> Awaitable[Any]:
    async def ready() -> Any:
        return result

    return ready()


def _error_kind(text: str) -> str:
    """A tool error that only says the tool failed, or a job's crash, is a lost call; a cancellation is one."""
    if re.fullmatch(r"Error executing tool \w+", text.strip()) or "Internal error" in text:
        return "lost"
    if "cancel" in text.lower():
        return "cancelled"
    if "There is no job" in text:
        return "lost"  # a job_id this run got and fetched within the hour it is kept
    return "error"


async def drop_connections(url: str, ledger: Ledger, rng: random.Random, deadline: float) -> None:
    """Clients on the side of `http-b` that go away mid-call: by dropping the connection (pre-2026 wire, which
    does not cancel by itself) or by closing the response stream (2026 wire)."""
    while time.monotonic() < deadline:
        await anyio.sleep(rng.uniform(20, 60))
        call = {"prompt": "for nobody", "steps": 150, "num_images": 2, "inline": "none"}
        if rng.random() < 0.5:
            await _legacy_drop(url, call, rng)
            ledger.record("http-dropper", "generate_image", "disconnected")
        else:
            client = Client(streamable_http_client(url), mode="2026-07-28")
            async with client, anyio.create_task_group() as group:
                group.start_soon(client.call_tool, "generate_image", call)
                await anyio.sleep(rng.uniform(0.2, 3.0))
                group.cancel_scope.cancel()
            ledger.record("http-dropper", "generate_image", "disconnected")


async def _legacy_drop(url: str, call: dict[str, Any], rng: random.Random) -> None:
    info = {"name": "soak-dropper", "version": "1"}
    initialize = {"protocolVersion": LEGACY_VERSION, "capabilities": {}, "clientInfo": info}
    async with httpx.AsyncClient(timeout=60) as raw:
        answer = await raw.post(
            url, json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": initialize}, headers=ACCEPT
        )
        headers = {**ACCEPT, "mcp-session-id": answer.headers["mcp-session-id"], "mcp-protocol-version": LEGACY_VERSION}
        await raw.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
        request = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "generate_image", "arguments": call},
        }
        async with raw.stream("POST", url, json=request, headers=headers):
            await anyio.sleep(rng.uniform(0.2, 3.0))
    # leaving the block closes the connection with no notifications/cancelled, as a killed client does


# ------------------------------------------------------------------------------------------------ the monitor


@dataclass
class Minute:
    minute: float
    processes: dict[str, ProcessSample | None]
    asset_files: int
    asset_bytes: int
    queues: dict[str, Any]
    outcomes: dict[str, int]


async def monitor(
    pids: dict[str, int],
    clients: dict[str, SoakClient],
    shared: Shared,
    ledger: Ledger,
    series: list[Minute],
    started: float,
    every: float,
) -> None:
    while True:
        queues = {}
        for name, soak_client in clients.items():
            if soak_client.client is None:
                continue
            try:
                with anyio.fail_after(60):
                    status = await soak_client.client.call_tool("server_status", {})
                queues[name] = status.structured_content["queue"]
            except Exception as error:  # a sampling miss is recorded, not fatal
                queues[name] = f"{type(error).__name__}"
        # stdio-b's server changes on each reconnection: it is the child server that is neither of the others.
        others = {pid for name, pid in pids.items() if name != "stdio-b"}
        pids["stdio-b"] = max(set(server_children()) - others, default=0)
        files, size = folder_bytes(shared.folder / "assets")
        minute = Minute(
            round((time.monotonic() - started) / 60, 2),
            {name: sample_process(pid) for name, pid in pids.items()},
            files,
            size,
            queues,
            dict(ledger.outcomes),
        )
        series.append(minute)
        print(_minute_line(minute), flush=True)
        if time.monotonic() >= shared.deadline:
            return
        await anyio.sleep(min(every, max(0.0, shared.deadline - time.monotonic())))


def _minute_line(minute: Minute) -> str:
    parts = [f"t={minute.minute:5.1f} min"]
    for name, sample in minute.processes.items():
        if sample:
            parts.append(f"{name} rss={sample.rss_bytes / 1e6:.0f}MB fds={sample.open_fds} thr={sample.threads}")
    parts.append(f"assets={minute.asset_files} files/{minute.asset_bytes / 1e6:.2f}MB")
    parts.append(f"calls={sum(minute.outcomes.values())}")
    return " | ".join(parts)


# ------------------------------------------------------------------------------------------------ the end checks


def check_assets(folder: Path) -> dict[str, int]:
    """Whole PNGs with their metadata, and what an interrupted write left (temporary files)."""
    whole = broken = temporary = 0
    for path in (folder / "assets").iterdir():
        if path.name.startswith(".tmp-"):
            temporary += 1
            continue
        try:
            with Image.open(path) as image:
                image.load()
                whole += 1 if image.text else 0
                broken += 0 if image.text else 1
        except Exception:
            broken += 1
    return {"whole": whole, "broken": broken, "temporary": temporary}


def check_concepts(folder: Path) -> dict[str, int]:
    """Complete concepts (card, weights, thumbnails) and anything else left in the concept store."""
    from pictoprompt.models.concepts import NAME_PATTERN, ConceptCard

    whole = broken = leftovers = 0
    root = folder / "data" / "concepts"
    for entry in root.iterdir() if root.is_dir() else []:
        if not NAME_PATTERN.fullmatch(entry.name):
            leftovers += 1
            continue
        try:
            card = ConceptCard.model_validate_json((entry / "card.json").read_text())
            complete = (entry / "weights.safetensors").is_file() and all((entry / t).is_file() for t in card.thumbnails)
        except Exception:
            complete = False
        whole += complete
        broken += not complete
    return {"whole": whole, "broken": broken, "leftovers": leftovers}


def floors(series: list[Minute], long_lived: list[str]) -> dict[str, Any]:
    """Issue 39's soak floors from the minute series: growth after minute 5, per long-lived server."""
    after = [m for m in series if m.minute >= 5]
    figures: dict[str, Any] = {}
    for name in long_lived:
        samples = [m.processes.get(name) for m in after]
        samples = [s for s in samples if s is not None]
        if len(samples) < 2:
            figures[name] = "too few samples"
            continue
        first = samples[0]
        figures[name] = {
            "rss_at_5_min_mb": round(first.rss_bytes / 1e6, 1),
            "rss_growth_mb": round((samples[-1].rss_bytes - first.rss_bytes) / 1e6, 1),
            "rss_peak_growth_mb": round((max(s.rss_bytes for s in samples) - first.rss_bytes) / 1e6, 1),
            "fds": [s.open_fds for s in samples],
            "threads": [s.threads for s in samples],
        }
    figures["asset_bytes_peak"] = max((m.asset_bytes for m in series), default=0)
    return figures


async def soak(folder: Path, minutes: float, every: float, seed: int, profile: str) -> dict[str, Any]:
    pictures = []
    for index, colour in enumerate([(220, 30, 30), (30, 60, 220), (240, 220, 20), (30, 180, 60)]):
        path = folder / f"picture-{index}.png"
        Image.new("RGB", (64, 64), colour).save(path)
        pictures.append(str(path))
    shared, ledger, series = Shared(folder, pictures), Ledger(), []
    rng = random.Random(seed)
    clients = {
        name: SoakClient(name, shared, ledger, rng.randint(0, 10**9))
        for name in ("http-a", "http-b", "stdio-a", "stdio-b")
    }
    extra = {"PICTOPROMPT_ASSET_MAX_BYTES": str(ASSET_MAX_BYTES)}
    with http_server(folder, profile, **extra) as server:
        pids = {"http": server.process.pid}
        started = time.monotonic()
        shared.deadline = started + minutes * 60
        before = set(server_children())
        async with stdio_client(folder, profile, **extra) as steady:
            pids["stdio-a"] = max(set(server_children()) - before)
            clients["stdio-a"].client = steady
            pids["stdio-b"] = 0
            async with anyio.create_task_group() as group:
                group.start_soon(monitor, pids, clients, shared, ledger, series, started, every)
                group.start_soon(clients["http-a"].loop, lambda: http_client(server))
                group.start_soon(clients["http-b"].loop, lambda: http_client(server))
                group.start_soon(drop_connections, server.url, ledger, random.Random(seed + 1), shared.deadline)
                group.start_soon(_steady_loop, clients["stdio-a"])
                group.start_soon(clients["stdio-b"].loop, lambda: stdio_client(folder, profile, **extra), 150.0)
            drained = await drain(server, steady, ledger, clients["stdio-a"])
    return {
        "minutes": minutes,
        "profile": profile,
        "asset_max_bytes": ASSET_MAX_BYTES,
        "outcomes": dict(ledger.outcomes),
        "by_tool": {tool: dict(counts) for tool, counts in ledger.by_tool.items()},
        "lost": ledger.lost,
        "errors": dict(ledger.errors.most_common(30)),
        "drained": drained,
        "assets": check_assets(folder),
        "concepts": check_concepts(folder),
        "floors": floors(series, ["http", "stdio-a"]),
        "series": [
            {**m.__dict__, "processes": {k: (v.__dict__ if v else None) for k, v in m.processes.items()}}
            for m in series
        ],
    }


async def _steady_loop(soak_client: SoakClient) -> None:
    while time.monotonic() < soak_client.shared.deadline:
        await soak_client.one()


async def drain(server: Any, steady: Client, ledger: Ledger, steady_client: SoakClient) -> dict[str, Any]:
    """Fetch every job left for later, then wait for both long-lived servers' queues to empty."""
    async with http_client(server) as http:
        fetcher = SoakClient("drain", steady_client.shared, ledger, 0)
        for client_name, job_id, _ in list(ledger.pending):
            fetcher.client = steady if client_name.startswith("stdio-a") else http
            if client_name == "stdio-b":
                ledger.record(client_name, "get_job", "ended_with_its_server")  # its session, and server, ended
                continue
            await fetcher.fetch(job_id)
        ledger.pending.clear()
        queues = {}
        for name, client in (("http", http), ("stdio-a", steady)):
            deadline = time.monotonic() + 300
            while True:
                queue = (await client.call_tool("server_status", {})).structured_content["queue"]
                if (not queue["running"] and not queue["queued"]) or time.monotonic() > deadline:
                    break
                await anyio.sleep(2)
            queues[name] = queue
    return queues


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.reliability.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--every", type=float, default=60, help="Seconds between samples.")
    parser.add_argument("--seed", type=int, default=39)
    parser.add_argument("--profile", default="shapes")
    parser.add_argument("--json", type=Path, help="Also write the report and the series here.")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-") as folder:
        report = anyio.run(soak, Path(folder), args.minutes, args.every, args.seed, args.profile)
    summary = {key: value for key, value in report.items() if key != "series"}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
