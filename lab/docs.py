"""The tool reference, generated from the tools' own schemas so it never drifts (`pictoprompt tools --markdown`).

The README holds a compact table (one row per tool); `docs/TOOLS.md` holds the full reference with every argument.
A maintainer's tool: it lives in the lab, and the product's `tools --markdown` and `--write-readme` import it.
"""

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


TOOLS_DOC_HEADER = (
    "# Tool reference\n\n"
    "Generated from the tools' own schemas by `pictoprompt tools --markdown`; `pictoprompt tools --write-readme "
    "README.md` refreshes this file and the README's table (a test keeps both in sync).\n"
)


def _listed_tools() -> list[Any]:
    import anyio

    from pictoprompt.server.app import create_server

    async def listing() -> list[Any]:
        return await create_server(preload=False).list_tools()

    return anyio.run(listing)


def _hints(tool: Any) -> list[str]:
    hints = tool.annotations
    # A hint left out is the protocol's default: destructive and open-world true, the others false.
    return [
        name
        for name, on in (
            ("read-only", bool(hints.read_only_hint)),
            ("destructive", hints.destructive_hint is not False),
            ("idempotent", bool(hints.idempotent_hint)),
            ("open-world", hints.open_world_hint is not False),
        )
        if on
    ]


def _first_sentence(text: str) -> str:
    # A sentence ends at ". " outside parentheses: descriptions hold asides like "(SD-IPC; no prompt)".
    depth = 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "." and depth == 0 and text[index + 1 : index + 2] in (" ", ""):
            return text[: index + 1]
    return text


def tools_table() -> str:
    """The README's compact reference: one row per tool (first sentence, hints, arguments; * marks required)."""
    lines = ["| tool | what it does | hints | arguments |", "| --- | --- | --- | --- |"]
    for tool in _listed_tools():
        required = set(tool.input_schema.get("required", []))
        arguments = ", ".join(
            f"`{name}`" + ("*" if name in required else "") for name in tool.input_schema.get("properties", {})
        )
        summary = _first_sentence(tool.description.strip()).replace("|", "/")
        lines.append(f"| `{tool.name}` | {summary} | {', '.join(_hints(tool)) or '-'} | {arguments or '-'} |")
    return "\n".join(lines)


def tools_markdown() -> str:
    """The full reference for every MCP tool: description, hints and a table of arguments."""
    lines = []
    for tool in _listed_tools():
        lines += [f"### `{tool.name}`", "", tool.description.strip(), ""]
        lines += [f"Hints: {', '.join(_hints(tool)) or 'none'}.", ""]
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


def tools_document() -> str:
    """The text of `docs/TOOLS.md`."""
    return f"{TOOLS_DOC_HEADER}\n{tools_markdown().rstrip()}\n"


def write_readme_section(readme: Path) -> Path:
    """Replace the README's block between the tools markers with `tools_table()` and write `docs/TOOLS.md`
    beside it with the full reference; returns that file's path."""
    text = readme.read_text()
    head, rest = text.split(START_MARKER, 1)
    _, tail = rest.split(END_MARKER, 1)
    readme.write_text(f"{head}{START_MARKER}\n{tools_table()}\n{END_MARKER}{tail}")
    reference = readme.parent / "docs" / "TOOLS.md"
    reference.parent.mkdir(exist_ok=True)
    reference.write_text(tools_document())
    return reference
