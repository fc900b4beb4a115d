"""Turning a finished job into an MCP tool result: structured content, resource links, inline thumbnails."""

from __future__ import annotations

import base64
import json
from typing import Literal

from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, ContentBlock, ImageContent, ResourceLink, TextContent
from pydantic import BaseModel, Field

from pictoprompt.errors import NotFoundError
from pictoprompt.server.assets import AssetStore
from pictoprompt.server.jobs import JobState, JobView
from pictoprompt.tools.base import SavedImage

InlineMode = Literal["full", "thumbnail", "none"]
MAX_RESULT_BYTES = 1024 * 1024
THUMBNAIL_SIDE = 512


class JobInfo(BaseModel):
    job_id: str
    tool: str
    state: JobState
    progress: float | None = Field(None, description="Fraction done, 0-1, when known.")
    message: str | None = None
    elapsed_seconds: float
    replica: str | None = Field(None, description="The Ray Serve replica that ran the job (served with --ray).")


def job_info(job: JobView) -> JobInfo:
    return JobInfo(
        job_id=job.id,
        tool=job.tool,
        state=job.state,
        progress=job.fraction,
        message=job.message,
        elapsed_seconds=round(job.elapsed, 3),
        replica=job.replica,
    )


def _image_blocks(store: AssetStore, saved: list[SavedImage], inline: InlineMode, budget: int) -> list[ContentBlock]:
    blocks: list[ContentBlock] = [
        ResourceLink(uri=image.uri, name=image.uri.rsplit("/", 1)[-1], mime_type="image/png", description=image.path)
        for image in saved
    ]
    if inline == "none":
        return blocks
    for image in saved:
        asset_id = image.uri.rsplit("/", 1)[-1]
        try:
            data, mime = (store.read_bytes(asset_id), "image/png") if inline == "full" else (None, "")
            if data is None or len(data) * 4 // 3 > budget:
                data, mime = store.thumbnail(asset_id, max_side=THUMBNAIL_SIDE), "image/jpeg"
        except NotFoundError:
            # Trimmed from a full store (or expired) since the job saved it: its link says so when it is read.
            continue
        encoded = base64.b64encode(data).decode()
        if len(encoded) > budget:
            break  # the links above still reach every image
        budget -= len(encoded)
        blocks.append(ImageContent(data=encoded, mime_type=mime))
    return blocks


def job_result(job: JobView, store: AssetStore, inline: InlineMode) -> CallToolResult:
    """The result of a model-heavy call: `{job, result}` when done, `{job, result: null}` while it runs."""
    info = job_info(job)
    if job.state in {"failed", "cancelled"}:
        raise ToolError(job.error or f"The job ended {job.state}.")
    if job.state != "succeeded":
        structured = {"job": info.model_dump(mode="json"), "result": None}
        percent = f" ({info.progress:.0%} done)" if info.progress is not None else ""
        text = (
            f"Job {job.id} is {job.state}{percent} and has not finished yet. Call get_job with "
            f"job_id='{job.id}' to wait for its result, or cancel_job to stop it."
        )
        return CallToolResult(content=[TextContent(text=text)], structured_content=structured)
    payload = job.result or {}
    structured = {"job": info.model_dump(mode="json"), "result": payload}
    text = json.dumps(payload, indent=1)
    budget = MAX_RESULT_BYTES - 2 * len(text) - 4096
    content: list[ContentBlock] = [TextContent(text=text), *_image_blocks(store, job.saved, inline, budget)]
    return CallToolResult(content=content, structured_content=structured)
