"""Memory under hostile load, measured on a real `pictoprompt serve --http` subprocess (tiny profile).

1. Hostile load: with the queue full, 10 concurrent customize_concept calls, each carrying ten 6300x6300 one-bit
   PNGs (39.7 megapixels each): the rise of the server's peak RSS (VmHWM, reset through /proc/PID/clear_refs).
2. Six sequential vary_image calls with one 39.7-megapixel input each: RSS after them minus RSS after one
   small warm-up call.

Run: `pictoprompt bench hostile_load [--concurrent 10] [--images 10] [--sequential 6]`. Goals: the first rise at
most 500 MB, the second at most 50 MB. It needs several GB of free memory on the unfixed code.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import anyio
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from PIL import Image

SIDE = 6300  # 39.69 megapixels, under the 40-megapixel input limit


def png_uri(side: int, shade: int = 1) -> str:
    buffer = io.BytesIO()
    image = Image.new("1", (side, side), shade)
    image.putpixel((shade % side, 0), 1 - shade)  # distinct files, so no reference is deduplicated
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS


class Sampler:
    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status_kb(self.pid, "VmRSS"))
            time.sleep(0.005)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def measure(args: argparse.Namespace) -> None:
    folder = tempfile.mkdtemp(prefix="issue21-")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PICTOPROMPT_PROFILE": "tiny",
        "PICTOPROMPT_QUEUE_DEPTH": "1",
        "PICTOPROMPT_ASSET_DIR": f"{folder}/assets",
        "PICTOPROMPT_DATA_DIR": f"{folder}/data",
    }
    with open(f"{folder}/server.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "pictoprompt.cli", "serve", "--http", "--port", str(port)],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        print(f"server pid {server.pid}", flush=True)
        pictures = [png_uri(SIDE, index % 2) for index in range(args.images)]
        request_kb = sum(len(p) for p in pictures) / 1024
        async with Client(streamable_http_client(url), read_timeout_seconds=600) as client:
            long_job = {"prompt": "hold", "steps": 150, "num_images": 8, "wait_seconds": 0, "inline": "none"}
            blockers = [await client.call_tool("generate_image", long_job) for _ in range(2)]
            await anyio.sleep(0.5)
            status = (await client.call_tool("server_status", {})).structured_content["queue"]
            print(f"queue before the attack: running {len(status['running'])}, queued {status['queued']}")

            outcomes: list[str] = []

            async def attack() -> None:
                async with Client(streamable_http_client(url), read_timeout_seconds=600) as attacker:
                    arguments = {"name": "attack", "images": pictures, "iterations": 1, "wait_seconds": 0}
                    result = await attacker.call_tool("customize_concept", arguments)
                    outcomes.append(result.content[0].text[:80] if result.is_error else "accepted")

            reset_peak(server.pid)
            baseline = status_kb(server.pid, "VmRSS")
            started = time.monotonic()
            with Sampler(server.pid) as sampler:
                async with anyio.create_task_group() as group:
                    for _ in range(args.concurrent):
                        group.start_soon(attack)
            elapsed = time.monotonic() - started
            rise = max(status_kb(server.pid, "VmHWM"), sampler.peak) - baseline
            print(
                f"hostile load: {args.concurrent} concurrent calls x {args.images} images of {SIDE}x{SIDE} "
                f"({request_kb:.0f} kB of request each): {sorted(set(outcomes))} in {elapsed:.2f} s; "
                f"peak RSS rise {rise / 1e6:.1f} MB"
            )
            for blocker in blockers:
                await client.call_tool("cancel_job", {"job_id": blocker.structured_content["job"]["job_id"]})
            await anyio.sleep(1)

            small = {"images": [png_uri(64)], "steps": 1, "num_images": 1, "inline": "none"}
            assert not (await client.call_tool("vary_image", small)).is_error
            await anyio.sleep(0.5)
            before = status_kb(server.pid, "VmRSS")
            for index in range(args.sequential):
                arguments = {**small, "images": [png_uri(SIDE, index % 2)], "wait_seconds": 600}
                result = await client.call_tool("vary_image", arguments)
                assert not result.is_error, result.content[0].text
                print(f"  after call {index + 1}: RSS {status_kb(server.pid, 'VmRSS') / 1e6:.0f} MB", flush=True)
            await anyio.sleep(0.5)
            after = status_kb(server.pid, "VmRSS")
            print(
                f"sequential: {args.sequential} vary_image calls with one {SIDE}x{SIDE} input each left "
                f"{(after - before) / 1e6:.1f} MB behind (RSS {before / 1e6:.0f} -> {after / 1e6:.0f} MB)"
            )
    finally:
        server.terminate()
        server.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pictoprompt bench hostile_load", description=__doc__)
    parser.add_argument("--concurrent", type=int, default=10, help="concurrent calls while the queue is full")
    parser.add_argument("--images", type=int, default=10, help="40-megapixel images per concurrent call")
    parser.add_argument("--sequential", type=int, default=6, help="sequential calls with one such image each")
    anyio.run(measure, parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
