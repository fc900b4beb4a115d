"""The MCP prompts: the workflows people come for, each a short template naming the tools to call in order.

The texts live in `pictoprompt/prompts/workflow_*.md`; here they get their names, titles and arguments.
"""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import MCPServer
from pydantic import Field

from pictoprompt.prompts import workflow

Image = Annotated[str, Field(description="The picture: a path, URL, data URI or pictoprompt:// asset URI.")]


def add_workflow_prompts(server: MCPServer) -> None:
    @server.prompt(
        name="recreate_prompt",
        title="Recreate this picture's prompt",
        description="Find readable prompts that regenerate a picture, then check the best one by generating it.",
    )
    def recreate_prompt(image: Image) -> str:
        return workflow("recreate_prompt", image=image)

    @server.prompt(
        name="pick_variation",
        title="Make variations and pick the closest",
        description="Make variations of a picture (no prompt needed) and pick the one closest to it.",
    )
    def pick_variation(
        image: Image, count: Annotated[int, Field(ge=1, le=8, description="How many variations (1-8).")] = 4
    ) -> str:
        return workflow("pick_variation", image=image, count=str(count))

    @server.prompt(
        name="learn_concept",
        title="Learn my concept, then use it",
        description="Teach the model a concept from 3-10 pictures, then generate or edit with it.",
    )
    def learn_concept(
        name: Annotated[str, Field(description="A name for the concept: lowercase letters, digits, '-', '_'.")],
        images: Annotated[str, Field(description="3-10 pictures of the concept, one reference per line.")],
        request: Annotated[str, Field(description="What to make with the concept once learned.")] = (
            "a new picture of it in another setting"
        ),
    ) -> str:
        return workflow("learn_concept", name=name, images=images, request=request)

    @server.prompt(
        name="shorten_prompt",
        title="Shorten my prompt",
        description="Shorten a long prompt so that CLIP, and so the generator, still reads it the same.",
    )
    def shorten_prompt(
        prompt: Annotated[str, Field(description="The long prompt.")],
        max_tokens: Annotated[int | None, Field(ge=1, le=75, description="Budget in CLIP tokens (optional).")] = None,
    ) -> str:
        budget = f" and `max_tokens={max_tokens}`" if max_tokens is not None else ""
        return workflow("shorten_prompt", prompt=prompt, max_tokens=budget)

    @server.prompt(
        name="remove_or_replace",
        title="Remove or replace something in a picture",
        description="Recover a picture's prompt, change its words and regenerate from the same seed (EDITOR).",
    )
    def remove_or_replace(
        image: Image,
        change: Annotated[
            str, Field(description="What to change, e.g. 'remove the hat', 'replace the dog with a cat'.")
        ],
    ) -> str:
        return workflow("remove_or_replace", image=image, change=change)
