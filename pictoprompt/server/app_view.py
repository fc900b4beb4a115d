"""The app view (MCP Apps, extension `io.modelcontextprotocol/ui`): one `ui://` page for every image result.

A host that speaks MCP Apps renders `static/view.html` beside the chat: the pictures with their prompt and seed,
word masks, and buttons that call tools through the host. The page is self-contained (the hosts' content security
policy allows no network). A host without Apps ignores the tools' `_meta.ui`; only the picture tools name the
view, with the smallest `_meta` the spec allows, since every assistant carries `tools/list`.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Any

from mcp.server.apps import Apps

VIEW_URI = "ui://pictoprompt/view"

VIEWED_TOOLS = frozenset(
    {
        "generate_image",
        "vary_image",
        "edit_with_text",
        "fuse_concepts",
        "distill_prompt",
        "invert_image",
        "segment_image",
        # A slow call's result arrives through get_job: the view shows it the same way.
        "get_job",
    }
)


@cache
def view_html() -> str:
    """The page, as shipped in the package."""
    return files("pictoprompt.server").joinpath("static/view.html").read_text(encoding="utf-8")


def apps_extension() -> Apps:
    """The Apps extension with the view registered: the server advertises `io.modelcontextprotocol/ui` and
    serves the page on `resources/read`."""
    apps = Apps()
    apps.add_html_resource(
        VIEW_URI,
        view_html(),
        name="view",
        title="pictoprompt view",
        description="Shows image results: pictures with prompt, seed and similarity, word masks, and buttons to "
        "vary, edit, invert or segment a picture.",
        prefers_border=True,
    )
    return apps


def tool_meta(tool_name: str) -> dict[str, Any] | None:
    """The `_meta` that ties a tool to the view, or None for a tool whose result is no picture."""
    return {"ui": {"resourceUri": VIEW_URI}} if tool_name in VIEWED_TOOLS else None
