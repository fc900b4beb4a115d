"""The MCP tools as plain Python: one module per tool, each exposing a `SPEC`; `TOOLS` lists them in order."""

from pictoprompt.tools import (
    concepts,
    customize_concept,
    distill_prompt,
    edit_with_text,
    fuse_concepts,
    generate_image,
    invert_image,
    segment_image,
    vary_image,
)
from pictoprompt.tools.base import ToolSpec

TOOLS: list[ToolSpec] = [
    generate_image.SPEC,
    vary_image.SPEC,
    edit_with_text.SPEC,
    invert_image.SPEC,
    fuse_concepts.SPEC,
    distill_prompt.SPEC,
    segment_image.SPEC,
    customize_concept.SPEC,
    concepts.LIST_SPEC,
    concepts.DELETE_SPEC,
]
