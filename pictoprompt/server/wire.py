"""The tools as the MCP wire carries them: compact schemas, one validation per call, the server that lists them.

Every assistant carries the schemas in its context, so they say only what a model needs to call the tool right:
no titles, no `null` branch or `default: null` on optional inputs (omitting is the same thing). Output schemas are
types only: the meaning is in the description and in each result, which always carries every field.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mcp.server.extension import RequestHandler
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp_types import (
    CallToolResult,
    Icon,
    ServerCapabilities,
    ServerTasksCapability,
    ServerTasksRequestsCapability,
    TasksCallCapability,
    TasksCancelCapability,
    TasksListCapability,
    TasksToolsCapability,
    TextContent,
    ToolAnnotations,
    ToolExecution,
)
from mcp_types import Tool as McpTool
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, JsonSchemaValue
from pydantic_core import core_schema


class WireSchema(GenerateJsonSchema):
    """A model's JSON schema without titles and without descriptions repeated from class docstrings."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def model_schema(self, schema: core_schema.ModelSchema) -> JsonSchemaValue:
        json_schema = super().model_schema(schema)
        json_schema.pop("title", None)
        if json_schema.get("description") == inspect.cleandoc(schema["cls"].__doc__ or ""):
            json_schema.pop("description")
        return json_schema


class InputSchema(WireSchema):
    """Arguments: an optional argument is omitted rather than null, so its schema is the non-null type alone."""

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        json_schema = super().default_schema(schema)
        if json_schema.get("default", ...) is None:
            del json_schema["default"]
        return json_schema


class OutputSchema(WireSchema):
    """Results: types only, no defaults (a result carries every field), a nullable scalar or object as a type list,
    and each nested model written in place rather than as a `$ref` to `$defs` (shorter for models used once or
    twice, as result models are; none is recursive)."""

    def generate(self, schema: core_schema.CoreSchema, mode: JsonSchemaMode = "validation") -> JsonSchemaValue:
        generated = super().generate(schema, mode)
        return _inlined(generated, generated.pop("$defs", {}))

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        inner = self.generate_inner(schema["schema"])
        if isinstance(inner.get("type"), str) and set(inner) <= {"type", "description"}:
            return {**inner, "type": [inner["type"], "null"]}
        return super().nullable_schema(schema)

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        json_schema = super().default_schema(schema)
        json_schema.pop("default", None)
        return json_schema


def _inlined(schema: Any, defs: dict[str, Any], within: tuple[str, ...] = ()) -> Any:
    """`schema` without its `description` and `required` keywords (properties of those names are kept), every `$ref`
    replaced by its definition, and `anyOf: [typed, null]` as one type list."""
    if isinstance(schema, list):
        return [_inlined(item, defs, within) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        if name in within:
            raise ValueError(f"the result model {name} is recursive and cannot be written in place")
        return _inlined(defs[name], defs, (*within, name))
    kept = {
        key: {name: _inlined(sub, defs, within) for name, sub in value.items()}
        if key == "properties"
        else _inlined(value, defs, within)
        for key, value in schema.items()
        if key not in {"description", "required"}
    }
    options = kept.get("anyOf")
    if set(kept) == {"anyOf"} and len(options) == 2 and {"type": "null"} in options:
        typed = next(option for option in options if option != {"type": "null"})
        if isinstance(typed.get("type"), str):
            return {**typed, "type": [typed["type"], "null"]}
    return kept


def listed_output_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The output schema `tools/list` carries: the result's own fields and their JSON types, nothing nested (the
    nested types cost a quarter of the list, and each result's JSON shows its fields anyway)."""
    full = output_schema(model)
    fields = {name: {"type": sub["type"]} if "type" in sub else {} for name, sub in full["properties"].items()}
    return {"type": "object", "properties": fields}


def input_schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(by_alias=True, schema_generator=InputSchema, mode="validation")


def output_schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(by_alias=True, schema_generator=OutputSchema, mode="serialization")


ToolCall = Callable[[Any, Context], Awaitable[CallToolResult]]


@dataclass(frozen=True)
class WireTool:
    """One tool as the server offers it."""

    name: str
    title: str
    description: str
    arguments: type[BaseModel]
    """Validates a call's arguments; the instance is what `call` receives."""
    result: type[BaseModel]
    """The structured content of a successful call."""
    annotations: ToolAnnotations
    call: ToolCall
    meta: dict[str, Any] | None = None
    """The listing's `_meta` (the app view's `ui` entry), kept small: every assistant carries it."""

    def listing(self) -> McpTool:
        return McpTool(
            name=self.name,
            title=self.title,
            description=self.description,
            input_schema=input_schema(self.arguments),
            output_schema=listed_output_schema(self.result),
            annotations=self.annotations,
            meta=self.meta,
        )


def text_result(result: BaseModel) -> CallToolResult:
    """A result as structured content, and the same JSON as text for clients that read only text."""
    payload = result.model_dump(mode="json")
    return CallToolResult(content=[TextContent(text=json.dumps(payload, indent=1))], structured_content=payload)


def validation_message(error: ValidationError) -> str:
    """The failed arguments, one clause each, in words a model can act on."""
    problems = [f"{'.'.join(str(part) for part in e['loc']) or 'arguments'}: {e['msg']}" for e in error.errors()]
    return f"Invalid arguments ({'; '.join(problems)}). Correct them and call again."


def lenient(arguments: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """Arguments with JSON-encoded lists and objects decoded: some clients send `"[\\"a.png\\"]"` for a list (the
    SDK's own tools accept that too). Strings meant as strings are left alone."""
    decoded = dict(arguments)
    for name, value in arguments.items():
        field = model.model_fields.get(name)
        if field is None or field.annotation is str or not isinstance(value, str):
            continue
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            continue
        if isinstance(parsed, list | dict):
            decoded[name] = parsed
    return decoded


class PictopromptServer(MCPServer):
    """An `MCPServer` whose tools are `WireTool`s: listed with their compact schemas, validated once per call.
    Only `list_tools` and `call_tool` are replaced; the rest is the SDK's own."""

    def __init__(
        self,
        *args: Any,
        wire_tools: list[WireTool],
        tool_icons: Mapping[str, list[Icon]] | None = None,
        task_tools: frozenset[str] = frozenset(),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.wire_tools = {tool.name: tool for tool in wire_tools}
        icons = tool_icons or {}
        optional = ToolExecution(task_support="optional")
        self._listing = [
            tool.listing().model_copy(
                update={"icons": icons.get(tool.name), "execution": optional if tool.name in task_tools else None}
            )
            for tool in wire_tools
        ]
        if task_tools:
            self._advertise_tasks()

    def _advertise_tasks(self) -> None:
        """Add the 2025-11-25 `tasks` capability, which the SDK cannot derive from its handlers (the 2026 wire
        drops the field and announces the extension instead)."""
        derive = self._lowlevel_server.get_capabilities

        def with_tasks(*args: Any, **kwargs: Any) -> ServerCapabilities:
            capabilities = derive(*args, **kwargs)
            capabilities.tasks = ServerTasksCapability(
                list=TasksListCapability(),
                cancel=TasksCancelCapability(),
                requests=ServerTasksRequestsCapability(tools=TasksToolsCapability(call=TasksCallCapability())),
            )
            return capabilities

        self._lowlevel_server.get_capabilities = with_tasks  # type: ignore[method-assign]

    def add_request_handler(self, method: str, params_type: type[BaseModel], handler: RequestHandler) -> None:
        """Serve a request method the SDK's `MCPServer` has no entry point for (e.g. `logging/setLevel`)."""
        self._lowlevel_server.add_request_handler(method, params_type, handler)

    async def list_tools(self) -> list[McpTool]:
        return list(self._listing)

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Context | None = None) -> CallToolResult:
        tool = self.wire_tools.get(name)
        if tool is None:
            raise ToolError(f"There is no tool '{name}'; tools/list names the tools this server offers.")
        try:
            request = tool.arguments.model_validate(lenient(arguments, tool.arguments))
        except ValidationError as error:
            raise ToolError(f"Error executing tool {name}: {validation_message(error)}") from error
        context = context or Context(mcp_server=self)
        try:
            return await tool.call(request, context)
        except ToolError as error:
            raise ToolError(f"Error executing tool {name}: {error}") from error
        except Exception as error:
            # A crash: its text stays in the server's log, as the SDK does for its own tools.
            raise UnexpectedToolError(f"Error executing tool {name}") from error
