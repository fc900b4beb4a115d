"""What every tool module shares: the call context, image inputs and outputs, and the tool registry entry.

A tool is plain Python: `run(request, context) -> response`, with pydantic models on both sides. The server,
the CLI and the tests call the same function; only the `ToolContext` they pass differs (where images come
from, where they go, who hears the progress).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from pictoprompt.models.concepts import ConceptStore
from pictoprompt.models.runtime import Runtime
from pictoprompt.progress import Progress

IMAGE_REF_DESCRIPTION = (
    "An image: a local file path, an http(s) URL, a data: URI or bare base64 string, "
    "or a pictoprompt://assets/<id> URI returned by an earlier call."
)

ImageRef = Annotated[str, Field(min_length=1, max_length=60_000_000, description=IMAGE_REF_DESCRIPTION)]

Seed = Annotated[
    int | None,
    Field(ge=0, le=2**32 - 1, description="Random seed; omit for a random one. Each image reports its own seed."),
]


ConceptName = Annotated[
    str | None,
    Field(
        pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$",
        description="A concept learned with customize_concept to apply while generating (see list_concepts).",
    ),
]


LlmNote = Annotated[
    str | None,
    Field(
        description="Set when the profile's LLM is not on this machine and the bundled SmolLM2-135M-Instruct wrote "
        "the prompts instead: says how to get the profile's LLM."
    ),
]


class ToolRequest(BaseModel):
    """Base of every tool's arguments: unknown fields are refused so typos surface as errors."""

    model_config = ConfigDict(extra="forbid")

    def image_refs(self) -> list[str]:
        """Every image reference in the request, so the server can resolve them before the job starts."""
        return []


class SavedImage(BaseModel):
    """Where an output image was stored."""

    uri: str = Field(description="pictoprompt://assets/<id> resource URI (or file URI from the CLI).")
    path: str = Field(description="The PNG's path on the server's disk.")


class OutputImage(SavedImage):
    """One generated image as every image-producing tool reports it."""

    seed: int = Field(description="Seed that reproduces this image with the same arguments.")
    width: int
    height: int


class AssetSink(Protocol):
    """Stores output images; the server's asset store and the CLI's output folder both satisfy it."""

    def save(self, image: Image.Image, metadata: dict[str, str]) -> SavedImage: ...


class ImageSource(Protocol):
    """Turns an image reference into a decoded RGB image (already fetched and checked by the server)."""

    def load(self, ref: str) -> Image.Image: ...


@dataclass
class ToolContext:
    runtime: Runtime
    assets: AssetSink
    images: ImageSource
    progress: Progress = field(default_factory=Progress)
    concepts: ConceptStore | None = None


@dataclass(frozen=True)
class ToolHints:
    """The truthful MCP tool annotations (mapped to `ToolAnnotations` by the server)."""

    read_only: bool
    destructive: bool
    idempotent: bool
    open_world: bool


@dataclass(frozen=True)
class ToolSpec:
    """A tool as the server, the CLI and the README see it."""

    name: str
    title: str
    description: str
    request_model: type[ToolRequest]
    response_model: type[BaseModel]
    run: Callable[[Any, ToolContext], BaseModel]
    hints: ToolHints
    uses_models: bool = True
    """Model-heavy: runs as a job behind the GPU lock and the queue, takes `wait_seconds`."""
    components: tuple[str, ...] = ("generator", "clip")
    """Runtime components the tool uses (`generator`, `clip`, `llm`), loaded when the server starts."""
    warm_up: Callable[[Runtime], None] | None = None
    """Work the tool's first call would otherwise pay for; the server does it in the background once loaded."""
