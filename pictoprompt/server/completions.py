"""Completions (`completion/complete`): the names of concepts, profiles and assets that the prompts' arguments and
the resource templates take.

Assets are offered on stdio only: over HTTP an asset id is the only key to somebody's picture, and listing the
ids would hand every client the pictures of all the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import anyio
from mcp.server.mcpserver import MCPServer
from mcp_types import Completion, CompletionArgument, CompletionContext, PromptReference, ResourceTemplateReference

from pictoprompt.models.concepts import ConceptStore
from pictoprompt.server.assets import AssetStore, asset_uri

MAX_VALUES = 100
"""The protocol's cap on the values of one answer; `total` and `hasMore` tell the rest."""

Kind = Literal["concept", "profile", "asset_id", "asset_uri"]

TEMPLATE_ARGUMENTS: dict[tuple[str, str], Kind] = {
    ("pictoprompt://concepts/{name}", "name"): "concept",
    ("pictoprompt://profiles/{name}", "name"): "profile",
    ("pictoprompt://assets/{asset_id}", "asset_id"): "asset_id",
}
PROMPT_ARGUMENTS: dict[tuple[str | None, str], Kind] = {
    ("learn_concept", "name"): "concept",
    (None, "image"): "asset_uri",  # every prompt that takes a picture
}


@dataclass(frozen=True)
class CompletionSources:
    """Where the candidates come from."""

    concepts: ConceptStore
    assets: AssetStore
    profiles: Callable[[], Iterable[str]]
    offer_assets: bool
    """False over HTTP (see the module's docstring)."""

    async def candidates(self, kind: Kind) -> list[str]:
        if kind == "concept":
            return await anyio.to_thread.run_sync(self.concepts.names)
        if kind == "profile":
            return sorted(self.profiles())
        if not self.offer_assets:
            return []
        ids = await anyio.to_thread.run_sync(self.assets.ids_newest_first)
        return ids if kind == "asset_id" else [asset_uri(asset_id) for asset_id in ids]


def kind_of(ref: PromptReference | ResourceTemplateReference, argument: str) -> Kind | None:
    if isinstance(ref, ResourceTemplateReference):
        return TEMPLATE_ARGUMENTS.get((ref.uri, argument))
    return PROMPT_ARGUMENTS.get((ref.name, argument)) or PROMPT_ARGUMENTS.get((None, argument))


def matching(candidates: list[str], typed: str) -> Completion:
    """The candidates that start with what the user typed (ignoring case), in the candidates' order."""
    prefix = typed.casefold()
    hits = [candidate for candidate in candidates if candidate.casefold().startswith(prefix)]
    return Completion(values=hits[:MAX_VALUES], total=len(hits), has_more=len(hits) > MAX_VALUES)


def add_completions(server: MCPServer, sources: CompletionSources) -> None:
    @server.completion()
    async def complete(
        ref: PromptReference | ResourceTemplateReference,
        argument: CompletionArgument,
        context: CompletionContext | None,
    ) -> Completion:
        kind = kind_of(ref, argument.name)
        if kind is None:  # a free-text argument (a prompt, a change in words): nothing to offer
            return Completion(values=[], total=0, has_more=False)
        return matching(await sources.candidates(kind), argument.value)
