"""The app view on the wire (MCP Apps, `io.modelcontextprotocol/ui`): the resource, the tools that name it, the
capability, and results that do not depend on whether the client renders apps. The page itself is tested in a
browser by `tests/test_app_browser.py` (`make test-browser`)."""

from __future__ import annotations

import json
import re

import pytest
from mcp import Client
from mcp.client.extension import advertise
from mcp.server.apps import APP_MIME_TYPE, EXTENSION_ID

from pictoprompt.server.app import create_server
from pictoprompt.server.app_view import VIEW_URI, VIEWED_TOOLS, view_html
from pictoprompt.tools import TOOLS

pytestmark = pytest.mark.anyio

APPS_CLIENT = [advertise(EXTENSION_ID, {"mimeTypes": [APP_MIME_TYPE]})]


async def test_the_image_tools_name_the_view_and_the_others_do_not(settings, tiny_runtime):
    async with Client(create_server(settings, runtime=tiny_runtime, preload=False)) as client:
        listed = (await client.list_tools()).model_dump(mode="json", by_alias=True, exclude_none=True)["tools"]
        resources = {resource.uri: resource for resource in (await client.list_resources()).resources}
        advertised = (client.server_capabilities.extensions or {}).get(EXTENSION_ID)
    metas = {tool["name"]: tool.get("_meta") for tool in listed}
    # Every tool whose result holds pictures (asset URIs), invert_image (prompts of the pictures given, shown with
    # them), and get_job, through which a slow call's result arrives.
    image_tools = {spec.name for spec in TOOLS if '"uri"' in json.dumps(spec.response_model.model_json_schema())}
    assert image_tools | {"invert_image", "get_job"} == VIEWED_TOOLS
    for name, meta in metas.items():
        if name in VIEWED_TOOLS:
            assert meta == {"ui": {"resourceUri": VIEW_URI}}, name
            assert len(json.dumps(meta)) <= 50, "every assistant carries this in tools/list"
        else:
            assert meta is None, name
    assert resources[VIEW_URI].mime_type == APP_MIME_TYPE
    assert advertised == {}, "the server advertises MCP Apps"


async def test_the_view_is_one_self_contained_page(settings, tiny_runtime):
    async with Client(create_server(settings, runtime=tiny_runtime, preload=False)) as client:
        read = await client.read_resource(VIEW_URI)
    (contents,) = read.contents
    assert contents.mime_type == APP_MIME_TYPE and contents.text == view_html()
    assert contents.meta == {"ui": {"prefersBorder": True}}, "no CSP domains asked for: the view needs no network"
    html = contents.text
    assert html.startswith("<!doctype html>") and html.count("<script>") == 1 and "<style>" in html
    # Nothing loaded from anywhere: no external script, style, image or font, and no request of its own.
    assert not re.search(r"<[a-z]+[^>]*\s(src|href)\s*=", html), "every asset of the page is inline"
    assert not re.search(r"https?://", html)
    assert not re.search(r"\b(fetch|XMLHttpRequest|WebSocket|EventSource|import)\s*\(", html)
    # It speaks the spec's messages: the handshake, tool calls and resource reads through the host.
    for method in (
        "ui/initialize",
        "ui/notifications/initialized",
        "ui/notifications/tool-result",
        "tools/call",
        "resources/read",
        "ui/notifications/size-changed",
    ):
        assert f'"{method}"' in html, method


def anonymous(result: dict) -> str:
    """The result as JSON with each asset id (in URIs, link names and paths) replaced by ASSET."""
    text = json.dumps(result)
    for asset_id in set(re.findall(r"pictoprompt://assets/([\w-]+)", text)):
        text = text.replace(asset_id, "ASSET")
    return text


async def test_a_client_with_apps_gets_the_same_result_as_one_without(settings, tiny_runtime):
    arguments = {"prompt": "a red circle", "num_images": 2, "steps": 2, "seed": 5}
    results = []
    for extensions in ([], APPS_CLIENT):
        async with Client(
            create_server(settings, runtime=tiny_runtime, preload=False), extensions=extensions
        ) as client:
            result = await client.call_tool("generate_image", arguments)
        assert not result.is_error, result.content
        payload = result.model_dump(mode="json", by_alias=True, exclude_none=True)
        payload["structuredContent"]["job"].pop("job_id")
        payload["structuredContent"]["job"].pop("elapsed_seconds")
        results.append(payload)
    without, with_apps = results
    # The same pictures (same seeds) saved as new assets: everything but the asset ids is the same.
    assert anonymous(without) == anonymous(with_apps)
    assert [block["type"] for block in with_apps["content"]] == [
        "text",
        "resource_link",
        "resource_link",
        "image",
        "image",
    ]
