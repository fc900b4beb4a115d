"""What every tool module shares: the call context, image inputs and outputs, and the tool registry entry.

A tool is plain Python, `run(request, context) -> response` with pydantic models on both sides: the server, the CLI
and the tests call the same function with their own `ToolContext`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from pictoprompt.errors import PictopromptError
from pictoprompt.methods.domain import domain_note
from pictoprompt.methods.generation import Sampler
from pictoprompt.models.concepts import NAME_PATTERN, ConceptStore
from pictoprompt.models.runtime import Runtime
from pictoprompt.progress import Progress

IMAGE_REF_DESCRIPTION = "Path, URL, data URI or asset URI."
"""What an image argument accepts, in a few words: the server's instructions explain image references once."""

ImageRef = Annotated[
    str,
    Field(min_length=1, max_length=60_000_000),
    WithJsonSchema({"type": "string", "description": IMAGE_REF_DESCRIPTION}),
]

CONCEPT_REF_PREFIX = "concept:"
"""An image reference `concept:NAME` stands for a learned concept's stored embedding, not a picture."""


def image_refs_to_fetch(refs: list[str]) -> list[str]:
    """The references the server must fetch: `concept:NAME` stands for a stored embedding, not a picture."""
    return [ref for ref in refs if not ref.startswith(CONCEPT_REF_PREFIX)]


# ------------------------------------------------------------------------------------------------ shared fields

Seed = Annotated[
    int | None,
    Field(ge=0, le=2**32 - 1, description="Omit for random."),
]
NumImages = Annotated[int, Field(ge=1, le=8, description="Images to make.")]
Steps = Annotated[int, Field(ge=1, le=150, description="Denoising steps.")]
Guidance = Annotated[float, Field(ge=0.0, le=30.0, description="Guidance scale.")]
Side = Annotated[
    int | None,
    Field(ge=16, le=2048, multiple_of=8, description="Default: native."),
]

ConceptName = Annotated[
    str,
    # The pattern says what a name may hold; the store's own refusals put the rule in words (NAME_RULE).
    Field(min_length=1, max_length=64, pattern=NAME_PATTERN.pattern, description="The concept's name."),
]
AppliedConcept = Annotated[
    str | None,
    Field(pattern=NAME_PATTERN.pattern),
    # A name that breaks the pattern cannot be in the store: the store's refusal says so, no need to spell it here.
    WithJsonSchema({"type": "string", "description": "A concept from customize_concept."}),
]

MaxTokens = Annotated[
    int,
    Field(ge=4, le=75, description="Longest prompt in LLM tokens (paper: 16-64)."),
]
Perplexity = Annotated[
    float, Field(description="Perplexity of the prompt under the LLM; lower reads more naturally (PEZ-style ~1000).")
]
LlmNote = Annotated[
    str | None,
    Field(
        description="Set when the profile's LLM is not on this machine and the bundled SmolLM2-135M-Instruct wrote "
        "the prompts instead: says how to get the profile's LLM."
    ),
]


DomainNote = Annotated[
    str | None,
    Field(description="Set when a picture is far from what the model set knows: what that means, what to use instead."),
]


class ToolRequest(BaseModel):
    """Base of every tool's arguments: unknown fields are refused so typos surface as errors."""

    model_config = ConfigDict(extra="forbid")

    def image_refs(self) -> list[str]:
        """Every image reference in the request, so the server can resolve them before the job starts."""
        return []


class SamplingRequest(ToolRequest):
    """How to sample, for every request that makes images, read by `render_and_score`. A tool's request derives from
    this class and a class of its own fields, this one first, so that its own fields lead its schema."""

    num_images: NumImages = 1
    steps: Steps = 25
    guidance: Guidance = 7.5
    seed: Seed = None
    width: Side = None
    height: Side = None
    concept: AppliedConcept = None


class SavedImage(BaseModel):
    """Where an output image was stored."""

    uri: str = Field(description="pictoprompt://assets/<id> resource URI (or file URI from the CLI).")
    path: str = Field(description="The PNG's path on the server's disk.")


class OutputImage(SavedImage):
    """One generated image as every image-producing tool reports it."""

    seed: int = Field(description="Seed that reproduces this image with the same arguments.")
    width: int
    height: int


class Variation(OutputImage):
    """An image made from references, with how close CLIP finds it to them."""

    image_similarity: float = Field(
        description="CLIP cosine similarity between this image and the reference image(s) (weighted mean over the "
        "references); higher means closer."
    )


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
    sampler: Sampler | None = None
    """Renders the denoising in place of `methods.generation.generate`: a Ray Serve replica passes one that
    batches concurrent calls (`generate_batch`)."""

    def concept_store(self) -> ConceptStore:
        if self.concepts is None:
            raise PictopromptError("This server has no concept store (no data directory); concepts are unavailable.")
        return self.concepts


def picture_note(context: ToolContext, refs: Sequence[str]) -> str | None:
    """The `domain_note` for the pictures among `refs`, from the profile's `domain_check` (None without one)."""
    check = context.runtime.profile.domain_check
    if check is None:
        return None
    images = [context.images.load(ref) for ref in image_refs_to_fetch(list(refs))]
    return domain_note(context.runtime.pipeline(), images, check)


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
    warm_up: Callable[[Runtime, Progress], object] | None = None
    """Work the tool's first call would otherwise pay for; the server does it in the background once loaded."""
