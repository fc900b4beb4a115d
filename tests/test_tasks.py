"""Tasks on both wires: the 2025-11-25 task-augmented `tools/call` and the 2026-07-28 `io.modelcontextprotocol/tasks`
extension, backed by the job queue (one job is one task)."""

from __future__ import annotations

import base64
import io
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from mcp import Client, MCPError
from mcp.client.extension import ClientExtension, NotificationBinding
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp_types import CLIENT_CAPABILITIES_META_KEY, INVALID_PARAMS, METHOD_NOT_FOUND, NotificationParams
from PIL import Image
from pydantic import ConfigDict

from pictoprompt.server.app import create_server
from pictoprompt.server.tasks import RELATED_TASK, TASKS_EXTENSION

pytestmark = pytest.mark.anyio

MODERN = {CLIENT_CAPABILITIES_META_KEY: {"extensions": {TASKS_EXTENSION: {}}}}
ENDED = {"completed", "failed", "cancelled"}
TOKEN = "test-token-0123456789abcdef"


def picture(colour: str = "red") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def editor_call(iterations: int, **task: Any) -> dict[str, Any]:
    arguments = {"images": [picture()], "method": "editor", "iterations": iterations, "max_tokens": 6}
    return {"name": "invert_image", "arguments": {**arguments, "num_results": 1}, **task}


async def rpc(client: Client, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """A request as sent on the wire, its answer as received: the SDK's client checks a `tools/call` answer against
    `CallToolResult`, which a `CreateTaskResult` is not. The session stamps it as it would its own requests (the
    2026 wire's `_meta`), keeping the capabilities the request declares itself."""
    data: dict[str, Any] = {"method": method, "params": dict(params)}
    declared = params.get("_meta", {}).get(CLIENT_CAPABILITIES_META_KEY)
    opts: dict[str, Any] = {}
    client.session._stamp(data, opts)
    if declared is not None:
        data["params"]["_meta"][CLIENT_CAPABILITIES_META_KEY] = declared
    if "taskId" in params:
        opts.setdefault("headers", {})["Mcp-Name"] = params["taskId"]
    return await client.session._dispatcher.send_raw_request(method, data["params"], opts)


async def poll_until(client: Client, task_id: str, done, seconds: float = 120) -> dict[str, Any]:
    with anyio.fail_after(seconds):
        while not done(task := await rpc(client, "tasks/get", {"taskId": task_id})):
            await anyio.sleep(0.02)
    return task


class StatusParams(NotificationParams):
    model_config = ConfigDict(extra="allow")


class StatusWatcher(ClientExtension):
    """Collects `notifications/tasks/status` (a method the SDK's client tables leave to extensions)."""

    identifier = "test.pictoprompt/task-status"

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def notifications(self) -> list[NotificationBinding[Any]]:
        async def record(params: StatusParams) -> None:
            self.seen.append(params.model_dump(by_alias=True))

        return [NotificationBinding(method="notifications/tasks/status", params_type=StatusParams, handler=record)]


def server_for(settings, tiny_runtime):
    return create_server(settings, runtime=tiny_runtime, preload=False)


def generate_call(steps: int = 3, **task: Any) -> dict[str, Any]:
    arguments = {"prompt": "a red circle", "steps": steps, "seed": 5, "inline": "none"}
    return {"name": "generate_image", "arguments": arguments, **task}


def progressing(task: dict[str, Any]) -> bool:
    return "%" in (task.get("statusMessage") or "")


async def test_legacy_task_is_created_polled_listed_and_delivers_the_tools_result(settings, tiny_runtime):
    watcher = StatusWatcher()
    async with Client(server_for(settings, tiny_runtime), mode="legacy", extensions=[watcher]) as client:
        capabilities = client.server_capabilities
        assert capabilities.tasks is not None and capabilities.tasks.requests.tools.call is not None
        listed = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert listed["generate_image"].execution.task_support == "optional"
        assert listed["list_concepts"].execution is None and listed["get_job"].execution is None

        created = await rpc(client, "tools/call", generate_call(task={"ttl": 600_000}))
        task = created["task"]
        assert task["status"] == "working" and task["ttl"] == 600_000 and task["pollInterval"] > 0
        assert created["_meta"]["io.modelcontextprotocol/model-immediate-response"]
        seen = await rpc(client, "tasks/get", {"taskId": task["taskId"]})
        result = await rpc(client, "tasks/result", {"taskId": task["taskId"]})  # blocks until the end
        ended = await rpc(client, "tasks/get", {"taskId": task["taskId"]})
        listed_tasks = await rpc(client, "tasks/list", {})
        with anyio.fail_after(10):
            while not watcher.seen:
                await anyio.sleep(0.02)
    assert seen["taskId"] == task["taskId"] and seen["status"] in {"working", "completed"}
    assert result["_meta"][RELATED_TASK] == {"taskId": task["taskId"]}
    assert not result.get("isError") and result["structuredContent"]["result"]["images"][0]["seed"] == 5
    assert result["content"][1]["type"] == "resource_link"  # the call's own `inline="none"` holds for its task
    assert ended["status"] == "completed" and "pollInterval" not in ended
    assert [t["taskId"] for t in listed_tasks["tasks"]] == [task["taskId"]]
    assert watcher.seen[-1]["taskId"] == task["taskId"] and watcher.seen[-1]["status"] == "completed"


async def test_legacy_task_forwards_progress_to_the_calls_token(settings, tiny_runtime):
    async with Client(server_for(settings, tiny_runtime), mode="legacy") as client:
        call = generate_call(steps=6, task={})
        call["_meta"] = {"progressToken": "p-1"}
        created = await rpc(client, "tools/call", call)
        tracked = await poll_until(client, created["task"]["taskId"], progressing)
        await rpc(client, "tasks/result", {"taskId": created["task"]["taskId"]})
    assert tracked["status"] == "working" and "denoising step" in tracked["statusMessage"]


async def test_legacy_refusals_leave_no_task(settings, tiny_runtime):
    async with Client(server_for(settings, tiny_runtime), mode="legacy") as client:
        with pytest.raises(MCPError) as light:
            await rpc(client, "tools/call", {"name": "list_concepts", "arguments": {}, "task": {}})
        with pytest.raises(MCPError) as unknown:
            await rpc(client, "tasks/get", {"taskId": "nope"})
        refused = await rpc(client, "tools/call", {"name": "invert_image", "arguments": {"images": []}, "task": {}})
        listed = await rpc(client, "tasks/list", {})
        with pytest.raises(MCPError) as cursor:
            await rpc(client, "tasks/list", {"cursor": "made-up"})
    assert light.value.error.code == METHOD_NOT_FOUND and unknown.value.error.code == INVALID_PARAMS
    assert refused["isError"] is True and "task" not in refused  # refused before a task existed
    assert listed["tasks"] == [] and cursor.value.error.code == INVALID_PARAMS


async def test_modern_extension_task_completes_with_its_result_inline(settings, tiny_runtime):
    async with Client(server_for(settings, tiny_runtime), mode="2026-07-28") as client:
        created = await rpc(client, "tools/call", {**generate_call(), "_meta": MODERN})
        assert created["resultType"] == "task" and created["status"] == "working" and "ttlMs" in created
        done = await poll_until(client, created["taskId"], lambda t: t["status"] in ENDED)
        plain = await rpc(client, "tools/call", generate_call())  # no extension declared: an ordinary answer
        with pytest.raises(MCPError) as legacy_only:
            await rpc(client, "tasks/result", {"taskId": created["taskId"]})
        update = await rpc(client, "tasks/update", {"taskId": created["taskId"], "inputResponses": {}})
    assert done["status"] == "completed" and done["resultType"] == "complete"
    assert done["result"]["structuredContent"]["result"]["images"][0]["seed"] == 5
    assert (
        plain.get("resultType", "complete") == "complete" and plain["structuredContent"]["job"]["state"] == "succeeded"
    )
    assert legacy_only.value.error.code == METHOD_NOT_FOUND and set(update) <= {"resultType", "_meta"}


async def test_a_failed_job_is_a_failed_task_in_2025_and_a_completed_error_in_2026(settings, tiny_runtime):
    bad = {"name": "invert_image", "arguments": {"images": [picture()], "method": "editor", "focus": "style"}}
    async with Client(server_for(settings, tiny_runtime), mode="legacy") as legacy:
        task = (await rpc(legacy, "tools/call", {**bad, "task": {}}))["task"]
        result = await rpc(legacy, "tasks/result", {"taskId": task["taskId"]})
        failed = await rpc(legacy, "tasks/get", {"taskId": task["taskId"]})
    async with Client(server_for(settings, tiny_runtime), mode="2026-07-28") as modern:
        created = await rpc(modern, "tools/call", {**bad, "_meta": MODERN})
        completed = await poll_until(modern, created["taskId"], lambda t: t["status"] in ENDED)
    assert failed["status"] == "failed" and "editor" in failed["statusMessage"]
    assert result["isError"] is True and "editor" in result["content"][0]["text"]
    assert completed["status"] == "completed" and completed["result"]["isError"] is True


# ----------------------------------------------------------------------------- floor 1: EDITOR as a task, timed


@pytest.mark.slow
async def test_editor_task_returns_within_300_ms_and_shows_its_iterations(settings, tiny_runtime):
    async with Client(server_for(settings, tiny_runtime), mode="legacy") as client:
        started = time.perf_counter()
        created = await rpc(client, "tools/call", editor_call(3, task={}))
        answered_in = time.perf_counter() - started
        task_id = created["task"]["taskId"]
        iterating = await poll_until(client, task_id, lambda t: "EDITOR: iteration" in (t.get("statusMessage") or ""))
        result = await rpc(client, "tasks/result", {"taskId": task_id})
    assert answered_in < 0.3, f"the task came back after {answered_in * 1000:.0f} ms"
    assert iterating["status"] == "working" and "%" in iterating["statusMessage"]
    assert result["structuredContent"]["result"]["method"] == "editor"
    assert result["structuredContent"]["result"]["prompts"][0]["prompt"]


@pytest.mark.slow
async def test_editor_task_cancel_frees_the_model_within_a_second(settings, tiny_runtime):
    async with Client(server_for(settings, tiny_runtime), mode="legacy") as client:
        task_id = (await rpc(client, "tools/call", editor_call(5000, task={})))["task"]["taskId"]
        await poll_until(client, task_id, lambda t: "EDITOR: iteration" in (t.get("statusMessage") or ""))
        asked = time.perf_counter()
        cancelled = await rpc(client, "tasks/cancel", {"taskId": task_id})
        with anyio.fail_after(30):
            while not tiny_runtime.gpu_lock.acquire(blocking=False):
                await anyio.sleep(0.005)
        freed_in = time.perf_counter() - asked
        tiny_runtime.gpu_lock.release()
        again = await rpc(client, "tasks/get", {"taskId": task_id})
        with pytest.raises(MCPError) as twice:
            await rpc(client, "tasks/cancel", {"taskId": task_id})
        result = await rpc(client, "tasks/result", {"taskId": task_id})
        job = await client.call_tool("get_job", {"job_id": task_id, "wait_seconds": 5})
    assert cancelled["status"] == "cancelled" and again["status"] == "cancelled"
    assert twice.value.error.code == INVALID_PARAMS
    assert result["isError"] is True and "cancelled" in result["content"][0]["text"]
    assert job.is_error and "cancel" in job.content[0].text  # one job is one task: get_job sees it cancelled
    assert freed_in < 1.0, f"the model was still busy {freed_in:.2f} s after tasks/cancel"


@pytest.mark.slow
async def test_modern_editor_task_cancel_acknowledges_and_the_task_ends_cancelled(settings, tiny_runtime):
    async with Client(server_for(settings, tiny_runtime), mode="2026-07-28") as client:
        created = await rpc(client, "tools/call", {**editor_call(5000), "_meta": MODERN})
        await poll_until(client, created["taskId"], lambda t: "EDITOR: iteration" in (t.get("statusMessage") or ""))
        ack = await rpc(client, "tasks/cancel", {"taskId": created["taskId"]})
        ended = await poll_until(client, created["taskId"], lambda t: t["status"] in ENDED, seconds=30)
    assert set(ack) <= {"resultType", "_meta"} and ended["status"] == "cancelled"


# ----------------------------------------------------------------------------- over HTTP, from another connection


@pytest.fixture
def http_server(tmp_path, server_environment) -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "pictoprompt.cli", "serve", "--http", "--port", str(port)],
        env=server_environment(tmp_path, PICTOPROMPT_TOKEN=TOKEN),
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.3)
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(timeout=30)


def over_http(url: str, mode: str) -> Client:
    http_client = create_mcp_http_client(headers={"Authorization": f"Bearer {TOKEN}"})
    return Client(streamable_http_client(url, http_client=http_client), mode=mode, read_timeout_seconds=300)


@pytest.mark.slow
async def test_over_http_a_tasks_result_is_fetched_by_id_from_a_new_connection(http_server):
    async with over_http(http_server, "legacy") as first:
        task_id = (await rpc(first, "tools/call", generate_call(task={})))["task"]["taskId"]
    # The first connection is gone; the task is the server's, reached by its id.
    async with over_http(http_server, "legacy") as second:
        result = await rpc(second, "tasks/result", {"taskId": task_id})
        others = await rpc(second, "tasks/list", {})
    async with over_http(http_server, "2026-07-28") as modern:
        polled = await rpc(modern, "tasks/get", {"taskId": task_id})
    assert result["_meta"][RELATED_TASK] == {"taskId": task_id}
    assert result["structuredContent"]["result"]["images"][0]["seed"] == 5
    assert others["tasks"] == []  # listing is per connection: another client's task ids are not handed out
    assert polled["status"] == "completed" and polled["result"]["structuredContent"]["job"]["job_id"] == task_id
