"""`list_concepts` and `delete_concept`: the concept store as the assistant sees it (concepts are learned with
`customize_concept` and applied with `concept=NAME` or an image reference `concept:NAME`)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from pictoprompt.models.concepts import ConceptSummary
from pictoprompt.tools.base import ConceptName, ToolContext, ToolHints, ToolRequest, ToolSpec


class ListConceptsRequest(ToolRequest):
    pass


class ListConceptsResponse(BaseModel):
    concepts: list[ConceptSummary] = Field(description="Every learned concept and domain adapter, by name.")


def list_concepts(request: ListConceptsRequest, context: ToolContext) -> ListConceptsResponse:
    return ListConceptsResponse(concepts=[card.summary() for card in context.concept_store().list()])


class DeleteConceptRequest(ToolRequest):
    name: ConceptName


class DeleteConceptResponse(BaseModel):
    deleted: str


def delete_concept(request: DeleteConceptRequest, context: ToolContext) -> DeleteConceptResponse:
    context.concept_store().delete(request.name)
    return DeleteConceptResponse(deleted=request.name)


LIST_SPEC = ToolSpec(
    name="list_concepts",
    title="List learned concepts",
    description=(
        "Learned concepts and domain adapters: base model, settings, final loss. Use as concept=NAME or "
        "image='concept:NAME'."
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
    description="Delete a learned concept for good.",
    request_model=DeleteConceptRequest,
    response_model=DeleteConceptResponse,
    run=delete_concept,
    hints=ToolHints(read_only=False, destructive=True, idempotent=True, open_world=False),
    uses_models=False,
)
