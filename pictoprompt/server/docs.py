"""The README's tool reference, generated from the tools' own schemas so it never drifts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

START_MARKER = "<!-- tools:start -->"
END_MARKER = "<!-- tools:end -->"


def _type_of(schema: dict[str, Any]) -> str:
    if "anyOf" in schema:
        return " or ".join(_type_of(option) for option in schema["anyOf"])
    if "enum" in schema:
        return " / ".join(f"`{value}`" for value in schema["enum"])
    if schema.get("type") == "array":
        return f"list of {_type_of(schema.get('items', {}))}"
    return schema.get("type", "object")


def _bounds(schema: dict[str, Any]) -> str:
    parts = []
    bounds = (
        ("minimum", ">="),
        ("maximum", "<="),
        ("multipleOf", "multiple of"),
        ("minItems", "items >="),
        ("maxItems", "items <="),
    )
    for key, label in bounds:
        if key in schema:
            parts.append(f"{label} {schema[key]}")
    for option in schema.get("anyOf", []):
        parts += [part for part in _bounds(option).split(", ") if part and part not in parts]
    return ", ".join(parts)


def tools_markdown() -> str:
    """Markdown for every MCP tool: description, hints and a table of arguments."""
    import anyio

    from pictoprompt.server.app import create_server

    async def listing() -> list[Any]:
        return await create_server(preload=False).list_tools()

    lines = []
    for tool in anyio.run(listing):
        hints = tool.annotations
        # A hint left out is the protocol's default: destructive and open-world true, the others false.
        flags = [
            name
            for name, on in (
                ("read-only", bool(hints.read_only_hint)),
                ("destructive", hints.destructive_hint is not False),
                ("idempotent", bool(hints.idempotent_hint)),
                ("open-world", hints.open_world_hint is not False),
            )
            if on
        ]
        lines += [f"### `{tool.name}`", "", tool.description.strip(), ""]
        lines += [f"Hints: {', '.join(flags) or 'none'}.", ""]
        properties = tool.input_schema.get("properties", {})
        required = set(tool.input_schema.get("required", []))
        if properties:
            lines += ["| argument | type | default | description |", "| --- | --- | --- | --- |"]
            for name, schema in properties.items():
                default = "required" if name in required else f"`{schema['default']}`" if "default" in schema else "-"
                bounds = _bounds(schema)
                description = (schema.get("description") or "") + (f" ({bounds})" if bounds else "")
                lines.append(f"| `{name}` | {_type_of(schema)} | {default} | {description} |")
            lines.append("")
    return "\n".join(lines)


def write_readme_section(readme: Path) -> None:
    """Replace the README's block between the tools markers with `tools_markdown()`."""
    text = readme.read_text()
    head, rest = text.split(START_MARKER, 1)
    _, tail = rest.split(END_MARKER, 1)
    readme.write_text(f"{head}{START_MARKER}\n{tools_markdown()}\n{END_MARKER}{tail}")
