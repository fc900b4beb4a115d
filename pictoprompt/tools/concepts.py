"""`list_concepts`, `delete_concept`, and what the generation tools need to use a learned concept.

The generation tools take `concept=NAME`: `load_concept` gives the weights to pass to `applied_concept`, and
`concept_image_embedding` what an image reference `concept:NAME` stands for. Both refuse a concept trained on
another base model, naming the one it needs.
"""

from __future__ import annotations

from typing import Annotated

import torch
from diffusers import StableDiffusionPipeline
from pydantic import BaseModel, Field

from pictoprompt.errors import PictopromptError
from pictoprompt.methods.concept_tuning import ConceptWeights, base_hash
from pictoprompt.models.clip import ClipModel
from pictoprompt.models.concepts import NAME_PATTERN, NAME_RULE, ConceptStore, ConceptSummary
from pictoprompt.tools.base import ToolContext, ToolHints, ToolRequest, ToolSpec

ConceptName = Annotated[
    str,
    Field(min_length=1, max_length=64, pattern=NAME_PATTERN.pattern, description=f"The concept's name: {NAME_RULE}."),
]


def concept_store(context: ToolContext) -> ConceptStore:
    store = context.concepts
    if store is None:
        raise PictopromptError("This server has no concept store (no data directory); concepts are unavailable.")
    return store


def load_concept(
    context: ToolContext, name: str | None, pipeline: StableDiffusionPipeline, clip: ClipModel
) -> ConceptWeights | None:
    """The weights of concept `name` for `applied_concept`, or None when no concept is asked for."""
    if name is None:
        return None
    stored = concept_store(context).load(name, base_hash(pipeline, clip), context.runtime.model_ids())
    return ConceptWeights.from_tensors(stored.tensors)


def concept_image_embedding(
    context: ToolContext, name: str, pipeline: StableDiffusionPipeline, clip: ClipModel
) -> torch.Tensor:
    """The (1, P) CLIP image embedding `concept:NAME` stands for: the mean of its references through the tuned
    image encoder. Feed it to `ImageToPrompt.prompt/edit` as an image's embedding."""
    store = concept_store(context)
    embedding = store.mean_embedding(name, base_hash(pipeline, clip), context.runtime.model_ids())
    return embedding.to(clip.device)


CONCEPT_REF_PREFIX = "concept:"


def image_refs_to_fetch(refs: list[str]) -> list[str]:
    """The references the server must fetch: `concept:NAME` stands for a stored embedding, not a picture."""
    return [ref for ref in refs if not ref.startswith(CONCEPT_REF_PREFIX)]


def stored_embeddings(
    context: ToolContext, refs: list[str], pipeline: StableDiffusionPipeline, clip: ClipModel
) -> dict[str, torch.Tensor]:
    """The embeddings `concept:NAME` references stand for, read before any concept is applied (the check that
    a concept belongs to this base model hashes the untouched base)."""
    return {
        ref: concept_image_embedding(context, ref.removeprefix(CONCEPT_REF_PREFIX), pipeline, clip)
        for ref in refs
        if ref.startswith(CONCEPT_REF_PREFIX)
    }


def reference_embeddings(
    context: ToolContext, refs: list[str], clip: ClipModel, stored: dict[str, torch.Tensor]
) -> torch.Tensor:
    """(N, P) CLIP image embeddings of the references: pictures through `clip`, concepts from `stored`."""
    rows = [stored[ref] if ref in stored else clip.encode_image([context.images.load(ref)]) for ref in refs]
    return torch.cat([row.float().reshape(1, -1) for row in rows])


class ListConceptsRequest(ToolRequest):
    pass


class ListConceptsResponse(BaseModel):
    concepts: list[ConceptSummary] = Field(description="Every learned concept and domain adapter, by name.")


def list_concepts(request: ListConceptsRequest, context: ToolContext) -> ListConceptsResponse:
    return ListConceptsResponse(concepts=[card.summary() for card in concept_store(context).list()])


class DeleteConceptRequest(ToolRequest):
    name: ConceptName


class DeleteConceptResponse(BaseModel):
    deleted: str


def delete_concept(request: DeleteConceptRequest, context: ToolContext) -> DeleteConceptResponse:
    concept_store(context).delete(request.name)
    return DeleteConceptResponse(deleted=request.name)


LIST_SPEC = ToolSpec(
    name="list_concepts",
    title="List learned concepts",
    description=(
        "List the concepts learned with customize_concept (and domain adapters), with the base model each was "
        "trained on, its settings and final loss. Pass a name as concept=NAME to generate_image, vary_image or "
        "edit_with_text, or use the image reference concept:NAME."
    ),
    request_model=ListConceptsRequest,
    response_model=ListConceptsResponse,
    run=list_concepts,
    hints=ToolHints(read_only=True, destructive=False, idempotent=True, open_world=False),
    uses_models=False,
)

DELETE_SPEC = ToolSpec(
    name="delete_concept",
    title="Delete a learned concept",
    description="Delete a learned concept (its weights, card and thumbnails) for good.",
    request_model=DeleteConceptRequest,
    response_model=DeleteConceptResponse,
    run=delete_concept,
    hints=ToolHints(read_only=False, destructive=True, idempotent=True, open_world=False),
    uses_models=False,
)
