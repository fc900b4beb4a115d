"""The protocol's own conveniences: completions, `logging/setLevel`, icons."""

from __future__ import annotations

import json
import logging
import os
import time
from urllib.parse import unquote

import anyio
import pytest
from mcp import Client, MCPError
from mcp.shared.exceptions import MCPDeprecationWarning
from mcp_types import INVALID_PARAMS, METHOD_NOT_FOUND, PromptReference, ResourceTemplateReference
from PIL import Image

from pictoprompt.models.concepts import CARD_FILE
from pictoprompt.models.profiles import BUILTIN_PROFILES
from pictoprompt.server.app import create_server
from pictoprompt.server.assets import AssetStore
from pictoprompt.server.client_logs import mcp_level
from pictoprompt.server.completions import MAX_VALUES, matching
from pictoprompt.tools import TOOLS

pytestmark = pytest.mark.anyio

CONCEPTS = ResourceTemplateReference(uri="pictoprompt://concepts/{name}")
PROFILES = ResourceTemplateReference(uri="pictoprompt://profiles/{name}")
ASSETS = ResourceTemplateReference(uri="pictoprompt://assets/{asset_id}")


def server_for(settings, tiny_runtime, **kwargs):
    return create_server(settings, runtime=tiny_runtime, preload=False, **kwargs)


def make_concept(settings, name: str) -> None:
    """A concept's folder with a card file: what the store's listing of names looks for."""
    folder = settings.data_dir / "concepts" / name
    folder.mkdir(parents=True)
    (folder / CARD_FILE).write_text(json.dumps({"name": name}))


async def test_completes_profile_names_by_prefix(settings, tiny_runtime):
    async with Client(server_for(settings, tiny_runtime), mode="legacy") as client:
        assert client.server_capabilities.completions is not None
        everything = (await client.complete(PROFILES, {"name": "name", "value": ""})).completion
        t_only = (await client.complete(PROFILES, {"name": "name", "value": "T"})).completion
    assert everything.values == sorted(BUILTIN_PROFILES) and everything.total == len(BUILTIN_PROFILES)
    assert t_only.values == sorted(name for name in BUILTIN_PROFILES if name.startswith("t"))
    assert "tiny" in t_only.values and "shapes" not in t_only.values


async def test_completes_the_asset_ids_newest_first_and_image_arguments_as_uris(settings, tiny_runtime):
    store = AssetStore(settings.assets_root)
    saved = [store.save(Image.new("RGB", (4, 4)), {}) for _ in range(3)]
    ids = [item.uri.rsplit("/", 1)[1] for item in saved]
    for age, item in enumerate(reversed(saved)):  # the last saved is the newest, a second apart
        mtime = time.time() - age
        os.utime(item.path, (mtime, mtime))
    async with Client(server_for(settings, tiny_runtime), mode="legacy") as client:
        by_id = (await client.complete(ASSETS, {"name": "asset_id", "value": ""})).completion
        one = (await client.complete(ASSETS, {"name": "asset_id", "value": ids[0][:12]})).completion
        image = await client.complete(PromptReference(name="recreate_prompt"), {"name": "image", "value": "pictop"})
        free_text = await client.complete(PromptReference(name="shorten_prompt"), {"name": "prompt", "value": "a"})
    assert by_id.values == list(reversed(ids))
    assert one.values == [ids[0]]
    assert image.completion.values == [f"pictoprompt://assets/{asset_id}" for asset_id in reversed(ids)]
    assert free_text.completion.values == []


async def test_assets_are_not_offered_over_http(settings, tiny_runtime):
    AssetStore(settings.assets_root).save(Image.new("RGB", (4, 4)), {})
    async with Client(server_for(settings, tiny_runtime, transport="http"), mode="legacy") as client:
        offered = (await client.complete(ASSETS, {"name": "asset_id", "value": ""})).completion
        profiles = (await client.complete(PROFILES, {"name": "name", "value": ""})).completion
    assert offered.values == [] and profiles.values  # the names are public, somebody's pictures are not


async def test_completes_concept_names_for_the_template_and_learn_concept(settings, tiny_runtime):
    for name in ["red-star", "rainbow", "blue-disc"]:
        make_concept(settings, name)
    async with Client(server_for(settings, tiny_runtime), mode="legacy") as client:
        template = (await client.complete(CONCEPTS, {"name": "name", "value": "r"})).completion
        prompt = await client.complete(PromptReference(name="learn_concept"), {"name": "name", "value": "b"})
    assert template.values == ["rainbow", "red-star"]
    assert prompt.completion.values == ["blue-disc"]


def test_matching_caps_values_and_says_how_many_there_are():
    candidates = [f"c{index:03d}" for index in range(150)]
    answer = matching(candidates, "C")
    assert len(answer.values) == MAX_VALUES and answer.total == 150 and answer.has_more is True
    assert matching(candidates, "c14").values == [f"c{index}" for index in range(140, 150)]


async def test_profile_resource_reads_a_known_profile_and_refuses_an_unknown_one(settings, tiny_runtime):
    async with Client(server_for(settings, tiny_runtime), mode="legacy") as client:
        read = await client.read_resource("pictoprompt://profiles/tiny")
        assert json.loads(read.contents[0].text)["name"] == "tiny"
        with pytest.raises(MCPError) as refused:
            await client.read_resource("pictoprompt://profiles/nope")
    assert refused.value.error.code == INVALID_PARAMS


def test_python_levels_map_to_the_nearest_lower_mcp_level():
    assert [mcp_level(n) for n in (logging.DEBUG, logging.INFO, 25, logging.WARNING, logging.CRITICAL + 7)] == [
        "debug",
        "info",
        "notice",
        "warning",
        "alert",
    ]


async def test_set_level_sends_the_servers_records_at_that_level_and_above(settings, tiny_runtime):
    received = []

    async def collect(params):
        received.append((params.level, params.data))

    server_logger = logging.getLogger("pictoprompt.server.test")
    async with Client(server_for(settings, tiny_runtime), mode="legacy", logging_callback=collect) as client:
        assert client.server_capabilities.logging is not None
        server_logger.warning("before any level was set")
        with pytest.warns(MCPDeprecationWarning):  # the SDK warns: logging is deprecated in 2026-07-28
            await client.set_logging_level("warning")
        server_logger.info("too quiet to be sent")
        server_logger.warning("sent: warning")
        server_logger.error("sent: error")
        with anyio.fail_after(5):
            while len(received) < 2:
                await anyio.sleep(0.01)
        with pytest.raises(MCPError) as invalid:
            await client.session.send_request(
                _raw("logging/setLevel", {"level": "banana"}),
                dict,  # type: ignore[arg-type]
            )
    assert received == [("warning", "sent: warning"), ("error", "sent: error")]
    assert invalid.value.error.code == INVALID_PARAMS


async def test_set_level_is_gone_on_the_2026_wire(settings, tiny_runtime):
    async with Client(server_for(settings, tiny_runtime), mode="2026-07-28") as client:
        with pytest.raises(MCPError) as gone:
            await client.session.send_request(_raw("logging/setLevel", {"level": "info"}), dict)  # type: ignore[arg-type]
    assert gone.value.error.code == METHOD_NOT_FOUND


async def test_server_and_every_tool_have_a_small_inline_icon(settings, tiny_runtime):
    async with Client(server_for(settings, tiny_runtime), mode="legacy") as client:
        tools = (await client.list_tools()).tools
        server_icons = client.server_info.icons
    assert server_icons and server_icons[0].src.startswith("data:image/svg+xml,")
    assert {tool.name for tool in tools} >= {spec.name for spec in TOOLS}
    for tool in tools:
        assert tool.icons, tool.name
        source = tool.icons[0].src
        assert source.startswith("data:image/svg+xml,") and len(source) < 300, tool.name
        svg = unquote(source.removeprefix("data:image/svg+xml,"))
        assert svg.startswith("<svg xmlns='http://www.w3.org/2000/svg'") and "http" not in svg.split("'", 2)[2]


def _raw(method, params):
    from mcp_types import Request

    class Raw(Request[dict, str]):
        pass

    return Raw(method=method, params=params)
