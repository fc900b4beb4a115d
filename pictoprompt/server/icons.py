"""Icons for the server and its tools: tiny inline SVGs (`data:` URIs, so a client never fetches anything).

One glyph per tool family, drawn on an 8x8 grid in one path, because every tool's icon travels in `tools/list`,
which every assistant carries in its context: each costs about 180 characters there. Grey reads on light and dark
themes alike, so one icon serves both.
"""

from __future__ import annotations

from urllib.parse import quote

from mcp_types import Icon

GLYPHS = {
    # a picture: frame, mountain and sun
    "picture": "M0,1h8v6H0zM1,6h6L5,3,4,4.5,3,3.5zM6,2.5a.5,.5,0,1,0,0,.01z",
    # words from a picture: three lines of text
    "prompt": "M0,1h8v1H0zM0,3.5h8v1H0zM0,6h5v1H0z",
    # a concept: a star
    "concept": "M4,0l1,3h3L5.6,4.8l.9,3L4,6,1.5,7.8l.9-3L0,3h3z",
    # a job: a clock
    "job": "M4,0a4,4,0,1,0,.1,0zM4,1a3,3,0,1,1-.1,0zM3.5,2h1v2H6v1H3.5z",
}

FAMILIES = {
    "picture": ["generate_image", "vary_image", "edit_with_text"],
    "prompt": ["invert_image", "fuse_concepts", "distill_prompt", "segment_image"],
    "concept": ["customize_concept", "list_concepts", "delete_concept"],
    "job": ["get_job", "cancel_job", "server_status"],
}

SVG_OPEN = "<svg xmlns='http://www.w3.org/2000/svg' viewBox='0,0,{width},8'>"


def svg_data_uri(svg: str) -> str:
    """A `data:` URI of an SVG, percent-encoded where a URI needs it (shorter than base64 for small SVGs)."""
    return "data:image/svg+xml," + quote(svg, safe="/:=',.-()")


def glyph_svg(glyph: str) -> str:
    return f"{SVG_OPEN.format(width=8)}<path fill='gray' d='{GLYPHS[glyph]}'/></svg>"


TOOL_ICONS: dict[str, list[Icon]] = {
    tool: [Icon(src=svg_data_uri(glyph_svg(glyph)))] for glyph, tools in FAMILIES.items() for tool in tools
}

# The server's own: a picture and the words it becomes, side by side.
SERVER_ICONS = [
    Icon(
        src=svg_data_uri(
            f"{SVG_OPEN.format(width=16)}<path fill='#357' d='{GLYPHS['picture']}'/>"
            f"<path fill='#c62' transform='translate(8)' d='{GLYPHS['prompt']}'/></svg>"
        ),
        mime_type="image/svg+xml",
        sizes=["any"],
    )
]
