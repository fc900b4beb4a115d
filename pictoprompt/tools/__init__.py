"""The MCP tools as plain Python: one module per tool, each exposing a `SPEC`; `TOOLS` lists them in order."""

from pictoprompt.tools import edit_with_text, generate_image, vary_image
from pictoprompt.tools.base import ToolSpec

TOOLS: list[ToolSpec] = [
    generate_image.SPEC,
    vary_image.SPEC,
    edit_with_text.SPEC,
]
