"""Hardening found by an outside attack (issue 21): memory under hostile load, DNS rebinding, the HTTP body limit,
tokens in the access log, jobs orphaned by dead clients.

The HTTP tests run the real `pictoprompt serve --http` in a subprocess, token-less on 127.0.0.2 (a loopback address
other than the three the MCP SDK protects by itself): the session's shared server (conftest), started once.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import io
import json
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import anyio
import httpx
import numpy as np
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from PIL import Image

from pictoprompt.errors import BusyError, NotFoundError
from pictoprompt.server import images as images_module
from pictoprompt.server.app import create_server
from pictoprompt.server.assets import AssetStore, RecordingSink
from pictoprompt.server.images import ImagePolicy, ImageResolver
from pictoprompt.server.jobs import JobRunner, forget_ended
from pictoprompt.tools import TOOLS

HOST = "127.0.0.2"
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
LEGACY_VERSION = "2025-11-25"


def one_bit_png(side: int) -> bytes:
    """A white one-bit PNG: a few kB on the wire, `side`² × 3 bytes once decoded to RGB."""
    buffer = io.BytesIO()
    Image.new("1", (side, side), 1).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def server_for(settings, tiny_runtime):
    return create_server(settings, runtime=tiny_runtime, preload=False)


class RssSampler:
    """The process's peak resident memory above where it stood at `start`, sampled every few milliseconds."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self.baseline = self.peak = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __enter__(self) -> RssSampler:
        gc.collect()
        self.baseline = self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def rise(self) -> int:
        return self.peak - self.baseline


# --- 1. memory --------------------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
async def test_a_full_queue_refuses_calls_before_decoding_so_memory_stays_flat(settings, tiny_runtime, monkeypatch):
    # Ten concurrent calls, each with ten 1500x1500 pictures (6.75 MB each once decoded, 675 MB in all), against
    # a full queue. Decoding them before the busy check is what made the attack in the issue cost gigabytes.
    decoded: list[int] = []
    decode = images_module.decode_image

    def counting_decode(*args: Any, **kwargs: Any) -> Image.Image:
        decoded.append(1)
        return decode(*args, **kwargs)

    monkeypatch.setattr(images_module, "decode_image", counting_decode)
    settings.queue_depth = 1
    pictures = [data_uri(one_bit_png(1500 + index)) for index in range(10)]  # distinct, so none is deduplicated
    tiny_runtime.gpu_lock.acquire()  # the worker blocks on the first job; the second fills the queue
    try:
        async with Client(server_for(settings, tiny_runtime)) as client:
            queued = {"prompt": "q", "steps": 1, "wait_seconds": 0, "inline": "none"}
            first = await client.call_tool("generate_image", queued)
            await anyio.sleep(0.2)
            second = await client.call_tool("generate_image", queued)
            assert not first.is_error and not second.is_error
            results: list[Any] = []

            async def attack() -> None:
                arguments = {"name": "attack", "images": pictures, "iterations": 1, "wait_seconds": 0}
                results.append(await client.call_tool("customize_concept", arguments))

            with RssSampler() as memory:
                async with anyio.create_task_group() as group:
                    for _ in range(10):
                        group.start_soon(attack)
            for job in (first, second):
                await client.call_tool("cancel_job", {"job_id": job.structured_content["job"]["job_id"]})
    finally:
        tiny_runtime.gpu_lock.release()
    assert len(results) == 10 and all(r.is_error and "busy" in r.content[0].text for r in results)
    assert memory.rise < 60e6, f"peak memory rose by {memory.rise / 1e6:.0f} MB"
    assert decoded == [], "a call refused as busy must not decode its images"


def test_decoding_shares_one_pixel_budget_across_requests(monkeypatch):
    side = 300
    pictures = [data_uri(one_bit_png(side + index)) for index in range(4)]
    active = peak = 0
    lock = threading.Lock()
    transpose = images_module.ImageOps.exif_transpose

    def slow_transpose(image: Image.Image, **kwargs: Any) -> Any:  # runs while the decode holds its budget
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.05)
        with lock:
            active -= 1
        return transpose(image, **kwargs)

    monkeypatch.setattr(images_module.ImageOps, "exif_transpose", slow_transpose)

    def decode_concurrently(budget_pixels: int) -> int:
        nonlocal peak
        peak = 0
        resolver = ImageResolver(ImagePolicy(decode_budget_pixels=budget_pixels))

        async def main() -> None:
            async with anyio.create_task_group() as group:
                for picture in pictures:  # four requests at once, one picture each
                    group.start_soon(resolver.resolve, picture)

        anyio.run(main)
        assert resolver.budget.in_use == 0
        return peak

    assert decode_concurrently(budget_pixels=(side + 3) ** 2) == 1  # room for one picture: one at a time
    assert decode_concurrently(budget_pixels=4 * (side + 3) ** 2) > 1  # room for all: they overlap


@pytest.mark.anyio
async def test_a_finished_job_drops_its_decoded_inputs(settings, tiny_runtime, monkeypatch):
    alive: list[weakref.ref] = []
    decode = images_module.decode_image

    def tracking_decode(*args: Any, **kwargs: Any) -> Image.Image:
        image = decode(*args, **kwargs)
        alive.append(weakref.ref(image))
        return image

    monkeypatch.setattr(images_module, "decode_image", tracking_decode)
    async with Client(server_for(settings, tiny_runtime)) as client:
        for index in range(3):
            arguments = {"images": [data_uri(one_bit_png(64 + index))], "steps": 1, "num_images": 1}
            result = await client.call_tool("vary_image", {**arguments, "inline": "none"})
            assert not result.is_error, result.content
        job_id = result.structured_content["job"]["job_id"]
        gc.collect()
        assert len(alive) == 3 and all(ref() is None for ref in alive), "finished jobs still hold their inputs"
        again = await client.call_tool("get_job", {"job_id": job_id})  # the result itself is still there
        assert again.structured_content["result"]["images"] and any(b.type == "resource_link" for b in again.content)


def test_finished_jobs_are_forgotten_with_what_they_keep(tmp_path: Path):
    runner = JobRunner(threading.Lock(), depth=2, keep_finished_seconds=0.01)
    try:
        kept = RecordingSink(AssetStore(tmp_path))
        job = runner.submit("t", lambda progress: "done", keep=kept)
        job.future.result(timeout=10)
        assert runner.get(job.id).keep is kept and job.work is None  # the inputs go as soon as it ends
        reference, job_id = weakref.ref(kept), job.id
        del kept, job
        time.sleep(0.02)
        runner.reserve().release()  # taking a place in the queue forgets jobs past their time
        gc.collect()
        assert reference() is None
        with pytest.raises(NotFoundError):
            runner.get(job_id)
    finally:
        runner.shutdown()


def test_queue_places_taken_while_inputs_load_count_towards_busy():
    runner = JobRunner(threading.Lock(), depth=2)
    try:
        first, second = runner.reserve(), runner.reserve()
        with pytest.raises(BusyError, match="busy"):
            runner.reserve()
        first.release()
        first.release()  # idempotent: gives back one place, not two
        third = runner.reserve()
        with pytest.raises(BusyError):
            runner.reserve()
        runner.submit("t", lambda progress: None, second).future.result(timeout=10)
        runner.submit("t", lambda progress: None, third).future.result(timeout=10)
        runner.reserve().release()
    finally:
        runner.shutdown()


# --- 3. the HTTP body limit -------------------------------------------------------------------------------------


def test_the_body_limit_fits_the_most_images_a_tool_takes_at_the_documented_size():
    from pictoprompt.server.http_transport import max_images_per_call, request_body_limit

    images = max_images_per_call(TOOLS)
    assert images == 10  # customize_concept's 3-10 pictures
    limit = request_body_limit(images)
    assert limit > images * ImagePolicy.max_bytes * 4 / 3  # ten 20 MB images as base64 fit
    assert limit < 300e6


# --- the HTTP server ------------------------------------------------------------------------------------------


class HttpServer(Protocol):
    """What these tests use of the session's token-less HTTP server (conftest's `shared_http_server`)."""

    host: str
    port: int
    log: Path

    @property
    def url(self) -> str: ...


@pytest.fixture
def http_server(shared_http_server: HttpServer) -> HttpServer:
    """The session's token-less HTTP server (conftest), which the fuzz run's HTTP half shares."""
    if shared_http_server.host != HOST:
        pytest.skip(f"{HOST} is not a loopback address here")
    return shared_http_server


def _initialize(version: str = LEGACY_VERSION) -> dict[str, Any]:
    client = {"name": "hardening-test", "version": "1"}
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": version, "capabilities": {}, "clientInfo": client},
    }


def _sse_result(text: str, request_id: int) -> dict[str, Any]:
    for line in text.splitlines():
        if line.startswith("data:"):
            message = json.loads(line.removeprefix("data:"))
            if message.get("id") == request_id:
                return message
    raise AssertionError(f"no response to request {request_id} in {text[:500]!r}")


class LegacySession:
    """A pre-2026 client spoken by hand, so a test can drop a connection the way a dying client does."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.http = httpx.Client(timeout=120)
        response = self.http.post(server.url, json=_initialize(), headers=ACCEPT)
        assert response.status_code == 200, response.text
        self.headers = {
            **ACCEPT,
            "mcp-session-id": response.headers["mcp-session-id"],
            "mcp-protocol-version": LEGACY_VERSION,
        }
        self.http.post(server.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=self.headers)
        self._next_id = 10

    def request(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        self._next_id += 1
        params = {"name": name, "arguments": arguments}
        payload = {"jsonrpc": "2.0", "id": self._next_id, "method": "tools/call", "params": params}
        return {"payload": payload, "id": self._next_id}

    def call(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        request = self.request(name, arguments)
        response = self.http.post(self.server.url, json=request["payload"], headers=self.headers)
        return _sse_result(response.text, request["id"])["result"]

    def queue(self) -> dict[str, Any]:
        return self.call("server_status", {})["structuredContent"]["queue"]

    def close(self) -> None:
        self.http.close()


def _eventually(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@pytest.fixture
def blocker(http_server: HttpServer) -> Iterator[LegacySession]:
    """A session whose long job holds the GPU lock, so that the next job waits in the queue; cancelled after."""
    session = LegacySession(http_server)
    long_job = {"prompt": "hold the lock", "steps": 150, "num_images": 8, "wait_seconds": 0, "inline": "none"}
    job_id = session.call("generate_image", long_job)["structuredContent"]["job"]["job_id"]
    assert _eventually(lambda: len(session.queue()["running"]) == 1)
    try:
        yield session
    finally:
        session.call("cancel_job", {"job_id": job_id})
        assert _eventually(lambda: not session.queue()["running"])
        session.close()


# --- 2. DNS rebinding -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Host": "evil.example"}, 421),
        ({"Host": "evil.example", "Origin": "http://evil.example"}, 421),
        ({"Origin": "http://evil.example"}, 403),  # the right Host, sent by a page of another origin
        ({"Origin": "http://evil.example:{port}"}, 403),
        ({"Origin": f"http://{HOST}:{{port}}"}, 200),
        ({"Host": f"{HOST}:{{port}}"}, 200),
        ({"Host": "localhost:{port}", "Origin": "http://localhost:6274"}, 200),  # e.g. the MCP Inspector's page
        ({"Host": "127.0.0.1:{port}"}, 200),
    ],
)
def test_a_token_less_server_answers_only_its_own_names(http_server, headers, status):
    headers = {key: value.format(port=http_server.port) for key, value in headers.items()}
    response = httpx.post(http_server.url, json=_initialize(), headers={**ACCEPT, **headers}, timeout=60)
    assert response.status_code == status, response.text
    assert ("mcp-session-id" in response.headers) == (status == 200)


def test_the_2026_wire_checks_host_too(http_server):
    headers = {**ACCEPT, "Host": "evil.example", "mcp-protocol-version": "2026-07-28"}
    request = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    response = httpx.post(http_server.url, json=request, headers=headers, timeout=60)
    assert response.status_code == 421


# --- 3. the HTTP body limit, served -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_6_mb_image_is_accepted_over_http(http_server):
    noise = np.random.default_rng(0).integers(0, 256, (1400, 1500, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG", compress_level=0)
    assert buffer.tell() > 6e6
    async with Client(streamable_http_client(http_server.url)) as client:
        arguments = {"images": [data_uri(buffer.getvalue())], "steps": 1, "num_images": 1, "inline": "none"}
        result = await client.call_tool("vary_image", arguments)
    assert not result.is_error, result.content[0].text


def test_an_oversized_request_is_told_the_limit_and_what_to_send_instead(http_server):
    declared = 400_000_000  # refused from the header, before a byte of the body is read
    with socket.create_connection((HOST, http_server.port), timeout=60) as connection:
        connection.sendall(
            f"POST /mcp HTTP/1.1\r\nHost: {HOST}:{http_server.port}\r\nAccept: {ACCEPT['Accept']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n{{".encode()
        )
        reply = b""
        while b"}}" not in reply:
            chunk = connection.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"application/json" in head.lower()
    message = json.loads(body)["error"]["message"]
    from pictoprompt.server.http_transport import max_images_per_call, request_body_limit

    limit_mb = f"{request_body_limit(max_images_per_call(TOOLS)) / 1e6:.0f} MB"
    assert "400 MB" in message and limit_mb in message and "20 MB each" in message
    assert "local path" in message and "URL" in message and "pictoprompt://assets/" in message


# --- 5. tokens in the access log --------------------------------------------------------------------------------


def test_query_strings_stay_out_of_the_access_log(http_server):
    secret = "s3cret-in-the-url-0123456789"
    response = httpx.post(f"{http_server.url}?access_token={secret}", json=_initialize(), headers=ACCEPT, timeout=60)
    assert response.status_code == 200
    assert _eventually(lambda: "/mcp?[redacted]" in http_server.log.read_text(errors="replace"), 5)
    assert secret not in http_server.log.read_text(errors="replace")


# --- 6. jobs of clients that went away --------------------------------------------------------------------------


def test_a_dead_legacy_client_s_job_is_cancelled(http_server, blocker):
    victim = LegacySession(http_server)
    request = victim.request("generate_image", {"prompt": "for nobody", "steps": 150, "inline": "none"})
    with victim.http.stream("POST", http_server.url, json=request["payload"], headers=victim.headers) as response:
        assert response.status_code == 200
        assert _eventually(lambda: blocker.queue()["queued"] == 1)
    victim.close()  # the connection drops, as when the client is killed; no notifications/cancelled is sent
    assert _eventually(lambda: blocker.queue()["queued"] == 0, 5), "the job outlived its client"


def test_ending_a_legacy_session_cancels_the_job_it_waits_for(http_server, blocker):
    victim = LegacySession(http_server)
    request = victim.request("generate_image", {"prompt": "for nobody", "steps": 150, "inline": "none"})
    done = threading.Event()

    def wait_for_the_answer() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the session ends under the request
            victim.http.post(http_server.url, json=request["payload"], headers=victim.headers)
        done.set()

    threading.Thread(target=wait_for_the_answer, daemon=True).start()
    assert _eventually(lambda: blocker.queue()["queued"] == 1)
    with httpx.Client(timeout=60) as other:
        assert other.delete(http_server.url, headers=victim.headers).status_code == 200
    assert _eventually(lambda: blocker.queue()["queued"] == 0, 5), "the job outlived its session"
    assert done.wait(30)
    victim.close()


@pytest.mark.anyio
async def test_a_2026_client_that_goes_away_cancels_its_job(http_server, blocker):
    def queued(count: int) -> bool:
        return _eventually(lambda: blocker.queue()["queued"] == count, 5)

    client = Client(streamable_http_client(http_server.url), mode="2026-07-28")
    async with client, anyio.create_task_group() as group:
        group.start_soon(client.call_tool, "generate_image", {"prompt": "nobody", "steps": 150, "inline": "none"})
        assert await anyio.to_thread.run_sync(queued, 1)
        group.cancel_scope.cancel()  # on this wire, closing the response stream is the cancellation
    assert await anyio.to_thread.run_sync(queued, 0)


def test_allowed_names_are_the_bound_address_and_the_canonical_loopback_names():
    from pictoprompt.server.http_transport import http_transport_security
    from pictoprompt.settings import Settings

    security = http_transport_security(Settings(token=None), "127.0.0.2")
    assert security is not None and security.enable_dns_rebinding_protection
    names = ["127.0.0.2", "127.0.0.1", "localhost", "[::1]"]
    assert security.allowed_hosts == [f"{name}:*" for name in names] + names
    assert security.allowed_origins == [f"http://{host}" for host in security.allowed_hosts]
    assert "[::1]:*" in http_transport_security(Settings(token=None), "::1").allowed_hosts
    assert "myhost:*" in http_transport_security(Settings(token=None), "MyHost").allowed_hosts
    # With a token a rebound page cannot authenticate; the SDK's own checks apply.
    assert http_transport_security(Settings(token="t0ken-0123456789"), "127.0.0.2") is None


@pytest.mark.parametrize(
    ("keep_seconds", "keep_count", "left"),
    [(100.0, 2, "cde"), (5.0, 10, "de"), (5.0, 0, "e"), (100.0, 10, "abcde")],
)
def test_forget_ended_drops_the_old_and_the_surplus_and_never_a_running_job(keep_seconds, keep_count, left):
    jobs = {name: object() for name in "abcde"}
    ended = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 9.5}  # e is still running
    forget_ended(jobs, ended, 10.0, keep_seconds, keep_count)
    assert "".join(sorted(jobs)) == left
