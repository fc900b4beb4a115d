"""The MCP server in-process: tools, schemas, assets, jobs, refusals and faults."""

from __future__ import annotations

import base64
import io
import json
import sys
import threading
import time
from pathlib import Path

import anyio
import jsonschema
import numpy as np
import pytest
import torch
from mcp import Client, MCPError
from mcp_types import INTERNAL_ERROR, INVALID_PARAMS
from PIL import Image

from pictoprompt.errors import PictopromptError
from pictoprompt.models.profiles import get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.server.app import create_server, ray_jobs
from pictoprompt.server.serve import serve
from pictoprompt.tools import TOOLS

pytestmark = pytest.mark.anyio


def server_for(settings, tiny_runtime, **kwargs):
    return create_server(settings, runtime=tiny_runtime, preload=False, **kwargs)


async def test_lists_every_tool_with_annotations_and_schemas(settings, tiny_runtime):
    async with Client(server_for(settings, tiny_runtime)) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    expected = {spec.name for spec in TOOLS} | {"get_job", "cancel_job", "server_status"}
    assert expected <= set(tools)
    for tool in tools.values():
        assert tool.annotations is not None, tool.name
        assert tool.output_schema is not None, tool.name
        for name, prop in tool.input_schema.get("properties", {}).items():
            assert prop.get("description"), f"{tool.name}.{name} has no description"
    generate = tools["generate_image"]
    assert generate.input_schema["properties"]["num_images"]["maximum"] == 8
    assert generate.annotations.destructive_hint is False
    # A hint equal to the protocol's default is left out; read with the defaults, each says what the tool declares.
    for spec in TOOLS:
        hints = tools[spec.name].annotations
        read = (bool(hints.read_only_hint), hints.destructive_hint is not False, bool(hints.idempotent_hint))
        assert (*read, hints.open_world_hint is not False) == (
            spec.hints.read_only,
            spec.hints.destructive,
            spec.hints.idempotent,
            spec.hints.open_world,
        ), spec.name


async def test_generate_image_structured_result_matches_schema_and_resource(settings, tiny_runtime):
    async with Client(server_for(settings, tiny_runtime)) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        result = await client.call_tool(
            "generate_image", {"prompt": "a red circle", "num_images": 2, "steps": 3, "seed": 41}
        )
        assert not result.is_error, result.content
        jsonschema.validate(result.structured_content, tools["generate_image"].output_schema)
        payload = result.structured_content["result"]
        assert result.structured_content["job"]["state"] == "succeeded"
        assert [image["seed"] for image in payload["images"]] == [41, 42]
        links = [block for block in result.content if block.type == "resource_link"]
        thumbnails = [block for block in result.content if block.type == "image"]
        assert len(links) == 2 and len(thumbnails) == 2
        read = await client.read_resource(links[0].uri)
        png = base64.b64decode(read.contents[0].blob)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (32, 32)
    assert image.text["prompt"] == "a red circle" and image.text["seed"] == "41"
    assert image.text["steps"] == "3" and image.text["model_profile"] == "tiny"
    assert Path(payload["images"][0]["path"]).is_file()


async def test_same_seed_reproduces_the_same_image(settings, tiny_runtime):
    async with Client(server_for(settings, tiny_runtime)) as client:
        arguments = {"prompt": "a blue star", "steps": 3, "seed": 7, "inline": "none"}
        first = await client.call_tool("generate_image", arguments)
        second = await client.call_tool("generate_image", {**arguments, "num_images": 2})
    path_a = first.structured_content["result"]["images"][0]["path"]
    path_b = second.structured_content["result"]["images"][0]["path"]
    pixels_a = np.asarray(Image.open(path_a).convert("RGB"), dtype=np.int16)
    pixels_b = np.asarray(Image.open(path_b).convert("RGB"), dtype=np.int16)
    assert np.abs(pixels_a - pixels_b).max() <= 1
    assert not any(block.type == "image" for block in first.content)


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "num_images": 9}, "num_images"),
        ({"prompt": "x", "width": 33}, "width"),
        ({"prompt": "x", "promt": "typo"}, "promt"),
    ],
)
async def test_bad_arguments_are_errors_and_server_keeps_serving(settings, tiny_runtime, arguments, fragment):
    async with Client(server_for(settings, tiny_runtime)) as client:
        bad = await client.call_tool("generate_image", arguments)
        assert bad.is_error and fragment in bad.content[0].text
        good = await client.call_tool("generate_image", {"prompt": "ok", "steps": 1, "inline": "none"})
        assert not good.is_error


async def test_unknown_asset_and_job_are_clear_errors(settings, tiny_runtime):
    async with Client(server_for(settings, tiny_runtime)) as client:
        missing = await client.call_tool("get_job", {"job_id": "nope"})
        assert missing.is_error and "no job" in missing.content[0].text
        with pytest.raises(MCPError, match="There is no asset") as missing_asset:
            await client.read_resource("pictoprompt://assets/AAAAAAAAAAAAAAAAAAAAAA")
    assert missing_asset.value.error.code == INVALID_PARAMS


async def test_slow_call_returns_job_handle_then_get_job_waits(settings, tiny_runtime):
    async with Client(server_for(settings, tiny_runtime)) as client:
        started = await client.call_tool(
            "generate_image", {"prompt": "slow", "steps": 40, "num_images": 2, "wait_seconds": 0}
        )
        job = started.structured_content["job"]
        assert started.structured_content["result"] is None and job["state"] in {"queued", "running"}
        assert "get_job" in started.content[0].text
        done = await client.call_tool("get_job", {"job_id": job["job_id"], "wait_seconds": 120})
        assert done.structured_content["job"]["state"] == "succeeded"
        assert len(done.structured_content["result"]["images"]) == 2
        assert any(block.type == "resource_link" for block in done.content)


async def test_progress_is_forwarded(settings, tiny_runtime):
    seen: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total))

    async with Client(server_for(settings, tiny_runtime)) as client:
        result = await client.call_tool(
            "generate_image", {"prompt": "p", "steps": 4, "inline": "none"}, progress_callback=on_progress
        )
    assert not result.is_error
    assert (4, 4) in seen


async def test_cancel_job_frees_the_gpu_lock(settings, tiny_runtime):
    async with Client(server_for(settings, tiny_runtime)) as client:
        started = await client.call_tool("generate_image", {"prompt": "long", "steps": 150, "wait_seconds": 0})
        job_id = started.structured_content["job"]["job_id"]
        await anyio.sleep(0.3)
        cancelled = await client.call_tool("cancel_job", {"job_id": job_id})
        assert cancelled.structured_content["cancelled"] is True
        ended = await client.call_tool("get_job", {"job_id": job_id, "wait_seconds": 60})
        assert ended.is_error and "cancelled" in ended.content[0].text
        assert not tiny_runtime.gpu_lock.locked()
        after = await client.call_tool("generate_image", {"prompt": "next", "steps": 2, "inline": "none"})
        assert not after.is_error


async def test_client_cancellation_stops_the_job(settings, tiny_runtime):
    server = server_for(settings, tiny_runtime)
    async with Client(server) as client:
        with anyio.move_on_after(0.5):
            await client.call_tool("generate_image", {"prompt": "long", "steps": 150})
        status = await client.call_tool("server_status", {})
        deadline = time.monotonic() + 30
        while status.structured_content["queue"]["running"] and time.monotonic() < deadline:
            await anyio.sleep(0.2)
            status = await client.call_tool("server_status", {})
        assert status.structured_content["queue"]["running"] == []
        after = await client.call_tool("generate_image", {"prompt": "next", "steps": 2, "inline": "none"})
        assert not after.is_error


async def test_full_queue_gives_busy_error(tmp_path, settings, tiny_runtime):
    settings.queue_depth = 1
    release = threading.Event()
    tiny_runtime.gpu_lock.acquire()  # hold the GPU so jobs pile up in the queue
    try:
        async with Client(server_for(settings, tiny_runtime)) as client:
            arguments = {"prompt": "q", "steps": 1, "wait_seconds": 0}
            first = await client.call_tool("generate_image", arguments)
            await anyio.sleep(0.2)  # the worker takes the first job and blocks on the lock
            second = await client.call_tool("generate_image", arguments)
            third = await client.call_tool("generate_image", arguments)
            assert not first.is_error and not second.is_error
            assert third.is_error and "busy" in third.content[0].text
            tiny_runtime.gpu_lock.release()
            release.set()
            done = await client.call_tool(
                "get_job", {"job_id": second.structured_content["job"]["job_id"], "wait_seconds": 60}
            )
            assert done.structured_content["job"]["state"] == "succeeded"
    finally:
        if not release.is_set():
            tiny_runtime.gpu_lock.release()


async def test_server_status_reports_profile_and_queue(settings, tiny_runtime):
    async with Client(server_for(settings, tiny_runtime)) as client:
        status = (await client.call_tool("server_status", {})).structured_content
    assert status["profile"] == "tiny" and status["device"] == "cpu"
    assert "generator" in status["loaded_models"] and status["queue"]["depth"] == settings.queue_depth


async def test_inline_full_stays_under_one_mebibyte(settings, tiny_runtime):
    async with Client(server_for(settings, tiny_runtime)) as client:
        result = await client.call_tool(
            "generate_image", {"prompt": "x", "steps": 1, "num_images": 8, "inline": "full"}
        )
    size = sum(len(block.model_dump_json()) for block in result.content)
    assert size < 1024 * 1024
    assert sum(block.type == "image" for block in result.content) == 8


def _png_data_uri(color: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def test_vary_and_edit_through_the_client_with_every_reference_kind(tmp_path, settings, tiny_runtime):
    local = tmp_path / "reference.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(local)
    async with Client(server_for(settings, tiny_runtime)) as client:
        made = await client.call_tool("generate_image", {"prompt": "a star", "steps": 2, "inline": "none"})
        asset_uri = made.structured_content["result"]["images"][0]["uri"]
        varied = await client.call_tool(
            "vary_image",
            {
                "images": [str(local), _png_data_uri((0, 0, 255)), asset_uri],
                "num_images": 2,
                "steps": 2,
                "seed": 4,
                "wait_seconds": 600,
            },
        )
        assert not varied.is_error, varied.content
        images = varied.structured_content["result"]["images"]
        assert [image["seed"] for image in images] == [4, 5]
        edited = await client.call_tool(
            # The picture's prompt is given: VGD writing it (test_sd_ipc, test_every_tool) is not what this checks.
            "edit_with_text",
            {
                "image": asset_uri,
                "text": "in the snow",
                "source_prompt": "a star",
                "num_images": 1,
                "steps": 2,
                "wait_seconds": 600,
            },
        )
        assert not edited.is_error, edited.content
    # The scores are CLIP's cosine similarities of the saved pictures, recomputed here from the files.
    clip = tiny_runtime.clip()
    made_path = made.structured_content["result"]["images"][0]["path"]
    references = [Image.open(local), Image.new("RGB", (48, 48), (0, 0, 255)), Image.open(made_path)]
    with torch.no_grad():
        reference_embeds = clip.encode_image([image.convert("RGB") for image in references])
        for image in images:
            embed = clip.encode_image([Image.open(image["path"]).convert("RGB")])
            expected = clip.similarity(embed, reference_embeds).mean()
            assert image["image_similarity"] == pytest.approx(float(expected), abs=1e-4)
        edited_image = edited.structured_content["result"]["images"][0]
        embed = clip.encode_image([Image.open(edited_image["path"]).convert("RGB")])
        to_reference = clip.similarity(embed, reference_embeds[2:]).mean()
        to_text = clip.similarity(embed, clip.encode_text(["in the snow"])).mean()
    assert edited_image["image_similarity"] == pytest.approx(float(to_reference), abs=1e-4)
    assert edited_image["text_similarity"] == pytest.approx(float(to_text), abs=1e-4)


@pytest.mark.parametrize(
    ("reference", "fragment"),
    [
        ("/etc/passwd", "allow-dir"),
        ("http://127.0.0.1:9/x.png", "address"),
        ("data:image/png;base64,!!!notbase64", "base64"),
        ("pictoprompt://assets/AAAAAAAAAAAAAAAAAAAAAA", "asset"),
    ],
)
async def test_refused_images_are_errors_and_the_server_keeps_serving(settings, tiny_runtime, reference, fragment):
    async with Client(server_for(settings, tiny_runtime)) as client:
        refused = await client.call_tool("vary_image", {"images": [reference], "steps": 1})
        assert refused.is_error and fragment in refused.content[0].text.lower(), refused.content[0].text
        good = await client.call_tool(
            "vary_image", {"images": [_png_data_uri((0, 200, 0))], "steps": 1, "num_images": 1, "inline": "none"}
        )
        assert not good.is_error


async def test_concept_round_trip_leaves_the_base_model_untouched(tmp_path, settings, tiny_runtime):
    references = [_png_data_uri(color) for color in ((250, 0, 0), (230, 20, 0), (240, 10, 10))]
    base_call = {"prompt": "a thing", "steps": 2, "seed": 11, "inline": "none"}
    async with Client(server_for(settings, tiny_runtime)) as client:
        before = await client.call_tool("generate_image", base_call)
        tuned = await client.call_tool(
            "customize_concept", {"name": "red-thing", "images": references, "iterations": 3, "learning_rate": 1e-3}
        )
        assert not tuned.is_error, tuned.content
        listed = await client.call_tool("list_concepts", {})
        assert [c["name"] for c in listed.structured_content["concepts"]] == ["red-thing"]
        with_concept = await client.call_tool("generate_image", {**base_call, "concept": "red-thing"})
        after = await client.call_tool("generate_image", base_call)
        edited = await client.call_tool(
            # The picture's prompt is given, so that the edit waits on no VGD decoding (test_every_tool's edit runs it).
            "edit_with_text",
            {
                "image": "concept:red-thing",
                "text": "in the snow",
                "source_prompt": "a red thing",
                "concept": "red-thing",
                "steps": 2,
                "num_images": 1,
            },
        )
        assert not edited.is_error, edited.content
        varied = await client.call_tool(
            "vary_image", {"images": ["concept:red-thing", references[0]], "steps": 2, "num_images": 1}
        )
        assert not varied.is_error, varied.content
        missing = await client.call_tool("generate_image", {**base_call, "concept": "nope"})
        assert missing.is_error and "nope" in missing.content[0].text
        card = json.loads((await client.read_resource("pictoprompt://concepts/red-thing")).contents[0].text)
        assert card["name"] == "red-thing" and card["iterations"] == 3 and len(card["losses"]) == 3
        assert "mean_image_embedding" not in card
        with pytest.raises(MCPError, match="no concept named 'nope'") as unknown:
            await client.read_resource("pictoprompt://concepts/nope")
        with pytest.raises(MCPError, match="not a valid concept name") as invalid:
            await client.read_resource("pictoprompt://concepts/My-Cat")
        assert unknown.value.error.code == INVALID_PARAMS and invalid.value.error.code == INTERNAL_ERROR

    def pixels(result):
        return np.asarray(Image.open(result.structured_content["result"]["images"][0]["path"]), dtype=np.int16)

    assert np.array_equal(pixels(before), pixels(after))
    assert not np.array_equal(pixels(before), pixels(with_concept))


async def test_the_clip_vocabulary_is_embedded_in_the_background_once_the_server_is_up(tmp_path, settings):
    cache = tmp_path / "vocabulary-cache"
    runtime = Runtime(get_profile("tiny"), cache_dir=cache)
    async with Client(create_server(settings, runtime=runtime, preload=True)) as client:
        assert any(tool.name == "invert_image" for tool in (await client.list_tools()).tools)
        with anyio.fail_after(120):
            while not list(cache.glob("clip-vocabulary-*.pt")):
                await anyio.sleep(0.2)
    stored = torch.load(next(cache.glob("clip-vocabulary-*.pt")), weights_only=True)
    assert len(stored["words"]) == stored["embeddings"].shape[0] > 30000


async def test_a_session_ending_during_the_warm_up_leaves_no_native_work_running(settings, tiny_runtime):
    # The tiny CLIP's whole vocabulary takes seconds to embed: the session ends long before the warm-up would.
    async with Client(create_server(settings, runtime=tiny_runtime, preload=True)) as client:
        assert (await client.list_tools()).tools
    assert [thread.name for thread in threading.enumerate() if thread.name == "warm-up"] == []


async def test_serving_on_ray_without_the_extra_says_how_to_install_it(settings, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as on a plain install
    monkeypatch.delitem(sys.modules, "pictoprompt.server.ray_serve", raising=False)
    with pytest.raises(PictopromptError, match=r"pip install 'pictoprompt\[ray\]'"):
        await ray_jobs(settings.model_copy(update={"ray": True}))
    # `serve --ray` says it before any server starts.
    with pytest.raises(PictopromptError, match=r"pip install 'pictoprompt\[ray\]'"):
        serve(settings.model_copy(update={"ray": True}), http=True)
