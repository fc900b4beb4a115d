"""The MCP prompts, through a client session: listed with their arguments, rendered naming real tools in order."""

from __future__ import annotations

import re

import pytest
from mcp import Client, MCPError

from pictoprompt.server.app import create_server

pytestmark = pytest.mark.anyio

ARGUMENTS = {
    "recreate_prompt": {"image": "/pictures/cat.png"},
    "pick_variation": {"image": "/pictures/cat.png", "count": "3"},
    "learn_concept": {"name": "my-cat", "images": "/p/1.png\n/p/2.png\n/p/3.png", "request": "my cat on a boat"},
    "shorten_prompt": {"prompt": "a very long and detailed prompt about a cat", "max_tokens": "5"},
    "remove_or_replace": {"image": "/pictures/cat.png", "change": "replace the hat with a crown"},
}
"""Each prompt's arguments, and the tools its text must name, in the order an assistant should call them."""
TOOL_ORDER = {
    "recreate_prompt": ["invert_image", "generate_image"],
    "pick_variation": ["vary_image", "get_job"],
    "learn_concept": ["customize_concept", "get_job", "generate_image", "edit_with_text"],
    "shorten_prompt": ["distill_prompt"],
    "remove_or_replace": ["invert_image", "generate_image", "edit_with_text"],
}


async def test_prompts_are_listed_with_their_arguments(settings, tiny_runtime):
    async with Client(create_server(settings, runtime=tiny_runtime, preload=False)) as client:
        prompts = {prompt.name: prompt for prompt in (await client.list_prompts()).prompts}
    assert set(prompts) == set(ARGUMENTS)
    for name, prompt in prompts.items():
        assert prompt.title and prompt.description, name
        arguments = {argument.name: argument for argument in prompt.arguments or []}
        assert set(arguments) == set(ARGUMENTS[name]), name
        assert all(argument.description for argument in arguments.values()), name
    assert prompts["pick_variation"].arguments[0].required and not prompts["pick_variation"].arguments[1].required


@pytest.mark.parametrize("name", list(ARGUMENTS))
async def test_each_prompt_names_existing_tools_in_order_with_its_arguments(settings, tiny_runtime, name):
    async with Client(create_server(settings, runtime=tiny_runtime, preload=False)) as client:
        tools = {tool.name for tool in (await client.list_tools()).tools}
        rendered = await client.get_prompt(name, ARGUMENTS[name])
    assert len(rendered.messages) == 1 and rendered.messages[0].role == "user"
    text = rendered.messages[0].content.text
    assert "${" not in text, "every placeholder is filled"
    for value in ARGUMENTS[name].values():
        assert value in text
    named = re.findall(r"`([a-z_]+)`", text)
    assert set(TOOL_ORDER[name]) <= tools
    positions = [named.index(tool) for tool in TOOL_ORDER[name]]
    assert positions == sorted(positions), f"{name} names its tools out of order: {named}"
    assert {word for word in named if word.endswith(("_image", "_prompt", "_concept", "_concepts", "_job"))} <= tools


async def test_a_prompt_refuses_a_missing_or_bad_argument_and_the_session_goes_on(settings, tiny_runtime):
    # The SDK checks prompt arguments itself and, as for any failure outside a tool, answers with its generic
    # error (it keeps the exception's text on the server).
    async with Client(create_server(settings, runtime=tiny_runtime, preload=False)) as client:
        with pytest.raises(MCPError):
            await client.get_prompt("recreate_prompt", {})
        with pytest.raises(MCPError):
            await client.get_prompt("pick_variation", {"image": "x.png", "count": "99"})
        rendered = await client.get_prompt("pick_variation", {"image": "x.png", "count": "8"})
    assert "num_images=8" in rendered.messages[0].content.text
