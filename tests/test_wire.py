"""The server's face on the wire: the tools/list snapshot and its size, compact schemas, one validation per call.

The snapshot makes any change to what assistants see show up in review. After a deliberate change, refresh it
with `PICTOPROMPT_UPDATE_SNAPSHOTS=1 pytest tests/test_wire.py` and read the diff.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from mcp import Client
from mcp.server.mcpserver import Context
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import BaseModel, Field, model_validator

from pictoprompt.server.app import create_server
from pictoprompt.server.wire import PictopromptServer, WireTool, text_result
from pictoprompt.tools.base import ToolRequest

pytestmark = pytest.mark.anyio

SNAPSHOT = Path(__file__).parent / "snapshots" / "tools_list.json"
MAX_TOOLS_LIST_CHARACTERS = 24_000
"""Issues 36 and 37's budget, icons, the tasks' `execution` flags and the app view's metadata included: descriptions
trimmed, default hints left out, and the listed output schemas name each result's own fields only (the nested
types were a quarter of the list; the result's JSON shows its fields anyway). Only lower this."""


async def tools_list(settings, tiny_runtime) -> dict[str, Any]:
    async with Client(create_server(settings, runtime=tiny_runtime, preload=False)) as client:
        listed = await client.list_tools()
    return listed.model_dump(mode="json", by_alias=True, exclude_none=True)


async def test_tools_list_matches_its_snapshot(settings, tiny_runtime):
    # The tools only: the result's _meta names the server's version, which is not the face.
    wire = json.dumps((await tools_list(settings, tiny_runtime))["tools"], indent=1, ensure_ascii=False) + "\n"
    if os.environ.get("PICTOPROMPT_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(wire)
    assert wire == SNAPSHOT.read_text(), (
        "tools/list changed; if that is meant, refresh tests/snapshots/tools_list.json with "
        "PICTOPROMPT_UPDATE_SNAPSHOTS=1 and review its diff"
    )


async def test_tools_list_fits_in_its_budget(settings, tiny_runtime):
    # Measured as a client prints it (with spaces after separators); the wire itself is more compact still.
    size = len(json.dumps(await tools_list(settings, tiny_runtime)))
    assert size <= MAX_TOOLS_LIST_CHARACTERS, f"tools/list is {size:,} characters"


def keys_anywhere(schema: Any, key: str) -> int:
    """How often `key` is a keyword in `schema` (property names of that name do not count)."""
    if isinstance(schema, list):
        return sum(keys_anywhere(item, key) for item in schema)
    if not isinstance(schema, dict):
        return 0
    found = 0
    for name, value in schema.items():
        if name in {"properties", "$defs"}:
            found += sum(keys_anywhere(sub, key) for sub in value.values())
        else:
            found += (name == key) + keys_anywhere(value, key)
    return found


async def test_schemas_say_only_what_a_model_needs(settings, tiny_runtime):
    for tool in (await tools_list(settings, tiny_runtime))["tools"]:
        inputs, outputs = tool["inputSchema"], tool["outputSchema"]
        jsonschema.Draft202012Validator.check_schema(inputs)
        jsonschema.Draft202012Validator.check_schema(outputs)
        assert keys_anywhere(inputs, "title") == 0 and keys_anywhere(outputs, "title") == 0, tool["name"]
        assert '{"type": "null"}' not in json.dumps(inputs), f"{tool['name']}: an optional input is simply omitted"
        assert inputs["additionalProperties"] is False, tool["name"]
        assert keys_anywhere(outputs, "description") == 0, tool["name"]
        assert "title" not in tool["annotations"], "the tool's own title says it"


VALIDATIONS: list[str] = []


class Counted(ToolRequest):
    """A request that records each of its validations."""

    paths: list[str] = Field(description="Some paths.")

    @model_validator(mode="after")
    def _record(self) -> Counted:
        VALIDATIONS.append("validated")
        return self


class Echo(BaseModel):
    paths: list[str]


def fake_server(call: Callable[[Counted, Context], Awaitable[CallToolResult]]) -> PictopromptServer:
    tool = WireTool("echo", "Echo", "Echo the paths.", Counted, Echo, ToolAnnotations(read_only_hint=True), call)
    return PictopromptServer("fake", wire_tools=[tool])


async def test_a_call_is_validated_once_and_a_json_encoded_list_is_accepted():
    async def echo(request: Counted, ctx: Context) -> CallToolResult:
        return text_result(Echo(paths=request.paths))

    VALIDATIONS.clear()
    async with Client(fake_server(echo)) as client:
        result = await client.call_tool("echo", {"paths": '["a.png", "b.png"]'})
    assert not result.is_error, result.content
    assert result.structured_content == {"paths": ["a.png", "b.png"]}
    assert VALIDATIONS == ["validated"]


async def test_refused_arguments_name_each_field_and_say_what_to_do():
    async def echo(request: Counted, ctx: Context) -> CallToolResult:
        raise AssertionError("not reached")

    async with Client(fake_server(echo)) as client:
        result = await client.call_tool("echo", {"paths": "not json", "colour": "red"})
    text = result.content[0].text
    assert result.is_error
    assert "paths: Input should be a valid list" in text and "colour: Extra inputs are not permitted" in text
    assert "Correct them and call again" in text and "errors.pydantic.dev" not in text


async def test_a_crash_reaches_the_client_without_its_text():
    async def crash(request: Counted, ctx: Context) -> CallToolResult:
        raise RuntimeError("/secret/path in a traceback")

    async with Client(fake_server(crash)) as client:
        result = await client.call_tool("echo", {"paths": []})
        unknown = await client.call_tool("nope", {})
    assert result.is_error and result.content[0].text == "Error executing tool echo"
    assert unknown.is_error and "no tool 'nope'" in unknown.content[0].text
