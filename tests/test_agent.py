"""An agent framework drives the server: pydantic-ai's `MCPToolset` over stdio, with a scripted model (no LLM).

The toolset's FastMCP client speaks the 2026-07-28 wire and declares the tasks extension, so each model-heavy call
comes back as a task that the client polls to its end (fastmcp-tasks): the agent sees the tool's own result.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from pydantic_ai.messages import ModelMessage
    from pydantic_ai.models.function import AgentInfo

# pydantic-ai and FastMCP are imported in the functions: at the top they cost each `make test` worker seconds of
# collection for a test that only `make test-slow` runs.
pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def returned(messages: list[ModelMessage], tool: str) -> dict[str, Any] | None:
    """The tool's own result in the last call to `tool`, as the agent received it: the structured content
    (`{job, result}`) when the answer is all text, else its JSON text block (the result alone) beside the links."""
    from pydantic_ai.messages import ModelRequest, ToolReturnPart

    for message in reversed(messages):
        for part in message.parts if isinstance(message, ModelRequest) else []:
            if isinstance(part, ToolReturnPart) and part.tool_name == tool:
                content = part.content
                texts = content if isinstance(content, list) else [content]
                for text in texts:
                    if isinstance(text, str) and text.lstrip().startswith("{"):
                        text = json.loads(text)
                    if isinstance(text, dict) and "job" in text:  # the structured content
                        return text["result"]
                    if isinstance(text, dict) and "uri" not in text:  # the result's JSON (a link has a uri)
                        return text
    return None


def script(picture: Path):
    """A model that finds the picture's prompt, draws it again, and says what it drew."""
    from pydantic_ai.messages import ModelResponse, TextPart, ToolCallPart

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        assert {"invert_image", "generate_image"} <= {tool.name for tool in info.function_tools}
        inverted, generated = returned(messages, "invert_image"), returned(messages, "generate_image")
        if inverted is None:
            arguments = {"images": [str(picture)], "num_results": 2, "max_tokens": 6}
            return ModelResponse(parts=[ToolCallPart("invert_image", arguments)])
        prompt = inverted["prompts"][0]["prompt"]
        if generated is None:
            arguments = {"prompt": prompt, "num_images": 2, "steps": 3, "seed": 11, "inline": "none"}
            return ModelResponse(parts=[ToolCallPart("generate_image", arguments)])
        drawn = {"prompt": generated["prompt"], "images": generated["images"]}
        return ModelResponse(parts=[TextPart(json.dumps({"inverted": prompt, **drawn}))])

    return respond


def drawn_star(folder: Path) -> Path:
    picture = Image.new("RGB", (64, 64), "white")
    points = [(32, 4), (40, 24), (60, 24), (44, 38), (50, 60), (32, 46), (14, 60), (20, 38), (4, 24), (24, 24)]
    ImageDraw.Draw(picture).polygon(points, fill="orange")
    path = folder / "star.png"
    picture.save(path)
    return path


async def test_an_agent_inverts_a_picture_then_generates_its_prompt_through_tasks(tmp_path, server_environment):
    from fastmcp.client import Client as FastMCPClient
    from fastmcp.client.transports import StdioTransport
    from fastmcp_tasks.client import call_tool_task
    from pydantic_ai import Agent
    from pydantic_ai.mcp import MCPToolset
    from pydantic_ai.models.function import FunctionModel
    from pydantic_ai.usage import UsageLimits

    picture = drawn_star(tmp_path)
    command = ["-m", "pictoprompt.cli", "serve"]
    transport = StdioTransport(sys.executable, command, env=server_environment(tmp_path))
    toolset = MCPToolset(FastMCPClient(transport, timeout=600, init_timeout=300), tool_error_behavior="error")
    agent = Agent(FunctionModel(script(picture)), toolsets=[toolset])
    async with agent:
        run = await agent.run(
            "Find this picture's prompt and draw it again.", usage_limits=UsageLimits(request_limit=4)
        )
        # The same client asking for the task handle itself: FastMCP's task client refuses a call that the server
        # answered at once, so this shows the server runs this client's model-heavy calls as tasks.
        task = await call_tool_task(toolset.client, "generate_image", {"prompt": "a task", "steps": 2, "seed": 3})
        polled = await task.status()
        done = await task.result()
    answer = json.loads(run.output)
    assert answer["inverted"] and answer["prompt"] == answer["inverted"]  # the found prompt is what was drawn
    assert [image["seed"] for image in answer["images"]] == [11, 12]
    for image in answer["images"]:
        with Image.open(image["path"]) as made:
            assert made.text["prompt"] == answer["inverted"] and made.text["seed"] == str(image["seed"])
    assert polled.task_id == task.task_id and polled.status in {"working", "completed"}
    assert done.structured_content["job"]["job_id"] == task.task_id  # one job is one task
    assert done.structured_content["result"]["images"][0]["seed"] == 3
