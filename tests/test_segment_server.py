"""segment_image over the MCP server: a job like the other model tools, masks and overlay as resource links."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from mcp import Client
from PIL import Image

from pictoprompt.methods import segmentation
from pictoprompt.server.app import create_server

pytestmark = pytest.mark.anyio


async def test_segment_image_returns_a_link_per_mask_and_the_overlay(
    tmp_path: Path, settings, tiny_runtime, monkeypatch: pytest.MonkeyPatch
):
    # The tiny set's random weights attend evenly, so no word would get a mask: let every content word through.
    monkeypatch.setattr(segmentation, "MIN_CONTRAST", 0.0)
    monkeypatch.setattr(segmentation, "MIN_SEPARABILITY", 0.0)
    picture = Image.new("RGB", (48, 32), (250, 250, 250))
    picture.paste((220, 30, 30), (8, 6, 24, 22))
    path = tmp_path / "picture.png"
    picture.save(path)
    server = create_server(settings, runtime=tiny_runtime, preload=False)
    async with Client(server) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        tool = tools["segment_image"]
        assert not tool.annotations.read_only_hint and tool.annotations.idempotent_hint is True
        assert {"image", "prompt", "words", "wait_seconds", "inline"} <= set(tool.input_schema["properties"])
        result = await client.call_tool("segment_image", {"image": str(path), "prompt": "the red square"})
        assert not result.is_error, result.content
        jsonschema.validate(result.structured_content, tool.output_schema)
        payload = result.structured_content["result"]
        assert result.structured_content["job"]["state"] == "succeeded"
        assert [w["word"] for w in payload["words"]] == ["the", "red", "square"]
        masks = [w["mask"]["uri"] for w in payload["words"] if w["mask"]]
        assert len(masks) == 2 and payload["words"][0]["no_mask_reason"] == "stop word"
        links = [block.uri for block in result.content if block.type == "resource_link"]
        assert links == [*masks, payload["overlay"]["uri"]]
        read = await client.read_resource(masks[0])
        mask = Image.open(io.BytesIO(base64.b64decode(read.contents[0].blob)))
        refused = await client.call_tool("segment_image", {"image": str(path), "prompt": "a cat", "words": ["dog"]})
    assert mask.format == "PNG" and mask.size == (48, 32) and mask.mode == "L"
    assert mask.text["word"] == "red" and mask.text["prompt"] == "the red square"
    assert np.asarray(mask).mean() / 255 == pytest.approx(payload["words"][1]["area"], abs=1e-3)
    assert refused.is_error and "'dog' is not a word of the prompt" in refused.content[0].text
