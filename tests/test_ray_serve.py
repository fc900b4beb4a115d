"""The model work on Ray Serve: two MCP HTTP fronts (subprocesses) on a local Ray, one deployment of two replicas.

A local Ray on the CPU (tiny profile, one torch thread per replica). Starting it, the fronts and the replicas takes
a minute or more, so the tests share one cluster and are marked `ray`: `make test-ray` runs them, CI too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from PIL import Image, ImageDraw

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed: pip install -e '.[ray]'")
from mcp import Client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

from pictoprompt.server.ray_serve import APP_NAME, BOARD_NAME, DEPLOYMENT_NAME, NAMESPACE  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.anyio]

LONG_JOB = {"prompt": "a long job", "steps": 150, "num_images": 8, "width": 64, "height": 64, "inline": "none"}
"""Tens of seconds on a replica: long enough to cancel, or to kill its replica, while it runs."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, server_environment) -> Iterator[dict[str, Any]]:
    """A local Ray, then two fronts on it; the first deploys the two replicas, the second finds them running."""
    folder = tmp_path_factory.mktemp("ray")
    ray.init(num_cpus=4, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    # Every front and replica shares the folder, as the nodes of a cluster share a volume.
    environment = server_environment(
        folder,
        PICTOPROMPT_QUEUE_DEPTH="3",
        PICTOPROMPT_RAY_MIN_REPLICAS="2",
        PICTOPROMPT_RAY_MAX_REPLICAS="2",
        # One call at a time per replica, so that the queue's test can count; batching has a test of its own.
        PICTOPROMPT_RAY_BATCH_SIZE="1",
    )
    fronts: list[subprocess.Popen] = []
    urls = []
    try:
        for _ in range(2):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            command = [sys.executable, "-m", "pictoprompt.cli", "serve", "--http", "--port", str(port)]
            front = subprocess.Popen([*command, "--ray", address], env=environment, stderr=subprocess.PIPE)
            fronts.append(front)
            urls.append(wait_for_port(front, port, timeout=600))
        yield {"urls": urls, "folder": folder}
    finally:
        for front in fronts:
            front.terminate()
            front.wait(timeout=60)
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def wait_for_port(process: subprocess.Popen, port: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the front exited: {process.stderr.read().decode()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return f"http://127.0.0.1:{port}/mcp"
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the front did not open port {port} within {timeout} s")


async def call(url: str, tool: str, arguments: dict[str, Any], on_progress: Any = None) -> Any:
    async with Client(streamable_http_client(url), read_timeout_seconds=600) as client:
        return await client.call_tool(tool, arguments, progress_callback=on_progress)


def job_of(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content[0].text
    return result.structured_content["job"]


async def wait_until_running(url: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = job_of(await call(url, "get_job", {"job_id": job_id, "wait_seconds": 0}))
        if job["state"] == "running":
            return job
        await anyio.sleep(0.3)
    pytest.fail(f"job {job_id} never started")


async def test_calls_are_spread_over_both_replicas(cluster):
    url = cluster["urls"][0]
    replicas = set()
    for round in range(4):  # two calls at once: while one replica works, Serve gives the other call the other one
        async with anyio.create_task_group() as group:

            async def one(seed: int) -> None:
                result = await call(url, "generate_image", {"prompt": "a red circle", "steps": 40, "seed": seed})
                replicas.add(job_of(result)["replica"])
                image = result.structured_content["result"]["images"][0]
                assert Path(image["path"]).is_file() and image["seed"] == seed

            group.start_soon(one, 2 * round)
            group.start_soon(one, 2 * round + 1)
        if len(replicas) == 2:
            break
    assert len(replicas) == 2 and None not in replicas

    status = (await call(url, "server_status", {})).structured_content
    assert sorted(status["replicas"]) == sorted(replicas)
    assert status["profile"] == "tiny" and "generator" in status["loaded_models"]


async def test_the_replicas_and_the_board_run_at_the_priority_of_the_node(cluster):
    """Ray starts its workers 15 steps nicer than the node; the model work and the board the calls wait on are not
    (the local Ray is this process's, so the node's priority is this process's)."""
    await call(cluster["urls"][0], "server_status", {})
    replicas = [
        ray.get_actor(actor["name"], namespace="serve")
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#")
    ]
    assert len(replicas) == 2
    actors = [*replicas, ray.get_actor(BOARD_NAME, namespace=NAMESPACE)]
    priorities = await anyio.to_thread.run_sync(
        lambda: ray.get([actor.__ray_call__.remote(lambda _: os.nice(0)) for actor in actors], timeout=60)
    )
    assert priorities == [os.nice(0)] * 3


async def test_progress_reaches_the_caller(cluster):
    seen: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total))

    arguments = {**LONG_JOB, "steps": 40, "num_images": 4}
    result = await call(cluster["urls"][0], "generate_image", arguments, on_progress)
    assert job_of(result)["state"] == "succeeded"
    # The replica reports at most every 0.2 s and the front reads the board every 0.25 s: some steps, in order.
    assert len(seen) >= 2 and {total for _, total in seen if total is not None} == {40}
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


async def test_get_job_and_cancel_from_another_front(cluster):
    first, second = cluster["urls"]
    started = job_of(await call(first, "generate_image", {"prompt": "a blue star", "steps": 4, "wait_seconds": 0}))
    finished = await call(second, "get_job", {"job_id": started["job_id"], "wait_seconds": 120})
    assert job_of(finished)["state"] == "succeeded"
    assert finished.structured_content["result"]["images"][0]["width"] > 0

    long = job_of(await call(first, "generate_image", {**LONG_JOB, "wait_seconds": 0}))
    await wait_until_running(second, long["job_id"])
    cancelled = (await call(second, "cancel_job", {"job_id": long["job_id"]})).structured_content
    assert cancelled["cancelled"] is True
    ended = await call(first, "get_job", {"job_id": long["job_id"], "wait_seconds": 60})
    assert ended.is_error and "cancelled" in ended.content[0].text
    # The replica stopped between two steps and takes work again at once.
    after = await call(first, "generate_image", {"prompt": "next", "steps": 2, "inline": "none"})
    assert job_of(after)["state"] == "succeeded"


async def test_a_full_queue_answers_busy(cluster):
    url = cluster["urls"][0]
    started = [job_of(await call(url, "generate_image", {**LONG_JOB, "wait_seconds": 0})) for _ in range(7)]
    try:
        # Two run and three wait for a replica (PICTOPROMPT_QUEUE_DEPTH=3); Serve turns the next ones away.
        views = [await call(url, "get_job", {"job_id": job["job_id"], "wait_seconds": 1}) for job in started]
        busy = [view for view in views if view.is_error and "busy" in view.content[0].text]
        assert 1 <= len(busy) <= 2
        assert all(not view.is_error for view in views[:5])
    finally:
        for job in started:
            await call(url, "cancel_job", {"job_id": job["job_id"]})


async def test_a_concept_learned_on_one_replica_is_used_on_the_other(cluster):
    url, folder = cluster["urls"][0], cluster["folder"]
    references = []
    for index in range(3):
        picture = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(picture).ellipse((10 + 4 * index, 12, 50, 52), fill="purple")
        references.append(folder / f"reference-{index}.png")
        picture.save(references[-1])
    learned = await call(
        url, "customize_concept", {"name": "purple-disc", "images": [str(p) for p in references], "iterations": 2}
    )
    learned_on = job_of(learned)["replica"]

    used_on: dict[str, Any] = {}
    for _ in range(3):  # two calls at once go to two replicas; a few rounds make sure the other one was among them
        async with anyio.create_task_group() as group:

            async def use(seed: int) -> None:
                arguments = {"prompt": "purple-disc on the left", "concept": "purple-disc", "steps": 40, "seed": seed}
                result = await call(url, "generate_image", arguments)
                used_on[job_of(result)["replica"]] = result.structured_content["result"]

            group.start_soon(use, 1)
            group.start_soon(use, 2)
        if set(used_on) - {learned_on}:
            break
    other = set(used_on) - {learned_on}
    assert other, f"every use of the concept ran on the replica that learned it ({learned_on})"
    assert used_on[other.pop()]["images"]


async def rpc(url: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """One request on a new 2025-11-25 session, answered raw (a `CreateTaskResult` is no `CallToolResult`)."""
    async with Client(streamable_http_client(url), mode="legacy", read_timeout_seconds=600) as client:
        opts: dict[str, Any] = {}
        client.session._stamp({"method": method, "params": params}, opts)
        return await client.session._dispatcher.send_raw_request(method, params, opts)


async def test_a_task_started_on_one_front_is_polled_fetched_and_cancelled_from_the_other(cluster):
    first, second = cluster["urls"]
    arguments = {"prompt": "a task", "steps": 40, "seed": 4, "inline": "none"}
    task_id = (await rpc(first, "tools/call", {"name": "generate_image", "arguments": arguments, "task": {}}))["task"][
        "taskId"
    ]
    # One job is one task: the other front finds it on the job board by its id.
    result = await rpc(second, "tasks/result", {"taskId": task_id})
    assert result["structuredContent"]["result"]["images"][0]["seed"] == 4
    assert result["structuredContent"]["job"]["replica"]

    long = {"name": "generate_image", "arguments": LONG_JOB, "task": {}}
    long_id = (await rpc(first, "tools/call", long))["task"]["taskId"]
    await wait_until_running(second, long_id)
    polled = await rpc(second, "tasks/get", {"taskId": long_id})
    assert polled["status"] == "working"
    cancelled = await rpc(second, "tasks/cancel", {"taskId": long_id})
    assert cancelled["status"] == "cancelled"
    ended = await call(first, "get_job", {"job_id": long_id, "wait_seconds": 60})
    assert ended.is_error and "cancelled" in ended.content[0].text


async def test_a_killed_replica_fails_its_job_clearly_and_the_next_call_runs(cluster):
    url = cluster["urls"][1]
    started = job_of(await call(url, "generate_image", {**LONG_JOB, "wait_seconds": 0}))
    running = await wait_until_running(url, started["job_id"])
    replica = ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#{running['replica']}", namespace="serve")
    ray.kill(replica, no_restart=True)

    ended = await call(url, "get_job", {"job_id": started["job_id"], "wait_seconds": 60})
    assert ended.is_error
    message = ended.content[0].text
    assert "replica running this job stopped" in message and "Call the tool again" in message

    after = await call(url, "generate_image", {"prompt": "after the crash", "steps": 2, "inline": "none"})
    assert job_of(after)["state"] == "succeeded"
    assert job_of(after)["replica"] != running["replica"]
    assert json.loads(after.content[0].text)["images"]


async def test_a_replica_batches_concurrent_calls_with_the_pictures_each_gets_alone(cluster, tiny_runtime):
    """One replica batching up to 4 calls (a second application on the same Ray): 4 concurrent generate_image calls
    share a U-Net batch, one is cancelled halfway and leaves it, and the other three end with the pictures the same
    calls make alone."""
    from ray import serve

    from pictoprompt.server.assets import AssetStore, RecordingSink
    from pictoprompt.server.images import PreResolvedImages
    from pictoprompt.server.ray_serve import build_app, job_board
    from pictoprompt.settings import Settings
    from pictoprompt.tools.base import ToolContext
    from pictoprompt.tools.generate_image import GenerateImageRequest, generate_image

    folder = cluster["folder"] / "batching"
    settings = Settings(
        profile="tiny",
        asset_dir=folder / "assets",
        data_dir=folder / "data",
        ray_batch_size=4,
        ray_batch_wait_seconds=2.0,
    )
    handle = await anyio.to_thread.run_sync(lambda: serve.run(build_app(settings), name="batching", route_prefix=None))
    board = job_board()
    calls = [
        {"prompt": prompt, "steps": 40, "seed": seed, "num_images": 2 if seed == 5 else 1, "width": 64, "height": 64}
        for prompt, seed in [("a red circle", 1), ("a blue square", 5), ("a green star", 9), ("a long one", 13)]
    ]
    try:
        for index in range(len(calls)):
            await board.create.remote(f"batch-{index}", "generate_image")
        responses = [
            handle.run.remote(f"batch-{index}", "generate_image", arguments, PreResolvedImages({}))
            for index, arguments in enumerate(calls)
        ]
        deadline = time.monotonic() + 300
        while (await board.get.remote("batch-3"))["done"] < 10:  # the last call, well into the batch: cancel it
            assert time.monotonic() < deadline, "the batch never got to its tenth step"
            await anyio.sleep(0.1)
        await board.cancel.remote("batch-3")
        answered = [await response for response in responses]
        records = [await board.get.remote(f"batch-{index}") for index in range(len(calls))]
        # A call alone on the replica samples at once: it does not wait the 2 s for a batch to fill.
        await board.create.remote("alone", "generate_image")
        lone = {"prompt": "a lone call", "steps": 2, "seed": 3, "width": 32, "height": 32}
        alone_answer = await handle.run.remote("alone", "generate_image", lone, PreResolvedImages({}))
    finally:
        await anyio.to_thread.run_sync(serve.delete, "batching")
    # Each response carries the job's ended record, as the board keeps it.
    states = [record["state"] for record in answered]
    assert states == ["succeeded", "succeeded", "succeeded", "cancelled"]
    kept = ("state", "result", "saved", "error", "replica")
    assert [[a[key] for key in kept] for a in answered] == [[r[key] for key in kept] for r in records]
    assert alone_answer["state"] == "succeeded" and "in a batch of" not in (alone_answer["message"] or "")
    assert alone_answer["finished"] - alone_answer["started"] < settings.ray_batch_wait_seconds
    # The others kept on together after the fourth left: all three, or two when the first call reached its denoising
    # before the others had arrived and so ran alone (a call alone never waits for a batch).
    last_steps = [record["message"] for record in records[:3]]
    assert sum("(in a batch of" in message for message in last_steps) >= 2, last_steps
    assert records[3]["done"] < 40

    sink = RecordingSink(AssetStore(folder / "alone"))
    for arguments, record in zip(calls[:3], records[:3], strict=True):
        alone = generate_image(
            GenerateImageRequest(**arguments), ToolContext(tiny_runtime, sink, PreResolvedImages({}))
        )
        batched = record["result"]["images"]
        assert [image["seed"] for image in batched] == [image.seed for image in alone.images]
        for image, reference in zip(batched, alone.images, strict=True):
            difference = np.abs(
                np.asarray(Image.open(image["path"]), np.int16) - np.asarray(Image.open(reference.path), np.int16)
            )
            assert difference.max() <= 2, (arguments, difference.max())
